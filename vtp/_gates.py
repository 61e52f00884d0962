"""Putting VTP's gates into a timm ViT and reading them back.

Every residual branch of every block gets up to two gates (DESIGN §1; architectures.py says
where they sit in each timm block):

=============  ==========================  ==========================================
site           gated linear(s)             what the gate scores
=============  ==========================  ==========================================
``attn_in``    ``attn.qkv`` (or q/k/v)     the input of attention (its norm's output)
``attn_out``   ``attn.proj``               the concatenated head outputs (value dims)
``mlp_in``     ``mlp.fc1`` (or fc1_g/x)    the input of the MLP (its norm's output)
``mlp_hidden`` ``mlp.fc2``                 the MLP's hidden features
=============  ==========================  ==========================================

``attn_qk`` (opt-in: ``add_gates(model, sites=vtp.ALL_SITES)``) scores each query/key dim
of each head inside the attention scores; it sits on the key rows of ``attn.qkv`` (or on
``attn.k_norm``'s output): see architectures.py.

Gates are named ``blocks.{i}.{site}`` everywhere (plans, statistics, plots), and
``blocks.{i}.{j}.{site}`` for the j-th branch of a parallel block.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Sequence, Tuple

import torch
import torch.nn as nn

from .architectures import (ALL_SITES, QK_SITE, SITES, Branch, branches, check_supported, qk_layout, qk_slot,
                            site_linears)
from .modules import GatedHeadNorm, GatedLinear

__all__ = ["SITES", "QK_SITE", "ALL_SITES", "add_gates", "qk_gate_holder", "gates", "require_gates", "l1_penalty", "param_groups", "gate_values",
           "gate_stats", "check_supported"]


def _check_sites(sites: Iterable[str]) -> Tuple[str, ...]:
    if isinstance(sites, str):
        sites = (sites,)
    sites = tuple(sites)
    unknown = [s for s in sites if s not in ALL_SITES]
    if unknown or not sites:
        raise ValueError(f"sites: expected a non-empty subset of {ALL_SITES}, got {sites}")
    return tuple(s for s in ALL_SITES if s in sites)


def _add_qk_gate(branch: Branch) -> None:
    layout = qk_layout(branch)
    per_dim = layout.dim_to_unit()
    parent, attr, offset = qk_slot(branch)
    current = getattr(parent, attr)
    if offset is None:
        if not isinstance(current, GatedHeadNorm):
            like = branch.module().proj.weight if branch.kind == "attn" else branch.module().attn_out_proj.weight
            setattr(parent, attr, GatedHeadNorm(current, layout.heads, layout.head_dim, layout.size, per_dim,
                                                heads_first=branch.kind != "parallel", device=like.device,
                                                dtype=like.dtype))
        return
    if isinstance(current, GatedLinear):
        if current.qk_gate is None:  # the projection's input gate (attn_in) stays as it is
            current.add_qk_gate(offset, layout.size, per_dim)
        return
    gated = GatedLinear.from_linear(current, input_gate=False)
    gated.add_qk_gate(offset, layout.size, per_dim)
    setattr(parent, attr, gated)
    _bias_after_projection(parent, attr)


def _bias_after_projection(attn: nn.Module, attr: str) -> None:
    """EVA's and BEiT's attention add their q/v biases by calling F.linear on qkv.weight,
    which would bypass a gate of the projection; adding them after qkv(x) is the same sum
    and goes through it."""
    if attr == "qkv" and getattr(attn, "q_bias", None) is not None:
        attn.qkv_bias_separate = True


def qk_gate_holder(branch: Branch):
    """The module holding the branch's ``attn_qk`` gate (as ``qk_gate``), or None (also for
    what pruning left: a constant branch has no heads)."""
    if not hasattr(branch.module(), "num_heads"):
        return None
    parent, attr, _ = qk_slot(branch)
    module = getattr(parent, attr, None)
    return module if getattr(module, "qk_gate", None) is not None else None


def _input_gated(linear) -> bool:
    return isinstance(linear, GatedLinear) and linear.gate is not None


def add_gates(model: nn.Module, sites: Sequence[str] = SITES) -> nn.Module:
    """Replace the gated linears of every branch by ``GatedLinear`` (in place); returns ``model``.

    ``sites``: any of ``vtp.ALL_SITES``: the paper's four (``vtp.SITES``, the default) and
    ``attn_qk``, one gate per query/key dim of each head (per RoPE pair where RoPE rotates).

    Weights are shared with the original linears, not copied. Gates start at 1, so the
    model computes exactly what it did before. Linears that read one input (q, k and v
    projections, a SwiGLU's two input projections) share one gate. Calling it again adds
    only missing sites. A site a branch does not have (``mlp_in`` of a parallel block,
    whose MLP reads the attention's input) is skipped.
    """
    sites = _check_sites(sites)
    check_supported(model)
    for branch in list(branches(model)):
        for site in branch.sites:
            if site not in sites:
                continue
            if site == QK_SITE:
                _add_qk_gate(branch)
                continue
            linears = site_linears(branch, site)
            first_parent, first_attr = linears[0]
            first = getattr(first_parent, first_attr)
            if _input_gated(first):
                continue
            gated = GatedLinear.from_linear(first)
            setattr(first_parent, first_attr, gated)
            _bias_after_projection(first_parent, first_attr)
            for parent, attr in linears[1:]:
                setattr(parent, attr, GatedLinear.from_linear(getattr(parent, attr), gate=gated.gate))
    return model


def gates(model: nn.Module) -> Dict[str, nn.Parameter]:
    """``{"blocks.{i}.{site}": gate Parameter}`` for every gate in ``model``, in block then site order.

    A model with no gates, or one VTP does not know, has none."""
    found: Dict[str, nn.Parameter] = {}
    try:
        all_branches = list(branches(model))
    except TypeError:
        return found
    for branch in all_branches:
        for site in branch.sites:
            if site == QK_SITE:
                holder = qk_gate_holder(branch)
                if holder is not None:
                    found[branch.gate_name(site)] = holder.qk_gate
                continue
            parent, attr = site_linears(branch, site)[0]
            linear = getattr(parent, attr, None)
            if _input_gated(linear):
                found[branch.gate_name(site)] = linear.gate
    return found


def require_gates(model: nn.Module) -> Dict[str, nn.Parameter]:
    """``gates(model)``, or a ``ValueError`` when the model has none."""
    found = gates(model)
    if not found:
        raise ValueError("model: has no VTP gates; call vtp.add_gates(model) first")
    return found


def l1_penalty(model: nn.Module) -> torch.Tensor:
    """``sum(|a|)`` over every gate of ``model``: VTP's sparsity penalty (loss = task + lambda * this)."""
    found = require_gates(model)
    return torch.stack([g.abs().sum(dtype=torch.float32) for g in found.values()]).sum()


def param_groups(model: nn.Module, weight_decay: float = 0.05, lr_scale_gates: float = 1.0) -> List[dict]:
    """Optimizer parameter groups: weight decay on weight matrices only.

    Gates are never decayed: their only regulariser is the L1 penalty. Biases, norms,
    layer scales, tokens and position embeddings are not decayed either (timm's rule).
    ``lr_scale_gates`` is stored as ``lr_scale`` on the gate group for schedulers that
    honour it (timm's do).
    """
    if weight_decay < 0:
        raise ValueError(f"weight_decay: expected >= 0, got {weight_decay}")
    gate_ids = {id(p) for p in gates(model).values()}
    no_decay_names = set(getattr(model, "no_weight_decay", lambda: set())())
    decay, no_decay, gate_params = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in gate_ids:
            gate_params.append(p)
        elif p.ndim <= 1 or name in no_decay_names or name.endswith(".bias"):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if gate_params:
        groups.append({"params": gate_params, "weight_decay": 0.0, "lr_scale": lr_scale_gates})
    return [g for g in groups if g["params"]]


def gate_values(model: nn.Module) -> torch.Tensor:
    """All gate values of ``model`` as one detached float32 CPU vector, in ``gates()`` order."""
    found = require_gates(model)
    return torch.cat([g.detach().float().flatten().cpu() for g in found.values()])


def gate_stats(model: nn.Module, thresholds: Sequence[float] = (1e-2, 1e-1)) -> Dict[str, dict]:
    """Per gate: size, mean, min, max of ``|a|`` and the share below each threshold.

    An ``"all"`` entry summarises every gate together. Useful to log during sparse training.
    """
    found = require_gates(model)

    def summary(values: torch.Tensor) -> dict:
        a = values.detach().float().abs().flatten().cpu()
        out = {"size": a.numel(), "mean": a.mean().item(), "min": a.min().item(), "max": a.max().item()}
        for t in thresholds:
            out[f"below_{t:g}"] = (a < t).float().mean().item()
        return out

    stats = {name: summary(g) for name, g in found.items()}
    stats["all"] = summary(torch.cat([g.detach().flatten() for g in found.values()]))
    return stats
