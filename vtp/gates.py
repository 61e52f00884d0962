"""Putting VTP's gates into a timm VisionTransformer and reading them back.

Each transformer block gets up to four gates, one per *site* (DESIGN §1):

=============  ===================  ==========================================
site           gated linear         what the gate scores
=============  ===================  ==========================================
``attn_in``    ``attn.qkv``         the LayerNorm output fed to attention
``attn_out``   ``attn.proj``        the concatenated head outputs (value dims)
``mlp_in``     ``mlp.fc1``          the LayerNorm output fed to the MLP
``mlp_hidden`` ``mlp.fc2``          the MLP's hidden features
=============  ===================  ==========================================

Gates are named ``blocks.{i}.{site}`` everywhere (plans, statistics, plots).
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Sequence, Tuple

import torch
import torch.nn as nn
from timm.layers import Mlp
from timm.models.vision_transformer import Attention, Block, VisionTransformer

from .modules import GatedLinear

__all__ = ["SITES", "add_gates", "gates", "require_gates", "l1_penalty", "param_groups", "gate_values",
           "gate_stats", "check_supported", "site_linear"]

SITES: Tuple[str, ...] = ("attn_in", "attn_out", "mlp_in", "mlp_hidden")

# site -> (submodule of the block, linear attribute)
_SITE_LINEAR = {
    "attn_in": ("attn", "qkv"),
    "attn_out": ("attn", "proj"),
    "mlp_in": ("mlp", "fc1"),
    "mlp_hidden": ("mlp", "fc2"),
}


def site_linear(block: nn.Module, site: str) -> nn.Linear:
    parent, attr = _SITE_LINEAR[site]
    return getattr(getattr(block, parent), attr)


def _check_sites(sites: Iterable[str]) -> Tuple[str, ...]:
    if isinstance(sites, str):
        sites = (sites,)
    sites = tuple(sites)
    unknown = [s for s in sites if s not in SITES]
    if unknown or not sites:
        raise ValueError(f"sites: expected a non-empty subset of {SITES}, got {sites}")
    return tuple(s for s in SITES if s in sites)


def check_supported(model: nn.Module) -> None:
    """Raise a ``TypeError`` naming the first part of ``model`` that VTP cannot gate or prune.

    Supported: timm ``VisionTransformer`` and its subclasses (e.g. distilled DeiT) built
    from timm's ``Block``, ``Attention`` and ``Mlp`` with LayerNorm, in any combination of
    class/register/distillation tokens, pooling, ``qkv_bias``, layer scale and ``qk_norm``.
    A model that ``vtp.prune`` already shrank is a ``ValueError``.
    """
    if getattr(model, "vtp_plan", None) is not None:
        raise ValueError("model: already pruned by vtp.prune; gates and plans apply to the dense model")
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"model: expected a timm VisionTransformer, got {type(model).__name__}")
    for i, block in enumerate(model.blocks):
        where = f"model.blocks[{i}]"
        if type(block) is not Block:
            raise TypeError(f"{where}: VTP supports timm's Block, got {type(block).__name__}")
        attn, mlp = block.attn, block.mlp
        if type(attn) is not Attention:
            raise TypeError(f"{where}.attn: VTP supports timm's Attention, got {type(attn).__name__}")
        if attn.head_dim != model.blocks[0].attn.head_dim:
            raise TypeError(f"{where}.attn: head_dim {attn.head_dim} differs from block 0's "
                            f"({model.blocks[0].attn.head_dim}); a plan holds one head_dim")
        if not isinstance(attn.norm, nn.Identity):
            raise TypeError(f"{where}.attn: attention output normalisation (scale_attn_norm) is not supported")
        if getattr(attn, "gate", None) is not None:
            raise TypeError(f"{where}.attn: gated attention (sigmoid output gate) is not supported")
        if type(mlp) is not Mlp:
            raise TypeError(f"{where}.mlp: VTP supports timm's Mlp, got {type(mlp).__name__}")
        if not isinstance(mlp.norm, nn.Identity):
            raise TypeError(f"{where}.mlp: hidden normalisation (scale_mlp_norm) is not supported")
        for name in ("norm1", "norm2"):
            if not isinstance(getattr(block, name), nn.LayerNorm):
                raise TypeError(f"{where}.{name}: VTP supports LayerNorm, got {type(getattr(block, name)).__name__}")


def add_gates(model: nn.Module, sites: Sequence[str] = SITES) -> nn.Module:
    """Replace the gated linears of every block by ``GatedLinear`` (in place); returns ``model``.

    Weights are shared with the original linears, not copied. Gates start at 1, so the
    model computes exactly what it did before. Calling it again adds only missing sites.
    """
    sites = _check_sites(sites)
    check_supported(model)
    for block in model.blocks:
        for site in sites:
            parent, attr = _SITE_LINEAR[site]
            linear = getattr(getattr(block, parent), attr)
            if not isinstance(linear, GatedLinear):
                setattr(getattr(block, parent), attr, GatedLinear.from_linear(linear))
    return model


def gates(model: nn.Module) -> Dict[str, nn.Parameter]:
    """``{"blocks.{i}.{site}": gate Parameter}`` for every gate in ``model``, in block then site order."""
    found: Dict[str, nn.Parameter] = {}
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        return found
    for i, block in enumerate(blocks):
        for site, (parent, attr) in _SITE_LINEAR.items():
            linear = getattr(getattr(block, parent, None), attr, None)
            if isinstance(linear, GatedLinear):
                found[f"blocks.{i}.{site}"] = linear.gate
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
