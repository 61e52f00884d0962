"""Run every benchmark on one CUDA GPU in a single call of about 9 minutes, and keep everything.

Launch from the repository root of a checkout, on a machine with a CUDA GPU and torch and
triton installed (torch 2.11 / triton 3.6 or newer; vtp and vtp_kernels are imported from
the checkout, nothing is installed from the network):

    python3 benchmarks/run_all.py                 # records in $OUT if set, else benchmarks/results
    python3 benchmarks/run_all.py --pack          # the same, packed: one .tar.gz and one summary
    python3 benchmarks/run_all.py --dry-run       # print the steps and their commands, run nothing
    python3 benchmarks/run_all.py --only gated_linear,model_deit_s

If timm (or another Python package) is missing or too old there, bring it as a wheel: put
it in .whl/ at the repository root (e.g. ``pip download --no-deps --only-binary=:all:
-d .whl timm==1.0.31`` on a machine that can reach PyPI); the runner installs every wheel
in --wheels (default: .whl/ when it exists) into a temporary folder with
``pip install --no-index --no-deps --target`` and puts that folder first on PYTHONPATH of
every step. Use --pack where only a few files can be copied off the machine. Where one
command may run at most 10 minutes, keep --budget-s below that: the default, 540 s, leaves
about a minute for installing wheels, starting and packing.

Steps, in this order, each in its own process (a failure or a time-out stops only that step):

    preflight          the GPU's name and the versions of python, torch, triton, timm, cuda;
                       no CUDA GPU ends the run here
    gated_linear       bench_gated_linear.py: the four linear layers of a DeiT-B block,
                       batch 256, bf16, fwd and fwd+bwd, all five methods
    layer_norm_gather  bench_layer_norm_gather.py: M = 256 * 197, D = 768, 60 % kept, bf16
    packed_attention   bench_packed_attention.py: DeiT-S and DeiT-B attention, 40 % of the
                       value dims pruned, bf16
    model_deit_s       bench_model.py on DeiT-S: plans ratio 0.4 and flops_target 0.5 at
    model_deit_b       round_to 1, and ratio 0.4 at round_to 8 (--round-to-sweep 8);
                       inference and a training step; backends torch and triton; eager;
                       batch 256, bf16 autocast. DeiT-B likewise
    gated_training     bench_gated_training.py: a DeiT-B sparse-training step, ungated vs
                       gated/torch vs gated/triton (runs only if time is left)

Each kernel benchmark checks its Triton kernel against an fp32 reference before it times
anything (layer_norm_gather and packed_attention stop on a mismatch; gated_linear records
the error), and bench_model checks the triton backend's logits against the torch backend
first. Every step is given what is left of --budget-s (540 s), at most its own cap; a step
that would start with less than its minimum is skipped.

What it records, in --out: each benchmark's own JSON record (device, versions, command, raw
times, medians, correctness) and PNG; logs/<step>.log, the step's whole output; and
run_all_<device>_<time>.json, the summary: environment, every step's command, status (ok,
failed, timeout, skipped), exit code, seconds, files written and the correctness figures
copied from its records. With --pack the records, plots and logs go into
run_all_<device>_<time>.tar.gz instead, next to the summary; both are rewritten after every
step, so a run cut short still leaves what it finished.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from typing import Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # common.py, also when loaded by path
import common  # noqa: E402

BENCH = os.path.join("benchmarks", "")
DEIT = {"deit_s": "deit_small_patch16_224", "deit_b": "deit_base_patch16_224"}

# Prints the environment as JSON: the GPU's name (the device part of every file name) and
# the versions the timings depend on. Exits non-zero without a CUDA GPU.
PREFLIGHT = (
    "import json, sys, torch\n"
    "sys.path.insert(0, 'benchmarks')\n"
    "import common\n"
    "if not torch.cuda.is_available():\n"
    "    sys.exit('run_all: no CUDA GPU visible to torch')\n"
    "print(json.dumps({'device': torch.cuda.get_device_name(), 'gpus': torch.cuda.device_count(),\n"
    "                  'versions': common.versions(('python', 'torch', 'triton', 'timm', 'cuda'))}))\n"
)


def steps(out: str, tag: str) -> List[Dict[str, object]]:
    """The benchmark steps: name, argument list (after the interpreter), cap and minimum seconds.

    Kernel benchmarks keep their default shapes and dtypes; do_bench's measuring time is
    halved (100 ms still gives hundreds of samples per measurement) to leave time for the
    model runs, whose cost is mostly Triton autotuning of the pruned models' many shapes.
    """
    model_common = ["--ratios", "0.4", "--flops-targets", "0.5", "--round-to", "1", "--round-to-sweep", "8",
                    "--modes", "infer", "train", "--backends", "torch", "triton", "--no-compile",
                    "--warmup", "3", "--iters", "20", "--out", out]
    return [
        {"name": "gated_linear", "cap_s": 150, "min_s": 45,
         "args": [BENCH + "bench_gated_linear.py", "--warmup-ms", "10", "--rep-ms", "100", "--out", out]},
        {"name": "layer_norm_gather", "cap_s": 90, "min_s": 30,
         "args": [BENCH + "bench_layer_norm_gather.py", "--warmup", "10", "--rep", "100", "--out", out]},
        {"name": "packed_attention", "cap_s": 150, "min_s": 45,
         "args": [BENCH + "bench_packed_attention.py", "--warmup", "10", "--rep", "100", "--out", out]},
        *({"name": f"model_{short}", "cap_s": 240, "min_s": 90,
           "args": [BENCH + "bench_model.py", "--models", DEIT[short], *model_common,
                    "--tag", f"{tag}_{short.replace('_', '-')}"]} for short in ("deit_s", "deit_b")),
        {"name": "gated_training", "cap_s": 150, "min_s": 60,
         "args": [BENCH + "bench_gated_training.py", "--warmup", "3", "--steps", "10", "--out", out]},
    ]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    names = [s["name"] for s in steps("OUT", "TAG")]
    p.add_argument("--out", default=os.environ.get("OUT") or common.RESULTS,
                   help=f"folder for records, plots, logs and the summary (default: $OUT if set, else {common.RESULTS})")
    p.add_argument("--budget-s", type=float, default=540.0,
                   help="seconds for all steps together, the preflight included (default: 540)")
    p.add_argument("--only", default=",".join(names),
                   help=f"comma-separated steps to run, in the fixed order (default: all of {','.join(names)})")
    p.add_argument("--wheels", default=None,
                   help="folder of .whl files to install (no index, no deps) into a temporary folder put first "
                        "on the steps' PYTHONPATH (default: .whl/ at the repository root, if it exists)")
    p.add_argument("--pack", action="store_true",
                   help="put records, plots and logs into one run_all_<device>_<time>.tar.gz in --out "
                        "(rewritten after every step) instead of loose files; the summary stays beside it")
    p.add_argument("--python", default=sys.executable, help="interpreter for the steps (default: this one)")
    p.add_argument("--dry-run", action="store_true", help="print the steps' commands and exit")
    args = p.parse_args(argv)
    args.only = common.subset(args.only, names, "--only")
    if args.wheels is None:
        default = os.path.join(common.ROOT, ".whl")
        args.wheels = default if glob.glob(os.path.join(default, "*.whl")) else ""
    return args


# ---------------------------------------------------------------------------------------
# Running one process with a deadline
# ---------------------------------------------------------------------------------------
class Child:
    """The step now running, so that a SIGTERM to the runner can end it before the runner ends."""
    proc: Optional[subprocess.Popen] = None


def stop(proc: subprocess.Popen) -> None:
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


def run(cmd: List[str], env: Dict[str, str], log_path: str, timeout: float) -> Dict[str, object]:
    """Run ``cmd`` from the repository root, its output both to our stdout and to ``log_path``;
    ended (with its process group) after ``timeout`` seconds."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    start = time.monotonic()
    with open(log_path, "w") as log:
        log.write("$ " + shlex.join(cmd) + "\n")
        log.flush()
        # Its own process group, so that a time-out ends the step's compile workers too; not
        # its own session, so that whoever ends the runner's session ends the steps as well.
        group = {"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}
        proc = subprocess.Popen(cmd, cwd=common.ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, **group)
        Child.proc = proc

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
            stop(proc)
            status = "timeout"
        reader.join(timeout=10)
        Child.proc = None
        seconds = time.monotonic() - start
        if status == "timeout":
            log.write(f"\n[run_all] stopped after {seconds:.0f} s: the step's time was up\n")
    return {"status": status, "returncode": proc.returncode, "seconds": round(seconds, 1)}


def run_step(step: Dict[str, object], python: str, env: Dict[str, str], work: str, left: float) -> Dict[str, object]:
    """Run one step with ``left`` seconds remaining (skipped below its minimum); its summary entry."""
    cmd = [python, *step["args"]]
    entry: Dict[str, object] = {"name": step["name"], "command": shlex.join(cmd)}
    if left < step["min_s"]:
        entry.update(status="skipped", reason=f"{left:.0f} s left, the step needs at least {step['min_s']} s")
        print(f"[run_all] skip {step['name']}: {entry['reason']}", flush=True)
        return entry
    timeout = min(step["cap_s"], left)
    print(f"\n[run_all] {step['name']} (at most {timeout:.0f} s): {entry['command']}", flush=True)
    before = files_in(work)
    entry.update(run(cmd, env, os.path.join(work, "logs", f"{step['name']}.log"), timeout))
    written = sorted(rel for rel, mtime in files_in(work).items()
                     if before.get(rel) != mtime and not rel.startswith("logs" + os.sep))
    entry.update(files=written, correctness=correctness(work, written))
    print(f"[run_all] {step['name']}: {entry['status']} in {entry['seconds']} s", flush=True)
    return entry


# ---------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------
def files_in(folder: str) -> Dict[str, float]:
    """Relative path -> modification time of every file below ``folder``."""
    found = {}
    for dirpath, _, filenames in os.walk(folder):
        for f in filenames:
            path = os.path.join(dirpath, f)
            found[os.path.relpath(path, folder)] = os.path.getmtime(path)
    return found


def correctness(folder: str, written: List[str]) -> Dict[str, object]:
    """The correctness figures of the JSON records a step wrote, by file name."""
    out = {}
    for rel in written:
        if rel.endswith(".json"):
            try:
                with open(os.path.join(folder, rel)) as f:
                    out[rel] = json.load(f).get("correctness")
            except (OSError, ValueError) as e:
                out[rel] = f"unreadable: {e}"
    return out


def pack(folder: str, archive: str) -> None:
    """Every file below ``folder`` into the .tar.gz ``archive``, written atomically."""
    def write(tmp):
        with tarfile.open(tmp, "w:gz") as tar:
            for rel in sorted(files_in(folder)):
                tar.add(os.path.join(folder, rel), arcname=rel)
    common.write_atomically(archive, write)


# ---------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------
def main(argv=None) -> Dict[str, object]:
    args = parse_args(argv)
    started, clock = common.now(), time.monotonic()
    deadline = clock + args.budget_s
    out = os.path.abspath(args.out)
    if args.dry_run:
        for s in steps(out, "<device>"):
            if s["name"] in args.only:
                print(f"{s['name']:<18} cap {s['cap_s']:>3} s  {shlex.join([args.python, *s['args']])}")
        return {}

    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)  # the real kernels: the interpreter is for --smoke only
    wheels = sorted(glob.glob(os.path.join(args.wheels, "*.whl"))) if args.wheels else []
    if args.wheels and not wheels:
        raise SystemExit(f"run_all: no .whl files in --wheels {args.wheels}")
    if wheels:
        site = tempfile.mkdtemp(prefix="vtp-bench-site-")
        print(f"[run_all] installing {len(wheels)} wheel(s) from {args.wheels} into {site}", flush=True)
        subprocess.run([args.python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--no-cache-dir", "--upgrade", "--target", site, *wheels], check=True)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (site, env.get("PYTHONPATH")) if p)

    summary: Dict[str, object] = {
        "benchmark": "run_all", "created": started.isoformat(timespec="seconds"),
        "command": common.command_line(__file__, argv), "budget_s": args.budget_s,
        "wheels": [os.path.basename(w) for w in wheels], "environment": None, "steps": [], "finished": None,
    }
    pre = subprocess.run([args.python, "-c", PREFLIGHT], cwd=common.ROOT, env=env, capture_output=True, text=True,
                         timeout=max(30.0, deadline - time.monotonic()))
    if pre.returncode != 0:
        raise SystemExit(f"run_all: preflight failed:\n{pre.stdout}{pre.stderr}")
    summary["environment"] = json.loads(pre.stdout.strip().splitlines()[-1])
    device = summary["environment"]["device"]
    print(f"[run_all] {device}; {summary['environment']['versions']}", flush=True)
    stem = common.timestamped_stem("run_all", device, started)
    summary_path = os.path.join(out, stem + ".json")
    tag = common.slug(device)
    # With --pack the steps write into a scratch folder that is packed after every step.
    work = tempfile.mkdtemp(prefix="vtp-bench-") if args.pack else out

    def save():
        if args.pack:
            pack(work, os.path.join(out, stem + ".tar.gz"))
        common.write_json(summary_path, summary)

    def on_term(signum, frame):  # end the running step with us, and keep what is done
        if Child.proc is not None:
            stop(Child.proc)
        summary["finished"] = f"stopped by signal {signum}"
        save()
        sys.exit(128 + signum)

    # The step runs in its own process group: SIGTERM and Ctrl-C must be passed on to it.
    handlers = {sig: signal.signal(sig, on_term) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        for step in steps(work, tag):
            if step["name"] in args.only:
                summary["steps"].append(run_step(step, args.python, env, work, deadline - time.monotonic()))
                save()
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    summary["finished"] = common.now().isoformat(timespec="seconds")
    save()
    if args.pack:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n[run_all] {time.monotonic() - clock:.0f} s; summary: {summary_path}")
    for e in summary["steps"]:
        print(f"  {e['name']:<18} {e['status']:<8} {e.get('seconds', '-'):>6}  {' '.join(e.get('files', []))}")
    return summary


if __name__ == "__main__":
    main()
