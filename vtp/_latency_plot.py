"""Pictures of a latency table: ``vtp.plot_latency_table`` (time against width for each
sub-layer kind: the staircase that explains why a plan keeps 64 dims and not 60) and
``vtp.plot_block_latency`` (a structure's predicted time per block against the dense
model's). PNG files, written atomically."""
from __future__ import annotations

import os
from typing import Optional, Sequence, Union

from .atomic import atomic_write
from .latency_model import BlockWidths, LatencyTable

__all__ = ["plot_latency_table", "plot_block_latency"]

# (panel title, [(curve name, label)]): each curve at its full other width
_PANELS = (
    ("qkv", [("qkv_in", "by input width (attn_in)"), ("qkv_out", "by output rows (QK + V)")]),
    ("proj", [("proj_in", "by input width (kept V)")]),
    ("fc1", [("fc1_in", "by input width (mlp_in)"), ("fc1_out", "by output width (hidden)")]),
    ("fc2", [("fc2_in", "by input width (hidden)")]),
    ("attention (SDPA)", [("attn_diag", "by head width, QK = V")]),
    ("attention (SDPA)", [("attn_heads", "by heads, full head width")]),
    ("LayerNorm + gather", [("norm_gather", "by kept columns")]),
    ("activation", [("act", "by hidden width")]),
    ("gather of kept values", [("v_gather", "by kept V width")]),
)


def _pyplot():
    # Imported on first use: matplotlib costs a second at start-up that `import vtp` should not.
    import matplotlib
    matplotlib.use("Agg")  # files only; works without a display
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path) -> str:
    plt = _pyplot()
    fig.tight_layout()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    finally:
        plt.close(fig)
    return str(path)


def _describe(table: LatencyTable) -> str:
    k = table.key
    return f"{k.get('device', '?')}, batch {k.get('batch_size')}, {k.get('dtype')}, {k.get('threads')} threads"


def plot_latency_table(table: LatencyTable, path: Union[str, os.PathLike], shape: Optional[str] = None) -> str:
    """Draw ``table``'s measured times against width, one panel per sub-layer kind, for the
    block shape named ``shape`` (default: the first block's): the measured points, the
    staircase a plan rounding its widths to the alignment reaches (each width costs what the
    next aligned width up costs), and, thin, what a lookup gives at every width (ragged
    widths with the measured penalty). Returns the path written."""
    if not isinstance(table, LatencyTable):
        raise TypeError(f"table: expected a vtp.LatencyTable, got {type(table).__name__}")
    name = shape if shape is not None else table.blocks[0]
    if name not in table.shapes:
        raise ValueError(f"shape: expected one of {sorted(table.shapes)}, got {name!r}")
    t = table.shapes[name]
    plt = _pyplot()
    fig, axes = plt.subplots(3, 3, figsize=(15, 11))
    for ax, (title, curves) in zip(axes.flat, _PANELS):
        for i, (curve_name, label) in enumerate(curves):
            c = t.curves[curve_name]
            ax.plot(c.widths, c.ms, ".", ms=3, color=f"C{i}", label=f"{label}, measured")
            # what a lookup gives: the next multiple of the alignment up, ragged widths penalised
            ws = list(range(1, c.widths[-1] + 1))
            ax.plot(ws, [c.at(w) for w in ws], color=f"C{i}", lw=0.6, alpha=0.5)
            ax.step(c.grid, c.fitted, where="pre", color=f"C{i}", lw=1.2, label="staircase (aligned widths)")
        ax.set_title(title)
        ax.set_xlabel("heads" if curves[0][0] == "attn_heads" else "width")
        ax.set_ylabel("median ms")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"latency table: {name} ({_describe(table)})", fontsize=10)
    return _save(fig, path)


def plot_block_latency(table: LatencyTable, widths: Sequence[BlockWidths], path: Union[str, os.PathLike],
                       label: str = "plan") -> str:
    """Draw the predicted time of each block of ``widths`` beside the dense model's (both
    from ``table``), with the whole models' predicted totals in the title. Returns the path."""
    if not isinstance(table, LatencyTable):
        raise TypeError(f"table: expected a vtp.LatencyTable, got {type(table).__name__}")
    table.check_widths(widths)
    dense = table.block_ms(table.dense_widths())
    pruned = table.block_ms(widths)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(dense) + 2), 4))
    xs = range(len(dense))
    ax.bar([x - 0.2 for x in xs], dense, width=0.4, color="0.6", label="dense")
    ax.bar([x + 0.2 for x in xs], pruned, width=0.4, color="C0", label=label)
    ax.set_xticks(list(xs))
    ax.set_xlabel("block")
    ax.set_ylabel("predicted ms")
    ax.legend()
    total_d, total_p = table.predict(table.dense_widths()), table.predict(widths)
    ax.set_title(f"{label}: {total_p:.1f} ms predicted against {total_d:.1f} ms dense "
                 f"({total_p / total_d:.2f}x); {_describe(table)}", fontsize=9)
    return _save(fig, path)
