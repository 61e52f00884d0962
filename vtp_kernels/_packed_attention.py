"""Attention whose heads have different value widths (packed V), flash-attention style.

Pruning the ``attn_out`` gate leaves head ``h`` with ``v_widths[h]`` value dims (possibly 0).
The pruned qkv projection emits those values packed side by side, and the pruned output
projection reads the head outputs packed the same way::

    q, k : [B, H, N, D]           any strides (views of the qkv output are fine)
    v    : [B, N, sum(v_widths)]  head h at columns [off_h, off_h + v_widths[h])
    out  : [B, N, sum(v_widths)]  same packing; out_h = softmax(q_h k_hᵀ · scale) v_h

D is the query/key width, which pruning the ``attn_qk`` gate shrinks on its own: a value
width may be larger than D (``BLOCK_D`` and ``BLOCK_V`` are separate tile widths), and D
may be 0 (all scores 0). An optional ``qk_gate`` [H, D] multiplies each q tile as it is
loaded (s = scale · Σ_d a_d q_d k_d) instead of a separate ``q * gate`` pass over q and
its gradient: benchmarks/results/qk_gate_cost_cpu.json measured that pass at 5 % of a
DeiT-S attention step on the CPU, above the 3 % that issue 17 set for building this.
The dK/dV kernel multiplies its q tiles the same way; the dQ kernel computes dG (the
gradient of q · a), returns dQ = dG · a and writes each query block's Σ_rows q ⊙ dG to a
row of its own, which the host sums into the gate's gradient.

The kernels follow Triton's fused-attention tutorial (FlashAttention-2):

    forward   one program per (batch·kept head, query block): online softmax over key
              blocks, fp32 accumulators, never an N×N tensor in memory; it stores the
              row log-sum-exp (base 2, fp32 [B, kept heads, N]) for the backward.
    backward  delta = rowsum(dO ⊙ O) per head (a small preprocess), then
              dK, dV: one program per key block, looping over query blocks;
              dQ:     one program per query block, looping over key blocks.
              Every gradient element has one writer: deterministic, no atomics.

Per-head widths come from an int32 table on the device, one row per *kept* head
(head index, value offset, value width); heads of width 0 get no program at all, write
nothing in ``out`` (they own no columns) and get zero dq/dk. The value tile width
``BLOCK_V`` is one compile-time power of two >= the largest width (>= 16 for ``tl.dot``);
each head masks it down to its own width, so a narrow head reads and writes only its
own columns.

Alignment matters on a GPU: 16-byte vector loads and asynchronous copies need rows that
start on 16-byte boundaries, and the compiler must know it. The host computes two powers
of two (<= 16): QK_ALIGN divides every batch, head and row stride of q and k; V_ALIGN
divides every kept head's value offset and width, the packed row length and the batch and
row strides of v and dO. The kernels promise exactly those values to the compiler
(``_aligned``), so any layout stays correct (a unit stride, as in a [B, N, D, H] tensor
viewed as [B, H, N, D], only lowers the alignment to 1). A dim of size 1 gets stride 0.
When q, k and v are views of one qkv row of 2·H·D + sum(widths) (+ padding) elements:

    round_to = 8     every offset, width and the row are multiples of 8: QK_ALIGN = V_ALIGN = 8,
                     16-byte vectors and cp.async on every tile
    round_to = 1     widths are odd: V_ALIGN = 1 (scalar V loads and O stores); QK_ALIGN = 8
                     only if the caller pads the qkv row to a multiple of 8 elements

Compiled for sm_90a by Triton 3.6 (benchmarks/results/compile_sm90_triton3.6.0.md), every
dot is a wgmma, but each is waited for at once (``warp_group_dot_wait {pendings = 0}``):
the two dots of an iteration feed each other through the softmax. At N = 197 the key loop
has 4-7 steps, so loads (cp.async, 16 bytes when aligned) matter more than that overlap.

Shapes: q, k ``[B, H, N, D]`` and v ``[B, N, sum(v_widths)]`` with any strides; out and
the gradients are dense. fp16, bf16 or fp32; scores, softmax and accumulators in fp32.
"""
# No `from __future__ import annotations`: custom_op infers its schema from real annotations.
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import triton

from . import reference
from ._attention_kernels import DELTA_BLOCK_M, attn_bwd_delta, attn_bwd_dkdv, attn_bwd_dq, attn_fwd
from ._utils import dot_precision, largest_pow2_dividing, new_empty, on_device

__all__ = ["packed_attention_triton"]

# ---------------------------------------------------------------------------------------
# Launchers: the kept-heads table, the alignments, the launches
# ---------------------------------------------------------------------------------------
_HEAD_TABLES: Dict[Tuple[Tuple[int, ...], torch.device], Tuple[torch.Tensor, int]] = {}


def _head_table(widths: Tuple[int, ...], device: torch.device) -> Tuple[torch.Tensor, int]:
    """int32 [kept heads, 3] rows (head, value offset, value width) on ``device``, cached
    per (widths, device); and the largest power of two <= 16 dividing every kept offset
    and width (8 when widths are rounded to multiples of 8)."""
    key = (widths, device)
    if key not in _HEAD_TABLES:
        rows, offset = [], 0
        for h, w in enumerate(widths):
            if w > 0:
                rows.append((h, offset, w))
            offset += w
        align = largest_pow2_dividing([x for _, off, w in rows for x in (off, w)])
        table = torch.tensor(rows, dtype=torch.int32).reshape(-1, 3).to(device)
        _HEAD_TABLES[key] = (table, align)
    return _HEAD_TABLES[key]


def _outer_strides(t: torch.Tensor) -> List[int]:
    """Every stride but the last, 0 for a dim of size 1 (its index is always 0, and its
    stride should not lower the alignment)."""
    return [0 if size == 1 else stride for size, stride in zip(t.shape[:-1], t.stride()[:-1])]


def _launch_args(q, k, v, do, widths: Tuple[int, ...]) -> Tuple[List[int], dict]:
    """The stride arguments of every kernel (q, k, v and, when given, dO; the last-dim
    strides as they are) and the compile-time parameters shared by every launch.

    QK_ALIGN divides exactly the q/k strides the kernels pass through ``_aligned``, V_ALIGN
    the value offsets, widths, packed row length and v/dO strides: a stride of 1 outside the
    last dim (a [B, N, D, H] tensor viewed as [B, H, N, D]) lowers it to 1, never breaks it.
    """
    v_total = sum(widths)
    _, widths_align = _head_table(widths, q.device)
    qs, ks, vs = _outer_strides(q), _outer_strides(k), _outer_strides(v)
    strides = [*qs, q.stride(-1), *ks, k.stride(-1), *vs, v.stride(-1)]
    v_side = [v_total, *vs]
    if do is not None:
        dos = _outer_strides(do)
        strides += [*dos, do.stride(-1)]
        v_side += dos
    meta = dict(
        HEAD_DIM=q.shape[-1],
        BLOCK_D=max(16, triton.next_power_of_2(q.shape[-1])),
        BLOCK_V=max(16, triton.next_power_of_2(max(widths))),
        QK_ALIGN=largest_pow2_dividing([*qs, *ks]),
        V_ALIGN=min(widths_align, largest_pow2_dividing(v_side)),
        DOT_PRECISION=dot_precision(q.dtype),
    )
    return strides, meta


def _forward(q, k, v, widths: Tuple[int, ...], scale: float,
             gate: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """out and the row log-sum-exp; ``gate`` ([H, D] contiguous) scales q's columns
    per head inside the kernel, or None."""
    B, H, N, D = q.shape
    v_total = sum(widths)
    table, _ = _head_table(widths, q.device)
    n_kept = table.shape[0]
    out = new_empty((B, N, v_total), device=v.device, dtype=v.dtype)
    lse = new_empty((B, n_kept, N), device=q.device, dtype=torch.float32)
    if n_kept == 0 or B == 0 or N == 0:
        return out, lse
    strides, meta = _launch_args(q, k, v, None, widths)
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_M"]), B * n_kept)  # noqa: E731
    with on_device(q):
        attn_fwd[grid](q, k, v, out, lse, table, gate, *strides, H, N, n_kept, v_total, scale,
                       GATED=gate is not None, **meta)
    return out, lse


def _backward(do, q, k, v, out, lse, widths: Tuple[int, ...], scale: float, need_dq: bool, need_dkv: bool,
              gate: Optional[torch.Tensor] = None, need_dgate: bool = False,
              ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, dgate); ``gate`` is the forward's (the scores were made of q times it),
    whether or not it trains. With ``need_dgate`` dgate is fp32 [H, D] and dq is computed
    (the gate's gradient comes out of the dQ kernel), else dgate is empty."""
    B, H, N, D = q.shape
    v_total = sum(widths)
    table, _ = _head_table(widths, q.device)
    n_kept = table.shape[0]
    dropped = [h for h, w in enumerate(widths) if w == 0]
    gated = gate is not None
    need_dgate = need_dgate and gated
    need_dq = need_dq or need_dgate

    def nothing() -> torch.Tensor:  # a fresh one each time: custom op outputs may not alias
        return q.new_empty(0)

    def head_grad() -> torch.Tensor:
        g = new_empty((B, H, N, D), device=q.device, dtype=q.dtype)
        if dropped:                  # a head without values does not touch the output
            g[:, dropped] = 0
        return g

    dq = head_grad() if need_dq else nothing()
    dk = head_grad() if need_dkv else nothing()
    dv = new_empty((B, N, v_total), device=v.device, dtype=v.dtype) if need_dkv else nothing()
    dgate = q.new_zeros(H, D, dtype=torch.float32) if need_dgate else nothing()
    if n_kept == 0 or B == 0 or N == 0 or not (need_dq or need_dkv):
        return dq, dk, dv, dgate

    strides, meta = _launch_args(q, k, v, do, widths)
    meta["GATED"] = gated
    delta = new_empty(lse.shape, device=lse.device, dtype=lse.dtype)
    # One row of gate-gradient partials per query block of the config with the smallest
    # blocks; a config with larger ones leaves its extra rows at zero.
    dgate_rows = triton.cdiv(N, min(c.kwargs["BLOCK_M"] for c in attn_bwd_dq.configs)) if need_dgate else 0
    partials = q.new_zeros(B, n_kept, dgate_rows, D, dtype=torch.float32) if need_dgate else None
    with on_device(q):
        attn_bwd_delta[(triton.cdiv(N, DELTA_BLOCK_M), B * n_kept)](
            out, do, delta, table, *strides[-3:], H, N, n_kept, v_total,
            V_ALIGN=meta["V_ALIGN"], BLOCK_V=meta["BLOCK_V"], BLOCK_M=DELTA_BLOCK_M,
        )
        if need_dkv:
            grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), B * n_kept)  # noqa: E731
            attn_bwd_dkdv[grid](q, k, v, do, lse, delta, dk, dv, table, gate, *strides,
                                H, N, n_kept, v_total, scale, **meta)
        if need_dq:
            grid = lambda meta: (triton.cdiv(N, meta["BLOCK_M"]), B * n_kept)  # noqa: E731
            attn_bwd_dq[grid](q, k, v, do, lse, delta, dq, table, gate, partials, dgate_rows, *strides,
                              H, N, n_kept, v_total, scale, GATE_GRAD=need_dgate, **meta)
    if need_dgate:   # heads without values keep a zero gradient: nothing they score reaches the output
        dgate.index_copy_(0, table[:, 0].long(), partials.sum((0, 2)))
    return dq, dk, dv, dgate


# ---------------------------------------------------------------------------------------
# Custom ops and autograd
# ---------------------------------------------------------------------------------------
@torch.library.custom_op("vtp::packed_attention_fwd", mutates_args=())
def packed_attention_fwd_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, v_widths: List[int], scale: float,
    qk_gate: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(out [B, N, sum(v_widths)], lse [B, kept heads, N] fp32, base 2); ``qk_gate``
    [H, D] contiguous or None."""
    return _forward(q, k, v, tuple(v_widths), scale, qk_gate)


@packed_attention_fwd_op.register_fake
def packed_attention_fwd_fake(q, k, v, v_widths, scale, qk_gate=None):
    B, _, N, _ = q.shape
    n_kept = sum(1 for w in v_widths if w > 0)
    return v.new_empty(B, N, sum(v_widths)), q.new_empty(B, n_kept, N, dtype=torch.float32)


@torch.library.custom_op("vtp::packed_attention_bwd", mutates_args=())
def packed_attention_bwd_op(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    out: torch.Tensor, lse: torch.Tensor, v_widths: List[int], scale: float,
    need_dq: bool, need_dkv: bool, qk_gate: Optional[torch.Tensor] = None, need_dgate: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, dgate); a gradient not asked for comes back as an empty tensor. ``qk_gate``
    is the forward's; with ``need_dgate`` dq is always computed and dgate is fp32 [H, D]."""
    return _backward(grad_out, q, k, v, out, lse, tuple(v_widths), scale, need_dq, need_dkv, qk_gate, need_dgate)


@packed_attention_bwd_op.register_fake
def packed_attention_bwd_fake(grad_out, q, k, v, out, lse, v_widths, scale, need_dq, need_dkv, qk_gate=None,
                              need_dgate=False):
    gated = qk_gate is not None and need_dgate
    return (q.new_empty(q.shape) if need_dq or gated else q.new_empty(0),
            k.new_empty(k.shape) if need_dkv else q.new_empty(0),
            v.new_empty(v.shape[0], v.shape[1], sum(v_widths)) if need_dkv else q.new_empty(0),
            q.new_empty(qk_gate.shape, dtype=torch.float32) if gated else q.new_empty(0))


def _setup_context(ctx, inputs, output):
    # A gate of None is not among ``inputs`` (custom ops drop defaulted arguments).
    q, k, v, v_widths, scale, *gate = inputs
    qk_gate = gate[0] if gate else None
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, qk_gate)
    ctx.v_widths, ctx.scale = v_widths, scale
    ctx.mark_non_differentiable(lse)


def _backward_rule(ctx, grad_out, _grad_lse):
    q, k, v, out, lse, qk_gate = ctx.saved_tensors
    need_q, need_k, need_v = ctx.needs_input_grad[:3]
    need_gate = qk_gate is not None and ctx.needs_input_grad[5]
    dq, dk, dv, dgate = packed_attention_bwd_op(
        grad_out, q, k, v, out, lse, ctx.v_widths, ctx.scale, need_q, need_k or need_v, qk_gate, need_gate)
    grads = (dq if need_q else None, dk if need_k else None, dv if need_v else None, None, None)
    return grads + ((dgate.to(qk_gate.dtype) if need_gate else None,) if len(ctx.needs_input_grad) > 5 else ())


packed_attention_fwd_op.register_autograd(_backward_rule, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------------------
def packed_attention_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, v_widths: Sequence[int], scale: Optional[float] = None,
    qk_gate: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Triton twin of ``reference.packed_attention``: q, k ``[B, H, N, Dqk]``, v ``[B, N, sum(v_widths)]``
    packed per head (a width may exceed Dqk); returns ``[B, N, sum(v_widths)]`` packed the
    same way. Any strides. ``qk_gate`` (``[H, Dqk]`` or ``[H, 1, Dqk]``) multiplies each q
    tile inside the kernels, and its gradient is reduced in the dQ kernel."""
    widths = reference.check_value_layout(q, v, v_widths)
    gate = reference.check_qk_gate(q, qk_gate)
    D = q.shape[-1]
    if k.shape != q.shape:
        raise ValueError(f"k: expected shape {list(q.shape)} like q, got {list(k.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in _DTYPES:
        raise ValueError(f"q, k, v: expected one dtype among float16, bfloat16, float32; "
                         f"got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v: expected one device, got {q.device}, {k.device}, {v.device}")
    if gate is not None and gate.dtype not in _DTYPES:
        raise ValueError(f"qk_gate: expected float16, bfloat16 or float32, got {gate.dtype}")
    if scale is None:
        scale = reference.default_scale(D)
    out, _ = packed_attention_fwd_op(q, k, v, widths, float(scale), None if gate is None else gate.contiguous())
    return out


_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
