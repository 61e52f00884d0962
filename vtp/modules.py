"""The nn.Modules VTP puts into a timm ViT.

``GatedLinear`` is what sparse training runs. What pruning leaves behind:

* ``KeptLayerNorm`` / ``KeptRmsNorm``: a norm over the full width that emits only the kept
  columns (in front of a pruned qkv or fc1, or over a pruned hidden or attention output);
* ``IndexedLinear``: a linear that reads only the kept columns of its input, where no norm
  sits in front of it to gather them (post-norm blocks);
* ``PrunedAttention``: attention whose heads keep different numbers of value dims, with
  the options of timm's attention modules (q/k norms, RoPE, position biases, an output gate;
  the kept heads' bookkeeping, shared with ``PrunedParallelBlock``, is in kept_heads.py);
* ``ConstantBranch``: a residual branch that no longer depends on its input.

Modules keep the attribute names of the timm modules they replace (``qkv``, ``proj``,
``weight``, ...) so state_dict keys stay close to timm's. The arithmetic of the gated
linear, the gathering LayerNorm and the packed attention goes through ``vtp_kernels``,
whose backend switch picks Triton or PyTorch.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import RmsNorm, apply_rot_embed_cat

import vtp_kernels

from .kept_heads import V_LAYOUTS, _KeptHeads
from .position_biases import DecomposedPositionBias, HeadsOfPositionBias, TablePositionBias

__all__ = ["V_LAYOUTS", "GatedLinear", "GatedHeadNorm", "KeptLayerNorm", "KeptRmsNorm", "IndexedLinear", "PrunedAttention",
           "PrunedParallelBlock", "ConstantBranch", "HeadsOfPositionBias", "TablePositionBias", "DecomposedPositionBias"]


class _NotScriptable:
    """torch.jit.script cannot compile the backend switch of vtp_kernels; say what works."""

    def __prepare_scriptable__(self):
        raise RuntimeError(f"{type(self).__name__}: VTP's modules do not support torch.jit.script; use "
                           "torch.export (vtp export --format pt2), torch.onnx (vtp export --format onnx), "
                           "torch.jit.trace or torch.compile")


class GatedLinear(_NotScriptable, nn.Linear):
    """``nn.Linear`` with a learnable score per input dimension: ``y = (x * gate) W^T + b``.

    A drop-in replacement for ``nn.Linear``: same constructor, same ``weight``/``bias``
    keys, plus ``gate`` (shape ``[in_features]``, initialised to 1). Works on inputs
    with any leading dims.

    It may also hold the ``attn_qk`` gate of the attention whose projection it is:
    ``qk_gate`` scales the key rows ``[qk_offset, qk_offset + len(qk_rows))`` of the output
    (weights and bias: N*K work, not M*N), value ``qk_rows[r]`` scaling row ``qk_offset + r``
    (one value serves both rows of a RoPE pair). A linear holding only that gate has
    ``gate = None``: its input is not gated.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None,
                 input_gate: bool = True):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.gate = nn.Parameter(torch.ones(in_features, device=device, dtype=dtype)) if input_gate else None
        self.register_parameter("qk_gate", None)
        self.qk_offset = 0
        self.register_buffer("qk_rows", None, persistent=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, gate: Optional[nn.Parameter] = None,
                    input_gate: bool = True) -> "GatedLinear":
        """Wrap an existing ``nn.Linear``; its weight and bias Parameters are reused, not copied.

        ``gate`` shares an existing gate Parameter (several linears reading the same input,
        such as separate q, k and v projections, are scored by one gate). A ``GatedLinear``
        given here keeps its ``attn_qk`` gate and gains the input gate."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear: expected an nn.Linear, got {type(linear).__name__}")
        if gate is not None and gate.shape != (linear.in_features,):
            raise ValueError(f"gate: expected shape [{linear.in_features}], got {list(gate.shape)}")
        if isinstance(linear, GatedLinear):
            gated = linear
        else:
            gated = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
            gated.weight = linear.weight
            gated.bias = linear.bias
            gated.train(linear.training)
        if input_gate:
            gated.gate = gate if gate is not None else nn.Parameter(
                torch.ones(linear.in_features, device=linear.weight.device, dtype=linear.weight.dtype))
        elif gated is not linear:
            gated.gate = None
        return gated

    def add_qk_gate(self, offset: int, units: int, rows: Sequence[int]) -> nn.Parameter:
        """Give this projection an ``attn_qk`` gate of ``units`` values (at 1) scaling its
        rows ``offset + r`` by value ``rows[r]``; returns the gate."""
        if offset < 0 or offset + len(rows) > self.out_features:
            raise ValueError(f"offset: rows [{offset}, {offset + len(rows)}) exceed {self.out_features} outputs")
        w = self.weight
        self.qk_gate = nn.Parameter(torch.ones(units, device=w.device, dtype=w.dtype))
        self.qk_offset = int(offset)
        self.register_buffer("qk_rows", torch.tensor(list(rows), dtype=torch.long, device=w.device),
                             persistent=False)
        return self.qk_gate

    def _row_scaled(self) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        a = self.qk_gate.index_select(0, self.qk_rows)
        before, after = self.qk_offset, self.out_features - self.qk_offset - a.numel()
        scale = torch.cat([a.new_ones(before), a, a.new_ones(after)])
        return self.weight * scale[:, None], (self.bias * scale if self.bias is not None else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self._row_scaled() if self.qk_gate is not None else (self.weight, self.bias)
        if self.gate is None:
            return F.linear(x, weight, bias)
        return vtp_kernels.gated_linear(x, weight, self.gate, bias)


class GatedHeadNorm(_NotScriptable, nn.Module):
    """A per-head key norm followed by the ``attn_qk`` gate: ``norm(k) * a`` with one value
    of ``a`` per key dim of each head (``qk_gate[index]``: one value may serve a RoPE pair).

    ``heads_first``: keys come as ``[B, heads, N, head_dim]`` (else ``[B, N, heads, head_dim]``,
    as timm's ParallelScalingBlock normalises them)."""

    def __init__(self, norm: nn.Module, heads: int, head_dim: int, units: int, index: Sequence[int],
                 heads_first: bool = True, device=None, dtype=None):
        super().__init__()
        if len(index) != heads * head_dim or min(index) < 0 or max(index) >= units:
            raise ValueError(f"index: expected {heads * head_dim} gate positions in [0, {units})")
        self.norm = norm
        self.heads, self.head_dim, self.heads_first = heads, head_dim, heads_first
        self.qk_gate = nn.Parameter(torch.ones(units, device=device, dtype=dtype))
        self.register_buffer("qk_index", torch.tensor(list(index), dtype=torch.long, device=device),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.qk_gate.index_select(0, self.qk_index)
        a = a.view(self.heads, 1, self.head_dim) if self.heads_first else a.view(self.heads, self.head_dim)
        return self.norm(x) * a

    def extra_repr(self) -> str:
        return f"heads={self.heads}, head_dim={self.head_dim}, gate of {self.qk_gate.numel()}"


def _check_index(index: torch.Tensor, dim: int) -> torch.Tensor:
    index = torch.as_tensor(index, dtype=torch.long).flatten()
    if index.numel() and index.device.type != "meta" and (int(index.min()) < 0 or int(index.max()) >= dim):
        raise ValueError(f"index: expected values in [0, {dim}), got range "
                         f"[{int(index.min())}, {int(index.max())}]")
    return index


class _KeptNorm(_NotScriptable, nn.Module):
    """What the kept-column norms share: the full width, the kept indices, the affine
    parameters of the kept columns only."""

    def __init__(self, dim: int, index: torch.Tensor, eps: float, elementwise_affine: bool, bias: bool,
                 device=None, dtype=None):
        super().__init__()
        index = _check_index(index, dim)
        index = index.to(device) if device is not None else index
        self.dim = dim
        self.eps = eps
        self.register_buffer("index", index)
        kept = index.numel()
        self.weight = nn.Parameter(torch.ones(kept, device=device, dtype=dtype)) if elementwise_affine else None
        self.bias = nn.Parameter(torch.zeros(kept, device=device, dtype=dtype)) if elementwise_affine and bias else None

    def _copy_affine(self, norm: nn.Module) -> None:
        with torch.no_grad():
            if getattr(norm, "weight", None) is not None:
                self.weight.copy_(norm.weight[self.index])
            if getattr(norm, "bias", None) is not None:
                self.bias.copy_(norm.bias[self.index])

    def extra_repr(self) -> str:
        return f"{self.dim} -> {self.index.numel()}, eps={self.eps}"


class KeptLayerNorm(_KeptNorm):
    """A LayerNorm over all ``dim`` features that outputs only the features in ``index``.

    Statistics use the full row, as in the unpruned model; the affine parameters
    (``weight``, ``bias``) exist only for the kept features. The next linear layer
    then runs with a smaller input width.
    """

    def __init__(self, dim: int, index: torch.Tensor, eps: float = 1e-6, elementwise_affine: bool = True,
                 bias: bool = True, device=None, dtype=None):
        super().__init__(dim, index, eps, elementwise_affine, bias, device=device, dtype=dtype)

    @classmethod
    def from_layer_norm(cls, norm: nn.LayerNorm, index: torch.Tensor) -> "KeptLayerNorm":
        if not isinstance(norm, nn.LayerNorm) or len(norm.normalized_shape) != 1:
            raise TypeError(f"norm: expected a 1-D nn.LayerNorm, got {norm!r}")
        ref = norm.weight
        kept = cls(norm.normalized_shape[0], index, eps=norm.eps, elementwise_affine=norm.weight is not None,
                   bias=norm.bias is not None, device=ref.device if ref is not None else None,
                   dtype=ref.dtype if ref is not None else None)
        kept._copy_affine(norm)
        return kept

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return vtp_kernels.layer_norm_gather(x, self.index, self.weight, self.bias, self.eps)


class KeptRmsNorm(_KeptNorm):
    """An RMS norm over all ``dim`` features that outputs only the features in ``index``."""

    def __init__(self, dim: int, index: torch.Tensor, eps: float = 1e-6, elementwise_affine: bool = True,
                 device=None, dtype=None):
        super().__init__(dim, index, eps, elementwise_affine, False, device=device, dtype=dtype)

    @classmethod
    def from_rms_norm(cls, norm: nn.Module, index: torch.Tensor) -> "KeptRmsNorm":
        shape = tuple(getattr(norm, "normalized_shape", ()))
        if len(shape) != 1:
            raise TypeError(f"norm: expected a 1-D RMS norm, got {norm!r}")
        ref = getattr(norm, "weight", None)
        # eps None: torch's default for the input's dtype, as the norm itself would use
        kept = cls(shape[0], index, eps=norm.eps, elementwise_affine=ref is not None,
                   device=ref.device if ref is not None else None, dtype=ref.dtype if ref is not None else None)
        kept._copy_affine(norm)
        return kept

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.rms_norm(x, (self.dim,), None, self.eps).index_select(-1, self.index)
        return y * self.weight if self.weight is not None else y


class IndexedLinear(_NotScriptable, nn.Linear):
    """A linear layer that reads only the input columns in ``in_index``: what a pruned linear
    becomes where no norm in front of it can emit just the kept columns (post-norm blocks)."""

    def __init__(self, in_features: int, out_features: int, in_index: torch.Tensor, full_width: int,
                 bias: bool = True, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        in_index = _check_index(in_index, full_width)
        if in_index.numel() != in_features:
            raise ValueError(f"in_index: expected {in_features} columns, got {in_index.numel()}")
        self.full_width = full_width
        self.register_buffer("in_index", in_index.to(device) if device is not None else in_index)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.index_select(-1, self.in_index), self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{self.full_width} -> {super().extra_repr()}"


# ---------------------------------------------------------------------------------------------
# Attention


def _select_heads(bias: Optional[torch.Tensor], heads: torch.Tensor, dense_heads: int) -> Optional[torch.Tensor]:
    """A bias or mask over the dense model's heads, restricted to the kept ones; one that
    broadcasts over heads is left as it is."""
    if bias is None or bias.dim() < 3 or bias.shape[-3] != dense_heads or dense_heads == heads.numel():
        return bias
    return bias.index_select(-3, heads.to(bias.device))


def _additive(mask: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))


class PrunedAttention(_KeptHeads, _NotScriptable, nn.Module):
    """Multi-head self-attention whose heads keep different numbers of value dims.

    ``qkv`` emits ``[Q of every head | K of every head | V packed head by head]``:
    queries and keys keep ``qk_width`` slots per head (``qk_slots``: the full ``head_dim``
    unless ``attn_qk`` pruned some), values keep ``v_widths[h]`` dims for head ``h``.
    ``proj`` reads the packed values. The softmax scale stays the dense model's.
    Takes the call signatures of timm's attention modules: ``x`` as ``[B, N, C]`` (or
    ``[B, H, W, C]`` for SAM), and optionally ``rope``, ``attn_mask`` and a bias shared
    by all blocks (``shared_rel_pos`` / ``shared_rel_pos_bias``).

    Options, each as in the timm module it replaces:
      q_norm, k_norm      per-head norms of queries and keys
      rope_prefix_tokens  apply the ``rope`` argument (or ``rope_module.get_embed()``) to
                          queries and keys after this many prefix tokens; None: no RoPE
      rotate_half         RoPE's 'half' layout instead of the interleaved one
      position_bias       a module giving the kept heads' bias from (q, spatial size)
      norm                a norm over the attention output (timm's ``scale_norm``): values
                          then keep their full width, and the norm emits the kept dims
      gated               an output gate ``sigmoid(gate(x))`` over the kept value dims
      in_index            read only these input columns (post-norm blocks)
      v_layout            "packed": qkv emits each head's kept values side by side;
                          "padded": qkv emits ``v_head_width`` values per head, the kept
                          ones first and zero rows after them, so attention runs on V as it
                          comes (no scatter into a padded copy); the output is packed either way
      v_head_width        a padded V's rows per head; default: the wider of the query/key
                          slots and the widest head's values (``head_dim`` unless ``attn_qk``
                          narrowed the queries and keys)
      kept_heads          the dense model's index of each kept head: a shared bias or a
                          mask given over all the dense model's heads is restricted to these
      qk_slots, qk_full_rows   the query/key dims each head keeps (see ``_init_qk``)
    """

    def __init__(self, in_features: int, out_features: int, head_dim: int, v_widths: Sequence[int],
                 qkv_bias: bool = True, proj_bias: bool = True, q_norm: Optional[nn.Module] = None,
                 k_norm: Optional[nn.Module] = None, proj_drop: float = 0.0, scale: Optional[float] = None,
                 *, rope_prefix_tokens: Optional[int] = None, rotate_half: bool = False,
                 rope_module: Optional[nn.Module] = None, position_bias: Optional[nn.Module] = None,
                 norm: Optional[nn.Module] = None, gated: bool = False, gate_bias: bool = True,
                 in_index: Optional[torch.Tensor] = None,
                 kept_heads: Optional[Sequence[int]] = None, dense_heads: Optional[int] = None,
                 v_layout: str = "packed", qk_slots: Optional[Sequence[Sequence[int]]] = None,
                 qk_full_rows: bool = False, v_head_width: Optional[int] = None, device=None, dtype=None):
        super().__init__()
        v_widths = tuple(int(w) for w in v_widths)
        if not v_widths or min(v_widths) < 1:
            raise ValueError(f"v_widths: expected one positive width per kept head, got {v_widths}")
        self._init_heads(head_dim, v_widths, v_layout, kept_heads, dense_heads, device, qk_slots, qk_full_rows, dtype,
                         v_head_width)
        self.scale = head_dim ** -0.5 if scale is None else scale
        self.rope_prefix_tokens = rope_prefix_tokens
        self.rotate_half = rotate_half
        dd = {"device": device, "dtype": dtype}
        if in_index is not None:
            in_index = _check_index(in_index, in_features)
            self.register_buffer("in_index", in_index.to(device) if device is not None else in_index)
            width = in_index.numel()
        else:
            self.in_index = None
            width = in_features
        self.qkv = nn.Linear(width, 2 * self.qk_dim + self.v_rows, bias=qkv_bias, **dd)
        self.q_norm = q_norm if q_norm is not None else nn.Identity()
        self.k_norm = k_norm if k_norm is not None else nn.Identity()
        self.rope = rope_module
        self.position_bias = position_bias
        self.norm = norm if norm is not None else nn.Identity()
        out_dim = norm.index.numel() if isinstance(norm, _KeptNorm) else self.v_dim
        self.gate = nn.Linear(width, out_dim, bias=gate_bias, **dd) if gated else None
        self.proj = nn.Linear(out_dim, out_features, bias=proj_bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def _rotate(self, t: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        npt = self.rope_prefix_tokens
        rotated = apply_rot_embed_cat(t[:, :, npt:, :], rope, half=self.rotate_half)
        return torch.cat([t[:, :, :npt, :], rotated.type_as(t)], dim=2) if npt else rotated.type_as(t)

    def forward(self, x: torch.Tensor, rope: Optional[torch.Tensor] = None,
                attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False,
                shared_rel_pos: Optional[torch.Tensor] = None,
                shared_rel_pos_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        if is_causal:
            raise NotImplementedError("PrunedAttention: is_causal is not supported (ViTs attend to every token)")
        spatial = tuple(x.shape[1:3]) if x.dim() == 4 else None
        B = x.shape[0]
        x = x.reshape(B, -1, x.shape[-1])
        N = x.shape[1]
        if self.in_index is not None:
            x = x.index_select(-1, self.in_index)
        qkv = self.qkv(x)
        rows = self.qk_dim // self.num_heads
        q = qkv[..., : self.qk_dim].view(B, N, self.num_heads, rows).transpose(1, 2)
        k = qkv[..., self.qk_dim: 2 * self.qk_dim].view(B, N, self.num_heads, rows).transpose(1, 2)
        v = qkv[..., 2 * self.qk_dim:]
        q, k = self.q_norm(q), self.k_norm(k)
        if self.rope is not None:
            rope = self.rope.get_embed()
        if rope is not None and self.rope_prefix_tokens is not None:
            rope = _select_heads(rope, self.kept_heads, self.dense_heads)  # per-head RoPE (mixed)
            rope = self._rope_for_slots(rope)
            q, k = self._rotate(q, rope), self._rotate(k, rope)

        bias = None
        for term in (self.position_bias(q, spatial) if self.position_bias is not None else None,
                     shared_rel_pos, shared_rel_pos_bias, attn_mask):
            term = _additive(_select_heads(term, self.kept_heads, self.dense_heads), q.dtype)
            if term is not None:
                bias = term if bias is None else bias + term
        q, k = self._shrink_qk(q, k)
        out = self.norm(self._attend(q, k, v, bias))
        if self.gate is not None:
            out = out * self.gate(x).sigmoid()
        out = self.proj_drop(self.proj(out))
        return out.view(B, *spatial, -1) if spatial is not None else out

    def extra_repr(self) -> str:
        rope = f", rope after {self.rope_prefix_tokens} tokens" if self.rope_prefix_tokens is not None else ""
        return self._heads_repr() + rope


class PrunedParallelBlock(_KeptHeads, _NotScriptable, nn.Module):
    """timm's ``ParallelScalingBlock`` after pruning: one input projection computes the MLP's
    kept hidden features and the attention's queries, keys and packed values; the two output
    projections read what each kept. A part left with nothing (no value dim, no hidden
    feature) adds its output bias, held in ``constant``, with the layer scale applied after.

    ``x = x + drop_path(ls(attn_out_proj(attention) + mlp_out_proj(act(mlp)) + constant))``
    """

    def __init__(self, dim: int, in_features: int, head_dim: int, v_widths: Sequence[int], mlp_hidden: int,
                 in_norm: nn.Module, in_proj_bias: bool, mlp_bias: bool, proj_bias: bool,
                 q_norm: Optional[nn.Module], k_norm: Optional[nn.Module], mlp_act: nn.Module,
                 mlp_drop: float, ls: nn.Module, drop_path: nn.Module, scale: float,
                 v_layout: str = "packed", kept_heads: Optional[Sequence[int]] = None,
                 dense_heads: Optional[int] = None, qk_slots: Optional[Sequence[Sequence[int]]] = None,
                 qk_full_rows: bool = False, v_head_width: Optional[int] = None, device=None, dtype=None):
        super().__init__()
        self._init_heads(head_dim, v_widths, v_layout, kept_heads, dense_heads, device, qk_slots, qk_full_rows, dtype,
                         v_head_width)
        dd = {"device": device, "dtype": dtype}
        self.mlp_hidden = mlp_hidden
        self.scale = scale
        self.in_split = [mlp_hidden, self.qk_dim, self.qk_dim, self.v_rows]
        self.in_norm = in_norm
        self.in_proj = nn.Linear(in_features, sum(self.in_split), bias=in_proj_bias, **dd)
        self.mlp_bias = nn.Parameter(torch.zeros(mlp_hidden, **dd)) if mlp_bias and mlp_hidden else None
        self.q_norm = q_norm if q_norm is not None else nn.Identity()
        self.k_norm = k_norm if k_norm is not None else nn.Identity()
        self.mlp_act = mlp_act
        self.mlp_drop = nn.Dropout(mlp_drop)
        self.attn_out_proj = nn.Linear(self.v_dim, dim, bias=proj_bias, **dd) if self.v_dim else None
        self.mlp_out_proj = nn.Linear(mlp_hidden, dim, bias=proj_bias, **dd) if mlp_hidden else None
        self.constant = nn.Parameter(torch.zeros(dim, **dd))
        self.ls = ls
        self.drop_path = drop_path

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        if is_causal:
            raise NotImplementedError("PrunedParallelBlock: is_causal is not supported")
        B, N, _ = x.shape
        x_mlp, q, k, v = torch.split(self.in_proj(self.in_norm(x)), self.in_split, dim=-1)
        y = self.constant
        if self.mlp_out_proj is not None:
            if self.mlp_bias is not None:
                x_mlp = x_mlp + self.mlp_bias
            y = y + self.mlp_out_proj(self.mlp_drop(self.mlp_act(x_mlp)))
        if self.attn_out_proj is not None:
            rows = self.qk_dim // self.num_heads
            q = self.q_norm(q.view(B, N, self.num_heads, rows)).transpose(1, 2)
            k = self.k_norm(k.view(B, N, self.num_heads, rows)).transpose(1, 2)
            mask = _additive(_select_heads(attn_mask, self.kept_heads, self.dense_heads), q.dtype)
            out = self._attend(*self._shrink_qk(q, k), v, mask)
            y = y + self.attn_out_proj(out)
        if y.dim() == 1:  # every part constant: a layer scale may work in place
            y = y.expand_as(x).contiguous()
        return x + self.drop_path(self.ls(y))

    def extra_repr(self) -> str:
        return f"{self._heads_repr()}, mlp_hidden={self.mlp_hidden}"


class ConstantBranch(_NotScriptable, nn.Module):
    """A residual branch that pruning made independent of its input.

    When every input or every hidden dim of an attention or MLP branch is pruned,
    the branch adds the same vector to every token; that vector stays trainable,
    like a bias. Accepts and ignores the keyword arguments of timm's attention modules
    (masks, RoPE, shared biases) so it can stand in for any branch.
    """

    def __init__(self, value: torch.Tensor):
        super().__init__()
        self.value = nn.Parameter(value.detach().clone().flatten())

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.value.expand(*x.shape[:-1], self.value.numel())

    def extra_repr(self) -> str:
        return f"dim={self.value.numel()}"


def kept_norm(norm: nn.Module, index: torch.Tensor) -> nn.Module:
    """The kept-column twin of a LayerNorm or RMS norm; a ``TypeError`` for other norms."""
    if isinstance(norm, nn.LayerNorm):
        return KeptLayerNorm.from_layer_norm(norm, index)
    if is_rms_norm(norm):
        return KeptRmsNorm.from_rms_norm(norm, index)
    raise TypeError(f"norm: VTP prunes behind LayerNorm and RMS norms, got {type(norm).__name__}")


def is_rms_norm(norm: nn.Module) -> bool:
    return isinstance(norm, (RmsNorm, getattr(nn, "RMSNorm", RmsNorm)))
