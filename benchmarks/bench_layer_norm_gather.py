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

import os
import statistics
import sys
from typing import Dict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # common.py, also when loaded by path
import common  # noqa: E402  (puts the repository root on sys.path too)



def parse_args(argv=None):
    p = common.parser(__doc__, common.DefaultsHelpFormatter)
    p.add_argument("--batch", type=int, default=256, help="images per batch; rows M = batch * tokens")
    p.add_argument("--tokens", type=int, default=197, help="tokens per image (196 patches + class token for DeiT-B/16)")
    p.add_argument("--dim", type=int, default=768, help="LayerNorm width D (DeiT-B: 768)")
    p.add_argument("--keep", type=float, default=0.6, help="share of the D columns kept (k = round(keep * D), random columns)")
    p.add_argument("--dtype", choices=sorted(common.DTYPES), default=None,
                   help="dtype of x, weight and bias (default: bf16; fp32 with --smoke, since the interpreter's "
                        "bf16 arithmetic is unreliable)")
    common.add_do_bench_flags(p)
    p.add_argument("--compile-backend", metavar="NAME",
                   help="torch.compile backend for the 'compiled' variant (default: inductor; aot_eager with "
                        "--smoke, to skip C++ compilation)")
    p.add_argument("--seed", type=int, default=0, help="random seed for inputs and kept columns")
    common.add_output_flags(p, smoke_help="CPU check of the script itself: tiny shape (M=34, D=64), few iterations, "
                                          "Triton under TRITON_INTERPRET=1, wall-clock timing; its numbers are not "
                                          "kernel speeds")
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
# The benchmark
# ---------------------------------------------------------------------------------------
def main(argv=None) -> Dict[str, object]:
    args = parse_args(argv)
    torch, device = common.setup(args.smoke, args.seed)
    import torch.nn.functional as F

    from vtp_kernels import reference
    from vtp_kernels._layer_norm_gather import layer_norm_gather_triton

    dtype = getattr(torch, common.DTYPES[args.dtype])
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
    common.require_within(checks, bound, "triton layer_norm_gather", "max error / max |ref|")

    timer = common.wall_clock_ms if args.smoke else common.do_bench_ms
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
        **common.record_head("layer_norm_gather", __file__, argv, smoke=args.smoke,
                             device=common.device_name(torch, device), packages=("python", "torch", "triton", "cuda")),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
        "config": {"M": M, "D": D, "k": k, "batch": args.batch, "tokens": args.tokens, "dtype": args.dtype,
                   "warmup": args.warmup, "rep": args.rep, "compile_backend": args.compile_backend,
                   "timer": common.TIMER_WALL_CLOCK if args.smoke else common.TIMER_DO_BENCH,
                   "seed": args.seed},
        "correctness": {"max_err_over_max_ref": checks, "bound": bound},
        "results": results,
        "medians_ms": {f"{r['mode']}/{r['variant']}": r["median_ms"] for r in results},
    }

    print(f"layer_norm_gather  M={M} D={D} k={k} {args.dtype}  on {record['device']}"
          + common.smoke_suffix(args.smoke, "  [smoke: interpreter, not kernel speeds]"))
    print(f"{'mode':<9}{'variant':<11}{'median ms':>11}{'GB/s':>9}{'vs floor':>10}")
    for r in results:
        floor = record["medians_ms"][f"{r['mode']}/floor"]
        print(f"{r['mode']:<9}{r['variant']:<11}{r['median_ms']:>11.4f}{r['gb_per_s']:>9.1f}{r['median_ms'] / floor:>9.2f}x")

    stem = common.output_stem(args.out, "layer_norm_gather", args.smoke, record["device"])
    common.save_record(record, stem, None if args.no_plot else plot)
    return record


def plot(record: Dict[str, object], path: str) -> None:
    plt = common.pyplot()
    modes = ["fwd", "fwd+bwd"]
    variants = ["triton", "reference", "compiled", "floor"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, mode in zip(axes, modes):
        common.bar_panel(ax, variants, [record["medians_ms"][f"{mode}/{v}"] for v in variants])
        ax.set_title(mode)
    c = record["config"]
    fig.suptitle(f"layer_norm_gather M={c['M']} D={c['D']} k={c['k']} {c['dtype']} on {record['device']}"
                 + common.smoke_suffix(record["smoke"]), fontsize=9)
    common.save_figure(fig, path)


if __name__ == "__main__":
    main()
