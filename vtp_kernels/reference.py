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

__all__ = ["check_qk_gate", "check_value_layout", "default_scale", "gated_linear", "layer_norm_gather",
           "packed_attention", "padded_value_columns"]


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
    qk_gate: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Softmax attention whose heads have different value widths, and a query/key width of
    their own; optionally a gate per query/key dim of each head.

    q, k: ``[B, H, N, Dqk]``; v: ``[B, N, sum(v_widths)]`` with head ``h``'s values packed
    at columns ``[sum(v_widths[:h]), sum(v_widths[:h+1]))``, or, with ``v_padded``,
    ``[B, N, H * v_head_width]`` with head ``h``'s values at ``[h * vw, h * vw + v_widths[h])``
    (``vw = v_head_width``, by default Dqk; what the other columns hold is ignored;
    ``v_head_width`` means nothing to a packed V). A width may be 0 and may exceed Dqk;
    Dqk may be 0 (every score 0: each head averages its values). Returns
    ``[B, N, sum(v_widths)]``, packed, ready for the output projection. ``scale`` defaults
    to ``Dqk ** -0.5``; callers pass the model's own, which pruning does not change.
    ``attn_bias`` is added to the scores (``[..., H, N, N]`` or broadcastable to it, as
    ``scaled_dot_product_attention`` takes). ``qk_gate`` (``[H, Dqk]`` or ``[H, 1, Dqk]``)
    scales dim d of head h's scores, s = scale · Σ_d a_d q_d k_d: here ``q * gate`` (rounded to
    q's dtype); the Triton kernel applies it to the q tile inside.

    Computed by one ``scaled_dot_product_attention`` call at one width W for q, k and v,
    then gathering the kept columns: W is the wider of Dqk and V's head width (a padded V's
    ``vw``, a packed V's widest head). The narrower side is padded with zero columns, which
    is exact: zero q/k columns add nothing to any score, zero value columns give output
    columns that are never gathered. One width because the fused SDPA kernels need it
    (flash, on CPU and CUDA; on the CPU flash refuses unequal widths, "Flash attention
    requires q,k,v to have the same last dimension", and the math path runs). Measured on
    a 2-core CPU, DeiT-S attention at batch 8: 16 ms fused against 72-78 ms on the math
    path; and benchmarks/results/qk_sdpa_cpu.json (1 thread, interleaved medians):
    q/k 16, 32 or 48 wide under 64-wide values, or values 16-48 wide under 64-wide q/k,
    the padded forward is 1.4-1.7x faster than the math path on the unequal widths; forward
    and backward 0.95-1.19x, the one case below 1 (q/k 16 wide) within the run's spread.
    """
    widths = check_value_layout(q, v, v_widths, v_padded, v_head_width)
    if k.shape != q.shape:
        raise ValueError(f"k: expected shape {list(q.shape)} like q, got {list(k.shape)}")
    gate = check_qk_gate(q, qk_gate)
    B, H, N, D = q.shape
    total = sum(widths)
    scale = default_scale(D) if scale is None else scale
    if gate is not None:
        q = (q * gate.unsqueeze(1)).to(q.dtype)  # an fp32 gate on bf16 q: one rounding, as in the kernel
    if total == 0:
        return v[..., :0].clone()  # empty, but in the graph as the kernel's output is
    if v_padded:
        vw = D if v_head_width is None else int(v_head_width)
        width = max(D, vw)
        v = v.reshape(B, N, H, vw)
        if vw < width:
            v = F.pad(v, (0, width - vw))
    else:
        width = max(D, max(widths))
        # Every head at the full width: packed and padded are one layout, nothing to move.
        if widths == [width] * H:
            v = v.reshape(B, N, H, width)
        else:
            cols = padded_value_columns(tuple(widths), width, v.device)
            v = v.new_zeros(B, N, H * width).index_copy(-1, cols, v).view(B, N, H, width)
    if D < width:
        q, k = F.pad(q, (0, width - D)), F.pad(k, (0, width - D))
    out = F.scaled_dot_product_attention(q, k, v.transpose(1, 2), attn_mask=attn_bias, scale=scale)
    out = out.transpose(1, 2).reshape(B, N, H * width)
    if widths == [width] * H:
        return out
    # gather, not index_select: 0.27 ms against 0.47 ms for DeiT-S at batch 8 on 2 cores
    cols = padded_value_columns(tuple(widths), width, v.device)
    return torch.gather(out, -1, cols.expand(B, N, total))


def default_scale(qk_width: int) -> float:
    """The softmax scale when the caller gives none: ``qk_width ** -0.5``. With no query/key
    dims every score is 0 whatever it is multiplied by, so 1.0 stands in."""
    return qk_width ** -0.5 if qk_width > 0 else 1.0


def check_qk_gate(q: torch.Tensor, qk_gate: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``qk_gate`` as ``[H, Dqk]`` (a view), after checking it against q ``[B, H, N, Dqk]``:
    ``[H, Dqk]`` or ``[H, 1, Dqk]``, floating point, on q's device. None stays None."""
    if qk_gate is None:
        return None
    H, D = q.shape[1], q.shape[-1]
    if not isinstance(qk_gate, torch.Tensor) or tuple(qk_gate.shape) not in ((H, D), (H, 1, D)):
        got = list(qk_gate.shape) if isinstance(qk_gate, torch.Tensor) else type(qk_gate).__name__
        raise ValueError(f"qk_gate: expected a tensor of shape [{H}, {D}] or [{H}, 1, {D}] (heads, q/k dims), "
                         f"got {got}")
    if not qk_gate.is_floating_point() or qk_gate.device != q.device:
        raise ValueError(f"qk_gate: expected a floating-point tensor on {q.device}, "
                         f"got {qk_gate.dtype} on {qk_gate.device}")
    return qk_gate.reshape(H, D)


def check_value_layout(q: torch.Tensor, v: torch.Tensor, v_widths: Sequence[int], v_padded: bool = False,
                       v_head_width: Optional[int] = None) -> List[int]:
    """The per-head value widths as ints, after checking them and V's shape against q
    ``[B, H, N, Dqk]``: one width per head, none negative, none above the head width
    ``v_head_width`` (default Dqk) in a padded V, and V ``[B, N, sum(v_widths)]`` (packed)
    or ``[B, N, H * v_head_width]`` (padded). Every backend of ``packed_attention`` checks
    its inputs here."""
    if q.dim() != 4:
        raise ValueError(f"q: expected [B, H, N, D], got shape {list(q.shape)}")
    B, H, N, D = q.shape
    widths = [int(w) for w in v_widths]
    if len(widths) != H:
        raise ValueError(f"v_widths: expected {H} entries (one per head of q), got {len(widths)}")
    if any(w < 0 for w in widths):
        raise ValueError(f"v_widths: widths must be >= 0, got {widths}")
    if v_head_width is None:
        vw = D
    elif isinstance(v_head_width, bool) or int(v_head_width) != v_head_width or v_head_width < 0:
        raise ValueError(f"v_head_width: expected an int >= 0 (columns per head of a padded V), got {v_head_width!r}")
    else:
        vw = int(v_head_width)
    if v_padded and any(w > vw for w in widths):
        raise ValueError(f"v_widths: a padded V holds at most {vw} values per head, got {widths}")
    expected = H * vw if v_padded else sum(widths)
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
