"""``vtp demo``: the whole VTP pipeline on real MNIST digits, on the CPU, in minutes.

dense training -> sparse training (gates + L1) -> global plan (a MACs budget, or a share of
the gated dims) -> physical pruning -> fine-tuning distilled from the dense model ->
evaluation, then a table of accuracy, parameters, MACs and CPU throughput for the dense and
the pruned model. Everything lands in ``--out``.
"""
from __future__ import annotations

import argparse
import copy
import math
import time
from pathlib import Path
from typing import Iterator, Optional, Tuple

import torch
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer
from torch.utils.data import TensorDataset
from tqdm.auto import tqdm

from vtp import add_gates, gates, l1_penalty, param_groups, plan, profile, prune, save
from vtp.atomic import write_json
from vtp._plan import DEFAULT_ROUND_TO

from .checks import check_plan_flags
from .data import eval_loader
from .distill import Distiller
from .distributed import DistInfo
from .errors import VTPError
from .evaluate import evaluate, measure_throughput
from .mnist import load_mnist_5k, train_test_split
from .report import plot_gate_hist, plot_kept
from .tables import format_table
from .train import TrainConfig, train_step

__all__ = ["add_arguments", "run", "build_demo_model", "adamw", "train", "accuracy"]

CPU = DistInfo()


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--out", default="runs/demo", help="directory for models, plan, results.json and plots")
    parser.add_argument("--flops-target", type=float, default=0.5,
                        help="keep this share of the dense model's MACs (global ranking of |gate|)")
    parser.add_argument("--ratio", type=float, default=None,
                        help="prune this share of the gated dimensions at one global threshold instead of "
                             "--flops-target")
    parser.add_argument("--dense-epochs", type=int, default=20, help="epochs of ordinary training")
    parser.add_argument("--sparse-epochs", type=int, default=10, help="epochs of sparse training with the L1 gate penalty")
    parser.add_argument("--finetune-epochs", type=int, default=10, help="epochs of fine-tuning the pruned model")
    parser.add_argument("--lam", type=float, default=2e-4, help="weight of the L1 penalty on the gates")
    parser.add_argument("--lr", type=float, default=2e-3,
                        help="peak AdamW learning rate of dense training (sparse training uses a quarter)")
    # Measured at --flops-target 0.5, seed 0, one thread: 5e-4 with distillation lost 1.2
    # points to the dense model, 1e-4 lost 0.4; the pruned model starts close to it.
    parser.add_argument("--finetune-lr", type=float, default=1e-4,
                        help="peak AdamW learning rate of fine-tuning the pruned model")
    parser.add_argument("--gate-lr", type=float, default=1e-2, help="AdamW learning rate of the gates")
    parser.add_argument("--distill", action=argparse.BooleanOptionalAction, default=True,
                        help="fine-tune the pruned model with the dense one as teacher (soft distillation)")
    parser.add_argument("--distill-alpha", type=float, default=0.5,
                        help="weight of the distillation term in [0, 1]")
    parser.add_argument("--distill-tau", type=float, default=1.0, help="distillation temperature (> 0)")
    parser.add_argument("--batch-size", type=int, default=32, help="training batch size")
    parser.add_argument("--round-to", type=int, default=DEFAULT_ROUND_TO,
                        help="round kept counts up to a multiple of this")
    parser.add_argument("--seed", type=int, default=0, help="seed for the split, initialisation and batches")
    # One thread trains these batches of 32 tiny images fastest: more threads mostly wait on
    # each other, and lose badly when another job holds a core.
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser


def build_demo_model(num_classes: int = 10) -> nn.Module:
    """A small timm ViT for 28x28 digits: 7x7 patches (16 tokens + class token), 4 blocks of width 64."""
    return VisionTransformer(img_size=28, patch_size=7, in_chans=1, num_classes=num_classes, embed_dim=64,
                             depth=4, num_heads=4, mlp_ratio=4.0)


def _shuffled_batches(data, epochs: int, batch_size: int,
                     generator: torch.Generator) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """The in-memory digits in a fresh random order every epoch, batch after batch."""
    images, labels = data
    for _ in range(epochs):
        order = torch.randperm(len(labels), generator=generator)
        for start in range(0, len(labels), batch_size):
            idx = order[start: start + batch_size]
            yield images[idx], labels[idx]


def adamw(model: nn.Module, lr: float, gate_lr: Optional[float] = None) -> torch.optim.Optimizer:
    """AdamW over ``vtp.param_groups`` (weight decay 0.05 on weight matrices); the gates, if
    any, at ``gate_lr`` (default: ``lr``)."""
    groups = param_groups(model, weight_decay=0.05)
    for g in groups:
        g["lr"] = gate_lr if gate_lr is not None and "lr_scale" in g else lr
    return torch.optim.AdamW(groups, lr=lr)


def train(model: nn.Module, data, epochs: int, optimizer: torch.optim.Optimizer, *, lam: float = 0.0,
          batch_size: int, seed: int, desc: str, progress: bool = True,
          distiller: Distiller = None) -> None:
    """Epochs over ``data`` with linear warm-up then cosine decay of every group's lr, through
    the command's ``train_step``; adds ``lam * l1_penalty`` when ``lam > 0`` and mixes in the
    ``distiller``'s teacher when given."""
    steps_per_epoch = math.ceil(len(data[1]) / batch_size)
    total = epochs * steps_per_epoch
    warmup = min(steps_per_epoch, total // 5)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    cfg = TrainConfig(stage=desc, epochs=epochs, batch_size=batch_size, lr=base_lrs[0], lam=lam)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    criterion = nn.CrossEntropyLoss()
    batches = _shuffled_batches(data, epochs, batch_size, torch.Generator().manual_seed(seed))
    model.train()
    with tqdm(total=total, desc=desc, unit="step", disable=not progress, leave=True) as bar:
        for step in range(total):
            scale = (step + 1) / warmup if step < warmup else \
                0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))
            for group, lr in zip(optimizer.param_groups, base_lrs):
                group["lr"] = lr * scale
            optimizer.zero_grad(set_to_none=True)
            task, penalty, finite = train_step(model, model, batches, cfg, CPU, criterion,
                                               l1_penalty if lam > 0 else None, scaler,
                                               distiller=distiller)
            if not finite:
                raise ValueError(f"{desc}: the loss is not finite at step {step + 1}; lower --lr")
            optimizer.step()
            postfix = {"loss": f"{task:.3f}"}
            if lam > 0:
                postfix["L1"] = f"{penalty:.0f}"
            bar.set_postfix(postfix)
            bar.update()


def accuracy(model: nn.Module, data, batch_size: int = 500) -> float:
    """Share of ``data`` classified right, through the command's ``evaluate``."""
    loader = eval_loader(TensorDataset(*data), batch_size=batch_size, rank=0, world_size=1,
                         workers=0, pin_memory=False)
    result = evaluate(model, loader, CPU)
    correct = round(result["val_acc1"] * result["val_images"] / 100)  # an integer count, exactly
    return correct / result["val_images"]


def _check_args(args: argparse.Namespace) -> None:
    """Every bad setting is an error before the first training step, not after."""
    def fail(flag: str, expected: str, value) -> None:
        raise ValueError(f"--{flag}: expected {expected}, got {value!r}")

    for name in ("dense_epochs", "sparse_epochs", "finetune_epochs", "threads"):
        if getattr(args, name) < 0:
            fail(name.replace("_", "-"), "an integer >= 0", getattr(args, name))
    for name in ("batch_size",):
        if getattr(args, name) < 1:
            fail(name.replace("_", "-"), "an integer >= 1", getattr(args, name))
    for name in ("lr", "gate_lr", "finetune_lr"):
        if not getattr(args, name) > 0:
            fail(name.replace("_", "-"), "a learning rate > 0", getattr(args, name))
    if not args.lam >= 0:
        fail("lam", "a penalty weight >= 0", args.lam)
    try:  # vtp.plan's own rule, in the flags' words
        check_plan_flags(dict(ratio=args.ratio, round_to=args.round_to,
                              flops_target=args.flops_target if args.ratio is None else None))
    except VTPError as e:
        raise ValueError(str(e)) from None
    if not 0 <= args.distill_alpha <= 1:
        fail("distill-alpha", "a weight in [0, 1]", args.distill_alpha)
    if not args.distill_tau > 0:
        fail("distill-tau", "a temperature > 0", args.distill_tau)


def run(args: argparse.Namespace) -> dict:
    """Run the demo; returns the results dict also written to ``<out>/results.json``."""
    _check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    progress = not args.no_progress
    t_start = time.perf_counter()

    train_data, test_data = train_test_split(*load_mnist_5k(), test_size=1000, seed=args.seed)
    print(f"MNIST sample: {len(train_data[1])} training and {len(test_data[1])} test digits")
    torch.manual_seed(args.seed)
    model = build_demo_model()

    # 1. dense training
    opt = adamw(model, args.lr)
    train(model, train_data, args.dense_epochs, opt, batch_size=args.batch_size, seed=args.seed + 1,
          desc="1/3 dense training", progress=progress)
    dense_acc = accuracy(model, test_data)
    dense_profile = profile(model)
    save(model, out / "dense", metadata={"test_acc": dense_acc})
    dense = copy.deepcopy(model)

    # 2. sparse training: gates on all four sites, L1 penalty
    add_gates(model)
    opt = adamw(model, args.lr / 4, gate_lr=args.gate_lr)
    train(model, train_data, args.sparse_epochs, opt, lam=args.lam, batch_size=args.batch_size,
          seed=args.seed + 2, desc="2/3 sparse training", progress=progress)
    sparse_acc = accuracy(model, test_data)

    # 3. prune at one global threshold, then fine-tune the smaller model
    if args.ratio is not None:
        pruning_plan = plan(model, ratio=args.ratio, round_to=args.round_to)
    else:
        pruning_plan = plan(model, flops_target=args.flops_target, round_to=args.round_to)
    pruning_plan.save(str(out / "plan.json"))
    gate_snapshot = {name: g.detach().float().tolist() for name, g in gates(model).items()}
    small = prune(model, pruning_plan)
    pruned_acc_before = accuracy(small, test_data)
    opt = adamw(small, args.finetune_lr)
    distiller = Distiller(dense, "soft", args.distill_alpha, args.distill_tau) if args.distill else None
    train(small, train_data, args.finetune_epochs, opt, batch_size=args.batch_size, seed=args.seed + 3,
          desc="3/3 fine-tuning" + (" (distilled)" if distiller else ""), progress=progress,
          distiller=distiller)
    pruned_acc = accuracy(small, test_data)
    pruned_profile = profile(small)
    speed = measure_throughput({"dense": dense, "pruned": small}, img_size=(28, 28), batch_size=256,
                               repeats=15, device=torch.device("cpu"), in_chans=1)
    dense_speed, pruned_speed = speed["dense"], speed["pruned"]
    save(small, out / "pruned", metadata={"test_acc": pruned_acc, "plan_rule": pruning_plan.rule})

    results = {
        "dense": {"test_acc": dense_acc, **dense_profile.to_dict(), **dense_speed},
        "gated_after_sparse_training": {"test_acc": sparse_acc},
        "pruned_before_finetune": {"test_acc": pruned_acc_before},
        "pruned": {"test_acc": pruned_acc, **pruned_profile.to_dict(), **pruned_speed},
        "plan": {"ratio": args.ratio, "flops_target": None if args.ratio is not None else args.flops_target,
                 "pruned_share": pruning_plan.pruned_ratio, "rule": pruning_plan.rule},
        "args": vars(args) | {"func": None},
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "seconds": time.perf_counter() - t_start,
    }
    results["args"].pop("func")
    write_json(out / "results.json", results)
    plot_kept(pruning_plan.to_dict(), str(out / "kept_dims.png"))
    plot_gate_hist(gate_snapshot, pruning_plan.to_dict(), str(out / "gate_hist.png"))

    print()
    print(pruning_plan.summary())
    print()
    rows = []
    for name, acc, prof, rate in (("dense", dense_acc, dense_profile, dense_speed),
                                  ("pruned", pruned_acc, pruned_profile, pruned_speed)):
        rows.append([name, f"{100 * acc:.2f}", f"{prof.params / 1e6:.3f}", f"{prof.macs / 1e6:.2f}",
                     f"{rate['images_per_s']:.0f}"])
    print(format_table(["model", "top-1 %", "params (M)", "MACs (M)", "CPU images/s"], rows))
    how = (f"distilled from the dense model (alpha {args.distill_alpha}, tau {args.distill_tau})"
           if args.distill else "without distillation")
    budget = (f"a budget of {args.flops_target:.2f} of the dense MACs" if args.ratio is None
              else f"{100 * args.ratio:.0f} % of the gated dims at one threshold")
    print(f"\npruned to {budget}, fine-tuned {how}")
    print(f"before fine-tuning the pruned model scored {100 * pruned_acc_before:.2f} %; "
          f"MACs x{dense_profile.macs / pruned_profile.macs:.2f} fewer, "
          f"CPU speed-up x{pruned_speed['images_per_s'] / dense_speed['images_per_s']:.2f} "
          f"(batch 256, {torch.get_num_threads()} thread{'s' if torch.get_num_threads() != 1 else ''})")
    print(f"wrote {out}/: dense/, pruned/ (vtp.load), plan.json, results.json, kept_dims.png, gate_hist.png "
          f"in {results['seconds']:.0f} s")
    return results


def main(argv=None) -> dict:
    parser = add_arguments(argparse.ArgumentParser(prog="vtp demo", description=__doc__,
                                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
