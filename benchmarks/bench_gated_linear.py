"""Microbenchmark of the gated linear layer ``y = (x * a) @ W.T + b`` on DeiT-B shapes.

Compares, forward and forward+backward:

    linear     nn.Linear without a gate: the floor a gated layer can reach
    eager      F.linear(x * a, W, b): the gate on the activations, as written naively
    folded     F.linear(x, W * a, b): the gate on the weight (vtp_kernels.reference)
    compiled   torch.compile of the folded form
    triton     vtp_kernels._gated_linear.gated_linear_triton

Each shape is first checked against the fp64 reference on the same (upcast) inputs, every
kernel output pre-filled with NaN; the relative error norms of the output and of every
gradient go into the record, and a case out of bounds ends the run before any timing.
Timings are ``triton.testing.do_bench`` (CUDA events, warm-up, L2 flushed between runs);
every raw timing is kept. Results: a table on stdout, ``<name>.json`` and ``<name>.png`` in
--out.

gpu_check.py runs the same cases, checks and timed run (``config_cases``,
``correctness_cases``, ``production_cases``, ``correctness``, ``run``).

    python benchmarks/bench_gated_linear.py                   # GPU: DeiT-B, batch 256, bf16
    python benchmarks/bench_gated_linear.py --smoke --out /tmp/b   # CPU, interpreter, seconds
"""
import os
import sys
from pathlib import Path
from typing import Dict, List, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the harness, also when loaded by path
from harness import RESULTS, arguments, checks, environment, records, timing  # noqa: E402

OP = "gated_linear"
# in_features K, out_features N of the four linear layers of a DeiT-B block.
DEIT_B_LINEARS = {"qkv": (768, 2304), "proj": (768, 768), "fc1": (768, 3072), "fc2": (3072, 768)}
SMOKE_LINEARS = {"smoke_a": (40, 24), "smoke_b": (70, 33)}
VARIANTS = {"linear": "floor", "eager": "alternative", "folded": "alternative", "compiled": "alternative",
            "triton": "candidate"}
REFERENCE = "folded"  # the variant that computes what the kernel computes, in PyTorch
MODES = timing.MODES


# ---------------------------------------------------------------------------------------
# Cases: data
# ---------------------------------------------------------------------------------------
def case(label: str, dtype: str, **params) -> Dict[str, object]:
    """One case: rows M, in_features K, out_features N; ``autocast``: fp32 parameters under
    autocast to ``dtype`` (as in training); ``repeat``: check the gradients repeat bitwise."""
    return {"op": OP, "label": label, "dtype": dtype, "params": params}


def config_cases(smoke: bool) -> List[Dict[str, object]]:
    """None: the gated linear has no autotuned kernel (its two N x K kernels have one tile)."""
    return []


def correctness_cases(smoke: bool, dtype: str, rows: int) -> List[Dict[str, object]]:
    """At DeiT-B widths (``rows`` = 16 images of tokens) and at ragged small shapes; in bf16
    also the production setting, fp32 parameters under bf16 autocast. --smoke: one of each,
    and in fp16 only the first."""
    linears = {"40x24": (40, 24)} if smoke else DEIT_B_LINEARS
    out = [case(f"{name} M={rows}", dtype, M=rows, K=K, N=N, repeat=True) for name, (K, N) in linears.items()]
    ragged = ((5, 7, 13),) if smoke else ((111, 40, 24), (5, 7, 13), (1, 1, 1))
    if not (smoke and dtype == "fp16"):
        out += [case(f"M={m} K={k} N={n}", dtype, M=m, K=k, N=n) for m, k, n in ragged]
    if dtype == "bf16":
        out += [case(f"{name} M={rows} bf16 autocast, fp32 parameters", "bf16", M=rows, K=K, N=N, autocast=True,
                     repeat=True) for name, (K, N) in linears.items()]
    return out


def production_cases(smoke: bool) -> List[Dict[str, object]]:
    """The four linears of a DeiT-B block at batch 256, fp32 parameters under bf16 autocast
    (--smoke: one small layer in fp32)."""
    if smoke:
        return [case("40x72", "fp32", M=2 * 13, K=40, N=72, autocast=False)]
    return [case(name, "bf16", M=256 * 197, K=K, N=N, autocast=True) for name, (K, N) in DEIT_B_LINEARS.items()]


# ---------------------------------------------------------------------------------------
# Inputs, check and timed run
# ---------------------------------------------------------------------------------------
def inputs(torch, device, dtype, p, empty=False):
    """x, weight, gate, bias, dy: random, never zero, at the scales of a trained layer (the
    gate away from 0, so no product vanishes); fp32 parameters when the case runs under
    autocast. ``empty``: uninitialised tensors of the same shapes (compile-only runs)."""
    new = torch.empty if empty else torch.randn
    param_dtype = torch.float32 if p.get("autocast") else dtype
    M, K, N = p["M"], p["K"], p["N"]
    x = new(M, K, device=device).to(dtype)
    w = (new(N, K, device=device) * max(K, 1) ** -0.5).to(param_dtype)
    a = (new(K, device=device) if empty else torch.empty(K, device=device).uniform_(0.5, 1.5)).to(param_dtype)
    b = (0.1 * new(N, device=device)).to(param_dtype)
    return x, w, a, b, new(M, N, device=device).to(dtype)


def _autocast(torch, device, dtype, enabled: bool, fn):
    def run(*args):
        with torch.autocast(device.type, dtype=dtype, enabled=enabled):
            return fn(*args)
    return run


def correctness(torch, device, c: Dict[str, object]) -> Dict[str, object]:
    """The Triton op against the fp64 reference (harness.checks.against_fp64); judged."""
    from vtp_kernels import reference
    from vtp_kernels._gated_linear import gated_linear_triton

    p, dtype = c["params"], environment.dtype_of(torch, c["dtype"])
    *leaves, dy = inputs(torch, device, dtype, p)
    op = _autocast(torch, device, dtype, bool(p.get("autocast")), gated_linear_triton)
    result = checks.against_fp64(torch, op, reference.gated_linear, leaves, dy, ("y", "dx", "dweight", "dgate", "dbias"),
                                 repeatable=("dweight", "dgate"), repeat=bool(p.get("repeat")))
    return checks.judge(result, c["dtype"])


def prepare(torch, device, c: Dict[str, object], compile_backend: str, names: Sequence[str] = tuple(VARIANTS),
            dynamic: bool = False) -> Dict[str, object]:
    """The variants ``names`` of case ``c`` on fresh inputs: {variants, roles, inputs, grads,
    extra, leaves}. ``dynamic``: compile one graph for every shape (gpu_check times four
    shapes in one process) instead of one per shape, as training does."""
    import torch.nn.functional as F

    from vtp_kernels import reference
    from vtp_kernels._gated_linear import gated_linear_triton

    p, dtype = c["params"], environment.dtype_of(torch, c["dtype"])
    x, w, a, b, dy = inputs(torch, device, dtype, p)
    leaves = tuple(t.requires_grad_() for t in (x, w, a, b))
    compiled = torch.compile(reference.gated_linear, backend=compile_backend, dynamic=dynamic)
    every = {"linear": lambda x, w, a, b: F.linear(x, w, b), "eager": lambda x, w, a, b: F.linear(x * a, w, b),
             "folded": reference.gated_linear, "compiled": compiled, "triton": gated_linear_triton}
    variants = {n: _autocast(torch, device, dtype, bool(p.get("autocast")), every[n]) for n in names}
    return {"variants": variants, "roles": {n: VARIANTS[n] for n in names}, "inputs": {n: leaves for n in names},
            "grads": {n: dy for n in names}, "extra": {k: p[k] for k in ("M", "K", "N")}, "leaves": leaves}


def run(torch, device, c: Dict[str, object], timer: timing.Timer, *, compile_backend: str,
        names: Sequence[str] = tuple(VARIANTS), modes: Sequence[str] = MODES, rounds: int = 2,
        dynamic: bool = False, sync=lambda: None):
    """Case ``c`` timed: rows (op, case, mode, dtype, variant, role, M, K, N, summary) and
    the variants that failed."""
    prepared = prepare(torch, device, c, compile_backend, names, dynamic)
    return timing.time_case(torch, c, prepared, timer, modes=modes, rounds=rounds, sync=sync)


# ---------------------------------------------------------------------------------------
# The script
# ---------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = arguments.parser(__doc__)
    p.add_argument("--smoke", action="store_true",
                   help="CPU check of the whole script in seconds: tiny shapes, fp32, Triton "
                        "under TRITON_INTERPRET=1, time.perf_counter instead of CUDA events. "
                        "Its timings say nothing about speed.")
    p.add_argument("--out", type=Path, default=Path(RESULTS),
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
    p.add_argument("--methods", default=",".join(VARIANTS),
                   help=f"comma-separated subset of {','.join(VARIANTS)} (default: all)")
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
    args.methods = arguments.subset(args.methods, VARIANTS, "--methods")
    args.modes = arguments.subset(args.modes, MODES, "--modes")
    if args.shapes:
        args.shapes = {f"{k}x{n}": (int(k), int(n)) for k, n in (pair.split(":") for pair in args.shapes.split(","))}
    else:
        args.shapes = SMOKE_LINEARS if smoke else DEIT_B_LINEARS
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    # Before vtp_kernels._gated_linear decorates its kernels (the interpreter in --smoke mode).
    torch, device = environment.setup(
        args.smoke, args.seed, "bench_gated_linear: no CUDA device; use --smoke for a CPU check of the script")

    device_name = environment.device_name(torch, device) + (", TRITON_INTERPRET=1" if args.smoke else "")
    cuda = device.type == "cuda"
    # One untimed call per measurement first (compilation, autotuning, first-call costs).
    timer = timing.kernel_timer(True, args.warmup_ms, args.rep_ms) if cuda else \
        timing.kernel_timer(False, 0, args.repeats)
    M = args.batch * args.tokens
    cases = [case(shape, args.dtype, M=M, K=K, N=N) for shape, (K, N) in args.shapes.items()]
    results, correctness_rows = [], []
    for c in cases:
        shape, (K, N) = c["label"], args.shapes[c["label"]]
        check = correctness(torch, device, c)
        correctness_rows.append({"shape": shape, "M": M, "N": N, "K": K, "rel_err": check["errors"],
                                 "bound": check["bound"]})
        checks.require_within(check["errors"], check["bound"], f"triton gated_linear {shape}",
                              "error norm / fp64 reference norm")
        rows, failures = run(torch, device, c, timer, compile_backend=args.compile_backend, names=args.methods,
                             modes=args.modes, rounds=1, sync=torch.cuda.synchronize if cuda else lambda: None)
        if failures:
            raise SystemExit(f"bench_gated_linear: variants failed: {failures}")
        for r in rows:
            flops = 2 * M * N * K * (1 if r["mode"] == "fwd" else 3)
            median = r["median_ms"]
            results.append({"shape": shape, "M": M, "N": N, "K": K, "method": r["variant"], "mode": r["mode"],
                            "median_ms": median, "quantiles_ms": r["quantiles_ms"],
                            "tflops": flops / (median * 1e-3) / 1e12 if median > 0 else None,
                            "times_ms": timing.raw_ms(r)})
            print(f"  {shape:>8} {r['mode']:>7} {r['variant']:>8}: {median:9.4f} ms", file=sys.stderr)

    for r in results:
        floor = next((f["median_ms"] for f in results if f["method"] == "linear"
                      and f["shape"] == r["shape"] and f["mode"] == r["mode"]), None)
        r["vs_linear"] = r["median_ms"] / floor if floor else None

    created = records.now()
    name = args.name or records.timestamped_stem("bench_gated_linear", device_name, created)
    record = {
        **records.record_head("gated_linear", __file__, argv, smoke=args.smoke, device=device_name,
                              packages=("torch", "triton", "python"), created=created),
        "dtype": args.dtype,
        "batch": args.batch,
        "tokens": args.tokens,
        "timer": "time.perf_counter" if args.smoke else "triton.testing.do_bench (CUDA events, L2 flushed)",
        "compile_backend": args.compile_backend,
        "methods": args.methods,
        "modes": args.modes,
        "correctness": correctness_rows,
        "results": results,
    }
    json_path = records.write_json(args.out / f"{name}.json", record)
    print(_table(record))
    print(f"record: {json_path}")
    if not args.no_plot:
        png_path = args.out / f"{name}.png"
        _plot(record, png_path)
        print(f"plot:   {png_path}")
    return record


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
    rows.append("relative error norm of triton vs the fp64 reference:")
    for c in record["correctness"]:
        rows.append(f"{c['shape']:>8} " + " ".join(f"{k}={v:.2e}" for k, v in c["rel_err"].items()))
    return "\n".join(rows)


def _plot(record, path):
    plt = records.pyplot()
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
    records.save_figure(fig, path)


if __name__ == "__main__":
    main()
