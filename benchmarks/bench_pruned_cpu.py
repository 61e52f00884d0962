"""Pruned ViTs on the CPU: is the speed-up what the MACs say? A record, not a test.

For DeiT-S and DeiT-B (timm configs, random weights, nothing downloaded): gates get random
values (uniform in [0, 1): a global threshold then cuts every site), and ``vtp.plan`` prunes
20 % and 40 % of the gated dims and to a FLOPs target of 0.55, each with every ``round_to``.
Against them: the dense model and a uniformly narrower timm ViT of about the FLOPs-target
MACs (same depth and heads, smaller embed_dim, what a user would train instead of pruning).
Layout variants of the FLOPs-target plan: ``padded`` (the default: V padded with zero rows
to the head width, so attention takes it as it comes), ``packed`` (each head's kept values
side by side, scattered into a padded copy for attention) and ``heads`` (each kept head
keeps all its value dims as real weights: what a fully padded layout would execute).

Every model of one (batch size, eager or torch.compile) group is timed in turns, one forward
each per round, after warm-up, in inference mode with ``--threads`` threads; the record keeps
every time. Speed-up is the dense median over the variant's; the MAC ratio is that of the
kept dimensions (``vtp.profile``), so padded work counts as work, not as savings.

    python benchmarks/bench_pruned_cpu.py                       # the record (about an hour)
    python benchmarks/bench_pruned_cpu.py --models deit_small_patch16_224 --modes eager
    python benchmarks/bench_pruned_cpu.py --smoke --out /tmp    # seconds: checks the script
    python benchmarks/bench_pruned_cpu.py --profile --models deit_small_patch16_224 \
        --batch-sizes 8 --round-to 8                            # where the time goes, by operator
    python benchmarks/bench_pruned_cpu.py --profile --qk --img-size 384 --ratios --round-to 8 \
        --batch-sizes 8 --tag qk384                             # with queries and keys pruned too

``--profile`` times the same models, then runs each under ``torch.profiler`` one forward per
round, in turns, and records each operator's self time per forward (median over the rounds)
in ``pruned_cpu_profile.json``: eager only, the dense, uniform and FLOPs-target models.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import statistics
import sys
import time
from typing import Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # the checkout's vtp, not an installed copy

import timm  # noqa: E402
import torch  # noqa: E402

import vtp  # noqa: E402
from vtp.app.tables import format_table  # noqa: E402
from vtp.atomic import atomic_write, write_json  # noqa: E402

MODELS = ("deit_small_patch16_224", "deit_base_patch16_224")
SMOKE = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), help="timm model names")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8], help="images per forward")
    p.add_argument("--ratios", type=float, nargs="*", default=[0.2, 0.4], help="plans of vtp.plan(ratio=R)")
    p.add_argument("--flops-target", type=float, default=0.55, help="the plan of vtp.plan(flops_target=F)")
    p.add_argument("--round-to", type=int, nargs="+", default=None,
                   help="round_to of every plan (default: 1 8 16; with --smoke: 1 8)")
    p.add_argument("--modes", nargs="+", choices=("eager", "compile"), default=["eager", "compile"],
                   help="eager, and torch.compile (inductor); compiled: dense, uniform and the "
                        "FLOPs-target plans in the default layout only (a compile costs minutes on a CPU)")
    p.add_argument("--repeats", type=int, default=15, help="timed rounds (every model once per round)")
    p.add_argument("--warmup", type=int, default=3, help="untimed forwards per model first")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0, help="seed of weights, gates and inputs")
    p.add_argument("--out", default=os.path.join(HERE, "results"), help="folder of the JSON and PNG")
    p.add_argument("--profile", action="store_true",
                   help="also record each operator's self time per forward (torch.profiler), for the dense, "
                        "uniform and FLOPs-target models, eager; writes pruned_cpu_profile.json instead")
    p.add_argument("--smoke", action="store_true", help="a tiny ViT, eager, 2 rounds: checks the script")
    p.add_argument("--qk", action="store_true",
                   help="also the FLOPs-target plan of the model gated at the fifth site, attn_qk "
                        "(queries and keys pruned too), beside the four-site one: in the padded layout, "
                        "and with V padded to head_dim (padded_head_dim, the layout before format 3)")
    p.add_argument("--img-size", type=int, default=None,
                   help="image size the models are built for (default: the timm config's, 224)")
    p.add_argument("--tag", default="", help="suffix of the record's file name (e.g. qk384)")
    args = p.parse_args(argv)
    if args.profile:
        args.modes = ["eager"]
    if args.smoke:
        args.models, args.batch_sizes, args.modes, args.repeats, args.warmup = ["smoke"], [2], ["eager"], 2, 1
    if args.round_to is None:
        args.round_to = [1, 8] if args.smoke else [1, 8, 16]
    return args


def build(name: str, img_size=None, **overrides) -> torch.nn.Module:
    if img_size is not None:
        overrides["img_size"] = img_size
    kwargs = {**SMOKE, **overrides} if name == "smoke" else overrides
    return timm.create_model("vit_tiny_patch16_224" if name == "smoke" else name, pretrained=False,
                             **kwargs).eval()


def heads_layout(plan: vtp.PruningPlan) -> vtp.PruningPlan:
    """The plan with every kept head keeping all its value dims."""
    kept = dict(plan.kept)
    d = plan.head_dim
    for name, idx in plan.kept.items():
        if name.endswith("attn_out"):
            heads = sorted({i // d for i in idx})
            kept[name] = [h * d + j for h in heads for j in range(d)]
    return vtp.PruningPlan(kept=kept, sizes=plan.sizes, head_dim=d, rule={**plan.rule, "layout": "heads"})


def uniform_model(name: str, dense: torch.nn.Module, target_macs: int, img_size=None) -> torch.nn.Module:
    """Same depth and heads as ``dense``, the embed_dim (a multiple of the heads' count
    times 8) whose MACs come closest to ``target_macs``."""
    heads = dense.blocks[0].attn.num_heads
    best = None
    for dim in range(heads * 8, dense.embed_dim, heads * 8):
        candidate = build(name, img_size, embed_dim=dim)
        macs = vtp.profile(candidate).macs
        if best is None or abs(macs - target_macs) < abs(best[0] - target_macs):
            best = (macs, dim, candidate)
    return best[2]


def random_gates(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Uniform [0, 1) gate values: a global threshold then cuts every site."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gate in vtp.gates(model).values():
            gate.copy_(torch.rand(gate.shape, generator=g))
    return model


def variants(name: str, seed: int, ratios, flops_target: float, round_tos, qk: bool = False,
             img_size=None) -> Dict[str, dict]:
    torch.manual_seed(seed)
    dense = build(name, img_size)
    gated = random_gates(vtp.add_gates(copy.deepcopy(dense)), seed)
    out = {"dense": {"model": dense, "kind": "dense"}}
    for rt in round_tos:
        for ratio in ratios:
            plan = vtp.plan(gated, ratio=ratio, round_to=rt)
            out[f"ratio {ratio:g} round_to {rt}"] = {"model": vtp.prune(gated, plan, layout="padded").eval(),
                                                     "kind": "pruned", "ratio": ratio, "round_to": rt,
                                                     "layout": "padded"}
        plan = vtp.plan(gated, flops_target=flops_target, round_to=rt)
        key = f"flops {flops_target:g} round_to {rt}"
        out[key] = {"model": vtp.prune(gated, plan, layout="padded").eval(), "kind": "pruned",
                    "flops_target": flops_target, "round_to": rt, "layout": "padded"}
        out[key + " packed"] = {"model": vtp.prune(gated, plan, layout="packed").eval(), "kind": "pruned",
                                "flops_target": flops_target, "round_to": rt, "layout": "packed"}
        out[key + " heads"] = {"model": vtp.prune(gated, heads_layout(plan)).eval(), "kind": "pruned",
                               "flops_target": flops_target, "round_to": rt, "layout": "heads"}
        if qk:
            # The same dense model gated at five sites, its gates drawn from the same seed.
            gated_qk = random_gates(vtp.add_gates(copy.deepcopy(dense), sites=vtp.SITES + ("attn_qk",)), seed)
            plan_qk = vtp.plan(gated_qk, flops_target=flops_target, round_to=rt)
            out[key + " qk"] = {"model": vtp.prune(gated_qk, plan_qk, layout="padded").eval(), "kind": "pruned",
                                "flops_target": flops_target, "round_to": rt, "layout": "padded", "sites": 5}
            # V padded to head_dim instead of the block's attention width: the layout before
            # format 3, where attention ran at 64 whatever the queries and keys kept
            out[key + " qk head_dim"] = {"model": vtp.prune(gated_qk, plan_qk, layout="padded_head_dim").eval(),
                                         "kind": "pruned", "flops_target": flops_target, "round_to": rt,
                                         "layout": "padded_head_dim", "sites": 5}
    for v in out.values():
        count_work(v)
    uniform = uniform_model(name, dense, out[f"flops {flops_target:g} round_to {round_tos[0]}"]["macs"], img_size)
    out["uniform"] = count_work({"model": uniform, "kind": "uniform", "embed_dim": uniform.embed_dim})
    for v in out.values():
        v["mac_ratio"] = out["dense"]["macs"] / v["macs"]
    return out


def count_work(variant: dict) -> dict:
    """The variant's kept and executed MACs (one ``vtp.profile``) and its parameters."""
    profile = vtp.profile(variant["model"])
    variant["macs"], variant["executed_macs"] = profile.macs, profile.executed_macs
    variant["params"] = profile.params
    return variant


def time_group(models: Dict[str, torch.nn.Module], batch: int, img: int, repeats: int, warmup: int,
               seed: int) -> Dict[str, List[float]]:
    x = torch.randn(batch, 3, img, img, generator=torch.Generator().manual_seed(seed))
    times = {k: [] for k in models}
    with torch.inference_mode():
        for m in models.values():
            for _ in range(warmup):
                m(x)
        for _ in range(repeats):
            for k, m in models.items():
                start = time.perf_counter()
                m(x)
                times[k].append(time.perf_counter() - start)
    return times


def operator_times(models: Dict[str, torch.nn.Module], batch: int, img: int, repeats: int,
                   seed: int) -> Dict[str, Dict[str, dict]]:
    """Self CPU time of each operator per forward: one profiled forward per model per round,
    in turns as the timings are, so that both see the same machine."""
    from torch.profiler import ProfilerActivity, profile

    x = torch.randn(batch, 3, img, img, generator=torch.Generator().manual_seed(seed))
    per_round = {k: [] for k in models}
    with torch.inference_mode():
        for m in models.values():
            m(x)
        for _ in range(repeats):
            for k, m in models.items():
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    m(x)
                per_round[k].append({e.key: e.self_cpu_time_total / 1e3 for e in prof.key_averages()})
    out = {}
    for k, rounds in per_round.items():
        ops = sorted({op for r in rounds for op in r})
        out[k] = {op: summarise_ms([r.get(op, 0.0) for r in rounds]) for op in ops}
    return out


def summarise_ms(values: List[float]) -> dict:
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return {"median_ms": statistics.median(values), "q1_ms": q[0], "q3_ms": q[2]}


def summarise(times: List[float]) -> dict:
    """Median and quartiles in ms of times in seconds."""
    return summarise_ms([1e3 * t for t in times])


def operator_rows(name: str, batch: int, ops: Dict[str, Dict[str, dict]], top: int = 12) -> List[list]:
    """Table rows of the operators that take the most time in any model, then the rest."""
    def ms(k, op):
        return ops[k][op]["median_ms"] if op in ops[k] else 0.0

    totals = {k: sum(v["median_ms"] for v in model_ops.values()) for k, model_ops in ops.items()}
    ranked = sorted({op for model_ops in ops.values() for op in model_ops}, key=lambda op: -max(ms(k, op) for k in ops))
    shown = ranked[:top]
    cells = [(op, {k: ms(k, op) for k in ops}) for op in shown]
    cells.append(("(other operators)", {k: totals[k] - sum(ms(k, op) for op in shown) for k in ops}))
    short = name.split("_patch")[0]
    rows = [[short, batch, op, {k: f"{t[k]:.1f} ({100 * t[k] / totals[k]:.0f} %)" for k in ops}] for op, t in cells]
    rows.append([short, batch, "(total)", {k: f"{totals[k]:.1f}" for k in ops}])
    return rows


def plot(record: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in record["results"]})
    columns = sorted({(r["mode"], r["batch"]) for r in record["results"]}, key=lambda c: (c[0] != "eager", c[1]))
    fig, axes = plt.subplots(len(models), len(columns), figsize=(3.8 * len(columns), 3.6 * len(models)),
                             squeeze=False)
    for row, model in enumerate(models):
        for col, (mode, batch) in enumerate(columns):
            _panel(axes[row][col], [r for r in record["results"]
                                    if (r["model"], r["mode"], r["batch"]) == (model, mode, batch)],
                   f"{model.split('_patch')[0]} {mode} batch {batch}")
    fig.suptitle(f"CPU: {record['cpu']}, {record['threads']} threads", fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def _panel(ax, rows, title: str) -> None:
    if not rows:
        ax.set_axis_off()
        return
    top = max(max(r["mac_ratio"], r["speedup"]) for r in rows) * 1.1
    ax.plot([1, top], [1, top], "k:", linewidth=1, label="speed-up = MAC ratio")
    ax.plot([1, top], [0.95, 0.95 * top], color="grey", linewidth=0.6, label="0.95 x MAC ratio")
    for kind, layout, marker in (("pruned", "padded", "o"), ("pruned", "packed", "x"), ("pruned", "heads", "+"),
                                 ("uniform", None, "s"), ("dense", None, "^")):
        sel = [r for r in rows if r["kind"] == kind and r.get("layout") == layout]
        if sel:
            label = f"pruned, {layout}" if kind == "pruned" else kind
            ax.scatter([r["mac_ratio"] for r in sel], [r["speedup"] for r in sel], marker=marker, label=label)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("MAC ratio (dense / kept)")
    ax.set_ylabel("speed-up (dense / model, median)")
    ax.legend(fontsize=6)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    record = {
        "benchmark": "pruned_cpu", "command": " ".join([sys.executable] + sys.argv),
        "date": datetime.datetime.now().isoformat(timespec="seconds"), "cpu": platform.processor() or
        platform.machine(), "cpu_count": os.cpu_count(), "threads": args.threads,
        "versions": {"torch": torch.__version__, "timm": timm.__version__, "python": platform.python_version()},
        "settings": {k: v for k, v in vars(args).items() if k != "out"}, "results": [],
    }
    try:
        with open("/proc/cpuinfo") as f:
            record["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    stem = os.path.join(args.out, "pruned_cpu" + ("_profile" if args.profile else "") + ("_smoke" if args.smoke else "")
                        + (f"_{args.tag}" if args.tag else ""))
    rows, op_rows = [], []
    for name in args.models:
        vs = variants(name, args.seed, args.ratios, args.flops_target, args.round_to, args.qk, args.img_size)
        img = vs["dense"]["model"].patch_embed.img_size[0]
        for mode in args.modes:
            chosen = {k: v for k, v in vs.items() if (mode == "eager" and not args.profile)
                      or k in ("dense", "uniform")
                      or (k.startswith("flops") and v["layout"] in ("padded", "padded_head_dim"))}
            models = {k: v["model"] for k, v in chosen.items()}
            if mode == "compile":
                # Every variant shares timm's forward: one compiled graph each for each batch
                # size, past dynamo's default of 8 cache entries (beyond which it would run
                # the rest eagerly and time that).
                torch._dynamo.reset()
                limit = 4 * len(models) * len(args.batch_sizes)
                for setting in ("recompile_limit", "cache_size_limit"):
                    if hasattr(torch._dynamo.config, setting):
                        setattr(torch._dynamo.config, setting, limit)
                models = {k: torch.compile(m) for k, m in models.items()}
            for batch in args.batch_sizes:
                times = time_group(models, batch, img, args.repeats, args.warmup, args.seed)
                ops = operator_times(models, batch, img, args.repeats, args.seed) if args.profile else {}
                if ops:
                    op_rows += operator_rows(name, batch, ops)
                dense_ms = statistics.median(times["dense"])
                for k, t in times.items():
                    v = chosen[k]
                    r = {"model": name, "variant": k, "mode": mode, "batch": batch, "seconds": t,
                         "speedup": dense_ms / statistics.median(t), **summarise(t),
                         **{f: v[f] for f in v if f != "model"}}
                    r["speedup_per_mac_ratio"] = r["speedup"] / r["mac_ratio"]
                    if ops:
                        r["operators"] = ops[k]
                    record["results"].append(r)
                    rows.append([name.split("_patch")[0], mode, batch, k, f"{r['macs'] / 1e9:.3f}",
                                 f"{r['mac_ratio']:.2f}", f"{r['median_ms']:.1f}",
                                 f"{r['q1_ms']:.1f}-{r['q3_ms']:.1f}", f"{r['speedup']:.2f}",
                                 f"{r['speedup_per_mac_ratio']:.2f}"])
                # after every group: a run cut short keeps what it measured
                write_json(stem + ".json", record)
    print(format_table(["model", "mode", "batch", "variant", "GMACs", "MAC ratio", "median ms", "IQR ms",
                        "speed-up", "speed-up / MAC ratio"], rows))
    if op_rows:
        print("\nself time per forward, ms (median over the rounds); share of the model's total")
        print(format_table(["model", "batch", "operator"] + [k for k in op_rows[0][3]], [
            r[:3] + list(r[3].values()) for r in op_rows]))
        print(f"wrote {stem}.json")
        return 0
    plot(record, stem + ".png")
    print(f"wrote {stem}.json and {stem}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
