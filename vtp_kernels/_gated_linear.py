"""Gated linear layer ``y = (x * a) @ W.T + b`` at the cost of a plain linear layer.

VTP puts a learnable score ``a`` (one per input dimension) in front of a linear layer.
Written naively, the gate costs a pass over the activations in the forward (``x * a``),
another in the backward (``da = sum over rows of x * (dy @ W)``), and autograd keeps
``x * a`` alive. None of that is needed, because the gate can move onto the weight::

    Ws  = W * a                   an N x K pass: the gate scales W's columns
    y   = x @ Ws.T + b            the forward GEMM of nn.Linear, on Ws
    dx  = dy @ Ws                 the input-gradient GEMM of nn.Linear, on Ws
    G   = dy.T @ x                the weight-gradient GEMM of nn.Linear (G = dL/dWs)
    dW  = G * a                   an N x K pass ...
    da  = sum_n (G * W)[n, :]     ... that also reduces the gate's gradient over n

Design. The three GEMMs are exactly those of ``nn.Linear`` and run where nn.Linear runs
them (cuBLAS, through ``F.linear`` and its autograd), so this op can only lose to an
ungated layer by its two N x K passes; Triton does those two passes:

- ``scale_weight`` writes ``Ws = W * a`` already cast to the compute dtype. Under autocast
  that is the one pass nn.Linear spends anyway casting its fp32 weight to bf16, now with
  the gate folded in; the reference spends three (``W * a`` in fp32, written, then cast).
- its backward reads G, W and a once and writes dW and per-tile column sums of
  ``G * W``, which one fixed-shape ``sum(0)`` reduces: dgate is bitwise reproducible, no
  atomics; the reference spends four passes (cast, ``G * a``, ``G * W``, sum).

At DeiT-B shapes (M = 256 * 197 rows) each GEMM does M multiply-adds per element of W, so
these passes are small either way; what the design buys is that the forward and backward
are nn.Linear's own.
Two alternatives were compiled for sm_90a with Triton 3.6 and set aside:

- scaling each W tile inside a Triton GEMM's K loop (this file's earlier design) sends
  the scaled tile back through shared memory, and every ``warp_group_dot`` is followed by
  ``warp_group_dot_wait {pendings = 0}``: the wgmma pipeline never overlaps;
- scaling the x tile in registers keeps wgmma asynchronous (A from registers, W straight
  from shared memory: four k = 16 wgmmas per K step with ``pendings = 3``), but its speed
  would be that of Triton's GEMM against cuBLAS, with M x K multiplies added, and its weight
  gradient would need split-K (``(N / 64) * (K / 64)`` = 36-144 programs for 132 SMs).

Shapes: x ``[..., K]`` (any leading dims, any strides), W ``[N, K]``, a ``[K]``,
b ``[N]`` or None, any strides. x, W and b share a dtype (fp16, bf16, fp32, fp64), except
under autocast, where W keeps its dtype and ``scale_weight`` casts; the gate may be of any
float dtype. Products and sums run in fp32 (fp64 for fp64).
"""
# No `from __future__ import annotations`: custom_op infers its schema from real annotations.
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._utils import accumulator_dtype, interpreter_enabled, new_empty, on_device

__all__ = ["gated_linear_triton"]


# ---------------------------------------------------------------------------------------
# Launch configurations
# ---------------------------------------------------------------------------------------
# Both kernels are memory-bound passes over one [N, K] matrix, tiled BLOCK_N x BLOCK_K with
# K along the contiguous dim. On a GPU, 32 x 128 tiles under 4 warps give every thread four
# 16-byte vectors of a 16-bit matrix and DeiT-B's weights 72-288 programs (132 SMs); the
# interpreter pays per program, so it gets tiles large enough to cover the test shapes in
# one or two programs. The tile is fixed (no autotuning) because the dgate partial buffer
# has one row per BLOCK_N rows of W.
BLOCK_N, BLOCK_K = (64, 256) if interpreter_enabled() else (32, 128)
NUM_WARPS = 4


# ---------------------------------------------------------------------------------------
# Kernels: the folded weight, and the weight and gate gradients
# ---------------------------------------------------------------------------------------

@triton.jit
def _scale_weight_kernel(
    W, Gate, WS,
    N, K, stride_wn, stride_wk, stride_gate,
    ACC_DTYPE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """WS[n, k] = W[n, k] * Gate[k], rounded once to WS's dtype; WS is contiguous."""
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = k < K
    mask = (n < N)[:, None] & k_ok[None, :]
    rows = n.to(tl.int64)[:, None]
    w = tl.load(W + rows * stride_wn + k[None, :] * stride_wk, mask=mask, other=0.0)
    a = tl.load(Gate + k * stride_gate, mask=k_ok, other=0.0)
    ws = w.to(ACC_DTYPE) * a.to(ACC_DTYPE)[None, :]
    tl.store(WS + rows * K + k[None, :], ws.to(WS.dtype.element_ty), mask=mask)


@triton.jit
def _scale_weight_backward_kernel(
    G, W, Gate, DW, DGatePartial,
    N, K, stride_gn, stride_gk, stride_wn, stride_wk, stride_gate,
    COMPUTE_DW: tl.constexpr, COMPUTE_DGATE: tl.constexpr,
    ACC_DTYPE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """DW = G * Gate (contiguous); DGatePartial[pid_n, k] = sum over this tile's rows of G * W."""
    pid_n = tl.program_id(0)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = k < K
    mask = (n < N)[:, None] & k_ok[None, :]
    rows = n.to(tl.int64)[:, None]
    g = tl.load(G + rows * stride_gn + k[None, :] * stride_gk, mask=mask, other=0.0).to(ACC_DTYPE)
    if COMPUTE_DW:
        a = tl.load(Gate + k * stride_gate, mask=k_ok, other=0.0).to(ACC_DTYPE)
        tl.store(DW + rows * K + k[None, :], (g * a[None, :]).to(DW.dtype.element_ty), mask=mask)
    if COMPUTE_DGATE:
        # Rows past N load as 0 in both operands, so they add nothing to the column sums.
        w = tl.load(W + rows * stride_wn + k[None, :] * stride_wk, mask=mask, other=0.0).to(ACC_DTYPE)
        tl.store(DGatePartial + pid_n * K + k, tl.sum(g * w, axis=0), mask=k_ok)


# ---------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------
def _grid(N: int, K: int) -> Tuple[int, int]:
    return triton.cdiv(N, BLOCK_N), triton.cdiv(K, BLOCK_K)


def _scale_weight(weight: torch.Tensor, gate: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    N, K = weight.shape
    ws = new_empty((N, K), dtype=dtype, device=weight.device)
    if N and K:
        with on_device(weight):
            _scale_weight_kernel[_grid(N, K)](
                weight, gate, ws, N, K, weight.stride(0), weight.stride(1), gate.stride(0),
                ACC_DTYPE=accumulator_dtype(dtype), BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, num_warps=NUM_WARPS,
            )
    return ws


def _scale_weight_backward(grad: torch.Tensor, weight: torch.Tensor, gate: torch.Tensor,
                           need_weight: bool, need_gate: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    N, K = weight.shape
    acc_dtype = torch.float64 if torch.float64 in (grad.dtype, weight.dtype) else torch.float32
    dw = new_empty((N, K), dtype=weight.dtype, device=weight.device) if need_weight else weight.new_empty(0)
    partial = new_empty((triton.cdiv(N, BLOCK_N), K), dtype=acc_dtype, device=weight.device) \
        if need_gate else weight.new_empty(0, dtype=acc_dtype)
    if N and K and (need_weight or need_gate):
        with on_device(weight):
            _scale_weight_backward_kernel[_grid(N, K)](
                grad, weight, gate, dw if need_weight else grad, partial if need_gate else grad,
                N, K, grad.stride(0), grad.stride(1), weight.stride(0), weight.stride(1), gate.stride(0),
                COMPUTE_DW=need_weight, COMPUTE_DGATE=need_gate,
                ACC_DTYPE=accumulator_dtype(acc_dtype), BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, num_warps=NUM_WARPS,
            )
    # A fixed-shape sum over the tile axis: the same order on every run.
    dgate = partial.sum(0).to(gate.dtype) if need_gate else gate.new_empty(0)
    return dw, dgate


# ---------------------------------------------------------------------------------------
# Custom ops and autograd
# ---------------------------------------------------------------------------------------
# torch.compile sees each custom op as one opaque node (no graph break) and the GEMMs around
# them as ordinary aten ops. Outputs are freshly allocated and contiguous in real and fake.
@torch.library.custom_op("vtp::gated_linear_scale_weight", mutates_args=())
def scale_weight_op(weight: torch.Tensor, gate: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``(weight * gate[None, :])`` in ``dtype``, products in fp32 (fp64 for fp64)."""
    return _scale_weight(weight, gate, dtype)


@scale_weight_op.register_fake
def scale_weight_fake(weight, gate, dtype):
    return weight.new_empty(weight.shape, dtype=dtype)


@torch.library.custom_op("vtp::gated_linear_scale_weight_backward", mutates_args=())
def scale_weight_backward_op(grad: torch.Tensor, weight: torch.Tensor, gate: torch.Tensor,
                             need_weight: bool, need_gate: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """(dweight, dgate) from ``grad`` = dL/d(weight * gate); one not asked for comes back empty."""
    return _scale_weight_backward(grad, weight, gate, need_weight, need_gate)


@scale_weight_backward_op.register_fake
def scale_weight_backward_fake(grad, weight, gate, need_weight, need_gate):
    return (weight.new_empty(weight.shape) if need_weight else weight.new_empty(0),
            gate.new_empty(gate.shape) if need_gate else gate.new_empty(0))


def _setup_context(ctx, inputs, output):
    weight, gate, _dtype = inputs
    ctx.save_for_backward(weight, gate)


def _backward(ctx, grad):
    weight, gate = ctx.saved_tensors
    need_weight, need_gate, _ = ctx.needs_input_grad
    dw, dgate = scale_weight_backward_op(grad, weight, gate, need_weight, need_gate)
    return (dw if need_weight else None), (dgate if need_gate else None), None


scale_weight_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------------------
def gated_linear_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    gate: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``(x * gate) @ weight.T + bias`` with the gate folded into the weight by Triton and the
    GEMMs of ``F.linear``; see ``reference.gated_linear``.

    Under autocast the folded weight comes out in the autocast dtype, and ``F.linear`` casts
    x and bias as it would for ``nn.Linear``; the gate keeps its dtype either way.
    """
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
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
    else:
        if weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
            raise TypeError(
                f"gated_linear: x, weight and bias must share a dtype; got {x.dtype}, "
                f"{weight.dtype}, {None if bias is None else bias.dtype}"
            )
        dtype = x.dtype
    return F.linear(x, scale_weight_op(weight, gate, dtype), bias)
