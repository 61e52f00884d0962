"""Which implementation an op runs: the Triton kernel or its PyTorch reference.

``"torch"`` always runs ``vtp_kernels.reference``. ``"triton"`` always runs the
kernel and fails loudly where it cannot (a CPU tensor without ``TRITON_INTERPRET=1``).
``"auto"`` runs the kernel only on CUDA tensors and only for ops listed in
``FASTER_ON_CUDA``: an op enters that set when a ``benchmarks/gpu_check.py`` record committed
under ``benchmarks/results/`` passes the rule of ``benchmarks/decide.py`` (correct, faster
than the strongest alternative by more than 5 % beyond the spread at the production shape
and dtype, and the model no slower with it).
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
from typing import Iterator, Optional

import torch

BACKENDS = ("auto", "triton", "torch")

# Ops that a recorded GPU run decided for (benchmarks/decide.py). Empty: none is recorded.
FASTER_ON_CUDA: frozenset = frozenset()

_backend: Optional[str] = None


def _check(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source}: expected one of {', '.join(BACKENDS)}, got {name!r}")
    return name


def get_backend() -> str:
    """The backend in force: ``set_backend``'s choice, else ``$VTP_BACKEND``, else ``"auto"``."""
    if _backend is not None:
        return _backend
    return _check(os.environ.get("VTP_BACKEND", "auto").strip().lower() or "auto", "VTP_BACKEND")


def set_backend(name: Optional[str]) -> None:
    """Choose ``"auto"``, ``"triton"`` or ``"torch"`` for every op; None returns to ``$VTP_BACKEND``."""
    global _backend
    _backend = None if name is None else _check(str(name).lower(), "backend")


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager form of ``set_backend``."""
    global _backend
    previous = _backend
    set_backend(name)
    try:
        yield
    finally:
        _backend = previous


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(op: str, x: torch.Tensor) -> bool:
    """True when ``op`` on tensors living where ``x`` lives should run its Triton kernel."""
    backend = get_backend()
    if backend == "torch":
        return False
    if backend == "auto":
        return x.is_cuda and op in FASTER_ON_CUDA and triton_available()
    if not triton_available():
        raise RuntimeError(f"VTP backend 'triton' was asked for {op}, but triton is not installed")
    if not (x.is_cuda or interpreter_enabled()):
        raise RuntimeError(
            f"VTP backend 'triton' cannot run {op} on a {x.device.type} tensor: Triton needs CUDA "
            "tensors, or TRITON_INTERPRET=1 set before vtp_kernels is imported to run on the CPU. "
            "Use set_backend('torch') or 'auto' instead."
        )
    return True
