"""Attention whose heads have different value widths (packed V), flash-attention style.

Pruning the ``attn_out`` gate leaves head ``h`` with ``v_widths[h]`` value dims (possibly 0).
The pruned qkv projection emits those values packed side by side, and the pruned output
projection reads the head outputs packed the same way::

    q, k : [B, H, N, D]           any strides (views of the qkv output are fine)
    v    : [B, N, sum(v_widths)]  head h at columns [off_h, off_h + v_widths[h])
    out  : [B, N, sum(v_widths)]  same packing; out_h = softmax(q_h k_hᵀ · scale) v_h

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
import triton.language as tl

from . import reference
from ._utils import autotune_configs, dot_precision, largest_pow2_dividing, new_empty, on_device

__all__ = ["packed_attention_triton"]

# Scores are kept in base 2 (s · scale · log2 e) so the kernels can use exp2/log2; the
# stored log-sum-exp is in base 2 as well.
LOG2E = tl.constexpr(1.4426950408889634)


# ---------------------------------------------------------------------------------------
# Launch configurations
# ---------------------------------------------------------------------------------------
# On a GPU a short autotune list per kernel, keyed on the sequence length, head dim and
# value tile width (the autotuner adds dtypes to the key itself). The interpreter cannot
# autotune several configs and costs ~3-4 ms per program instance and loop step, so it
# gets one config with large blocks (128: N = 197 still has a full and a partial block,
# so both the unmasked and the masked paths run in the tests). In the backward, BLOCK_N
# is the key block a dK/dV program owns and BLOCK_M the query block it loops over; the
# other way round for dQ.

def _configs(interpreted: Tuple[int, int], cuda: Sequence[Tuple[int, int, int, int]]) -> List[triton.Config]:
    return autotune_configs(
        [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=warps, num_stages=stages)
         for m, n, warps, stages in cuda],
        interpreted=triton.Config({"BLOCK_M": interpreted[0], "BLOCK_N": interpreted[1]}),
    )


_FWD_CONFIGS = _configs((128, 128), [(64, 64, 4, 3), (128, 64, 4, 3), (128, 64, 8, 3),
                                     (128, 32, 4, 4), (64, 32, 4, 4)])
# (32, 128) keys per dK/dV program needs 8 warps: with 4, sm_90 code spills (255 registers).
_DKDV_CONFIGS = _configs((128, 128), [(32, 64, 4, 3), (32, 128, 8, 2), (64, 64, 4, 3),
                                      (64, 128, 8, 2)])
_DQ_CONFIGS = _configs((128, 128), [(64, 32, 4, 3), (128, 32, 4, 2), (64, 64, 4, 3),
                                    (128, 64, 8, 2)])
_DELTA_BLOCK_M = 128
_KEY = ["N", "HEAD_DIM", "BLOCK_V"]
# Triton would specialise every integer argument on being divisible by 16 (or equal to 1),
# so a pruned model, whose blocks each have their own head count, packed width and qkv row,
# would compile every kernel once per block. The alignment the kernels need is promised
# through QK_ALIGN / V_ALIGN instead (``_aligned``), so these are not specialised; the
# last-dim strides are, since a unit stride is what makes a tile contiguous.
_NOT_SPECIALISED = ["stride_qb", "stride_qh", "stride_qn", "stride_kb", "stride_kh", "stride_kn",
                    "stride_vb", "stride_vn", "H", "N", "n_kept", "v_total"]
_NOT_SPECIALISED_BWD = _NOT_SPECIALISED + ["stride_dob", "stride_don"]


@triton.jit
def _kept_head(Heads, i, V_ALIGN: tl.constexpr):
    """Row i of the kept-heads table: (head index, value offset, value width)."""
    h = tl.load(Heads + 3 * i)
    v_off = tl.multiple_of(tl.load(Heads + 3 * i + 1), V_ALIGN)
    width = tl.multiple_of(tl.load(Heads + 3 * i + 2), V_ALIGN)
    return h, v_off, width


@triton.jit
def _aligned(value, ALIGN: tl.constexpr):
    """``value`` (a multiple of ALIGN, which the host checked) in a form the compiler knows
    is one. Triton detects multiples of 16 by itself; this also covers a qkv row of, say,
    2·H·D + 232 columns, so loads stay 16-byte vectors there too."""
    return value // ALIGN * ALIGN


# ---------------------------------------------------------------------------------------
# Forward kernel: online softmax over key blocks
# ---------------------------------------------------------------------------------------
@triton.jit
def _attn_fwd_inner(
    acc, l_i, m_i, q,
    k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vc,
    offs_d, d_ok, offs_v, v_ok, start, stop, N, qk_scale,
    BLOCK_N: tl.constexpr, MASK_KEYS: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Online softmax over key blocks [start, stop). Only the last, partial key block
    (MASK_KEYS) pays for setting the scores of keys >= N to -inf."""
    for start_n in range(start, stop, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        kT = tl.load(k_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                     mask=d_ok[:, None] & n_ok[None, :], other=0.0)           # [BLOCK_D, BLOCK_N]
        s = tl.dot(q, kT, input_precision=DOT_PRECISION) * qk_scale           # [BLOCK_M, BLOCK_N]
        if MASK_KEYS:
            s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)       # rescales what earlier blocks summed
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_v[None, :] * stride_vc,
                    mask=n_ok[:, None] & v_ok[None, :], other=0.0)            # [BLOCK_N, BLOCK_V]
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.autotune(configs=_FWD_CONFIGS, key=_KEY)
@triton.jit(do_not_specialize=_NOT_SPECIALISED)
def _attn_fwd(
    Q, K, V, Out, Lse, Heads,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vn, stride_vc,
    H, N, n_kept, v_total, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_V: tl.constexpr,
    QK_ALIGN: tl.constexpr, V_ALIGN: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    stride_qb, stride_qh, stride_qn = _aligned(stride_qb, QK_ALIGN), _aligned(stride_qh, QK_ALIGN), _aligned(stride_qn, QK_ALIGN)
    stride_kb, stride_kh, stride_kn = _aligned(stride_kb, QK_ALIGN), _aligned(stride_kh, QK_ALIGN), _aligned(stride_kn, QK_ALIGN)
    stride_vb, stride_vn, v_total = _aligned(stride_vb, V_ALIGN), _aligned(stride_vn, V_ALIGN), _aligned(v_total, V_ALIGN)
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // n_kept).to(tl.int64)        # int64: batch offsets can pass 2**31
    h, v_off, width = _kept_head(Heads, pid_bh % n_kept, V_ALIGN)
    qk_scale = sm_scale * LOG2E

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_v = tl.arange(0, BLOCK_V)
    m_ok = offs_m < N
    d_ok = offs_d < HEAD_DIM                   # all true (folded away) when D is a power of 2
    v_ok = offs_v < width                      # this head's own value columns

    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)                 # [BLOCK_M, BLOCK_D]
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + v_off * stride_vc

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_V], tl.float32)
    # Whole key blocks first, then at most one partial block with the key mask.
    n_full = (N // BLOCK_N) * BLOCK_N
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vc,
        offs_d, d_ok, offs_v, v_ok, 0, n_full, N, qk_scale,
        BLOCK_N, False, DOT_PRECISION)
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vc,
        offs_d, d_ok, offs_v, v_ok, n_full, N, N, qk_scale,
        BLOCK_N, True, DOT_PRECISION)

    # Rows >= N saw zero queries (finite scores), so nothing here is NaN; they are not stored.
    # lse is [B, kept heads, N]: row pid_bh.
    tl.store(Lse + pid_bh.to(tl.int64) * N + offs_m, m_i + tl.math.log2(l_i), mask=m_ok)
    out = acc / l_i[:, None]
    tl.store(Out + b * N * v_total + offs_m[:, None] * v_total + v_off + offs_v[None, :],
             out.to(Out.dtype.element_ty), mask=m_ok[:, None] & v_ok[None, :])


# ---------------------------------------------------------------------------------------
# Backward kernels: delta, dK and dV, dQ
# ---------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["stride_dob", "stride_don", "H", "N", "n_kept", "v_total"])
def _attn_bwd_delta(
    Out, DO, Delta, Heads,
    stride_dob, stride_don, stride_doc,
    H, N, n_kept, v_total,
    V_ALIGN: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """delta[b, h, n] = sum_j dO[b, n, off_h + j] * O[b, n, off_h + j]: the row term of
    the softmax gradient, dS = P ⊙ (dP - delta)."""
    stride_dob, stride_don, v_total = _aligned(stride_dob, V_ALIGN), _aligned(stride_don, V_ALIGN), _aligned(v_total, V_ALIGN)
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // n_kept).to(tl.int64)
    h, v_off, width = _kept_head(Heads, pid_bh % n_kept, V_ALIGN)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_v = tl.arange(0, BLOCK_V)
    m_ok = offs_m < N
    mask = m_ok[:, None] & (offs_v < width)[None, :]
    o = tl.load(Out + b * N * v_total + offs_m[:, None] * v_total + v_off + offs_v[None, :],
                mask=mask, other=0.0)
    do = tl.load(DO + b * stride_dob + offs_m[:, None] * stride_don + (v_off + offs_v[None, :]) * stride_doc,
                 mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + pid_bh.to(tl.int64) * N + offs_m, delta, mask=m_ok)


@triton.autotune(configs=_DKDV_CONFIGS, key=_KEY)
@triton.jit(do_not_specialize=_NOT_SPECIALISED_BWD)
def _attn_bwd_dkdv(
    Q, K, V, DO, Lse, Delta, DK, DV, Heads,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vn, stride_vc,
    stride_dob, stride_don, stride_doc,
    H, N, n_kept, v_total, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_V: tl.constexpr,
    QK_ALIGN: tl.constexpr, V_ALIGN: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program per key block: dV = Pᵀ dO and dK = dSᵀ Q · scale, over all query blocks.
    Works on transposed tiles (keys along rows) so both are plain row-block results."""
    stride_qb, stride_qh, stride_qn = _aligned(stride_qb, QK_ALIGN), _aligned(stride_qh, QK_ALIGN), _aligned(stride_qn, QK_ALIGN)
    stride_kb, stride_kh, stride_kn = _aligned(stride_kb, QK_ALIGN), _aligned(stride_kh, QK_ALIGN), _aligned(stride_kn, QK_ALIGN)
    stride_vb, stride_vn, v_total = _aligned(stride_vb, V_ALIGN), _aligned(stride_vn, V_ALIGN), _aligned(v_total, V_ALIGN)
    stride_dob, stride_don = _aligned(stride_dob, V_ALIGN), _aligned(stride_don, V_ALIGN)
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // n_kept).to(tl.int64)
    h, v_off, width = _kept_head(Heads, pid_bh % n_kept, V_ALIGN)
    qk_scale = sm_scale * LOG2E

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_v = tl.arange(0, BLOCK_V)
    n_ok = offs_n < N
    d_ok = offs_d < HEAD_DIM
    v_ok = offs_v < width

    k = tl.load(K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                mask=n_ok[:, None] & d_ok[None, :], other=0.0)                 # [BLOCK_N, BLOCK_D]
    v = tl.load(V + b * stride_vb + offs_n[:, None] * stride_vn + (v_off + offs_v[None, :]) * stride_vc,
                mask=n_ok[:, None] & v_ok[None, :], other=0.0)                 # [BLOCK_N, BLOCK_V]
    q_base = Q + b * stride_qb + h * stride_qh
    do_base = DO + b * stride_dob + v_off * stride_doc
    row_base = pid_bh.to(tl.int64) * N          # lse and delta: [B, kept heads, N]

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
    for start_m in range(0, N, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_ok = offs_m < N
        qT = tl.load(q_base + offs_m[None, :] * stride_qn + offs_d[:, None] * stride_qd,
                     mask=d_ok[:, None] & m_ok[None, :], other=0.0)            # [BLOCK_D, BLOCK_M]
        # lse = +inf on query rows >= N makes their probabilities exactly 0.
        lse = tl.load(Lse + row_base + offs_m, mask=m_ok, other=float("inf"))
        pT = tl.math.exp2(tl.dot(k, qT, input_precision=DOT_PRECISION) * qk_scale - lse[None, :])
        do = tl.load(do_base + offs_m[:, None] * stride_don + offs_v[None, :] * stride_doc,
                     mask=m_ok[:, None] & v_ok[None, :], other=0.0)            # [BLOCK_M, BLOCK_V]
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        delta = tl.load(Delta + row_base + offs_m, mask=m_ok, other=0.0)
        dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)         # [BLOCK_N, BLOCK_M]
        dsT = pT * (dpT - delta[None, :])
        dk = tl.dot(dsT.to(qT.dtype), tl.trans(qT), dk, input_precision=DOT_PRECISION)

    dk = dk * sm_scale
    # dK is [B, H, N, D] contiguous; dV is packed like V, [B, N, v_total] contiguous.
    tl.store(DK + ((b * H + h) * N + offs_n[:, None]) * HEAD_DIM + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=n_ok[:, None] & d_ok[None, :])
    tl.store(DV + b * N * v_total + offs_n[:, None] * v_total + v_off + offs_v[None, :],
             dv.to(DV.dtype.element_ty), mask=n_ok[:, None] & v_ok[None, :])


@triton.autotune(configs=_DQ_CONFIGS, key=_KEY)
@triton.jit(do_not_specialize=_NOT_SPECIALISED_BWD)
def _attn_bwd_dq(
    Q, K, V, DO, Lse, Delta, DQ, Heads,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vn, stride_vc,
    stride_dob, stride_don, stride_doc,
    H, N, n_kept, v_total, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_V: tl.constexpr,
    QK_ALIGN: tl.constexpr, V_ALIGN: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program per query block: dQ = dS K · scale, over all key blocks (v_total: the
    shared launch arguments; dQ never needs it)."""
    stride_qb, stride_qh, stride_qn = _aligned(stride_qb, QK_ALIGN), _aligned(stride_qh, QK_ALIGN), _aligned(stride_qn, QK_ALIGN)
    stride_kb, stride_kh, stride_kn = _aligned(stride_kb, QK_ALIGN), _aligned(stride_kh, QK_ALIGN), _aligned(stride_kn, QK_ALIGN)
    stride_vb, stride_vn = _aligned(stride_vb, V_ALIGN), _aligned(stride_vn, V_ALIGN)
    stride_dob, stride_don = _aligned(stride_dob, V_ALIGN), _aligned(stride_don, V_ALIGN)
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // n_kept).to(tl.int64)
    h, v_off, width = _kept_head(Heads, pid_bh % n_kept, V_ALIGN)
    qk_scale = sm_scale * LOG2E

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_v = tl.arange(0, BLOCK_V)
    m_ok = offs_m < N
    d_ok = offs_d < HEAD_DIM
    v_ok = offs_v < width
    row_base = pid_bh.to(tl.int64) * N          # lse and delta: [B, kept heads, N]

    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)                 # [BLOCK_M, BLOCK_D]
    do = tl.load(DO + b * stride_dob + offs_m[:, None] * stride_don + (v_off + offs_v[None, :]) * stride_doc,
                 mask=m_ok[:, None] & v_ok[None, :], other=0.0)                # [BLOCK_M, BLOCK_V]
    lse = tl.load(Lse + row_base + offs_m, mask=m_ok, other=0.0)
    delta = tl.load(Delta + row_base + offs_m, mask=m_ok, other=0.0)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + v_off * stride_vc

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        kT = tl.load(k_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                     mask=d_ok[:, None] & n_ok[None, :], other=0.0)            # [BLOCK_D, BLOCK_N]
        vT = tl.load(v_base + offs_n[None, :] * stride_vn + offs_v[:, None] * stride_vc,
                     mask=v_ok[:, None] & n_ok[None, :], other=0.0)            # [BLOCK_V, BLOCK_N]
        p = tl.math.exp2(tl.dot(q, kT, input_precision=DOT_PRECISION) * qk_scale - lse[:, None])
        p = tl.where(n_ok[None, :], p, 0.0)     # keys >= N are not part of the softmax
        dp = tl.dot(do, vT, input_precision=DOT_PRECISION)                    # [BLOCK_M, BLOCK_N]
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(kT.dtype), tl.trans(kT), dq, input_precision=DOT_PRECISION)

    dq = dq * sm_scale
    tl.store(DQ + ((b * H + h) * N + offs_m[:, None]) * HEAD_DIM + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


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


def _forward(q, k, v, widths: Tuple[int, ...], scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
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
        _attn_fwd[grid](q, k, v, out, lse, table, *strides, H, N, n_kept, v_total, scale, **meta)
    return out, lse


def _backward(do, q, k, v, out, lse, widths: Tuple[int, ...], scale: float,
              need_dq: bool, need_dkv: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, H, N, D = q.shape
    v_total = sum(widths)
    table, _ = _head_table(widths, q.device)
    n_kept = table.shape[0]
    dropped = [h for h, w in enumerate(widths) if w == 0]

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
    if n_kept == 0 or B == 0 or N == 0 or not (need_dq or need_dkv):
        return dq, dk, dv

    strides, meta = _launch_args(q, k, v, do, widths)
    delta = new_empty(lse.shape, device=lse.device, dtype=lse.dtype)
    with on_device(q):
        _attn_bwd_delta[(triton.cdiv(N, _DELTA_BLOCK_M), B * n_kept)](
            out, do, delta, table, *strides[-3:], H, N, n_kept, v_total,
            V_ALIGN=meta["V_ALIGN"], BLOCK_V=meta["BLOCK_V"], BLOCK_M=_DELTA_BLOCK_M,
        )
        if need_dkv:
            grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), B * n_kept)  # noqa: E731
            _attn_bwd_dkdv[grid](q, k, v, do, lse, delta, dk, dv, table, *strides,
                                 H, N, n_kept, v_total, scale, **meta)
        if need_dq:
            grid = lambda meta: (triton.cdiv(N, meta["BLOCK_M"]), B * n_kept)  # noqa: E731
            _attn_bwd_dq[grid](q, k, v, do, lse, delta, dq, table, *strides,
                               H, N, n_kept, v_total, scale, **meta)
    return dq, dk, dv


# ---------------------------------------------------------------------------------------
# Custom ops and autograd
# ---------------------------------------------------------------------------------------
@torch.library.custom_op("vtp::packed_attention_fwd", mutates_args=())
def packed_attention_fwd_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, v_widths: List[int], scale: float
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(out [B, N, sum(v_widths)], lse [B, kept heads, N] fp32, base 2)."""
    return _forward(q, k, v, tuple(v_widths), scale)


@packed_attention_fwd_op.register_fake
def packed_attention_fwd_fake(q, k, v, v_widths, scale):
    B, _, N, _ = q.shape
    n_kept = sum(1 for w in v_widths if w > 0)
    return v.new_empty(B, N, sum(v_widths)), q.new_empty(B, n_kept, N, dtype=torch.float32)


@torch.library.custom_op("vtp::packed_attention_bwd", mutates_args=())
def packed_attention_bwd_op(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    out: torch.Tensor, lse: torch.Tensor, v_widths: List[int], scale: float,
    need_dq: bool, need_dkv: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv); a gradient not asked for comes back as an empty tensor."""
    return _backward(grad_out, q, k, v, out, lse, tuple(v_widths), scale, need_dq, need_dkv)


@packed_attention_bwd_op.register_fake
def packed_attention_bwd_fake(grad_out, q, k, v, out, lse, v_widths, scale, need_dq, need_dkv):
    return (q.new_empty(q.shape) if need_dq else q.new_empty(0),
            k.new_empty(k.shape) if need_dkv else q.new_empty(0),
            v.new_empty(v.shape[0], v.shape[1], sum(v_widths)) if need_dkv else q.new_empty(0))


def _setup_context(ctx, inputs, output):
    q, k, v, v_widths, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.v_widths, ctx.scale = v_widths, scale
    ctx.mark_non_differentiable(lse)


def _backward_rule(ctx, grad_out, _grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    need_q, need_k, need_v = ctx.needs_input_grad[:3]
    dq, dk, dv = packed_attention_bwd_op(
        grad_out, q, k, v, out, lse, ctx.v_widths, ctx.scale, need_q, need_k or need_v)
    return (dq if need_q else None, dk if need_k else None, dv if need_v else None, None, None)


packed_attention_fwd_op.register_autograd(_backward_rule, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------------------
def packed_attention_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, v_widths: Sequence[int], scale: Optional[float] = None
) -> torch.Tensor:
    """Triton twin of ``reference.packed_attention``: q, k ``[B, H, N, Dqk]``, v ``[B, N, sum(v_widths)]``
    packed per head (a width may exceed Dqk); returns ``[B, N, sum(v_widths)]`` packed the
    same way. Any strides."""
    widths = reference.check_value_layout(q, v, v_widths)
    D = q.shape[-1]
    if k.shape != q.shape:
        raise ValueError(f"k: expected shape {list(q.shape)} like q, got {list(k.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"q, k, v: expected one dtype among float16, bfloat16, float32; "
                         f"got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v: expected one device, got {q.device}, {k.device}, {v.device}")
    if scale is None:
        scale = reference.default_scale(D)
    out, _ = packed_attention_fwd_op(q, k, v, widths, float(scale))
    return out
