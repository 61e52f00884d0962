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
    environment   15 s  device, versions (which timm, from where), SDPA switches, clocks,
                        the machine's two ceilings (bf16 GEMM TFLOP/s, copy GB/s)
    compile       40 s  every Triton launch the later steps make, compiled ahead by parallel
                        workers into the Triton cache the steps share (Triton compiles one
                        kernel at a time otherwise, and they need a few hundred)
    configs       35 s  every autotune config of every kernel forced once on a small ragged
                        bf16 shape, against the fp64 reference, outputs pre-filled with NaN
    correctness   45 s  every op in bf16, fp16 and fp32 against its reference in fp64 on
                        upcast inputs, at DeiT-B widths and at ragged small shapes, outputs
                        pre-filled with NaN; determinism of dgate, dweight/dbias, dq/dk/dv
    ops           75 s  each op at DeiT-B batch 256 in the dtype the model runs it in,
                        forward and forward+backward, against the reference, torch.compile
                        of the reference, SDPA with V padded to the head dim (each SDPA
                        backend, and which one the default dispatch ran), and floors
                        (nn.Linear without a gate, a full-width LayerNorm)
    qk_attention  25 s  the pruned DeiT-B attention with q/k narrower than the values (Dqk
                        16 and 32 of 64, batch 256, bf16): the kernel with and without the
                        attn_qk gate against the fp64 reference, then timed against the
                        padded reference, SDPA on the unequal widths and q * gate before
                        SDPA; which CUDA SDPA kernels take unequal widths (a record, not
                        part of the decision)
    training     135 s  a DeiT-B training step (bf16 autocast, fused AdamW): ungated timm
                        against the gated model with backend torch and with gated_linear on
                        Triton, eager, then torch.compile as time allows (target <= 1.03x)
    pruned        40 s  DeiT-B pruned 40 % (round_to 1 and 8): inference with backend torch,
                        triton, and each op alone on Triton; autotune keys per kernel
    decision            benchmarks/decide.py's rule applied to the records (no GPU)

Timings are CUDA events after warm-up on random data (never zeros): do_bench for ops,
events around every step for models; every raw time is kept, in two rounds whose
difference is the spread the decision rule uses.

The measurements are the benchmarks' own: each op's cases, check and timed run come from
its bench_<op>.py, the training step from bench_gated_training.py, the pruned models and
their timing from bench_model.py, timers and records from benchmarks/harness/. This file
keeps the budget, the steps (a table: name, limit, function), the archive and the decision.
A step is a function of a Step, registered with ``@step(name, limit)``; an op case is a
line in its bench_<op>.py.

timm: the machine's own is used when it is >= 1.0.23; otherwise a timm wheel carried in
.whl/ (--wheels) is installed into a temporary folder first. The record says which.
Under --smoke the steps run in this process on the CPU (Triton interpreter, tiny shapes,
fp32/fp16, wall-clock timers, no time limits): it checks the script, not the machine.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Callable, Dict, List

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the harness, also when loaded by path
from harness import RESULTS, ROOT, arguments, checks, environment, processes, records, timing  # noqa: E402
import bench_gated_linear  # noqa: E402
import bench_gated_training  # noqa: E402
import bench_layer_norm_gather  # noqa: E402
import bench_model  # noqa: E402
import bench_packed_attention  # noqa: E402
import decide  # noqa: E402
import latency_check  # noqa: E402
import precompile  # noqa: E402

BUDGET_S = 420.0
MIN_VERSIONS = {"timm": "1.0.23"}
MODEL = "deit_base_patch16_224"
OPS = (bench_gated_linear, bench_layer_norm_gather, bench_packed_attention)
PRUNED_RATIO, PRUNED_ROUND_TOS = 0.4, (1, 8)
LATENCY_TARGET, LATENCY_BATCH = 0.5, 256
# (name, limit in seconds), in the order they run, filled by @step below. The limits add up
# to 410 s, inside the budget; qk_attention's 25 s came from environment, configs and
# correctness (5 s each) and pruned (10 s); latency_target's 30 s from training (135 -> 105 s,
# its largest limit; not yet measured on a GPU: the first run's step times should settle it).
STEPS: List = []
STEP_FUNCTIONS: Dict[str, Callable] = {}


def step(name: str, limit: float):
    """Register a step: ``function(step: Step)`` runs as step ``name`` under ``limit`` seconds."""
    def register(function):
        STEPS.append((name, limit))
        STEP_FUNCTIONS[name] = function
        return function
    return register


# ---------------------------------------------------------------------------------------
# The cases each step runs: the op benchmarks' own
# ---------------------------------------------------------------------------------------
def configs_cases(smoke: bool) -> List[Dict[str, object]]:
    return [c for op in OPS for c in op.config_cases(smoke)]


def correctness_cases(smoke: bool) -> List[Dict[str, object]]:
    """Per dtype, every op at DeiT-B widths (16 images; M = 16 * 197 is divisible by 16, as
    at batch 256) and at ragged shapes; --smoke: fp32 and fp16, small shapes."""
    images, rows = (1, 37) if smoke else (16, 16 * 197)
    return [c for dtype in (("fp32", "fp16") if smoke else ("bf16", "fp16", "fp32")) for op in OPS
            for c in op.correctness_cases(smoke, dtype, images if op is bench_packed_attention else rows)]


def production_cases(smoke: bool) -> List[Dict[str, object]]:
    return [c for op in OPS for c in op.production_cases(smoke)]


def op_module(c: Dict[str, object]):
    return next(op for op in OPS if op.OP == c["op"])


def compile_jobs() -> List[Dict[str, object]]:
    """Every Triton launch of the GPU run's steps (precompile.py compiles them ahead)."""
    return precompile.jobs(production_cases(False), configs_cases(False), correctness_cases(False), PRUNED_ROUND_TOS,
                           bench_packed_attention.qk_cases(False))


# ---------------------------------------------------------------------------------------
# The runner
# ---------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT") or RESULTS,
                   help=f"folder for the archive (default: $OUT if set, else {RESULTS})")
    p.add_argument("--smoke", action="store_true", help="CPU check of the script: interpreter, tiny shapes, in-process")
    p.add_argument("--only", default=",".join(name for name, _ in STEPS),
                   help="comma-separated steps to run, in the fixed order (default: all)")
    p.add_argument("--budget-s", type=float, default=BUDGET_S, help=f"seconds for everything (default: {BUDGET_S:.0f})")
    p.add_argument("--wheels", default=os.path.join(ROOT, ".whl"),
                   help="folder of carried wheels, used only for packages older than needed (default: .whl/)")
    p.add_argument("--python", default=sys.executable, help="interpreter for the steps (default: this one)")
    # Internal: run one step in this process (the runner starts each step this way).
    p.add_argument("--step", default=None, help=argparse.SUPPRESS)
    p.add_argument("--work", default=None, help=argparse.SUPPRESS)
    p.add_argument("--seconds", type=float, default=None, help=argparse.SUPPRESS)
    p.add_argument("--compile-worker", default=None, help=argparse.SUPPRESS)  # "i/n"
    p.add_argument("--arch", type=int, default=90, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.only = arguments.subset(args.only, [name for name, _ in STEPS], "--only")
    return args


def main(argv=None) -> Dict[str, object]:
    args = parse_args(argv)
    if args.compile_worker:
        index, workers = map(int, args.compile_worker.split("/"))
        precompile.worker(index, workers, args.arch, compile_jobs, MODEL, PRUNED_RATIO)
        return {}
    if args.step:
        run_step_here(args.step, args.work, args.smoke, args.seconds or 60.0)
        return {}
    clock = time.monotonic()
    started = records.now()
    out = os.path.abspath(args.out)
    work = tempfile.mkdtemp(prefix="vtp-gpu-check-")
    carried = environment.carried_packages(args.wheels, MIN_VERSIONS)
    env = dict(os.environ, PYTHONUNBUFFERED="1", VTP_CARRIED=json.dumps(carried["packages"]))
    # One Triton cache for the compile workers and the steps, outside the archived folder.
    env.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="vtp-triton-cache-"))
    if not args.smoke:
        env.pop("TRITON_INTERPRET", None)  # the real kernels: the interpreter is for --smoke only
    if carried["path"]:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (carried["path"], env.get("PYTHONPATH")) if p)
        sys.path.insert(0, carried["path"])
    device = "cpu-smoke" if args.smoke else _gpu_name(args.python, env)
    archive = os.path.join(out, f"{records.timestamped_stem('gpu_check', device, started)}.tar.gz")
    summary: Dict[str, object] = {
        "benchmark": "gpu_check", "created": started.isoformat(timespec="seconds"),
        "command": records.command_line(__file__, argv), "smoke": args.smoke, "budget_s": args.budget_s,
        "limits_s": dict(STEPS), "packages": carried["packages"], "steps": [], "decision": None, "finished": None,
    }

    def save():
        records.write_json(os.path.join(work, "gpu_check.json"), summary)
        records.pack(work, archive)

    def on_term(signum, frame):  # end the running step with us, and keep what is done
        if processes.RunningChild.proc is not None:
            processes.stop_process_group(processes.RunningChild.proc)
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
                entry.update(processes.run_logged(cmd, env, os.path.join(work, "logs", f"{name}.log"), seconds))
            print(f"[gpu_check] {name}: {entry['status']} {entry.get('seconds', '')}", flush=True)
            summary["steps"].append(entry)
            save()
        decision = decide.decide(decide.load(work))
        summary["decision"] = decision
        records.write_json(os.path.join(work, "decision.json"), decision)
        summary["finished"] = records.now().isoformat(timespec="seconds")
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
    """One step's process: its device, deadline, timer and record (rewritten by ``save``)."""

    def __init__(self, name: str, work: str, smoke: bool, seconds: float):
        self.name, self.work, self.smoke = name, work, smoke
        self.deadline = time.monotonic() + seconds
        torch, self.device = environment.setup(smoke, 0)
        self.torch = torch
        self.cuda = self.device.type == "cuda"
        torch.set_float32_matmul_precision("highest")  # fp32 checks without TF32
        self.compile_backend = "aot_eager" if smoke else "inductor"
        # do_bench for 10 ms warm-up, 50 ms measuring per round; one wall-clock call in smoke mode.
        self.timer = timing.kernel_timer(self.cuda, 10 if self.cuda else 0, 50 if self.cuda else 1)
        self.record: Dict[str, object] = {"step": name, "smoke": smoke,
                                          "device": environment.device_name(torch, self.device), "results": []}

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def save(self) -> None:
        records.write_json(os.path.join(self.work, f"{self.name}.json"), self.record)

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()


def run_step_here(name: str, work: str, smoke: bool, seconds: float) -> None:
    step_ = Step(name, work, smoke, seconds)
    try:
        STEP_FUNCTIONS[name](step_)
    except BaseException as e:
        step_.record["error"] = f"{type(e).__name__}: {e}"
        step_.record["traceback"] = traceback.format_exc()[-4000:]
        step_.save()
        raise
    step_.record["finished"] = True
    step_.save()


def first_configs():
    """Every autotuned kernel limited to its first config (no tuning)."""
    kernels = [k for op in OPS for k in environment.autotuners(importlib.import_module(f"vtp_kernels._{op.OP}")).values()]
    return environment.only_configs({k: k.configs[0] for k in kernels})


# ---------------------------------------------------------------------------------------
# The steps, in the order they run
# ---------------------------------------------------------------------------------------
@step("environment", 15)
def step_environment(step: Step) -> None:
    torch = step.torch
    rec = step.record
    rec["versions"] = environment.versions(("python", "torch", "triton", "numpy", "timm", "cuda"))
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
    t = timing.interleaved({"gemm": lambda: a @ b, "copy": lambda: dst.copy_(src)}, timing.kernel_timer(True, 10, 100),
                           rounds=1, sync=step.sync)
    rec["ceilings"] = {"bf16_gemm_tflops": 2 * n ** 3 / (t["gemm"]["median_ms"] * 1e-3) / 1e12,
                       "copy_gb_per_s": 2 * src.numel() * 4 / (t["copy"]["median_ms"] * 1e-3) / 1e9,
                       "timings": t}


@step("compile", 40)
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
    rec.update(arch=arch, workers=workers, jobs=len(compile_jobs()), triton_cache=os.environ.get("TRITON_CACHE_DIR"))
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


@step("configs", 35)
def step_configs(step: Step) -> None:
    """Every autotune config of every kernel forced once on each op's config case."""
    import triton

    rec = step.record
    rec["note"] = "gated_linear has no autotuned kernel: its two N x K kernels have one fixed tile"
    for c in configs_cases(step.smoke):
        kernels = environment.autotuners(importlib.import_module(f"vtp_kernels._{c['op']}"))
        defaults = {k: k.configs[0] for k in kernels.values()}
        for kname, kernel in kernels.items():
            for i, config in enumerate(list(kernel.configs)):
                entry = {"op": c["op"], "case": c["label"], "dtype": c["dtype"], "kernel": kname, "config_index": i,
                         "config": str(config)}
                t0 = time.monotonic()
                try:
                    with environment.only_configs({**defaults, kernel: config}):
                        entry.update(op_module(c).correctness(step.torch, step.device, c))
                except triton.runtime.errors.OutOfResources as e:
                    entry.update(ok=None, status=f"does not fit: {e}")
                except Exception as e:  # noqa: BLE001
                    entry.update(ok=False, status=f"{type(e).__name__}: {e}")
                entry["seconds"] = round(time.monotonic() - t0, 2)
                rec["results"].append(entry)
                step.save()
    rec["all_ok"] = all(r["ok"] is not False for r in rec["results"])


@step("correctness", 45)
def step_correctness(step: Step) -> None:
    """Every correctness case of every op, under the first config of every autotuned kernel:
    the configs step ran each of them, and the ops step checks the tuned choice at batch 256
    before it times it."""
    rec = step.record
    with first_configs():
        for c in correctness_cases(step.smoke):
            entry = {"op": c["op"], "case": c["label"], "dtype": c["dtype"]}
            try:
                entry.update(op_module(c).correctness(step.torch, step.device, c))
            except Exception as e:  # noqa: BLE001
                entry.update(ok=False, error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-2000:])
            rec["results"].append(entry)
            step.save()
    rec["all_ok"] = all(r["ok"] for r in rec["results"])


# The variants the ops step times: the kernel, the alternatives that compute the same result,
# the floors.
OPS_VARIANTS = {"gated_linear": ("triton", "folded", "compiled", "linear"),
                "layer_norm_gather": ("triton", "reference", "compiled", "floor"),
                "packed_attention": ("triton", "reference", "compiled", "sdpa_padded")}


@step("ops", 75)
def step_ops(step: Step) -> None:
    """Each op's production cases: the tuned kernel checked against the reference in the
    same dtype, then every variant timed (the op benchmark's ``prepare`` and the harness's
    ``time_case``, two interleaved rounds)."""
    torch, rec = step.torch, step.record
    rec.update(compile_backend=step.compile_backend, checks={}, sdpa_backend_ran={})
    for c in production_cases(step.smoke):
        op = op_module(c)
        # gpu_check times the four linears in one process: one dynamic graph, not four.
        extra = {"dynamic": True} if op is bench_gated_linear else {}
        prepared = op.prepare(torch, step.device, c, step.compile_backend, OPS_VARIANTS[c["op"]], **extra)
        with torch.no_grad():
            err = checks.rel_err(torch, prepared["variants"]["triton"](*prepared["leaves"]),
                                 prepared["variants"][op.REFERENCE](*prepared["leaves"]))
        bound = checks.BOUNDS[c["dtype"]]
        rec["checks"][f"{c['op']} {c['label']}"] = {"rel_err": err, "bound": bound, "ok": err <= bound}
        if op is bench_packed_attention:
            rec["sdpa_backend_ran"][c["label"]] = op.sdpa_backend_ran(torch, prepared, step.cuda)
        step.save()
        for mode in timing.MODES:  # the record is rewritten after each mode
            rows, failures = timing.time_case(torch, c, prepared, step.timer, modes=(mode,), sync=step.sync)
            rec["results"] += [{**r, "production": True} for r in rows]
            if failures:
                rec.setdefault("failed_variants", []).extend(failures)
            step.save()


@step("qk_attention", 25)
def step_qk_attention(step: Step) -> None:
    """Dqk != value widths (bench_packed_attention's QK cases): the kernel with and without
    the gate checked against the fp64 reference, then every QK variant timed; which SDPA
    kernels take unequal widths, and which one the default dispatch ran."""
    op, torch, rec = bench_packed_attention, step.torch, step.record
    cases = op.qk_cases(step.smoke)
    dtype = environment.dtype_of(torch, cases[0]["dtype"])
    rec.update(checks={}, sdpa_backend_ran={}, sdpa_backends={
        f"dqk{c['params']['dqk']}_dv{c['params']['D']}": op.sdpa_backends_for_unequal_widths(
            torch, step.device, dtype, c["params"]["dqk"], c["params"]["D"]) for c in cases})
    for c in cases:
        if step.left() < 8:  # a case takes a few seconds once compiled: keep the record whole
            rec.setdefault("skipped", []).append(f"{c['label']}: {step.left():.0f} s left")
            continue
        rec["checks"][c["label"]] = op.qk_correctness(torch, step.device, c)
        step.save()
        if not rec["checks"][c["label"]]["ok"]:
            continue  # a wrong kernel's speed is no result
        rows, failures, rec["sdpa_backend_ran"][c["label"]] = op.qk_run(torch, step.device, c, step.timer,
                                                                        sync=step.sync)
        rec["results"] += rows
        if failures:
            rec.setdefault("failed_variants", []).extend(failures)
        step.save()
    rec["all_ok"] = bool(rec["checks"]) and all(c["ok"] for c in rec["checks"].values())


# Eager first, then compiled as time allows: ungated, gated with gated_linear on Triton,
# gated with the torch backend. --smoke: the eager three and one compiled.
TRAINING_CASES = [{"gated": g, "backend": b, "compile": c} for g, b, c in (
    (False, "torch", False), (True, "torch", False), (True, "auto:gated_linear", False),
    (False, "torch", True), (True, "auto:gated_linear", True), (True, "torch", True))]


@step("training", 105)
def step_training(step: Step) -> None:
    """A training step of the model (bench_gated_training.measure) in each training case."""
    torch, rec, d = step.torch, step.record, step.device
    batch = 2 if step.smoke else 256
    amp = torch.float32 if step.smoke else torch.bfloat16
    base = bench_model.build_dense(bench_model.SMOKE_MODEL if step.smoke else MODEL, d).train()
    size = base.patch_embed.img_size[0]
    images = torch.randn(batch, 3, size, size, device=d)
    labels = torch.randint(0, base.num_classes, (batch,), device=d)
    rec.update(model="tiny_vit" if step.smoke else MODEL, batch=batch, amp=str(amp),
               optimizer="AdamW, fused" if step.cuda else "AdamW", compile_backend=step.compile_backend,
               target_vs_ungated=1.03)
    cases = TRAINING_CASES[:3] + TRAINING_CASES[4:5] if step.smoke else TRAINING_CASES
    compile_s = 10.0 if step.smoke else 70.0  # a guess until the first compile is measured
    for c in cases:
        setting = f"train {rec['model']} {'gated' if c['gated'] else 'ungated'} {'compiled' if c['compile'] else 'eager'}"
        entry = {"setting": setting, "task": "train", **c}
        if c["compile"] and step.left() < 1.3 * compile_s + 10:
            entry["skipped"] = f"{step.left():.0f} s left, a compile takes about {compile_s:.0f} s"
            rec["results"].append(entry)
            step.save()
            continue
        torch._dynamo.reset()
        try:
            entry.update(bench_gated_training.measure(
                torch, d, base, c, images, labels, amp=amp, warmup=0 if step.smoke else 3,
                iters=1 if step.smoke else 10, rounds=2, compile_backend=step.compile_backend))
            if c["compile"]:
                compile_s = entry["first_step_s"]
        except Exception as e:  # noqa: BLE001
            entry["error"] = f"{type(e).__name__}: {e}"
            entry["traceback"] = traceback.format_exc()[-2000:]
        rec["results"].append(entry)
        _vs_ungated(rec)
        step.save()


def _vs_ungated(rec: Dict[str, object]) -> None:
    """Each gated step's median over the ungated one at the same compile setting."""
    for r in rec["results"]:
        base = next((b for b in rec["results"] if not b["gated"] and b["compile"] == r["compile"] and "median_ms" in b), None)
        if r["gated"] and base and "median_ms" in r:
            r["vs_ungated"] = r["median_ms"] / base["median_ms"]
            r["within_target"] = r["vs_ungated"] <= rec["target_vs_ungated"]


@step("pruned", 40)
def step_pruned(step: Step) -> None:
    """The model pruned 40 % at each round_to: inference (bench_model.measure) with backend
    torch, triton and each op alone on Triton, after a triton-vs-torch logits check."""
    import vtp
    import vtp_kernels

    torch, rec, d = step.torch, step.record, step.device
    batch = 2 if step.smoke else 256
    amp = torch.float32 if step.smoke else torch.bfloat16
    dense, gated = bench_model.dense_and_gated(torch, bench_model.SMOKE_MODEL if step.smoke else MODEL, d, 0)
    rec.update(model="tiny_vit" if step.smoke else MODEL, batch=batch, amp=str(amp), ratio=PRUNED_RATIO, checks={},
               dense_macs=vtp.profile(dense).macs)
    timed = dict(batch=batch, amp_dtype=None if amp == torch.float32 else amp, compiled=False,
                 compile_backend=step.compile_backend, warmup=0 if step.smoke else 3, iters=1 if step.smoke else 10,
                 rounds=2)
    dense_t = bench_model.measure(torch, dense, "infer", d, **timed)
    rec["results"].append({"setting": f"infer {rec['model']} dense eager", "task": "infer", "backend": "torch",
                           "compile": False, "round_to": None, **dense_t})
    step.save()
    for round_to in PRUNED_ROUND_TOS:
        small = bench_model.prune_at(gated, d, ratio=PRUNED_RATIO, round_to=round_to)[0]
        setting = f"infer {rec['model']} pruned ratio={PRUNED_RATIO} round_to={round_to} eager"
        err = bench_model.check_logits(torch, vtp_kernels, small, d, batch=batch, amp_dtype=timed["amp_dtype"])
        # Both backends round to bf16, in a different order: ~1 % apart on random weights.
        bound = 1e-4 if step.smoke else bench_model.CHECK_BOUND["bf16"]
        rec["checks"][setting] = {"rel_err_triton_vs_torch": err, "bound": bound, "ok": err <= bound}
        step.save()
        macs = vtp.profile(small).macs
        for backend in ("torch", "triton", "auto:layer_norm_gather", "auto:packed_attention"):
            entry = {"setting": setting, "task": "infer", "backend": backend, "compile": False, "round_to": round_to,
                     "macs_ratio": macs / rec["dense_macs"]}
            try:
                with environment.backend_context(backend):
                    entry.update(bench_model.measure(torch, small, "infer", d, **timed))
                entry["vs_dense"] = entry["median_ms"] / dense_t["median_ms"]
            except Exception as e:  # noqa: BLE001
                entry["error"] = f"{type(e).__name__}: {e}"
                entry["traceback"] = traceback.format_exc()[-2000:]
            rec["results"].append(entry)
            step.save()
        del small
    # Distinct autotuning keys per kernel after both plans: bucketed keys keep this small.
    rec["autotune_keys"] = {f"{op}.{name}": len(k.cache) for op in ("layer_norm_gather", "packed_attention")
                            for name, k in environment.autotuners(importlib.import_module(f"vtp_kernels._{op}")).items()}


@step("latency_target", 30)
def step_latency_target(step: Step) -> None:
    """DeiT-B's latency table at batch 256 in bf16 on this GPU, a plan to LATENCY_TARGET, the
    pruned model timed against the dense one (latency_check.target_check). --smoke: the tiny
    ViT at batch 2 in fp32 on the CPU, planned to 0.9."""
    torch = step.torch
    latency_check.target_check(
        torch, step.device, model=bench_model.SMOKE_MODEL if step.smoke else MODEL, smoke=step.smoke,
        batch=2 if step.smoke else LATENCY_BATCH, amp=torch.float32 if step.smoke else torch.bfloat16,
        target=latency_check.SMOKE_TARGET if step.smoke else LATENCY_TARGET, compile_backend=step.compile_backend, record=step.record,
        save=step.save)

if __name__ == "__main__":
    main()
