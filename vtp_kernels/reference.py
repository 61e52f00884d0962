"""Pure-PyTorch definitions of every op in ``vtp_kernels``.

These are the oracle the Triton kernels are tested against, and the ``torch``
backend that runs wherever Triton does not (CPU, other accelerators, debugging).
They are written for clarity first and only then for speed; autograd provides
their backward passes.
"""
from __future__ import annotations

import functools
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

__all__ = ["gated_linear", "layer_norm_gather", "packed_attention", "padded_value_columns"]


def gated_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    gate: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``y = (x * gate) @ weight.T + bias``.

    x: ``[..., K]``; weight: ``[N, K]``; gate: ``[K]``; bias: ``[N]`` or None.
    The gate scales the columns of the weight rather than the activations:
    the two are equal, and ``weight * gate`` costs N*K instead of M*K.
    """
    return F.linear(x, weight * gate, bias)


def layer_norm_gather(
    x: torch.Tensor,
    index: torch.Tensor,
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """LayerNorm over the full last dim of ``x``, returning only the columns in ``index``.

    x: ``[..., D]``; index: int64 ``[k]`` (values in ``[0, D)``); weight, bias: ``[k]``
    (the affine parameters of the kept columns only) or None. Returns ``[..., k]``.
    Mean and variance are over all D columns, exactly as the unpruned LayerNorm.

    The affine parameters are scattered to the full width so that ``F.layer_norm`` applies
    them in its own pass, and the kept columns are taken with ``gather``: on a 2-core CPU
    (DeiT-S, batch 8, 211 of 384 columns) 0.36 ms against 0.94 ms for normalising, taking
    the columns with ``index_select`` and scaling them afterwards.
    """
    D = x.shape[-1]
    params = [p for p in (weight, bias) if p is not None]
    if D == 1 or any(p.dtype != x.dtype for p in params):
        # Mixed precision: the affine step promotes, as ``y * weight + bias`` does. One
        # column: its variance is 0, so 1/sqrt(eps) magnifies whatever the fused backward
        # does not cancel, while this form's gradient cancels exactly.
        y = F.layer_norm(x, (D,), None, None, eps).index_select(-1, index)
        if weight is not None:
            y = y * weight
        return y + bias if bias is not None else y
    full = [None if p is None else p.new_zeros(D).index_copy(0, index, p) for p in (weight, bias)]
    y = F.layer_norm(x, (D,), full[0], full[1], eps)
    return torch.gather(y, -1, index.expand(*y.shape[:-1], index.numel()))


def packed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    v_widths: Sequence[int],
    scale: Optional[float] = None,
    attn_bias: Optional[torch.Tensor] = None,
    v_padded: bool = False,
    v_head_width: Optional[int] = None,
) -> torch.Tensor:
    """Softmax attention whose heads have different value widths.

    q, k: ``[B, H, N, D]``; v: ``[B, N, sum(v_widths)]`` with head ``h``'s values
    packed at columns ``[sum(v_widths[:h]), sum(v_widths[:h+1]))``, or, with ``v_padded``,
    ``[B, N, H * D]`` with head ``h``'s values at ``[h * D, h * D + v_widths[h])`` (what the
    other columns hold is ignored). A width may be 0. Returns ``[B, N, sum(v_widths)]``,
    packed, ready for the output projection. ``scale`` defaults to ``D ** -0.5``.
    ``v_head_width`` (default D) is the head width of a padded V, ``[B, N, H * v_head_width]``,
    and the width packed V is padded to: queries and keys may be narrower or wider than it
    (attention pruned in its query/key dims keeps the model's own ``scale``).
    ``attn_bias`` is added to the scores (``[..., H, N, N]`` or broadcastable to it, as
    ``scaled_dot_product_attention`` takes).

    Computed by one ``scaled_dot_product_attention`` call on V padded to the queries' width D
    (packed V is scattered into zeros first), then gathering the kept columns. D rather than
    the widest head because the fused SDPA kernels need q, k and v of one width (flash on
    CPU and CUDA): measured on a 2-core CPU, DeiT-S attention at batch 8 takes 16 ms fused
    against 72-78 ms on the math path that any narrower V falls back to.
    """
    widths = check_value_layout(q, v, v_widths, v_padded, v_head_width)
    B, H, N, D = q.shape
    total = sum(widths)
    if scale is None:
        scale = D ** -0.5
    if total == 0:
        return v[..., :0].clone()  # empty, but in the graph as the kernel's output is
    width = max(D if v_head_width is None else v_head_width, max(widths))
    # Every head at the full width: packed and padded are one layout, nothing to move.
    cols = None if widths == [width] * H else padded_value_columns(tuple(widths), width, v.device)
    if cols is not None and not v_padded:
        v = v.new_zeros(B, N, H * width).index_copy(-1, cols, v)
    if D < width:
        # Queries and keys narrower than V (attention pruned in its query/key dims): zero
        # columns add nothing to any score, and equal widths let SDPA run a fused kernel,
        # which needs them, instead of the math path that materialises every N x N score
        # (a depth-2 RADIO ViT at its 1024-px default needed 20 GB on that path).
        q, k = F.pad(q, (0, width - D)), F.pad(k, (0, width - D))
    out = F.scaled_dot_product_attention(q, k, v.view(B, N, H, width).transpose(1, 2), attn_mask=attn_bias,
                                         scale=scale)
    out = out.transpose(1, 2).reshape(B, N, H * width)
    if cols is None:
        return out
    # gather, not index_select: 0.27 ms against 0.47 ms for DeiT-S at batch 8 on 2 cores
    return torch.gather(out, -1, cols.expand(B, N, total))


def check_value_layout(q: torch.Tensor, v: torch.Tensor, v_widths: Sequence[int], v_padded: bool = False,
                       v_head_width: Optional[int] = None) -> List[int]:
    """The per-head value widths as ints, after checking them and V's shape against q
    ``[B, H, N, D]``: one width per head, none negative, none above D in a padded V, and
    V ``[B, N, sum(v_widths)]`` (packed) or ``[B, N, H * D]`` (padded). Every backend of
    ``packed_attention`` checks its inputs here."""
    if q.dim() != 4:
        raise ValueError(f"q: expected [B, H, N, D], got shape {list(q.shape)}")
    B, H, N, D = q.shape
    if v_head_width is not None:
        if isinstance(v_head_width, bool) or int(v_head_width) != v_head_width or v_head_width < 1:
            raise ValueError(f"v_head_width: expected a positive integer, got {v_head_width!r}")
        D = int(v_head_width)
    widths = [int(w) for w in v_widths]
    if len(widths) != H:
        raise ValueError(f"v_widths: expected {H} entries (one per head of q), got {len(widths)}")
    if any(w < 0 for w in widths):
        raise ValueError(f"v_widths: widths must be >= 0, got {widths}")
    if v_padded and any(w > D for w in widths):
        raise ValueError(f"v_widths: a padded V holds at most {D} values per head, got {widths}")
    expected = H * D if v_padded else sum(widths)
    if v.dim() != 3 or v.shape[:2] != (B, N) or v.shape[-1] != expected:
        raise ValueError(f"v: expected shape [{B}, {N}, {expected}], got {list(v.shape)}")
    return widths


def padded_value_columns(widths: Tuple[int, ...], width: int, device: torch.device) -> torch.Tensor:
    """Column of each packed value inside the ``[H * width]`` padded layout.

    Cached in eager mode, where a pruned model asks for the same few layouts on every
    forward; under torch.compile it is built inline and becomes a graph constant.
    """
    if torch.compiler.is_compiling():
        return _build_pad_index(widths, width, device)
    return _cached_pad_index(widths, width, device)


def _build_pad_index(widths: Tuple[int, ...], width: int, device: torch.device) -> torch.Tensor:
    cols = [h * width + j for h, w in enumerate(widths) for j in range(w)]
    return torch.tensor(cols, dtype=torch.long, device=device)


_cached_pad_index = functools.lru_cache(maxsize=256)(_build_pad_index)
