"""The ``vtp`` command: VTP's stages on ImageNet-style data, on one GPU or many (torchrun).

    vtp sparse-train  dense timm ViT + gates, trained with task loss + lambda * sum|gate|
    vtp prune         a plan from the gate values, then a physically smaller model
    vtp finetune      the pruned model, trained without the penalty
    vtp eval          accuracy, parameters, MACs and images/s of a saved model
    vtp report        dense vs pruned table and plots of a run
    vtp run           all of the above in one run directory
    vtp demo          the whole pipeline on MNIST digits, on a CPU, in minutes

Each stage writes a directory: config.yaml (resolved settings), metrics.jsonl,
checkpoints/last.pt, model/ (vtp.save) and summary.json once it is complete.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
from typing import Any, Dict, Optional, Sequence, Tuple

from .config import (FINETUNE_DEFAULTS, SPARSE_DEFAULTS, HelpFormatter, VTPError, add_config_arg,
                     add_data_args, add_eval_args, add_model_args, add_output_args, add_prune_args,
                     add_system_args, add_train_args, apply_yaml_config, find_config_path,
                     first_positional, model_kwargs_from_args, positive_int, resolved_config,
                     write_config)

__all__ = ["main", "build_parser"]

# Where a directory given as SOURCE keeps the model each command wants, first match wins:
# a vtp.save directory itself, a stage directory, or a `vtp run` directory.
SOURCE_DIRS = {
    "prune": ("model", "sparse-train/model"),
    "finetune": ("model", "prune/model"),
    "eval": ("model", "finetune/model", "prune/model", "sparse-train/model"),
}


# ---------------------------------------------------------------------------------------------
# Parser


def _sub(sub, subs: Dict[str, argparse.ArgumentParser], name: str, func, help_text: str,
         description: str) -> argparse.ArgumentParser:
    """A sub-command parser running `func`, registered in `subs`."""
    p = sub.add_parser(name, help=help_text, description=description,
                       formatter_class=HelpFormatter)
    p.set_defaults(func=func)
    subs[name] = p
    return p


def build_parser() -> Tuple[argparse.ArgumentParser, Dict[str, argparse.ArgumentParser]]:
    """The `vtp` parser and its sub-command parsers by name."""
    parser = argparse.ArgumentParser(
        prog="vtp", formatter_class=HelpFormatter,
        description="Vision Transformer Pruning (Zhu, Tang, Han 2021) for timm ViTs: sparse "
                    "training, pruning, fine-tuning, evaluation and reports.",
        epilog="Multi-GPU: torchrun --nproc_per_node 8 -m vtp.cli run ... (or the `vtp` script).\n"
               "Every command takes --config x.yaml; flags on the command line override it.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    subs: Dict[str, argparse.ArgumentParser] = {}

    p = _sub(sub, subs, "demo", cmd_demo,
             "the whole pipeline on MNIST digits, on a CPU, in minutes",
             "Dense training, sparse training, pruning and fine-tuning of a small ViT on real "
             "MNIST digits shipped with the package; prints a dense vs pruned table.")
    from . import demo
    add_config_arg(p)
    demo.add_arguments(p)

    p = _sub(sub, subs, "sparse-train", cmd_sparse_train,
             "train a dense model with gates and the L1 gate penalty",
             "Sparse training (VTP step 1): gates in front of qkv, proj, fc1 and fc2 of every "
             "block, trained with task loss + lambda * sum|gate|, from a trained model "
             "(--checkpoint). Writes model/ (the gated model) for `vtp prune`.")
    add_config_arg(p)
    add_data_args(p)
    add_model_args(p)
    _add_sites_arg(p)
    add_train_args(p, SPARSE_DEFAULTS)
    add_eval_args(p, bench=False)
    add_system_args(p)
    add_output_args(p, "sparse-train")

    p = _sub(sub, subs, "prune", cmd_prune,
             "choose kept dimensions from the gates and shrink the model",
             "Pruning (VTP step 2): a plan from the gate values of a sparse-trained model "
             "(global threshold by default), then a physically smaller timm model. Writes "
             "plan.json, gates.json and model/.")
    add_config_arg(p)
    p.add_argument("source", nargs="?", default=None, metavar="SOURCE",
                   help="sparse-train directory, `vtp run` directory or vtp.save directory")
    add_prune_args(p)
    p.add_argument("--img-size", type=positive_int, default=None,
                   help="resolution for MACs (and --flops-target); default: the model's")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"),
                   help="where to build the plan and the pruned model (cheap: cpu is fine)")
    add_output_args(p, "prune")

    p = _sub(sub, subs, "finetune", cmd_finetune,
             "train the pruned model without the penalty",
             "Fine-tuning (VTP step 3) of a pruned model with the DeiT recipe.")
    add_config_arg(p)
    p.add_argument("source", nargs="?", default=None, metavar="SOURCE",
                   help="prune directory, `vtp run` directory or vtp.save directory")
    add_data_args(p)
    add_model_args(p, dense=False)
    add_train_args(p, FINETUNE_DEFAULTS)
    add_eval_args(p, bench=False)
    add_system_args(p)
    add_output_args(p, "finetune")

    p = _sub(sub, subs, "eval", cmd_eval,
             "accuracy, parameters, MACs and images/s of a model",
             "Evaluates a saved model on the validation split and measures inference speed.")
    add_config_arg(p)
    p.add_argument("source", nargs="?", default=None, metavar="SOURCE",
                   help="vtp.save directory, stage directory or `vtp run` directory")
    add_data_args(p, train=False)
    add_eval_args(p)
    add_system_args(p)
    add_output_args(p, "eval")

    p = _sub(sub, subs, "report", cmd_report,
             "dense vs pruned table and plots of a run",
             "Prints accuracy, parameters, MACs and images/s of the dense and pruned models "
             "and writes PNG plots: kept dimensions per block and site, the gate value "
             "distribution at pruning time, and training curves.")
    p.add_argument("run_dir", nargs="?", default=None, metavar="RUN", help="`vtp run` directory")
    p.add_argument("--output", "-o", metavar="DIR", default=None,
                   help="where to write report.md and the PNGs; default RUN/report")
    add_config_arg(p)

    p = _sub(sub, subs, "run", cmd_run,
             "sparse-train, prune, finetune, eval and report in one go",
             "The whole VTP pipeline in one run directory: eval-dense/, sparse-train/, prune/, "
             "finetune/, eval-pruned/, report/. --resume picks up where it stopped.")
    add_config_arg(p)
    add_data_args(p)
    add_model_args(p)
    _add_sites_arg(p)
    add_train_args(p, SPARSE_DEFAULTS, prefix="sparse-", shared=False)
    add_train_args(p, FINETUNE_DEFAULTS, prefix="finetune-", shared=True)
    add_prune_args(p)
    add_eval_args(p)
    add_system_args(p)
    add_output_args(p, "run")
    return parser, subs


def _add_sites_arg(p: argparse.ArgumentParser) -> None:
    import vtp

    p.add_argument("--sites", nargs="+", default=list(vtp.SITES), choices=list(vtp.SITES),
                   help="which linear inputs of each block get gates")


# ---------------------------------------------------------------------------------------------
# Shared plumbing


class Context:
    """What every stage needs: processes, device, output directory and a rank-0 printer."""

    def __init__(self, args: argparse.Namespace, command: str):
        from . import engine

        kernels = getattr(args, "kernels", None)
        if kernels:
            import vtp_kernels
            vtp_kernels.set_backend(kernels)
        if getattr(args, "deterministic", False):
            import torch
            torch.use_deterministic_algorithms(True)
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        self.info = engine.init_distributed(getattr(args, "device", "cpu"),
                                            getattr(args, "dist_backend", "auto"))
        out = args.output or os.path.join(
            "runs", f"{command}-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}")
        self.out = engine.broadcast_object(out, self.info)
        if self.info.is_main:
            os.makedirs(self.out, exist_ok=True)
        engine.barrier(self.info)

    def say(self, text: str) -> None:
        if self.info.is_main:
            print(text, flush=True)


def _check_fresh_or_resume(out_dir: Optional[str], resume: bool, optional: bool = False) -> bool:
    """Refuses to train over an existing run unless asked to resume; True when resuming.
    `out_dir` None is a new, timestamped directory."""
    from .engine import CHECKPOINT_NAME

    if out_dir is None:
        if resume:
            raise VTPError("--resume: give the --output of the run to continue")
        return False
    ckpt = os.path.join(out_dir, "checkpoints", CHECKPOINT_NAME)
    if resume:
        if os.path.isfile(ckpt):
            return True
        if optional:
            return False
        raise VTPError(f"--resume: no checkpoint in {out_dir} (expected {ckpt})")
    if os.path.isfile(ckpt):
        raise VTPError(f"{out_dir} already holds a run ({ckpt}); pass --resume to continue it "
                       "or choose another --output")
    return False


def resolve_source(path: Optional[str], command: str) -> str:
    from .engine import is_vtp_dir

    if not path:
        raise VTPError(f"vtp {command}: give the SOURCE directory")
    if not os.path.exists(path):
        raise VTPError(f"SOURCE not found: {path}")
    if is_vtp_dir(path):
        return path
    for sub in SOURCE_DIRS[command]:
        candidate = os.path.join(path, sub)
        if is_vtp_dir(candidate):
            return candidate
    raise VTPError(f"{path} holds no model saved by vtp.save (looked in it and in its "
                   f"{', '.join(SOURCE_DIRS[command])} sub-folders)")


def train_config(args: argparse.Namespace, stage: str, prefix: str = ""):
    """TrainConfig of a stage from flags; `prefix` picks the per-stage flags of `vtp run`."""
    from .engine import TrainConfig

    def stage_value(name: str):
        return getattr(args, prefix.replace("-", "_") + name)

    lam = getattr(args, "lam", 0.0) if stage == "sparse-train" else 0.0
    return TrainConfig(
        stage=stage, epochs=stage_value("epochs"), lr=stage_value("lr"),
        warmup_epochs=stage_value("warmup_epochs"), min_lr=stage_value("min_lr"),
        batch_size=args.batch_size, accum_steps=args.accum_steps, lr_base_batch=args.lr_base_batch,
        warmup_lr=args.warmup_lr, weight_decay=args.weight_decay,
        gate_lr_scale=args.gate_lr_scale, opt_eps=args.opt_eps,
        opt_betas=tuple(args.opt_betas), clip_grad=args.clip_grad, lam=lam,
        smoothing=args.smoothing, seed=args.seed, aug_repeats=0 if args.no_aug else args.aug_repeats,
        workers=args.workers, save_every=args.save_every, stop_after_steps=args.stop_after_steps,
        log_every=args.log_every, amp=args.amp, amp_dtype=args.amp_dtype, compile=args.compile,
        progress=args.progress, eval_batch_size=args.eval_batch_size)


def _check_batch_for_mixup(args: argparse.Namespace) -> None:
    if args.batch_size % 2 and _build_mixup(args, num_classes=2) is not None:
        raise VTPError(f"--batch-size {args.batch_size}: mixup/cutmix need an even batch "
                       "(or pass --mixup 0 --cutmix 0)")


def _check_prune_args(args: argparse.Namespace) -> None:
    """Pruning settings that would otherwise fail only after sparse training."""
    import vtp

    if args.flops_target is not None and args.scope != "global":
        raise VTPError(f"--flops-target ranks dimensions over all gates; it does not go with "
                       f"--scope {args.scope}")
    if args.plan:
        if not os.path.isfile(args.plan):
            raise VTPError(f"--plan {args.plan}: file not found")
        try:
            vtp.PruningPlan.load(args.plan)
        except (OSError, ValueError) as e:
            raise VTPError(f"--plan {args.plan}: {e}") from None


def _check_source(args: argparse.Namespace, source: str, command: str) -> None:
    """What a command asks of the model in SOURCE, from its config.json alone."""
    from .engine import read_vtp_config

    config = read_vtp_config(source)
    model_args = config.get("model_args") or {}
    classes, size = model_args.get("num_classes"), list(model_args.get("img_size") or [])
    if args.num_classes is not None and args.num_classes != classes:
        raise VTPError(f"--num-classes {args.num_classes}: the model in {source} predicts "
                       f"{classes} classes")
    if args.img_size is not None and [args.img_size] * 2 != size:
        raise VTPError(f"--img-size {args.img_size}: the model in {source} takes "
                       f"{'x'.join(map(str, size))} images")
    if command == "finetune" and config.get("gated_sites") and config.get("plan") is None:
        raise VTPError(f"{source} holds a gated model that is not pruned; fine-tune what "
                       "`vtp prune` makes of it")


def _precheck(args, need_train: bool) -> None:
    """The cheap checks of a command's inputs, before any process group, folder or model."""
    from . import imagenet_data as data
    from .engine import is_vtp_dir

    splits = ([args.train_split] if need_train else []) + ([args.val_split] if args.val_split else [])
    data.check_data_args(args.data, args.synthetic, splits)
    if need_train:
        _check_batch_for_mixup(args)
        if not args.synthetic:
            try:  # a policy string timm does not know fails here, not at the first batch
                _train_transform(args, (32, 32), {"mean": (0.5,) * 3, "std": (0.5,) * 3})
            except Exception as e:
                raise VTPError(f"--aa {args.aa}: not a timm augmentation policy ({e})") from None
    checkpoint = getattr(args, "checkpoint", None)
    if checkpoint and not os.path.exists(checkpoint):
        raise VTPError(f"--checkpoint not found: {checkpoint}")
    if checkpoint and os.path.isdir(checkpoint) and not is_vtp_dir(checkpoint):
        raise VTPError(f"--checkpoint {checkpoint}: a directory must be written by vtp.save")
    name = getattr(args, "model", None)
    if name is not None:
        import timm
        if not timm.is_model(name):
            raise VTPError(f"unknown timm model '{name}' (see timm.list_models())")
    if hasattr(args, "flops_target"):
        _check_prune_args(args)


def _data_settings(model, metadata: Dict[str, Any]) -> Dict[str, Any]:
    """Image size and normalisation: a saved model's own, else the timm model's config."""
    from timm.data import resolve_model_data_config

    saved = metadata.get("data") or {}
    cfg = resolve_model_data_config(model)
    return {
        "img_size": [int(s) for s in model.patch_embed.img_size],
        "mean": list(saved.get("mean", cfg["mean"])),
        "std": list(saved.get("std", cfg["std"])),
    }


def _folder_datasets(args, need_train: bool, class_map: Optional[Dict[str, int]] = None):
    """Raw (untransformed) ImageFolder datasets, their class indices following `class_map`
    when given; synthetic ones come later, once the image size is known."""
    from . import imagenet_data as data

    if args.synthetic or not (need_train or args.val_split):
        return None, None, None
    return data.build_datasets(
        args.data, False, (0, 0), train_split=args.train_split if need_train else None,
        val_split=args.val_split or None, num_classes=args.num_classes, class_map=class_map)


def _train_transform(args, size, settings: Dict[str, Any]):
    from . import imagenet_data as data

    return data.train_transform(
        size, no_aug=args.no_aug, aa=args.aa, color_jitter=args.color_jitter,
        reprob=args.reprob, remode=args.remode, recount=args.recount,
        interpolation=args.interpolation, mean=settings["mean"], std=settings["std"])


def _finish_datasets(args, train_ds, val_ds, spec, settings, num_classes: int, need_train: bool):
    """Synthetic datasets, or transforms on top of the folder datasets."""
    from . import imagenet_data as data

    size = tuple(settings["img_size"])
    if args.synthetic:
        return data.build_datasets(
            None, True, size, train_split="train" if need_train else None, val_split="val",
            num_classes=num_classes, synthetic_size=getattr(args, "synthetic_size", 0),
            synthetic_val_size=args.synthetic_val_size)
    if train_ds is not None:
        train_ds = data.with_transform(train_ds, _train_transform(args, size, settings))
    if val_ds is not None:
        val_ds = data.with_transform(val_ds, data.eval_transform(
            size, crop_pct=args.crop_pct, interpolation=args.interpolation,
            mean=settings["mean"], std=settings["std"]))
    return train_ds, val_ds, spec


def _saved_model_datasets(args, model, metadata: Dict[str, Any], source: str, need_train: bool):
    """Datasets for a trained model: its class indices, image size and normalisation."""
    settings = _data_settings(model, metadata)
    class_map = (metadata.get("data") or {}).get("class_to_idx")
    train_ds, val_ds, spec = _folder_datasets(args, need_train, class_map)
    if spec is not None and spec.num_classes > model.num_classes:
        raise VTPError(f"{args.data} has {spec.num_classes} classes but the model in {source} "
                       f"predicts {model.num_classes}")
    train_ds, val_ds, spec = _finish_datasets(args, train_ds, val_ds, spec, settings,
                                              model.num_classes, need_train)
    return train_ds, val_ds, spec, settings


def _build_mixup(args, num_classes: int):
    from . import imagenet_data as data

    return data.build_mixup(no_aug=args.no_aug, mixup=args.mixup, cutmix=args.cutmix,
                            prob=args.mixup_prob, switch_prob=args.mixup_switch_prob,
                            mode=args.mixup_mode, smoothing=args.smoothing, num_classes=num_classes)


def dense_model(args, num_classes: int):
    """The dense starting model: timm architecture, optional local weights."""
    import torch

    from . import engine

    torch.manual_seed(args.seed)  # same initial weights in every process
    model = engine.create_dense_model(args.model, num_classes, model_kwargs_from_args(args),
                                      drop_path=0.0)
    metadata: Dict[str, Any] = {}
    if args.checkpoint and os.path.isdir(args.checkpoint):
        loaded, metadata = engine.load_vtp_model(args.checkpoint)
        engine.load_state(model, loaded.state_dict(), args.checkpoint, args.reset_head)
    elif args.checkpoint:
        engine.load_weights(model, args.checkpoint, reset_head=args.reset_head)
    return model, metadata


def _publish(ctx: Context, out_dir: str, model, metadata: Dict[str, Any],
             summary: Dict[str, Any]) -> None:
    """Rank 0 writes out_dir/model (vtp.save) and summary.json; every process returns once
    both are complete, so none reads them early (the next stage of `vtp run` loads model/)."""
    import vtp

    from . import engine

    error = None
    if ctx.info.is_main:
        directory = os.path.join(out_dir, "model")
        try:
            vtp.save(model, directory, metadata=_plain(metadata))
        except (TypeError, ValueError, FileExistsError) as e:
            error = f"cannot save the model to {directory}: {e}"
        else:
            engine.write_json(os.path.join(out_dir, "summary.json"), _plain(summary))
    # A collective: also the barrier, and every process stops on rank 0's error.
    error = engine.broadcast_object(error, ctx.info)
    if error:
        raise VTPError(error)


def _write_stage_config(ctx: Context, args, parser, out_dir: str) -> None:
    if ctx.info.is_main:
        os.makedirs(out_dir, exist_ok=True)
        write_config(os.path.join(out_dir, "config.yaml"), resolved_config(args, parser))


def _human(n: float) -> str:
    """1234567 -> '1.23 M': readable for DeiT-B and for test-sized models alike."""
    for scale, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.3g} "


def _plain(value):
    """JSON-friendly copy (tuples to lists, tensors and numpy scalars to numbers)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    return value


# ---------------------------------------------------------------------------------------------
# Stages (callable on their own or chained by `vtp run`)


def _train(args, ctx: Context, cfg, model, train_ds, val_ds, out_dir: str, resume: bool,
           after_step, headline: str) -> Dict[str, Any]:
    """The training loop of a stage on this process's device, after a first log line."""
    from . import engine

    model.to(ctx.info.device)
    engine.seed_everything(args.seed + ctx.info.rank)
    ctx.say(f"{headline}, lr {cfg.scaled_lr(ctx.info.world_size):.3g} for a global batch of "
            f"{cfg.global_batch(ctx.info.world_size)}; writing {out_dir}")
    return engine.fit(model, cfg, ctx.info, train_ds, val_ds, out_dir,
                      mixup_fn=_build_mixup(args, model.num_classes), resume=resume,
                      say=ctx.say, after_step=after_step)


def stage_sparse_train(args, ctx: Context, out_dir: str, resume: bool, prefix: str = "",
                       after_step=None) -> Dict[str, Any]:
    import vtp

    from . import engine

    cfg = train_config(args, "sparse-train", prefix)
    train_ds, val_ds, spec = _folder_datasets(args, need_train=True)
    num_classes = args.num_classes or (spec.num_classes if spec else 1000)
    model, metadata = dense_model(args, num_classes)
    engine.set_drop_path(model, args.drop_path)
    try:
        vtp.add_gates(model, args.sites)
    except (TypeError, ValueError) as e:
        raise VTPError(f"--model {args.model}: {e}") from None
    settings = _data_settings(model, metadata)
    train_ds, val_ds, spec = _finish_datasets(args, train_ds, val_ds, spec, settings, num_classes, True)
    summary = _train(args, ctx, cfg, model, train_ds, val_ds, out_dir, resume, after_step,
                     f"sparse-train: {args.model}, {len(train_ds)} training images, "
                     f"{num_classes} classes, lambda {cfg.lam}")
    if summary["stopped"]:
        return summary
    model.to("cpu")
    summary["gate_stats"] = vtp.gate_stats(model)["all"]
    meta = {"stage": "sparse-train", "model": args.model, "num_classes": num_classes,
            "data": {**settings, "class_to_idx": spec.class_to_idx if spec else None},
            "last_epoch": summary.get("last_epoch", {})}
    _publish(ctx, out_dir, model, meta, summary)
    return summary


def stage_prune(args, ctx: Context, source: str, out_dir: str) -> Dict[str, Any]:
    import vtp

    from . import engine

    model, metadata = engine.load_vtp_model(source)
    if not vtp.gates(model):
        raise VTPError(f"{source}: the model has no gates; prune a sparse-trained model")
    model.to(ctx.info.device)
    img_size = (args.img_size,) * 2 if args.img_size else tuple(model.patch_embed.img_size)
    try:
        if args.plan:
            plan = vtp.PruningPlan.load(args.plan)
        else:
            ratio = None if args.flops_target is not None else args.ratio
            plan = vtp.plan(model, ratio, scope=args.scope, flops_target=args.flops_target,
                            round_to=args.round_to, min_keep=args.min_keep, img_size=img_size)
        pruned = vtp.prune(model, plan, fold=not args.no_fold)
    except (TypeError, ValueError) as e:
        raise VTPError(f"cannot prune {source}: {e}") from None
    before, after = vtp.profile(model, img_size), vtp.profile(pruned, img_size)
    summary = {
        "source": os.path.abspath(source), "ratio": args.ratio, "scope": args.scope,
        "flops_target": args.flops_target, "round_to": args.round_to, "fold": not args.no_fold,
        "pruned_ratio": plan.pruned_ratio, "kept": plan.num_kept, "total": plan.total,
        "params_before": before.params, "params_after": after.params,
        "macs_before": before.macs, "macs_after": after.macs, "img_size": list(img_size),
    }
    if ctx.info.is_main:
        os.makedirs(out_dir, exist_ok=True)
        plan.save(os.path.join(out_dir, "plan.json"))
        engine.write_json(os.path.join(out_dir, "gates.json"),
                          {name: g.detach().float().tolist() for name, g in vtp.gates(model).items()})
    _publish(ctx, out_dir, pruned.to("cpu"), {**metadata, "stage": "prune", "prune": summary},
             summary)
    ctx.say(plan.summary())
    ctx.say(f"prune: {_human(before.params)}-> {_human(after.params)}params, "
            f"{_human(before.macs)}-> {_human(after.macs)}MACs; wrote {out_dir}")
    return summary


def stage_finetune(args, ctx: Context, source: str, out_dir: str, resume: bool,
                   prefix: str = "", after_step=None) -> Dict[str, Any]:
    from . import engine

    cfg = train_config(args, "finetune", prefix)
    model, metadata = engine.load_vtp_model(source)
    train_ds, val_ds, spec, settings = _saved_model_datasets(args, model, metadata, source,
                                                             need_train=True)
    saved_drop_path = engine.set_drop_path(model, args.drop_path)
    summary = _train(args, ctx, cfg, model, train_ds, val_ds, out_dir, resume, after_step,
                     f"finetune: {source}, {len(train_ds)} training images")
    if summary["stopped"]:
        return summary
    # The saved architecture keeps the drop-path rate it was described with.
    engine.set_drop_path(model, saved_drop_path)
    model.to("cpu")
    class_map = spec.class_to_idx if spec else (metadata.get("data") or {}).get("class_to_idx")
    meta = {**metadata, "stage": "finetune", "source": os.path.abspath(source),
            "data": {**settings, "class_to_idx": class_map},
            "last_epoch": summary.get("last_epoch", {})}
    _publish(ctx, out_dir, model, meta, summary)
    return summary


def stage_eval(args, ctx: Context, model, metadata: Dict[str, Any], out_dir: str,
               name: str) -> Dict[str, Any]:
    """Accuracy on the validation split, size, MACs and measured images/s; eval.json."""
    import vtp

    from . import engine
    from . import imagenet_data as data

    _, val_ds, _, settings = _saved_model_datasets(args, model, metadata, name, need_train=False)
    model.eval().to(ctx.info.device)
    result: Dict[str, Any] = {"name": name}
    if val_ds is not None and len(val_ds):
        loader = data.eval_loader(val_ds, batch_size=args.eval_batch_size, rank=ctx.info.rank,
                                  world_size=ctx.info.world_size, workers=args.workers,
                                  pin_memory=ctx.info.device.type == "cuda")
        result.update(engine.evaluate(model, loader, ctx.info, args.amp, args.amp_dtype))
    prof = vtp.profile(model, tuple(settings["img_size"]))
    result.update(params=prof.params, macs=prof.macs, **settings)
    if ctx.info.is_main and args.bench_steps > 0:
        result["images_per_s"] = engine.measure_throughput(
            model, tuple(settings["img_size"]), args.bench_batch_size, args.bench_steps,
            ctx.info.device, args.amp, args.amp_dtype)
        result.update(bench_batch_size=args.bench_batch_size, device=str(ctx.info.device),
                      amp=bool(args.amp))
    if ctx.info.is_main:
        os.makedirs(out_dir, exist_ok=True)
        engine.write_json(os.path.join(out_dir, "eval.json"), _plain(result))
        acc = f"top-1 {result['val_acc1']:.2f} %, " if "val_acc1" in result else ""
        ips = f", {result['images_per_s']:.1f} images/s" if "images_per_s" in result else ""
        ctx.say(f"eval {name}: {acc}{_human(prof.params)}params, {_human(prof.macs)}MACs{ips}")
    engine.barrier(ctx.info)
    model.to("cpu")
    return result


# ---------------------------------------------------------------------------------------------
# Commands


def cmd_demo(args, parser) -> int:
    from . import demo

    try:
        demo.run(args)
    except (ValueError, FileNotFoundError, ImportError) as e:
        raise VTPError(str(e)) from None
    return 0


def cmd_sparse_train(args, parser, after_step=None) -> int:
    _precheck(args, need_train=True)
    resume = _check_fresh_or_resume(args.output, args.resume)
    ctx = Context(args, "sparse-train")
    _write_stage_config(ctx, args, parser, ctx.out)
    stage_sparse_train(args, ctx, ctx.out, resume, after_step=after_step)
    return 0


def cmd_prune(args, parser) -> int:
    source = resolve_source(args.source, "prune")
    _check_prune_args(args)
    ctx = Context(args, "prune")
    _write_stage_config(ctx, args, parser, ctx.out)
    stage_prune(args, ctx, source, ctx.out)
    return 0


def cmd_finetune(args, parser, after_step=None) -> int:
    source = resolve_source(args.source, "finetune")
    _check_source(args, source, "finetune")
    _precheck(args, need_train=True)
    resume = _check_fresh_or_resume(args.output, args.resume)
    ctx = Context(args, "finetune")
    _write_stage_config(ctx, args, parser, ctx.out)
    stage_finetune(args, ctx, source, ctx.out, resume, after_step=after_step)
    return 0


def cmd_eval(args, parser) -> int:
    from . import engine

    source = resolve_source(args.source, "eval")
    _check_source(args, source, "eval")
    _precheck(args, need_train=False)
    ctx = Context(args, "eval")
    _write_stage_config(ctx, args, parser, ctx.out)
    model, metadata = engine.load_vtp_model(source)
    stage_eval(args, ctx, model, metadata, ctx.out, os.path.abspath(source))
    return 0


def cmd_report(args, parser) -> int:
    from . import report

    if not args.run_dir:
        raise VTPError("vtp report: give the RUN directory")
    if not os.path.isdir(args.run_dir):
        raise VTPError(f"RUN not found: {args.run_dir}")
    out = args.output or os.path.join(args.run_dir, "report")
    text = report.write_report(args.run_dir, out)
    print(text, flush=True)
    return 0


def cmd_run(args, parser, after_step=None) -> int:
    from . import engine, report

    _precheck(args, need_train=True)
    if args.resume and not (args.output and os.path.isfile(os.path.join(args.output, "config.yaml"))):
        raise VTPError("--resume: give the --output of the run to continue (it has no config.yaml)")
    ctx = Context(args, "run")
    run = ctx.out
    dirs = {name: os.path.join(run, name) for name in
            ("eval-dense", "sparse-train", "prune", "finetune", "eval-pruned", "report")}

    def done(name: str) -> bool:
        path = os.path.join(dirs[name], "eval.json" if name.startswith("eval") else "summary.json")
        # Rank 0's answer, so that every process takes the same branch.
        return engine.broadcast_object(os.path.isfile(path), ctx.info)

    if not args.resume and any(os.path.exists(d) for d in dirs.values()):
        raise VTPError(f"{run} already holds a run; pass --resume to continue it or choose "
                       "another --output")
    _write_stage_config(ctx, args, parser, run)

    if not done("eval-dense"):
        _, _, spec = _folder_datasets(args, need_train=True)
        num_classes = args.num_classes or (spec.num_classes if spec else 1000)
        model, metadata = dense_model(args, num_classes)
        # the class indices sparse training will use; normalisation as the checkpoint's
        data_meta = {**(metadata.get("data") or {}),
                     "class_to_idx": spec.class_to_idx if spec else None}
        stage_eval(args, ctx, model, {**metadata, "data": data_meta}, dirs["eval-dense"], "dense")
        del model

    if not done("sparse-train"):
        resume = _check_fresh_or_resume(dirs["sparse-train"], args.resume, optional=True)
        _write_stage_config(ctx, args, parser, dirs["sparse-train"])
        summary = stage_sparse_train(args, ctx, dirs["sparse-train"], resume, prefix="sparse-",
                                     after_step=after_step)
        if summary["stopped"]:
            return 0

    if not done("prune"):
        stage_prune(args, ctx, os.path.join(dirs["sparse-train"], "model"), dirs["prune"])

    if not done("finetune"):
        resume = _check_fresh_or_resume(dirs["finetune"], args.resume, optional=True)
        _write_stage_config(ctx, args, parser, dirs["finetune"])
        summary = stage_finetune(args, ctx, os.path.join(dirs["prune"], "model"), dirs["finetune"],
                                 resume, prefix="finetune-", after_step=after_step)
        if summary["stopped"]:
            return 0

    model, metadata = engine.load_vtp_model(os.path.join(dirs["finetune"], "model"))
    stage_eval(args, ctx, model, metadata, dirs["eval-pruned"], "pruned")
    if ctx.info.is_main:
        print(report.write_report(run, dirs["report"]), flush=True)
    return 0


# ---------------------------------------------------------------------------------------------
# Entry point


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs one `vtp` command; returns the exit status (argparse errors exit with 2)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, subs = build_parser()
    command = first_positional(argv)
    config_path = find_config_path(argv)
    if config_path and command in subs:
        apply_yaml_config(subs[command], config_path)
    args = parser.parse_args(argv)
    sub_parser = subs[args.command]
    try:
        return int(args.func(args, sub_parser) or 0)
    except VTPError as e:
        print(f"vtp {args.command}: error: {e}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print(f"vtp {args.command}: interrupted; the last checkpoint is kept (continue with "
              "--resume)", file=sys.stderr, flush=True)
        return 130
    finally:
        from .engine import cleanup_distributed
        cleanup_distributed()


if __name__ == "__main__":
    sys.exit(main())
