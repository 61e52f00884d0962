"""What the benchmark scripts in this folder share: paths, the run's environment, timers,
records, plots, archives, processes under a time limit and argument helpers.

Every benchmark writes a JSON record that has to say where and how it was measured (device,
library versions, the command that reproduces it) and keep every raw timing, so that a
number in a table can be traced back and re-measured. Keeping those pieces here makes the
records of different scripts agree with each other.

Only the standard library is imported at module level: the runner (gpu_check.py) imports
this module without torch, and the scripts import torch and triton only after --smoke has
had the chance to set TRITON_INTERPRET. Importing this module puts the repository root on
sys.path, so ``vtp`` and ``vtp_kernels`` import from the checkout without installing.

The scripts import it as ``common`` after putting their own folder on sys.path, which
works both for ``python benchmarks/bench_x.py`` and for loading a script by file path
(as the tests do).
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import platform
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tarfile
import threading
import time
from typing import Callable, Dict, Iterable, List, Optional, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
TIMER_DO_BENCH = "triton.testing.do_bench, L2 flushed"
TIMER_WALL_CLOCK = "perf_counter wall clock"

if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # the checkout's vtp and vtp_kernels, not an installed copy


def _load_atomic():
    # vtp/atomic.py by its path: it needs only the standard library, while `import vtp`
    # would import torch and decorate the kernels before --smoke has set TRITON_INTERPRET.
    spec = importlib.util.spec_from_file_location("_vtp_atomic", os.path.join(ROOT, "vtp", "atomic.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_ATOMIC = _load_atomic()


# ---------------------------------------------------------------------------------------
# Device and environment
# ---------------------------------------------------------------------------------------
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


def pick_device(torch, smoke: bool,
                missing: str = "no CUDA device: run with --smoke for a CPU check of the script"):
    """The CPU in --smoke mode, else the CUDA GPU; exits with ``missing`` when there is none.

    Full-size shapes on a CPU would take hours and measure nothing the GPU numbers are for,
    so there is no silent CPU fallback.
    """
    if smoke:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SystemExit(missing)
    return torch.device("cuda")


def setup(smoke: bool, seed: int,
          missing: str = "no CUDA device: run with --smoke for a CPU check of the script"):
    """The start of a kernel benchmark: the interpreter on in --smoke mode, then torch imported,
    the device picked and the global seed set. Returns ``(torch, device)``.

    The caller imports ``vtp_kernels`` only after this, so that --smoke reaches the kernels.
    """
    use_interpreter(smoke)
    import torch

    device = pick_device(torch, smoke, missing)
    torch.manual_seed(seed)
    return torch, device


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


def command_line(script: str, argv: Optional[Sequence[str]]) -> str:
    """The command that repeats this run from the repository root.

    ``argv`` is what main() was given (tests, the runner); None means the command line.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    return " ".join(["python", f"benchmarks/{os.path.basename(script)}", *map(shlex.quote, args)])


def record_head(benchmark: str, script: str, argv: Optional[Sequence[str]], *, smoke: bool, device: str,
                packages: Sequence[str], created: Optional[datetime.datetime] = None) -> Dict[str, object]:
    """The fields a record begins with: what ran, where, with which versions, how to repeat it.

    The versions of ``packages`` go under "versions"; with ``created`` (the gated-linear and
    gated-training records) the time of the run is recorded and the versions stand at the
    top level instead, where those records have always kept them.
    """
    head: Dict[str, object] = {"benchmark": benchmark}
    if created is not None:
        head["created"] = created.isoformat(timespec="seconds")
    head.update(command=command_line(script, argv), smoke=smoke, device=device)
    if created is not None:
        head.update(versions(packages))
    else:
        head["versions"] = versions(packages)
    return head


def slug(text: str) -> str:
    """A file-name-safe form of a device name (the part before the first comma): every
    character other than a-z and 0-9 becomes '-'."""
    return re.sub(r"[^a-z0-9]", "-", text.split(",")[0].strip().lower()).strip("-")


def now() -> datetime.datetime:
    """The time of the run: the record's ``created`` field and the default file stems."""
    return datetime.datetime.now()


def output_stem(out: str, prefix: str, smoke: bool, device: str, tag: Optional[str] = None) -> str:
    """``<out>/<prefix>_<tag>``, the tag defaulting to ``smoke`` in --smoke mode and to the
    device's slug otherwise: one record per benchmark and machine, replaced by a rerun."""
    return os.path.join(out, f"{prefix}_{tag or ('smoke' if smoke else slug(device))}")


def timestamped_stem(prefix: str, device: str, when: datetime.datetime) -> str:
    """``<prefix>_<device slug>_<YYYYmmdd-HHMMSS>``: a default file stem that a later run on
    the same machine does not overwrite."""
    return f"{prefix}_{slug(device)}_{when.strftime('%Y%m%d-%H%M%S')}"


# ---------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------
def do_bench_ms(fn: Callable[[], object], warmup_ms: float, rep_ms: float,
                grad_to_none: Optional[Sequence] = None) -> List[float]:
    """Every raw time (ms) of ``triton.testing.do_bench``: CUDA events, warm-up, L2 flushed
    between runs. The raw times are kept so that a record holds the spread, not only a median."""
    from triton.testing import do_bench
    return list(do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none, return_mode="all"))


def wall_clock_ms(fn: Callable[[], object], warmup: int, rep: int,
                  grad_to_none: Optional[Sequence] = None) -> List[float]:
    """``rep`` perf_counter times (ms) after ``warmup`` untimed calls: the --smoke timer.

    Compilation, autotuning and first-call costs stay in the warm-up. Like do_bench, the
    ``.grad`` of the tensors in ``grad_to_none`` is reset before every timed call.
    """
    for _ in range(warmup):
        fn()
    raw = []
    for _ in range(rep):
        for t in grad_to_none or ():
            t.grad = None
        start = time.perf_counter()
        fn()
        raw.append((time.perf_counter() - start) * 1e3)
    return raw


def step_times_ms(torch, step: Callable[[], object], warmup: int, iters: int, cuda: bool) -> List[float]:
    """One time (ms) per call of a whole training or inference step, after ``warmup`` calls.

    A step is long (many kernels, an optimizer update), so it is timed as a unit and not
    repeated under do_bench: CUDA events around every step on a GPU (no host sync between
    steps), perf_counter on a CPU.
    """
    for _ in range(warmup):
        step()
    if not cuda:
        raw = []
        for _ in range(iters):
            t0 = time.perf_counter()
            step()
            raw.append((time.perf_counter() - t0) * 1e3)
        return raw
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    for start, end in events:
        start.record()
        step()
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) for start, end in events]


def quantiles_ms(times: Sequence[float]) -> Dict[str, float]:
    """p10, median, p90, min, max and count of raw times: the spread next to the median."""
    ordered = sorted(times)
    pick = lambda q: ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]  # noqa: E731
    return {"p10": pick(0.1), "p50": statistics.median(ordered), "p90": pick(0.9),
            "min": ordered[0], "max": ordered[-1], "n": len(ordered)}


# ---------------------------------------------------------------------------------------
# Correctness
# ---------------------------------------------------------------------------------------
def require_within(errors: Dict[str, float], bound: float, what: str, measure: str) -> None:
    """Exit before any timing when an error exceeds ``bound``: a fast wrong kernel is no result.

    ``not e <= bound`` also catches NaN.
    """
    bad = {name: e for name, e in errors.items() if not e <= bound}
    if bad:
        raise SystemExit(f"{what} disagrees with the reference ({measure} > {bound}): {bad}")


# ---------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------
def write_atomically(path: str, write: Callable[[str], None]) -> str:
    """Have ``write`` fill a temporary file beside ``path``, then move it into place
    (``vtp.atomic.atomic_write``, the project's one writer of files).

    Every record, text, plot and archive the benchmarks write goes through here (the live
    step logs are the one exception: they are streamed, and archived whole afterwards).
    A reader (or a run killed half-way) never sees a half-written record or plot: ``path``
    holds either the old file or the complete new one.
    """
    _ATOMIC.atomic_write(path, write)
    return str(path)


def write_json(path, record) -> str:
    """Write ``record`` as indented JSON to ``path`` atomically (parents created); returns the path."""
    _ATOMIC.write_json(str(path), record)
    return str(path)


def write_text(path, text: str) -> str:
    """Write ``text`` to ``path`` atomically (parents created); returns the path."""
    _ATOMIC.write_text(str(path), text)
    return str(path)


def save_record(record, stem: str, plot: Optional[Callable[[object, str], None]]) -> None:
    """Write ``<stem>.json`` and, unless ``plot`` is None, ``<stem>.png`` drawn by
    ``plot(record, path)``; then say on stdout what was written."""
    write_json(stem + ".json", record)
    if plot is not None:
        plot(record, stem + ".png")
    print(f"wrote {stem}.json" + ("" if plot is None else f" and {stem}.png"))


def pack(folder: str, archive: str) -> str:
    """Every file below ``folder`` into the .tar.gz ``archive``, written atomically."""
    def write(tmp):
        with tarfile.open(tmp, "w:gz") as tar:
            for dirpath, _, filenames in sorted(os.walk(folder)):
                for name in sorted(filenames):
                    path = os.path.join(dirpath, name)
                    tar.add(path, arcname=os.path.relpath(path, folder))
    return write_atomically(archive, write)


def pyplot():
    """matplotlib.pyplot on the Agg backend: the benchmarks run on machines without a display."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path) -> str:
    """Lay out ``fig``, write it as a 120 dpi PNG to ``path`` atomically and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    try:
        return write_atomically(str(path), lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    finally:
        plt.close(fig)


def bar_panel(ax, labels: Sequence[str], medians: Sequence[float]) -> None:
    """Median times as labelled bars, the last bar (the baseline the others are held
    against) grey."""
    colours = [f"C{i}" for i in range(len(labels) - 1)] + ["0.6"]
    bars = ax.bar(list(labels), list(medians), color=colours)
    ax.bar_label(bars, fmt="%.3g", fontsize=8)
    ax.set_ylabel("median ms (lower is better)")


def smoke_suffix(smoke: bool, text: str = " [smoke]") -> str:
    """Marks a title or table heading of a --smoke run, whose numbers are not speeds."""
    return text if smoke else ""


# ---------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------
class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show a flag's default unless it is None or the help already names it (then the help
    text says what the default depends on, e.g. --smoke)."""

    def _get_help_string(self, action):
        if action.default is None or "default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def parser(doc: str, formatter_class=argparse.RawDescriptionHelpFormatter) -> argparse.ArgumentParser:
    """An argument parser whose description is the first paragraph of the script's docstring."""
    return argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=formatter_class)


def add_do_bench_flags(p: argparse.ArgumentParser) -> None:
    """--warmup and --rep: do_bench's warm-up and measuring times in ms on a GPU, and the
    counts of untimed and timed calls in --smoke mode (wall_clock_ms)."""
    p.add_argument("--warmup", type=int, default=25, help="do_bench warm-up time in ms (--smoke: warm-up iterations)")
    p.add_argument("--rep", type=int, default=200, help="do_bench measuring time in ms (--smoke: timed iterations)")


def add_output_flags(p: argparse.ArgumentParser, smoke_help: str) -> None:
    """--out, --no-plot and --smoke, in that order and with the same help, for the kernel
    benchmarks whose file names are ``<kernel>_<device>`` (or ``_smoke``)."""
    p.add_argument("--out", default=RESULTS, help="folder for the JSON record and the PNG plot")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG (JSON and table only)")
    p.add_argument("--smoke", action="store_true", help=smoke_help)


def subset(text: str, allowed: Iterable[str], flag: str) -> List[str]:
    """The comma-separated names in ``text``; exits naming ``flag`` on one not in ``allowed``."""
    allowed = list(allowed)
    chosen = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in allowed]
    if unknown:
        raise SystemExit(f"{flag}: unknown {unknown}; expected a subset of {','.join(allowed)}")
    return chosen


# ---------------------------------------------------------------------------------------
# Processes with a deadline
# ---------------------------------------------------------------------------------------
class RunningChild:
    """The process a runner waits on, so that a SIGTERM to the runner can end it first."""
    proc: Optional[subprocess.Popen] = None


def stop_process_group(proc: subprocess.Popen) -> None:
    """End ``proc`` and everything it started (compile workers): SIGTERM to its process
    group, SIGKILL 10 s later if it is still there."""
    for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def run_logged(cmd: Sequence[str], env: Dict[str, str], log_path: str, timeout: float,
               cwd: str = ROOT) -> Dict[str, object]:
    """Run ``cmd``, its output both to our stdout and to ``log_path``; ended (with its
    process group) after ``timeout`` seconds. Returns status ("ok", "failed" or "timeout"),
    exit code and seconds."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    start = time.monotonic()
    with open(log_path, "w") as log:
        log.write("$ " + shlex.join(cmd) + "\n")
        log.flush()
        # Its own process group, so that a time-out ends its compile workers too; not its own
        # session, so that whoever ends the runner's session ends it as well.
        group = {"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}
        proc = subprocess.Popen(list(cmd), cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, **group)
        RunningChild.proc = proc

        def copy():
            for raw in iter(proc.stdout.readline, b""):
                line = raw.decode("utf-8", "replace")
                sys.stdout.write(line)
                sys.stdout.flush()
                log.write(line)
                log.flush()

        reader = threading.Thread(target=copy, daemon=True)
        reader.start()
        try:
            proc.wait(timeout=max(timeout, 1.0))
            status = "ok" if proc.returncode == 0 else "failed"
        except subprocess.TimeoutExpired:
            stop_process_group(proc)
            status = "timeout"
        reader.join(timeout=10)
        RunningChild.proc = None
        seconds = time.monotonic() - start
        if status == "timeout":
            log.write(f"\n[stopped after {seconds:.0f} s: the time limit of {timeout:.0f} s was up]\n")
    return {"status": status, "returncode": proc.returncode, "seconds": round(seconds, 1)}
