"""``vtp report``: the dense vs pruned table and the plots of a run directory.

Reads what the stages wrote (eval-*/eval.json, prune/plan.json and gates.json, the stages'
metrics.jsonl) and writes report.md plus three PNGs:

* kept_dims.png    kept dimensions per block and site: where VTP prunes
* gate_hist.png    distribution of |gate| at pruning time (log x) with the threshold
* curves.png       loss and accuracy per epoch of dense training (when the run had it),
                   sparse training and fine-tuning
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from vtp import ALL_SITES
from vtp.atomic import write_text

from .metrics import read_metrics
from .tables import format_table

__all__ = ["write_report", "collect", "results_table", "plot_kept", "plot_gate_hist", "plot_curves"]

STAGES = ("train", "sparse-train", "finetune")


def _read_json(path: str) -> Optional[Any]:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _first(run: str, *relative: str) -> Optional[str]:
    for rel in relative:
        path = os.path.join(run, rel)
        if os.path.exists(path):
            return path
    return None


def collect(run: str) -> Dict[str, Any]:
    """Everything the report shows, from a `vtp run` directory or a single stage directory."""
    plan_path = _first(run, "prune/plan.json", "plan.json")
    prune_dir = os.path.dirname(plan_path) if plan_path else os.path.join(run, "prune")
    out = {
        "dense": _read_json(os.path.join(run, "eval-dense", "eval.json")),
        "pruned": _read_json(os.path.join(run, "eval-pruned", "eval.json")),
        "prune": _read_json(os.path.join(prune_dir, "summary.json")),
        "plan": _read_json(os.path.join(prune_dir, "plan.json")),
        "gates": _read_json(os.path.join(prune_dir, "gates.json")),
        "metrics": {},
    }
    for stage in STAGES:
        rows = read_metrics(os.path.join(run, stage, "metrics.jsonl"))
        if not rows:
            rows = [r for r in read_metrics(os.path.join(run, "metrics.jsonl"))
                    if r.get("stage") == stage]
        if rows:
            out["metrics"][stage] = rows
    return out


def _last_epoch(rows: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    epochs = [r for r in rows if r.get("kind") == "epoch"]
    return epochs[-1] if epochs else {}


def _fmt(value: Optional[float], spec: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return format(value, spec)


def table_rows(info: Dict[str, Any]) -> List[Dict[str, Any]]:
    rows = []
    dense, pruned, prune = info["dense"], info["pruned"], info["prune"]
    # `vtp run` times the dense model in turns with the pruned one: those two figures go
    # together; a dense figure from another moment would make the speed-up a guess.
    speed = ((pruned or {}).get("speed") or {}).get("models") or {}
    if dense:
        rows.append({"model": "dense", "acc1": dense.get("val_acc1"), "acc5": dense.get("val_acc5"),
                     "params": dense.get("params"), "macs": dense.get("macs"),
                     "ips": (speed.get("dense") or dense).get("images_per_s")})
    sparse = _last_epoch(info["metrics"].get("sparse-train", []))
    if sparse or prune:
        rows.append({"model": "sparse-trained (gated)", "acc1": sparse.get("val_acc1"),
                     "acc5": sparse.get("val_acc5"),
                     "params": prune.get("params_before") if prune else None,
                     "macs": prune.get("macs_before") if prune else None, "ips": None})
    if prune and not pruned:
        rows.append({"model": f"pruned {100 * prune['pruned_ratio']:.0f} % (not fine-tuned)",
                     "acc1": None, "acc5": None, "params": prune.get("params_after"),
                     "macs": prune.get("macs_after"), "ips": None})
    if pruned:
        ratio = f" {100 * prune['pruned_ratio']:.0f} %" if prune else ""
        rows.append({"model": f"pruned{ratio} + fine-tuned", "acc1": pruned.get("val_acc1"),
                     "acc5": pruned.get("val_acc5"), "params": pruned.get("params"),
                     "macs": pruned.get("macs"), "ips": pruned.get("images_per_s")})
    return rows


def results_table(rows: Sequence[Dict[str, Any]]) -> str:
    """The dense vs pruned table; ratios are against the first row."""
    base = rows[0] if rows else {}
    cells = []
    for r in rows:
        def rel(key: str) -> str:
            if r is base or not base.get(key) or not r.get(key):
                return ""
            return f" ({r[key] / base[key]:.2f}x)"
        params = _fmt(r["params"] / 1e6 if r.get("params") else None, ".3f") + rel("params")
        macs = _fmt(r["macs"] / 1e9 if r.get("macs") else None, ".4f") + rel("macs")
        ips = _fmt(r.get("ips"), ".1f") + rel("ips")
        cells.append([r["model"], _fmt(r.get("acc1"), ".2f"), _fmt(r.get("acc5"), ".2f"), params, macs, ips])
    return format_table(["model", "top-1 %", "top-5 %", "params (M)", "MACs (G)", "images/s"], cells, pad=False)


def _pyplot():
    # Imported on first use: matplotlib costs a second at start-up, which every `vtp`
    # command would pay otherwise.
    import matplotlib
    matplotlib.use("Agg")  # files only; works without a display
    import matplotlib.pyplot as plt
    return plt


def _sites_of(names) -> List[str]:
    """The gate sites among ``names`` (gate names), in ``vtp.ALL_SITES`` order."""
    return [s for s in ALL_SITES if any(n.endswith("." + s) for n in names)]


def _kept_grid(plan: Dict[str, Any]):
    sites = _sites_of(plan["sizes"])
    blocks = sorted({int(name.split(".")[1]) for name in plan["sizes"]})
    kept = [[len(plan["kept"].get(f"blocks.{b}.{s}", [])) if f"blocks.{b}.{s}" in plan["sizes"] else None
             for s in sites] for b in blocks]
    sizes = [[plan["sizes"].get(f"blocks.{b}.{s}") for s in sites] for b in blocks]
    return sites, blocks, kept, sizes


def plot_kept(plan: Dict[str, Any], path: str) -> None:
    """Heatmap of kept share (annotated kept/size) and grouped bars of kept counts."""
    plt = _pyplot()
    sites, blocks, kept, sizes = _kept_grid(plan)
    share = np.array([[k / s if (k is not None and s) else np.nan for k, s in zip(kr, sr)]
                      for kr, sr in zip(kept, sizes)])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, max(3.0, 0.35 * len(blocks) + 1.5)),
                                   gridspec_kw={"width_ratios": [1, 1.6]})
    im = ax1.imshow(share, aspect="auto", cmap="viridis", vmin=0, vmax=1)
    ax1.set_xticks(range(len(sites)), sites, rotation=30, ha="right")
    ax1.set_yticks(range(len(blocks)), [str(b) for b in blocks])
    ax1.set_ylabel("block")
    ax1.set_title("kept share per block and site")
    if len(blocks) <= 24:
        for i in range(len(blocks)):
            for j in range(len(sites)):
                if kept[i][j] is not None:
                    ax1.text(j, i, f"{kept[i][j]}/{sizes[i][j]}", ha="center", va="center",
                             fontsize=7, color="white" if share[i, j] < 0.6 else "black")
    fig.colorbar(im, ax=ax1, fraction=0.05)
    width = 0.8 / len(sites)
    x = np.arange(len(blocks))
    for j, site in enumerate(sites):
        counts = [k[j] if k[j] is not None else 0 for k in kept]
        ax2.bar(x + (j - (len(sites) - 1) / 2) * width, counts, width, label=site)
    ax2.set_xticks(x, [str(b) for b in blocks])
    ax2.set_xlabel("block")
    ax2.set_ylabel("kept dimensions")
    total_kept = sum(len(v) for v in plan["kept"].values())
    total = sum(plan["sizes"].values())
    ax2.set_title(f"kept dimensions: {total_kept} of {total} ({100 * (1 - total_kept / total):.1f} % pruned)")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_gate_hist(gates: Dict[str, List[float]], plan: Optional[Dict[str, Any]], path: str) -> None:
    """Histogram of |gate| per site on a log axis; the line marks the smallest kept value."""
    plt = _pyplot()
    values = {s: np.abs(np.concatenate([np.asarray(v, dtype=np.float64) for n, v in gates.items()
                                        if n.endswith("." + s)] or [np.zeros(0)])) for s in _sites_of(gates)}
    everything = np.concatenate(list(values.values()))
    positive = everything[everything > 0]
    floor = positive.min() / 2 if positive.size else 1e-8
    top = max(everything.max() if everything.size else 1.0, floor * 10)
    floor = min(floor, top / 1e3)  # at least three decades, so the scale reads at a glance
    bins = np.logspace(math.log10(floor), math.log10(top * 1.05), 60)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    data = [np.clip(values[s], floor, None) for s in values if values[s].size]
    labels = [s for s in values if values[s].size]
    ax.hist(data, bins=bins, stacked=True, label=labels)
    ax.set_xscale("log")
    ax.set_xlabel("|gate| at pruning time (zeros drawn at the left edge)")
    ax.set_ylabel("dimensions")
    if plan:
        kept_values = [abs(gates[n][i]) for n, idx in plan["kept"].items() if n in gates for i in idx]
        if kept_values and plan.get("rule", {}).get("scope", "global") == "global":
            threshold = max(min(kept_values), floor)
            ax.axvline(threshold, color="k", linestyle="--", linewidth=1,
                       label=f"smallest kept |gate| = {threshold:.3g}")
    ax.set_title(f"gate values of {len(gates)} gates ({everything.size} dimensions)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _task_loss(row: Dict[str, Any], key: str) -> Optional[float]:
    """The task loss of a metrics row: what the validation loss compares to (the training
    loss of sparse training also holds lambda * sum|gate|)."""
    return row.get("task_loss" if key == "loss" else "train_task_loss", row.get(key))


def plot_curves(metrics: Dict[str, List[Dict[str, Any]]], path: str) -> None:
    """Task loss and top-1 per epoch; each stage's epochs continue after the previous one's."""
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    offset = 0
    colors = {"train": "tab:green", "sparse-train": "tab:blue", "finetune": "tab:orange"}
    for stage in STAGES:
        epochs = [r for r in metrics.get(stage, []) if r.get("kind") == "epoch"]
        steps = [r for r in metrics.get(stage, []) if r.get("kind") == "train"]
        if not epochs and not steps:
            continue
        color = colors[stage]
        spe = None
        if epochs and epochs[0].get("step"):
            spe = epochs[0]["step"] / (epochs[0]["epoch"] + 1)
        if steps and spe:
            ax1.plot([offset + r["step"] / spe for r in steps], [_task_loss(r, "loss") for r in steps],
                     color=color, alpha=0.3, linewidth=1)
        x = [offset + r["epoch"] + 1 for r in epochs]
        if epochs:
            ax1.plot(x, [_task_loss(r, "train_loss") for r in epochs], "o-", color=color,
                     label=f"{stage} train")
            if any("val_loss" in r for r in epochs):
                ax1.plot(x, [r.get("val_loss") for r in epochs], "s--", color=color,
                         label=f"{stage} val")
            if any("val_acc1" in r for r in epochs):
                ax2.plot(x, [r.get("val_acc1") for r in epochs], "o-", color=color,
                         label=f"{stage} top-1")
            if offset:
                for ax in (ax1, ax2):
                    ax.axvline(offset + 0.5, color="grey", linestyle=":", linewidth=1)
            offset = x[-1]
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("cross-entropy")
    ax1.set_title("task loss (without the gate penalty)")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("top-1 %")
    ax2.set_title("validation accuracy")
    for ax in (ax1, ax2):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(run: str, out_dir: str) -> str:
    """Writes report.md and the PNGs into `out_dir`; returns the text to print."""
    info = collect(run)
    os.makedirs(out_dir, exist_ok=True)
    lines = [f"# VTP report: {os.path.abspath(run)}", ""]
    rows = table_rows(info)
    lines.append(results_table(rows) if rows else "(no evaluation results yet)")
    speed = (info["pruned"] or {}).get("speed")
    if speed:
        d, p = speed["models"]["dense"], speed["models"]["pruned"]
        lines.append(f"\nimages/s: inference, batch {speed['batch_size']} on {speed['device']}"
                     f"{' with autocast' if speed.get('amp') else ''}; dense and pruned timed in "
                     f"turns in one process, medians of {speed['repeats']} batches each "
                     f"(interquartile range: dense {d['q1']:.1f}-{d['q3']:.1f}, pruned "
                     f"{p['q1']:.1f}-{p['q3']:.1f}).")
    elif info["dense"] and info["dense"].get("images_per_s"):
        d = info["dense"]
        lines.append(f"\nimages/s: inference, batch {d.get('bench_batch_size')} on {d.get('device')}"
                     f"{' with autocast' if d.get('amp') else ''}.")
    if info["prune"]:
        p = info["prune"]
        lines.append(f"\npruning: {p['kept']} of {p['total']} gated dimensions kept "
                     f"({100 * p['pruned_ratio']:.1f} % pruned, scope {p['scope']}, "
                     f"{'folded gates' if p.get('fold') else 'gates reset to 1'}).")
    pictures = []
    if info["plan"]:
        plot_kept(info["plan"], os.path.join(out_dir, "kept_dims.png"))
        pictures.append(("kept dimensions per block and site", "kept_dims.png"))
    if info["gates"]:
        plot_gate_hist(info["gates"], info["plan"], os.path.join(out_dir, "gate_hist.png"))
        pictures.append(("gate values at pruning time", "gate_hist.png"))
    if info["metrics"]:
        plot_curves(info["metrics"], os.path.join(out_dir, "curves.png"))
        pictures.append(("training curves", "curves.png"))
    lines.append("")
    lines += [f"![{title}]({name})" for title, name in pictures]
    text = "\n".join(lines) + "\n"
    write_text(os.path.join(out_dir, "report.md"), text)
    files = ", ".join(name for _, name in pictures)
    return text.split("\n![")[0].rstrip() + (f"\n\nwrote {out_dir}/report.md" + (f", {files}" if files else ""))
