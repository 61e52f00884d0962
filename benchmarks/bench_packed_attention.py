"""Benchmark attention with per-head value widths (vtp_kernels.packed_attention).

Shapes: the attention of DeiT-S (6 heads) and DeiT-B (12 heads), head dim 64, at batch 256
and 197 tokens, bf16, after a VTP prune of the ``attn_out`` gate: per-head value widths
drawn from one global threshold over random gate scores (default 40 % removed, at least
one head dropped). Dropped heads are removed from q and k as well, as ``vtp.prune`` does;
q, k and v are strided views of one pruned qkv output ``[B, N, 2*H*D + sum(widths)]``.
Variants, forward and forward+backward (gradient w.r.t. that qkv tensor):

    triton     the packed-V flash kernel (what the "triton" backend runs)
    reference  pad V to a uniform width, F.scaled_dot_product_attention, gather back
    compiled   torch.compile(reference)
    dense      F.scaled_dot_product_attention on the unpruned shape (all heads at
               width 64, qkv [B, N, 3*H*D]): what the unpruned model pays

With ``--qk-widths`` the run adds pruned query/key widths (``attn_qk``, issue 17): q and k
Dqk wide under the same pruned values (up to 64 wide), with the variants triton, reference
(q/k padded with zero columns to the value width, then SDPA), sdpa_unequal (SDPA on the
unequal widths as they are: whichever kernel torch picks), and triton_gated /
reference_gated (the attn_qk gate inside the kernel, against ``q * gate`` before SDPA,
the gate's gradient included); and it records which SDPA kernels take unequal widths
(``qk.sdpa_backends``: each forced with ``sdpa_kernel``, runs or the error).

The kernel output and gradient are checked against an fp32 reference before anything is
timed. Timings are triton.testing.do_bench (L2 flushed between runs); every raw timing is
kept. Writes a table to stdout and packed_attention_<device>.json / .png into --out.

    python benchmarks/bench_packed_attention.py                        # on a GPU
    python benchmarks/bench_packed_attention.py --smoke --out /tmp/pa  # CPU, interpreter
    python benchmarks/bench_packed_attention.py --qk-widths 16 32 48   # also Dqk != V widths
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from typing import Dict, List, Sequence, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # common.py, also when loaded by path
import common  # noqa: E402  (puts the repository root on sys.path too)

MODELS = {"deit_s": 6, "deit_b": 12}            # heads; both have head dim 64
VARIANTS = ("triton", "reference", "compiled", "dense")


def parse_args(argv=None):
    p = common.parser(__doc__, argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["deit_s", "deit_b"],
                   help="attention shapes to run: deit_s (6 heads) and/or deit_b (12 heads), head dim 64")
    p.add_argument("--batch", type=int, default=256, help="images per batch B")
    p.add_argument("--tokens", type=int, default=197, help="tokens per image N (196 patches + class token)")
    p.add_argument("--head-dim", type=int, default=64, help="q/k head dim D, and the unpruned value width per head")
    p.add_argument("--prune", type=float, default=0.4,
                   help="share of all value dims (heads x head dim) removed by the global threshold")
    p.add_argument("--dropped-heads", type=int, default=1,
                   help="heads whose gate scores are forced below the threshold (whole heads removed)")
    p.add_argument("--round-to", type=int, default=1,
                   help="round every kept width up to a multiple of this (8 keeps tensor cores fed); 1 = off")
    p.add_argument("--dtype", choices=sorted(common.DTYPES), default="bf16", help="dtype of q, k, v")
    common.add_do_bench_flags(p)
    p.add_argument("--compile-backend", default=None,
                   help="torch.compile backend for the 'compiled' variant (default: inductor; aot_eager with --smoke)")
    p.add_argument("--seed", type=int, default=0, help="random seed for the width pattern and the inputs")
    p.add_argument("--qk-widths", type=int, nargs="*", default=[],
                   help="also time q/k pruned to each of these widths (Dqk) under the pruned values (--smoke: "
                        "scaled from head dim 64 to 16)")
    common.add_output_flags(p, smoke_help="CPU check of the script itself: tiny shapes (B=1, N=13, D=16), fp32, few "
                                          "iterations, Triton under TRITON_INTERPRET=1, wall-clock timing; its "
                                          "numbers are not kernel speeds")
    args = p.parse_args(argv)
    if args.smoke:
        args.batch, args.tokens, args.head_dim, args.dtype = 1, 13, 16, "fp32"
        args.warmup, args.rep = min(args.warmup, 1), min(args.rep, 3)
        args.compile_backend = args.compile_backend or "aot_eager"
    args.compile_backend = args.compile_backend or "inductor"
    if any(w < 0 or w > 64 for w in args.qk_widths):
        p.error(f"--qk-widths: expected widths in [0, 64] (of DeiT's head dim 64), got {args.qk_widths}")
    if args.smoke:
        args.qk_widths = sorted({w * args.head_dim // 64 for w in args.qk_widths})
    return args


# ---------------------------------------------------------------------------------------
# The pruned width pattern
# ---------------------------------------------------------------------------------------
def pruned_widths(torch, heads: int, head_dim: int, prune: float, dropped: int, round_to: int,
                  generator) -> List[int]:
    """Per-head kept value widths after one global threshold over random gate scores.

    Gate scores after sparse training differ more between heads than within one, so each
    head gets a log-normal scale times |N(0, 1)| per dim; ``dropped`` heads get scale 0
    (their dims fall first). The threshold removes ``round(prune * heads * head_dim)`` dims.
    """
    scale = torch.randn(heads, 1, generator=generator).exp()
    scale[torch.randperm(heads, generator=generator)[:dropped]] = 0.0
    scores = scale * torch.randn(heads, head_dim, generator=generator).abs()
    removed = min(round(prune * heads * head_dim), heads * head_dim)
    keep = torch.ones(heads * head_dim, dtype=torch.bool)
    keep[scores.flatten().argsort()[:removed]] = False
    widths = keep.view(heads, head_dim).sum(1).tolist()
    return [min(head_dim, -(-w // round_to) * round_to) for w in widths]


# ---------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------
def rel_err(got, want) -> float:
    """Error norm relative to the reference norm."""
    got, want = got.detach().float(), want.detach().float()
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def split_qkv(qkv, heads: int, head_dim: int):
    """q, k [B, H, N, D] and v [B, N, rest] as views of qkv [B, N, 2*H*D + rest]."""
    B, N, _ = qkv.shape
    hd = heads * head_dim
    q = qkv[..., :hd].view(B, N, heads, head_dim).transpose(1, 2)
    k = qkv[..., hd:2 * hd].view(B, N, heads, head_dim).transpose(1, 2)
    return q, k, qkv[..., 2 * hd:]


def run_model(torch, F, args, name: str, device, dtype, timer, generator) -> Tuple[Dict, List[Dict]]:
    from vtp_kernels import reference
    from vtp_kernels._packed_attention import packed_attention_triton

    heads, D, B, N = MODELS[name], args.head_dim, args.batch, args.tokens
    widths_all = pruned_widths(torch, heads, D, args.prune, args.dropped_heads, args.round_to, generator)
    widths = tuple(w for w in widths_all if w > 0)         # dropped heads leave q and k too
    H, v_total = len(widths), sum(widths)

    qkv = torch.randn(B, N, 2 * H * D + v_total, device=device).to(dtype).requires_grad_()
    dout = torch.randn(B, N, v_total, device=device).to(dtype)
    qkv_dense = torch.randn(B, N, 3 * heads * D, device=device).to(dtype).requires_grad_()
    dout_dense = torch.randn(B, N, heads * D, device=device).to(dtype)

    def dense(qkv):
        q, k, v = qkv.view(B, N, 3, heads, D).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, heads * D)

    def reference_fn(qkv):
        return reference.packed_attention(*split_qkv(qkv, H, D), widths)

    compiled = torch.compile(reference_fn, backend=args.compile_backend)
    variants = {
        "triton": lambda qkv: packed_attention_triton(*split_qkv(qkv, H, D), widths),
        "reference": reference_fn,
        "compiled": compiled,
        "dense": dense,
    }

    # Correctness first: the kernel against the reference in fp32 on the same (upcast) values.
    qkv32 = qkv.detach().float().requires_grad_()
    want = reference_fn(qkv32)
    (want_grad,) = torch.autograd.grad(want, qkv32, dout.float())
    got = variants["triton"](qkv)
    (got_grad,) = torch.autograd.grad(got, qkv, dout)
    checks = {"out": rel_err(got, want), "dqkv": rel_err(got_grad, want_grad)}
    # bf16 rounds P, V, dO and the outputs to 8 bits (2**-8 ~ 4e-3 per element); fp16 to 11.
    bound = {torch.bfloat16: 2e-2, torch.float16: 4e-3, torch.float32: 1e-4}[dtype]
    common.require_within(checks, bound, f"{name}: triton packed_attention", "error norm / reference norm")

    results = []
    for mode in ("fwd", "fwd+bwd"):
        for variant, fn in variants.items():
            x, g = (qkv_dense, dout_dense) if variant == "dense" else (qkv, dout)
            if mode == "fwd":
                def step(fn=fn, x=x):
                    with torch.no_grad():
                        fn(x)
            else:
                def step(fn=fn, x=x, g=g):
                    torch.autograd.grad(fn(x), x, g)
            step()                                          # compile / autotune outside the timing
            raw = timer(step, args.warmup, args.rep)
            results.append({"model": name, "variant": variant, "mode": mode,
                            "median_ms": statistics.median(raw), "raw_ms": raw})
    shape = {"heads": heads, "kept_heads": H, "head_dim": D, "batch": B, "tokens": N,
             "v_widths": widths_all, "v_total": v_total, "kept_share": v_total / (heads * D)}
    return {"shape": shape, "max_rel_err": checks, "bound": bound}, results


def main(argv=None) -> Dict[str, object]:
    args = parse_args(argv)
    torch, device = common.setup(args.smoke, args.seed)  # before vtp_kernels is imported
    import torch.nn.functional as F

    dtype = getattr(torch, common.DTYPES[args.dtype])
    generator = torch.Generator().manual_seed(args.seed)
    timer = common.wall_clock_ms if args.smoke else common.do_bench_ms

    models, results = {}, []
    for name in args.models:
        models[name], model_results = run_model(torch, F, args, name, device, dtype, timer, generator)
        results += model_results

    qk = run_qk_widths(torch, F, args, device, dtype, timer, generator) if args.qk_widths else None
    record = {
        **common.record_head("packed_attention", __file__, argv, smoke=args.smoke,
                             device=common.device_name(torch, device), packages=("python", "torch", "triton", "cuda")),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
        "config": {"models": args.models, "batch": args.batch, "tokens": args.tokens, "head_dim": args.head_dim,
                   "prune": args.prune, "dropped_heads": args.dropped_heads, "round_to": args.round_to,
                   "dtype": args.dtype, "warmup": args.warmup, "rep": args.rep,
                   "compile_backend": args.compile_backend, "seed": args.seed,
                   "timer": common.TIMER_WALL_CLOCK if args.smoke else common.TIMER_DO_BENCH},
        "models": models,
        "correctness": {name: {"rel_err": m["max_rel_err"], "bound": m["bound"]} for name, m in models.items()},
        "results": results,
        "medians_ms": {f"{r['model']}/{r['mode']}/{r['variant']}": r["median_ms"] for r in results},
        **({"qk": qk} if qk is not None else {}),
    }

    print(f"packed_attention  B={args.batch} N={args.tokens} D={args.head_dim} {args.dtype}  on {record['device']}"
          + common.smoke_suffix(args.smoke, "  [smoke: interpreter, not kernel speeds]"))
    for name, m in models.items():
        s = m["shape"]
        print(f"  {name}: widths {s['v_widths']} (kept {s['v_total']}/{s['heads'] * s['head_dim']}, "
              f"{s['kept_heads']}/{s['heads']} heads); rel err out {m['max_rel_err']['out']:.2e}, "
              f"dqkv {m['max_rel_err']['dqkv']:.2e}")
    print(f"{'model':<8}{'mode':<9}{'variant':<11}{'median ms':>11}{'vs reference':>14}{'vs dense':>10}")
    for r in results:
        key = f"{r['model']}/{r['mode']}/"
        ref, dense = record["medians_ms"][key + "reference"], record["medians_ms"][key + "dense"]
        print(f"{r['model']:<8}{r['mode']:<9}{r['variant']:<11}{r['median_ms']:>11.4f}"
              f"{ref / r['median_ms']:>13.2f}x{dense / r['median_ms']:>9.2f}x")

    if qk is not None:
        print_qk(qk)
    stem = common.output_stem(args.out, "packed_attention", args.smoke, record["device"])
    common.save_record(record, stem, None if args.no_plot else plot)
    return record


def plot(record: Dict[str, object], path: str) -> None:
    plt = common.pyplot()
    models: Sequence[str] = record["config"]["models"]
    modes = ("fwd", "fwd+bwd")
    fig, axes = plt.subplots(len(models), 2, figsize=(9, 3.4 * len(models)), squeeze=False)
    for row, name in enumerate(models):
        for ax, mode in zip(axes[row], modes):
            common.bar_panel(ax, VARIANTS, [record["medians_ms"][f"{name}/{mode}/{v}"] for v in VARIANTS])
            ax.set_title(f"{name} {mode}", fontsize=9)
    c = record["config"]
    fig.suptitle(f"packed_attention B={c['batch']} N={c['tokens']} D={c['head_dim']} prune={c['prune']} "
                 f"{c['dtype']} on {record['device']}" + common.smoke_suffix(record["smoke"]), fontsize=9)
    common.save_figure(fig, path)



# ---------------------------------------------------------------------------------------
# Pruned query/key widths (attn_qk): Dqk != value widths
# ---------------------------------------------------------------------------------------
QK_VARIANTS = ("triton", "reference", "sdpa_unequal", "triton_gated", "reference_gated")
SDPA_BACKENDS = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH")


def sdpa_backends_for_unequal_widths(torch, F, device, dtype, dqk: int, dv: int) -> Dict[str, str]:
    """Each SDPA kernel forced in turn on q/k ``dqk`` wide and v ``dv`` wide: "runs", or
    the first line of its error."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(2, 2, 16, dqk, device=device, dtype=dtype)
    v = torch.randn(2, 2, 16, dv, device=device, dtype=dtype)
    verdicts = {}
    for name in SDPA_BACKENDS:
        try:
            with sdpa_kernel(getattr(SDPBackend, name)), torch.no_grad():
                F.scaled_dot_product_attention(q, q, v)
            verdicts[name] = "runs"
        except RuntimeError as e:
            verdicts[name] = str(e).strip().splitlines()[0]
    return verdicts


def qk_variants(torch, F, heads: int, dqk: int, widths: Tuple[int, ...], head_dim: int, gate):
    """Every QK_VARIANTS entry as a function of qkv ``[B, N, 2*H*Dqk + sum(widths)]``; the
    scale stays the unpruned model's (head_dim ** -0.5), as pruning leaves it."""
    from vtp_kernels import reference
    from vtp_kernels._packed_attention import packed_attention_triton

    scale = head_dim ** -0.5
    cols_cache = {}

    def sdpa_unequal(qkv):
        q, k, v = split_qkv(qkv, heads, dqk)
        B, N, _ = v.shape
        width = max(widths)
        if "cols" not in cols_cache:
            cols_cache["cols"] = reference.padded_value_columns(widths, width, v.device)
        cols = cols_cache["cols"]
        v = v.new_zeros(B, N, heads * width).index_copy(-1, cols, v).view(B, N, heads, width).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, scale=scale).transpose(1, 2).reshape(B, N, heads * width)
        return torch.gather(out, -1, cols.expand(B, N, len(cols)))

    return {
        "triton": lambda qkv: packed_attention_triton(*split_qkv(qkv, heads, dqk), widths, scale),
        "reference": lambda qkv: reference.packed_attention(*split_qkv(qkv, heads, dqk), widths, scale),
        "sdpa_unequal": sdpa_unequal,
        "triton_gated": lambda qkv: packed_attention_triton(*split_qkv(qkv, heads, dqk), widths, scale, gate),
        "reference_gated": lambda qkv: reference.packed_attention(*split_qkv(qkv, heads, dqk), widths, scale,
                                                                  qk_gate=gate),
    }


def run_qk_widths(torch, F, args, device, dtype, timer, generator) -> Dict[str, object]:
    """For each model and each Dqk in --qk-widths: the kernel against the reference (fp32,
    gradients of qkv and of the gate included), then every variant timed, forward and
    forward + backward. Value widths are the same pruned pattern as the main run's."""
    bound = {torch.bfloat16: 2e-2, torch.float16: 4e-3, torch.float32: 1e-4}[dtype]
    D, B, N = args.head_dim, args.batch, args.tokens
    record = {"qk_widths": list(args.qk_widths), "bound": bound, "cases": {}, "results": [],
              "sdpa_backends": {f"dqk{w}_dv{D}": sdpa_backends_for_unequal_widths(torch, F, device, dtype, w, D)
                                for w in args.qk_widths if w != D}}
    for name in args.models:
        heads = MODELS[name]
        widths_all = pruned_widths(torch, heads, D, args.prune, args.dropped_heads, args.round_to, generator)
        widths = tuple(w for w in widths_all if w > 0)
        H, v_total = len(widths), sum(widths)
        for dqk in args.qk_widths:
            key = f"{name}/dqk{dqk}"
            qkv = torch.randn(B, N, 2 * H * dqk + v_total, device=device).to(dtype).requires_grad_()
            gate = (torch.rand(H, 1, dqk, device=device) + 0.5).requires_grad_()
            dout = torch.randn(B, N, v_total, device=device).to(dtype)
            variants = qk_variants(torch, F, H, dqk, widths, D, gate)
            checks = {}
            for kernel, ref in (("triton", "reference"), ("triton_gated", "reference_gated")):
                qkv32 = qkv.detach().float().requires_grad_()
                want = variants[ref](qkv32)
                want_grads = torch.autograd.grad(want, [qkv32] + ([gate] if "gated" in kernel else []), dout.float())
                got = variants[kernel](qkv)
                got_grads = torch.autograd.grad(got, [qkv] + ([gate] if "gated" in kernel else []), dout)
                checks[f"{kernel}/out"] = rel_err(got, want)
                for label, g, w in zip(("dqkv", "dgate"), got_grads, want_grads):
                    checks[f"{kernel}/{label}"] = rel_err(g, w)
            common.require_within(checks, bound, f"{key}: triton packed_attention", "error norm / reference norm")
            for mode in ("fwd", "fwd+bwd"):
                for variant, fn in variants.items():
                    inputs = [qkv, gate] if "gated" in variant else [qkv]
                    if mode == "fwd":
                        def step(fn=fn):
                            with torch.no_grad():
                                fn(qkv)
                    else:
                        def step(fn=fn, inputs=inputs):
                            torch.autograd.grad(fn(qkv), inputs, dout)
                    step()
                    raw = timer(step, args.warmup, args.rep)
                    record["results"].append({"model": name, "dqk": dqk, "variant": variant, "mode": mode,
                                              "median_ms": statistics.median(raw), "raw_ms": raw})
            record["cases"][key] = {"heads": heads, "kept_heads": H, "dqk": dqk, "v_widths": widths_all,
                                    "rel_err": checks}
    record["medians_ms"] = {f"{r['model']}/dqk{r['dqk']}/{r['mode']}/{r['variant']}": r["median_ms"]
                            for r in record["results"]}
    return record


def print_qk(qk: Dict[str, object]) -> None:
    for case, verdicts in qk["sdpa_backends"].items():
        print(f"  SDPA on {case}: " + "; ".join(f"{b} {v}" for b, v in verdicts.items()))
    print(f"{'model/Dqk':<16}{'mode':<9}" + "".join(f"{v:>16}" for v in QK_VARIANTS) + "   (median ms)")
    for key in qk["cases"]:
        for mode in ("fwd", "fwd+bwd"):
            print(f"{key:<16}{mode:<9}" + "".join(f"{qk['medians_ms'][f'{key}/{mode}/{v}']:>16.4f}"
                                                  for v in QK_VARIANTS))


if __name__ == "__main__":
    main()
