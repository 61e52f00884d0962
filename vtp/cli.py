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
                     first_positional, model_kwargs_from_args, resolved_config, write_config)

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


def _sub(sub, name: str, help_text: str, description: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help_text, description=description,
                          formatter_class=HelpFormatter)


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

    p = _sub(sub, "demo", "the whole pipeline on MNIST digits, on a CPU, in minutes",
             "Dense training, sparse training, pruning and fine-tuning of a small ViT on real "
             "MNIST digits shipped with the package; prints a dense vs pruned table.")
    from . import demo
    demo.add_arguments(p)
    p.set_defaults(func=cmd_demo)
    subs["demo"] = p

    p = _sub(sub, "sparse-train", "train a dense model with gates and the L1 gate penalty",
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
    p.set_defaults(func=cmd_sparse_train)
    subs["sparse-train"] = p

    p = _sub(sub, "prune", "choose kept dimensions from the gates and shrink the model",
             "Pruning (VTP step 2): a plan from the gate values of a sparse-trained model "
             "(global threshold by default), then a physically smaller timm model. Writes "
             "plan.json, gates.json and model/.")
    add_config_arg(p)
    p.add_argument("source", nargs="?", default=None, metavar="SOURCE",
                   help="sparse-train directory, `vtp run` directory or vtp.save directory")
    add_prune_args(p)
    p.add_argument("--img-size", type=int, default=None,
                   help="resolution for MACs (and --flops-target); default: the model's")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"),
                   help="where to build the plan (cheap: cpu is fine)")
    add_output_args(p, "prune")
    p.set_defaults(func=cmd_prune)
    subs["prune"] = p

    p = _sub(sub, "finetune", "train the pruned model without the penalty",
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
    p.set_defaults(func=cmd_finetune)
    subs["finetune"] = p

    p = _sub(sub, "eval", "accuracy, parameters, MACs and images/s of a model",
             "Evaluates a saved model on the validation split and measures inference speed.")
    add_config_arg(p)
    p.add_argument("source", nargs="?", default=None, metavar="SOURCE",
                   help="vtp.save directory, stage directory or `vtp run` directory")
    add_data_args(p, train=False)
    add_eval_args(p)
    add_system_args(p)
    add_output_args(p, "eval")
    p.set_defaults(func=cmd_eval)
    subs["eval"] = p

    p = _sub(sub, "report", "dense vs pruned table and plots of a run",
             "Prints accuracy, parameters, MACs and images/s of the dense and pruned models "
             "and writes PNG plots: kept dimensions per block and site, the gate value "
             "distribution at pruning time, and training curves.")
    p.add_argument("run_dir", nargs="?", default=None, metavar="RUN", help="`vtp run` directory")
    p.add_argument("--output", "-o", metavar="DIR", default=None,
                   help="where to write report.md and the PNGs; default RUN/report")
    add_config_arg(p)
    p.set_defaults(func=cmd_report)
    subs["report"] = p

    p = _sub(sub, "run", "sparse-train, prune, finetune, eval and report in one go",
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
    p.set_defaults(func=cmd_run)
    subs["run"] = p
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


def _check_fresh_or_resume(out_dir: str, resume: bool, optional: bool = False) -> bool:
    """Refuses to train over an existing run unless asked to resume; True when resuming."""
    from .engine import CHECKPOINT_NAME

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


def _mixup_needs_even_batch(args: argparse.Namespace) -> None:
    mixup_on = not args.no_aug and args.mixup_prob > 0 and (args.mixup > 0 or args.cutmix > 0)
    if mixup_on and args.batch_size % 2:
        raise VTPError(f"--batch-size {args.batch_size}: mixup/cutmix need an even batch "
                       "(or pass --mixup 0 --cutmix 0)")


def _precheck(args, need_train: bool) -> None:
    """The cheap checks of a command's inputs, before any process group, folder or model."""
    from . import imagenet_data as data

    splits = ([args.train_split] if need_train else []) + ([args.val_split] if args.val_split else [])
    data.check_data_args(args.data, args.synthetic, splits)
    if need_train:
        _mixup_needs_even_batch(args)
    checkpoint = getattr(args, "checkpoint", None)
    if checkpoint and not os.path.exists(checkpoint):
        raise VTPError(f"--checkpoint not found: {checkpoint}")
    name = getattr(args, "model", None)
    if name is not None:
        import timm
        if not timm.is_model(name):
            raise VTPError(f"unknown timm model '{name}' (see timm.list_models())")


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
    """Raw (untransformed) ImageFolder datasets; synthetic ones come later, once the image
    size is known."""
    from . import imagenet_data as data

    splits = ([args.train_split] if need_train else []) + ([args.val_split] if args.val_split else [])
    data.check_data_args(args.data, args.synthetic, splits)
    if args.synthetic:
        return None, None, None
    train_ds, val_ds, spec = data.build_datasets(
        args.data, False, (0, 0), train_split=args.train_split if need_train else None,
        val_split=args.val_split or None, num_classes=args.num_classes)
    if class_map is not None and not need_train and val_ds is not None:
        # Evaluation reuses the class indices the model was trained with.
        val_ds, spec = _remap_val(args, class_map, spec)
    return train_ds, val_ds, spec


def _remap_val(args, class_map, spec):
    from . import imagenet_data as data

    ds = data.image_folder(args.data, args.val_split, class_map)
    spec.class_to_idx = dict(class_map)
    spec.num_classes = max(spec.num_classes, len(class_map))
    spec.val_size = len(ds)
    return ds, spec


def _finish_datasets(args, train_ds, val_ds, spec, settings, num_classes: int, need_train: bool):
    """Synthetic datasets, or transforms on top of the folder datasets."""
    from . import imagenet_data as data

    size = tuple(settings["img_size"])
    if args.synthetic:
        train_ds, val_ds, spec = data.build_datasets(
            None, True, size, train_split="train" if need_train else None, val_split="val",
            num_classes=num_classes, synthetic_size=getattr(args, "synthetic_size", 0),
            synthetic_val_size=args.synthetic_val_size)
        return train_ds, val_ds, spec
    if train_ds is not None:
        train_ds = data.with_transform(train_ds, data.train_transform(
            size, no_aug=args.no_aug, aa=args.aa, color_jitter=args.color_jitter,
            reprob=args.reprob, remode=args.remode, recount=args.recount,
            interpolation=args.interpolation, mean=settings["mean"], std=settings["std"]))
    if val_ds is not None:
        val_ds = data.with_transform(val_ds, data.eval_transform(
            size, crop_pct=args.crop_pct, interpolation=args.interpolation,
            mean=settings["mean"], std=settings["std"]))
    return train_ds, val_ds, spec


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
    if args.checkpoint:
        if os.path.isdir(args.checkpoint):
            src = args.checkpoint
            if not engine.is_vtp_dir(src):
                raise VTPError(f"--checkpoint {src}: a directory must be written by vtp.save")
            loaded, metadata = engine.load_vtp_model(src)
            engine.load_state(model, loaded.state_dict(), src, args.reset_head)
        else:
            engine.load_weights(model, args.checkpoint, reset_head=args.reset_head)
    return model, metadata


def _save_model(model, directory: str, metadata: Dict[str, Any], info) -> None:
    import vtp

    if info.is_main:
        try:
            vtp.save(model, directory, metadata=metadata)
        except (TypeError, ValueError, FileExistsError) as e:
            raise VTPError(f"cannot save the model to {directory}: {e}") from None


def _write_stage_config(ctx: Context, args, parser, out_dir: str, name: str = "config.yaml") -> None:
    if ctx.info.is_main:
        os.makedirs(out_dir, exist_ok=True)
        write_config(os.path.join(out_dir, name), resolved_config(args, parser))


def _write_summary(ctx: Context, out_dir: str, summary: Dict[str, Any]) -> None:
    from .engine import write_json

    if ctx.info.is_main:
        write_json(os.path.join(out_dir, "summary.json"), summary)


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


def stage_sparse_train(args, ctx: Context, out_dir: str, resume: bool, prefix: str = "",
                       after_step=None) -> Dict[str, Any]:
    import vtp

    from . import engine

    cfg = train_config(args, "sparse-train", prefix)
    _mixup_needs_even_batch(args)
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
    model.to(ctx.info.device)
    engine.seed_everything(args.seed + ctx.info.rank)
    ctx.say(f"sparse-train: {args.model}, {len(train_ds)} training images, {num_classes} "
            f"classes, lambda {cfg.lam}, lr {cfg.scaled_lr(ctx.info.world_size):.3g} for a global "
            f"batch of {cfg.global_batch(ctx.info.world_size)}; writing {out_dir}")
    summary = engine.fit(model, cfg, ctx.info, train_ds, val_ds, out_dir,
                         mixup_fn=_build_mixup(args, num_classes), resume=resume, say=ctx.say,
                         after_step=after_step)
    if summary["stopped"]:
        return summary
    meta = {"stage": "sparse-train", "model": args.model, "num_classes": num_classes,
            "data": {**settings, "class_to_idx": spec.class_to_idx if spec else None},
            "last_epoch": summary.get("last_epoch", {})}
    model.to("cpu")
    _save_model(model, os.path.join(out_dir, "model"), _plain(meta), ctx.info)
    summary["gate_stats"] = vtp.gate_stats(model)["all"]
    _write_summary(ctx, out_dir, _plain(summary))
    return summary


def stage_prune(args, ctx: Context, source: str, out_dir: str) -> Dict[str, Any]:
    import vtp

    from . import engine

    model, metadata = engine.load_vtp_model(source)
    if not vtp.gates(model):
        raise VTPError(f"{source}: the model has no gates; prune a sparse-trained model")
    img_size = (args.img_size,) * 2 if args.img_size else tuple(model.patch_embed.img_size)
    try:
        if args.plan:
            if not os.path.isfile(args.plan):
                raise VTPError(f"--plan {args.plan}: file not found")
            plan = vtp.PruningPlan.load(args.plan)
        else:
            plan = vtp.plan(model, None if args.flops_target else args.ratio, scope=args.scope,
                            flops_target=args.flops_target, round_to=args.round_to,
                            min_keep=args.min_keep, img_size=img_size)
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
        meta = {**metadata, "stage": "prune", "prune": summary}
        _save_model(pruned, os.path.join(out_dir, "model"), _plain(meta), ctx.info)
        _write_summary(ctx, out_dir, summary)
    ctx.say(plan.summary())
    ctx.say(f"prune: {_human(before.params)}-> {_human(after.params)}params, "
            f"{_human(before.macs)}-> {_human(after.macs)}MACs; wrote {out_dir}")
    engine.barrier(ctx.info)
    return summary


def stage_finetune(args, ctx: Context, source: str, out_dir: str, resume: bool,
                   prefix: str = "", after_step=None) -> Dict[str, Any]:
    from . import engine

    cfg = train_config(args, "finetune", prefix)
    _mixup_needs_even_batch(args)
    model, metadata = engine.load_vtp_model(source)
    settings = _data_settings(model, metadata)
    if args.img_size and args.img_size != settings["img_size"][0]:
        raise VTPError(f"--img-size {args.img_size}: the model in {source} takes "
                       f"{settings['img_size'][0]}")
    train_ds, val_ds, spec = _folder_datasets(args, need_train=True)
    num_classes = model.num_classes
    if spec is not None and spec.num_classes > num_classes:
        raise VTPError(f"{args.data} has {spec.num_classes} classes but the model in {source} "
                       f"predicts {num_classes}")
    train_ds, val_ds, spec = _finish_datasets(args, train_ds, val_ds, spec, settings, num_classes, True)
    saved_drop_path = engine.set_drop_path(model, args.drop_path)
    model.train().to(ctx.info.device)
    engine.seed_everything(args.seed + ctx.info.rank)
    ctx.say(f"finetune: {source}, {len(train_ds)} training images, lr "
            f"{cfg.scaled_lr(ctx.info.world_size):.3g} for a global batch of "
            f"{cfg.global_batch(ctx.info.world_size)}; writing {out_dir}")
    summary = engine.fit(model, cfg, ctx.info, train_ds, val_ds, out_dir,
                         mixup_fn=_build_mixup(args, num_classes), resume=resume, say=ctx.say,
                         after_step=after_step)
    if summary["stopped"]:
        return summary
    # The saved architecture keeps the drop-path rate it was described with.
    engine.set_drop_path(model, saved_drop_path)
    model.to("cpu")
    meta = {**metadata, "stage": "finetune", "source": os.path.abspath(source),
            "last_epoch": summary.get("last_epoch", {})}
    _save_model(model, os.path.join(out_dir, "model"), _plain(meta), ctx.info)
    _write_summary(ctx, out_dir, _plain(summary))
    return summary


def stage_eval(args, ctx: Context, model, metadata: Dict[str, Any], out_dir: str,
               name: str) -> Dict[str, Any]:
    """Accuracy on the validation split, size, MACs and measured images/s; eval.json."""
    import vtp

    from . import engine
    from . import imagenet_data as data

    settings = _data_settings(model, metadata)
    class_map = (metadata.get("data") or {}).get("class_to_idx")
    _, val_ds, spec = _folder_datasets(_eval_view(args), need_train=False, class_map=class_map)
    num_classes = model.num_classes
    _, val_ds, spec = _finish_datasets(_eval_view(args), None, val_ds, spec, settings,
                                       num_classes, False)
    model.eval().to(ctx.info.device)
    result: Dict[str, Any] = {"name": name}
    if val_ds is not None and len(val_ds):
        loader = data.eval_loader(val_ds, batch_size=args.eval_batch_size, rank=ctx.info.rank,
                                  world_size=ctx.info.world_size, workers=args.workers,
                                  pin_memory=ctx.info.device.type == "cuda")
        result.update(engine.evaluate(model, loader, ctx.info, args.amp, args.amp_dtype))
    prof = vtp.profile(model, tuple(settings["img_size"]))
    result.update(params=prof.params, macs=prof.macs, img_size=settings["img_size"])
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


def _eval_view(args):
    """Evaluation reads no training split; commands without augmentation flags still work."""
    view = argparse.Namespace(**vars(args))
    for key, value in (("train_split", None), ("synthetic_size", 0), ("no_aug", True)):
        if not hasattr(view, key):
            setattr(view, key, value)
    return view


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
    ctx = Context(args, "sparse-train")
    resume = _check_fresh_or_resume(ctx.out, args.resume)
    _write_stage_config(ctx, args, parser, ctx.out)
    stage_sparse_train(args, ctx, ctx.out, resume, after_step=after_step)
    return 0


def cmd_prune(args, parser) -> int:
    source = resolve_source(args.source, "prune")
    ctx = Context(args, "prune")
    _write_stage_config(ctx, args, parser, ctx.out)
    stage_prune(args, ctx, source, ctx.out)
    return 0


def cmd_finetune(args, parser, after_step=None) -> int:
    source = resolve_source(args.source, "finetune")
    _precheck(args, need_train=True)
    ctx = Context(args, "finetune")
    resume = _check_fresh_or_resume(ctx.out, args.resume)
    _write_stage_config(ctx, args, parser, ctx.out)
    stage_finetune(args, ctx, source, ctx.out, resume, after_step=after_step)
    return 0


def cmd_eval(args, parser) -> int:
    from . import engine

    source = resolve_source(args.source, "eval")
    _precheck(_eval_view(args), need_train=False)
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
        return os.path.isfile(os.path.join(dirs[name], "summary.json" if name in
                                           ("sparse-train", "prune", "finetune") else "eval.json"))

    if not args.resume and any(os.path.exists(d) for d in dirs.values()):
        raise VTPError(f"{run} already holds a run; pass --resume to continue it or choose "
                       "another --output")
    _write_stage_config(ctx, args, parser, run)

    if not done("eval-dense"):
        train_ds, val_ds, spec = _folder_datasets(args, need_train=True)
        num_classes = args.num_classes or (spec.num_classes if spec else 1000)
        model, metadata = dense_model(args, num_classes)
        meta = {**metadata, "data": {"class_to_idx": spec.class_to_idx if spec else None}}
        stage_eval(args, ctx, model, meta, dirs["eval-dense"], "dense")
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
