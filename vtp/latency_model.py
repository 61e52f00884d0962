"""A device's latency table for a ViT's blocks, and what a model structure costs on it.

``vtp.latency_table`` measures one (``vtp/_latency.py``); this module holds what it measured
and answers questions about it in pure Python over cached lists (no torch op per call), so a
planner can ask thousands of times:

* ``BlockWidths`` / ``model_widths``: what a block executes (kept input columns, per-head
  query/key and value widths after padding, kept values, MLP widths);
* ``LatencyTable.predict(widths)``: the model's latency in ms, calibrated against the dense
  model timed whole; ``block_ms`` per block; ``marginal_saving`` what removing one rounding
  step of a site saves.

The table is measured once per distinct block shape (``BlockShape``; all DeiT blocks share
one), per sub-layer kind:

  linears   time along the input width (output at full width) and along the output width
            (input at full width), on a grid fine enough to show the hardware's steps;
            a coarse grid of both widths together bends the product of the two sweeps
            (``t(k, n) ~ t_in(k) t_out(n) / t_full * exp(bend (1 - k/K)(1 - n/N))``)
  attention SDPA by query/key width x value width at all heads (the fused path only runs
            where the two are equal: off the diagonal is the math path), scaled by heads
  norms     LayerNorm at full width (dense) and the gathering LayerNorm by kept columns
  rest      the activation over the hidden width, the two residual adds, the gather of the
            kept values after attention, layer scales
"""
from __future__ import annotations

import bisect
import math
import statistics
from dataclasses import asdict, dataclass, replace
from typing import Dict, List, Optional, Sequence, Tuple

__all__ = ["FORMAT", "BlockShape", "BlockWidths", "Curve", "Grid2", "ShapeTable", "LatencyTable",
           "LATENCY_SITES", "values_run"]

FORMAT = 2  # bump when what a table file holds changes: an older file is then re-measured
# (2: attention at unequal q/k and value widths timed padded to one width, as it runs)
LATENCY_SITES = ("attn_in", "attn_qk", "attn_out", "mlp_in", "mlp_hidden")


def _positive_int(value, what: str, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{what}: expected an integer >= {low}, got {value!r}")
    return value


@dataclass(frozen=True)
class BlockShape:
    """The dense shape of a block, which its table is measured for."""
    embed: int
    heads: int
    head_dim: int
    hidden: int
    tokens: int
    act: str = "GELU()"
    layer_scale: bool = False

    @property
    def name(self) -> str:
        ls = "-ls" if self.layer_scale else ""
        return f"e{self.embed}-h{self.heads}x{self.head_dim}-m{self.hidden}-n{self.tokens}-{self.act}{ls}"

    @classmethod
    def from_dict(cls, d: dict) -> "BlockShape":
        shape = cls(**d)
        for f in ("embed", "heads", "head_dim", "hidden", "tokens"):
            _positive_int(getattr(shape, f), f"shape.{f}")
        if not isinstance(shape.act, str) or not isinstance(shape.layer_scale, bool):
            raise ValueError("shape: act must be a string and layer_scale a bool")
        return shape


@dataclass(frozen=True)
class BlockWidths:
    """What one block executes. ``attn_in`` 0 or no heads: a constant attention branch;
    ``mlp_in`` or ``mlp_hidden`` 0: a constant MLP branch.

    ``qk_widths`` / ``v_widths``: per kept head, the query/key and value widths attention
    runs at (after padding); ``v_kept``: per kept head, the values the output projection
    reads (its input width is their sum); ``v_layout`` "padded": qkv computes ``v_widths``
    rows per head, "packed": ``v_kept``."""
    attn_in: int
    qk_widths: Tuple[int, ...]
    v_widths: Tuple[int, ...]
    v_kept: Tuple[int, ...]
    mlp_in: int
    mlp_hidden: int
    v_layout: str = "padded"

    @property
    def heads(self) -> int:
        return len(self.qk_widths)

    @property
    def qkv_out(self) -> int:
        return 2 * sum(self.qk_widths) + sum(self.v_widths if self.v_layout == "padded" else self.v_kept)

    @property
    def proj_in(self) -> int:
        return sum(self.v_kept)

    @property
    def attention_live(self) -> bool:
        return self.attn_in > 0 and self.heads > 0 and self.proj_in > 0

    @property
    def mlp_live(self) -> bool:
        return self.mlp_in > 0 and self.mlp_hidden > 0

    @classmethod
    def dense(cls, shape: BlockShape) -> "BlockWidths":
        d = (shape.head_dim,) * shape.heads
        return cls(shape.embed, d, d, d, shape.embed, shape.hidden)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "BlockWidths":
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    def check(self, shape: BlockShape, where: str) -> None:
        heads = len(self.qk_widths)
        if len(self.v_widths) != heads or len(self.v_kept) != heads:
            raise ValueError(f"{where}: expected as many v_widths and v_kept as qk_widths ({heads})")
        if heads > shape.heads:
            raise ValueError(f"{where}: {heads} heads, the dense block has {shape.heads}")
        if not 0 <= self.attn_in <= shape.embed or not 0 <= self.mlp_in <= shape.embed:
            raise ValueError(f"{where}: attn_in and mlp_in must lie in [0, {shape.embed}]")
        if not 0 <= self.mlp_hidden <= shape.hidden:
            raise ValueError(f"{where}: mlp_hidden must lie in [0, {shape.hidden}]")
        if any(not 0 <= w <= shape.head_dim for w in self.qk_widths + self.v_widths) or \
                any(k < 0 or k > v for k, v in zip(self.v_kept, self.v_widths)):
            raise ValueError(f"{where}: per-head widths must lie in [0, {shape.head_dim}], kept <= executed")


def _median3(values: List[float]) -> List[float]:
    """Each value replaced by the median of it and its neighbours: one sample that a busy
    machine slowed down does not survive."""
    if len(values) < 3:
        return list(values)
    return [values[0]] + [sorted(values[i - 1: i + 2])[1] for i in range(1, len(values) - 1)] + [values[-1]]


def _non_decreasing(values: List[float]) -> List[float]:
    """The closest non-decreasing sequence (least squares; pool adjacent violators)."""
    blocks: List[List[float]] = []  # [mean, count]
    for v in values:
        blocks.append([v, 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            (m2, c2), (m1, c1) = blocks[-2], blocks.pop()
            blocks[-1] = [(m2 * c2 + m1 * c1) / (c2 + c1), c2 + c1]
    return [m for m, c in blocks for _ in range(int(c))]


class Curve:
    """Time (ms) against one width, measured at ``widths`` (ascending).

    The widths that are multiples of ``align`` (and the first and last) carry the curve:
    their times, freed of isolated spikes (median of three neighbours) and made
    non-decreasing (more aligned columns never cost less), linear between them. A width
    that is not a multiple of ``align`` runs as the next multiple up times the curve's
    ragged-width penalty: the median, over the other measured widths, of their time over
    that of the next multiple up (a GEMM pays for its ragged tail; the hardware's time
    drops only at the multiples)."""

    def __init__(self, widths: Sequence[int], ms: Sequence[float], align: int = 8):
        self.widths = [int(w) for w in widths]
        self.ms = [float(t) for t in ms]
        self.align = int(align)
        if not self.widths or len(self.widths) != len(self.ms) or self.align < 1:
            raise ValueError("curve: expected as many times as widths, at least one, and align >= 1")
        if any(b <= a for a, b in zip(self.widths, self.widths[1:])) or self.widths[0] < 1:
            raise ValueError("curve: widths must be positive and strictly ascending")
        if not all(math.isfinite(t) and t > 0 for t in self.ms):
            raise ValueError("curve: times must be finite and positive")
        full = self.widths[-1]
        fit = [(w, t) for w, t in zip(self.widths, self.ms) if w % self.align == 0 or w in (self.widths[0], full)]
        self.grid = [w for w, _ in fit]
        self._carrying = set(self.grid)
        self.fitted = _non_decreasing(_median3([t for _, t in fit]))
        ragged = [t / self._base(self._up(w)) for w, t in zip(self.widths, self.ms) if w not in self._carrying]
        self.penalty = statistics.median(ragged) if ragged else 1.0
        # the staircase: the fitted time of the next carrying width at or above
        self.floor = list(self.fitted)

    def _up(self, width: float) -> int:
        return min(self.widths[-1], -(-int(math.ceil(width)) // self.align) * self.align)

    def _base(self, width: float) -> float:
        g = self.grid
        i = bisect.bisect_left(g, width)
        if i < len(g) and g[i] == width or i == 0:
            return self.fitted[min(i, len(g) - 1)]
        a, b = g[i - 1], g[i]
        return self.fitted[i - 1] + (self.fitted[i] - self.fitted[i - 1]) * (width - a) / (b - a)

    def at(self, width: float) -> float:
        if width > self.widths[-1]:
            raise ValueError(f"width: {width} is beyond the table's {self.widths[-1]}")
        if width % self.align == 0 or width in self._carrying:
            return self._base(width)
        return self._base(self._up(width)) * self.penalty

    def staircase(self, width: float) -> float:
        """The least time at which ``width`` columns can run: the fitted time of the next
        carrying width at or above it; never rises as the width falls."""
        return self.floor[min(bisect.bisect_left(self.grid, width), len(self.grid) - 1)]

    def to_dict(self) -> dict:
        return {"widths": self.widths, "ms": self.ms, "align": self.align}

    @classmethod
    def from_dict(cls, d: dict) -> "Curve":
        return cls(d["widths"], d["ms"], d["align"])


class Grid2:
    """Values on a grid of two widths, bilinear between grid points, clamped outside."""

    def __init__(self, xs: Sequence[int], ys: Sequence[int], values: Sequence[Sequence[float]]):
        self.xs, self.ys = [int(x) for x in xs], [int(y) for y in ys]
        self.values = [[float(v) for v in row] for row in values]
        if len(self.values) != len(self.xs) or any(len(r) != len(self.ys) for r in self.values) or not self.xs \
                or not self.ys:
            raise ValueError("grid: expected a value for every pair of grid widths")
        for axis in (self.xs, self.ys):
            if any(b <= a for a, b in zip(axis, axis[1:])):
                raise ValueError("grid: widths must be strictly ascending")
        if not all(math.isfinite(v) and v > 0 for r in self.values for v in r):
            raise ValueError("grid: values must be finite and positive")

    @staticmethod
    def _bracket(axis: List[int], x: float) -> Tuple[int, int, float]:
        if x <= axis[0]:
            return 0, 0, 0.0
        if x >= axis[-1]:
            return len(axis) - 1, len(axis) - 1, 0.0
        j = bisect.bisect_left(axis, x)
        if axis[j] == x:
            return j, j, 0.0
        return j - 1, j, (x - axis[j - 1]) / (axis[j] - axis[j - 1])

    def at(self, x: float, y: float) -> float:
        i0, i1, fx = self._bracket(self.xs, x)
        j0, j1, fy = self._bracket(self.ys, y)
        v = self.values
        low = v[i0][j0] + (v[i1][j0] - v[i0][j0]) * fx
        high = v[i0][j1] + (v[i1][j1] - v[i0][j1]) * fx
        return low + (high - low) * fy

    def to_dict(self) -> dict:
        return {"xs": self.xs, "ys": self.ys, "values": self.values}

    @classmethod
    def from_dict(cls, d: dict) -> "Grid2":
        return cls(d["xs"], d["ys"], d["values"])


# What a ShapeTable holds: curves by name, 2-D grids by name, single times by name.
CURVES = ("qkv_in", "qkv_out", "proj_in", "fc1_in", "fc1_out", "fc2_in", "attn_heads", "attn_diag",
          "v_gather", "norm_gather", "act")
GRIDS = ("qkv_2d", "fc1_2d", "attn")
SCALARS = ("norm", "add", "scale")


class ShapeTable:
    """The measured times of one block shape, and the cost of a ``BlockWidths`` of it."""

    def __init__(self, shape: BlockShape, curves: Dict[str, Curve], grids: Dict[str, Grid2],
                 scalars: Dict[str, float]):
        missing = [n for n in CURVES if n not in curves] + [n for n in GRIDS if n not in grids] + \
            [n for n in SCALARS if n not in scalars]
        if missing:
            raise ValueError(f"table: shape {shape.name} lacks {missing}")
        if not all(math.isfinite(float(v)) and float(v) >= 0 for v in scalars.values()):
            raise ValueError("table: times must be finite and non-negative")
        self.shape, self.curves, self.grids = shape, curves, grids
        self.scalars = {k: float(v) for k, v in scalars.items()}
        c = curves
        self._full = {"qkv": (shape.embed, 3 * shape.embed, c["qkv_in"].at(shape.embed)),
                      "fc1": (shape.embed, shape.hidden, c["fc1_in"].at(shape.embed))}
        self._heads_full = c["attn_heads"].at(shape.heads)
        # How far the product of the two sweeps misses inside: t(k, n) measured on a coarse grid
        # against t_in(k) t_out(n) / t_full, as exp(bend * (1 - k/K) (1 - n/N)), which is 1 on
        # the sweeps; the median over the grid, so that one disturbed sample cannot bend it.
        self.bend = {}
        for kind, (K, N, full) in self._full.items():
            g = grids[f"{kind}_2d"]
            logs = [math.log(g.values[i][j] / (c[f"{kind}_in"].at(k) * c[f"{kind}_out"].at(n) / full))
                    / ((1 - k / K) * (1 - n / N)) for i, k in enumerate(g.xs) for j, n in enumerate(g.ys)
                    if k < K and n < N]
            self.bend[kind] = statistics.median(logs) if logs else 0.0
        self._cache: Dict[BlockWidths, float] = {}

    def linear(self, kind: str, k: int, n: Optional[int] = None) -> float:
        """A linear of this block by input width ``k`` (and output width ``n`` for qkv, fc1)."""
        if k <= 0 or (n is not None and n <= 0):
            return 0.0
        t_in = self.curves[f"{kind}_in"].at(k)
        if n is None:
            return t_in
        K, N, full = self._full[kind]
        return t_in * self.curves[f"{kind}_out"].at(n) / full * math.exp(self.bend[kind] * (1 - k / K) * (1 - n / N))

    def attention(self, heads: int, qk: int, v: int) -> float:
        if heads <= 0 or qk <= 0 or v <= 0:
            return 0.0
        per_width = self.curves["attn_diag"].at(qk) if qk == v else self.grids["attn"].at(qk, v)
        return per_width * self.curves["attn_heads"].at(heads) / self._heads_full

    def block_ms(self, b: BlockWidths) -> float:
        """The block's time as the sum of its parts (before calibration)."""
        cached = self._cache.get(b)
        if cached is not None:
            return cached
        s, sc, c = self.shape, self.scalars, self.curves
        t = 2 * sc["add"] + (2 * sc["scale"] if s.layer_scale else 0.0)
        if b.attention_live:
            t += sc["norm"] if b.attn_in == s.embed else c["norm_gather"].at(b.attn_in)
            t += self.linear("qkv", b.attn_in, b.qkv_out)
            t += self.attention(b.heads, max(b.qk_widths), max(b.v_widths))
            if b.v_kept != b.v_widths:
                t += c["v_gather"].at(b.proj_in)
            t += self.linear("proj", b.proj_in)
        if b.mlp_live:
            t += sc["norm"] if b.mlp_in == s.embed else c["norm_gather"].at(b.mlp_in)
            t += self.linear("fc1", b.mlp_in, b.mlp_hidden) + c["act"].at(b.mlp_hidden)
            t += self.linear("fc2", b.mlp_hidden)
        if len(self._cache) < 100_000:
            self._cache[b] = t
        return t

    def to_dict(self) -> dict:
        return {"shape": asdict(self.shape), "curves": {k: v.to_dict() for k, v in self.curves.items()},
                "grids": {k: v.to_dict() for k, v in self.grids.items()}, "scalars": self.scalars}

    @classmethod
    def from_dict(cls, d: dict) -> "ShapeTable":
        return cls(BlockShape.from_dict(d["shape"]), {k: Curve.from_dict(v) for k, v in d["curves"].items()},
                   {k: Grid2.from_dict(v) for k, v in d["grids"].items()}, dict(d["scalars"]))


class LatencyTable:
    """A device's latency table for one model structure (its dense block shapes and fixed
    parts): ``predict`` a structure's latency in ms.

    ``key``: where and how it was measured (device, torch, dtype, batch, threads, shapes),
    which names its cache file; ``blocks``: the shape name of each block; ``fixed_ms``: the
    model without its blocks (patch embedding, final norm, head). ``calibration``: models
    timed whole, the dense one first, each as ``{"widths": [...], "ms": median, "samples":
    [...]}``. The sum of the parts (``raw_ms``) misses what the whole adds (module calls,
    reshapes, caches); ``predict`` is ``offset + slope * raw_ms``, a line through the dense
    model's point (so the dense structure predicts its measured time exactly) whose slope is
    the least-squares fit to the other calibration models."""

    def __init__(self, key: dict, shapes: Dict[str, ShapeTable], blocks: Sequence[str], fixed_ms: float,
                 calibration: Sequence[dict], measured: Optional[dict] = None):
        self.key = dict(key)
        self.shapes = dict(shapes)
        self.blocks = [str(b) for b in blocks]
        unknown = sorted(set(self.blocks) - set(self.shapes))
        if unknown or not self.blocks:
            raise ValueError(f"table: blocks name shapes the table lacks: {unknown}" if unknown
                             else "table: no blocks")
        for name, t in self.shapes.items():
            if t.shape.name != name:
                raise ValueError(f"table: shape {name!r} holds the table of {t.shape.name!r}")
        self.fixed_ms = float(fixed_ms)
        if not (math.isfinite(self.fixed_ms) and self.fixed_ms >= 0):
            raise ValueError("table: fixed_ms must be finite and non-negative")
        self.measured = dict(measured or {})
        self._tables = [self.shapes[b] for b in self.blocks]
        self.calibration = [{"widths": [w.to_dict() for w in self._widths(c["widths"])], "ms": float(c["ms"]),
                             "samples": [float(v) for v in c.get("samples", [])]} for c in calibration]
        if not self.calibration or not all(math.isfinite(c["ms"]) and c["ms"] > 0 for c in self.calibration):
            raise ValueError("table: expected the dense model's time (and others) as positive calibration times")
        if self.calibration[0]["widths"] != [w.to_dict() for w in self.dense_widths()]:
            raise ValueError("table: the first calibration model must be the dense one")
        self.offset, self.slope = 0.0, 1.0
        points = [(self.raw_ms(self._widths(c["widths"])), c["ms"]) for c in self.calibration]
        (s0, m0), rest = points[0], points[1:]
        den = sum((s - s0) ** 2 for s, _ in rest)
        slope = sum((s - s0) * (m - m0) for s, m in rest) / den if den > 0 else 0.0
        if not slope > 0:  # no other model, or noise swamped it: scale the sum to the dense time
            slope = m0 / s0
        self.offset, self.slope = m0 - slope * s0, slope

    def _widths(self, widths: Sequence) -> Tuple[BlockWidths, ...]:
        out = tuple(w if isinstance(w, BlockWidths) else BlockWidths.from_dict(w) for w in widths)
        self.check_widths(out)
        return out

    @property
    def dense_ms(self) -> float:
        """The dense model's measured time (median)."""
        return self.calibration[0]["ms"]

    # -- structure ------------------------------------------------------------------------
    def dense_widths(self) -> Tuple[BlockWidths, ...]:
        return tuple(BlockWidths.dense(t.shape) for t in self._tables)

    def check_widths(self, widths: Sequence[BlockWidths]) -> None:
        if len(widths) != len(self._tables):
            raise ValueError(f"widths: expected {len(self._tables)} blocks, got {len(widths)}")
        for i, (b, t) in enumerate(zip(widths, self._tables)):
            if not isinstance(b, BlockWidths):
                raise ValueError(f"widths[{i}]: expected a BlockWidths, got {type(b).__name__}")
            b.check(t.shape, f"widths[{i}]")

    # -- prediction -----------------------------------------------------------------------
    def raw_ms(self, widths: Sequence[BlockWidths]) -> float:
        """The sum of the parts (ms): fixed parts and every block's sub-layers, uncalibrated."""
        return self.fixed_ms + sum(t.block_ms(b) for t, b in zip(self._tables, widths))

    def block_ms(self, widths: Sequence[BlockWidths]) -> List[float]:
        """Each block's predicted time (ms): its parts times the calibration's slope."""
        return [self.slope * t.block_ms(b) for t, b in zip(self._tables, widths)]

    def predict(self, widths: Sequence[BlockWidths], check: bool = True) -> float:
        """Predicted latency (ms) of the model executing ``widths`` (one ``BlockWidths`` per
        block, as ``vtp.model_widths`` reads them from a model): ``offset + slope *
        raw_ms(widths)``. Pure Python over the cached curves: a planner may call it
        thousands of times (``check=False`` skips validating ``widths``)."""
        if check:
            self.check_widths(widths)
        return self.offset + self.slope * self.raw_ms(widths)

    def marginal_saving(self, widths: Sequence[BlockWidths], block: int, site: str) -> Tuple[int, float]:
        """Removing one rounding step of ``site`` in ``block``: the next narrower width at which
        the block's predicted time actually drops, and the ms it saves (calibrated);
        ``(width, 0.0)`` when no narrower width is faster. For ``attn_qk`` the width is the
        block's query/key width per head (one for all its heads, as attention runs them); for
        ``attn_out`` the block's total kept value width (the output projection's input),
        taken off the last heads first (a head left with none goes)."""
        if site not in LATENCY_SITES:
            raise ValueError(f"site: expected one of {', '.join(LATENCY_SITES)}, got {site!r}")
        if isinstance(block, bool) or not isinstance(block, int) or not 0 <= block < len(self._tables):
            raise ValueError(f"block: expected an index in [0, {len(self._tables)}), got {block!r}")
        t, b = self._tables[block], widths[block]
        current = {"attn_in": b.attn_in, "attn_qk": max(b.qk_widths, default=0), "attn_out": b.proj_in,
                   "mlp_in": b.mlp_in, "mlp_hidden": b.mlp_hidden}[site]
        curve = t.curves[{"attn_in": "qkv_in", "attn_qk": "attn_diag", "attn_out": "proj_in", "mlp_in": "fc1_in",
                          "mlp_hidden": "fc1_out"}[site]]
        now = t.block_ms(b)
        for w in [w for w in curve.grid if w < current][::-1] + [0]:  # aligned widths only
            saved = now - t.block_ms(_with_width(b, site, w))
            if saved > 0:
                return w, self.slope * saved
        return current, 0.0

    # -- files ----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"format": FORMAT, "key": self.key, "blocks": self.blocks, "fixed_ms": self.fixed_ms,
                "calibration": self.calibration, "shapes": {k: v.to_dict() for k, v in self.shapes.items()},
                "measured": self.measured}

    @classmethod
    def from_dict(cls, d: dict) -> "LatencyTable":
        """A table from ``to_dict``'s output; a ``ValueError`` for any other format version or
        anything missing, of the wrong type or out of range."""
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise ValueError(f"table: expected format {FORMAT}, got {d.get('format') if isinstance(d, dict) else d!r}")
        try:
            shapes = {str(k): ShapeTable.from_dict(v) for k, v in d["shapes"].items()}
            return cls(d["key"], shapes, d["blocks"], d["fixed_ms"], d["calibration"], d.get("measured"))
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"table: malformed ({type(e).__name__}: {e})") from None


def _with_width(b: BlockWidths, site: str, width: int) -> BlockWidths:
    if site == "attn_in":
        return replace(b, attn_in=width)
    if site == "mlp_in":
        return replace(b, mlp_in=width)
    if site == "mlp_hidden":
        return replace(b, mlp_hidden=width)
    if site == "attn_qk":  # no query/key width left: the attention branch is a constant
        if not width:
            return BlockWidths(0, (), (), (), b.mlp_in, b.mlp_hidden)
        return replace(b, qk_widths=(width,) * b.heads, v_widths=values_run(b.v_layout, width, b.v_kept))
    kept, drop = list(b.v_kept), b.proj_in - width  # attn_out: off the last heads first
    for h in range(len(kept) - 1, -1, -1):
        take = min(kept[h], drop)
        kept[h] -= take
        drop -= take
    live = [h for h, k in enumerate(kept) if k > 0]  # a head left with no value goes, Q and K with it
    kept = tuple(kept[h] for h in live)
    qk = max(b.qk_widths, default=0)
    return replace(b, qk_widths=tuple(b.qk_widths[h] for h in live), v_widths=values_run(b.v_layout, qk, kept),
                   v_kept=kept)


def values_run(layout: str, qk: int, kept: Tuple[int, ...]) -> Tuple[int, ...]:
    """Each head's value width in attention as ``vtp.prune`` lays it out: a padded V at the
    block's attention width (the wider of the query/key width and the widest kept values),
    a packed one padded to its widest head inside attention."""
    run = max(kept, default=0) if layout == "packed" else max(qk, max(kept, default=0))
    return (run,) * len(kept)
