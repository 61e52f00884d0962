"""Microbenchmark of the gated linear layer ``y = (x * a) @ W.T + b`` on DeiT-B shapes.

Compares, forward and forward+backward:

    linear     nn.Linear without a gate: the floor a gated layer can reach
    eager      F.linear(x * a, W, b): the gate on the activations, as written naively
    folded     F.linear(x, W * a, b): the gate on the weight (vtp_kernels.reference)
    compiled   torch.compile of the folded form
    triton     vtp_kernels._gated_linear.gated_linear_triton

Each op is first checked against the fp32 reference on the same (upcast) inputs; the
maximum relative error of the Triton op goes into the record. Timings are
``triton.testing.do_bench`` (CUDA events, warm-up, L2 flushed between runs); every raw
timing is kept. Results: a table on stdout, ``<name>.json`` and ``<name>.png`` in --out.

    python benchmarks/bench_gated_linear.py                   # GPU: DeiT-B, batch 256, bf16
    python benchmarks/bench_gated_linear.py --smoke --out /tmp/b   # CPU, interpreter, seconds
"""
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # common.py, also when loaded by path
import common  # noqa: E402  (puts the repository root on sys.path too)

RESULTS = Path(common.RESULTS)

# (name, K = in_features, N = out_features) of the four linear layers of a DeiT-B block.
DEIT_B_SHAPES = [("qkv", 768, 2304), ("proj", 768, 768), ("fc1", 768, 3072), ("fc2", 3072, 768)]
SMOKE_SHAPES = [("smoke_a", 40, 24), ("smoke_b", 70, 33)]
METHODS = ("linear", "eager", "folded", "compiled", "triton")
MODES = ("fwd", "fwd+bwd")


def parse_args(argv=None):
    p = common.parser(__doc__)
    p.add_argument("--smoke", action="store_true",
                   help="CPU check of the whole script in seconds: tiny shapes, fp32, Triton "
                        "under TRITON_INTERPRET=1, time.perf_counter instead of CUDA events. "
                        "Its timings say nothing about speed.")
    p.add_argument("--out", type=Path, default=RESULTS,
                   help=f"folder for the JSON record and the PNG plot (default: {RESULTS})")
    p.add_argument("--name", default=None,
                   help="file stem of the record (default: bench_gated_linear_<device>_<time>)")
    p.add_argument("--batch", type=int, default=None,
                   help="images per batch; rows M = batch * tokens (default 256, smoke 2)")
    p.add_argument("--tokens", type=int, default=None,
                   help="tokens per image (default 197 = 14*14 patches + class token, smoke 37)")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None,
                   help="dtype of x, W, a, b (default bf16, smoke fp32: the interpreter "
                        "computes bf16 wrongly)")
    p.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma-separated subset of {','.join(METHODS)} (default: all)")
    p.add_argument("--modes", default=",".join(MODES),
                   help=f"comma-separated subset of {','.join(MODES)} (default: both)")
    p.add_argument("--shapes", default=None,
                   help="comma-separated K:N pairs (in:out features) to run instead of the four "
                        "layers of a DeiT-B block, e.g. 768:2304,3072:768")
    p.add_argument("--warmup-ms", type=float, default=25.0,
                   help="do_bench warm-up time per measurement (default: 25)")
    p.add_argument("--rep-ms", type=float, default=200.0,
                   help="do_bench measuring time per measurement; every run is kept (default: 200)")
    p.add_argument("--repeats", type=int, default=2,
                   help="timed calls per measurement in --smoke mode, after one untimed call (default: 2)")
    p.add_argument("--compile-backend", default=None,
                   help="torch.compile backend of 'compiled' (default inductor, smoke aot_eager: "
                        "inductor's C++ build on CPU takes longer than the whole smoke run)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default: 0)")
    args = p.parse_args(argv)

    smoke = args.smoke
    args.batch = args.batch or (2 if smoke else 256)
    args.tokens = args.tokens or (37 if smoke else 197)
    args.dtype = args.dtype or ("fp32" if smoke else "bf16")
    args.compile_backend = args.compile_backend or ("aot_eager" if smoke else "inductor")
    args.methods = common.subset(args.methods, METHODS, "--methods")
    args.modes = common.subset(args.modes, MODES, "--modes")
    if args.shapes:
        args.shapes = [(f"{k}x{n}", int(k), int(n))
                       for k, n in (pair.split(":") for pair in args.shapes.split(","))]
    else:
        args.shapes = SMOKE_SHAPES if smoke else DEIT_B_SHAPES
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    # Before vtp_kernels._gated_linear decorates its kernels (the interpreter in --smoke mode).
    torch, device = common.setup(
        args.smoke, args.seed, "bench_gated_linear: no CUDA device; use --smoke for a CPU check of the script")
    import torch.nn.functional as F

    from vtp_kernels import reference
    from vtp_kernels._gated_linear import gated_linear_triton

    device_name = common.device_name(torch, device) + (", TRITON_INTERPRET=1" if args.smoke else "")
    dtype = getattr(torch, common.DTYPES[args.dtype])

    # Static shapes: each DeiT-B shape gets its own specialised kernels, as in training.
    compiled_reference = torch.compile(reference.gated_linear, backend=args.compile_backend, dynamic=False)
    ops = {
        "linear": lambda x, w, a, b: F.linear(x, w, b),
        "eager": lambda x, w, a, b: F.linear(x * a, w, b),
        "folded": reference.gated_linear,
        "compiled": compiled_reference,
        "triton": gated_linear_triton,
    }

    def timer(fn):
        if args.smoke:  # one untimed call: compilation, autotuning and first-call costs
            return common.wall_clock_ms(fn, 1, args.repeats)
        return common.do_bench_ms(fn, args.warmup_ms, args.rep_ms)

    M = args.batch * args.tokens
    results, correctness = [], []
    for shape, K, N in args.shapes:
        # Random, never-zero inputs at the scales of a trained layer; the gate stays away
        # from 0 so no product vanishes.
        x = torch.randn(M, K, device=device, dtype=dtype)
        w = (torch.randn(N, K, device=device) * K ** -0.5).to(dtype)
        a = torch.empty(K, device=device).uniform_(0.5, 1.5).to(dtype)
        b = (torch.randn(N, device=device) * 0.1).to(dtype)
        dy = torch.randn(M, N, device=device, dtype=dtype)
        inputs = [t.requires_grad_() for t in (x, w, a, b)]

        errors = _max_rel_errors(gated_linear_triton, reference.gated_linear, inputs, dy)
        correctness.append({"shape": shape, "M": M, "N": N, "K": K, "max_rel_err": errors})

        for method in args.methods:
            op = ops[method]
            used = [x, w, b] if method == "linear" else inputs
            for mode in args.modes:
                if mode == "fwd":
                    fn = lambda op=op: op(x, w, a, b)
                else:
                    # autograd.grad returns fresh gradients: no accumulation into .grad.
                    fn = lambda op=op, used=used: torch.autograd.grad(op(x, w, a, b), used, dy)
                times = timer(fn)
                median = statistics.median(times)
                flops = 2 * M * N * K * (1 if mode == "fwd" else 3)
                results.append({
                    "shape": shape, "M": M, "N": N, "K": K, "method": method, "mode": mode,
                    "median_ms": median,
                    "quantiles_ms": common.quantiles_ms(times),
                    "tflops": flops / (median * 1e-3) / 1e12 if median > 0 else None,
                    "times_ms": times,
                })
                print(f"  {shape:>8} {mode:>7} {method:>8}: {median:9.4f} ms", file=sys.stderr)

    for r in results:
        floor = next((f["median_ms"] for f in results if f["method"] == "linear"
                      and f["shape"] == r["shape"] and f["mode"] == r["mode"]), None)
        r["vs_linear"] = r["median_ms"] / floor if floor else None

    created = common.now()
    name = args.name or common.timestamped_stem("bench_gated_linear", device_name, created)
    record = {
        **common.record_head("gated_linear", __file__, argv, smoke=args.smoke, device=device_name,
                             packages=("torch", "triton", "python"), created=created),
        "dtype": args.dtype,
        "batch": args.batch,
        "tokens": args.tokens,
        "timer": "time.perf_counter" if args.smoke else "triton.testing.do_bench (CUDA events, L2 flushed)",
        "compile_backend": args.compile_backend,
        "methods": args.methods,
        "modes": args.modes,
        "correctness": correctness,
        "results": results,
    }
    json_path = common.write_json(args.out / f"{name}.json", record)
    print(_table(record))
    print(f"record: {json_path}")
    if not args.no_plot:
        png_path = args.out / f"{name}.png"
        _plot(record, png_path)
        print(f"plot:   {png_path}")
    return record


def _max_rel_errors(op, reference_op, inputs, dy):
    """max |op - ref| / max |ref| of the output and of every gradient; ref runs in fp32 on
    the same values, so the error is the op's own (accumulation and output rounding)."""
    import torch

    y = op(*inputs)
    grads = torch.autograd.grad(y, inputs, dy)
    exact = [t.detach().float().requires_grad_() for t in inputs]
    y_ref = reference_op(*exact)
    grads_ref = torch.autograd.grad(y_ref, exact, dy.float())
    names = ("y", "dx", "dweight", "dgate", "dbias")
    return {
        n: ((o.float() - r).abs().max() / r.abs().max().clamp_min(1e-30)).item()
        for n, o, r in zip(names, (y, *grads), (y_ref, *grads_ref))
    }


def _table(record):
    methods, rows = record["methods"], []
    header = f"{'shape':>8} {'M x K -> N':>18} {'mode':>7} " + " ".join(f"{m:>9}" for m in methods)
    if "linear" in methods:
        header += "  triton/linear"
    rows.append(f"median ms, {record['dtype']}, {record['device']}")
    rows.append(header)
    keys = dict.fromkeys((r["shape"], r["M"], r["K"], r["N"], r["mode"]) for r in record["results"])
    for shape, M, K, N, mode in keys:
        cell = {r["method"]: r for r in record["results"] if r["shape"] == shape and r["mode"] == mode}
        line = f"{shape:>8} {f'{M}x{K}->{N}':>18} {mode:>7} " + " ".join(
            f"{cell[m]['median_ms']:9.4f}" for m in methods)
        if "linear" in methods and "triton" in cell:
            line += f"  {cell['triton']['vs_linear']:13.3f}"
        rows.append(line)
    rows.append("max relative error of triton vs fp32 reference:")
    for c in record["correctness"]:
        rows.append(f"{c['shape']:>8} " + " ".join(f"{k}={v:.2e}" for k, v in c["max_rel_err"].items()))
    return "\n".join(rows)


def _plot(record, path):
    plt = common.pyplot()
    shapes = list(dict.fromkeys(r["shape"] for r in record["results"]))
    methods, modes = record["methods"], record["modes"]
    fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 4), squeeze=False)
    width = 0.8 / len(methods)
    for ax, mode in zip(axes[0], modes):
        for i, method in enumerate(methods):
            medians = [next(r["median_ms"] for r in record["results"]
                            if r["shape"] == s and r["mode"] == mode and r["method"] == method) for s in shapes]
            ax.bar([j + (i - (len(methods) - 1) / 2) * width for j in range(len(shapes))],
                   medians, width, label=method)
        ax.set_xticks(range(len(shapes)), [f"{s}\n{r['K']}->{r['N']}" for s in shapes
                                            for r in [next(r for r in record["results"] if r["shape"] == s)]])
        ax.set_ylabel("median time (ms)")
        ax.set_title(f"{mode}, M={record['batch'] * record['tokens']}, {record['dtype']}")
        ax.legend(fontsize=8)
    fig.suptitle(f"gated linear: {record['device']}", fontsize=10)
    common.save_figure(fig, path)


if __name__ == "__main__":
    main()
