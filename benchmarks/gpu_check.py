"""One prepared command for an H100/H200: are the Triton kernels right, how fast are they
against the strongest alternatives, and should they be the default?

    python3 benchmarks/gpu_check.py --out "$OUT"            # on the GPU machine, <= 7 minutes
    python benchmarks/gpu_check.py --smoke --out /tmp/gc    # CPU check of the script (interpreter)

Each step runs in its own process under its own time limit; the limits add up to less
than --budget-s (420 s), so a step that hangs costs only its own limit. Every step writes
its JSON record as soon as it has something to say (and rewrites it as it goes), and after
every step everything so far (records, logs, the summary) is packed into one archive,
``gpu_check_<device>_<time>.tar.gz`` in --out (default $OUT if set):

    step         limit  what
    environment   20 s  device, versions (which timm, from where), SDPA switches, clocks,
                        the machine's two ceilings (bf16 GEMM TFLOP/s, copy GB/s)
    compile       40 s  every Triton launch the later steps make, compiled ahead by parallel
                        workers into the Triton cache the steps share (Triton compiles one
                        kernel at a time otherwise, and they need a few hundred)
    configs       40 s  every autotune config of every kernel forced once on a small ragged
                        bf16 shape, against the fp64 reference, outputs pre-filled with NaN
    correctness   50 s  every op in bf16, fp16 and fp32 against its reference in fp64 on
                        upcast inputs, at DeiT-B widths and at ragged small shapes, outputs
                        pre-filled with NaN; determinism of dgate, dweight/dbias, dq/dk/dv
    ops           75 s  each op at DeiT-B batch 256 in the dtype the model runs it in,
                        forward and forward+backward, against the reference, torch.compile
                        of the reference, SDPA with V padded to the head dim (each SDPA
                        backend, and which one the default dispatch ran), and floors
                        (nn.Linear without a gate, a full-width LayerNorm)
    training     135 s  a DeiT-B training step (bf16 autocast, fused AdamW): ungated timm
                        against the gated model with backend torch and with gated_linear on
                        Triton, eager, then torch.compile as time allows (target <= 1.03x)
    pruned        50 s  DeiT-B pruned 40 % (round_to 1 and 8): inference with backend torch,
                        triton, and each op alone on Triton; autotune keys per kernel
    decision            benchmarks/decide.py's rule applied to the records (no GPU)

Timings are CUDA events after warm-up on random data (never zeros): do_bench for ops,
events around every step for models; every raw time is kept, in two rounds whose
difference is the spread the decision rule uses.

timm: the machine's own is used when it is >= 1.0.23; otherwise a timm wheel carried in
.whl/ (--wheels) is installed into a temporary folder first. The record says which.
Under --smoke the steps run in this process on the CPU (Triton interpreter, tiny shapes,
fp32/fp16, wall-clock timers, no time limits): it checks the script, not the machine.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import glob
import importlib
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Callable, Dict, List, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # common.py, also when loaded by path
import common  # noqa: E402  (puts the repository root on sys.path too)
import decide  # noqa: E402

BUDGET_S = 420.0
# (name, limit in seconds). The limits add up to 410 s, inside the budget.
STEPS = [("environment", 20), ("compile", 40), ("configs", 40), ("correctness", 50), ("ops", 75), ("training", 135),
         ("pruned", 50)]
MIN_VERSIONS = {"timm": "1.0.23"}
MODEL = "deit_base_patch16_224"

# Relative error norms ||out - ref|| / ||ref|| against the fp64 reference on upcast inputs.
# bf16 keeps 8 bits (2**-9 ~ 2e-3 per rounding) and attention rounds P, V, dO and outputs
# to it; fp16 keeps 11; fp32 runs without TF32 (matmul precision "highest"), so only the
# order of fp32 sums differs from fp64.
BOUNDS = {"bf16": 2e-2, "fp16": 4e-3, "fp32": 1e-4}


# ---------------------------------------------------------------------------------------
# The runner
# ---------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT") or common.RESULTS,
                   help=f"folder for the archive (default: $OUT if set, else {common.RESULTS})")
    p.add_argument("--smoke", action="store_true", help="CPU check of the script: interpreter, tiny shapes, in-process")
    p.add_argument("--only", default=",".join(name for name, _ in STEPS),
                   help="comma-separated steps to run, in the fixed order (default: all)")
    p.add_argument("--budget-s", type=float, default=BUDGET_S, help=f"seconds for everything (default: {BUDGET_S:.0f})")
    p.add_argument("--wheels", default=os.path.join(common.ROOT, ".whl"),
                   help="folder of carried wheels, used only for packages older than needed (default: .whl/)")
    p.add_argument("--python", default=sys.executable, help="interpreter for the steps (default: this one)")
    # Internal: run one step in this process (the runner starts each step this way).
    p.add_argument("--step", default=None, help=argparse.SUPPRESS)
    p.add_argument("--work", default=None, help=argparse.SUPPRESS)
    p.add_argument("--seconds", type=float, default=None, help=argparse.SUPPRESS)
    p.add_argument("--compile-worker", default=None, help=argparse.SUPPRESS)  # "i/n"
    p.add_argument("--arch", type=int, default=90, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.only = common.subset(args.only, [name for name, _ in STEPS], "--only")
    return args


def _version_tuple(text: str):
    return tuple(int(x) for x in re.findall(r"\d+", text)[:3])


def carried_packages(wheels_dir: str) -> Dict[str, object]:
    """Install the carried wheels of packages that are missing or older than MIN_VERSIONS
    into a temporary folder; returns {"path": folder or None, "packages": {name: source}}."""
    from importlib import metadata

    sources: Dict[str, str] = {}
    needed = []
    for name, minimum in MIN_VERSIONS.items():
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


def main(argv=None) -> Dict[str, object]:
    args = parse_args(argv)
    if args.compile_worker:
        index, workers = map(int, args.compile_worker.split("/"))
        compile_worker(index, workers, args.arch)
        return {}
    if args.step:
        run_step_here(args.step, args.work, args.smoke, args.seconds or 60.0)
        return {}
    clock = time.monotonic()
    started = common.now()
    out = os.path.abspath(args.out)
    work = tempfile.mkdtemp(prefix="vtp-gpu-check-")
    carried = carried_packages(args.wheels)
    env = dict(os.environ, PYTHONUNBUFFERED="1", VTP_CARRIED=json.dumps(carried["packages"]))
    # One Triton cache for the compile workers and the steps, outside the archived folder.
    env.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="vtp-triton-cache-"))
    if not args.smoke:
        env.pop("TRITON_INTERPRET", None)  # the real kernels: the interpreter is for --smoke only
    if carried["path"]:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (carried["path"], env.get("PYTHONPATH")) if p)
        sys.path.insert(0, carried["path"])
    device = "cpu-smoke" if args.smoke else _gpu_name(args.python, env)
    archive = os.path.join(out, f"{common.timestamped_stem('gpu_check', device, started)}.tar.gz")
    summary: Dict[str, object] = {
        "benchmark": "gpu_check", "created": started.isoformat(timespec="seconds"),
        "command": common.command_line(__file__, argv), "smoke": args.smoke, "budget_s": args.budget_s,
        "limits_s": dict(STEPS), "packages": carried["packages"], "steps": [], "decision": None, "finished": None,
    }

    def save():
        common.write_json(os.path.join(work, "gpu_check.json"), summary)
        common.pack(work, archive)

    def on_term(signum, frame):  # end the running step with us, and keep what is done
        if common.RunningChild.proc is not None:
            common.stop_process_group(common.RunningChild.proc)
        summary["finished"] = f"stopped by signal {signum}"
        save()
        sys.exit(128 + signum)

    handlers = {sig: signal.signal(sig, on_term) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        for name, limit in STEPS:
            if name not in args.only:
                continue
            left = args.budget_s - (time.monotonic() - clock) - 5  # 5 s for the decision and packing
            entry: Dict[str, object] = {"name": name, "limit_s": limit}
            if left < min(limit, 15):
                entry.update(status="skipped", reason=f"{left:.0f} s of the budget left")
            elif args.smoke:
                t0 = time.monotonic()
                try:
                    run_step_here(name, work, True, limit)
                    entry.update(status="ok")
                except Exception as e:  # noqa: BLE001  (the record says what failed; later steps still run)
                    traceback.print_exc()
                    entry.update(status="failed", error=f"{type(e).__name__}: {e}")
                entry["seconds"] = round(time.monotonic() - t0, 1)
            else:
                seconds = min(limit, left)
                cmd = [args.python, os.path.abspath(__file__), "--step", name, "--work", work, "--seconds", str(seconds)]
                print(f"\n[gpu_check] {name} (at most {seconds:.0f} s)", flush=True)
                entry.update(common.run_logged(cmd, env, os.path.join(work, "logs", f"{name}.log"), seconds))
            print(f"[gpu_check] {name}: {entry['status']} {entry.get('seconds', '')}", flush=True)
            summary["steps"].append(entry)
            save()
        decision = decide.decide(decide.load(work))
        summary["decision"] = decision
        common.write_json(os.path.join(work, "decision.json"), decision)
        summary["finished"] = common.now().isoformat(timespec="seconds")
        summary["seconds"] = round(time.monotonic() - clock, 1)
        save()
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    print("\n" + decide.report(decision))
    print(f"\n[gpu_check] {summary['seconds']} s; archive: {archive}")
    for e in summary["steps"]:
        print(f"  {e['name']:<12} {e['status']:<8} {e.get('seconds', '-')}")
    return summary


def _gpu_name(python: str, env: Dict[str, str]) -> str:
    code = "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'no-gpu')"
    try:
        done = subprocess.run([python, "-c", code], env=env, capture_output=True, text=True, timeout=60)
        return done.stdout.strip().splitlines()[-1] if done.returncode == 0 and done.stdout.strip() else "unknown"
    except (subprocess.TimeoutExpired, OSError):
        return "unknown"


# ---------------------------------------------------------------------------------------
# What every step shares
# ---------------------------------------------------------------------------------------
class Step:
    """One step's process: its device, deadline and record (rewritten by ``save``)."""

    def __init__(self, name: str, work: str, smoke: bool, seconds: float):
        self.name, self.work, self.smoke = name, work, smoke
        self.deadline = time.monotonic() + seconds
        torch, self.device = common.setup(smoke, 0)
        self.torch = torch
        self.cuda = self.device.type == "cuda"
        torch.set_float32_matmul_precision("highest")  # fp32 checks without TF32
        self.record: Dict[str, object] = {"step": name, "smoke": smoke, "device": common.device_name(torch, self.device),
                                          "results": []}

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def save(self) -> None:
        common.write_json(os.path.join(self.work, f"{self.name}.json"), self.record)

    def dtype(self, name: str):
        return getattr(self.torch, common.DTYPES[name])

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()


def run_step_here(name: str, work: str, smoke: bool, seconds: float) -> None:
    step = Step(name, work, smoke, seconds)
    try:
        STEP_FUNCTIONS[name](step)
    except BaseException as e:
        step.record["error"] = f"{type(e).__name__}: {e}"
        step.record["traceback"] = traceback.format_exc()[-4000:]
        step.save()
        raise
    step.record["finished"] = True
    step.save()


def rel_err(torch, got, want) -> float:
    """||got - want|| / ||want|| in fp64; inf when got holds a NaN or an infinity."""
    got, want = got.detach().double(), want.detach().double()
    if not torch.isfinite(got).all():
        return float("inf")
    denominator = want.norm().item()
    return (got - want).norm().item() / denominator if denominator > 0 else (got - want).norm().item()


def bench(step: Step, fns: Dict[str, Callable[[], object]], rounds: int = 2,
          warmup_ms: float = 10, rep_ms: float = 50) -> Dict[str, Dict[str, object]]:
    """Raw times of every fn in ``rounds`` interleaved rounds (do_bench on a GPU, wall clock
    in smoke mode); median of all, the round medians and their relative difference."""
    raw = {name: [] for name in fns}
    for fn in fns.values():
        fn()  # compile, autotune, allocate: outside the timings
    step.sync()
    for _ in range(rounds):
        for name, fn in fns.items():
            raw[name].append(common.do_bench_ms(fn, warmup_ms, rep_ms) if step.cuda else common.wall_clock_ms(fn, 0, 1))
    return {name: summarize(rounds_ms) for name, rounds_ms in raw.items()}


def summarize(rounds_ms: List[List[float]]) -> Dict[str, object]:
    pooled = [t for r in rounds_ms for t in r]
    median = statistics.median(pooled)
    round_medians = [statistics.median(r) for r in rounds_ms]
    return {"median_ms": median, "round_medians_ms": round_medians,
            "spread": (max(round_medians) - min(round_medians)) / median if median > 0 else 0.0,
            "quantiles_ms": common.quantiles_ms(pooled), "rounds_ms": rounds_ms}


def step_rounds(step: Step, fn: Callable[[], object], warmup: int, iters: int, rounds: int = 2) -> Dict[str, object]:
    """Whole-step times (CUDA events around every step): ``rounds`` rounds of ``iters``."""
    for _ in range(warmup):
        fn()
    step.sync()
    return summarize([common.step_times_ms(step.torch, fn, 0, iters, step.cuda) for _ in range(rounds)])


def autotuners(module) -> Dict[str, object]:
    from triton.runtime.autotuner import Autotuner
    return {name: obj for name, obj in vars(module).items() if isinstance(obj, Autotuner)}


@contextlib.contextmanager
def only_configs(choices: Dict[object, object]):
    """Each autotuned kernel in ``choices`` runs the one config given (no tuning)."""
    saved = {k: (k.configs, k.cache) for k in choices}
    try:
        for kernel, config in choices.items():
            kernel.configs, kernel.cache = [config], {}
        yield
    finally:
        for kernel, (configs, cache) in saved.items():
            kernel.configs, kernel.cache = configs, cache


@contextlib.contextmanager
def one_op_on_triton(op: str):
    """Backend "auto" with FASTER_ON_CUDA = {op}: the model runs only ``op``'s kernel. Where
    "auto" never picks Triton (CPU tensors: --smoke, the compile workers) the same choice
    is made directly."""
    import vtp_kernels
    import vtp_kernels.backend as backend

    saved_set, saved_use = backend.FASTER_ON_CUDA, vtp_kernels.use_triton
    backend.FASTER_ON_CUDA = frozenset({op})
    # On a GPU the backend's own rule decides (auto: CUDA tensors of ops in FASTER_ON_CUDA).
    vtp_kernels.use_triton = lambda name, x: saved_use(name, x) if x.is_cuda else name == op
    try:
        with vtp_kernels.use_backend("auto"):
            yield
    finally:
        backend.FASTER_ON_CUDA, vtp_kernels.use_triton = saved_set, saved_use


def backend_context(name: str):
    """"torch", "triton" or "auto:<op>"."""
    import vtp_kernels
    return one_op_on_triton(name.split(":", 1)[1]) if name.startswith("auto:") else vtp_kernels.use_backend(name)


# ---------------------------------------------------------------------------------------
# The op cases, as data: the steps run them, the compile step compiles their launches
# ---------------------------------------------------------------------------------------
# DeiT-B: four linears per block, LayerNorm width 768, 12 heads of 64. 40 % pruned: 461 of
# 768 LayerNorm columns (464 at round_to=8) and these kept value widths (one head dropped).
DEIT_B_LINEARS = {"qkv": (768, 2304), "proj": (768, 768), "fc1": (768, 3072), "fc2": (3072, 768)}
WIDTHS = {1: (61, 47, 55, 37, 64, 21, 30, 44, 53, 13, 38), 8: (64, 48, 56, 40, 64, 24, 32, 48, 56, 16, 40)}
KEPT = {1: 461, 8: 464}
EPS = 1e-6


def case(op: str, label: str, dtype: str, **params) -> Dict[str, object]:
    return {"op": op, "label": label, "dtype": dtype, "params": params}


def configs_cases(smoke: bool) -> List[Dict[str, object]]:
    """One small ragged case per op with autotuned kernels, run under each config in turn.
    The attention case has the production constexprs (D = 64, a 64-wide head, odd widths)."""
    if smoke:
        return [case("layer_norm_gather", "M=37 D=40 k=13", "fp32", M=37, D=40, k=13),
                case("packed_attention", "B=1 N=13 D=16 widths=[5, 0, 8]", "fp32", B=1, N=13, D=16, widths=(5, 0, 8))]
    return [case("layer_norm_gather", "M=111 D=200 k=97", "bf16", M=111, D=200, k=97),
            case("packed_attention", "B=2 N=77 D=64 widths=[40, 0, 24, 64, 7]", "bf16", B=2, N=77, D=64,
                 widths=(40, 0, 24, 64, 7))]


def correctness_cases(smoke: bool) -> List[Dict[str, object]]:
    """Per dtype: every op at DeiT-B widths (16 images) and at ragged small shapes; the
    attention case with a unit head stride; the linears under autocast. --smoke keeps one
    case of each kind, and fp16 only at the first."""
    M = 37 if smoke else 16 * 197  # at 16 images M is divisible by 16, as at batch 256
    linears = {"40x24": (40, 24)} if smoke else DEIT_B_LINEARS
    ln = [(M, 64, 40)] if smoke else [(M, 768, KEPT[1]), (M, 768, KEPT[8])]
    attn = [(1, 13, 16, (5, 16, 8))] if smoke else [(16, 197, 64, WIDTHS[1]), (16, 197, 64, WIDTHS[8])]
    ragged_linears = ((111, 40, 24), (5, 7, 13), (1, 1, 1))
    ragged_ln = ((111, 781, 301), (5, 7, 3), (3, 1, 1))
    ragged_attn = ((2, 77, 64, (40, 0, 24, 64, 7)), (3, 29, 16, (1, 16, 7, 8)))
    if smoke:
        ragged_linears, ragged_ln, ragged_attn = ragged_linears[1:2], ragged_ln[1:2], ragged_attn[1:]
    out = []
    for dt in (("fp32", "fp16") if smoke else ("bf16", "fp16", "fp32")):
        out += [case("gated_linear", f"{name} M={M}", dt, M=M, K=K, N=N, repeat=True) for name, (K, N) in linears.items()]
        out += [case("layer_norm_gather", f"M={m} D={d} k={k}", dt, M=m, D=d, k=k, repeat=True) for m, d, k in ln]
        # fp32 attention dots lower to FMA code that compiles slowly: one DeiT-B plan is enough.
        out += [case("packed_attention", f"B={b} N={n} D={d} widths={list(w)}", dt, B=b, N=n, D=d, widths=w, repeat=True)
                for b, n, d, w in (attn[:1] if dt == "fp32" else attn)]
        if smoke and dt == "fp16":
            continue
        out += [case("gated_linear", f"M={m} K={k} N={n}", dt, M=m, K=k, N=n) for m, k, n in ragged_linears]
        out += [case("layer_norm_gather", f"M={m} D={d} k={k}", dt, M=m, D=d, k=k) for m, d, k in ragged_ln]
        out += [case("packed_attention", f"B={b} N={n} D={d} widths={list(w)}", dt, B=b, N=n, D=d, widths=w)
                for b, n, d, w in ragged_attn]
    out.append(case("packed_attention", "q stored [B, N, D, H] (head stride 1), widths (8,)*8",
                    "fp32" if smoke else "bf16", B=1, N=13, D=16, widths=(8,) * 8, q_layout="heads_innermost"))
    if not smoke:  # the production setting: fp32 parameters under bf16 autocast
        out += [case("gated_linear", f"{name} M={M} bf16 autocast, fp32 parameters", "bf16", M=M, K=K, N=N,
                     autocast=True, repeat=True) for name, (K, N) in linears.items()]
    return out


def ops_cases(smoke: bool) -> List[Dict[str, object]]:
    """The production shapes, in the dtype the model runs each op in: batch 256, bf16
    autocast over fp32 parameters for the linears, the fp32 residual stream for LayerNorm,
    bf16 q/k/v views of the pruned qkv output for attention."""
    if smoke:
        B, N_TOK, D, HD = 2, 13, 64, 16
        linears, kept, widths, dt = {"40x72": (40, 72)}, {1: 37, 8: 40}, {1: (5, 16, 8), 8: (8, 16, 8)}, "fp32"
    else:
        B, N_TOK, D, HD = 256, 197, 768, 64
        linears, kept, widths, dt = DEIT_B_LINEARS, KEPT, WIDTHS, "bf16"
    M = B * N_TOK
    out = [case("gated_linear", name, dt, M=M, K=K, N=N, autocast=not smoke) for name, (K, N) in linears.items()]
    plans = (8,) if smoke else (1, 8)
    out += [case("layer_norm_gather", f"D={D} k={kept[r]} (round_to={r})", "fp32", M=M, D=D, k=kept[r], round_to=r)
            for r in plans]
    out += [case("packed_attention", f"B={B} N={N_TOK} H={len(widths[r])} D={HD} (round_to={r})", dt, B=B, N=N_TOK,
                 D=HD, widths=widths[r], round_to=r) for r in plans]
    return out


def gated_linear_inputs(torch, device, dtype, p, empty=False):
    """x, weight, gate, bias, dy; fp32 parameters when the case runs under autocast."""
    new = torch.empty if empty else torch.randn
    param_dtype = torch.float32 if p.get("autocast") else dtype
    M, K, N = p["M"], p["K"], p["N"]
    x = new(M, K, device=device).to(dtype)
    w = (new(N, K, device=device) * max(K, 1) ** -0.5).to(param_dtype)
    a = (new(K, device=device) if empty else torch.empty(K, device=device).uniform_(0.5, 1.5)).to(param_dtype)
    b = (0.1 * new(N, device=device)).to(param_dtype)
    return x, w, a, b, new(M, N, device=device).to(dtype)


def layer_norm_gather_inputs(torch, device, dtype, p, empty=False):
    """x (non-zero mean, non-unit scale), sorted distinct kept columns, weight, bias, dy."""
    new = torch.empty if empty else torch.randn
    M, D, k = p["M"], p["D"], p["k"]
    x = (3.0 + 2.5 * new(M, D, device=device)).to(dtype)
    index = torch.randperm(D, device=device)[:k].sort().values
    w = (1.0 + 0.5 * new(k, device=device)).to(dtype)
    b = new(k, device=device).to(dtype)
    return x, index, w, b, new(M, k, device=device).to(dtype)


def packed_attention_inputs(torch, device, dtype, p, empty=False):
    """q, k, v as views of one qkv projection output [B, N, 2*H*D + sum(widths)] (the
    pruned attention's layout), and dout; ``q_layout="heads_innermost"`` stores q as
    [B, N, D, H] instead, so its head stride is 1."""
    new = torch.empty if empty else torch.randn
    B, N, D, widths = p["B"], p["N"], p["D"], p["widths"]
    H = len(widths)
    row = 2 * H * D + sum(widths)
    qkv = new(B, N, row, device=device).to(dtype)
    q = qkv[..., :H * D].view(B, N, H, D).transpose(1, 2)
    k = qkv[..., H * D:2 * H * D].view(B, N, H, D).transpose(1, 2)
    v = qkv[..., 2 * H * D:]
    if p.get("q_layout") == "heads_innermost":
        q = new(B, N, D, H, device=device).to(dtype).permute(0, 3, 1, 2)
    return q, k, v, new(B, N, sum(widths), device=device).to(dtype)


INPUTS = {"gated_linear": gated_linear_inputs, "layer_norm_gather": layer_norm_gather_inputs,
          "packed_attention": packed_attention_inputs}


def run_case(step: Step, c: Dict[str, object]) -> Dict[str, object]:
    """The Triton op forward and backward on fresh random inputs (every kernel buffer
    pre-filled with NaN) against the reference in fp64 on upcast copies: relative errors,
    and with ``repeat`` whether a second run gives bitwise the same gradients."""
    torch = step.torch
    from vtp_kernels import reference
    from vtp_kernels._utils import poison_outputs
    from vtp_kernels._gated_linear import gated_linear_triton
    from vtp_kernels._layer_norm_gather import layer_norm_gather_triton
    from vtp_kernels._packed_attention import packed_attention_triton

    op, p, dtype = c["op"], c["params"], step.dtype(c["dtype"])
    tensors = INPUTS[op](torch, step.device, dtype, p)
    if op == "gated_linear":
        *leaves, dy = tensors
        names = ("y", "dx", "dweight", "dgate", "dbias")
        repeatable = ("dweight", "dgate")

        def triton_op(x, w, a, b):
            with torch.autocast(step.device.type, dtype=dtype, enabled=bool(p.get("autocast"))):
                return gated_linear_triton(x, w, a, b)
        reference_op = reference.gated_linear
    elif op == "layer_norm_gather":
        x, index, w, b, dy = tensors
        leaves = [x, w, b]
        names, repeatable = ("y", "dx", "dweight", "dbias"), ("dweight", "dbias")
        triton_op = lambda x, w, b: layer_norm_gather_triton(x, index, w, b, EPS)  # noqa: E731
        reference_op = lambda x, w, b: reference.layer_norm_gather(x, index, w, b, EPS)  # noqa: E731
    else:
        *leaves, dy = tensors
        names, repeatable = ("out", "dq", "dk", "dv"), ("dq", "dk", "dv")
        triton_op = lambda q, k, v: packed_attention_triton(q, k, v, p["widths"])  # noqa: E731
        reference_op = lambda q, k, v: reference.packed_attention(q, k, v, p["widths"])  # noqa: E731
    leaves = [t.detach().requires_grad_() for t in leaves]

    def run():
        with poison_outputs():
            y = triton_op(*leaves)
            return [y, *torch.autograd.grad(y, leaves, dy)]

    got = run()
    exact = [t.detach().double().requires_grad_() for t in leaves]
    y_ref = reference_op(*exact)
    want = [y_ref, *torch.autograd.grad(y_ref, exact, dy.double())]
    result: Dict[str, object] = {"errors": {n: rel_err(torch, g, r) for n, g, r in zip(names, got, want)}}
    if p.get("repeat"):
        again = run()
        result["bitwise_repeatable"] = {n: bool(torch.equal(g, h)) for n, g, h in zip(names, got, again)
                                        if n in repeatable}
    return result


def check(result: Dict[str, object], dtype_name: str) -> Dict[str, object]:
    bound = BOUNDS[dtype_name]
    result["bound"] = bound
    result["ok"] = all(e <= bound for e in result["errors"].values()) and \
        all(result.get("bitwise_repeatable", {}).values())
    return result


# ---------------------------------------------------------------------------------------
# Compiling every launch ahead, in parallel
# ---------------------------------------------------------------------------------------
# Triton compiles one kernel at a time and holds the GIL while it does, and the steps need
# a few hundred distinct compiles (three dtypes, every config, every pruned shape). Worker
# processes compile the same launches with a compile-only driver (CPU tensors, the GPU's
# architecture) and leave them in Triton's cache (TRITON_CACHE_DIR, shared with the steps),
# so the steps find them compiled. A launch the workers missed is compiled where it runs.
def compile_case(torch, c: Dict[str, object]) -> None:
    import importlib

    op, p = c["op"], c["params"]
    dtype = getattr(torch, common.DTYPES[c["dtype"]])
    tensors = INPUTS[op](torch, torch.device("cpu"), dtype, p, empty=True)
    module = importlib.import_module(f"vtp_kernels._{op}")
    if op == "gated_linear":
        _, w, a, _, _ = tensors
        module._scale_weight(w, a, dtype)
        module._scale_weight_backward(torch.empty(w.shape, dtype=dtype), w, a, True, True)
    elif op == "layer_norm_gather":
        x, index, w, b, dy = tensors
        y, mean, rstd = module._forward(x, index, w, b, EPS)
        module._backward(torch.empty(y.shape, dtype=y.dtype), x, index, w, mean, rstd, True, True, True)
    else:
        q, k, v, dout = tensors
        widths = tuple(p["widths"])
        out, lse = module._forward(q, k, v, widths, p["D"] ** -0.5)
        module._backward(dout, q, k, v, out, lse, widths, p["D"] ** -0.5, True, True)


_PRUNED_ON_CPU: Dict[object, object] = {}


def compile_pruned(torch, round_to: int, op: str, smoke: bool) -> None:
    """``op``'s launches in the pruned model, from its own forward on the CPU at 16 images
    (M = 16 * 197 rows fall in the same divisibility classes as 256 * 197). Only the
    launches matter, so each nn.Linear returns an uninitialised bf16 output of its shape,
    as under autocast, and the other op runs its reference."""
    if round_to not in _PRUNED_ON_CPU:  # a worker may compile several jobs of these models
        if "gated" not in _PRUNED_ON_CPU:
            _PRUNED_ON_CPU["gated"] = gated_model(torch, torch.device("cpu"), smoke)[1]
        _PRUNED_ON_CPU[round_to] = pruned_model(torch, torch.device("cpu"), round_to, smoke, _PRUNED_ON_CPU["gated"])
    small = _PRUNED_ON_CPU[round_to]
    images = torch.empty(16, 3, small.patch_embed.img_size[0], small.patch_embed.img_size[1])
    linear_forward = torch.nn.Linear.forward
    torch.nn.Linear.forward = lambda self, x: x.new_empty(*x.shape[:-1], self.out_features, dtype=torch.bfloat16)
    try:
        with one_op_on_triton(op), torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            small(images)
    finally:
        torch.nn.Linear.forward = linear_forward


def compile_jobs(smoke: bool) -> List[Dict[str, object]]:
    """What to compile: the pruned models' forwards and every case of every step, each with
    the configs an autotuned kernel compiles there (autotuning: those its pruning keeps;
    the configs step: all; the correctness step: the first) and a rough cost."""
    def cost(c):  # fp32 dots compile to long FMA code; attention kernels are the big ones
        return (8 if c["dtype"] == "fp32" else 2) if c["op"] == "packed_attention" else 1
    # Attention's autotuned kernels have several configs each: one job per config index.
    attention = importlib.import_module("vtp_kernels._packed_attention")
    attention_configs = range(max(len(k.configs) for k in autotuners(attention).values()))
    jobs = [{"what": f"pruned round_to={r} layer_norm_gather", "configs": "kept", "round_to": r,
             "pruned_op": "layer_norm_gather", "cost": 4} for r in (1, 8)]
    jobs += [{"what": f"pruned round_to={r} packed_attention config {i}", "configs": i, "round_to": r,
              "pruned_op": "packed_attention", "cost": 3} for r in (1, 8) for i in attention_configs]
    for c in ops_cases(smoke):
        if c["op"] == "packed_attention":
            jobs += [{"what": f"ops {c['op']} {c['label']} config {i}", "configs": i, "case": c, "cost": 2}
                     for i in attention_configs]
        else:
            jobs.append({"what": f"ops {c['op']} {c['label']}", "configs": "kept", "case": c, "cost": 2})
    for c in configs_cases(smoke):
        indices = attention_configs if c["op"] == "packed_attention" else ["all"]
        jobs += [{"what": f"configs {c['op']} {c['label']} config {i}", "configs": i, "case": c, "cost": 2}
                 for i in indices]
    jobs += [{"what": f"correctness {c['op']} {c['label']} {c['dtype']}", "configs": "first", "case": c,
              "cost": cost(c)} for c in correctness_cases(smoke)]
    return jobs


def schedule(jobs: List[Dict[str, object]], workers: int) -> List[List[Dict[str, object]]]:
    """Longest first, each to the least loaded worker."""
    queues: List[List[Dict[str, object]]] = [[] for _ in range(workers)]
    loads = [0.0] * workers
    for job in sorted(jobs, key=lambda j: -j["cost"]):
        i = loads.index(min(loads))
        queues[i].append(job)
        loads[i] += job["cost"]
    return queues


def compile_worker(index: int, workers: int, arch: int) -> None:
    """Compile worker ``index``'s share of the jobs; print one JSON line of what it did."""
    import torch

    import compile_sm90

    torch.set_num_threads(1)  # one core per worker: the workers are the parallelism
    _, state = compile_sm90.install_sm90_driver(arch)
    done = []
    for job in schedule(compile_jobs(False), workers)[index]:
        t0 = time.monotonic()
        state["configs"] = job["configs"]
        try:
            if "case" in job:
                compile_case(torch, job["case"])
            else:
                compile_pruned(torch, job["round_to"], job["pruned_op"], False)
            done.append({"what": job["what"], "seconds": round(time.monotonic() - t0, 2)})
        except Exception as e:  # noqa: BLE001
            done.append({"what": job["what"], "error": f"{type(e).__name__}: {e}"})
    print("COMPILED " + json.dumps(done), flush=True)


def step_compile(step: Step) -> None:
    rec = step.record
    if step.smoke:
        rec["note"] = "nothing to compile under the interpreter"
        return
    env_record = os.path.join(step.work, "environment.json")
    arch = 90
    if os.path.exists(env_record):
        with open(env_record) as f:
            gpu = json.load(f).get("gpu", {})
        arch = int(gpu.get("capability", "9.0").replace(".", "")) if gpu else arch
    workers = max(1, min(16, os.cpu_count() or 1))
    rec.update(arch=arch, workers=workers, jobs=len(compile_jobs(False)),
               triton_cache=os.environ.get("TRITON_CACHE_DIR"))
    step.save()
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--compile-worker", f"{i}/{workers}",
                               "--arch", str(arch)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(workers)]
    for i, proc in enumerate(procs):
        try:
            output, _ = proc.communicate(timeout=max(1.0, step.left() - 2))
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
            rec.setdefault("timed_out_workers", []).append(i)
        lines = [line for line in output.splitlines() if line.startswith("COMPILED ")]
        rec["results"] += json.loads(lines[-1][len("COMPILED "):]) if lines else [{"worker": i, "output": output[-2000:]}]
        step.save()


# ---------------------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------------------
def step_environment(step: Step) -> None:
    torch = step.torch
    rec = step.record
    rec["versions"] = common.versions(("python", "torch", "triton", "numpy", "timm", "cuda"))
    rec["packages"] = json.loads(os.environ.get("VTP_CARRIED", "{}"))
    import timm
    rec["timm_file"] = timm.__file__
    rec["matmul_precision"] = torch.get_float32_matmul_precision()
    rec["triton_interpret"] = os.environ.get("TRITON_INTERPRET", "0")
    rec["triton_cache"] = os.environ.get("TRITON_CACHE_DIR")
    if not step.cuda:
        return
    props = torch.cuda.get_device_properties(step.device)
    rec["gpu"] = {"name": props.name, "capability": f"{props.major}.{props.minor}", "sms": props.multi_processor_count,
                  "memory_gib": round(props.total_memory / 2**30, 1), "cudnn": torch.backends.cudnn.version()}
    rec["sdpa_enabled"] = {"flash": torch.backends.cuda.flash_sdp_enabled(),
                           "efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
                           "cudnn": torch.backends.cuda.cudnn_sdp_enabled(),
                           "math": torch.backends.cuda.math_sdp_enabled()}
    try:
        rec["nvidia_smi"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,clocks.sm,clocks.mem,power.draw,temperature.gpu",
             "--format=csv"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        rec["nvidia_smi"] = f"unavailable: {e}"
    step.save()
    # The two ceilings every timing is read against.
    n = 8192
    a = torch.randn(n, n, device=step.device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=step.device, dtype=torch.bfloat16)
    src = torch.randn(2**28, device=step.device)  # 1 GiB
    dst = torch.empty_like(src)
    t = bench(step, {"gemm": lambda: a @ b, "copy": lambda: dst.copy_(src)}, rounds=1, rep_ms=100)
    rec["ceilings"] = {"bf16_gemm_tflops": 2 * n ** 3 / (t["gemm"]["median_ms"] * 1e-3) / 1e12,
                       "copy_gb_per_s": 2 * src.numel() * 4 / (t["copy"]["median_ms"] * 1e-3) / 1e9,
                       "timings": t}


def step_configs(step: Step) -> None:
    import triton

    rec = step.record
    rec["note"] = "gated_linear has no autotuned kernel: its two N x K kernels have one fixed tile"
    for c in configs_cases(step.smoke):
        kernels = autotuners(importlib.import_module(f"vtp_kernels._{c['op']}"))
        defaults = {k: k.configs[0] for k in kernels.values()}
        for kname, kernel in kernels.items():
            for i, config in enumerate(list(kernel.configs)):
                entry = {"op": c["op"], "case": c["label"], "dtype": c["dtype"], "kernel": kname, "config_index": i,
                         "config": str(config)}
                t0 = time.monotonic()
                try:
                    with only_configs({**defaults, kernel: config}):
                        entry.update(check(run_case(step, c), c["dtype"]))
                except triton.runtime.errors.OutOfResources as e:
                    entry.update(ok=None, status=f"does not fit: {e}")
                except Exception as e:  # noqa: BLE001
                    entry.update(ok=False, status=f"{type(e).__name__}: {e}")
                entry["seconds"] = round(time.monotonic() - t0, 2)
                rec["results"].append(entry)
                step.save()
    rec["all_ok"] = all(r["ok"] is not False for r in rec["results"])


def step_correctness(step: Step) -> None:
    rec = step.record
    modules = [importlib.import_module(f"vtp_kernels._{op}") for op in ("layer_norm_gather", "packed_attention")]
    # The first config of every autotuned kernel: the configs step ran each of them, and the
    # ops step checks the tuned choice at batch 256 before it times it.
    with only_configs({k: k.configs[0] for m in modules for k in autotuners(m).values()}):
        for c in correctness_cases(step.smoke):
            entry = {"op": c["op"], "case": c["label"], "dtype": c["dtype"]}
            try:
                entry.update(check(run_case(step, c), c["dtype"]))
            except Exception as e:  # noqa: BLE001
                entry.update(ok=False, error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-2000:])
            rec["results"].append(entry)
            step.save()
    rec["all_ok"] = all(r["ok"] for r in rec["results"])


def _sdpa_backends():
    from torch.nn.attention import SDPBackend
    return {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}


def _kernel_names(step: Step, fn: Callable[[], object]) -> List[str]:
    """The CUDA kernels one call of ``fn`` runs (which tells the SDPA backend apart)."""
    torch = step.torch
    if not step.cuda:
        return []
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        return sorted({e.key for e in prof.key_averages() if getattr(e, "self_device_time_total", 0) > 0})
    except Exception as e:  # noqa: BLE001
        return [f"profiler failed: {type(e).__name__}: {e}"]


def _sdpa_backend_of(names: Sequence[str]) -> str:
    if not names:
        return "not measured (no GPU)"
    text = " ".join(names).lower()
    for backend, marks in (("cudnn", ("cudnn",)), ("flash", ("flash",)), ("efficient", ("fmha", "efficient", "mem_eff"))):
        if any(m in text for m in marks):
            return backend
    return "math"


def _fwd_bwd(torch, fn, inputs, grad):
    # allow_unused: a floor ignores some inputs (nn.Linear has no gate).
    return lambda: torch.autograd.grad(fn(*inputs), inputs, grad, allow_unused=True)


def _time_case(step: Step, c: Dict[str, object], variants: Dict[str, Callable], roles: Dict[str, str],
               inputs: Dict[str, Sequence], grads: Dict[str, object], extra: Dict[str, object]) -> None:
    """Forward (no grad) and forward+backward of every variant that runs; a variant that
    fails is recorded and left out, the others are timed."""
    torch = step.torch
    for mode in ("fwd", "fwd+bwd"):
        fns = {}
        for name, fn in variants.items():
            call = (lambda fn=fn, args=inputs[name]: _no_grad(torch, fn, *args)) if mode == "fwd" \
                else _fwd_bwd(torch, fn, inputs[name], grads[name])
            try:
                call()
                fns[name] = call
            except Exception as e:  # noqa: BLE001
                step.record.setdefault("failed_variants", []).append(
                    {"op": c["op"], "case": c["label"], "mode": mode, "variant": name, "error": f"{type(e).__name__}: {e}"[:500]})
        timings = bench(step, fns, warmup_ms=5 if step.smoke else 10, rep_ms=5 if step.smoke else 50)
        for name, t in timings.items():
            step.record["results"].append({"op": c["op"], "case": c["label"], "production": True, "mode": mode,
                                           "dtype": c["dtype"], "variant": name, "role": roles[name], **extra, **t})
        step.save()


def _no_grad(torch, fn, *args):
    with torch.no_grad():
        return fn(*args)


def step_ops(step: Step) -> None:
    torch = step.torch
    import torch.nn.functional as F
    from vtp_kernels import reference
    from vtp_kernels._gated_linear import gated_linear_triton
    from vtp_kernels._layer_norm_gather import layer_norm_gather_triton
    from vtp_kernels._packed_attention import packed_attention_triton

    rec, d = step.record, step.device
    compile_backend = "aot_eager" if step.smoke else "inductor"
    rec.update(compile_backend=compile_backend, checks={}, sdpa_backend_ran={})
    compiled_gated = torch.compile(reference.gated_linear, backend=compile_backend, dynamic=True)

    def check_first(c, got, want):
        err = rel_err(torch, got, want)
        bound = BOUNDS[c["dtype"]]
        rec["checks"][f"{c['op']} {c['label']}"] = {"rel_err": err, "bound": bound, "ok": err <= bound}
        step.save()

    for c in ops_cases(step.smoke):
        op, p, dtype = c["op"], c["params"], step.dtype(c["dtype"])
        if op == "gated_linear":
            x, w, a, b, dy = INPUTS[op](torch, d, dtype, p)
            leaves = tuple(t.requires_grad_() for t in (x, w, a, b))

            def amp(fn):
                def run(*args):
                    with torch.autocast(d.type, dtype=dtype, enabled=bool(p.get("autocast"))):
                        return fn(*args)
                return run
            variants = {"triton": amp(gated_linear_triton), "reference": amp(reference.gated_linear),
                        "compiled": amp(compiled_gated), "linear": amp(lambda x, w, a, b: F.linear(x, w, b))}
            roles = {"triton": "candidate", "reference": "alternative", "compiled": "alternative", "linear": "floor"}
            inputs = {v: leaves for v in variants}
            grads = {v: dy for v in variants}
            extra = {k: p[k] for k in ("M", "K", "N")}
            with torch.no_grad():
                check_first(c, variants["triton"](*leaves), variants["reference"](*leaves))
        elif op == "layer_norm_gather":
            x, index, w, b, dy = INPUTS[op](torch, d, dtype, p)
            leaves = tuple(t.requires_grad_() for t in (x, w, b))
            compiled_ln = torch.compile(reference.layer_norm_gather, backend=compile_backend, dynamic=False)
            variants = {"triton": lambda x, w, b: layer_norm_gather_triton(x, index, w, b, EPS),
                        "reference": lambda x, w, b: reference.layer_norm_gather(x, index, w, b, EPS),
                        "compiled": lambda x, w, b: compiled_ln(x, index, w, b, EPS),
                        "layer_norm": lambda x, w, b: F.layer_norm(x, (p["D"],), eps=EPS)}
            roles = {"triton": "candidate", "reference": "alternative", "compiled": "alternative", "layer_norm": "floor"}
            inputs = {v: leaves for v in variants}
            grads = {v: dy for v in variants}
            grads["layer_norm"] = torch.randn(x.shape, device=d)
            extra = {k: p[k] for k in ("M", "D", "k", "round_to")}
            with torch.no_grad():
                check_first(c, variants["triton"](*leaves), variants["reference"](*leaves))
        else:
            q, k, v, dout = INPUTS[op](torch, d, dtype, p)
            widths, B, N, HD = tuple(p["widths"]), p["B"], p["N"], p["D"]
            H = len(widths)
            leaves = tuple(t.requires_grad_() for t in (q, k, v))
            # What a pruned model could run instead: values zero-padded to the head dim at
            # prune time, so attention is plain SDPA over a dense qkv of the kept heads.
            padded = tuple(t.requires_grad_() for t in
                           torch.randn(B, N, 3, H, HD, device=d).to(dtype).permute(2, 0, 3, 1, 4).unbind(0))
            compiled_pa = torch.compile(lambda q, k, v: reference.packed_attention(q, k, v, widths),
                                        backend=compile_backend, dynamic=False)
            variants = {"triton": lambda q, k, v: packed_attention_triton(q, k, v, widths),
                        "reference": lambda q, k, v: reference.packed_attention(q, k, v, widths),
                        "compiled": compiled_pa, "sdpa_padded": F.scaled_dot_product_attention}
            if step.cuda:
                from torch.nn.attention import sdpa_kernel
                for name, backend in _sdpa_backends().items():
                    def forced(q, k, v, backend=backend):
                        with sdpa_kernel([backend]):
                            return F.scaled_dot_product_attention(q, k, v)
                    variants[f"sdpa_padded:{name}"] = forced
            roles = {name: "alternative" for name in variants}
            roles["triton"] = "candidate"
            inputs = {name: padded if name.startswith("sdpa") else leaves for name in variants}
            grads = {name: torch.randn(B, H, N, HD, device=d).to(dtype) if name.startswith("sdpa") else dout
                     for name in variants}
            rec["sdpa_backend_ran"][c["label"]] = {
                "reference": _sdpa_backend_of(_kernel_names(step, lambda: _no_grad(torch, variants["reference"], *leaves))),
                "sdpa_padded": _sdpa_backend_of(_kernel_names(step, lambda: _no_grad(torch, F.scaled_dot_product_attention, *padded))),
            }
            extra = {"B": B, "N": N, "H": H, "D": HD, "widths": list(widths), "round_to": p["round_to"],
                     "qkv_row_stride": q.stride(2)}
            with torch.no_grad():
                check_first(c, variants["triton"](*leaves), variants["reference"](*leaves))
        _time_case(step, c, variants, roles, inputs, grads, extra)


def _tiny_vit():
    from timm.models.vision_transformer import VisionTransformer
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, mlp_ratio=2.0,
                             num_classes=10)


def build_model(torch, device, smoke: bool):
    import timm
    with device:
        return _tiny_vit() if smoke else timm.create_model(MODEL, pretrained=False)


def gated_model(torch, device, smoke: bool):
    """The dense model with gates holding random positive scores (a stand-in for sparse
    training), the same on every device: the plans below do not depend on where it lives."""
    import vtp

    torch.manual_seed(0)
    dense = build_model(torch, device, smoke).eval()
    gated = vtp.add_gates(copy.deepcopy(dense))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for g in vtp.gates(gated).values():
            g.copy_(torch.rand(g.shape, generator=gen).clamp_min(1e-3))
    return dense, gated


def pruned_model(torch, device, round_to: int, smoke: bool, gated=None):
    import vtp

    gated = gated if gated is not None else gated_model(torch, device, smoke)[1]
    return vtp.prune(gated, vtp.plan(gated, ratio=0.4, round_to=round_to)).to(device).eval()


def step_training(step: Step) -> None:
    torch = step.torch
    import torch.nn.functional as F

    import vtp

    rec, d = step.record, step.device
    batch = 2 if step.smoke else 256
    amp = torch.float32 if step.smoke else torch.bfloat16
    base = build_model(torch, d, step.smoke).train()
    size = base.patch_embed.img_size[0]
    images = torch.randn(batch, 3, size, size, device=d)
    labels = torch.randint(0, base.num_classes, (batch,), device=d)
    compile_backend = "aot_eager" if step.smoke else "inductor"
    rec.update(model="tiny_vit" if step.smoke else MODEL, batch=batch, amp=str(amp),
               optimizer="AdamW, fused" if step.cuda else "AdamW", compile_backend=compile_backend,
               target_vs_ungated=1.03)
    # Eager first, then compiled as time allows: ungated, gated with gated_linear on Triton,
    # gated with the torch backend.
    variants = [(False, "torch", False), (True, "torch", False), (True, "auto:gated_linear", False),
                (False, "torch", True), (True, "auto:gated_linear", True), (True, "torch", True)]
    if step.smoke:
        variants = variants[:3] + [(True, "auto:gated_linear", True)]
    compile_s = 10.0 if step.smoke else 70.0  # a guess until the first compile is measured
    for gated, backend, compiled in variants:
        setting = f"train {rec['model']} {'gated' if gated else 'ungated'} {'compiled' if compiled else 'eager'}"
        entry = {"setting": setting, "task": "train", "gated": gated, "backend": backend, "compile": compiled}
        if compiled and step.left() < 1.3 * compile_s + 10:
            entry["skipped"] = f"{step.left():.0f} s left, a compile takes about {compile_s:.0f} s"
            rec["results"].append(entry)
            step.save()
            continue
        torch._dynamo.reset()
        model = copy.deepcopy(base)
        if gated:
            vtp.add_gates(model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=step.cuda)
        forward = torch.compile(model, backend=compile_backend) if compiled else model

        def train_step():
            with torch.autocast(d.type, dtype=amp, enabled=amp != torch.float32):
                loss = F.cross_entropy(forward(images), labels)
                if gated:
                    loss = loss + 1e-4 * vtp.l1_penalty(model)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        try:
            with backend_context(backend):
                t0 = time.monotonic()
                train_step()
                step.sync()
                entry["first_step_s"] = round(time.monotonic() - t0, 2)
                if compiled:
                    compile_s = entry["first_step_s"]
                if step.cuda:
                    torch.cuda.reset_peak_memory_stats()
                entry.update(step_rounds(step, train_step, warmup=0 if step.smoke else 3, iters=1 if step.smoke else 10))
                if step.cuda:
                    entry["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
        except Exception as e:  # noqa: BLE001
            entry["error"] = f"{type(e).__name__}: {e}"
            entry["traceback"] = traceback.format_exc()[-2000:]
        rec["results"].append(entry)
        _vs_ungated(rec)
        step.save()
        del model, optimizer, forward
        if step.cuda:
            torch.cuda.empty_cache()


def _vs_ungated(rec: Dict[str, object]) -> None:
    """Each gated step's median over the ungated one at the same compile setting."""
    for r in rec["results"]:
        base = next((b for b in rec["results"] if not b["gated"] and b["compile"] == r["compile"] and "median_ms" in b), None)
        if r["gated"] and base and "median_ms" in r:
            r["vs_ungated"] = r["median_ms"] / base["median_ms"]
            r["within_target"] = r["vs_ungated"] <= rec["target_vs_ungated"]


def step_pruned(step: Step) -> None:
    torch = step.torch
    import vtp
    import vtp_kernels

    rec, d = step.record, step.device
    batch = 2 if step.smoke else 256
    amp = torch.float32 if step.smoke else torch.bfloat16
    dense, gated = gated_model(torch, d, step.smoke)
    size = dense.patch_embed.img_size[0]
    images = torch.randn(batch, 3, size, size, device=d)
    rec.update(model="tiny_vit" if step.smoke else MODEL, batch=batch, amp=str(amp), ratio=0.4, checks={},
               dense_macs=vtp.profile(dense).macs)
    warmup, iters = (0, 1) if step.smoke else (3, 10)

    def infer(model):
        def run():
            with torch.no_grad(), torch.autocast(d.type, dtype=amp, enabled=amp != torch.float32):
                return model(images)
        return run

    dense_t = step_rounds(step, infer(dense), warmup, iters)
    rec["results"].append({"setting": f"infer {rec['model']} dense eager", "task": "infer", "backend": "torch",
                           "compile": False, "round_to": None, **dense_t})
    step.save()
    for round_to in (1, 8):
        small = pruned_model(torch, d, round_to, step.smoke, gated)
        setting = f"infer {rec['model']} pruned ratio=0.4 round_to={round_to} eager"
        logits = {}
        for backend in ("torch", "triton"):
            with vtp_kernels.use_backend(backend):
                logits[backend] = infer(small)().float()
        err = rel_err(torch, logits["triton"], logits["torch"])
        # Both backends round to bf16, in a different order: ~1 % apart on random weights.
        bound = 1e-4 if step.smoke else 3e-2
        rec["checks"][setting] = {"rel_err_triton_vs_torch": err, "bound": bound, "ok": err <= bound}
        step.save()
        macs = vtp.profile(small).macs
        for backend in ("torch", "triton", "auto:layer_norm_gather", "auto:packed_attention"):
            entry = {"setting": setting, "task": "infer", "backend": backend, "compile": False, "round_to": round_to,
                     "macs_ratio": macs / rec["dense_macs"]}
            try:
                with backend_context(backend):
                    entry.update(step_rounds(step, infer(small), warmup, iters))
                entry["vs_dense"] = entry["median_ms"] / dense_t["median_ms"]
            except Exception as e:  # noqa: BLE001
                entry["error"] = f"{type(e).__name__}: {e}"
                entry["traceback"] = traceback.format_exc()[-2000:]
            rec["results"].append(entry)
            step.save()
        del small
    # Distinct autotuning keys per kernel after both plans: bucketed keys keep this small.
    rec["autotune_keys"] = {f"{op}.{name}": len(k.cache) for op in ("layer_norm_gather", "packed_attention")
                            for name, k in autotuners(importlib.import_module(f"vtp_kernels._{op}")).items()}


STEP_FUNCTIONS = {"environment": step_environment, "compile": step_compile, "configs": step_configs,
                  "correctness": step_correctness, "ops": step_ops, "training": step_training, "pruned": step_pruned}


if __name__ == "__main__":
    main()
