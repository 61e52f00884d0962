"""Benchmark the fused LayerNorm that emits only the kept columns (vtp_kernels.layer_norm_gather).

Shape: the LayerNorm in front of qkv / fc1 of a pruned DeiT-B at batch 256
(M = 256 * 197 rows, D = 768, k = 60 % of D kept columns drawn at random), bf16.
Variants, forward and forward+backward:

    triton     the fused kernel (what vtp_kernels.layer_norm_gather runs with backend "triton")
    reference  F.layer_norm over D, then index_select of the kept columns, then affine
    compiled   torch.compile(reference)
    floor      a plain full-width F.layer_norm (no gather): the cost the fused op should match

The kernel output is checked against an fp32 reference before anything is timed. Timings
are triton.testing.do_bench (L2 flushed between runs); every raw timing is kept.
Writes a table to stdout and layer_norm_gather_<device>.json / .png into --out.

    python benchmarks/bench_layer_norm_gather.py                 # on a GPU
    python benchmarks/bench_layer_norm_gather.py --smoke --out /tmp/lng   # CPU, interpreter
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import time
from typing import Callable, Dict, List

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
# Run from a checkout without installing: the repository root holds vtp and vtp_kernels.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
DEFAULT_OUT = os.path.join(ROOT, "benchmarks", "results")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show a flag's default unless it is None (then the help text says what it depends on)."""

    def _get_help_string(self, action):
        if action.default is None or "default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=_HelpFormatter,
    )
    p.add_argument("--batch", type=int, default=256, help="images per batch; rows M = batch * tokens")
    p.add_argument("--tokens", type=int, default=197, help="tokens per image (196 patches + class token for DeiT-B/16)")
    p.add_argument("--dim", type=int, default=768, help="LayerNorm width D (DeiT-B: 768)")
    p.add_argument("--keep", type=float, default=0.6, help="share of the D columns kept (k = round(keep * D), random columns)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="dtype of x, weight and bias (default: bf16; fp32 with --smoke, since the interpreter's "
                        "bf16 arithmetic is unreliable)")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warm-up time in ms (--smoke: warm-up iterations)")
    p.add_argument("--rep", type=int, default=200, help="do_bench measuring time in ms (--smoke: timed iterations)")
    p.add_argument("--compile-backend", metavar="NAME",
                   help="torch.compile backend for the 'compiled' variant (default: inductor; aot_eager with "
                        "--smoke, to skip C++ compilation)")
    p.add_argument("--seed", type=int, default=0, help="random seed for inputs and kept columns")
    p.add_argument("--out", default=DEFAULT_OUT, help="folder for the JSON record and the PNG plot")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG (JSON and table only)")
    p.add_argument("--smoke", action="store_true",
                   help="CPU check of the script itself: tiny shape (M=34, D=64), few iterations, Triton under "
                        "TRITON_INTERPRET=1, wall-clock timing; its numbers are not kernel speeds")
    args = p.parse_args(argv)
    if args.smoke:
        args.batch, args.tokens, args.dim = 2, 17, 64
        args.warmup, args.rep = min(args.warmup, 2), min(args.rep, 5)
        args.compile_backend = args.compile_backend or "aot_eager"
        args.dtype = args.dtype or "fp32"
    args.compile_backend = args.compile_backend or "inductor"
    args.dtype = args.dtype or "bf16"
    return args


# ---------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------
def time_gpu(fn: Callable[[], object], warmup_ms: int, rep_ms: int, grad_to_none) -> List[float]:
    from triton.testing import do_bench
    return list(do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none, return_mode="all"))


def time_cpu(fn: Callable[[], object], warmup: int, rep: int, grad_to_none) -> List[float]:
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


def device_record(torch, device) -> Dict[str, object]:
    import triton
    rec = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()})",
        "versions": {
            "python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__,
            "cuda": torch.version.cuda,
        },
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
    }
    return rec


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


# ---------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------
def main(argv=None) -> Dict[str, object]:
    args = parse_args(argv)
    if args.smoke:
        # The interpreter must be on before triton decorates the kernels.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch
    import torch.nn.functional as F

    from vtp_kernels import reference
    from vtp_kernels.layer_norm_gather import layer_norm_gather_triton

    if args.smoke:
        device = torch.device("cpu")
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise SystemExit("--smoke runs Triton under the interpreter: unset TRITON_INTERPRET or set it to 1")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        raise SystemExit("no CUDA device: run with --smoke for a CPU check of the script")
    dtype = getattr(torch, DTYPES[args.dtype])
    torch.manual_seed(args.seed)
    M, D = args.batch * args.tokens, args.dim
    k = max(1, round(args.keep * D))

    # Inputs as in a trained network: a non-zero mean and non-unit scale per row.
    x = (3.0 + 2.5 * torch.randn(M, D, device=device)).to(dtype).requires_grad_()
    index = torch.randperm(D, device=device)[:k].sort().values
    weight = (1.0 + 0.5 * torch.randn(k, device=device)).to(dtype).requires_grad_()
    bias = torch.randn(k, device=device).to(dtype).requires_grad_()
    weight_full = (1.0 + 0.5 * torch.randn(D, device=device)).to(dtype).requires_grad_()
    bias_full = torch.randn(D, device=device).to(dtype).requires_grad_()
    dy = torch.randn(M, k, device=device).to(dtype)
    dy_full = torch.randn(M, D, device=device).to(dtype)

    def triton_op(x, index, weight, bias):
        return layer_norm_gather_triton(x, index, weight, bias)

    compiled_ref = torch.compile(reference.layer_norm_gather, backend=args.compile_backend)
    variants = {
        "triton": lambda: triton_op(x, index, weight, bias),
        "reference": lambda: reference.layer_norm_gather(x, index, weight, bias),
        "compiled": lambda: compiled_ref(x, index, weight, bias),
        "floor": lambda: F.layer_norm(x, (D,), weight_full, bias_full),
    }

    # Correctness first: the kernel against an fp32 reference on the same (upcast) values.
    # Error relative to the largest reference value; bf16 output rounding is 2**-8 ~ 0.4 %.
    leaves = [t.detach().float().requires_grad_() for t in (x, weight, bias)]
    y_ref = reference.layer_norm_gather(leaves[0], index, leaves[1], leaves[2])
    y_ref.backward(dy.float())
    y = triton_op(x, index, weight, bias)
    y.backward(dy)
    checks = {}
    for name, got, want in [("y", y, y_ref), ("dx", x.grad, leaves[0].grad),
                            ("dweight", weight.grad, leaves[1].grad), ("dbias", bias.grad, leaves[2].grad)]:
        err = (got.detach().float() - want.detach()).abs().max() / want.detach().abs().max().clamp_min(1e-12)
        checks[name] = float(err)
    bound = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-4}[dtype]
    bad = {n: e for n, e in checks.items() if not e <= bound}
    if bad:
        raise SystemExit(f"triton layer_norm_gather disagrees with the reference (max error / max |ref| > {bound}): {bad}")

    timer = time_cpu if args.smoke else time_gpu
    elem = x.element_size()
    # Bytes the fused op must move at minimum: the basis of the GB/s column for every variant.
    ideal_bytes = {"fwd": M * (D + k) * elem, "fwd+bwd": M * (2 * D + k) * elem + M * (D + k) * elem}
    results = []
    for mode in ("fwd", "fwd+bwd"):
        for name, fn in variants.items():
            grads = [x, weight_full, bias_full] if name == "floor" else [x, weight, bias]
            if mode == "fwd":
                def step(fn=fn):
                    with torch.no_grad():
                        fn()
            else:
                g = dy_full if name == "floor" else dy

                def step(fn=fn, g=g):
                    fn().backward(g)
            raw = timer(step, args.warmup, args.rep, grads)
            med = statistics.median(raw)
            results.append({
                "variant": name, "mode": mode, "median_ms": med, "raw_ms": raw,
                "gb_per_s": ideal_bytes[mode] / (med * 1e-3) / 1e9,
            })

    record = {
        "benchmark": "layer_norm_gather",
        **device_record(torch, device),
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]) if argv is None
        else "python benchmarks/bench_layer_norm_gather.py " + " ".join(argv),
        "smoke": args.smoke,
        "config": {"M": M, "D": D, "k": k, "batch": args.batch, "tokens": args.tokens, "dtype": args.dtype,
                   "warmup": args.warmup, "rep": args.rep, "compile_backend": args.compile_backend,
                   "timer": "perf_counter wall clock" if args.smoke else "triton.testing.do_bench, L2 flushed",
                   "seed": args.seed},
        "correctness": {"max_err_over_max_ref": checks, "bound": bound},
        "results": results,
        "medians_ms": {f"{r['mode']}/{r['variant']}": r["median_ms"] for r in results},
    }

    print(f"layer_norm_gather  M={M} D={D} k={k} {args.dtype}  on {record['device']}"
          + ("  [smoke: interpreter, not kernel speeds]" if args.smoke else ""))
    print(f"{'mode':<9}{'variant':<11}{'median ms':>11}{'GB/s':>9}{'vs floor':>10}")
    for r in results:
        floor = record["medians_ms"][f"{r['mode']}/floor"]
        print(f"{r['mode']:<9}{r['variant']:<11}{r['median_ms']:>11.4f}{r['gb_per_s']:>9.1f}{r['median_ms'] / floor:>9.2f}x")

    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, "layer_norm_gather_" + ("smoke" if args.smoke else slug(record["device"])))
    with open(stem + ".json", "w") as f:
        json.dump(record, f, indent=1)
    if not args.no_plot:
        plot(record, stem + ".png")
    print(f"wrote {stem}.json" + ("" if args.no_plot else f" and {stem}.png"))
    return record


def plot(record: Dict[str, object], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = ["fwd", "fwd+bwd"]
    variants = ["triton", "reference", "compiled", "floor"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, mode in zip(axes, modes):
        meds = [record["medians_ms"][f"{mode}/{v}"] for v in variants]
        bars = ax.bar(variants, meds, color=["C0", "C1", "C2", "0.6"])
        ax.bar_label(bars, fmt="%.3g", fontsize=8)
        ax.set_title(mode)
        ax.set_ylabel("median ms (lower is better)")
    c = record["config"]
    fig.suptitle(f"layer_norm_gather M={c['M']} D={c['D']} k={c['k']} {c['dtype']} on {record['device']}"
                 + (" [smoke]" if record["smoke"] else ""), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
