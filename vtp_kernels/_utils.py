"""What the op files share: launch configurations, the CUDA device guard, dot precision,
accumulator dtypes, output buffers, row layouts and alignment.

Every launcher in ``vtp_kernels`` goes through these helpers, so that a rule (which
device a kernel runs on, when an fp32 dot may use TF32, how many configs the interpreter
gets) is written once.
"""
from __future__ import annotations

import contextlib
import functools
import re
from typing import Iterator, List, Optional, Sequence

import torch
import triton
import triton.language as tl

from .backend import interpreter_enabled

__all__ = [
    "accumulator_dtype", "as_row_matrix", "autotune_configs", "contiguous_or_none", "dot_precision",
    "interpreter_enabled", "largest_pow2_dividing", "new_empty", "num_sms", "on_device",
    "poison_outputs",
]


# ---------------------------------------------------------------------------------------
# Launch configurations
# ---------------------------------------------------------------------------------------
def autotune_configs(cuda: Sequence[triton.Config], interpreted: triton.Config) -> List[triton.Config]:
    """``cuda`` on a GPU; under ``TRITON_INTERPRET=1`` only ``interpreted``.

    The interpreter cannot benchmark several configs (the autotuner fails there), and its
    cost is per program instance and per loop step rather than per element, so the
    interpreted config should have large blocks.
    """
    return [interpreted] if interpreter_enabled() else list(cuda)


# ---------------------------------------------------------------------------------------
# Device, precision, dtypes
# ---------------------------------------------------------------------------------------
def on_device(t: torch.Tensor):
    """The context every launch runs in: Triton launches on the *current* CUDA device,
    which need not be the one holding ``t``."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` of every ``tl.dot`` on operands of ``dtype``.

    fp32 follows ``torch.get_float32_matmul_precision()``, as torch's own matmuls do: full
    precision unless the user allowed TF32. 16-bit dots ignore the flag; fp64 needs "ieee".
    """
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


def accumulator_dtype(dtype: torch.dtype):
    """fp32 accumulators for every float dtype but fp64, which exists so that gradcheck can
    hold the kernels to the exact gradient."""
    return tl.float64 if dtype == torch.float64 else tl.float32


# ---------------------------------------------------------------------------------------
# Buffers
# ---------------------------------------------------------------------------------------
_poisoned = False


@contextlib.contextmanager
def poison_outputs() -> Iterator[None]:
    """Inside this context every buffer a launcher allocates starts as NaN (floats) or -1
    (integers), so a test can tell an element no kernel wrote from a computed one."""
    global _poisoned
    previous, _poisoned = _poisoned, True
    try:
        yield
    finally:
        _poisoned = previous


def new_empty(shape: Sequence[int], *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A contiguous buffer that the kernels fill completely (see ``poison_outputs``)."""
    t = torch.empty(tuple(shape), dtype=dtype, device=device)
    if _poisoned:
        t.fill_(float("nan") if t.is_floating_point() else -1)
    return t


def contiguous_or_none(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Per-column parameters (weights, biases, gates, index tables) are read as dense
    vectors; they are small, so a copy of a strided one costs nothing."""
    return None if t is None else t.contiguous()


def as_row_matrix(t: torch.Tensor, width: int) -> torch.Tensor:
    """``t`` as a ``[rows, width]`` matrix whose columns have unit stride: a view where the
    layout allows (any row stride, 0 included), else a contiguous copy."""
    rows = t.reshape(-1, width)
    return rows if rows.stride(-1) == 1 or width <= 1 else rows.contiguous()


# ---------------------------------------------------------------------------------------
# Alignment and the machine
# ---------------------------------------------------------------------------------------
def largest_pow2_dividing(values: Sequence[int], cap: int = 16) -> int:
    """The largest power of two <= ``cap`` that divides every value (0 is divisible by all)."""
    align = cap
    while align > 1 and any(int(v) % align for v in values):
        align //= 2
    return align


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device."""
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


# ---------------------------------------------------------------------------------------
# Triton < 3.7 under NumPy >= 2.4
# ---------------------------------------------------------------------------------------
def _repair_interpreter_index() -> None:
    """Let ``range()`` over kernel arguments run in Triton 3.6's interpreter with NumPy >= 2.4.

    The interpreter holds every scalar as a one-element 1-D array and turns it into a Python
    index with ``int(array)``. NumPy 2.4 made that conversion of an array with ndim > 0 an
    error (deprecated since 1.25), so every loop whose bounds are kernel arguments fails
    with "only 0-dimensional arrays can be converted to Python scalars". Triton 3.7 squeezes
    the array first; this applies the same conversion to older interpreters.
    """
    from triton.runtime import interpreter

    patch = getattr(interpreter, "_patch_lang_tensor", None)
    if patch is None or getattr(patch, "_vtp_index_repaired", False):
        return

    def patch_lang_tensor(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patch_lang_tensor._vtp_index_repaired = True
    interpreter._patch_lang_tensor = patch_lang_tensor


def _triton_version() -> tuple:
    return tuple(int(part) for part in re.findall(r"\d+", triton.__version__)[:2])


if interpreter_enabled() and _triton_version() < (3, 7):
    _repair_interpreter_index()
