"""Physical pruning: a gated ViT and a plan in, a smaller timm model out.

For every residual branch (architectures.py) with effective gates ``g`` (the gate values
when folding, else 1, and 0 wherever the plan prunes):

* input sites (``attn_in``, ``mlp_in``): the linears reading the branch input keep only the
  kept columns (``W[:, kept] * g[kept]``); the norm in front becomes a ``KeptLayerNorm`` /
  ``KeptRmsNorm`` that emits only those columns (full-row statistics), or, where no norm
  sits in front (post-norm blocks), the linears read the kept columns (``IndexedLinear``);
* ``attn_out``: each head keeps its kept value dims; V rows of the input projection and
  columns of proj go with them, and a head left with no value dim goes with its Q and K
  rows. The attention becomes a ``PrunedAttention``. Where a norm sits over the attention
  output (timm's ``scale_norm``), its statistics need every value dim: V keeps its width and
  the norm emits the kept dims;
* ``attn_qk``: each kept head keeps the query and key rows of its kept query/key dims (its
  QK width), in as many slots as the widest head (zero rows fill the others: one attention
  call takes every head; a head with none left scores every token alike, 0 or its position
  bias, as the gated model does); the gate folds into the key rows. The softmax scale stays
  the model's. Where a q/k norm needs every dim (or SAM's position bias reads the full
  queries), the rows stay and the attention gathers the kept dims after the norm (and RoPE),
  scaling the queries by the folded gate: the saving is then in ``Q K^T`` alone;
* ``mlp_hidden``: fc1 (both halves of a GLU) keeps the kept rows, fc2 the kept columns;
  with a norm over the hidden features fc1 keeps every row and the norm emits the kept ones;
* a branch whose gated inputs or hidden features are all pruned no longer depends on its
  input: it becomes a ``ConstantBranch`` holding its output (a layer-scale module and a
  post-norm folded in).

With ``fold=True`` the pruned model computes, in eval mode, exactly what the gated
model computes with the pruned gates set to 0.
"""
from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import GluMlp
from timm.models.beit import Attention as BeitAttention
from timm.models.vision_transformer_relpos import RelPosAttention
from timm.models.vision_transformer_sam import Attention as SamAttention

from .architectures import (QK_SITE, Branch, QKLayout, attention_head_dim, attention_input_names, branches,
                            check_supported, qk_layout, qk_slot, site_linears)
from ._gates import qk_gate_holder
from .modules import (V_LAYOUTS, ConstantBranch, DecomposedPositionBias, GatedLinear, HeadsOfPositionBias,
                      IndexedLinear, PrunedAttention, PrunedParallelBlock, TablePositionBias, kept_norm)
from .pruning_plan import PruningPlan

__all__ = ["prune", "PrunedFrom", "DEFAULT_V_LAYOUT", "LAYOUTS"]

# How pruned attention lays out its values unless told otherwise: measured faster on the
# CPU (benchmarks/results/pruned_cpu.json; no GPU run yet).
DEFAULT_V_LAYOUT = "padded"
# V padded to head_dim whatever the queries and keys keep: what "padded" made before V was
# padded to each block's attention width (model files of format 2 and earlier). The two
# differ only where attn_qk narrowed the queries and keys.
HEAD_DIM_PADDED = "padded_head_dim"
LAYOUTS = V_LAYOUTS + (HEAD_DIM_PADDED,)


def _module_layout(layout: str, head_dim: int) -> dict:
    """The ``PrunedAttention`` / ``PrunedParallelBlock`` arguments of a ``prune`` layout."""
    if layout == HEAD_DIM_PADDED:
        return {"v_layout": "padded", "v_head_width": head_dim}
    return {"v_layout": layout}


@dataclass(frozen=True)
class PrunedFrom:
    """What ``vtp.prune`` made a model from, kept as ``model.vtp_pruned_from``.

    ``dense`` is the gated input model's structure on the meta device (no weights, no
    memory): the pruned modules no longer say what the dense ones were, and ``vtp.save``
    needs that to describe how to rebuild the model. ``fold`` says whether the kept gate
    values were multiplied into the weights; ``layout`` how pruned attention lays out V.
    """

    dense: nn.Module
    fold: bool
    layout: str = "packed"


def structure_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose parameters and buffers live on the meta device."""
    memo = {}
    for t in itertools.chain(model.parameters(), model.buffers()):
        meta = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else meta
    return copy.deepcopy(model, memo)


def prune(model: nn.Module, plan: PruningPlan, fold: bool = True, layout: str = DEFAULT_V_LAYOUT) -> nn.Module:
    """Return a new, physically smaller copy of the gated ``model`` as ``plan`` says.

    fold=True (default) multiplies each kept gate value into its weight columns, so the
    pruned model starts fine-tuning where the gated model left off. fold=False drops the
    gate values (resets them to 1), as in the VTP paper. The result has no gates, records
    the plan as ``model.vtp_plan`` (and what it was pruned from as ``model.vtp_pruned_from``)
    and keeps ``model``'s training mode and device.

    ``layout`` says how a pruned attention lays out its values (``PrunedAttention``):
    "padded" (the default, the faster on the CPU: see the README; V padded to each block's
    attention width) or "packed"; "padded_head_dim" pads V to ``head_dim`` (how models
    saved before format 3 were laid out; the same as "padded" unless ``attn_qk`` is pruned).
    """
    if not isinstance(plan, PruningPlan):
        raise TypeError(f"plan: expected a vtp.PruningPlan, got {type(plan).__name__}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {', '.join(LAYOUTS)}, got {layout!r}")
    check_supported(model)
    plan.check_model(model)
    for branch in branches(model):
        drop = getattr(branch.module(), "attn_drop", None)
        if branch.kind != "mlp" and drop is not None and drop.p > 0:
            raise ValueError(f"{branch.where}: pruned attention has no attention-probability dropout; "
                             "build the model with attn_drop_rate=0")

    pruned = copy.deepcopy(model)
    with torch.no_grad():
        for branch in list(branches(pruned)):
            effective = {site: _effective_gate(branch, site, plan, fold) for site in branch.sites}
            before = set(branch.host.modules())
            replacement = {"attn": _prune_attention, "mlp": _prune_mlp, "parallel": _prune_parallel}[
                branch.kind](branch, effective, layout)
            if replacement is not None:  # a whole block made anew
                replacement.train(branch.host.training)
                pruned.blocks[int(branch.name.split(".")[1])] = replacement
                continue
            for m in branch.host.modules():  # the modules pruning made take the block's mode
                if m not in before:
                    m.training = branch.host.training
    pruned.vtp_plan = plan
    pruned.vtp_pruned_from = PrunedFrom(dense=structure_copy(model), fold=fold, layout=layout)
    return pruned


Gate = Tuple[torch.Tensor, torch.Tensor]


def _effective_gate(branch: Branch, site: str, plan: PruningPlan, fold: bool) -> Gate:
    """The kept indices (on the CPU: the structure is decided from them, also for models on
    the meta device), and the vector the pruned weights bake in (the gate value, or 1 without
    folding, where kept; 0 where pruned)."""
    if site == QK_SITE:
        return _effective_qk(branch, plan, fold)
    parent, attr = site_linears(branch, site)[0]
    linear = getattr(parent, attr)
    w = linear.weight
    if not isinstance(linear, GatedLinear) or linear.gate is None:
        return torch.arange(linear.in_features), torch.ones(linear.in_features, dtype=w.dtype, device=w.device)
    kept = torch.tensor(plan.kept[branch.gate_name(site)], dtype=torch.long)
    values = linear.gate.detach().to(w.dtype) if fold else torch.ones(linear.in_features, dtype=w.dtype,
                                                                     device=w.device)
    effective = torch.zeros_like(values)
    effective[kept.to(w.device)] = values[kept.to(w.device)]
    return kept, effective


def _effective_qk(branch: Branch, plan: PruningPlan, fold: bool) -> Gate:
    """An ``attn_qk`` gate per query/key dim (``heads * head_dim``): the kept dims and the
    vector the pruned keys bake in, a RoPE pair's one value on both of its dims."""
    layout = qk_layout(branch)
    ref = branch.module().proj.weight if branch.kind == "attn" else branch.module().attn_out_proj.weight
    unit_of = torch.tensor(layout.dim_to_unit(), dtype=torch.long)
    n = unit_of.numel()
    holder = qk_gate_holder(branch)
    if holder is None:
        return torch.arange(n), torch.ones(n, dtype=ref.dtype, device=ref.device)
    kept_units = torch.zeros(layout.size, dtype=torch.bool)
    kept_units[torch.tensor(plan.kept[branch.gate_name(QK_SITE)], dtype=torch.long)] = True
    kept = torch.nonzero(kept_units[unit_of]).flatten()
    values = holder.qk_gate.detach().to(ref.dtype)[unit_of.to(ref.device)] if fold else \
        torch.ones(n, dtype=ref.dtype, device=ref.device)
    effective = torch.zeros_like(values)
    effective[kept.to(ref.device)] = values[kept.to(ref.device)]
    return kept, effective


def _qk_slots(layout: QKLayout, kept_dims: torch.Tensor, live: List[int]) -> List[List[int]]:
    """Each live head's query/key slots (``QKLayout.slots``), as wide as the widest head."""
    unit_of = layout.dim_to_unit()
    units = {h: sorted({unit_of[d] - h * layout.units_per_head for d in kept_dims.tolist()
                        if d // layout.head_dim == h}) for h in live}
    per_unit = layout.head_dim // layout.units_per_head
    width = max((len(units[h]) * per_unit for h in live), default=0)
    return [layout.slots(units[h], width) for h in live]


def _slot_rows(live: List[int], slots: List[List[int]], head_dim: int) -> torch.Tensor:
    """Dense projection row of each query (key) slot; -1 for a zero slot."""
    return torch.tensor([h * head_dim + d if d >= 0 else -1 for h, row in zip(live, slots) for d in row],
                        dtype=torch.long)


def _take_rows(t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``t[rows]`` with a zero row (or entry) wherever ``rows`` is -1."""
    rows = rows.to(t.device)
    keep = (rows >= 0).to(t.dtype).view(-1, *([1] * (t.dim() - 1)))
    return t[rows.clamp(min=0)] * keep


def needs_full_qk(core: nn.Module, norm_slot: bool) -> bool:
    """Whether the queries and keys must be computed at full width: a q/k norm takes its
    statistics over every dim, SAM's decomposed position bias reads every query dim."""
    if norm_slot or not isinstance(getattr(core, "q_norm", nn.Identity()), nn.Identity):
        return True
    return isinstance(core, SamAttention) and bool(core.use_rel_pos)


def _linear(weight: torch.Tensor, bias: Optional[torch.Tensor], in_index: Optional[torch.Tensor] = None,
            full_width: int = 0) -> nn.Linear:
    """A plain linear layer holding these weights; with ``in_index``, one that reads only
    those columns of a ``full_width`` input."""
    dd = {"device": weight.device, "dtype": weight.dtype}
    if in_index is None:
        layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, **dd)
    else:
        layer = IndexedLinear(weight.shape[1], weight.shape[0], in_index, full_width, bias=bias is not None, **dd)
    layer.weight.copy_(weight)
    if bias is not None:
        layer.bias.copy_(bias)
    return layer


def _narrow_input(branch: Branch, gate: Gate, width: int) -> Optional[torch.Tensor]:
    """Make the branch input carry only the kept columns. A pre-norm emits them; without
    one, the reading linears must gather them: their ``in_index`` is returned (None when
    nothing is pruned or the norm gathers)."""
    kept, _ = gate
    if kept.numel() == width:
        return None
    if branch.norm is not None:
        setattr(branch.host, branch.norm, kept_norm(getattr(branch.host, branch.norm), kept))
        return None
    return kept


def _scaled_columns(weight: torch.Tensor, gate: Gate) -> torch.Tensor:
    kept, g = gate
    kept = kept.to(weight.device)
    return weight[:, kept] * g[kept]


def _make_constant(branch: Branch, value: torch.Tensor) -> None:
    """Replace the branch's core by its fixed output; the norm in front becomes an identity,
    a post-norm and a layer-scale module are folded into the value (a layer-scale
    Parameter, which its block multiplies in, stays)."""
    host = branch.host
    value = value.view(1, 1, -1)
    if branch.post_norm is not None:
        value = getattr(host, branch.post_norm)(value)
        setattr(host, branch.post_norm, nn.Identity())
    if branch.scale is not None and isinstance(getattr(host, branch.scale), nn.Module):
        value = getattr(host, branch.scale)(value.clone())
        setattr(host, branch.scale, nn.Identity())
    if branch.norm is not None:
        setattr(host, branch.norm, nn.Identity())
    setattr(host, branch.core, ConstantBranch(value.flatten()))


# ---------------------------------------------------------------------------------------------
# MLP branches


def _prune_mlp(branch: Branch, gates: Dict[str, Gate], layout: str) -> None:
    mlp = branch.module()
    (kept_in, _), (kept_hidden, g_hidden) = gates["mlp_in"], gates["mlp_hidden"]
    fc2 = mlp.fc2
    inputs = site_linears(branch, "mlp_in")
    width = getattr(*inputs[0]).in_features
    if kept_in.numel() == 0 or kept_hidden.numel() == 0:
        # fc1 sees zeros (or fc2 keeps no hidden feature): the output is fixed by the biases.
        frozen = copy.deepcopy(mlp).eval()
        frozen.fc2 = _linear(fc2.weight * g_hidden, fc2.bias)
        _make_constant(branch, frozen(fc2.weight.new_zeros(1, width)).flatten())
        return

    in_index = _narrow_input(branch, gates["mlp_in"], width)
    hidden = fc2.in_features
    hidden_norm = not isinstance(mlp.norm, nn.Identity)
    # A norm over the hidden features needs all of them for its statistics.
    rows = torch.arange(hidden) if hidden_norm else kept_hidden
    if isinstance(mlp, GluMlp):
        rows = torch.cat([rows, rows + hidden])  # value and gate halves go together
    for parent, attr in inputs:
        layer = getattr(parent, attr)
        r = rows.to(layer.weight.device)
        setattr(parent, attr, _linear(_scaled_columns(layer.weight[r], gates["mlp_in"]),
                                      layer.bias[r] if layer.bias is not None else None, in_index, width))
    if hidden_norm and kept_hidden.numel() < hidden:
        mlp.norm = kept_norm(mlp.norm, kept_hidden)
    mlp.fc2 = _linear(_scaled_columns(fc2.weight, gates["mlp_hidden"]), fc2.bias)


# ---------------------------------------------------------------------------------------------
# Attention branches


@dataclass
class _AttentionParts:
    """A timm attention module taken apart: per-head projections, biases and options."""
    heads: int
    head_dim: int
    weights: Tuple[torch.Tensor, torch.Tensor, torch.Tensor]             # q, k, v: [heads * head_dim, in]
    biases: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    gate: Optional[nn.Linear]
    norm: nn.Module
    proj: nn.Linear
    rope_prefix_tokens: Optional[int]
    rotate_half: bool
    rope_module: Optional[nn.Module]


def _attention_parts(attn: nn.Module) -> _AttentionParts:
    heads, head_dim = attn.num_heads, attention_head_dim(attn)
    dim = heads * head_dim
    if getattr(attn, "qkv", None) is not None:
        w = attn.qkv.weight
        weights = (w[:dim], w[dim:2 * dim], w[2 * dim:])
        b = attn.qkv.bias
        if b is not None:
            biases = (b[:dim], b[dim:2 * dim], b[2 * dim:])
        elif getattr(attn, "q_bias", None) is not None:  # EVA and BEiT: no key bias
            biases = (attn.q_bias, torch.zeros_like(attn.q_bias), attn.v_bias)
        else:
            biases = None
    else:
        projs = (attn.q_proj, attn.k_proj, attn.v_proj)
        weights = tuple(p.weight for p in projs)
        if any(p.bias is not None for p in projs):
            biases = tuple(p.bias if p.bias is not None else p.weight.new_zeros(dim) for p in projs)
        else:
            biases = None
    rope_prefix, rope_module = None, None
    if hasattr(attn, "rotate_half"):  # EvaAttention, AttentionRope: RoPE comes with the call
        rope_prefix = attn.num_prefix_tokens
    if isinstance(attn, SamAttention) and attn.rope is not None:
        rope_prefix, rope_module = 0, attn.rope
    gate = attn.gate if isinstance(getattr(attn, "gate", None), nn.Linear) else None
    return _AttentionParts(heads, head_dim, weights, biases, gate, getattr(attn, "norm", nn.Identity()),
                           attn.proj, rope_prefix, bool(getattr(attn, "rotate_half", False)), rope_module)


def _position_bias(attn: nn.Module, kept_heads: List[int]) -> Optional[nn.Module]:
    """The kept heads' part of the attention's own position bias, if it has one."""
    if isinstance(attn, RelPosAttention) and attn.rel_pos is not None:
        return HeadsOfPositionBias(attn.rel_pos, kept_heads)
    if isinstance(attn, BeitAttention) and attn.relative_position_bias_table is not None:
        table = attn.relative_position_bias_table
        return TablePositionBias(table[:, torch.tensor(kept_heads, device=table.device)],
                                 attn.relative_position_index)
    if isinstance(attn, SamAttention) and attn.use_rel_pos:
        return DecomposedPositionBias(attn.rel_pos_h, attn.rel_pos_w)
    return None


def _constant_attention(parts: _AttentionParts, g_in: torch.Tensor, g_out: torch.Tensor) -> torch.Tensor:
    """Every value equal (no input dim left: V is its bias) makes every head output that
    value, whatever the weights of softmax; with no value dim left proj sees zeros."""
    dim = parts.heads * parts.head_dim
    w = parts.proj.weight
    out = parts.biases[2] if parts.biases is not None else w.new_zeros(dim)
    out = parts.norm(out.view(1, 1, -1)).flatten()
    if parts.gate is not None:
        gate_in = w.new_zeros(1, parts.gate.in_features)
        out = out * F.linear(gate_in * g_in, parts.gate.weight, parts.gate.bias).sigmoid().flatten()
    return F.linear(out * g_out, w, parts.proj.bias)


def _live_heads(kept_values: torch.Tensor, heads: int, head_dim: int):
    """The heads with a kept value dim, their kept widths, and the Q (or K) rows they keep."""
    counts = torch.bincount(kept_values // head_dim, minlength=heads).tolist()
    live = [h for h in range(heads) if counts[h] > 0]
    rows = torch.tensor([h * head_dim + j for h in live for j in range(head_dim)], dtype=torch.long)
    return live, [counts[h] for h in live], rows


def _laid_out(module: nn.Module, packed: torch.Tensor) -> torch.Tensor:
    """Rows of the packed value dims as ``module``'s V layout holds them (padded: at their
    place in their head's ``v_head_width`` rows, zero rows between)."""
    if module.v_layout == "packed":
        return packed
    out = packed.new_zeros((module.v_rows,) + tuple(packed.shape[1:]))
    out[module.value_rows().to(packed.device)] = packed
    return out


class _QKPlan:
    """The query/key side of a pruned attention: each live head's slots, the dense rows
    they take, and where the folded ``attn_qk`` gate goes (the key rows, or ``qk_scale``
    where the rows are computed in full)."""

    def __init__(self, branch: Branch, live: List[int], kept: torch.Tensor, effective: torch.Tensor,
                 full_rows: bool, dense_rows: torch.Tensor):
        layout = qk_layout(branch)
        self.slots = _qk_slots(layout, kept, live)
        self.full_rows = full_rows
        self.effective = effective
        self.slot_rows = _slot_rows(live, self.slots, layout.head_dim)
        pruned = self.slots != [list(range(layout.head_dim))] * len(live)
        self.rows = dense_rows if full_rows or not pruned else self.slot_rows

    def queries(self, t: torch.Tensor) -> torch.Tensor:
        return _take_rows(t, self.rows)

    def keys(self, t: torch.Tensor) -> torch.Tensor:
        if self.full_rows:
            return _take_rows(t, self.rows)
        rows = self.rows.to(t.device)
        scale = _take_rows(self.effective, rows).to(t.dtype)
        return _take_rows(t, rows) * scale.view(-1, *([1] * (t.dim() - 1)))

    def fill_scale(self, module: nn.Module) -> None:
        if module.qk_scale is not None:
            module.qk_scale.copy_(_take_rows(self.effective, self.slot_rows).view_as(module.qk_scale))


def _prune_attention(branch: Branch, gates: Dict[str, Gate], layout: str) -> None:
    attn = branch.module()
    parts = _attention_parts(attn)
    (kept_in, g_in), (kept_out, g_out) = gates["attn_in"], gates["attn_out"]
    dim, head_dim = parts.heads * parts.head_dim, parts.head_dim
    if kept_in.numel() == 0 or kept_out.numel() == 0:
        _make_constant(branch, _constant_attention(parts, g_in, g_out))
        return

    width = parts.weights[0].shape[1]
    in_index = _narrow_input(branch, gates["attn_in"], width)
    kept_qk, g_qk = gates[QK_SITE]
    qk_holder = qk_gate_holder(branch)
    norm_slot = qk_holder is not None and qk_slot(branch)[2] is None
    k_norm = qk_holder.norm if norm_slot else getattr(attn, "k_norm", None)
    if kept_in.numel() == width and kept_out.numel() == dim and kept_qk.numel() == dim and not norm_slot:
        # Nothing pruned: fold the gates into the weights (attn_qk: the key rows) and keep
        # timm's module.
        for name in attention_input_names(attn):
            layer = getattr(attn, name)
            rows = {"qkv": torch.cat([torch.ones_like(g_qk[:dim]), g_qk, torch.ones_like(g_qk[:dim])]),
                    "k_proj": g_qk}.get(name, torch.ones_like(layer.weight[:, 0]))
            bias = layer.bias * rows if layer.bias is not None else None
            setattr(attn, name, _linear(_scaled_columns(layer.weight, gates["attn_in"]) * rows[:, None], bias))
        attn.proj = _linear(_scaled_columns(attn.proj.weight, gates["attn_out"]), attn.proj.bias)
        return

    output_norm = not isinstance(parts.norm, nn.Identity)
    if output_norm:
        # The norm over the attention output needs every value dim for its statistics.
        v_rows = torch.arange(dim)
        live, widths, qk_rows = _live_heads(v_rows, parts.heads, head_dim)
        norm = kept_norm(parts.norm, kept_out) if kept_out.numel() < dim else parts.norm
    else:
        v_rows, norm = kept_out, None
        live, widths, qk_rows = _live_heads(kept_out, parts.heads, head_dim)
    device = parts.proj.weight.device
    v_rows = v_rows.to(device)
    qk = _QKPlan(branch, live, kept_qk, g_qk, needs_full_qk(attn, norm_slot) and qk_holder is not None, qk_rows)
    new = PrunedAttention(
        width if in_index is not None else kept_in.numel(), parts.proj.out_features, head_dim, widths,
        qkv_bias=parts.biases is not None, proj_bias=parts.proj.bias is not None, q_norm=getattr(attn, "q_norm", None),
        k_norm=k_norm, proj_drop=attn.proj_drop.p, scale=attn.scale,
        rope_prefix_tokens=parts.rope_prefix_tokens, rotate_half=parts.rotate_half,
        rope_module=parts.rope_module, position_bias=_position_bias(attn, live), norm=norm,
        gated=parts.gate is not None, gate_bias=parts.gate is not None and parts.gate.bias is not None,
        in_index=in_index, kept_heads=live, dense_heads=parts.heads,
        **_module_layout("packed" if output_norm else layout, head_dim),
        qk_slots=qk.slots, qk_full_rows=qk.full_rows, device=device, dtype=parts.proj.weight.dtype)
    qk.fill_scale(new)
    (wq, wk, wv) = parts.weights
    w_qkv = torch.cat([qk.queries(wq), qk.keys(wk), _laid_out(new, wv[v_rows])])
    new.qkv.weight.copy_(_scaled_columns(w_qkv, gates["attn_in"]))
    if parts.biases is not None:
        bq, bk, bv = parts.biases
        new.qkv.bias.copy_(torch.cat([qk.queries(bq), qk.keys(bk), _laid_out(new, bv[v_rows])]))
    if parts.gate is not None:
        rows = kept_out.to(device)
        new.gate.weight.copy_(_scaled_columns(parts.gate.weight[rows], gates["attn_in"]))
        if parts.gate.bias is not None:
            new.gate.bias.copy_(parts.gate.bias[rows])
    new.proj.weight.copy_(_scaled_columns(parts.proj.weight, gates["attn_out"]))
    if parts.proj.bias is not None:
        new.proj.bias.copy_(parts.proj.bias)
    setattr(branch.host, branch.core, new)


# ---------------------------------------------------------------------------------------------
# Parallel (fused input projection) branches


def _prune_parallel(branch: Branch, gates: Dict[str, Gate], layout: str) -> nn.Module:
    """A ParallelScalingBlock becomes a PrunedParallelBlock (returned: it replaces the block)."""
    block = branch.host
    (kept_in, g_in), (kept_out, g_out), (kept_hidden, g_hidden) = (
        gates["attn_in"], gates["attn_out"], gates["mlp_hidden"])
    hidden, dim = block.in_split[0], block.in_split[1]
    heads, head_dim = block.num_heads, block.head_dim
    w, b = block.in_proj.weight, block.in_proj.bias
    device = w.device
    if kept_in.numel() == 0:
        kept_out = kept_hidden = kept_in  # the input feeds nothing: every part is its bias
    live, widths, qk = _live_heads(kept_out, heads, head_dim)
    qk_holder = qk_gate_holder(branch)
    norm_slot = qk_holder is not None and qk_slot(branch)[2] is None
    k_norm = qk_holder.norm if norm_slot else block.k_norm
    kept_qk, g_qk = gates[QK_SITE]
    qk_plan = _QKPlan(branch, live, kept_qk, g_qk, needs_full_qk(block, norm_slot) and qk_holder is not None, qk)
    width = w.shape[1]
    narrowed = 0 < kept_in.numel() < width
    new = PrunedParallelBlock(
        block.attn_out_proj.out_features, kept_in.numel() if narrowed else width, head_dim,
        widths, kept_hidden.numel(),
        kept_norm(block.in_norm, kept_in) if narrowed else block.in_norm, b is not None,
        block.mlp_bias is not None, block.attn_out_proj.bias is not None, block.q_norm, k_norm,
        block.mlp_act, block.mlp_drop.p, block.ls, block.drop_path, block.scale, **_module_layout(layout, head_dim),
        kept_heads=live, dense_heads=heads, qk_slots=qk_plan.slots, qk_full_rows=qk_plan.full_rows,
        device=device, dtype=w.dtype)
    qk_plan.fill_scale(new)

    def rows_of(t: torch.Tensor) -> torch.Tensor:
        return torch.cat([t[kept_hidden.to(device)], qk_plan.queries(t[hidden:hidden + dim]),
                          qk_plan.keys(t[hidden + dim:hidden + 2 * dim]),
                          _laid_out(new, t[(hidden + 2 * dim + kept_out).to(device)])])

    new.in_proj.weight.copy_(_scaled_columns(rows_of(w), gates["attn_in"]) if narrowed else rows_of(w) * g_in)
    if b is not None:
        new.in_proj.bias.copy_(rows_of(b))
    if new.mlp_bias is not None:
        new.mlp_bias.copy_(block.mlp_bias[kept_hidden.to(device)])
    constant = torch.zeros_like(new.constant)
    if kept_in.numel() == 0:
        # V is its bias, so attention outputs it; the MLP sees its bias through the activation.
        mlp_in = b[:hidden] if b is not None else block.mlp_bias
        v = b[hidden + 2 * dim:] if b is not None else w.new_zeros(dim)
        constant += F.linear(block.mlp_act(mlp_in) * g_hidden, block.mlp_out_proj.weight)
        constant += F.linear(v * g_out, block.attn_out_proj.weight)
    for proj, kept, gate, part in ((block.attn_out_proj, kept_out, gates["attn_out"], new.attn_out_proj),
                                   (block.mlp_out_proj, kept_hidden, gates["mlp_hidden"], new.mlp_out_proj)):
        if part is None:
            constant += proj.bias if proj.bias is not None else 0
            continue
        part.weight.copy_(_scaled_columns(proj.weight, (kept, gate[1])))
        if proj.bias is not None:
            part.bias.copy_(proj.bias)
    new.constant.copy_(constant)
    return new
