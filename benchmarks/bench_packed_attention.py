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

The kernel output and gradient are checked against an fp32 reference before anything is
timed. Timings are triton.testing.do_bench (L2 flushed between runs); every raw timing is
kept. Writes a table to stdout and packed_attention_<device>.json / .png into --out.

    python benchmarks/bench_packed_attention.py                        # on a GPU
    python benchmarks/bench_packed_attention.py --smoke --out /tmp/pa  # CPU, interpreter
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
from typing import Callable, Dict, List, Sequence, Tuple

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
MODELS = {"deit_s": 6, "deit_b": 12}            # heads; both have head dim 64
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
VARIANTS = ("triton", "reference", "compiled", "dense")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
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
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="dtype of q, k, v")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warm-up time in ms (--smoke: warm-up iterations)")
    p.add_argument("--rep", type=int, default=200, help="do_bench measuring time in ms (--smoke: timed iterations)")
    p.add_argument("--compile-backend", default=None,
                   help="torch.compile backend for the 'compiled' variant (default: inductor; aot_eager with --smoke)")
    p.add_argument("--seed", type=int, default=0, help="random seed for the width pattern and the inputs")
    p.add_argument("--out", default=DEFAULT_OUT, help="folder for the JSON record and the PNG plot")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG (JSON and table only)")
    p.add_argument("--smoke", action="store_true",
                   help="CPU check of the script itself: tiny shapes (B=1, N=13, D=16), fp32, few iterations, "
                        "Triton under TRITON_INTERPRET=1, wall-clock timing; its numbers are not kernel speeds")
    args = p.parse_args(argv)
    if args.smoke:
        args.batch, args.tokens, args.head_dim, args.dtype = 1, 13, 16, "fp32"
        args.warmup, args.rep = min(args.warmup, 1), min(args.rep, 3)
        args.compile_backend = args.compile_backend or "aot_eager"
    args.compile_backend = args.compile_backend or "inductor"
    return args


# ---------------------------------------------------------------------------------------
# Timing and records
# ---------------------------------------------------------------------------------------
def time_gpu(fn: Callable[[], object], warmup_ms: int, rep_ms: int) -> List[float]:
    from triton.testing import do_bench
    return list(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="all"))


def time_cpu(fn: Callable[[], object], warmup: int, rep: int) -> List[float]:
    for _ in range(warmup):
        fn()
    raw = []
    for _ in range(rep):
        start = time.perf_counter()
        fn()
        raw.append((time.perf_counter() - start) * 1e3)
    return raw


def device_record(torch, device) -> Dict[str, object]:
    import triton
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda"
        else f"cpu ({platform.processor() or platform.machine()})",
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "triton": triton.__version__, "cuda": torch.version.cuda},
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
    }


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


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
    from vtp_kernels.packed_attention import packed_attention_triton

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
    bad = {n: e for n, e in checks.items() if not e <= bound}
    if bad:
        raise SystemExit(f"{name}: triton packed_attention disagrees with the reference "
                         f"(error norm / reference norm > {bound}): {bad}")

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
    if args.smoke:
        # The interpreter must be on before triton decorates the kernels.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch
    import torch.nn.functional as F

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
    generator = torch.Generator().manual_seed(args.seed)
    timer = time_cpu if args.smoke else time_gpu

    models, results = {}, []
    for name in args.models:
        models[name], model_results = run_model(torch, F, args, name, device, dtype, timer, generator)
        results += model_results

    record = {
        "benchmark": "packed_attention",
        **device_record(torch, device),
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]) if argv is None
        else "python benchmarks/bench_packed_attention.py " + " ".join(argv),
        "smoke": args.smoke,
        "config": {"models": args.models, "batch": args.batch, "tokens": args.tokens, "head_dim": args.head_dim,
                   "prune": args.prune, "dropped_heads": args.dropped_heads, "round_to": args.round_to,
                   "dtype": args.dtype, "warmup": args.warmup, "rep": args.rep,
                   "compile_backend": args.compile_backend, "seed": args.seed,
                   "timer": "perf_counter wall clock" if args.smoke else "triton.testing.do_bench, L2 flushed"},
        "models": models,
        "correctness": {name: {"rel_err": m["max_rel_err"], "bound": m["bound"]} for name, m in models.items()},
        "results": results,
        "medians_ms": {f"{r['model']}/{r['mode']}/{r['variant']}": r["median_ms"] for r in results},
    }

    print(f"packed_attention  B={args.batch} N={args.tokens} D={args.head_dim} {args.dtype}  on {record['device']}"
          + ("  [smoke: interpreter, not kernel speeds]" if args.smoke else ""))
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

    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, "packed_attention_" + ("smoke" if args.smoke else slug(record["device"])))
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

    models: Sequence[str] = record["config"]["models"]
    modes = ("fwd", "fwd+bwd")
    fig, axes = plt.subplots(len(models), 2, figsize=(9, 3.4 * len(models)), squeeze=False)
    for row, name in enumerate(models):
        for ax, mode in zip(axes[row], modes):
            meds = [record["medians_ms"][f"{name}/{mode}/{v}"] for v in VARIANTS]
            bars = ax.bar(VARIANTS, meds, color=["C0", "C1", "C2", "0.6"])
            ax.bar_label(bars, fmt="%.3g", fontsize=8)
            ax.set_title(f"{name} {mode}", fontsize=9)
            ax.set_ylabel("median ms (lower is better)")
    c = record["config"]
    fig.suptitle(f"packed_attention B={c['batch']} N={c['tokens']} D={c['head_dim']} prune={c['prune']} "
                 f"{c['dtype']} on {record['device']}" + (" [smoke]" if record["smoke"] else ""), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
