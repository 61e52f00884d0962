"""``vtp.plan(model, latency_target=...)``: keep the dims that matter most while the pruned
model's latency, predicted by the device's latency table (``vtp.latency_table``), is at most
``latency_target`` x the dense model's.

The planner walks down from the dense widths. A step narrows one site of one block (the
input width of qkv or fc1, the hidden width, one head's value width, the block's query/key
width) to a width of the table's grid below the current one; its price is the gate score
of the dims it removes over the ms it saves (NViT's importance per unit of latency). The
cheapest step goes (what it saves beyond what is still missing counts for nothing), until
the prediction fits; then steps are taken back, best score per
ms first, while it still fits (the last step may have overshot). Widths come only from the
table's aligned grid (multiples of its step, 0, the full width) and a step only counts where
the table says time drops, so each width lands where the device runs faster, not on one
global ``round_to``. Everything is pure Python over the table's cached curves.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from .architectures import parse_gate_name
from ._latency import block_shapes, cache_path, latency_table, model_widths
from ._latency_measure import PlanTimer, table_device
from ._profile import default_img_size, size_pair
from ._prune import DEFAULT_V_LAYOUT, prune, structure_copy
from .latency_model import BlockWidths, LatencyTable, values_run
from .pruning_plan import PruningPlan

__all__ = ["fit_latency", "REFINE_TOLERANCE", "REFINE_CLAMP", "DEFAULT_REFINE", "DEFAULT_REFINE_REPEATS"]

_PER_HEAD = ("attn_out", "attn_qk")
# the curve whose aligned grid gives a site's widths
_GRID = {"attn_in": "qkv_in", "mlp_in": "fc1_in", "mlp_hidden": "fc1_out", "attn_out": "attn_diag",
         "attn_qk": "attn_diag"}


def _order(scores: torch.Tensor) -> Tuple[List[int], List[float]]:
    """Indices by descending score (ties: the lower index first) and the prefix sums of the
    sorted scores: the score kept by the first k is ``prefix[k]``."""
    order = torch.sort(-scores, stable=True).indices.tolist()
    prefix = [0.0]
    for i in order:
        prefix.append(prefix[-1] + float(scores[i]))
    return order, prefix


class _Site:
    """One gate's scores, ranked (per head for ``attn_out`` / ``attn_qk``)."""

    def __init__(self, name: str, scores: torch.Tensor, head_dim: int):
        self.name = name
        self.block, branch, self.site = parse_gate_name(name)
        if branch is not None:
            raise TypeError(f"model: latency targets cover timm's pre-norm Block, not the parallel branch of {name}")
        self.size = scores.numel()
        self.per_head = self.site in _PER_HEAD
        if self.per_head:
            self.heads = [_order(scores[h * head_dim:(h + 1) * head_dim]) for h in range(self.size // head_dim)]
        else:
            self.ranked = _order(scores)

    def kept(self, width, head_dim: int) -> List[int]:
        if not self.per_head:
            return sorted(self.ranked[0][:width])
        return sorted(h * head_dim + i for h, (order, _) in enumerate(self.heads) for i in order[:width[h]])


class _Planner:
    def __init__(self, table: LatencyTable, sites: Dict[str, _Site], n_blocks: int, head_dim: int, heads: int,
                 embed: int, hidden: int, min_keep: int):
        self.table, self.sites, self.head_dim = table, sites, head_dim
        self.tables = [table.shapes[b] for b in table.blocks]
        self.min_keep = min_keep
        self.by_block: List[Dict[str, _Site]] = [{} for _ in range(n_blocks)]
        for s in sites.values():
            self.by_block[s.block][s.site] = s
        # the state: per block, each site's width (per head for attn_out; one for all heads for attn_qk)
        self.state = [{"attn_in": embed, "mlp_in": embed, "mlp_hidden": hidden, "attn_out": [head_dim] * heads,
                       "attn_qk": head_dim} for _ in range(n_blocks)]

    # -- structure ----------------------------------------------------------------------
    def widths(self, b: int, state: Optional[dict] = None) -> BlockWidths:
        """What block ``b`` executes at ``state``: as ``vtp.model_widths`` reads it from the
        model ``vtp.prune`` makes (padded V: a live head runs its values at the block's
        attention width, the wider of its query/key width and its widest head's values)."""
        s = state or self.state[b]
        live = [v for v in s["attn_out"] if v > 0]
        mlp = (s["mlp_in"], s["mlp_hidden"]) if s["mlp_in"] > 0 and s["mlp_hidden"] > 0 else (0, 0)
        if s["attn_in"] == 0 or not live:
            return BlockWidths(0, (), (), (), *mlp)
        return BlockWidths(s["attn_in"], (s["attn_qk"],) * len(live),
                           values_run(DEFAULT_V_LAYOUT, s["attn_qk"], tuple(live)), tuple(live), *mlp)

    def predict(self) -> float:
        return self.table.predict([self.widths(b) for b in range(len(self.state))], check=False)

    # -- steps --------------------------------------------------------------------------
    def _grid(self, b: int, site: str, full: int) -> List[int]:
        grid = [w for w in self.tables[b].curves[_GRID[site]].grid if w % self.tables[b].curves[_GRID[site]].align == 0]
        return sorted(set(grid) | {0, full})

    def steps(self, b: int, down: bool) -> List[Tuple[float, float, str, Optional[int], int]]:
        """Every step of block ``b``: (score changed, ms changed, site, head, new width); down:
        to any narrower grid width where time drops; up: to the next wider one."""
        t, state, out = self.tables[b], self.state[b], []
        now = t.block_ms(self.widths(b))
        for name, site in self.by_block[b].items():
            heads = range(len(state["attn_out"])) if name == "attn_out" else [None]
            for h in heads:
                cur = state[name][h] if h is not None else state[name]
                full = self.head_dim if site.per_head else site.size
                grid = self._grid(b, name, full)
                if name == "attn_qk":  # a head keeps at least one grid width of queries and keys
                    grid = [w for w in grid if w > 0]
                floor = min(self.min_keep, site.size)
                if name == "attn_out":
                    others = sum(state["attn_out"]) - cur
                    grid = [w for w in grid if w + others >= floor]
                else:
                    grid = [w for w in grid if w >= floor]
                targets = [w for w in grid if w < cur][::-1] if down else [w for w in grid if w > cur][:1]
                for w in targets:
                    trial = dict(state)
                    if h is not None:
                        trial[name] = list(state[name])
                        trial[name][h] = w
                    else:
                        trial[name] = w
                    change = (now - t.block_ms(self.widths(b, trial))) * self.table.slope
                    lo, hi = min(cur, w), max(cur, w)
                    if name == "attn_qk":  # one width for all heads: every head's dims between
                        score = sum(prefix[hi] - prefix[lo] for _, prefix in site.heads)
                    else:
                        prefix = site.heads[h][1] if h is not None else site.ranked[1]
                        score = prefix[hi] - prefix[lo]
                    if down and change > 0:  # saved
                        out.append((score, change, name, h, w))
                    elif not down:  # added (a step back may cost nothing)
                        out.append((score, max(-change, 0.0), name, h, w))
        return out

    def apply(self, b: int, name: str, h: Optional[int], w: int) -> None:
        if h is not None:
            self.state[b][name] = list(self.state[b][name])
            self.state[b][name][h] = w
        else:
            self.state[b][name] = w

    def fit(self, budget: float) -> float:
        """Remove the cheapest steps until the prediction fits ``budget``, then take back the
        best steps that still fit. Returns the prediction."""
        n = len(self.state)
        cache = {b: self.steps(b, True) for b in range(n)}
        pred = self.predict()
        while pred > budget:
            best, need = None, pred - budget
            for b, steps in cache.items():
                for score, ms, name, h, w in steps:
                    # what a step saves beyond the need buys nothing: a big step near the end
                    # pays its whole score for the little still missing
                    key = score / min(ms, need)
                    if best is None or key < best[0]:
                        best = (key, b, name, h, w)
            if best is None:
                return pred
            _, b, name, h, w = best
            self.apply(b, name, h, w)
            cache[b] = self.steps(b, True)
            pred = self.predict()
        # take back: the step up with the most score per ms added that still fits
        while True:
            best = None
            for b in range(n):
                for score, ms, name, h, w in self.steps(b, False):
                    value = score / ms if ms > 0 else float("inf")
                    if pred + ms <= budget and (best is None or value > best[0]):
                        best = (value, b, name, h, w)
            if best is None:
                return pred
            _, b, name, h, w = best
            self.apply(b, name, h, w)
            pred = self.predict()

    def kept(self) -> Dict[str, List[int]]:
        return {name: site.kept(self.state[site.block][site.site] if site.site != "attn_qk"
                                else [self.state[site.block]["attn_qk"]] * len(site.heads), self.head_dim)
                for name, site in self.sites.items()}


def _table_for(model: nn.Module, table: Optional[LatencyTable], batch_size: int, device, dtype, threads,
               img_size) -> Tuple[LatencyTable, tuple]:
    if table is None:
        table = latency_table(model, batch_size, device=device, dtype=dtype, threads=threads, img_size=img_size)
        size = size_pair(img_size) if img_size is not None else default_img_size(model)
        return table, size
    if not isinstance(table, LatencyTable):
        raise ValueError(f"table: expected a vtp.LatencyTable (vtp.latency_table's), got {type(table).__name__}")
    given = [n for n, v in (("device", device), ("dtype", dtype), ("threads", threads)) if v is not None]
    if given:
        raise ValueError(f"{given[0]}: with table= the table says where and how it was measured; leave "
                         f"{', '.join(given)} out")
    if table.key.get("batch_size", batch_size) != batch_size:
        raise ValueError(f"batch_size: the table was measured at batch {table.key['batch_size']}, got {batch_size}")
    size = size_pair(img_size) if img_size is not None else \
        tuple(table.key["img_size"]) if "img_size" in table.key else default_img_size(model)
    if [s.name for s in block_shapes(model, size)] != table.blocks:
        raise ValueError("table: measured for another model structure (its block shapes differ from the model's)")
    return table, size


# A measured share within this of the target ends the refinement: the paired share of a
# few rounds still moves by about 1-2 % between measurements on a quiet CPU.
REFINE_TOLERANCE = 0.02
# One round scales the budget by target / measured within these bounds: the table misses
# uneven plans by a few % (up to ~10 % in benchmarks/results/latency_check*.json), so a
# larger factor says the measurement caught a slow or fast spell of the machine rather than
# the table's error, and following it whole would overshoot the other way.
REFINE_CLAMP = (0.8, 1.25)
# vtp.plan's defaults with latency_target: one round of measure-and-replan (the table's sum
# of parts misses uneven plans by a few %), each measurement 7 paired rounds
DEFAULT_REFINE = 1
DEFAULT_REFINE_REPEATS = 7


def _fit_budget(model: nn.Module, table: LatencyTable, sites: Dict[str, _Site], shapes, head_dim: int,
                min_keep: int, budget: float) -> Tuple[Dict[str, List[int]], float, nn.Module]:
    """The table's plan for ``budget`` ms: (kept, its prediction, the pruned model on the
    meta device). The prediction may exceed ``budget`` where it is out of reach."""
    s0 = shapes[0]
    planner = _Planner(table, sites, len(shapes), head_dim, s0.heads, s0.embed, s0.hidden, min_keep)
    planner.fit(budget)
    kept = planner.kept()
    # The prediction recorded is that of the model vtp.prune builds, read back from it (on the
    # meta device: structure only).
    sizes = {n: s.size for n, s in sites.items()}
    for _ in range(3):
        meta = prune(structure_copy(model), PruningPlan(kept=kept, sizes=dict(sizes), head_dim=head_dim),
                     layout=DEFAULT_V_LAYOUT)
        predicted = table.predict(model_widths(meta))
        if predicted <= budget:
            break
        # the model runs slower than the planner's widths said: ask the planner for that much more
        planner.fit(budget - (predicted - planner.predict()))
        kept = planner.kept()
    return kept, predicted, meta


def _choose(rounds: List[dict], target: float, tolerance: float) -> int:
    """The round whose measured share is closest to ``target`` among those at most
    ``target * (1 + tolerance)`` (a tie: the faster), else the fastest (all are too slow)."""
    fits = [i for i, r in enumerate(rounds) if r["measured_share"] <= target * (1 + tolerance)]
    if fits:
        return min(fits, key=lambda i: (abs(rounds[i]["measured_share"] - target), rounds[i]["measured_share"]))
    return min(range(len(rounds)), key=lambda i: rounds[i]["measured_share"])


def fit_latency(model: nn.Module, scores: Dict[str, torch.Tensor], head_dim: int, target: float, rule: dict, *,
                batch_size: int, device, dtype, threads, img_size, table: Optional[LatencyTable],
                refine: int = 0, refine_repeats: int = DEFAULT_REFINE_REPEATS) -> Dict[str, List[int]]:
    """The kept indices of every gate of ``model`` for ``vtp.plan(latency_target=target)``;
    ``rule`` gains the prediction and where the table comes from.

    ``refine`` > 0: the table's plan is then timed whole against the dense model on the
    table's device (``vtp._latency_measure``, ``refine_repeats`` paired rounds); while its
    measured share misses the target by more than ``REFINE_TOLERANCE``, the plan is made
    again for the budget scaled by target / measured (clamped to ``REFINE_CLAMP``) and
    measured again, at most ``refine`` times. The plan kept is ``_choose``'s."""
    table, size = _table_for(model, table, batch_size, device, dtype, threads, img_size)
    shapes = block_shapes(model, size)
    if len({(s.heads, s.head_dim, s.embed, s.hidden) for s in shapes}) != 1 or shapes[0].head_dim != head_dim:
        raise TypeError("model: latency targets cover models whose blocks share one shape")
    if refine > 0:  # the plan will be timed where the table was measured: that device must be here
        table_device(table, model, device)
    sites = {n: _Site(n, s, head_dim) for n, s in scores.items()}
    dense_ms = table.predict(table.dense_widths())
    budget = target * dense_ms
    kept, predicted, meta = _fit_budget(model, table, sites, shapes, head_dim, rule["min_keep"], budget)
    if predicted > budget * (1 + 1e-9):
        raise ValueError(f"latency_target: {target} is out of reach on this table; the narrowest plan (with "
                         f"min_keep={rule['min_keep']}) is predicted at {predicted / dense_ms:.3f} of the dense "
                         f"model's {dense_ms:.3f} ms")
    record = {}
    if refine > 0:
        timer = PlanTimer(model, table, size, device)
        sizes = {n: s.size for n, s in sites.items()}
        candidates, rounds, asked = [], [], float(target)
        while True:
            timed = timer(kept, sizes, head_dim, refine_repeats)
            share = timed["share"]
            candidates.append((kept, predicted, meta))
            rounds.append({"budget_share": asked, "predicted_share": predicted / dense_ms,
                           "measured_share": share["median"], "measured_iqr": [share["q1"], share["q3"]],
                           "samples_ms": timed["samples_ms"]})
            if len(rounds) > refine or abs(share["median"] / target - 1) <= REFINE_TOLERANCE:
                break
            factor = min(max(target / share["median"], REFINE_CLAMP[0]), REFINE_CLAMP[1])
            asked = min(1.0, asked * factor)  # no budget beyond the dense model's
            kept, predicted, meta = _fit_budget(model, table, sites, shapes, head_dim, rule["min_keep"],
                                                asked * dense_ms)
            if predicted > asked * dense_ms * (1 + 1e-9):  # the scaled budget is out of the table's reach
                rounds.append({"budget_share": asked, "predicted_share": predicted / dense_ms, "unreachable": True})
                break
        measured = [r for r in rounds if "measured_share" in r]
        best = _choose(measured, target, REFINE_TOLERANCE)
        kept, predicted, meta = candidates[best]
        record = {"measured_share": measured[best]["measured_share"], "measured_iqr": measured[best]["measured_iqr"],
                  "chosen_round": rounds.index(measured[best]), "rounds": rounds,
                  "refine_tolerance": REFINE_TOLERANCE, "refine_repeats": refine_repeats,
                  "measured_on": str(timer.device)}
    path = cache_path(table.key)
    rule.update(latency_target=float(target), latency={
        "predicted_ms": predicted, "dense_ms": dense_ms, "predicted_share": predicted / dense_ms,
        "batch_size": table.key.get("batch_size", batch_size), "device": table.key.get("device"),
        "device_type": table.key.get("device_type"), "dtype": table.key.get("dtype"),
        "threads": table.key.get("threads"), "img_size": list(size), "v_layout": DEFAULT_V_LAYOUT,
        "table_key": table.key, "table_file": str(path) if os.path.exists(path) else None,
        "block_ms": table.block_ms(model_widths(meta)), "refine": refine, **record})
    return kept
