"""Choosing which gated dimensions survive: ``vtp.plan`` and ``PruningPlan``.

A plan is pure data: for every gate ``blocks.{i}.{site}``, its full size and the sorted
indices it keeps. It records how it was made and round-trips through JSON, so the
same plan can prune several copies of a model, or be inspected and edited by hand.
"""
from __future__ import annotations

import json
import math
import operator
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
import torch.nn as nn

from .atomic import write_text
from .gates import SITES, check_supported, require_gates
from .profile import block_macs, num_tokens, profile

__all__ = ["PruningPlan", "plan"]

PLAN_FORMAT = "vtp-plan"
PLAN_VERSION = 1


@dataclass
class PruningPlan:
    """Kept indices per gate. ``sizes`` are the full gate lengths of the model it was made for."""

    kept: Dict[str, List[int]]
    sizes: Dict[str, int]
    head_dim: int
    rule: dict = field(default_factory=dict)

    def __post_init__(self):
        if set(self.kept) != set(self.sizes):
            raise ValueError("plan: 'kept' and 'sizes' must name the same gates")
        self.head_dim = _integer(self.head_dim, "head_dim", 1)
        for name, idx in self.kept.items():
            size = self.sizes[name] = _integer(self.sizes[name], f"sizes[{name!r}]", 1)
            if isinstance(idx, (str, bytes)):
                raise ValueError(f"plan: kept[{name!r}] must be a list of indices, got {idx!r}")
            idx = [_integer(i, f"kept[{name!r}]", 0) for i in idx]
            if idx != sorted(set(idx)) or (idx and (idx[0] < 0 or idx[-1] >= size)):
                raise ValueError(f"plan: kept[{name!r}] must be sorted unique indices in [0, {size})")
            self.kept[name] = idx

    # ---- summaries -------------------------------------------------------------------------
    @property
    def total(self) -> int:
        return sum(self.sizes.values())

    @property
    def num_kept(self) -> int:
        return sum(len(v) for v in self.kept.values())

    @property
    def pruned_ratio(self) -> float:
        """Share of all gated dimensions removed."""
        return 1.0 - self.num_kept / self.total

    def kept_count(self, block: int, site: str) -> int:
        name = f"blocks.{block}.{site}"
        return len(self.kept[name]) if name in self.kept else -1

    def head_widths(self, block: int, num_heads: int) -> List[int]:
        """Kept value dims of each head of ``block`` (all ``head_dim`` when attn_out is not gated)."""
        name = f"blocks.{block}.attn_out"
        if name not in self.kept:
            return [self.head_dim] * num_heads
        widths = [0] * num_heads
        for i in self.kept[name]:
            widths[i // self.head_dim] += 1
        return widths

    def summary(self) -> str:
        """One line per block: kept / full for each gated site."""
        blocks = sorted({int(n.split(".")[1]) for n in self.kept})
        lines = [f"{'block':>5}  " + "  ".join(f"{s:>14}" for s in SITES)]
        for b in blocks:
            cells = []
            for s in SITES:
                name = f"blocks.{b}.{s}"
                cells.append(f"{len(self.kept[name]):>6} / {self.sizes[name]:<5}" if name in self.kept else f"{'-':>14}")
            lines.append(f"{b:>5}  " + "  ".join(cells))
        lines.append(f"kept {self.num_kept} of {self.total} gated dims ({100 * self.pruned_ratio:.1f} % pruned)")
        return "\n".join(lines)

    # ---- (de)serialisation -----------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"format": PLAN_FORMAT, "version": PLAN_VERSION, "head_dim": self.head_dim, "rule": self.rule,
                "sizes": dict(self.sizes), "kept": {k: list(v) for k, v in self.kept.items()}}

    @classmethod
    def from_dict(cls, data: dict) -> "PruningPlan":
        if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT:
            raise ValueError(f"plan: expected a dict with format={PLAN_FORMAT!r}")
        if data.get("version") != PLAN_VERSION:
            raise ValueError(f"plan: unsupported version {data.get('version')!r}, expected {PLAN_VERSION}")
        try:
            return cls(kept={k: list(v) for k, v in data["kept"].items()}, sizes=dict(data["sizes"]),
                       head_dim=data["head_dim"], rule=dict(data.get("rule", {})))
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"plan: malformed plan data ({e!r})") from None

    def to_json(self, indent: Optional[int] = None) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text: str) -> "PruningPlan":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"plan: not valid JSON ({e})") from None
        return cls.from_dict(data)

    def save(self, path: str) -> None:
        """Write the plan as JSON, atomically."""
        write_text(path, self.to_json(indent=1))

    @classmethod
    def load(cls, path: str) -> "PruningPlan":
        with open(path, encoding="utf-8") as f:
            return cls.from_json(f.read())

    def check_model(self, model: nn.Module) -> None:
        """Raise ``ValueError`` unless ``model``'s gates are exactly the ones this plan was made for."""
        found = {name: g.numel() for name, g in require_gates(model).items()}
        if found != self.sizes:
            missing = sorted(set(self.sizes) - set(found))
            extra = sorted(set(found) - set(self.sizes))
            resized = sorted(n for n in set(found) & set(self.sizes) if found[n] != self.sizes[n])
            raise ValueError("plan: made for another model (gates missing from model: "
                             f"{missing[:4]}, gates not in plan: {extra[:4]}, different sizes: {resized[:4]})")
        head_dim = model.blocks[0].attn.head_dim
        if head_dim != self.head_dim:
            raise ValueError(f"plan: made for head_dim={self.head_dim}, model has head_dim={head_dim}")


def _integer(value, what: str, low: int) -> int:
    """``value`` as an int >= ``low``; floats, strings and bools are errors, not rounded."""
    try:
        if isinstance(value, bool):
            raise TypeError
        value = operator.index(value)
    except TypeError:
        raise ValueError(f"plan: {what} must hold integers, got {value!r}") from None
    if value < low:
        raise ValueError(f"plan: {what} must be >= {low}, got {value}")
    return value


def _keep_top(scores: torch.Tensor, count: int) -> List[int]:
    """Indices of the ``count`` highest scores, sorted; ties go to the lower index."""
    if count <= 0:
        return []
    order = torch.sort(-scores, stable=True).indices[:count]
    return sorted(order.tolist())


def _round_heads(scores: torch.Tensor, kept: List[int], head_dim: int, round_to: int) -> List[int]:
    """Round every non-zero head width of an ``attn_out`` selection up to ``round_to``,
    adding the head's best-scoring dims, never past ``head_dim``."""
    if round_to == 1:
        return kept
    out: List[int] = []
    for h in range(scores.numel() // head_dim):
        width = sum(1 for i in kept if i // head_dim == h)
        width = _adjust(width, head_dim, round_to, 0)
        out += [h * head_dim + i for i in _keep_top(scores[h * head_dim:(h + 1) * head_dim], width)]
    return out


def _adjust(count: int, size: int, round_to: int, min_keep: int) -> int:
    count = max(count, min(min_keep, size))
    if count:
        count = min(size, math.ceil(count / round_to) * round_to)
    return count


def plan(model: nn.Module, ratio: Optional[float] = None, *, scope: str = "global",
         flops_target: Optional[float] = None, round_to: int = 1, min_keep: int = 0,
         img_size=None, scores: Optional[Dict[str, torch.Tensor]] = None) -> PruningPlan:
    """Decide which gated dimensions to keep, from the gate magnitudes ``|a|``.

    Exactly one of:
      ratio         share of gated dims to remove, in [0, 1). With ``scope="global"`` (the
                    paper's rule) one threshold over all gates of the model; with
                    ``scope="layer"`` the same share is removed from every gate.
      flops_target  share of the dense model's MACs to keep, in (0, 1]: the best-scoring
                    dims (global order) are kept until the pruned model fits the budget.
    Then per gate: at least ``min_keep`` dims are kept (default 0: a gate may vanish, which
    removes a head or turns a branch into a constant), and a non-zero kept count is rounded
    up to a multiple of ``round_to`` (tensor-core friendly widths), never past the gate size.
    For ``attn_out`` the rounding applies to each head's value width, which is what the
    attention kernels and the output projection see.
    ``img_size`` sets the token count used for ``flops_target`` (default: the model's).
    ``scores`` replaces ``|a|`` by other importance scores, one 1-D tensor per gate name
    (e.g. weight magnitudes, for comparison with other pruning criteria); higher is kept.
    """
    found = require_gates(model)
    check_supported(model)
    if (ratio is None) == (flops_target is None):
        raise ValueError("plan: give exactly one of ratio= or flops_target=")
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
    head_dim = model.blocks[0].attn.head_dim
    rule = {"scope": scope, "round_to": round_to, "min_keep": min_keep}

    def finish(counts: Dict[str, int]) -> Dict[str, List[int]]:
        kept = {}
        for n in names:
            if n.endswith(".attn_out"):
                # What the attention kernels see is each head's value width: round those.
                idx = _keep_top(scores[n], _adjust(counts[n], sizes[n], 1, min_keep))
                kept[n] = _round_heads(scores[n], idx, head_dim, round_to)
            else:
                kept[n] = _keep_top(scores[n], _adjust(counts[n], sizes[n], round_to, min_keep))
        return kept

    if ratio is not None:
        rule["ratio"] = float(ratio)
        if scope == "layer":
            kept = finish({n: sizes[n] - math.floor(ratio * sizes[n]) for n in names})
        else:
            counts, threshold = _global_counts(scores, names, math.floor(ratio * sum(sizes.values())))
            rule["threshold"] = threshold
            kept = finish(counts)
    else:
        rule["flops_target"] = float(flops_target)
        kept = _fit_flops(model, scores, names, sizes, head_dim, flops_target, finish, rule, img_size)
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


def _global_counts(scores, names, n_remove):
    """Per-gate kept counts when the ``n_remove`` lowest scores of the whole model go."""
    flat = torch.cat([scores[n] for n in names])
    owner = torch.cat([torch.full((scores[n].numel(),), i) for i, n in enumerate(names)])
    order = torch.sort(flat, stable=True).indices
    removed = torch.bincount(owner[order[:n_remove]], minlength=len(names))
    counts = {n: scores[n].numel() - int(removed[i]) for i, n in enumerate(names)}
    threshold = float(flat[order[n_remove - 1]]) if n_remove > 0 else None
    return counts, threshold


def plan_macs(model: nn.Module, kept: Dict[str, List[int]], head_dim: int, img_size=None,
              dense_macs: Optional[int] = None) -> int:
    """MACs per image of ``model`` pruned to ``kept``, computed from sizes alone."""
    tokens = num_tokens(model, img_size)
    dim = model.embed_dim
    total = profile(model, img_size).macs if dense_macs is None else dense_macs
    for i, block in enumerate(model.blocks):
        attn = block.attn
        full = dict(attn_in=dim, v_widths=[head_dim] * attn.num_heads, mlp_in=dim,
                    mlp_hidden=block.mlp.fc1.out_features)
        pruned = dict(full)
        for site in ("attn_in", "mlp_in", "mlp_hidden"):
            if f"blocks.{i}.{site}" in kept:
                pruned[site] = len(kept[f"blocks.{i}.{site}"])
        if f"blocks.{i}.attn_out" in kept:
            widths = [0] * attn.num_heads
            for j in kept[f"blocks.{i}.attn_out"]:
                widths[j // head_dim] += 1
            pruned["v_widths"] = widths
        total += block_macs(tokens, dim, head_dim, **pruned) - block_macs(tokens, dim, head_dim, **full)
    return total


def _fit_flops(model, scores, names, sizes, head_dim, target, finish, rule, img_size):
    dense = profile(model, img_size).macs
    budget = target * dense

    def kept_for(n_remove):
        counts, threshold = _global_counts(scores, names, n_remove)
        return finish(counts), threshold

    # MACs never grow as more dims are removed, so binary-search the fewest removals that fit.
    lo, hi = 0, sum(sizes.values())
    while lo < hi:
        mid = (lo + hi) // 2
        if plan_macs(model, kept_for(mid)[0], head_dim, img_size, dense) <= budget:
            hi = mid
        else:
            lo = mid + 1
    kept, threshold = kept_for(lo)
    macs = plan_macs(model, kept, head_dim, img_size, dense)
    if macs > budget:
        raise ValueError(f"flops_target: {target} is out of reach; pruning every gated dim (with "
                         f"min_keep={rule['min_keep']}) still leaves {macs / dense:.3f} of the dense MACs")
    rule.update(threshold=threshold, macs=macs, dense_macs=dense)
    return kept
