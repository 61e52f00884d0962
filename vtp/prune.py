"""Physical pruning: a gated ViT and a plan in, a smaller timm VisionTransformer out.

For block ``i`` with effective gates ``g`` (the gate values when folding, else 1,
and 0 wherever the plan prunes):

* ``attn_in``  : qkv keeps only the kept input columns (``W[:, kept] * g[kept]``);
  ``norm1`` becomes a ``KeptLayerNorm`` that emits only those columns.
* ``attn_out`` : each head keeps its kept value dims; V rows of qkv and columns of
  proj go with them. A head left with no value dim is removed with its Q and K rows.
* ``mlp_in``   : fc1 keeps the kept input columns; ``norm2`` emits only those.
* ``mlp_hidden``: fc1 keeps the kept rows (and bias), fc2 the kept columns.
* A branch whose gated inputs or hidden features are all pruned no longer depends on
  its input: it becomes a ``ConstantBranch`` holding its output (layer scale folded in).

With ``fold=True`` the pruned model computes, in eval mode, exactly what the gated
model computes with the pruned gates set to 0.
"""
from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .gates import SITES, check_supported, site_linear
from .modules import ConstantBranch, GatedLinear, KeptLayerNorm, PrunedAttention
from .plan import PruningPlan

__all__ = ["prune", "PrunedFrom"]


@dataclass(frozen=True)
class PrunedFrom:
    """What ``vtp.prune`` made a model from, kept as ``model.vtp_pruned_from``.

    ``dense`` is the gated input model's structure on the meta device (no weights, no
    memory): the pruned modules no longer say what the dense ones were, and ``vtp.save``
    needs that to describe how to rebuild the model. ``fold`` says whether the kept gate
    values were multiplied into the weights.
    """

    dense: nn.Module
    fold: bool


def _structure_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose parameters and buffers live on the meta device."""
    memo = {}
    for t in itertools.chain(model.parameters(), model.buffers()):
        meta = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else meta
    return copy.deepcopy(model, memo)


def prune(model: nn.Module, plan: PruningPlan, fold: bool = True) -> nn.Module:
    """Return a new, physically smaller copy of the gated ``model`` as ``plan`` says.

    fold=True (default) multiplies each kept gate value into its weight columns, so the
    pruned model starts fine-tuning where the gated model left off. fold=False drops the
    gate values (resets them to 1), as in the VTP paper. The result has no gates, records
    the plan as ``model.vtp_plan`` and keeps ``model``'s training mode and device.
    """
    if not isinstance(plan, PruningPlan):
        raise TypeError(f"plan: expected a vtp.PruningPlan, got {type(plan).__name__}")
    check_supported(model)
    plan.check_model(model)
    for block in model.blocks:
        if block.attn.attn_drop.p > 0:
            raise ValueError("model: pruned attention has no attention-probability dropout; "
                             "build the model with attn_drop_rate=0")

    pruned = copy.deepcopy(model)
    with torch.no_grad():
        for i, block in enumerate(pruned.blocks):
            effective = _effective_gates(block, i, plan, fold)
            before = set(block.modules())
            _prune_attention(block, effective)
            _prune_mlp(block, effective)
            for m in block.modules():  # the modules pruning made take the block's mode
                if m not in before:
                    m.training = block.training
    pruned.vtp_plan = plan
    pruned.vtp_pruned_from = PrunedFrom(dense=_structure_copy(model), fold=fold)
    return pruned


def _effective_gates(block: nn.Module, index: int, plan: PruningPlan, fold: bool):
    """Per site: the kept indices (on the CPU: the structure is decided from them, also for
    models on the meta device), and the vector the pruned weights bake in (the gate value,
    or 1 without folding, where kept; 0 where pruned)."""
    out = {}
    for site in SITES:
        linear = site_linear(block, site)
        w = linear.weight
        if isinstance(linear, GatedLinear):
            kept = torch.tensor(plan.kept[f"blocks.{index}.{site}"], dtype=torch.long)
            values = linear.gate.detach().to(w.dtype) if fold else torch.ones(linear.in_features, dtype=w.dtype,
                                                                             device=w.device)
            effective = torch.zeros_like(values)
            effective[kept.to(w.device)] = values[kept.to(w.device)]
        else:
            kept = torch.arange(linear.in_features)
            effective = torch.ones(linear.in_features, dtype=w.dtype, device=w.device)
        out[site] = (kept, effective)
    return out


def _linear(weight: torch.Tensor, bias) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None,
                      device=weight.device, dtype=weight.dtype)
    layer.weight.copy_(weight)
    if bias is not None:
        layer.bias.copy_(bias)
    return layer


def _make_constant(block: nn.Module, branch: str, norm: str, scale: str, out: torch.Tensor) -> None:
    """Replace ``block.<branch>`` by its fixed output ``out``, with the layer scale baked in;
    the norm in front of it and the scale become identities."""
    value = getattr(block, scale)(out.view(1, 1, -1)).flatten()
    setattr(block, branch, ConstantBranch(value))
    setattr(block, norm, nn.Identity())
    setattr(block, scale, nn.Identity())


def _prune_attention(block: nn.Module, gates: dict) -> None:
    attn = block.attn
    qkv, proj = attn.qkv, attn.proj
    dim, heads, head_dim = qkv.in_features, attn.num_heads, attn.head_dim
    (kept_in, g_in), (kept_out, g_out) = gates["attn_in"], gates["attn_out"]

    attn_dim = heads * head_dim
    if kept_in.numel() == 0 or kept_out.numel() == 0:
        # With no input dim left, Q, K and V are the qkv bias for every token: attention is
        # uniform and each head outputs its V bias. With no value dim left, proj sees zeros.
        v = qkv.bias[2 * attn_dim:] if qkv.bias is not None else qkv.weight.new_zeros(attn_dim)
        _make_constant(block, "attn", "norm1", "ls1", F.linear(v * g_out, proj.weight, proj.bias))
        return

    if kept_in.numel() < dim:
        block.norm1 = KeptLayerNorm.from_layer_norm(block.norm1, kept_in)
    widths = torch.bincount(kept_out // head_dim, minlength=heads).tolist()
    kept_in, kept_out = kept_in.to(qkv.weight.device), kept_out.to(qkv.weight.device)
    w_qkv = qkv.weight[:, kept_in] * g_in[kept_in]
    w_proj = proj.weight[:, kept_out] * g_out[kept_out]
    if kept_out.numel() == attn_dim:
        attn.qkv = _linear(w_qkv, qkv.bias)
        attn.proj = _linear(w_proj, proj.bias)
        return

    live = [h for h in range(heads) if widths[h] > 0]
    qk_rows = [h * head_dim + j for h in live for j in range(head_dim)]
    rows = torch.tensor(qk_rows + [attn_dim + r for r in qk_rows], dtype=torch.long, device=kept_out.device)
    rows = torch.cat([rows, 2 * attn_dim + kept_out])  # Q and K of live heads, then the kept V rows
    new = PrunedAttention(
        kept_in.numel(), proj.out_features, head_dim, [widths[h] for h in live],
        qkv_bias=qkv.bias is not None, proj_bias=proj.bias is not None,
        q_norm=attn.q_norm, k_norm=attn.k_norm, proj_drop=attn.proj_drop.p, scale=attn.scale,
        device=qkv.weight.device, dtype=qkv.weight.dtype,
    )
    new.qkv = _linear(w_qkv[rows], qkv.bias[rows] if qkv.bias is not None else None)
    new.proj = _linear(w_proj, proj.bias)
    new.train(attn.training)
    block.attn = new


def _prune_mlp(block: nn.Module, gates: dict) -> None:
    mlp = block.mlp
    fc1, fc2 = mlp.fc1, mlp.fc2
    dim = fc1.in_features
    (kept_in, g_in), (kept_hidden, g_hidden) = gates["mlp_in"], gates["mlp_hidden"]

    if kept_in.numel() == 0 or kept_hidden.numel() == 0:
        # fc1 sees zeros (or fc2 keeps no hidden feature): the output is fixed by the biases.
        hidden = mlp.act(F.linear(fc1.weight.new_zeros(dim) * g_in, fc1.weight, fc1.bias))
        _make_constant(block, "mlp", "norm2", "ls2", F.linear(hidden * g_hidden, fc2.weight, fc2.bias))
        return

    if kept_in.numel() < dim:
        block.norm2 = KeptLayerNorm.from_layer_norm(block.norm2, kept_in)
    kept_in, kept_hidden = kept_in.to(fc1.weight.device), kept_hidden.to(fc1.weight.device)
    w1 = fc1.weight[kept_hidden][:, kept_in] * g_in[kept_in]
    mlp.fc1 = _linear(w1, fc1.bias[kept_hidden] if fc1.bias is not None else None)
    mlp.fc2 = _linear(fc2.weight[:, kept_hidden] * g_hidden[kept_hidden], fc2.bias)
