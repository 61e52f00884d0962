"""Exporting a (dense, gated or pruned) model to a file a deployment runtime loads.

* ``"onnx"``: ``torch.onnx.export`` (the ``torch.export``-based exporter), checked with
  ONNX Runtime on the CPU (``pip install 'vtp[export]'``);
* ``"pt2"``: ``torch.export`` (an ``ExportedProgram`` for ``torch.export.load``, AOTInductor
  or ExecuTorch), checked by loading it back.

Both take any batch size (the batch dimension is dynamic) at one image size. The export
runs the PyTorch twins of the kernels (a Triton op is not an ONNX operator), on the CPU.
The file is written to a temporary name, loaded again and run on two batch sizes against
the eager model; only a file that agrees within the stated tolerance is renamed into place,
so a failed check leaves nothing behind.
"""
from __future__ import annotations

import copy
import os
import time
from dataclasses import asdict, dataclass
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn

import vtp_kernels

from .atomic import atomic_write
from ._profile import default_img_size, input_channels, size_pair

__all__ = ["FORMATS", "ExportCheck", "export", "onnx_session", "run_onnx", "OnnxRuntimeModel"]

FORMATS = ("onnx", "pt2")
# What the exported model may differ from the eager one by, relative to the largest output:
# the same float32 arithmetic in another order (ONNX Runtime fuses and re-blocks sums) stays
# within a few ulps per sum, 1e-7 relative on the models tested; 1e-4 leaves margin for deep
# models and still catches a wrong operator, which is off by whole units.
RELATIVE_TOLERANCE = {"onnx": 1e-4, "pt2": 1e-6}


@dataclass(frozen=True)
class ExportCheck:
    """What ``export`` wrote and how it checked it."""
    format: str
    path: str
    bytes: int
    img_size: Tuple[int, int]
    batch_sizes: Tuple[int, ...]
    max_abs_error: float
    max_abs_output: float
    tolerance: float
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def onnx_session(path: Union[str, os.PathLike], threads: Optional[int] = None):
    """An ONNX Runtime session of the CPU provider (``threads`` intra-op threads)."""
    try:
        import onnxruntime
    except ImportError:
        raise ImportError("ONNX Runtime is not installed: pip install 'vtp[export]'") from None
    options = onnxruntime.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return onnxruntime.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def run_onnx(session, x: torch.Tensor) -> torch.Tensor:
    out = session.run(None, {session.get_inputs()[0].name: x.detach().cpu().numpy()})[0]
    return torch.from_numpy(out)


class OnnxRuntimeModel(nn.Module):
    """An exported ONNX file behind a module's call: float32 CPU tensors in and out, so code
    that evaluates or times a model runs it unchanged (``vtp eval --runtime onnxruntime``)."""

    def __init__(self, path: Union[str, os.PathLike], threads: Optional[int] = None):
        super().__init__()
        self.path = str(path)
        self.session = onnx_session(path, threads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            raise ValueError(f"OnnxRuntimeModel: runs on the CPU, got a {x.device.type} tensor")
        return run_onnx(self.session, x.float())


def _export_file(model: nn.Module, x: torch.Tensor, fmt: str, tmp: str, opset: Optional[int]) -> None:
    batch = torch.export.Dim("batch", min=1, max=4096)
    if fmt == "pt2":
        program = torch.export.export(model, (x,), dynamic_shapes=({0: batch},))
        torch.export.save(program, tmp)
        return
    kwargs = {"opset_version": opset} if opset is not None else {}
    program = torch.onnx.export(model, (x,), dynamo=True, dynamic_shapes=({0: batch},), verbose=False,
                                **kwargs)
    program.save(tmp)


def _load_and_run(fmt: str, tmp: str):
    if fmt == "pt2":
        module = torch.export.load(tmp).module()
        return lambda x: module(x)
    session = onnx_session(tmp)
    return lambda x: run_onnx(session, x)


def export(model: nn.Module, path: Union[str, os.PathLike], format: str = "onnx",
           img_size: Optional[Union[int, Tuple[int, int]]] = None, batch_size: int = 2,
           opset: Optional[int] = None) -> ExportCheck:
    """Export ``model`` to ``path`` as ``format`` ("onnx" or "pt2") and check the file against
    the eager model on random images at ``img_size`` (default: the model's), batch
    ``batch_size`` and one more; see the module docstring. Returns what was checked."""
    if format not in FORMATS:
        raise ValueError(f"format: expected one of {', '.join(FORMATS)}, got {format!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected an integer >= 1, got {batch_size!r}")
    size = default_img_size(model) if img_size is None else size_pair(img_size)
    start = time.perf_counter()
    model = copy.deepcopy(model).float().cpu().eval()
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(n, input_channels(model), *size, generator=g) for n in (batch_size, batch_size + 1)]
    report = {}

    def write(tmp: str) -> None:
        with vtp_kernels.use_backend("torch"), torch.no_grad():
            _export_file(model, inputs[0], format, tmp, opset)
            run = _load_and_run(format, tmp)
            worst = scale = 0.0
            for x in inputs:
                want, got = model(x), run(x)
                if got.shape != want.shape:
                    raise ValueError(f"export: the {format} file gives outputs of shape {list(got.shape)}, "
                                     f"the model {list(want.shape)}")
                worst = max(worst, float((got - want).abs().max()))
                scale = max(scale, float(want.abs().max()))
        tolerance = RELATIVE_TOLERANCE[format] * max(1.0, scale)
        if not worst <= tolerance:
            raise ValueError(f"export: the {format} file differs from the eager model by {worst:.3g} "
                             f"(tolerance {tolerance:.3g}); nothing was written")
        report.update(max_abs_error=worst, max_abs_output=scale, tolerance=tolerance)

    atomic_write(path, write)
    return ExportCheck(format=format, path=str(path), bytes=os.path.getsize(path), img_size=tuple(size),
                       batch_sizes=tuple(x.shape[0] for x in inputs), seconds=time.perf_counter() - start,
                       **report)
