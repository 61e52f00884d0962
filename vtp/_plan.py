"""``vtp.plan``: deciding which gated dimensions survive, from gate magnitudes.

One global threshold over every gate (the paper's rule), the same share in every gate, or
the fewest removals that fit a FLOPs budget; then per-gate rounding and minimum counts.
The MACs of a candidate are counted from its kept widths (vtp/_macs.py): exactly the profile
of the candidate model, without pruning it.
"""
from __future__ import annotations

import functools
import math
from typing import Dict, List, Optional

import torch
import torch.nn as nn

from .architectures import QK_SITE, branches, head_dim as model_head_dim, qk_layout
from ._gates import check_supported, require_gates
from .pruning_plan import PruningPlan
from ._profile import profile
from ._macs import MacCounter
from ._prune import prune, structure_copy
from ._latency import check_device
from ._latency_plan import DEFAULT_REFINE, DEFAULT_REFINE_REPEATS, fit_latency

__all__ = ["plan", "check_plan_args", "plan_macs", "DEFAULT_ROUND_TO"]

# Kept counts in multiples of 8: on the CPU a GEMM whose output width is not one runs about
# 25 % slower, and the pruned models of the recorded CPU benchmark run 0.86-0.88 of their
# MAC ratio at 8 or 16 against 0.84 at 1 (benchmarks/results/pruned_cpu.json); 8 is also
# what GPU tensor cores take in 16-bit.
DEFAULT_ROUND_TO = 8


class _Ranking:
    """The scores sorted once, globally and per gate: a FLOPs search asks for many cuts of
    the same order. Ties go to the lower index (stable sorts)."""

    def __init__(self, scores: Dict[str, torch.Tensor], names: List[str]):
        self.names = names
        self.flat = torch.cat([scores[n] for n in names])
        self.owner = torch.cat([torch.full((scores[n].numel(),), i) for i, n in enumerate(names)])
        self.order = torch.sort(self.flat, stable=True).indices
        self.best = {n: torch.sort(-scores[n], stable=True).indices for n in names}
        self._units: Dict[tuple, List[torch.Tensor]] = {}

    def counts(self, n_remove: int):
        """Per-gate kept counts when the ``n_remove`` lowest scores of the whole model go,
        and the threshold (the highest score removed)."""
        removed = torch.bincount(self.owner[self.order[:n_remove]], minlength=len(self.names))
        counts = {n: self.best[n].numel() - int(removed[i]) for i, n in enumerate(self.names)}
        threshold = float(self.flat[self.order[n_remove - 1]]) if n_remove > 0 else None
        return counts, threshold

    def top(self, name: str, count: int) -> List[int]:
        """Indices of the gate's ``count`` highest scores, sorted."""
        return sorted(self.best[name][:max(count, 0)].tolist())

    def round_units(self, name: str, kept: List[int], unit: int, round_to: int) -> List[int]:
        """Round every non-zero count of kept dims per ``unit`` consecutive dims (a head) up
        to ``round_to``, adding the unit's best-scoring dims, never past ``unit``."""
        if round_to == 1:
            return kept
        if (name, unit) not in self._units:
            best = self.best[name]
            self._units[name, unit] = [best[best // unit == h] - h * unit for h in range(best.numel() // unit)]
        widths = [0] * len(self._units[name, unit])
        for i in kept:
            widths[i // unit] += 1
        out: List[int] = []
        for h, order in enumerate(self._units[name, unit]):
            width = _adjust(widths[h], unit, round_to, 0)
            out += [h * unit + i for i in sorted(order[:width].tolist())]
        return out


def _adjust(count: int, size: int, round_to: int, min_keep: int) -> int:
    count = max(count, min(min_keep, size))
    if count:
        count = min(size, math.ceil(count / round_to) * round_to)
    return count


def check_plan_args(ratio: Optional[float] = None, *, scope: str = "global",
                    flops_target: Optional[float] = None, round_to: int = DEFAULT_ROUND_TO,
                    min_keep: int = 0, latency_target: Optional[float] = None, batch_size: int = 8,
                    device=None, refine: Optional[int] = None, refine_repeats: Optional[int] = None) -> None:
    """The rule of ``plan``'s arguments, checked without a model: a ``ValueError`` whose
    message starts with the name of the argument at fault. ``plan`` calls it first; a
    command calls it before any work, so that a long job never fails at its pruning step
    (and a latency table is never measured for a plan that cannot be made)."""
    targets = [n for n, v in (("ratio", ratio), ("flops_target", flops_target), ("latency_target", latency_target))
               if v is not None]
    if len(targets) != 1:
        raise ValueError("plan: give exactly one of ratio=, flops_target= or latency_target="
                         + (f", got {' and '.join(targets)}" if targets else ""))
    if latency_target is not None:
        if isinstance(latency_target, bool) or not (isinstance(latency_target, (int, float))
                                                    and 0.0 < latency_target <= 1.0):
            raise ValueError(f"latency_target: expected a share of the dense model's predicted latency in "
                             f"(0, 1], got {latency_target!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: expected an integer >= 1 (the batch the latency is planned for), "
                             f"got {batch_size!r}")
        if scope != "global":
            raise ValueError("scope: latency_target ranks dims globally; use scope='global'")
        if device is not None:
            check_device(device)
        if refine is not None and (isinstance(refine, bool) or not isinstance(refine, int) or refine < 0):
            raise ValueError(f"refine: expected an integer >= 0 (rounds of measure-and-replan; 0: the table's "
                             f"plan alone), got {refine!r}")
        if refine_repeats is not None and (isinstance(refine_repeats, bool) or not isinstance(refine_repeats, int)
                                           or refine_repeats < 1):
            raise ValueError(f"refine_repeats: expected an integer >= 1 (timed rounds per measurement), "
                             f"got {refine_repeats!r}")
    else:
        given = [n for n, v in (("refine", refine), ("refine_repeats", refine_repeats)) if v is not None]
        if given:
            raise ValueError(f"{given[0]}: measures a latency plan; give it only with latency_target, not with "
                             f"{targets[0]}")
    if ratio is not None and not (isinstance(ratio, (int, float)) and 0.0 <= ratio < 1.0):
        raise ValueError(f"ratio: expected a share of dims to remove in [0, 1), got {ratio!r}")
    if flops_target is not None and not (isinstance(flops_target, (int, float)) and 0.0 < flops_target <= 1.0):
        raise ValueError(f"flops_target: expected a share of dense MACs to keep in (0, 1], got {flops_target!r}")
    if scope not in ("global", "layer"):
        raise ValueError(f"scope: expected 'global' or 'layer', got {scope!r}")
    if flops_target is not None and scope != "global":
        raise ValueError("scope: flops_target ranks dims globally; use scope='global'")
    if not isinstance(round_to, int) or round_to < 1:
        raise ValueError(f"round_to: expected an integer >= 1, got {round_to!r}")
    if not isinstance(min_keep, int) or min_keep < 0:
        raise ValueError(f"min_keep: expected an integer >= 0, got {min_keep!r}")


def plan(model: nn.Module, ratio: Optional[float] = None, *, scope: str = "global",
         flops_target: Optional[float] = None, round_to: int = DEFAULT_ROUND_TO, min_keep: int = 0,
         img_size=None, scores: Optional[Dict[str, torch.Tensor]] = None,
         latency_target: Optional[float] = None, batch_size: int = 8, device=None, dtype=None,
         threads: Optional[int] = None, table=None, refine: Optional[int] = None,
         refine_repeats: Optional[int] = None) -> PruningPlan:
    """Decide which gated dimensions to keep, from the gate magnitudes ``|a|``.

    Exactly one of:
      ratio         share of gated dims to remove, in [0, 1). With ``scope="global"`` (the
                    paper's rule) one threshold over all gates of the model; with
                    ``scope="layer"`` the same share is removed from every gate.
      flops_target  share of the dense model's MACs to keep, in (0, 1]: the best-scoring
                    dims (global order) are kept until the pruned model fits the budget.
      latency_target  share of the dense model's latency to keep, in (0, 1], as the latency
                    table of the device predicts it (``vtp.latency_table``: measured on the
                    model's device, or ``device=``, at ``batch_size`` images of ``img_size``, in
                    ``dtype`` with ``threads`` CPU threads; or the ``table=`` given). Dims go in
                    the order of their score per ms saved, each width on the table's grid
                    where time drops (``round_to`` is not used); ``plan.rule["latency"]``
                    records the predicted ms, its share of the dense model's, and the table.
                    A model family the table does not cover is a ``TypeError``.
      refine        (latency_target only; default 1) rounds of measure-and-replan: the
                    table's plan is timed whole against the dense model where the table was
                    measured (its device, dtype, threads, batch and image size; random
                    weights; interleaved rounds, the share paired per round); while the
                    measured share misses the target by more than 2 %, the plan is made again
                    for the budget scaled by target / measured (by at most 0.8-1.25x a round)
                    and timed again, at most ``refine`` times. The plan kept is the one
                    measured closest to the target among those at most 2 % above it (else the
                    fastest); ``plan.rule["latency"]`` adds ``measured_share``, its
                    ``measured_iqr`` and every round. Why: the table's sum of parts misses
                    uneven plans by a few % (mostly too optimistic). 0: the table's plan
                    alone, nothing timed. With ``table=`` and refine > 0 the table's device
                    must be on this machine (a ``ValueError`` naming ``table`` otherwise).
      refine_repeats  (latency_target only; default 7) paired timed rounds per measurement.
    Then per gate: at least ``min_keep`` dims are kept (default 0: a gate may vanish, which
    removes a head or turns a branch into a constant), and a non-zero kept count is rounded
    up to a multiple of ``round_to`` (default 8: widths GEMMs run fast with; 1: the paper's exact
    counts), never past the gate size.
    For ``attn_out`` the rounding applies to each head's value width, which is what the
    attention kernels and the output projection see; for ``attn_qk`` to each head's
    query/key width (in RoPE pairs where a value gates a pair: ``round_to`` dims).
    ``img_size`` sets the token count used for ``flops_target`` (default: the model's).
    ``scores`` replaces ``|a|`` by other importance scores, one 1-D tensor per gate name
    (e.g. weight magnitudes, for comparison with other pruning criteria); higher is kept.
    """
    found = require_gates(model)
    check_supported(model)
    check_plan_args(ratio, scope=scope, flops_target=flops_target, round_to=round_to,
                    min_keep=min_keep, latency_target=latency_target, batch_size=batch_size, device=device,
                    refine=refine, refine_repeats=refine_repeats)

    if any(g.is_meta for g in found.values()):
        raise ValueError("plan: the gates are on the meta device; a plan needs their values")
    names = list(found)
    if scores is None:
        scores = {n: found[n].detach().float().abs().flatten().cpu() for n in names}
        what = "gates"
    else:
        scores = _check_scores(scores, found)
        what = "scores"
    bad = [n for n in names if not torch.isfinite(scores[n]).all()]
    if bad:
        raise ValueError(f"plan: {what} {bad[:4]} hold NaN or infinite values; their order means nothing")
    sizes = {n: scores[n].numel() for n in names}
    head_dim = model_head_dim(model)
    rule = {"scope": scope, "round_to": round_to, "min_keep": min_keep}
    if latency_target is not None:
        del rule["round_to"]  # widths come from the latency table's grid
        kept = fit_latency(model, scores, head_dim, latency_target, rule, batch_size=batch_size, device=device,
                           dtype=dtype, threads=threads, img_size=img_size, table=table,
                           refine=DEFAULT_REFINE if refine is None else refine,
                           refine_repeats=DEFAULT_REFINE_REPEATS if refine_repeats is None else refine_repeats)
        return PruningPlan(kept=kept, sizes=sizes, head_dim=head_dim, rule=rule)

    qk_heads = _qk_heads(model, names)
    ranking = _Ranking(scores, names)

    def finish(counts: Dict[str, int]) -> Dict[str, List[int]]:
        kept = {}
        for n in names:
            if n.endswith(".attn_out"):
                # What the attention kernels see is each head's value width: round those.
                idx = ranking.top(n, _adjust(counts[n], sizes[n], 1, min_keep))
                kept[n] = ranking.round_units(n, idx, head_dim, round_to)
            elif n in qk_heads:  # ... and each head's query/key width
                units, per_unit = qk_heads[n]
                idx = ranking.top(n, _adjust(counts[n], sizes[n], 1, min_keep))
                kept[n] = ranking.round_units(n, idx, units, -(-round_to // per_unit))
            else:
                kept[n] = ranking.top(n, _adjust(counts[n], sizes[n], round_to, min_keep))
        return kept

    if ratio is not None:
        rule["ratio"] = float(ratio)
        if scope == "layer":
            kept = finish({n: sizes[n] - math.floor(ratio * sizes[n]) for n in names})
        else:
            counts, threshold = ranking.counts(math.floor(ratio * sum(sizes.values())))
            rule["threshold"] = threshold
            kept = finish(counts)
    else:
        rule["flops_target"] = float(flops_target)
        kept = _fit_flops(model, ranking, sizes, flops_target, finish, rule, img_size)
    return PruningPlan(kept=kept, sizes=sizes, head_dim=head_dim, rule=rule)


def _check_scores(scores, found: Dict[str, nn.Parameter]) -> Dict[str, torch.Tensor]:
    if not isinstance(scores, dict) or set(scores) != set(found):
        got = sorted(scores) if isinstance(scores, dict) else type(scores).__name__
        raise ValueError(f"scores: expected one tensor per gate of the model ({len(found)} gates, "
                         f"e.g. {next(iter(found))!r}), got {got if isinstance(got, str) else got[:4]}")
    out = {}
    for name, gate in found.items():
        value = torch.as_tensor(scores[name]).detach().float().flatten().cpu()
        if value.numel() != gate.numel():
            raise ValueError(f"scores[{name!r}]: expected {gate.numel()} values like the gate, "
                             f"got {value.numel()}")
        out[name] = value
    return out


def plan_macs(model: nn.Module, kept: Dict[str, List[int]], head_dim: int, img_size=None) -> int:
    """MACs per image of ``model`` pruned to ``kept``: the profile of that pruned model, built
    on the meta device (the reference the planner's analytic count is tested against)."""
    meta_model = structure_copy(model)
    sizes = {name: gate.numel() for name, gate in require_gates(meta_model).items()}
    candidate = PruningPlan(kept={k: list(v) for k, v in kept.items()}, sizes=sizes, head_dim=head_dim)
    return profile(prune(meta_model, candidate), img_size).macs


def _fit_flops(model, ranking, sizes, target, finish, rule, img_size):
    count = MacCounter(model, img_size)
    dense = count.dense
    budget = target * dense

    @functools.lru_cache(maxsize=None)
    def evaluate(n_remove):
        """(kept, threshold, MACs) when the ``n_remove`` lowest scores go (the answer is
        usually one the search has already counted)."""
        counts, threshold = ranking.counts(n_remove)
        kept = finish(counts)
        return kept, threshold, count(kept)

    # MACs never grow as more dims are removed, so binary-search the fewest removals that fit.
    lo, hi = 0, sum(sizes.values())
    while lo < hi:
        mid = (lo + hi) // 2
        if evaluate(mid)[2] <= budget:
            hi = mid
        else:
            lo = mid + 1
    kept, threshold, macs = evaluate(lo)
    if macs > budget:
        raise ValueError(f"flops_target: {target} is out of reach; pruning every gated dim (with "
                         f"min_keep={rule['min_keep']}) still leaves {macs / dense:.3f} of the dense MACs")
    rule.update(threshold=threshold, macs=macs, dense_macs=dense)
    return kept


def _qk_heads(model: nn.Module, names: List[str]) -> Dict[str, tuple]:
    """For each ``attn_qk`` gate: (values per head, dims per value)."""
    out = {}
    for branch in branches(model):
        name = branch.gate_name(QK_SITE)
        if QK_SITE in branch.sites and name in names:
            layout = qk_layout(branch)
            out[name] = (layout.units_per_head, layout.head_dim // layout.units_per_head)
    return out
