"""LayerNorm that writes only the kept columns: the input side of a pruned qkv / fc1.

In a pruned block the LayerNorm in front of ``qkv`` and ``fc1`` still normalises the full
residual row (its statistics are over all D columns), but the following GEMM only reads
the k kept columns. This kernel reads the full row once, computes the statistics in fp32
and writes ``xhat[:, index] * weight + bias`` straight into a dense ``[M, k]`` tensor, so
the GEMM runs with a smaller K and contiguous, vectorisable loads::

    forward   y[m, i]  = (x[m, index[i]] - mean[m]) * rstd[m] * weight[i] + bias[i]
    backward  g[m, j]  = dy[m, pos[j]] * weight[pos[j]]      (0 where column j is not kept)
              dx[m, :] = rstd[m] * (g - mean_j(g) - xhat * mean_j(g * xhat))
              dweight  = sum_m dy * xhat[:, index],   dbias = sum_m dy

``pos`` is the inverse of ``index`` (``pos[index[i]] = i``, -1 elsewhere). With it each
backward program gathers dy at full width and writes its own rows of dx: no scatter, no
atomics. ``index`` must therefore hold distinct columns, as a pruning plan's kept
columns always do. dweight/dbias are reduced per program into an fp32 ``[programs, k]``
buffer and summed afterwards, so they are bitwise reproducible.

Shapes: x ``[..., D]`` (any strides: rows are read through their row stride, other layouts
are copied once), index int ``[k]``, weight and bias ``[k]`` or None (read as dense vectors).
The output dtype is that of ``layer_norm(x)[..., index] * weight + bias`` in PyTorch.
"""
# No `from __future__ import annotations`: custom_op infers its schema from real annotations.
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._utils import (as_row_matrix, autotune_configs, contiguous_or_none, new_empty, num_sms,
                     on_device)

__all__ = ["layer_norm_gather_triton"]


# ---------------------------------------------------------------------------------------
# Launch configurations
# ---------------------------------------------------------------------------------------
# Both kernels hold a [BLOCK_M, BLOCK_D] tile of whole rows in registers; the autotuner picks
# BLOCK_M (rows per tile) and num_warps. It is keyed on the padded widths BLOCK_D and
# BLOCK_K (powers of two) rather than on D and k: a pruned model keeps a different k in
# nearly every block, and the best tile depends on the padded width the kernel works on,
# so a DeiT-B plan tunes a few buckets instead of ~24 widths. Forward tiles above 8192
# elements would spill registers and are pruned before benchmarking; the backward, which
# holds several such tiles, is pruned more tightly. The row count only masks whole rows, so
# it is not specialised (no recompile per batch size); D, k and the row strides are, since
# their divisibility decides the vector width of row loads and stores.
_CONFIGS = autotune_configs(
    [triton.Config({"BLOCK_M": block_m}, num_warps=num_warps)
     for block_m in (1, 2, 4, 8, 16) for num_warps in (4, 8)],
    interpreted=triton.Config({"BLOCK_M": 32}, num_warps=4),
)
_MAX_TILE = 8192
# The backward keeps about six live [BLOCK_M, BLOCK_D] fp32 tiles (two accumulators, x,
# xhat, dy, g). Compiled for sm_90 at D = 768, up to 16 elements of a tile per thread fit
# in registers; 32 spill (3-8 KB of stack per thread at BLOCK_M = 8 or 16 with 4 warps).
_MAX_BWD_PER_THREAD = 16


def _prune_configs(configs, named_args, **kwargs):
    block_d = triton.next_power_of_2(named_args["D"])
    fitting = [c for c in configs if c.kwargs["BLOCK_M"] * block_d <= _MAX_TILE]
    return fitting or configs[:1]


def _prune_bwd_configs(configs, named_args, **kwargs):
    block_d = triton.next_power_of_2(named_args["D"])
    fitting = [c for c in configs
               if c.kwargs["BLOCK_M"] * block_d <= _MAX_BWD_PER_THREAD * 32 * c.num_warps]
    return fitting or [min(configs, key=lambda c: (c.kwargs["BLOCK_M"], -c.num_warps))]


# ---------------------------------------------------------------------------------------
# Forward kernel: full-row statistics, gathered output
# ---------------------------------------------------------------------------------------
@triton.autotune(configs=_CONFIGS, key=["BLOCK_D", "BLOCK_K"],
                 prune_configs_by={"early_config_prune": _prune_configs})
@triton.jit(do_not_specialize=["M"])
def _layer_norm_gather_fwd_kernel(
    X, Y, W, B, Index, Mean, Rstd,
    M, D, K, stride_xm, stride_ym, eps,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    # int64 row offsets: M * stride can pass 2**31 for large batches.
    x_rows = X + rows.to(tl.int64)[:, None] * stride_xm

    # Statistics over the full row, in fp32 whatever the input dtype. Two passes over the
    # registers (mean, then centred variance) stay accurate when the mean is large.
    cols = tl.arange(0, BLOCK_D)
    mask = row_mask[:, None] & (cols < D)[None, :]
    x = tl.load(x_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / D
    xc = tl.where(mask, x - mean[:, None], 0.0)
    var = tl.sum(xc * xc, axis=1) / D
    rstd = 1.0 / tl.sqrt(var + eps)
    tl.store(Mean + rows, mean, mask=row_mask)
    tl.store(Rstd + rows, rstd, mask=row_mask)

    # Output only the kept columns. Registers cannot be indexed by a runtime vector, so
    # the kept values are loaded again from the row just read: they come from cache, and
    # the output is written contiguously, which is what the next GEMM wants.
    kk = tl.arange(0, BLOCK_K)
    k_mask = kk < K
    out_mask = row_mask[:, None] & k_mask[None, :]
    index = tl.load(Index + kk, mask=k_mask, other=0)
    xk = tl.load(x_rows + index[None, :], mask=out_mask, other=0.0).to(tl.float32)
    y = (xk - mean[:, None]) * rstd[:, None]
    if HAS_W:
        y = y * tl.load(W + kk, mask=k_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_B:
        y = y + tl.load(B + kk, mask=k_mask, other=0.0).to(tl.float32)[None, :]
    y_ptrs = Y + rows.to(tl.int64)[:, None] * stride_ym + kk[None, :]
    tl.store(y_ptrs, y.to(Y.dtype.element_ty), mask=out_mask)


# ---------------------------------------------------------------------------------------
# Backward kernel: dx at full width, per-program partial dweight / dbias
# ---------------------------------------------------------------------------------------
# A fixed number of programs (a few per SM) each walk a contiguous run of rows, so the
# partial-sum buffer is [programs, k] regardless of M and the final sum is tiny.
@triton.autotune(configs=_CONFIGS, key=["BLOCK_D"],
                 prune_configs_by={"early_config_prune": _prune_bwd_configs})
@triton.jit(do_not_specialize=["M", "rows_per_program"])
def _layer_norm_gather_bwd_kernel(
    DY, X, W, Mean, Rstd, Pos, DX, DW_partial, DB_partial,
    M, D, K, stride_dym, stride_xm, stride_dxm, rows_per_program,
    HAS_W: tl.constexpr, COMPUTE_DX: tl.constexpr, COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    col_mask = cols < D
    # pos[j]: where column j sits among the kept columns, -1 if it was pruned. Loaded once.
    pos = tl.load(Pos + cols, mask=col_mask, other=-1)
    kept = pos >= 0
    if HAS_W:
        w = tl.load(W + pos, mask=kept, other=0.0).to(tl.float32)

    # Accumulate elementwise and reduce over rows once at the end: one cross-thread
    # reduction per program instead of one per tile.
    dw_acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    db_acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    for tile_start in range(row_start, row_end, BLOCK_M):
        rows = tile_start + tl.arange(0, BLOCK_M)
        row_mask = rows < row_end
        rows64 = rows.to(tl.int64)
        mask = row_mask[:, None] & col_mask[None, :]
        x = tl.load(X + rows64[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(Mean + rows, mask=row_mask, other=0.0)
        rstd = tl.load(Rstd + rows, mask=row_mask, other=0.0)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        # dy gathered to full width: zero at pruned columns, which the forward never wrote.
        dy_mask = row_mask[:, None] & kept[None, :]
        dy = tl.load(DY + rows64[:, None] * stride_dym + pos[None, :], mask=dy_mask, other=0.0).to(tl.float32)
        if COMPUTE_DW:
            dw_acc += dy * xhat
        if COMPUTE_DB:
            db_acc += dy
        if COMPUTE_DX:
            if HAS_W:
                g = dy * w[None, :]
            else:
                g = dy
            # Means over all D columns: the statistics were taken over the full row.
            c1 = tl.sum(g * xhat, axis=1) / D
            c2 = tl.sum(g, axis=1) / D
            dx = (g - c2[:, None] - xhat * c1[:, None]) * rstd[:, None]
            dx_ptrs = DX + rows64[:, None] * stride_dxm + cols[None, :]
            tl.store(dx_ptrs, dx.to(DX.dtype.element_ty), mask=mask)

    # Each kept column j owns slot pos[j] of this program's row of the buffer.
    if COMPUTE_DW:
        tl.store(DW_partial + pid * K + pos, tl.sum(dw_acc, axis=0), mask=kept)
    if COMPUTE_DB:
        tl.store(DB_partial + pid * K + pos, tl.sum(db_acc, axis=0), mask=kept)


# ---------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------
def _out_dtype(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor]) -> torch.dtype:
    # Same promotion as the reference (``layer_norm(x)[..., index] * weight + bias``).
    dtype = x.dtype
    for p in (weight, bias):
        if p is not None:
            dtype = torch.promote_types(dtype, p.dtype)
    return dtype


def _backward_programs(x: torch.Tensor) -> int:
    # Two programs per SM keeps every SM busy while the row loop amortises the partial
    # buffer. Under the interpreter two programs are enough to exercise the final sum.
    return 2 * num_sms(x.device) if x.is_cuda else 2


def _forward(x: torch.Tensor, index: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
             eps: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    D, K = x.shape[-1], index.numel()
    x_rows = as_row_matrix(x, D)
    M = x_rows.shape[0]
    y = new_empty((M, K), dtype=_out_dtype(x, weight, bias), device=x.device)
    mean = new_empty((M,), dtype=torch.float32, device=x.device)
    rstd = new_empty((M,), dtype=torch.float32, device=x.device)
    if M > 0 and K > 0:
        index = index.to(device=x.device, dtype=torch.int64).contiguous()
        weight, bias = contiguous_or_none(weight), contiguous_or_none(bias)
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]),)  # noqa: E731
        with on_device(x):
            _layer_norm_gather_fwd_kernel[grid](
                x_rows, y, weight if weight is not None else y, bias if bias is not None else y,
                index, mean, rstd,
                M, D, K, x_rows.stride(0), y.stride(0), eps,
                HAS_W=weight is not None, HAS_B=bias is not None,
                BLOCK_D=triton.next_power_of_2(D), BLOCK_K=triton.next_power_of_2(K),
            )
    elif M > 0:
        # No kept columns: nothing reads the statistics, but they are outputs all the same.
        mean.zero_()
        rstd.zero_()
    return y.view(*x.shape[:-1], K), mean, rstd


def _backward(dy: torch.Tensor, x: torch.Tensor, index: torch.Tensor, weight: Optional[torch.Tensor],
              mean: torch.Tensor, rstd: torch.Tensor, need_dx: bool, need_dw: bool,
              need_db: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    D, K = x.shape[-1], index.numel()
    x_rows = as_row_matrix(x, D)
    M = x_rows.shape[0]
    dx = new_empty((M, D), dtype=x.dtype, device=x.device) if need_dx else x.new_empty(0)
    dw = x.new_empty(0)
    db = x.new_empty(0)
    if M == 0 or K == 0:
        # Nothing was kept (or there are no rows): the output did not depend on x.
        if need_dx:
            dx.zero_()
        if need_dw:
            dw = torch.zeros(K, device=x.device, dtype=torch.float32)
        if need_db:
            db = torch.zeros(K, device=x.device, dtype=torch.float32)
        return dx.view(x.shape) if need_dx else dx, dw, db

    index = index.to(device=x.device, dtype=torch.int64)
    pos = torch.full((D,), -1, device=x.device, dtype=torch.int32)
    pos[index] = torch.arange(K, device=x.device, dtype=torch.int32)
    weight = contiguous_or_none(weight)
    dy_rows = as_row_matrix(dy, K)
    programs = min(_backward_programs(x), M)
    rows_per_program = triton.cdiv(M, programs)
    programs = triton.cdiv(M, rows_per_program)  # no program without rows
    dw_partial = new_empty((programs, K), dtype=torch.float32, device=x.device) if need_dw else mean
    db_partial = new_empty((programs, K), dtype=torch.float32, device=x.device) if need_db else mean
    with on_device(x):
        _layer_norm_gather_bwd_kernel[(programs,)](
            dy_rows, x_rows, weight if weight is not None else x_rows, mean, rstd, pos,
            dx if need_dx else x_rows, dw_partial, db_partial,
            M, D, K, dy_rows.stride(0), x_rows.stride(0), D, rows_per_program,
            HAS_W=weight is not None, COMPUTE_DX=need_dx, COMPUTE_DW=need_dw, COMPUTE_DB=need_db,
            BLOCK_D=triton.next_power_of_2(D),
        )
    # A fixed-shape sum over the program axis: same order every run, so reproducible.
    if need_dw:
        dw = dw_partial.sum(0)
    if need_db:
        db = db_partial.sum(0)
    return dx.view(x.shape) if need_dx else dx, dw, db


# ---------------------------------------------------------------------------------------
# Custom ops and autograd
# ---------------------------------------------------------------------------------------
@torch.library.custom_op("vtp::layer_norm_gather_fwd", mutates_args=())
def layer_norm_gather_fwd_op(
    x: torch.Tensor, index: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y [..., k], mean [M] fp32, rstd [M] fp32)."""
    return _forward(x, index, weight, bias, eps)


@layer_norm_gather_fwd_op.register_fake
def layer_norm_gather_fwd_fake(x, index, weight, bias, eps):
    M = x.numel() // x.shape[-1] if x.shape[-1] != 0 else 0
    y = x.new_empty((*x.shape[:-1], index.shape[0]), dtype=_out_dtype(x, weight, bias))
    return y, x.new_empty(M, dtype=torch.float32), x.new_empty(M, dtype=torch.float32)


@torch.library.custom_op("vtp::layer_norm_gather_bwd", mutates_args=())
def layer_norm_gather_bwd_op(
    dy: torch.Tensor, x: torch.Tensor, index: torch.Tensor, weight: Optional[torch.Tensor],
    mean: torch.Tensor, rstd: torch.Tensor, need_dx: bool, need_dw: bool, need_db: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dweight, dbias), dweight/dbias in fp32; a gradient not asked for comes back empty."""
    return _backward(dy, x, index, weight, mean, rstd, need_dx, need_dw, need_db)


@layer_norm_gather_bwd_op.register_fake
def layer_norm_gather_bwd_fake(dy, x, index, weight, mean, rstd, need_dx, need_dw, need_db):
    K = index.shape[0]
    dx = torch.empty_like(x, memory_format=torch.contiguous_format) if need_dx else x.new_empty(0)
    dw = x.new_empty(K, dtype=torch.float32) if need_dw else x.new_empty(0)
    db = x.new_empty(K, dtype=torch.float32) if need_db else x.new_empty(0)
    return dx, dw, db


def _setup_context(ctx, inputs, output):
    x, index, weight, bias, _eps = inputs
    _y, mean, rstd = output
    ctx.save_for_backward(x, index, weight, mean, rstd)
    ctx.weight_dtype = weight.dtype if weight is not None else None
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.mark_non_differentiable(mean, rstd)


def _backward_rule(ctx, dy, _dmean, _drstd):
    x, index, weight, mean, rstd = ctx.saved_tensors
    need_dx, _, need_dw, need_db, _ = ctx.needs_input_grad
    dx, dw, db = layer_norm_gather_bwd_op(dy, x, index, weight, mean, rstd, need_dx, need_dw, need_db)
    dw = dw.to(ctx.weight_dtype) if need_dw else None
    db = db.to(ctx.bias_dtype) if need_db else None
    return (dx if need_dx else None), None, dw, db, None


layer_norm_gather_fwd_op.register_autograd(_backward_rule, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------------------
def layer_norm_gather_triton(
    x: torch.Tensor,
    index: torch.Tensor,
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Triton ``layer_norm_gather``: see :func:`vtp_kernels.reference.layer_norm_gather`.

    ``index`` must hold distinct column numbers (the backward inverts it).
    """
    return layer_norm_gather_fwd_op(x, index, weight, bias, float(eps))[0]
