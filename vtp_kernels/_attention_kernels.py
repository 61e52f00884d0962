"""The Triton kernels of ``packed_attention``: forward, and the backward's delta, dK/dV and dQ.

What they compute, the kept-heads table, the alignments they are promised and what the
sm_90a compiler makes of them are described in ``vtp_kernels._packed_attention``, which
launches them; this module holds only the kernels and their launch configurations.
"""
from typing import List, Sequence, Tuple

import triton
import triton.language as tl

from ._utils import autotune_configs

__all__ = ["DELTA_BLOCK_M", "attn_bwd_delta", "attn_bwd_dkdv", "attn_bwd_dq", "attn_fwd"]

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
DELTA_BLOCK_M = 128
_KEY = ["N", "HEAD_DIM", "BLOCK_V", "GATED"]
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


@triton.jit
def _gate_row(Gate, h, offs_d, d_ok, HEAD_DIM: tl.constexpr):
    """Head h's query/key gate, fp32 [BLOCK_D] (``Gate`` is [H, HEAD_DIM], contiguous).
    A q tile is multiplied by it in fp32 and rounded back to q's dtype once, as the
    reference's ``(q * gate).to(q.dtype)`` rounds it; the scores then come out of the one
    dot as before."""
    return tl.load(Gate + h * HEAD_DIM + offs_d, mask=d_ok, other=0.0).to(tl.float32)


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
def attn_fwd(
    Q, K, V, Out, Lse, Heads, Gate,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vn, stride_vc,
    H, N, n_kept, v_total, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_V: tl.constexpr,
    QK_ALIGN: tl.constexpr, V_ALIGN: tl.constexpr, DOT_PRECISION: tl.constexpr, GATED: tl.constexpr,
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
    if GATED:
        q = (q.to(tl.float32) * _gate_row(Gate, h, offs_d, d_ok, HEAD_DIM)[None, :]).to(q.dtype)
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
def attn_bwd_delta(
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
def attn_bwd_dkdv(
    Q, K, V, DO, Lse, Delta, DK, DV, Heads, Gate,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vn, stride_vc,
    stride_dob, stride_don, stride_doc,
    H, N, n_kept, v_total, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_V: tl.constexpr,
    QK_ALIGN: tl.constexpr, V_ALIGN: tl.constexpr, DOT_PRECISION: tl.constexpr, GATED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program per key block: dV = Pᵀ dO and dK = dSᵀ Q · scale, over all query blocks
    (GATED: Q times the gate, which is what the scores were made of). Works on transposed
    tiles (keys along rows) so both are plain row-block results."""
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
    if GATED:
        gate = _gate_row(Gate, h, offs_d, d_ok, HEAD_DIM)

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
    for start_m in range(0, N, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_ok = offs_m < N
        qT = tl.load(q_base + offs_m[None, :] * stride_qn + offs_d[:, None] * stride_qd,
                     mask=d_ok[:, None] & m_ok[None, :], other=0.0)            # [BLOCK_D, BLOCK_M]
        if GATED:
            qT = (qT.to(tl.float32) * gate[:, None]).to(qT.dtype)
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


# The autotuner times every config on the real buffers: DGate is zeroed after that, since
# a config with smaller query blocks writes rows the chosen one does not.
@triton.autotune(configs=_DQ_CONFIGS, key=_KEY, reset_to_zero=["DGate"])
@triton.jit(do_not_specialize=_NOT_SPECIALISED_BWD + ["dgate_rows"])
def attn_bwd_dq(
    Q, K, V, DO, Lse, Delta, DQ, Heads, Gate, DGate, dgate_rows,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vn, stride_vc,
    stride_dob, stride_don, stride_doc,
    H, N, n_kept, v_total, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_V: tl.constexpr,
    QK_ALIGN: tl.constexpr, V_ALIGN: tl.constexpr, DOT_PRECISION: tl.constexpr, GATED: tl.constexpr,
    GATE_GRAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program per query block: dQ = dS K · scale, over all key blocks (v_total: the
    shared launch arguments; dQ never needs it).

    GATED: the scores were made of G = Q · a (a the head's gate), so dQ = dG · a; with
    GATE_GRAD this block's share of the gate's gradient, sum over its rows of Q ⊙ dG, goes
    to its own row of DGate ([B · kept heads, dgate_rows >= query blocks, HEAD_DIM], fp32, zeroed),
    which the host sums: one writer per element, no atomics."""
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
    q_in = q
    if GATED:
        gate = _gate_row(Gate, h, offs_d, d_ok, HEAD_DIM)
        q = (q.to(tl.float32) * gate[None, :]).to(q.dtype)
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
    if GATED:
        if GATE_GRAD:   # rows >= N loaded q = 0: they add nothing to the gate's gradient
            tl.store(DGate + (pid_bh.to(tl.int64) * dgate_rows + pid_m) * HEAD_DIM + offs_d,
                     tl.sum(q_in.to(tl.float32) * dq, 0), mask=d_ok)
        dq = dq * gate[None, :]
    tl.store(DQ + ((b * H + h) * N + offs_m[:, None]) * HEAD_DIM + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
