"""The MACs of a pruned model counted from its plan, without pruning it.

``vtp.profile(vtp.prune(model, plan)).macs`` is a sum over modules; pruning changes only the
residual branches of the blocks, and each branch's MACs are a closed form of its sites' kept
widths (and, for attention, of each head's kept value and query/key widths). ``MacCounter``
reads what the forms need once per model (the token count each linear sees, the token
pairs of each attention call, from one forward pass on the meta device) and then counts a
candidate plan in microseconds, so the FLOPs planner can try dozens of them.

What the forms mirror (vtp/_prune.py, vtp/modules.py, vtp/_profile.py):

* attention: the fused q/k/v projection reads the kept inputs and emits, per live head (a
  head with a kept value dim), its query and key rows (all ``head_dim`` of them, or only its
  kept query/key dims where ``attn_qk`` is pruned and no q/k norm needs every dim) and its
  kept value rows (all of them under an output norm); ``Q K^T`` counts the kept query/key
  widths, ``P V`` the value rows; a gated attention's gate and ``proj`` read and give the
  kept value dims;
* MLP: fc1 (both GLU halves, a SwiGLU's two linears) reads the kept inputs and gives the
  kept hidden features (all of them under a hidden norm), fc2 reads the kept ones;
* fused parallel block: one input projection for MLP hidden, queries, keys and values;
* a branch with no kept input, hidden feature or value dim is a constant: no MACs.

What a branch computes that no plan changes (the MLP of a relative-position bias) is the
dense branch's profile less the form at full width, kept while the branch lives.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Sequence

import torch
import torch.nn as nn
from timm.models.vision_transformer import ParallelScalingBlock

from .architectures import ATTENTIONS, QK_SITE, Branch, attention_head_dim, branches, qk_layout, qk_slot, site_linears
from ._gates import qk_gate_holder
from ._profile import attention_dims, check_img_size, default_img_size, input_channels, size_pair
from ._prune import needs_full_qk, structure_copy

__all__ = ["MacCounter"]


@dataclass
class _BranchForm:
    """What one branch's closed form needs: its structure and its measured shapes."""
    branch: Branch
    kind: str
    width: int                 # input width of the branch's first linear(s)
    out: int                   # output width of the branch
    rows: int = 0              # tokens (per image) each linear of the branch sees
    pairs: int = 0             # query-key pairs per image of the attention call(s)
    dense_macs: int = 0        # the dense branch's profile
    rest: int = 0              # MACs no plan changes while the branch lives
    heads: int = 0
    head_dim: int = 0
    hidden: int = 0            # MLP / parallel hidden width
    fc1_factor: int = 1        # fc1 output rows per hidden feature (2 for a GLU or SwiGLU)
    hidden_norm: bool = False  # a norm over the MLP hidden features
    output_norm: bool = False  # a norm over the attention output
    qk_gated: bool = False
    qk_full_rows: bool = False
    qk_dims_per_unit: int = 1
    qk_units_per_head: int = 0


class MacCounter:
    """``counter(kept)``: the MACs per image of ``model`` pruned to ``kept`` (gate name ->
    kept indices), equal to ``vtp.profile(vtp.prune(model, plan), img_size).macs``.
    Building it runs the model once on the meta device (no weights, no arithmetic)."""

    def __init__(self, model: nn.Module, img_size=None):
        self.img_size = size_pair(img_size) if img_size is not None else default_img_size(model)
        check_img_size(model, self.img_size)
        meta = structure_copy(model)
        self.forms = [_form(b) for b in branches(meta)]
        self.dense = self._measure(meta)
        for form in self.forms:
            form.rest = form.dense_macs - _branch_macs(form, {})
        self.fixed = self.dense - sum(f.dense_macs for f in self.forms)

    def _measure(self, meta: nn.Module) -> int:
        """The dense model's MACs as ``vtp.profile`` counts them (the same modules, the same
        rules) and per branch: the rows its first linear sees, the attention's token pairs
        and the MACs of its modules."""
        owner = {}
        for form in self.forms:
            for m in form.branch.module().modules():
                owner[m] = form
        firsts = {getattr(*site_linears(f.branch, "attn_in" if f.kind != "mlp" else "mlp_in")[0])
                  for f in self.forms}
        total = [0]

        def hook(m, inputs, output):
            form = owner.get(m)
            x = inputs[0]
            if isinstance(m, nn.Linear):
                rows = x.numel() // m.in_features
                macs = rows * m.in_features * m.out_features
                if m in firsts:
                    form.rows = rows
            elif isinstance(m, nn.Conv2d):
                macs = output.numel() * m.kernel_size[0] * m.kernel_size[1] * m.in_channels // m.groups
            else:
                tokens = x[0, ..., 0].numel()
                pairs = x.shape[0] * tokens * tokens
                qk, v = attention_dims(m)
                macs = pairs * (qk + v)
                if form is not None:
                    form.pairs += pairs
            total[0] += macs
            if form is not None:
                form.dense_macs += macs

        handles = [m.register_forward_hook(hook) for m in meta.modules()
                   if isinstance(m, (nn.Linear, nn.Conv2d) + ATTENTIONS + (ParallelScalingBlock,))]
        ref = next(meta.parameters())
        x = torch.zeros(1, input_channels(meta), *self.img_size, device=ref.device, dtype=ref.dtype)
        try:
            meta.eval()
            with torch.no_grad():
                meta(x)
        finally:
            for h in handles:
                h.remove()
        return total[0]

    def __call__(self, kept: Dict[str, Sequence[int]]) -> int:
        return self.fixed + sum(_branch_macs(f, kept) for f in self.forms)


def _form(branch: Branch) -> _BranchForm:
    core = branch.module()
    if branch.kind == "mlp":
        inputs = [getattr(*p) for p in site_linears(branch, "mlp_in")]
        hidden = core.fc2.in_features
        return _BranchForm(branch, "mlp", inputs[0].in_features, core.fc2.out_features, hidden=hidden,
                           fc1_factor=sum(l.out_features for l in inputs) // hidden,
                           hidden_norm=not isinstance(core.norm, nn.Identity))
    first = getattr(*site_linears(branch, "attn_in")[0])
    holder = qk_gate_holder(branch)
    norm_slot = holder is not None and qk_slot(branch)[2] is None
    layout = qk_layout(branch)
    form = _BranchForm(branch, branch.kind, first.in_features, 0, heads=core.num_heads,
                       head_dim=attention_head_dim(core), qk_gated=holder is not None,
                       qk_full_rows=holder is not None and needs_full_qk(core, norm_slot),
                       qk_dims_per_unit=layout.head_dim // layout.units_per_head,
                       qk_units_per_head=layout.units_per_head)
    if branch.kind == "parallel":
        form.hidden = core.in_split[0]
        form.out = core.attn_out_proj.out_features
    else:
        form.out = core.proj.out_features
        form.output_norm = not isinstance(getattr(core, "norm", nn.Identity()), nn.Identity)
    return form


def _kept_count(form: _BranchForm, kept, site: str, size: int) -> int:
    name = form.branch.gate_name(site)
    return len(kept[name]) if name in kept else size


def _attention_widths(form: _BranchForm, kept):
    """(kept value dims, value rows, query/key rows per projection side, kept query/key
    dims in ``Q K^T``) of an attention."""
    heads, head_dim = form.heads, form.head_dim
    dim = heads * head_dim
    name = form.branch.gate_name("attn_out")
    if name in kept:
        per_head = [0] * heads
        for i in kept[name]:
            per_head[i // head_dim] += 1
    else:
        per_head = [head_dim] * heads
    v_kept = sum(per_head)
    live = list(range(heads)) if form.output_norm and v_kept else [h for h in range(heads) if per_head[h]]
    v_rows = dim if form.output_norm and v_kept else v_kept
    qk_name = form.branch.gate_name(QK_SITE)
    if form.qk_gated and qk_name in kept:
        units = [0] * heads
        for u in kept[qk_name]:
            units[u // form.qk_units_per_head] += 1
        widths = [units[h] * form.qk_dims_per_unit for h in live]
    else:
        widths = [head_dim] * len(live)
    qk_kept = sum(widths)
    pruned = any(w != head_dim for w in widths)
    qk_rows = len(live) * head_dim if form.qk_full_rows or not pruned else qk_kept
    return v_kept, v_rows, qk_rows, qk_kept


def _branch_macs(form: _BranchForm, kept) -> int:
    """The branch's MACs per image when pruned to ``kept`` (empty: dense)."""
    n_in = _kept_count(form, kept, "mlp_in" if form.kind == "mlp" else "attn_in", form.width)
    if form.kind == "mlp":
        n_hidden = _kept_count(form, kept, "mlp_hidden", form.hidden)
        if n_in == 0 or n_hidden == 0:
            return 0
        fc1_rows = form.hidden if form.hidden_norm else n_hidden
        return form.rest + form.rows * (n_in * fc1_rows * form.fc1_factor + n_hidden * form.out)
    if n_in == 0:
        return 0
    v_kept, v_rows, qk_rows, qk_kept = _attention_widths(form, kept)
    if form.kind == "parallel":
        n_hidden = _kept_count(form, kept, "mlp_hidden", form.hidden)
        return (form.rest + form.rows * (n_in * (n_hidden + 2 * qk_rows + v_rows) + (v_kept + n_hidden) * form.out)
                + form.pairs * (qk_kept + v_rows))
    if v_kept == 0:
        return 0
    gate = v_kept if isinstance(getattr(form.branch.module(), "gate", None), nn.Linear) else 0
    return (form.rest + form.rows * (n_in * (2 * qk_rows + v_rows + gate) + v_kept * form.out)
            + form.pairs * (qk_kept + v_rows))
