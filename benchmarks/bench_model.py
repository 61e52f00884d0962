"""Benchmark pruned ViTs against their dense models: throughput, step time, memory, MACs.

For each model (DeiT-S, DeiT-B built from their timm configs; nothing is downloaded):
gates are added and given random positive values (so every plan prunes something), then
pruned with ``vtp.plan`` at ratio 0.2 and 0.4 and at flops_target 0.5 (optionally a
round_to sweep at ratio 0.4). Every model is timed, as in timm's benchmark.py, with bf16
autocast at batch 256 after a warm-up:

    infer   eval mode, no grad, one forward
    train   one fine-tuning step: forward, cross-entropy, backward, AdamW step

under each ``vtp_kernels`` backend ("torch": PyTorch reference ops; "triton": the kernels)
and with and without ``torch.compile``. The dense model is plain timm (no vtp ops), so it
is timed once per compile setting and every pruned timing is compared with it.

On a GPU the pruned models' logits under the triton backend are checked against the
torch backend before anything is timed. Output: a table, and model_<device>.json (device,
versions, command, raw step times, medians, speed-up vs dense, MACs ratio) and a PNG of
speed-up against MACs reduction (with the y = x line) in --out.

    python benchmarks/bench_model.py                               # GPU, everything
    python benchmarks/bench_model.py --models deit_small_patch16_224 --no-compile
    python benchmarks/bench_model.py --smoke --out /tmp/bench      # CPU check of the script
"""
from __future__ import annotations

import copy
import os
import sys
import time
import traceback
from typing import Dict, List

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the harness, also when loaded by path
from harness import RESULTS, arguments, environment, records, timing  # noqa: E402

DEFAULT_MODELS = ["deit_small_patch16_224", "deit_base_patch16_224"]
SMOKE_MODEL = "smoke_vit"  # a two-block ViT on 32x32 images, built in this file
AMP = {"bf16": "bfloat16", "fp16": "float16", "none": None}


def parse_args(argv=None):
    p = arguments.parser(__doc__, arguments.DefaultsHelpFormatter)
    p.add_argument("--models", nargs="+", default=None, metavar="NAME",
                   help=f"timm model names, built with pretrained=False (default: {' '.join(DEFAULT_MODELS)}; "
                        f"with --smoke: a tiny 2-block ViT)")
    p.add_argument("--batch", type=int, default=None, help="images per step (default: 256; 4 with --smoke)")
    p.add_argument("--ratios", type=float, nargs="*", default=[0.2, 0.4], metavar="R",
                   help="vtp.plan(ratio=R) variants: share of all gated dims removed (global threshold)")
    p.add_argument("--flops-targets", type=float, nargs="*", default=[0.5], metavar="F",
                   help="vtp.plan(flops_target=F) variants: share of the dense MACs kept")
    p.add_argument("--round-to", type=int, default=1,
                   help="round_to of the ratio and flops-target plans (kept counts rounded up to a multiple)")
    p.add_argument("--round-to-sweep", type=int, nargs="*", default=[], metavar="N",
                   help="also time ratio-0.4 plans with each of these round_to values (e.g. 8 16 64) to "
                        "measure what tensor-core-friendly widths buy")
    p.add_argument("--backends", nargs="+", choices=["torch", "triton"], default=None,
                   help="vtp_kernels backends for the pruned models (default: torch triton; torch with --smoke)")
    p.add_argument("--modes", nargs="+", choices=["infer", "train"], default=["infer", "train"],
                   help="infer: eval forward without grad; train: forward + backward + AdamW step")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile runs (eager only)")
    p.add_argument("--compile-backend", metavar="NAME", default=None,
                   help="torch.compile backend (default: inductor; aot_eager with --smoke, to skip C++ compiles)")
    p.add_argument("--amp", choices=sorted(AMP), default=None,
                   help="autocast dtype; master weights stay fp32 (default: bf16; none with --smoke)")
    p.add_argument("--img-size", type=int, default=None, help="input resolution (default: the model's own)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps before timing (default: 10; 1 with --smoke)")
    p.add_argument("--iters", type=int, default=None, help="timed steps, one raw time each (default: 40; 3 with --smoke)")
    p.add_argument("--lr", type=float, default=1e-5, help="AdamW learning rate of the train step")
    p.add_argument("--check-batch", type=int, default=32, help="batch of the triton-vs-torch logits check")
    p.add_argument("--seed", type=int, default=0, help="seed for weights, gate values, inputs")
    p.add_argument("--out", default=RESULTS, help="folder for the JSON record and PNG plot")
    p.add_argument("--tag", default=None, help="suffix of the output file names (default: device name)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument("--smoke", action="store_true",
                   help="CPU check of the script: a tiny 2-block ViT, batch 4, few steps, torch backend, "
                        "compile via aot_eager, wall-clock timing; its numbers say nothing about speed")
    args = p.parse_args(argv)
    smoke = args.smoke
    args.models = args.models or ([SMOKE_MODEL] if smoke else DEFAULT_MODELS)
    args.batch = args.batch or (4 if smoke else 256)
    args.backends = args.backends or (["torch"] if smoke else ["torch", "triton"])
    args.compile_backend = args.compile_backend or ("aot_eager" if smoke else "inductor")
    args.amp = args.amp or ("none" if smoke else "bf16")
    args.warmup = args.warmup if args.warmup is not None else (1 if smoke else 10)
    args.iters = args.iters or (3 if smoke else 40)
    args.check_batch = min(args.check_batch, args.batch)
    return args


# ---------------------------------------------------------------------------------------
# Models and plans
# ---------------------------------------------------------------------------------------
def build_dense(name: str, device):
    import timm
    from timm.models.vision_transformer import VisionTransformer

    with device:  # initialise the weights on the device: DeiT-B on a CPU takes seconds
        if name == SMOKE_MODEL:
            return VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4,
                                     mlp_ratio=2.0, num_classes=10)
        return timm.create_model(name, pretrained=False)


def pruned_variants(args) -> List[Dict[str, object]]:
    """Plan keyword arguments and a label for each pruned model to time."""
    out = [{"label": f"ratio={r}" + (f",round_to={args.round_to}" if args.round_to != 1 else ""),
            "plan": {"ratio": r, "round_to": args.round_to}} for r in args.ratios]
    out += [{"label": f"flops={f}" + (f",round_to={args.round_to}" if args.round_to != 1 else ""),
             "plan": {"flops_target": f, "round_to": args.round_to}} for f in args.flops_targets]
    out += [{"label": f"ratio=0.4,round_to={n}", "plan": {"ratio": 0.4, "round_to": n}}
            for n in args.round_to_sweep if not (n == args.round_to and 0.4 in args.ratios)]
    return out


def gated_copy(dense, seed: int):
    """The dense model with VTP gates holding random positive scores (a stand-in for sparse training)."""
    import torch
    import vtp

    gated = vtp.add_gates(copy.deepcopy(dense))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for g in vtp.gates(gated).values():
            g.copy_(torch.rand(g.shape, generator=gen).clamp_min(1e-3))
    return gated


def dense_and_gated(torch, name: str, device, seed: int):
    """The dense model (seeded) and its gated copy with random gate scores (gated_copy)."""
    torch.manual_seed(seed)
    dense = build_dense(name, device).eval()
    return dense, gated_copy(dense, seed)


def prune_at(gated, device, img_size=None, **plan_kwargs):
    """``gated`` pruned at ``vtp.plan(gated, **plan_kwargs)``, on ``device``; and the plan."""
    import vtp

    plan = vtp.plan(gated, **plan_kwargs, img_size=img_size)
    return vtp.prune(gated, plan).to(device).eval(), plan


# ---------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------
def measure(torch, model, mode: str, device, *, batch: int, amp_dtype, compiled: bool, compile_backend: str,
            warmup: int, iters: int, rounds: int = 1, img_size=None, lr: float = 1e-5) -> Dict[str, object]:
    """Time one (model, mode, compile) combination: the first call apart (compilation,
    allocation), ``warmup`` untimed steps, then ``rounds`` rounds of ``iters`` steps
    (harness.timing.summarize, every raw time also as raw_ms), images/s and peak memory."""
    import torch.nn.functional as F

    size = img_size or model.patch_embed.img_size[0]
    x = torch.randn(batch, 3, size, size, device=device)
    target = torch.randint(0, model.num_classes, (batch,), device=device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)

    def autocast():
        return torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)

    if mode == "infer":
        model = model.eval()
        run = torch.compile(model, backend=compile_backend, dynamic=False) if compiled else model

        def step():
            with torch.no_grad(), autocast():
                run(x)
    else:
        model = copy.deepcopy(model).train()  # optimizer steps must not touch the shared model
        run = torch.compile(model, backend=compile_backend, dynamic=False) if compiled else model
        opt = torch.optim.AdamW(model.parameters(), lr=lr)

        def step():
            with autocast():
                loss = F.cross_entropy(run(x), target)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    step()  # first call: compiles (when compiled) and allocates; timed separately
    if cuda:
        torch.cuda.synchronize()
    first_s = time.perf_counter() - t0
    summary = timing.step_rounds(torch, step, warmup, iters, cuda, rounds)
    return {
        "raw_ms": timing.raw_ms(summary), **summary, "images_per_s": batch / (summary["median_ms"] * 1e-3),
        "first_call_s": first_s,
        "peak_mem_mb": torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None,
    }


# ---------------------------------------------------------------------------------------
# Correctness: triton backend against torch backend on the pruned model
# ---------------------------------------------------------------------------------------
# Relative Frobenius error of the logits. Both backends run bf16 matmuls under autocast and
# differ by bf16 roundings taken in a different order. Measured on a CPU, the bf16-autocast
# logits of a ratio-0.4 DeiT-S/B (random weights and gates) are 0.8 % from the fp32 logits;
# two bf16 runs are then at most ~1.6 % apart, hence 3 %. A broken kernel (wrong columns,
# wrong widths) gives errors of order 1.
CHECK_BOUND = {"bf16": 3e-2, "fp16": 1e-2, "none": 1e-3}


def check_logits(torch, vtp_kernels, pruned, device, *, batch: int, amp_dtype, img_size=None) -> float:
    """Relative error norm of the pruned model's logits with backend "triton" against "torch"."""
    size = img_size or pruned.patch_embed.img_size[0]
    x = torch.randn(batch, 3, size, size, device=device)
    logits = {}
    for backend in ("torch", "triton"):
        with vtp_kernels.use_backend(backend), torch.no_grad(), \
                torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits[backend] = pruned.eval()(x).float()
    ref = logits["torch"]
    return float((logits["triton"] - ref).norm() / ref.norm().clamp_min(1e-12))


# ---------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------
def main(argv=None) -> Dict[str, object]:
    args = parse_args(argv)
    import torch

    device = environment.pick_device(torch, args.smoke)
    if args.smoke:
        # One thread: a loaded CPU (tests running beside us) makes multi-threaded steps erratic.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return _main(args, argv, torch, device)
        finally:
            torch.set_num_threads(threads)
    return _main(args, argv, torch, device)


def _main(args, argv, torch, device) -> Dict[str, object]:
    import vtp
    import vtp_kernels

    if "triton" in args.backends and device.type != "cuda":
        raise SystemExit("--backends triton needs a GPU here (the interpreter would time Python, not kernels)")
    torch.manual_seed(args.seed)
    amp_dtype = getattr(torch, AMP[args.amp]) if AMP[args.amp] else None
    compile_modes = [False] if args.no_compile else [False, True]
    record = {
        **records.record_head("model", __file__, argv, smoke=args.smoke,
                             device=environment.device_name(torch, device, cores=True),
                             packages=("python", "torch", "timm", "cuda", "triton")),
        "config": {k: v for k, v in vars(args).items() if k not in ("out", "no_plot", "tag")},
        "timer": "CUDA events per step" if device.type == "cuda" else "perf_counter per step",
        "models": {}, "correctness": {}, "results": [],
    }

    stem = records.output_stem(args.out, "model", args.smoke, record["device"], args.tag)

    def save(plot_fn=None):
        # After every measurement: a run cut short (a time limit, a crash) keeps what it measured.
        record["medians_ms"] = {key(r): r["median_ms"] for r in record["results"] if "median_ms" in r}
        record["speedups"] = {key(r): r["speedup_vs_dense"] for r in record["results"] if "speedup_vs_dense" in r}
        if plot_fn is None:
            records.write_json(stem + ".json", record)
        else:
            records.save_record(record, stem, plot_fn)

    def run(model_name, label, model, backend, compiled, mode, extra, dense_row=None):
        if compiled:
            torch._dynamo.reset()  # fresh caches: no recompile limit, no shapes marked dynamic
        try:
            with vtp_kernels.use_backend(backend or "torch"):
                res = measure(torch, model, mode, device, batch=args.batch, amp_dtype=amp_dtype, compiled=compiled,
                              compile_backend=args.compile_backend, warmup=args.warmup, iters=args.iters,
                              img_size=args.img_size, lr=args.lr)
        except Exception as e:  # keep the other measurements; the record says what failed
            traceback.print_exc()
            res = {"error": f"{type(e).__name__}: {e}"}
        row = {"model": model_name, "variant": label, "backend": backend, "compile": compiled, "mode": mode,
               "batch": args.batch, **extra, **res}
        if dense_row is not None and "median_ms" in row and "median_ms" in dense_row:
            row["speedup_vs_dense"] = dense_row["median_ms"] / row["median_ms"]
        record["results"].append(row)
        print(format_row(row), flush=True)
        if "speedup_vs_dense" in row:
            print(f"{'':>55}speed-up {row['speedup_vs_dense']:.2f}x at "
                  f"MACs x{1 / extra['macs_ratio']:.2f} fewer", flush=True)
        save()
        return row

    print(header(), flush=True)
    for model_name in args.models:
        dense = build_dense(model_name, device)
        dense_prof = vtp.profile(dense, args.img_size)
        gated = gated_copy(dense, args.seed)
        pruned = []
        for v in pruned_variants(args):
            small, plan = prune_at(gated, device, args.img_size, **v["plan"])
            prof = vtp.profile(small, args.img_size)
            pruned.append((v["label"], small, {
                "plan": v["plan"], "pruned_share": plan.pruned_ratio, "params": prof.params, "macs": prof.macs,
                "macs_ratio": prof.macs / dense_prof.macs, "params_ratio": prof.params / dense_prof.params,
            }))
        del gated
        record["models"][model_name] = {"dense_params": dense_prof.params, "dense_macs": dense_prof.macs,
                                        "img_size": list(dense_prof.img_size)}

        # Correctness before timing: the kernels must compute what the reference computes.
        if "triton" in args.backends:
            for label, small, _ in pruned:
                err = check_logits(torch, vtp_kernels, small, device, batch=args.check_batch, amp_dtype=amp_dtype,
                                   img_size=args.img_size)
                record["correctness"][f"{model_name}/{label}"] = err
                if not err <= CHECK_BOUND[args.amp]:
                    raise SystemExit(f"{model_name} {label}: triton logits differ from torch backend by "
                                     f"{err:.3g} (relative) > {CHECK_BOUND[args.amp]}")
            print(f"# {model_name}: triton vs torch logits, max relative error "
                  f"{max(record['correctness'][f'{model_name}/{lb}'] for lb, _, _ in pruned):.2e}", flush=True)

        dense_extra = {"params": dense_prof.params, "macs": dense_prof.macs, "macs_ratio": 1.0, "params_ratio": 1.0}
        for compiled in compile_modes:
            for mode in args.modes:
                base = run(model_name, "dense", dense, None, compiled, mode, dense_extra)
                for label, small, extra in pruned:
                    for backend in args.backends:
                        run(model_name, label, small, backend, compiled, mode, extra, dense_row=base)
        del dense, pruned
        if device.type == "cuda":
            torch.cuda.empty_cache()

    record["finished"] = True
    if args.no_plot:
        save()
        print(f"wrote {stem}.json")
    else:
        save(plot)
    return record


def key(r) -> str:
    return f"{r['model']}/{r['variant']}/{r['backend'] or '-'}/{'compiled' if r['compile'] else 'eager'}/{r['mode']}"


def header() -> str:
    return (f"{'model':<24}{'variant':<22}{'backend':<8}{'compile':<8}{'mode':<6}"
            f"{'MACs':>6}{'median ms':>11}{'img/s':>10}{'peak MiB':>10}")


def format_row(r) -> str:
    head = (f"{r['model'][:23]:<24}{r['variant'][:21]:<22}{r['backend'] or '-':<8}"
            f"{'yes' if r['compile'] else 'no':<8}{r['mode']:<6}{r['macs_ratio']:>6.2f}")
    if "error" in r:
        return head + f"  FAILED: {r['error'][:120]}"
    mem = f"{r['peak_mem_mb']:.0f}" if r["peak_mem_mb"] is not None else "-"
    return head + f"{r['median_ms']:>11.3f}{r['images_per_s']:>10.1f}{mem:>10}"


def plot(record: Dict[str, object], path: str) -> None:
    """Measured speed-up against MACs reduction (dense MACs / pruned MACs), one panel per mode."""
    plt = records.pyplot()
    rows = [r for r in record["results"] if "speedup_vs_dense" in r]
    modes = [m for m in ("infer", "train") if any(r["mode"] == m for r in rows)] or ["infer"]
    models = list(record["models"])
    styles = {("torch", False): ("o", "torch eager"), ("torch", True): ("s", "torch compiled"),
              ("triton", False): ("^", "triton eager"), ("triton", True): ("D", "triton compiled")}
    fig, axes = plt.subplots(1, len(modes), figsize=(5.2 * len(modes), 4.4), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        sel = [r for r in rows if r["mode"] == mode]
        top = max([1.0] + [1 / r["macs_ratio"] for r in sel] + [r["speedup_vs_dense"] for r in sel]) * 1.08
        ax.plot([1, top], [1, top], "k--", lw=1, label="y = x (speed-up = MACs reduction)")
        for mi, model in enumerate(models):
            for (backend, compiled), (marker, name) in styles.items():
                pts = [r for r in sel if r["model"] == model and r["backend"] == backend and r["compile"] == compiled]
                if pts:
                    ax.scatter([1 / r["macs_ratio"] for r in pts], [r["speedup_vs_dense"] for r in pts],
                               marker=marker, color=f"C{mi}", label=f"{model} {name}", s=36)
        ax.set_xlim(0.95, top)
        ax.set_ylim(min([0.9] + [r["speedup_vs_dense"] * 0.95 for r in sel]), top)
        ax.set_xlabel("MACs reduction (dense MACs / pruned MACs)")
        ax.set_ylabel("measured speed-up (dense step time / pruned)")
        ax.set_title(f"{mode}, batch {record['config']['batch']}, amp {record['config']['amp']}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="upper left")
    fig.suptitle(f"VTP pruned vs dense on {record['device']}" + records.smoke_suffix(record["smoke"]), fontsize=9)
    records.save_figure(fig, path)


if __name__ == "__main__":
    main()
