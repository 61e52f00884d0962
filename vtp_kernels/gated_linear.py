"""Gated linear layer ``y = (x * a) @ W.T + b`` at the cost of a plain linear layer.

VTP puts a learnable score ``a`` (one per input dimension) in front of a linear layer.
Written naively, the gate costs an extra pass over the activations in the forward
(``x * a``) and another in the backward (``da = sum over rows of x * (dy @ W)``), and
autograd keeps ``x * a`` alive as an extra activation. None of that is needed:

    y   = x @ (W * a).T + b       the gate scales each W tile inside the GEMM, never x
    dx  = (dy @ W) * a            a column scale in the epilogue of the input-gradient GEMM
    G   = dy.T @ x                the ordinary weight-gradient GEMM
    dW  = G * a                   a column scale in its epilogue
    da  = sum_n (G * W)[n, :]     a reduction over the tile's rows in the same epilogue

so the layer runs exactly the three GEMMs of ``nn.Linear`` and saves only x, W and a.

``da`` is reduced without atomics, so it is bitwise reproducible: every program of the
weight-gradient kernel owns one (N tile, K tile) pair and writes the column sums of its
tile, one row per slab of DGATE_ROWS rows of W, to an fp32 ``[N / DGATE_ROWS, K]`` buffer
which one ``sum(0)`` then reduces.

Shapes: x ``[..., K]`` (any leading dims, any strides), W ``[N, K]``, a ``[K]``,
b ``[N]`` or None. x, W and b share a dtype: fp16 or bf16 (tensor cores), fp32, or fp64
(for gradcheck); the GEMMs accumulate in fp32 (fp64 for fp64). The gate may be of any
float dtype, which keeps it in fp32 under autocast.

The ops are ``torch.library`` custom ops (``vtp::gated_linear`` and its two backward
ops), so ``torch.compile`` sees them as single opaque nodes and never graph-breaks.
"""
import contextlib
import math
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .backend import interpreter_enabled

__all__ = ["gated_linear_triton"]


# %%
# Addressing the rows of an activation
# ------------------------------------
# x arrives as ``[..., K]`` with arbitrary strides: a slice, a transposed view, the
# stride-0 gradient of a ``sum()``. Copying it to a contiguous ``[M, K]`` would cost the
# very pass over activations this file exists to avoid, so the kernels address row ``m``
# through two nested strided levels instead, which covers every 2-D and 3-D tensor:
#
#     offset(m) = (m // rows_per_group) * stride_group + (m % rows_per_group) * stride_row
#
# When the leading dims flatten into one, ``rows_per_group`` is 1; Triton specializes an
# integer argument equal to 1 into a constant, so the division and modulo fold away.


@triton.jit
def _row_offsets(rows, rows_per_group, stride_group, stride_row):
    # int64: M * K passes 2**31 for DeiT-B's fc2 input (K = 3072) from batch ~3500 on.
    rows = rows.to(tl.int64)
    return (rows // rows_per_group) * stride_group + (rows % rows_per_group) * stride_row


def _row_layout(t: torch.Tensor) -> Optional[Tuple[int, int, int]]:
    """``(rows_per_group, stride_group, stride_row)`` of t's leading dims, or None if they
    need more than two strided levels."""
    levels = []  # (size, stride), outermost first, size-1 dims dropped
    for size, stride in zip(t.shape[:-1], t.stride()[:-1]):
        if size == 1:
            continue
        if levels and levels[-1][1] == stride * size:
            levels[-1] = (levels[-1][0] * size, stride)
        else:
            levels.append((size, stride))
    if not levels:
        return 1, 0, 0
    if len(levels) == 1:
        return 1, levels[0][1], 0
    if len(levels) == 2:
        return levels[1][0], levels[0][1], levels[1][1]
    return None


def _rows(t: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int, int]]:
    """t, or a contiguous copy of it when its rows do not fit two strided levels (4-D and
    higher views that no reshape can flatten; rare), with the row layout to pass."""
    layout = _row_layout(t)
    if layout is None:
        t = t.contiguous()
        layout = _row_layout(t)
    return t, layout


# %%
# Launch configurations
# ---------------------
# On a GPU each kernel is autotuned over a short list keyed on (M, N, K): large tiles for
# the DeiT shapes (M ~ 50k rows), smaller ones that still fill 100+ SMs when N * K is small
# (the weight-gradient kernel has only (N / BLOCK_N) * (K / BLOCK_K) programs). The
# autotuner skips a config whose shared memory does not fit the device (H100: 228 KB):
# compiled for sm_90, the forward's configs all fit with 16-bit inputs, but the input
# gradient pipelines BLOCK_M x BLOCK_N and BLOCK_N x BLOCK_K tiles, so 128 x 256 x 64 does
# not fit it even in bf16, and fp32 / fp64 inputs lose most of the large tiles. Every kernel
# keeps at least one config that fits in every dtype.
# Under TRITON_INTERPRET=1 the autotuner cannot benchmark several configs, so one config is
# used. Its cost there is a few milliseconds per program plus numpy's unblocked matmul over
# the whole padded tile: 64 x 64 x 64 was the fastest on the test shapes, ahead of 128 and 32.


def _config(block_m, block_n, block_k, stages, warps, group=8):
    return triton.Config(
        {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_SIZE": group},
        num_stages=stages, num_warps=warps,
    )


_INTERPRETER_CONFIGS = [_config(64, 64, 64, 1, 4)]

# Forward (tiles M x N, loop over K) and input gradient (tiles M x K, loop over N).
_ROWS_CONFIGS = [
    _config(128, 256, 64, 3, 8),
    _config(128, 128, 64, 4, 8),
    _config(128, 128, 32, 4, 4),
    _config(64, 256, 32, 4, 4),
    _config(128, 64, 32, 4, 4),
    _config(64, 128, 64, 4, 4),
    # Small enough for every dtype in both kernels: with fp32 operands only two of the
    # configs above fit in the input-gradient kernel (whose pipelined tiles are
    # BLOCK_M x BLOCK_N and BLOCK_N x BLOCK_K), with fp64 none would.
    _config(64, 64, 32, 3, 4),
]

# Weight gradient (tiles N x K, loop over the M rows).
_WEIGHT_CONFIGS = [
    _config(64, 128, 128, 3, 8),
    _config(64, 128, 64, 4, 4),
    _config(64, 64, 128, 4, 4),
    _config(64, 64, 64, 4, 4),
    _config(32, 64, 64, 5, 4),
]


def _configs(cuda_configs):
    return _INTERPRETER_CONFIGS if interpreter_enabled() else cuda_configs


@triton.jit
def _grouped_tile(pid, num_rows, num_cols, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
                  GROUP_SIZE: tl.constexpr):
    # Programs launched together walk GROUP_SIZE row tiles column by column, so the
    # column operand they share is read from L2 rather than from HBM.
    num_pid_rows = tl.cdiv(num_rows, BLOCK_ROWS)
    num_pid_cols = tl.cdiv(num_cols, BLOCK_COLS)
    num_pid_in_group = GROUP_SIZE * num_pid_cols
    first_pid_row = (pid // num_pid_in_group) * GROUP_SIZE
    group_size = min(num_pid_rows - first_pid_row, GROUP_SIZE)
    pid_row = first_pid_row + ((pid % num_pid_in_group) % group_size)
    pid_col = (pid % num_pid_in_group) // group_size
    return pid_row, pid_col


# %%
# Forward: y = x @ (W * a).T + b
# ------------------------------
# The gate multiplies the [BLOCK_K, BLOCK_N] W tile after it is loaded: BLOCK_N * BLOCK_K
# multiplies per K step against BLOCK_M * BLOCK_N * BLOCK_K multiply-adds of the dot.
# Row and column offsets wrap modulo M and N so that every load is in bounds without a
# mask on those dims (the wrapped rows are computed and never stored); the K remainder is
# masked to zero on both operands so it adds nothing.


@triton.autotune(configs=_configs(_ROWS_CONFIGS), key=["M", "N", "K"])
@triton.jit
def _forward_kernel(
    x_ptr, w_ptr, gate_ptr, bias_ptr, y_ptr,
    M, N, K,
    x_rows_per_group, stride_x_group, stride_x_row, stride_xk,
    stride_wn, stride_wk, stride_gate, stride_ym,
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_SIZE: tl.constexpr,
):
    pid_m, pid_n = _grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_SIZE)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)

    x_rows = _row_offsets(rows % M, x_rows_per_group, stride_x_group, stride_x_row)
    x_ptrs = x_ptr + x_rows[:, None] + offs_k[None, :] * stride_xk
    w_ptrs = w_ptr + (cols % N)[None, :] * stride_wn + offs_k[:, None] * stride_wk
    gate_ptrs = gate_ptr + offs_k * stride_gate

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    for k_start in range(0, K, BLOCK_K):
        k_in = offs_k < K - k_start
        x = tl.load(x_ptrs, mask=k_in[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_in[:, None], other=0.0)
        gate = tl.load(gate_ptrs, mask=k_in, other=0.0).to(ACC_DTYPE)
        w = (w.to(ACC_DTYPE) * gate[:, None]).to(x.dtype)
        acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
        gate_ptrs += BLOCK_K * stride_gate

    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(ACC_DTYPE)[None, :]
    y_ptrs = y_ptr + rows.to(tl.int64)[:, None] * stride_ym + cols[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=(rows < M)[:, None] & (cols < N)[None, :])


# %%
# Input gradient: dx = (dy @ W) * a
# ---------------------------------
# A plain GEMM over N whose epilogue scales column k of the result by a[k]; tiles are
# M x K here, so "columns" are the K dim and the loop runs over N.


@triton.autotune(configs=_configs(_ROWS_CONFIGS), key=["M", "N", "K"])
@triton.jit
def _input_grad_kernel(
    dy_ptr, w_ptr, gate_ptr, dx_ptr,
    M, N, K,
    dy_rows_per_group, stride_dy_group, stride_dy_row, stride_dyn,
    stride_wn, stride_wk, stride_gate, stride_dxm,
    DOT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_SIZE: tl.constexpr,
):
    pid_m, pid_k = _grouped_tile(tl.program_id(0), M, K, BLOCK_M, BLOCK_K, GROUP_SIZE)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.arange(0, BLOCK_N)

    dy_rows = _row_offsets(rows % M, dy_rows_per_group, stride_dy_group, stride_dy_row)
    dy_ptrs = dy_ptr + dy_rows[:, None] + offs_n[None, :] * stride_dyn
    w_ptrs = w_ptr + offs_n[:, None] * stride_wn + (cols % K)[None, :] * stride_wk

    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=ACC_DTYPE)
    for n_start in range(0, N, BLOCK_N):
        n_in = offs_n < N - n_start
        dy = tl.load(dy_ptrs, mask=n_in[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=n_in[:, None], other=0.0)
        acc = tl.dot(dy, w.to(dy.dtype), acc, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
        dy_ptrs += BLOCK_N * stride_dyn
        w_ptrs += BLOCK_N * stride_wn

    k_in = cols < K
    acc *= tl.load(gate_ptr + cols * stride_gate, mask=k_in, other=0.0).to(ACC_DTYPE)[None, :]
    dx_ptrs = dx_ptr + rows.to(tl.int64)[:, None] * stride_dxm + cols[None, :]
    tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=(rows < M)[:, None] & k_in[None, :])


# %%
# Weight and gate gradients: G = dy.T @ x, dW = G * a, da = sum_n G * W
# ---------------------------------------------------------------------
# Tiles are N x K and the loop runs over the M rows, so here M is the masked dim. The
# epilogue holds the finished fp32 tile G: scaling it by the gate gives dW, and its
# product with the matching W tile, summed over the tile's rows, is this tile's share of
# da. Rows past N (wrapped loads) are cancelled by loading W as zero there.
# The partial sums go out per slab of DGATE_ROWS (the smallest BLOCK_N on offer) rows of
# W rather than per tile, so the buffer's layout does not depend on the config the
# autotuner picks: each of its rows is written by exactly one program on every launch,
# and it needs no zeroing, even after autotuning ran other configs on it.


@triton.autotune(configs=_configs(_WEIGHT_CONFIGS), key=["M", "N", "K"])
@triton.jit
def _weight_grad_kernel(
    dy_ptr, x_ptr, w_ptr, gate_ptr, dw_ptr, dgate_partial_ptr,
    M, N, K,
    dy_rows_per_group, stride_dy_group, stride_dy_row, stride_dyn,
    x_rows_per_group, stride_x_group, stride_x_row, stride_xk,
    stride_wn, stride_wk, stride_gate, stride_dwn,
    DOT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr, DGATE_ROWS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_SIZE: tl.constexpr,
):
    pid_n, pid_k = _grouped_tile(tl.program_id(0), N, K, BLOCK_N, BLOCK_K, GROUP_SIZE)
    n_offs = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_offs = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_m = tl.arange(0, BLOCK_M)
    dy_cols = (n_offs % N) * stride_dyn
    x_cols = (k_offs % K) * stride_xk

    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=ACC_DTYPE)
    for m_start in range(0, M, BLOCK_M):
        rows = m_start + offs_m
        m_in = rows < M
        # Out-of-range rows are masked, not wrapped: a wrapped row would be summed into G.
        dy_rows = _row_offsets(rows, dy_rows_per_group, stride_dy_group, stride_dy_row)
        x_rows = _row_offsets(rows, x_rows_per_group, stride_x_group, stride_x_row)
        dy_t = tl.load(dy_ptr + dy_cols[:, None] + dy_rows[None, :], mask=m_in[None, :], other=0.0)
        x = tl.load(x_ptr + x_rows[:, None] + x_cols[None, :], mask=m_in[:, None], other=0.0)
        acc = tl.dot(dy_t, x.to(dy_t.dtype), acc, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)

    n_in = n_offs < N
    k_in = k_offs < K
    gate = tl.load(gate_ptr + k_offs * stride_gate, mask=k_in, other=0.0).to(ACC_DTYPE)
    w = tl.load(w_ptr + n_offs[:, None] * stride_wn + k_offs[None, :] * stride_wk,
                mask=n_in[:, None] & k_in[None, :], other=0.0).to(ACC_DTYPE)
    tl.store(dw_ptr + n_offs[:, None] * stride_dwn + k_offs[None, :],
             (acc * gate[None, :]).to(dw_ptr.dtype.element_ty), mask=n_in[:, None] & k_in[None, :])
    SLABS: tl.constexpr = BLOCK_N // DGATE_ROWS
    partial = tl.sum(tl.reshape(acc * w, (SLABS, DGATE_ROWS, BLOCK_K)), axis=1)
    slabs = pid_n * SLABS + tl.arange(0, SLABS)
    tl.store(dgate_partial_ptr + slabs[:, None] * K + k_offs[None, :], partial,
             mask=(slabs < tl.cdiv(N, DGATE_ROWS))[:, None] & k_in[None, :])


# %%
# Launchers
# ---------


def _dot_precision(dtype: torch.dtype) -> str:
    # torch's fp32 matmuls are full precision unless the user allowed TF32; follow suit.
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


def _acc_dtype(dtype: torch.dtype):
    # fp64 exists so that gradcheck can hold the kernels to the exact gradient.
    return tl.float64 if dtype == torch.float64 else tl.float32


def _on_device(t: torch.Tensor):
    # Triton launches on the current CUDA device, which need not be t's.
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _forward(x, weight, gate, bias):
    N, K = weight.shape
    x, (x_rpg, x_sg, x_sr) = _rows(x)
    M = math.prod(x.shape[:-1])
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    if M and N:
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
        with _on_device(x):
            _forward_kernel[grid](
                x, weight, gate, bias if bias is not None else y, y,
                M, N, K,
                x_rpg, x_sg, x_sr, x.stride(-1),
                weight.stride(0), weight.stride(1), gate.stride(0), y.stride(0),
                HAS_BIAS=bias is not None,
                DOT_PRECISION=_dot_precision(x.dtype), ACC_DTYPE=_acc_dtype(x.dtype),
            )
    return y.view(*x.shape[:-1], N)


def _input_grad(dy, weight, gate):
    N, K = weight.shape
    dy, (dy_rpg, dy_sg, dy_sr) = _rows(dy)
    M = math.prod(dy.shape[:-1])
    dx = torch.empty((M, K), device=dy.device, dtype=dy.dtype)
    if M and K:
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(K, meta["BLOCK_K"]),)
        with _on_device(dy):
            _input_grad_kernel[grid](
                dy, weight, gate, dx,
                M, N, K,
                dy_rpg, dy_sg, dy_sr, dy.stride(-1),
                weight.stride(0), weight.stride(1), gate.stride(0), dx.stride(0),
                DOT_PRECISION=_dot_precision(dy.dtype), ACC_DTYPE=_acc_dtype(dy.dtype),
            )
    return dx.view(*dy.shape[:-1], K)


def _weight_grad(dy, x, weight, gate):
    N, K = weight.shape
    dy, (dy_rpg, dy_sg, dy_sr) = _rows(dy)
    x, (x_rpg, x_sg, x_sr) = _rows(x)
    M = math.prod(dy.shape[:-1])
    dw = torch.empty((N, K), device=weight.device, dtype=weight.dtype)
    # Every BLOCK_N is a power of two, so a multiple of the smallest one.
    dgate_rows = min(c.kwargs["BLOCK_N"] for c in _weight_grad_kernel.configs)
    dgate_partial = torch.empty((triton.cdiv(N, dgate_rows), K), device=gate.device,
                                dtype=torch.promote_types(dy.dtype, torch.float32))
    if N and K:
        grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]) * triton.cdiv(K, meta["BLOCK_K"]),)
        with _on_device(dy):
            _weight_grad_kernel[grid](
                dy, x, weight, gate, dw, dgate_partial,
                M, N, K,
                dy_rpg, dy_sg, dy_sr, dy.stride(-1),
                x_rpg, x_sg, x_sr, x.stride(-1),
                weight.stride(0), weight.stride(1), gate.stride(0), dw.stride(0),
                DOT_PRECISION=_dot_precision(dy.dtype), ACC_DTYPE=_acc_dtype(dy.dtype),
                DGATE_ROWS=dgate_rows,
            )
    return dw, dgate_partial.sum(0).to(gate.dtype)


# %%
# Custom ops and autograd
# -----------------------
# Each GEMM is its own custom op with a fake (shape-only) twin, so torch.compile traces
# through the layer, forward and backward, without a graph break. Outputs are always
# freshly allocated and contiguous, in real and fake alike.


@torch.library.custom_op("vtp::gated_linear", mutates_args=())
def _gated_linear_op(x: torch.Tensor, weight: torch.Tensor, gate: torch.Tensor,
                     bias: Optional[torch.Tensor]) -> torch.Tensor:
    return _forward(x, weight, gate, bias)


@_gated_linear_op.register_fake
def _(x, weight, gate, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.custom_op("vtp::gated_linear_input_grad", mutates_args=())
def _input_grad_op(dy: torch.Tensor, weight: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    return _input_grad(dy, weight, gate)


@_input_grad_op.register_fake
def _(dy, weight, gate):
    return dy.new_empty((*dy.shape[:-1], weight.shape[1]))


@torch.library.custom_op("vtp::gated_linear_weight_grad", mutates_args=())
def _weight_grad_op(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                    gate: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    return _weight_grad(dy, x, weight, gate)


@_weight_grad_op.register_fake
def _(dy, x, weight, gate):
    return weight.new_empty(weight.shape), gate.new_empty(gate.shape)


def _setup_context(ctx, inputs, output):
    x, weight, gate, bias = inputs
    ctx.save_for_backward(x, weight, gate)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, dy):
    x, weight, gate = ctx.saved_tensors
    needs_x, needs_weight, needs_gate, needs_bias = ctx.needs_input_grad
    dx = dw = dgate = dbias = None
    if needs_x:
        dx = _input_grad_op(dy, weight, gate)
    if needs_weight or needs_gate:
        # dW and da come out of one GEMM; asking for either costs the same.
        dw, dgate = _weight_grad_op(dy, x, weight, gate)
        dw = dw if needs_weight else None
        dgate = dgate if needs_gate else None
    if needs_bias:
        rows = tuple(range(dy.dim() - 1))
        acc_dtype = torch.promote_types(dy.dtype, torch.float32)
        dbias = (dy.sum(dim=rows, dtype=acc_dtype) if rows else dy).to(ctx.bias_dtype)
    return dx, dw, dgate, dbias


_gated_linear_op.register_autograd(_backward, setup_context=_setup_context)


# %%
# Public entry point
# ------------------


def gated_linear_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    gate: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``(x * gate) @ weight.T + bias`` by Triton kernels; see ``reference.gated_linear``.

    Under autocast, x, weight and bias are cast to the autocast dtype as ``F.linear``
    would cast them; the gate keeps its dtype (the kernels read it as fp32 either way).
    """
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    N, K = weight.shape
    if x.shape[-1:] != (K,) or gate.shape != (K,) or (bias is not None and bias.shape != (N,)):
        raise ValueError(
            f"gated_linear: expected x [..., {K}], gate [{K}] and bias [{N}] for weight "
            f"[{N}, {K}]; got x {list(x.shape)}, gate {list(gate.shape)}, "
            f"bias {None if bias is None else list(bias.shape)}"
        )
    if any(t is not None and t.device != x.device for t in (weight, gate, bias)):
        raise ValueError(
            f"gated_linear: x, weight, gate and bias must be on one device; got {x.device}, "
            f"{weight.device}, {gate.device}, {None if bias is None else bias.device}"
        )
    if weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        raise TypeError(
            f"gated_linear: x, weight and bias must share a dtype; got {x.dtype}, "
            f"{weight.dtype}, {None if bias is None else bias.dtype}"
        )
    return _gated_linear_op(x, weight, gate, bias)
