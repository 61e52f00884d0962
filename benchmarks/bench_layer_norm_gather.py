"""Benchmark the fused LayerNorm that emits only the kept columns (vtp_kernels.layer_norm_gather).

Shape: the LayerNorm in front of qkv / fc1 of a pruned DeiT-B at batch 256
(M = 256 * 197 rows, D = 768, k = 60 % of D kept columns drawn at random), bf16.
Variants, forward and forward+backward:

    triton     the fused kernel (what vtp_kernels.layer_norm_gather runs with backend "triton")
    reference  F.layer_norm over D, then index_select of the kept columns, then affine
    compiled   torch.compile(reference)
    floor      a plain full-width F.layer_norm (no gather): the cost the fused op should match

The kernel output and gradients are checked against the fp64 reference before anything is
timed. Timings are triton.testing.do_bench (L2 flushed between runs); every raw timing is
kept. Writes a table to stdout and layer_norm_gather_<device>.json / .png into --out.

gpu_check.py runs the same cases, checks and timed run (``config_cases``,
``correctness_cases``, ``production_cases``, ``correctness``, ``run``).

    python benchmarks/bench_layer_norm_gather.py                 # on a GPU
    python benchmarks/bench_layer_norm_gather.py --smoke --out /tmp/lng   # CPU, interpreter
"""
from __future__ import annotations

import os
import sys
from typing import Dict, List, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the harness, also when loaded by path
from harness import arguments, checks, environment, records, timing  # noqa: E402

OP = "layer_norm_gather"
EPS = 1e-6
VARIANTS = {"triton": "candidate", "reference": "alternative", "compiled": "alternative", "floor": "floor"}
REFERENCE = "reference"
# 40 % pruned DeiT-B: 461 of 768 LayerNorm columns kept (464 at round_to=8).
DEIT_B_KEPT = {1: 461, 8: 464}


# ---------------------------------------------------------------------------------------
# Cases: data
# ---------------------------------------------------------------------------------------
def case(label: str, dtype: str, **params) -> Dict[str, object]:
    """One case: M rows of width D, k kept columns (random, sorted); ``repeat``: check the
    gradients repeat bitwise."""
    return {"op": OP, "label": label, "dtype": dtype, "params": params}


def config_cases(smoke: bool) -> List[Dict[str, object]]:
    """A small ragged case, run under each autotune config in turn."""
    if smoke:
        return [case("M=37 D=40 k=13", "fp32", M=37, D=40, k=13)]
    return [case("M=111 D=200 k=97", "bf16", M=111, D=200, k=97)]


def correctness_cases(smoke: bool, dtype: str, rows: int) -> List[Dict[str, object]]:
    """At DeiT-B width with both plans' kept columns (``rows`` = 16 images of tokens), and
    at ragged small shapes (--smoke: one of each, and in fp16 only the first)."""
    widths = [(64, 40)] if smoke else [(768, DEIT_B_KEPT[1]), (768, DEIT_B_KEPT[8])]
    out = [case(f"M={rows} D={d} k={k}", dtype, M=rows, D=d, k=k, repeat=True) for d, k in widths]
    if not (smoke and dtype == "fp16"):
        ragged = ((5, 7, 3),) if smoke else ((111, 781, 301), (5, 7, 3), (3, 1, 1))
        out += [case(f"M={m} D={d} k={k}", dtype, M=m, D=d, k=k) for m, d, k in ragged]
    return out


def production_cases(smoke: bool) -> List[Dict[str, object]]:
    """The pruned DeiT-B's LayerNorms at batch 256 on the fp32 residual stream, both plans
    (--smoke: a small one, round_to=8)."""
    if smoke:
        return [case("D=64 k=40 (round_to=8)", "fp32", M=2 * 13, D=64, k=40, round_to=8)]
    return [case(f"D=768 k={k} (round_to={r})", "fp32", M=256 * 197, D=768, k=k, round_to=r)
            for r, k in DEIT_B_KEPT.items()]


# ---------------------------------------------------------------------------------------
# Inputs, check and timed run
# ---------------------------------------------------------------------------------------
def inputs(torch, device, dtype, p, empty=False):
    """x (non-zero mean, non-unit scale per row, as in a trained network), sorted distinct
    kept columns, weight, bias, dy. ``empty``: uninitialised tensors (compile-only runs)."""
    new = torch.empty if empty else torch.randn
    M, D, k = p["M"], p["D"], p["k"]
    x = (3.0 + 2.5 * new(M, D, device=device)).to(dtype)
    index = torch.randperm(D, device=device)[:k].sort().values
    w = (1.0 + 0.5 * new(k, device=device)).to(dtype)
    b = new(k, device=device).to(dtype)
    return x, index, w, b, new(M, k, device=device).to(dtype)


def correctness(torch, device, c: Dict[str, object]) -> Dict[str, object]:
    """The Triton op against the fp64 reference (harness.checks.against_fp64); judged."""
    from vtp_kernels import reference
    from vtp_kernels._layer_norm_gather import layer_norm_gather_triton

    x, index, w, b, dy = inputs(torch, device, environment.dtype_of(torch, c["dtype"]), c["params"])
    result = checks.against_fp64(torch, lambda x, w, b: layer_norm_gather_triton(x, index, w, b, EPS),
                                 lambda x, w, b: reference.layer_norm_gather(x, index, w, b, EPS), (x, w, b), dy,
                                 ("y", "dx", "dweight", "dbias"), repeatable=("dweight", "dbias"),
                                 repeat=bool(c["params"].get("repeat")))
    return checks.judge(result, c["dtype"])


def prepare(torch, device, c: Dict[str, object], compile_backend: str,
            names: Sequence[str] = tuple(VARIANTS)) -> Dict[str, object]:
    """The variants ``names`` of case ``c`` on fresh inputs: {variants, roles, inputs, grads,
    extra, leaves}; the floor normalises the full width with a full-width affine."""
    import torch.nn.functional as F

    from vtp_kernels import reference
    from vtp_kernels._layer_norm_gather import layer_norm_gather_triton

    p, dtype = c["params"], environment.dtype_of(torch, c["dtype"])
    x, index, w, b, dy = inputs(torch, device, dtype, p)
    leaves = tuple(t.requires_grad_() for t in (x, w, b))
    full = (x, (1.0 + 0.5 * torch.randn(p["D"], device=device)).to(dtype).requires_grad_(),
            torch.randn(p["D"], device=device).to(dtype).requires_grad_())
    compiled = torch.compile(reference.layer_norm_gather, backend=compile_backend, dynamic=False)
    every = {"triton": lambda x, w, b: layer_norm_gather_triton(x, index, w, b, EPS),
             "reference": lambda x, w, b: reference.layer_norm_gather(x, index, w, b, EPS),
             "compiled": lambda x, w, b: compiled(x, index, w, b, EPS),
             "floor": lambda x, w, b: F.layer_norm(x, (p["D"],), w, b, EPS)}
    dy_full = torch.randn(p["M"], p["D"], device=device).to(dtype)
    return {"variants": {n: every[n] for n in names}, "roles": {n: VARIANTS[n] for n in names},
            "inputs": {n: full if n == "floor" else leaves for n in names},
            "grads": {n: dy_full if n == "floor" else dy for n in names},
            "extra": {k: p.get(k) for k in ("M", "D", "k", "round_to")}, "leaves": leaves}


def run(torch, device, c: Dict[str, object], timer: timing.Timer, *, compile_backend: str,
        names: Sequence[str] = tuple(VARIANTS), modes: Sequence[str] = timing.MODES, rounds: int = 2,
        sync=lambda: None):
    """Case ``c`` timed: rows (op, case, mode, dtype, variant, role, M, D, k, round_to,
    summary) and the variants that failed."""
    return timing.time_case(torch, c, prepare(torch, device, c, compile_backend, names), timer, modes=modes,
                            rounds=rounds, sync=sync)


# ---------------------------------------------------------------------------------------
# The script
# ---------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = arguments.parser(__doc__, arguments.DefaultsHelpFormatter)
    p.add_argument("--batch", type=int, default=256, help="images per batch; rows M = batch * tokens")
    p.add_argument("--tokens", type=int, default=197, help="tokens per image (196 patches + class token for DeiT-B/16)")
    p.add_argument("--dim", type=int, default=768, help="LayerNorm width D (DeiT-B: 768)")
    p.add_argument("--keep", type=float, default=0.6, help="share of the D columns kept (k = round(keep * D), random columns)")
    p.add_argument("--dtype", choices=sorted(environment.DTYPES), default=None,
                   help="dtype of x, weight and bias (default: bf16; fp32 with --smoke, since the interpreter's "
                        "bf16 arithmetic is unreliable)")
    arguments.add_do_bench_flags(p)
    p.add_argument("--compile-backend", metavar="NAME",
                   help="torch.compile backend for the 'compiled' variant (default: inductor; aot_eager with "
                        "--smoke, to skip C++ compilation)")
    p.add_argument("--seed", type=int, default=0, help="random seed for inputs and kept columns")
    arguments.add_output_flags(p, smoke_help="CPU check of the script itself: tiny shape (M=34, D=64), few "
                                             "iterations, Triton under TRITON_INTERPRET=1, wall-clock timing; its "
                                             "numbers are not kernel speeds")
    args = p.parse_args(argv)
    if args.smoke:
        args.batch, args.tokens, args.dim = 2, 17, 64
        args.warmup, args.rep = min(args.warmup, 2), min(args.rep, 5)
        args.compile_backend = args.compile_backend or "aot_eager"
        args.dtype = args.dtype or "fp32"
    args.compile_backend = args.compile_backend or "inductor"
    args.dtype = args.dtype or "bf16"
    return args


def main(argv=None) -> Dict[str, object]:
    args = parse_args(argv)
    torch, device = environment.setup(args.smoke, args.seed)
    cuda = device.type == "cuda"
    M, D = args.batch * args.tokens, args.dim
    k = max(1, round(args.keep * D))
    c = case(f"M={M} D={D} k={k}", args.dtype, M=M, D=D, k=k)

    check = correctness(torch, device, c)
    checks.require_within(check["errors"], check["bound"], "triton layer_norm_gather", "error norm / fp64 reference norm")
    rows, failures = run(torch, device, c, timing.kernel_timer(cuda, args.warmup, args.rep),
                         compile_backend=args.compile_backend, rounds=1,
                         sync=torch.cuda.synchronize if cuda else lambda: None)
    if failures:
        raise SystemExit(f"bench_layer_norm_gather: variants failed: {failures}")
    elem = torch.empty((), dtype=environment.dtype_of(torch, args.dtype)).element_size()
    # Bytes the fused op must move at minimum: the basis of the GB/s column for every variant.
    ideal_bytes = {"fwd": M * (D + k) * elem, "fwd+bwd": M * (2 * D + k) * elem + M * (D + k) * elem}
    results = [{"variant": r["variant"], "mode": r["mode"], "median_ms": r["median_ms"], "raw_ms": timing.raw_ms(r),
                "gb_per_s": ideal_bytes[r["mode"]] / (r["median_ms"] * 1e-3) / 1e9} for r in rows]

    record = {
        **records.record_head("layer_norm_gather", __file__, argv, smoke=args.smoke,
                              device=environment.device_name(torch, device),
                              packages=("python", "torch", "triton", "cuda")),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
        "config": {"M": M, "D": D, "k": k, "batch": args.batch, "tokens": args.tokens, "dtype": args.dtype,
                   "warmup": args.warmup, "rep": args.rep, "compile_backend": args.compile_backend,
                   "timer": timing.TIMER_WALL_CLOCK if args.smoke else timing.TIMER_DO_BENCH,
                   "seed": args.seed},
        "correctness": {"rel_err": check["errors"], "bound": check["bound"]},
        "results": results,
        "medians_ms": {f"{r['mode']}/{r['variant']}": r["median_ms"] for r in results},
    }

    print(f"layer_norm_gather  M={M} D={D} k={k} {args.dtype}  on {record['device']}"
          + records.smoke_suffix(args.smoke, "  [smoke: interpreter, not kernel speeds]"))
    print(f"{'mode':<9}{'variant':<11}{'median ms':>11}{'GB/s':>9}{'vs floor':>10}")
    for r in results:
        floor = record["medians_ms"][f"{r['mode']}/floor"]
        print(f"{r['mode']:<9}{r['variant']:<11}{r['median_ms']:>11.4f}{r['gb_per_s']:>9.1f}{r['median_ms'] / floor:>9.2f}x")

    stem = records.output_stem(args.out, "layer_norm_gather", args.smoke, record["device"])
    records.save_record(record, stem, None if args.no_plot else plot)
    return record


def plot(record: Dict[str, object], path: str) -> None:
    plt = records.pyplot()
    modes = ["fwd", "fwd+bwd"]
    variants = ["triton", "reference", "compiled", "floor"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, mode in zip(axes, modes):
        records.bar_panel(ax, variants, [record["medians_ms"][f"{mode}/{v}"] for v in variants])
        ax.set_title(mode)
    c = record["config"]
    fig.suptitle(f"layer_norm_gather M={c['M']} D={c['D']} k={c['k']} {c['dtype']} on {record['device']}"
                 + records.smoke_suffix(record["smoke"]), fontsize=9)
    records.save_figure(fig, path)


if __name__ == "__main__":
    main()
