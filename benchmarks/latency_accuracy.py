"""Accuracy at equal measured latency: the latency plan against the FLOPs plan.

MNIST digits (the 5,000 of vtp.app.mnist: 4,000 train, 1,000 test) on a timm ViT wide
enough that its latency follows its widths (default: width 192, depth 4, 3 heads of 64,
7x7 patches: 16 tokens + class token). The dense model is trained once; per seed, gates +
L1 (sparse training) once, as benchmarks/accuracy_vs_macs.py does. Then, per latency target:

    latency   vtp.plan(latency_target=T, batch_size=--latency-batch, table=the model's
              latency table measured here with --threads threads)
    flops     vtp.plan(flops_target=F) of the same gates, F chosen so that the pruned model's
              MEASURED latency matches the latency plan's: bisection over F, each candidate
              timed in turns with the latency plan's model (per-round ratio, median)

Both are fine-tuned with the same recipe (the demo's train, same epochs, lr and seed) and
tested; the record says which keeps more accuracy, mean +- std over the seeds, as it comes
out. A final interleaved timing of dense, latency and FLOPs models is kept per run.

    python benchmarks/latency_accuracy.py                       # the record: ~13 min on a 2-core CPU
    python benchmarks/latency_accuracy.py --smoke --out /tmp/la # seconds: a check of the script

Writes ``latency_accuracy_<tag>.json`` (versions, command, settings, every raw number, the
bisection steps and raw times) and ``.png`` in --out. A run interrupted part-way continues
where it stopped when started again with the same settings (``--work``: trained models,
finished runs, the latency table's cache).
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import sys
import time
from typing import Any, Dict, List

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the harness, also when loaded by path
from harness import RESULTS, arguments, environment, records, timing  # noqa: E402

import torch  # noqa: E402
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

import vtp  # noqa: E402
from accuracy_vs_macs import Work, settings_key  # noqa: E402
from latency_check import SMOKE_TARGET  # noqa: E402
from vtp.app.demo import accuracy, adamw, train  # noqa: E402
from vtp.app.mnist import load_mnist_5k, train_test_split  # noqa: E402
from vtp.app.tables import format_table  # noqa: E402

ARMS = ("latency", "flops")
LABELS = {"latency": "latency plan", "flops": "FLOPs plan, same measured latency"}
SMOKE_MODEL = dict(width=48, depth=2, heads=3)


def build(args) -> torch.nn.Module:
    return VisionTransformer(img_size=28, patch_size=args.patch, in_chans=1, num_classes=10, embed_dim=args.width,
                             depth=args.depth, num_heads=args.heads, mlp_ratio=4.0)


def data(smoke: bool):
    train_data, test_data = train_test_split(*load_mnist_5k(), test_size=1000, seed=0)
    if smoke:
        train_data, test_data = tuple(t[:128] for t in train_data), tuple(t[:64] for t in test_data)
    return train_data, test_data


class Clock:
    """Forwards without autograd at --latency-batch with --threads threads, one forward of each
    model per round, in turns (harness.timing.interleaved); training keeps --train-threads."""

    def __init__(self, args):
        self.args = args
        self.images = torch.randn(args.latency_batch, 1, 28, 28, generator=torch.Generator().manual_seed(0))

    def time(self, models: Dict[str, torch.nn.Module]) -> Dict[str, Dict[str, Any]]:
        saved = torch.get_num_threads()
        torch.set_num_threads(self.args.threads)
        try:
            fns = {k: timing.forward(torch, m.eval(), (self.images,)) for k, m in models.items()}
            for fn in fns.values():  # warm-up beyond interleaved's one untimed call
                for _ in range(self.args.warmup):
                    fn()
            return timing.interleaved(fns, lambda fn: timing.wall_clock_ms(fn, 0, 1), rounds=self.args.repeats)
        finally:
            torch.set_num_threads(saved)


def round_ratio(summaries: Dict[str, Dict[str, Any]], name: str, over: str) -> float:
    """Median over the rounds of ``name``'s time over ``over``'s, both timed in the same round."""
    return statistics.median(a[0] / b[0] for a, b in zip(summaries[name]["rounds_ms"], summaries[over]["rounds_ms"]))


def match_latency(gated, latency_model, clock: Clock, start: float, steps: int):
    """The FLOPs-target plan whose pruned model runs as fast as ``latency_model`` (measured):
    bisection over flops_target from ``start`` (the latency plan's MAC share) within (0, 1];
    each candidate timed in turns with ``latency_model``. Returns (model, flops_target, ratio,
    steps): the candidate whose time ratio came closest to 1."""
    lo, hi, f = 0.0, 1.0, start
    tried: List[Dict[str, Any]] = []
    best = None
    for _ in range(steps):
        try:
            plan = vtp.plan(gated, flops_target=f)
        except ValueError as e:  # below what pruning every gated dim reaches: go up
            tried.append({"flops_target": f, "error": str(e)})
            lo, f = f, (f + hi) / 2
            continue
        model = vtp.prune(gated, plan).eval()
        t = clock.time({"latency": latency_model, "flops": model})
        ratio = round_ratio(t, "flops", "latency")
        tried.append({"flops_target": f, "macs": vtp.profile(model).macs, "ratio": ratio,
                      "rounds_ms": {k: v["rounds_ms"] for k, v in t.items()}})
        if best is None or abs(math.log(ratio)) < abs(math.log(best[2])):
            best = (model, f, ratio)
        if ratio > 1:
            hi = f
        else:
            lo = f
        f = (lo + hi) / 2
    if best is None:
        raise RuntimeError(f"no flops_target in the {steps} bisection steps could be planned: {tried}")
    return (*best, tried)


def one_run(seed: int, target: float, gated, dense, table, dense_macs: int, clock: Clock, train_data, test_data,
            args) -> Dict[str, Any]:
    start = time.perf_counter()
    # the table's plan alone, as recorded: the arms are compared at equal measured latency anyway
    plan = vtp.plan(gated, latency_target=target, batch_size=args.latency_batch, table=table, refine=0)
    models = {"latency": vtp.prune(gated, plan).eval()}
    mac_share = vtp.profile(models["latency"]).macs / dense_macs
    models["flops"], flops_target, ratio, steps = match_latency(gated, models["latency"], clock, mac_share,
                                                               args.bisect_steps)
    timed = clock.time({"dense": dense, **models})
    run: Dict[str, Any] = {"seed": seed, "target": target, "predicted_share": plan.rule["latency"]["predicted_share"],
                           "flops_target": flops_target, "bisection": steps, "bisection_ratio": ratio,
                           "final_ms": {k: v["rounds_ms"] for k, v in timed.items()},
                           "matched_ratio": round_ratio(timed, "flops", "latency")}
    for arm, model in models.items():
        before = accuracy(model, test_data)
        train(model, train_data, args.finetune_epochs, adamw(model, args.finetune_lr), batch_size=args.batch_size,
              seed=200 + seed, desc=f"fine-tune {arm}", progress=False)
        run[arm] = {"macs": vtp.profile(model).macs, "mac_share": vtp.profile(model).macs / dense_macs,
                    "measured_share": round_ratio(timed, arm, "dense"), "acc_before_finetune": before,
                    "acc": accuracy(model, test_data), "widths": [w.to_dict() for w in vtp.model_widths(model)]}
    run["seconds"] = time.perf_counter() - start
    return run


def summarise(runs: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Per target: each arm's accuracy (mean, std over seeds), measured latency share, and
    how often the latency plan kept more accuracy than the FLOPs plan."""
    out = []
    for target in sorted({r["target"] for r in runs}, reverse=True):
        rs = [r for r in runs if r["target"] == target]
        row: Dict[str, Any] = {"target": target, "n": len(rs)}
        for arm in ARMS:
            accs = [100 * r[arm]["acc"] for r in rs]
            row[arm] = {"acc_mean": statistics.mean(accs), "acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                        "acc_before_mean": statistics.mean(100 * r[arm]["acc_before_finetune"] for r in rs),
                        "measured_share_mean": statistics.mean(r[arm]["measured_share"] for r in rs),
                        "mac_share_mean": statistics.mean(r[arm]["mac_share"] for r in rs)}
        diffs = [100 * (r["latency"]["acc"] - r["flops"]["acc"]) for r in rs]
        row["latency_minus_flops"] = {"mean": statistics.mean(diffs),
                                      "std": statistics.stdev(diffs) if len(diffs) > 1 else 0.0,
                                      "latency_wins": sum(d > 0 for d in diffs), "flops_wins": sum(d < 0 for d in diffs),
                                      "ties": sum(d == 0 for d in diffs)}
        d = row["latency_minus_flops"]["mean"]
        row["keeps_more"] = "latency" if d > 0 else "flops" if d < 0 else "tie"
        out.append(row)
    return out


def plot(record: Dict[str, Any], path: str) -> None:
    plt = records.pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    for i, arm in enumerate(ARMS):
        rs = record["runs"]
        ax.scatter([r[arm]["measured_share"] for r in rs], [100 * r[arm]["acc"] for r in rs], color=f"C{i}",
                   alpha=0.4, s=18)
        s = record["summary"]
        ax.errorbar([x[arm]["measured_share_mean"] for x in s], [x[arm]["acc_mean"] for x in s],
                    yerr=[x[arm]["acc_std"] for x in s], color=f"C{i}", marker="o", linestyle="none", capsize=3,
                    label=f"{LABELS[arm]} (mean +- std)")
    ax.axhline(100 * record["dense_acc"], color="k", linestyle="--", linewidth=1, label="dense")
    ax.set_xlabel(f"measured latency / dense (batch {record['config']['latency_batch']}, "
                  f"{record['config']['threads']} threads)")
    ax.set_ylabel("test top-1 % after fine-tuning")
    ax.set_title(f"MNIST digits, ViT width {record['config']['width']}: accuracy at equal measured latency"
                 f"{records.smoke_suffix(record['smoke'])}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    records.save_figure(fig, path)


def parse_args(argv=None):
    p = arguments.parser(__doc__, arguments.DefaultsHelpFormatter)
    p.add_argument("--targets", nargs="+", type=float, default=[0.5], help="latency targets, shares in (0, 1]")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds of sparse training and fine-tuning")
    p.add_argument("--width", type=int, default=192, help="embed_dim of the ViT")
    p.add_argument("--depth", type=int, default=4, help="blocks of the ViT")
    p.add_argument("--heads", type=int, default=3, help="attention heads of the ViT")
    p.add_argument("--patch", type=int, default=7, choices=(4, 7), help="patch size on the 28x28 digits")
    p.add_argument("--dense-epochs", type=int, default=None, help="dense training epochs (default: 8; 1 with --smoke)")
    p.add_argument("--sparse-epochs", type=int, default=None,
                   help="sparse-training epochs per seed, on top of the dense model (default: 5; 1 with --smoke)")
    p.add_argument("--finetune-epochs", type=int, default=None,
                   help="fine-tuning epochs of every pruned model (default: 4; 1 with --smoke)")
    p.add_argument("--lam", type=float, default=2e-4, help="weight of VTP's L1 gate penalty")
    p.add_argument("--lr", type=float, default=2e-3, help="peak AdamW lr of dense training; sparse uses a quarter")
    p.add_argument("--finetune-lr", type=float, default=5e-4, help="peak AdamW lr of every fine-tuning")
    p.add_argument("--gate-lr", type=float, default=1e-2, help="AdamW lr of the gates in sparse training")
    p.add_argument("--batch-size", type=int, default=32, help="training batch size")
    p.add_argument("--train-threads", type=int, default=1, help="torch CPU threads while training")
    p.add_argument("--latency-batch", type=int, default=None,
                   help="images per timed forward, the batch the latency plan is made for (default: 64; 4 with --smoke)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads of the latency table and every timing")
    p.add_argument("--repeats", type=int, default=None, help="interleaved timing rounds (default: 15; 2 with --smoke)")
    p.add_argument("--warmup", type=int, default=2, help="untimed forwards per model before each timing")
    p.add_argument("--bisect-steps", type=int, default=None,
                   help="flops_target candidates timed to match the latency (default: 7; 2 with --smoke)")
    p.add_argument("--table-repeats", type=int, default=None,
                   help="interleaved rounds of the latency table's probes (default: 3; 1 with --smoke)")
    p.add_argument("--cache-dir", default=None, help="latency table cache (default: <work>/cache)")
    p.add_argument("--out", default=RESULTS, help="folder for the JSON record and the PNG")
    p.add_argument("--tag", default=None, help="file name suffix (default: cpu; smoke with --smoke)")
    p.add_argument("--work", default=None,
                   help="folder of trained models and finished runs, to resume (default: runs/latency_accuracy[_smoke])")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument("--smoke", action="store_true",
                   help=f"seconds: a width-48 ViT, 128 training images, one epoch per stage, one seed, target "
                        f"{SMOKE_TARGET}")
    args = p.parse_args(argv)
    defaults = {"dense_epochs": (8, 1), "sparse_epochs": (5, 1), "finetune_epochs": (4, 1), "latency_batch": (64, 4),
                "repeats": (15, 2), "bisect_steps": (7, 2), "table_repeats": (3, 1)}
    for name, (full, smoke) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, smoke if args.smoke else full)
    if args.smoke:
        for name, value in SMOKE_MODEL.items():
            setattr(args, name, value)
        if args.seeds == [0, 1, 2]:
            args.seeds = [0]
        if args.targets == [0.5]:
            args.targets = [SMOKE_TARGET]
    for name in ("width", "depth", "heads", "batch_size", "train_threads", "threads", *defaults):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}: expected an integer >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        p.error(f"--warmup: expected an integer >= 0, got {args.warmup}")
    if args.width % args.heads:
        p.error(f"--width: expected a multiple of --heads ({args.heads}), got {args.width}")
    if any(not 0 < t <= 1 for t in args.targets):
        p.error(f"--targets: expected shares of the dense latency in (0, 1], got {args.targets}")
    args.targets = sorted(set(args.targets), reverse=True)
    return args


def main(argv=None) -> Dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.train_threads)
    tag = args.tag or ("smoke" if args.smoke else "cpu")
    work_dir = args.work or os.path.join("runs", f"latency_accuracy{'_smoke' if args.smoke else ''}")
    # What decides the numbers; where the table is cached does not.
    work = Work(work_dir, settings_key(argparse.Namespace(**{k: v for k, v in vars(args).items() if k != "cache_dir"})))
    start = time.perf_counter()
    train_data, test_data = data(args.smoke)

    def make_dense():
        torch.manual_seed(0)
        model = build(args)
        train(model, train_data, args.dense_epochs, adamw(model, args.lr), batch_size=args.batch_size, seed=1,
              desc="dense", progress=False)
        return model, {"test_acc": accuracy(model, test_data)}

    dense, dense_meta = work.model("dense", make_dense)
    dense.eval()
    dense_macs = vtp.profile(dense).macs
    t0 = time.perf_counter()
    table = vtp.latency_table(dense, args.latency_batch, threads=args.threads, repeats=args.table_repeats,
                              cache_dir=args.cache_dir or os.path.join(work_dir, "cache"))
    table_s = time.perf_counter() - t0
    clock = Clock(args)
    gated_acc = {}
    for seed in args.seeds:
        def make_gated():
            model = vtp.add_gates(copy.deepcopy(dense))
            train(model, train_data, args.sparse_epochs, adamw(model, args.lr / 4, gate_lr=args.gate_lr), lam=args.lam,
                  batch_size=args.batch_size, seed=100 + seed, desc="sparse", progress=False)
            return model, {"test_acc": accuracy(model, test_data)}

        gated, meta = work.model(f"gated_seed{seed}", make_gated)
        gated_acc[str(seed)] = meta["test_acc"]
        for target in args.targets:
            if work.done(seed=seed, target=target):
                continue
            run = one_run(seed, target, gated, dense, table, dense_macs, clock, train_data, test_data, args)
            work.add(run)
            print(f"seed {seed} target {target:g}: latency plan {run['latency']['measured_share']:.3f} of dense, "
                  f"{100 * run['latency']['acc']:.2f} %; FLOPs plan (flops_target {run['flops_target']:.3f}) "
                  f"{run['flops']['measured_share']:.3f}, {100 * run['flops']['acc']:.2f} %")
    runs = [r for r in work.runs if r["seed"] in args.seeds and r["target"] in args.targets]
    record = {
        **records.record_head("latency_accuracy", __file__, argv, smoke=args.smoke,
                              device=environment.device_name(torch, torch.device("cpu"), cores=True),
                              packages=("python", "torch", "timm", "numpy", "mlxtend")),
        "config": {k: v for k, v in vars(args).items() if k not in ("out", "tag", "work", "cache_dir")},
        "seconds": time.perf_counter() - start, "dense_acc": dense_meta["test_acc"], "gated_acc": gated_acc,
        "dense_macs": dense_macs, "train_images": len(train_data[1]), "test_images": len(test_data[1]),
        "table": {"key": table.key, "measured": table.measured, "seconds_this_run": round(table_s, 2),
                  "dense_predicted_ms": table.dense_ms},
        "summary": summarise(runs), "runs": runs,
    }
    stem = os.path.join(args.out, f"latency_accuracy_{tag}")
    records.write_json(stem + ".json", record)
    if not args.no_plot:
        plot(record, stem + ".png")
    rows = [[f"{s['target']:g}", LABELS[arm], f"{s[arm]['measured_share_mean']:.3f}", f"{s[arm]['mac_share_mean']:.3f}",
             f"{s[arm]['acc_before_mean']:.2f}", f"{s[arm]['acc_mean']:.2f} ± {s[arm]['acc_std']:.2f}"]
            for s in record["summary"] for arm in ARMS]
    print(format_table(["target", "plan", "measured latency / dense", "MACs / dense", "top-1 % before FT",
                        "fine-tuned top-1 %"], rows, align="llrrrr"))
    for s in record["summary"]:
        d = s["latency_minus_flops"]
        print(f"target {s['target']:g}: latency minus FLOPs plan {d['mean']:+.2f} ± {d['std']:.2f} points "
              f"({d['latency_wins']} seeds latency, {d['flops_wins']} FLOPs, {d['ties']} tied): "
              f"{s['keeps_more']} keeps more")
    print(f"wrote {stem}.json" + ("" if args.no_plot else f" and {stem}.png") + f" ({record['seconds']:.0f} s)")
    return record


if __name__ == "__main__":
    main()
