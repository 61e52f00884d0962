"""The nn.Modules VTP puts into a timm VisionTransformer.

``GatedLinear`` is what sparse training runs; ``KeptLayerNorm``, ``PrunedAttention``
and ``ConstantBranch`` are what pruning leaves behind. Each module keeps the
attribute names of the timm module it replaces (``qkv``, ``proj``, ``weight``, ...)
so state_dict keys stay those of timm. All arithmetic goes through
``vtp_kernels``, whose backend switch picks Triton or PyTorch.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn

import vtp_kernels

__all__ = ["GatedLinear", "KeptLayerNorm", "PrunedAttention", "ConstantBranch"]


class GatedLinear(nn.Linear):
    """``nn.Linear`` with a learnable score per input dimension: ``y = (x * gate) W^T + b``.

    A drop-in replacement for ``nn.Linear``: same constructor, same ``weight``/``bias``
    keys, plus ``gate`` (shape ``[in_features]``, initialised to 1). Works on inputs
    with any leading dims.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.gate = nn.Parameter(torch.ones(in_features, device=device, dtype=dtype))

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "GatedLinear":
        """Wrap an existing ``nn.Linear``; its weight and bias Parameters are reused, not copied."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear: expected an nn.Linear, got {type(linear).__name__}")
        gated = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        gated.weight = linear.weight
        gated.bias = linear.bias
        gated.gate = nn.Parameter(
            torch.ones(linear.in_features, device=linear.weight.device, dtype=linear.weight.dtype)
        )
        gated.train(linear.training)
        return gated

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return vtp_kernels.gated_linear(x, self.weight, self.gate, self.bias)


class KeptLayerNorm(nn.Module):
    """A LayerNorm over all ``dim`` features that outputs only the features in ``index``.

    Statistics use the full row, as in the unpruned model; the affine parameters
    (``weight``, ``bias``) exist only for the kept features. The next linear layer
    then runs with a smaller input width.
    """

    def __init__(self, dim: int, index: torch.Tensor, eps: float = 1e-6, elementwise_affine: bool = True,
                 bias: bool = True, device=None, dtype=None):
        super().__init__()
        index = torch.as_tensor(index, dtype=torch.long).flatten()
        if index.numel() and index.device.type != "meta" and (int(index.min()) < 0 or int(index.max()) >= dim):
            raise ValueError(f"index: expected values in [0, {dim}), got range "
                             f"[{int(index.min())}, {int(index.max())}]")
        index = index.to(device) if device is not None else index
        self.dim = dim
        self.eps = eps
        self.register_buffer("index", index)
        kept = index.numel()
        self.weight = nn.Parameter(torch.ones(kept, device=device, dtype=dtype)) if elementwise_affine else None
        self.bias = nn.Parameter(torch.zeros(kept, device=device, dtype=dtype)) if elementwise_affine and bias else None

    @classmethod
    def from_layer_norm(cls, norm: nn.LayerNorm, index: torch.Tensor) -> "KeptLayerNorm":
        if not isinstance(norm, nn.LayerNorm) or len(norm.normalized_shape) != 1:
            raise TypeError(f"norm: expected a 1-D nn.LayerNorm, got {norm!r}")
        ref = norm.weight if norm.weight is not None else None
        kept = cls(norm.normalized_shape[0], index, eps=norm.eps, elementwise_affine=norm.weight is not None,
                   bias=norm.bias is not None, device=ref.device if ref is not None else None,
                   dtype=ref.dtype if ref is not None else None)
        with torch.no_grad():
            if norm.weight is not None:
                kept.weight.copy_(norm.weight[kept.index])
            if norm.bias is not None:
                kept.bias.copy_(norm.bias[kept.index])
        return kept

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return vtp_kernels.layer_norm_gather(x, self.index, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.dim} -> {self.index.numel()}, eps={self.eps}"


class PrunedAttention(nn.Module):
    """Multi-head self-attention whose heads keep different numbers of value dims.

    ``qkv`` emits ``[Q of every head | K of every head | V packed head by head]``:
    queries and keys keep the full ``head_dim`` (VTP never prunes them), values
    keep ``v_widths[h]`` dims for head ``h``. ``proj`` reads the packed values.
    Mirrors timm's ``Attention`` (same submodule names, same call signature).
    """

    def __init__(self, in_features: int, out_features: int, head_dim: int, v_widths: Sequence[int],
                 qkv_bias: bool = True, proj_bias: bool = True, q_norm: Optional[nn.Module] = None,
                 k_norm: Optional[nn.Module] = None, proj_drop: float = 0.0, scale: Optional[float] = None,
                 device=None, dtype=None):
        super().__init__()
        v_widths = tuple(int(w) for w in v_widths)
        if not v_widths or min(v_widths) < 1:
            raise ValueError(f"v_widths: expected one positive width per kept head, got {v_widths}")
        self.num_heads = len(v_widths)
        self.head_dim = head_dim
        self.v_widths = v_widths
        self.qk_dim = self.num_heads * head_dim
        self.v_dim = sum(v_widths)
        self.scale = head_dim ** -0.5 if scale is None else scale
        dd = {"device": device, "dtype": dtype}
        self.qkv = nn.Linear(in_features, 2 * self.qk_dim + self.v_dim, bias=qkv_bias, **dd)
        self.q_norm = q_norm if q_norm is not None else nn.Identity()
        self.k_norm = k_norm if k_norm is not None else nn.Identity()
        self.proj = nn.Linear(self.v_dim, out_features, bias=proj_bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise NotImplementedError("PrunedAttention: attn_mask and is_causal are not supported")
        B, N, _ = x.shape
        qkv = self.qkv(x)
        q = qkv[..., : self.qk_dim].view(B, N, self.num_heads, self.head_dim).transpose(1, 2)
        k = qkv[..., self.qk_dim: 2 * self.qk_dim].view(B, N, self.num_heads, self.head_dim).transpose(1, 2)
        v = qkv[..., 2 * self.qk_dim:]
        q, k = self.q_norm(q), self.k_norm(k)
        x = vtp_kernels.packed_attention(q, k, v, self.v_widths, self.scale)
        return self.proj_drop(self.proj(x))

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}, v_widths={self.v_widths}"


class ConstantBranch(nn.Module):
    """A residual branch that pruning made independent of its input.

    When every input or every hidden dim of an attention or MLP branch is pruned,
    the branch adds the same vector to every token; that vector stays trainable,
    like a bias. Accepts and ignores attention's keyword arguments so it can stand
    in for ``block.attn`` as well as ``block.mlp``.
    """

    def __init__(self, value: torch.Tensor):
        super().__init__()
        self.value = nn.Parameter(value.detach().clone().flatten())

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        return self.value.expand(*x.shape[:-1], self.value.numel())

    def extra_repr(self) -> str:
        return f"dim={self.value.numel()}"
