"""The device a benchmark runs on, the Triton interpreter of --smoke, versions and dtypes,
and the carried wheels of packages the machine has too old."""
from __future__ import annotations

import glob
import os
import platform
import re
import subprocess
import sys
import tempfile
from importlib import metadata
from typing import Dict, Optional, Sequence

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
NO_GPU = "no CUDA device: run with --smoke for a CPU check of the script"


def use_interpreter(smoke: bool) -> None:
    """In --smoke mode run the Triton kernels on the CPU under TRITON_INTERPRET=1.

    Triton reads the variable when a kernel is decorated, i.e. when a ``vtp_kernels`` kernel
    module is first imported: call this before importing torch, triton or vtp_kernels. An
    explicit TRITON_INTERPRET other than 1 is an error rather than silently overridden.
    """
    if not smoke:
        return
    os.environ.setdefault("TRITON_INTERPRET", "1")
    if os.environ["TRITON_INTERPRET"] != "1":
        raise SystemExit("--smoke runs Triton under the interpreter: unset TRITON_INTERPRET or set it to 1")


def pick_device(torch, smoke: bool, missing: str = NO_GPU):
    """The CPU in --smoke mode, else the CUDA GPU; exits with ``missing`` when there is none.

    Full-size shapes on a CPU would take hours and measure nothing the GPU numbers are for,
    so there is no silent CPU fallback.
    """
    if smoke:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SystemExit(missing)
    return torch.device("cuda")


def setup(smoke: bool, seed: int, missing: str = NO_GPU):
    """The start of a kernel benchmark: the interpreter on in --smoke mode, then torch imported,
    the device picked and the global seed set. Returns ``(torch, device)``.

    The caller imports ``vtp_kernels`` only after this, so that --smoke reaches the kernels.
    """
    use_interpreter(smoke)
    import torch

    device = pick_device(torch, smoke, missing)
    torch.manual_seed(seed)
    return torch, device


def dtype_of(torch, name: str):
    """The torch dtype of a record's dtype name (bf16, fp16, fp32)."""
    return getattr(torch, DTYPES[name])


def device_name(torch, device, cores: bool = False) -> str:
    """The GPU's name, or ``cpu (<processor>)`` (``cpu (<processor>, N cores)`` with ``cores``).

    Goes into every record and into the default file names, so that results of different
    machines never overwrite each other.
    """
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    return f"cpu ({cpu}, {os.cpu_count()} cores)" if cores else f"cpu ({cpu})"


def versions(names: Sequence[str]) -> Dict[str, Optional[str]]:
    """Versions of ``names`` (python, torch, triton, timm, cuda), in the order given.

    Timings move with these versions, so every record carries them; a package that is not
    installed is recorded as None instead of failing the run.
    """
    out: Dict[str, Optional[str]] = {}
    for name in names:
        if name == "python":
            out[name] = platform.python_version()
            continue
        try:
            if name == "cuda":
                import torch
                out[name] = torch.version.cuda
            else:
                out[name] = __import__(name).__version__
        except ImportError:
            out[name] = None
    return out


def one_op_on_triton(op: str):
    """A context: backend "auto" with FASTER_ON_CUDA = {op}, so that a model runs only
    ``op``'s kernel. Where "auto" never picks Triton (CPU tensors: --smoke, the compile
    workers) the same choice is made directly."""
    import contextlib

    import vtp_kernels
    import vtp_kernels.backend as backend

    @contextlib.contextmanager
    def context():
        saved_set, saved_use = backend.FASTER_ON_CUDA, vtp_kernels.use_triton
        backend.FASTER_ON_CUDA = frozenset({op})
        # On a GPU the backend's own rule decides (auto: CUDA tensors of ops in FASTER_ON_CUDA).
        vtp_kernels.use_triton = lambda name, x: saved_use(name, x) if x.is_cuda else name == op
        try:
            with vtp_kernels.use_backend("auto"):
                yield
        finally:
            backend.FASTER_ON_CUDA, vtp_kernels.use_triton = saved_set, saved_use
    return context()


def backend_context(name: str):
    """The ``vtp_kernels`` backend a measurement runs under: "torch", "triton", or
    "auto:<op>" (only that op on Triton, one_op_on_triton)."""
    import vtp_kernels
    return one_op_on_triton(name.split(":", 1)[1]) if name.startswith("auto:") else vtp_kernels.use_backend(name)


def autotuners(module) -> Dict[str, object]:
    """The Triton autotuned kernels defined in ``module``, by name."""
    from triton.runtime.autotuner import Autotuner
    return {name: obj for name, obj in vars(module).items() if isinstance(obj, Autotuner)}


def only_configs(choices: Dict[object, object]):
    """A context in which each autotuned kernel in ``choices`` runs the one config given (no tuning)."""
    import contextlib

    @contextlib.contextmanager
    def context():
        saved = {k: (k.configs, k.cache) for k in choices}
        try:
            for kernel, config in choices.items():
                kernel.configs, kernel.cache = [config], {}
            yield
        finally:
            for kernel, (configs, cache) in saved.items():
                kernel.configs, kernel.cache = configs, cache
    return context()


def _version_tuple(text: str):
    return tuple(int(x) for x in re.findall(r"\d+", text)[:3])


def carried_packages(wheels_dir: str, minimum_versions: Dict[str, str]) -> Dict[str, object]:
    """Install the carried wheels of packages that are missing or older than
    ``minimum_versions`` ({name: version}) into a temporary folder; returns
    {"path": folder or None, "packages": {name: source}}."""

    sources: Dict[str, str] = {}
    needed = []
    for name, minimum in minimum_versions.items():
        try:
            have = metadata.version(name)
        except metadata.PackageNotFoundError:
            have = None
        if have is not None and _version_tuple(have) >= _version_tuple(minimum):
            sources[name] = f"installed {have}"
            continue
        wheels = sorted(glob.glob(os.path.join(wheels_dir, f"{name}-*.whl")))
        if not wheels:
            sources[name] = f"installed {have}, older than {minimum}, and no wheel in {wheels_dir}" if have \
                else f"missing, and no wheel in {wheels_dir}"
            continue
        needed.append(wheels[-1])
        sources[name] = f"carried wheel {os.path.basename(wheels[-1])} (installed: {have})"
    if not needed:
        return {"path": None, "packages": sources}
    site = tempfile.mkdtemp(prefix="vtp-gpu-check-site-")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--no-cache-dir", "--target", site, *needed], check=True)
    return {"path": site, "packages": sources}
