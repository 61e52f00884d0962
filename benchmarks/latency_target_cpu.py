"""Target hit: does ``vtp.plan(latency_target=T)`` give a model that runs in T x the dense time?

For each model (timm config, random weights, gates uniform in [0, 1): a global ranking then
cuts every site) and batch size: the latency table is measured (or read from the cache under
``--cache-dir``), and for each target T the latency plan is made from it (with vtp.plan's
default ``refine``: the table's plan timed whole against the dense model and planned again
if it misses; its own measured share and rounds are recorded as ``refine``) and pruned. Beside
each pruned model, two of the same kept MACs: the FLOPs-target plan (``vtp.plan(flops_target=
the latency plan's kept MAC share)``, same gates) and a uniformly narrower timm ViT
(``bench_pruned_cpu.uniform_model``: same depth and heads, the embed_dim whose MACs come
closest). Every model of one (model, batch) group is timed in turns, one forward each per
round, after warm-up (``bench_pruned_cpu.time_group``), fp32, ``--threads`` threads.

The figure is an independent measurement, not the plan's own: fresh interleaved rounds of
the whole group. The measured share is paired (``round_shares``: the median over rounds of
the model's time over the dense model's of the same round, with its quartiles), which cancels
the machine's drift within the run; the error and the hits use it. The ratio of the two
medians is kept beside it (``measured_share``, ``error_of_medians``). The goal: within +-5 %
of the target (0.5 -> 0.475-0.525); the record says hit or miss for each, as measured.

    python benchmarks/latency_target_cpu.py                     # the record: ~15 min on a quiet 2-core CPU
    python benchmarks/latency_target_cpu.py --models deit_small_patch16_224 --batch-sizes 8 --targets 0.5
    python benchmarks/latency_target_cpu.py --smoke --out /tmp  # seconds: checks the script, no numbers

Writes ``latency_target_cpu.json`` (device, versions, command, every raw time, predicted
shares, each table's key and measuring time), ``latency_target_cpu.png`` (measured share
against the target per model and batch), ``latency_target_cpu_table.png`` (the table of the
largest model at the largest batch: DeiT-B at 8) and ``latency_target_cpu_blocks.png`` (that
table's plan nearest 0.5, predicted per block). A target the table cannot reach (its
constant floor) is recorded as unreachable, not skipped silently.
"""
from __future__ import annotations

import copy
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the harness, also when loaded by path
from harness import RESULTS, arguments, environment, records  # noqa: E402

import torch  # noqa: E402

import vtp  # noqa: E402
from bench_pruned_cpu import build, random_gates, summarise, time_group, uniform_model  # noqa: E402
from latency_check import SMOKE_TARGET  # noqa: E402
from vtp._latency_measure import paired_share as per_round_shares  # noqa: E402

MODELS = ("deit_small_patch16_224", "deit_base_patch16_224")
TOLERANCE = 0.05  # the goal: measured share within +-5 % of the target


def parse_args(argv=None):
    p = arguments.parser(__doc__, arguments.DefaultsHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), help="timm model names (random weights)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8], help="images per forward")
    p.add_argument("--targets", type=float, nargs="+", default=[0.7, 0.5, 0.35],
                   help="latency targets: shares of the dense model's latency, in (0, 1]")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (the table's and the timings')")
    p.add_argument("--repeats", type=int, default=20,
                   help="timed rounds per group, every model once per round (20: ~15 min for the default set)")
    p.add_argument("--warmup", type=int, default=2, help="untimed forwards per model first")
    p.add_argument("--table-repeats", type=int, default=3, help="interleaved rounds of the table's probes")
    p.add_argument("--seed", type=int, default=0, help="seed of weights, gates and inputs")
    p.add_argument("--cache-dir", default=None, help="latency table cache (default: $VTP_CACHE or ~/.cache/vtp)")
    p.add_argument("--out", default=RESULTS, help="folder for the JSON record and the pictures")
    p.add_argument("--smoke", action="store_true",
                   help=f"a tiny ViT at batch 2, one thread, target {SMOKE_TARGET}, 2 rounds: checks the script")
    args = p.parse_args(argv)
    if args.smoke:
        args.models, args.batch_sizes, args.threads = ["smoke"], [2], 1
        args.targets = [SMOKE_TARGET]
        args.repeats, args.warmup, args.table_repeats = min(args.repeats, 2), 1, 1
    for flag in ("threads", "repeats", "table_repeats"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')}: expected an integer >= 1, got {getattr(args, flag)}")
    if args.warmup < 0:
        p.error(f"--warmup: expected an integer >= 0, got {args.warmup}")
    if any(b < 1 for b in args.batch_sizes):
        p.error(f"--batch-sizes: expected integers >= 1, got {args.batch_sizes}")
    if any(not 0 < t <= 1 for t in args.targets):
        p.error(f"--targets: expected shares in (0, 1], got {args.targets}")
    args.targets = sorted(set(args.targets), reverse=True)
    return args


def plan_group(name: str, gated, dense, table, targets, dense_macs: int):
    """The latency plan of every target, its FLOPs-target twin and the uniform model of the
    same MACs: ({label: model}, [one case per target])."""
    models = {"dense": dense}
    cases = []
    for target in targets:
        case = {"target": target}
        start = time.perf_counter()
        try:
            plan = vtp.plan(gated, latency_target=target, batch_size=table.key["batch_size"], table=table)
        except ValueError as e:  # out of reach on this table: recorded, not skipped silently
            case.update(reached=False, error=str(e))
            cases.append(case)
            continue
        lat = vtp.prune(gated, plan).eval()
        macs = vtp.profile(lat).macs
        share = macs / dense_macs
        case.update(reached=True, plan_s=time.perf_counter() - start, macs=macs, mac_share=share,
                    predicted_ms=plan.rule["latency"]["predicted_ms"],
                    predicted_share=plan.rule["latency"]["predicted_share"],
                    refine={k: plan.rule["latency"].get(k) for k in ("refine", "measured_share", "measured_iqr",
                                                                     "chosen_round", "rounds", "refine_repeats")},
                    widths=[w.to_dict() for w in vtp.model_widths(lat)], pruned_share=plan.pruned_ratio)
        flops_plan = vtp.plan(gated, flops_target=share)
        flops = vtp.prune(gated, flops_plan).eval()
        uniform = uniform_model(name, dense, macs)
        case["flops"] = {"flops_target": share, "macs": vtp.profile(flops).macs,
                         "predicted_ms": table.predict(vtp.model_widths(flops))}
        case["flops"]["mac_share"] = case["flops"]["macs"] / dense_macs
        case["flops"]["predicted_share"] = case["flops"]["predicted_ms"] / table.dense_ms
        case["uniform"] = {"embed_dim": uniform.embed_dim, "macs": vtp.profile(uniform).macs}
        case["uniform"]["mac_share"] = case["uniform"]["macs"] / dense_macs
        case["labels"] = {"latency": f"latency {target:g}", "flops": f"flops {target:g}",
                          "uniform": f"uniform d={uniform.embed_dim}"}
        models[case["labels"]["latency"]] = lat
        models[case["labels"]["flops"]] = flops
        models.setdefault(case["labels"]["uniform"], uniform)  # one timing per distinct width
        case["plan"] = plan
        cases.append(case)
    return models, cases


def run_group(name: str, batch: int, args) -> dict:
    torch.manual_seed(args.seed)
    dense = build(name)
    gated = random_gates(vtp.add_gates(copy.deepcopy(dense)), args.seed)
    start = time.perf_counter()
    table = vtp.latency_table(gated, batch, threads=args.threads, repeats=args.table_repeats,
                              cache_dir=args.cache_dir)
    table_s = time.perf_counter() - start
    dense_macs = vtp.profile(dense).macs
    models, cases = plan_group(name, gated, dense, table, args.targets, dense_macs)
    img = dense.patch_embed.img_size[0]
    times = time_group(models, batch, img, args.repeats, args.warmup, args.seed)
    dense_s = times["dense"]
    group = {"model": name, "batch": batch, "dense_macs": dense_macs, "dense_predicted_ms": table.dense_ms,
             "table": {"key": table.key, "measured": table.measured, "seconds_this_run": round(table_s, 2),
                       "read_from_cache": table_s < 0.5 * table.measured.get("wall_s", 0.0)},
             "times_s": times, "timings": {k: summarise(t) for k, t in times.items()}, "cases": []}
    dense_median = statistics.median(dense_s)
    for case in cases:
        case.pop("plan", None)
        if case["reached"]:
            for arm in ("latency", "flops", "uniform"):
                t = times[case["labels"][arm]]
                entry = case.setdefault(arm, {})
                entry["measured_share"] = statistics.median(t) / dense_median
                entry["round_shares"] = per_round_shares(t, dense_s)
            case["latency"]["error"] = case["latency"]["round_shares"]["median"] / case["target"] - 1
            case["latency"]["error_of_medians"] = case["latency"]["measured_share"] / case["target"] - 1
            case["hit"] = abs(case["latency"]["error"]) <= TOLERANCE
        group["cases"].append(case)
    group["_table"] = table
    return group


def plot(record: dict, path: str) -> None:
    plt = records.pyplot()
    groups = record["groups"]
    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 4.0), squeeze=False)
    for ax, g in zip(axes[0], groups):
        ts = [c["target"] for c in g["cases"]]
        lo, hi = min(ts + [0.3]) - 0.05, 1.02
        ax.plot([lo, hi], [lo, hi], "k:", linewidth=1, label="measured = target")
        ax.fill_between([lo, hi], [lo * (1 - TOLERANCE), hi * (1 - TOLERANCE)],
                        [lo * (1 + TOLERANCE), hi * (1 + TOLERANCE)], color="0.85", label="+-5 %")
        for i, (arm, label, marker) in enumerate((("latency", "latency plan", "o"), ("flops", "FLOPs plan, same MACs", "s"),
                                                  ("uniform", "uniform ViT, ~same MACs", "^"))):
            pts = [(c["target"], c[arm]["round_shares"]) for c in g["cases"] if c["reached"]]
            if not pts:
                continue
            x = [t + (i - 1) * 0.012 for t, _ in pts]
            y = [s["median"] for _, s in pts]
            err = [[s["median"] - s["q1"] for _, s in pts], [s["q3"] - s["median"] for _, s in pts]]
            ax.errorbar(x, y, yerr=err, marker=marker, linestyle="none", capsize=3, color=f"C{i}", label=label)
        pred = [(c["target"], c["predicted_share"]) for c in g["cases"] if c["reached"]]
        if pred:
            ax.scatter(*zip(*pred), marker="_", s=200, color="C0", label="latency plan, predicted")
        ax.set_title(f"{g['model'].split('_patch')[0]} batch {g['batch']}{records.smoke_suffix(record['smoke'])}",
                     fontsize=9)
        ax.set_xlabel("latency target (share of dense)")
        ax.set_ylabel("measured latency / dense (median, IQR of rounds)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=6, loc="upper left")
    fig.suptitle(f"{record['device']}, fp32, {record['threads']} threads", fontsize=9)
    records.save_figure(fig, path)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = environment.device_name(torch, torch.device("cpu"), cores=True)
    stem = records.output_stem(args.out, "latency_target", args.smoke, device, tag=None if args.smoke else "cpu")
    record = records.record_head("latency_target_cpu", __file__, argv, smoke=args.smoke, device=device,
                                 packages=("python", "torch", "timm"))
    record.update(threads=args.threads, dtype="float32", tolerance=TOLERANCE,
                  settings={k: v for k, v in vars(args).items() if k != "out"}, groups=[])
    start = time.perf_counter()
    tables = []
    for name in args.models:
        for batch in args.batch_sizes:
            group = run_group(name, batch, args)
            tables.append((group.pop("_table"), group))
            record["groups"].append(group)
            record["seconds"] = time.perf_counter() - start
            records.write_json(stem + ".json", record)  # after every group: a run cut short keeps it
            for c in group["cases"]:
                if not c["reached"]:
                    print(f"{name} batch {batch} target {c['target']:g}: unreachable ({c['error']})")
                    continue
                r = {arm: c[arm]["round_shares"] for arm in ("latency", "flops", "uniform")}
                own = c["refine"].get("measured_share")
                print(f"{name} batch {batch} target {c['target']:g}: predicted {c['predicted_share']:.3f}"
                      + (f", the plan's own measurement {own:.3f}" if own is not None else "") + ", measured "
                      f"{r['latency']['median']:.3f} (paired, IQR {r['latency']['q1']:.3f}-{r['latency']['q3']:.3f}) "
                      f"{'hit' if c['hit'] else 'miss'}; same MACs ({c['mac_share']:.3f}): FLOPs plan "
                      f"{c['flops']['measured_share']:.3f}, uniform d={c['uniform']['embed_dim']} "
                      f"{c['uniform']['measured_share']:.3f}")
    reached = [c for g in record["groups"] for c in g["cases"] if c["reached"]]
    record["summary"] = {"cases": sum(len(g["cases"]) for g in record["groups"]), "reached": len(reached),
                         "hits": sum(c["hit"] for c in reached),
                         "max_abs_error": max((abs(c["latency"]["error"]) for c in reached), default=None),
                         "error": "of the paired share: median over rounds of pruned / dense of the same round"}
    records.write_json(stem + ".json", record)
    plot(record, stem + ".png")
    # The table picture and a plan's blocks: the largest model at its largest batch (DeiT-B at 8).
    table, group = max(tables, key=lambda tg: (tg[1]["dense_macs"], tg[1]["batch"]))
    vtp.plot_latency_table(table, stem + "_table.png")
    near = min((c for c in group["cases"] if c["reached"]), key=lambda c: abs(c["target"] - 0.5), default=None)
    if near is not None:
        widths = [vtp.BlockWidths.from_dict(w) for w in near["widths"]]
        vtp.plot_block_latency(table, widths, stem + "_blocks.png", label=f"latency target {near['target']:g}")
    s = record["summary"]
    print(f"{s['hits']} of {s['reached']} reached targets hit within +-{TOLERANCE:.0%} ({s['cases']} asked); "
          f"{record['seconds']:.0f} s")
    print(f"wrote {stem}.json, {stem}.png, {stem}_table.png" + (f", {stem}_blocks.png" if near else ""))
    return record


if __name__ == "__main__":
    main()
