"""``PruningPlan``: which gated dimensions survive, as pure data.

A plan holds, for every gate ``blocks.{i}.{site}``, its full size and the sorted indices it
keeps. It records how it was made (``vtp.plan``, in _plan.py) and round-trips through
JSON, so the same plan can prune several copies of a model, or be inspected and edited
by hand.
"""
from __future__ import annotations

import json
import operator
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch.nn as nn

from .architectures import ALL_SITES, QK_SITE, SITES, head_dim as model_head_dim, parse_gate_name
from .atomic import write_text
from ._gates import require_gates

__all__ = ["PruningPlan"]

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
        """One line per block (or parallel branch): kept / full for each gated site."""
        rows: Dict[str, Dict[str, str]] = {}
        for name in self.kept:
            block, branch, site = parse_gate_name(name)
            label = f"{block}" if branch is None else f"{block}.{branch}"
            rows.setdefault(label, {})[site] = f"{len(self.kept[name]):>6} / {self.sizes[name]:<5}"
        sites = ALL_SITES if any(n.endswith("." + QK_SITE) for n in self.kept) else SITES
        lines = [f"{'block':>5}  " + "  ".join(f"{s:>14}" for s in sites)]
        for label, cells in rows.items():
            lines.append(f"{label:>5}  " + "  ".join(cells.get(s, f"{'-':>14}") for s in sites))
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
        head_dim = model_head_dim(model)
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


