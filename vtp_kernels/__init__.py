"""Tensor ops for Vision Transformer Pruning, each a Triton kernel with a PyTorch twin.

Every op dispatches through :mod:`vtp_kernels.backend` (``"auto" | "triton" | "torch"``,
env ``VTP_BACKEND``). The PyTorch definitions live in :mod:`vtp_kernels.reference`.
This package knows nothing about models.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from . import reference
from .backend import BACKENDS, get_backend, set_backend, triton_available, use_backend, use_triton

# The kernel modules are ``_<op>.py``: no submodule shares a name with the public function
# it implements, so importing one never rebinds ``vtp_kernels.<op>``.
if triton_available():
    from ._gated_linear import gated_linear_triton
    from ._layer_norm_gather import layer_norm_gather_triton
    from ._packed_attention import packed_attention_triton

__all__ = [
    "BACKENDS", "get_backend", "set_backend", "use_backend",
    "gated_linear", "layer_norm_gather", "packed_attention", "reference",
]


def gated_linear(
    x: torch.Tensor, weight: torch.Tensor, gate: torch.Tensor, bias: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """``(x * gate) @ weight.T + bias`` for x of shape ``[..., K]``; see ``reference.gated_linear``."""
    if use_triton("gated_linear", x):
        return gated_linear_triton(x, weight, gate, bias)
    return reference.gated_linear(x, weight, gate, bias)


def layer_norm_gather(
    x: torch.Tensor,
    index: torch.Tensor,
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """LayerNorm over all of x's last dim, emitting only columns ``index``; see the reference."""
    if use_triton("layer_norm_gather", x):
        return layer_norm_gather_triton(x, index, weight, bias, eps)
    return reference.layer_norm_gather(x, index, weight, bias, eps)


def packed_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, v_widths: Sequence[int], scale: Optional[float] = None,
    attn_bias: Optional[torch.Tensor] = None, v_padded: bool = False, v_head_width: Optional[int] = None,
) -> torch.Tensor:
    """Attention over heads with per-head value widths; V packed, or padded to the head
    width (``v_padded``); the output packed. See the reference.

    The Triton kernel takes no additive bias: attention with a position bias or a mask
    (``attn_bias``) always runs the reference. It reads packed V: a padded one is gathered
    to packed first. Queries and keys of another width than V's heads (``v_head_width``)
    run the reference until the kernel takes them."""
    same_width = v_head_width is None or v_head_width == q.shape[-1]
    if attn_bias is None and same_width and use_triton("packed_attention", q):
        if v_padded:
            widths = reference.check_value_layout(q, v, v_widths, v_padded=True)
            v = v.index_select(-1, reference.padded_value_columns(tuple(widths), q.shape[-1], v.device))
        return packed_attention_triton(q, k, v, v_widths, scale)
    return reference.packed_attention(q, k, v, tuple(v_widths), scale, attn_bias, v_padded, v_head_width)
