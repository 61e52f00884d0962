"""The stages a ``vtp`` command runs: dense training, sparse training, pruning, fine-tuning
and evaluation.

Each stage works in its own directory (config.yaml, metrics.jsonl, checkpoints/last.pt,
model/ and summary.json once complete) and can run on its own (``vtp prune``, ...) or
chained by ``vtp run``. Before a stage does any work, ``precheck`` and ``check_source``
stop on bad input with one message.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import tempfile
from typing import Any, Dict, NamedTuple, Optional

import timm
import torch
from timm.data import resolve_model_data_config

import vtp
import vtp_kernels
from vtp.atomic import write_json
from vtp._export import OnnxRuntimeModel
from vtp.io import check_saveable, is_model_dir, read_config
from vtp._profile import check_img_size, default_img_size, input_channels

from . import data, distributed, models, train
from .checkpoint import check_fresh_or_resume
from .distill import Distiller
from .errors import VTPError
from .evaluate import evaluate, measure_throughput
from .flags import model_kwargs_from_args, resolved_config, write_config
from .metrics import jsonable
from .random import seed_everything
from .teacher import (TeacherSpec, build_teacher, check_teacher, dense_record, resolve_teacher,
                      teacher_from_directory, teacher_shape)

__all__ = ["Context", "SOURCE_DIRS", "resolve_source", "check_source", "check_prune_args",
           "precheck", "check_fresh_or_resume", "check_trained_start", "check_run_teacher",
           "finetune_teacher", "write_stage_config", "dense_model", "stage_train",
           "stage_sparse_train", "stage_prune", "stage_finetune", "stage_eval", "stage_eval_dense",
           "check_export_args", "check_runtime", "stage_export"]

# Where a directory given as SOURCE keeps the model each command wants, first match wins:
# a vtp.save directory itself, a stage directory, or a `vtp run` directory.
SOURCE_DIRS = {
    "prune": ("model", "sparse-train/model"),
    "finetune": ("model", "prune/model"),
    "eval": ("model", "finetune/model", "prune/model", "sparse-train/model"),
    "export": ("model", "finetune/model", "prune/model", "sparse-train/model"),
}


class Context:
    """What every stage needs: processes, device, output directory and a rank-0 printer."""

    def __init__(self, args: argparse.Namespace, command: str):
        kernels = getattr(args, "kernels", None)
        if kernels:
            vtp_kernels.set_backend(kernels)
        if getattr(args, "deterministic", False):
            torch.use_deterministic_algorithms(True)
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        self.info = distributed.init_distributed(getattr(args, "device", "cpu"),
                                                 getattr(args, "dist_backend", "auto"))
        out = args.output or os.path.join(
            "runs", f"{command}-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}")
        self.out = distributed.broadcast_object(out, self.info)
        if self.info.is_main:
            os.makedirs(self.out, exist_ok=True)
        distributed.barrier(self.info)

    def say(self, text: str) -> None:
        if self.info.is_main:
            print(text, flush=True)


# ---------------------------------------------------------------------------------------------
# Checks before any work


def resolve_source(path: Optional[str], command: str) -> str:
    """The vtp.save directory a command's SOURCE names: itself or one of its stage folders."""
    if not path:
        raise VTPError(f"vtp {command}: give the SOURCE directory")
    if not os.path.exists(path):
        raise VTPError(f"SOURCE not found: {path}")
    if is_model_dir(path):
        return path
    for sub in SOURCE_DIRS[command]:
        candidate = os.path.join(path, sub)
        if is_model_dir(candidate):
            return candidate
    raise VTPError(f"{path} holds no model saved by vtp.save (looked in it and in its "
                   f"{', '.join(SOURCE_DIRS[command])} sub-folders)")


def check_source(args: argparse.Namespace, source: str, command: str) -> None:
    """What a command asks of the model in SOURCE, from its config.json alone."""
    try:
        saved = read_config(source)
    except (OSError, ValueError) as e:
        raise VTPError(f"SOURCE {source}: {e}") from None
    if args.num_classes is not None and args.num_classes != saved.num_classes:
        raise VTPError(f"--num-classes {args.num_classes}: the model in {source} predicts "
                       f"{saved.num_classes} classes")
    if args.img_size is not None and (args.img_size,) * 2 != saved.img_size:
        raise VTPError(f"--img-size {args.img_size}: the model in {source} takes "
                       f"{'x'.join(map(str, saved.img_size))} images")
    if command == "finetune" and saved.is_gated:
        raise VTPError(f"{source} holds a gated model that is not pruned; fine-tune what "
                       "`vtp prune` makes of it")


def check_prune_args(args: argparse.Namespace) -> None:
    """Pruning settings that would otherwise fail only after sparse training."""
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


def precheck(args: argparse.Namespace, need_train: bool) -> None:
    """The cheap checks of a command's inputs, before any process group, folder or model."""
    splits = ([args.train_split] if need_train else []) + ([args.val_split] if args.val_split else [])
    data.check_data_args(args.data, args.synthetic, splits)
    if need_train:
        if args.batch_size % 2 and _build_mixup(args, num_classes=2) is not None:
            raise VTPError(f"--batch-size {args.batch_size}: mixup/cutmix need an even batch "
                           "(or pass --mixup 0 --cutmix 0)")
        if not args.synthetic:
            try:  # a policy string timm does not know fails here, not at the first batch
                _train_transform(args, (32, 32), {"mean": (0.5,) * 3, "std": (0.5,) * 3})
            except Exception as e:
                raise VTPError(f"--aa {args.aa}: not a timm augmentation policy ({e})") from None
    checkpoint = getattr(args, "checkpoint", None)
    if checkpoint and not os.path.exists(checkpoint):
        raise VTPError(f"--checkpoint not found: {checkpoint}")
    if checkpoint and os.path.isdir(checkpoint) and not is_model_dir(checkpoint):
        raise VTPError(f"--checkpoint {checkpoint}: a directory must be written by vtp.save")
    pretrained_path = getattr(args, "pretrained_path", None)
    if checkpoint and models.starts_pretrained(args):
        raise VTPError("--checkpoint and --pretrained both give the starting weights: pass one")
    if pretrained_path and not os.path.isfile(pretrained_path):
        raise VTPError(f"--pretrained-path not found: {pretrained_path}")
    name = getattr(args, "model", None)
    if name is not None and not timm.is_model(name):
        raise VTPError(f"unknown timm model '{name}' (see timm.list_models())")
    if hasattr(args, "flops_target"):
        check_prune_args(args)
    if getattr(args, "teacher", None) and not getattr(args, "distill", False):
        raise VTPError(f"--teacher {args.teacher}: add --distill to fine-tune with a teacher")


def _expected_classes(args: argparse.Namespace) -> int:
    """The class count a dense model will get, from the flags and the class folders alone."""
    if args.num_classes:
        return args.num_classes
    if args.synthetic:
        return 1000
    root = os.path.join(args.data, args.train_split)
    return sum(1 for entry in os.scandir(root) if entry.is_dir())


def check_trained_start(args: argparse.Namespace) -> None:
    """`vtp run` prunes a trained model: a checkpoint, pretrained weights that already
    predict these classes, or one trained by the run's own dense stage (--train-epochs)."""
    if args.train_epochs > 0:
        return
    pretrained = models.starts_pretrained(args)
    how = ("pass --checkpoint PATH (a trained timm checkpoint file, or a model directory "
           "written by `vtp train` or vtp.save), or add --train-epochs N to train the dense "
           "model in this run first (what `vtp train` does)")
    if not args.checkpoint and not pretrained:
        raise VTPError("vtp run prunes a trained model, and none was given: without "
                       f"--checkpoint it would prune random weights. To get one, {how}")
    if args.checkpoint and args.reset_head:
        raise VTPError("--reset-head starts the classifier afresh: the run would prune a model "
                       "that has never seen these classes; add --train-epochs N to train it first")
    if pretrained:
        have = models.pretrained_classes(args.model, args.pretrained_path)
        want = _expected_classes(args)
        if have != want:
            raise VTPError(f"--pretrained: the weights predict {have} classes, the data has {want}: "
                           "the classifier would start afresh and the run would prune a model "
                           "that has never seen these classes; add --train-epochs N to "
                           "fine-tune it first")


def check_run_teacher(args: argparse.Namespace) -> None:
    """A teacher directory given to `vtp run --distill`, checked before any work ('dense' and
    'gated' are made by the run itself)."""
    if not args.distill or (args.teacher or "dense") in ("dense", "gated"):
        return
    classes, _ = teacher_shape(teacher_from_directory(args.teacher))
    want = _expected_classes(args)
    if classes != want:
        raise VTPError(f"--teacher {args.teacher} predicts {classes} classes, the data has {want}")


def finetune_teacher(args: argparse.Namespace, source: str) -> Optional[TeacherSpec]:
    """The teacher of fine-tuning the model in `source` (None without --distill), found
    from the flags and the model's records, and checked against the model."""
    if not args.distill:
        return None
    saved = read_config(source)
    spec = resolve_teacher(args.teacher, saved.metadata, source)
    check_teacher(spec, saved.num_classes, saved.img_size)
    return spec


# ---------------------------------------------------------------------------------------------
# Settings, data and models of a stage


# What shapes the training images: recorded with the run, so that resuming with other
# values is pointed out.
AUGMENTATION_FLAGS = ("no_aug", "aa", "color_jitter", "reprob", "remode", "recount", "mixup", "cutmix",
                      "mixup_prob", "mixup_switch_prob", "mixup_mode", "interpolation", "crop_pct",
                      "drop_path")


def train_config(args: argparse.Namespace, stage: str, prefix: str = "") -> train.TrainConfig:
    """TrainConfig of a stage from flags; `prefix` picks the per-stage flags of `vtp run`."""
    def stage_value(name: str):
        return getattr(args, prefix.replace("-", "_") + name)

    lam = getattr(args, "lam", 0.0) if stage == "sparse-train" else 0.0
    distill = stage == "finetune" and getattr(args, "distill", False)
    return train.TrainConfig(
        stage=stage, epochs=stage_value("epochs"), lr=stage_value("lr"),
        warmup_epochs=stage_value("warmup_epochs"), min_lr=stage_value("min_lr"),
        batch_size=args.batch_size, accum_steps=args.accum_steps, lr_base_batch=args.lr_base_batch,
        warmup_lr=args.warmup_lr, weight_decay=args.weight_decay,
        gate_lr_scale=args.gate_lr_scale, opt_eps=args.opt_eps,
        opt_betas=tuple(args.opt_betas), clip_grad=args.clip_grad, lam=lam,
        smoothing=args.smoothing, seed=args.seed, aug_repeats=0 if args.no_aug else args.aug_repeats,
        workers=args.workers, save_every=args.save_every, stop_after_steps=args.stop_after_steps,
        log_every=args.log_every, amp=args.amp, amp_dtype=args.amp_dtype, compile=args.compile,
        progress=args.progress, eval_batch_size=args.eval_batch_size,
        distill=args.distill_type if distill else "none",
        distill_alpha=args.distill_alpha if distill else 0.0,
        distill_tau=args.distill_tau if distill else 1.0,
        augmentation={k: getattr(args, k) for k in AUGMENTATION_FLAGS if hasattr(args, k)})


def _data_settings(model, metadata: Dict[str, Any]) -> Dict[str, Any]:
    """Image size and normalisation: a saved model's own, else the timm model's config."""
    saved = metadata.get("data") or {}
    cfg = resolve_model_data_config(model)
    return {
        "img_size": list(default_img_size(model)),
        "mean": list(saved.get("mean", cfg["mean"])),
        "std": list(saved.get("std", cfg["std"])),
    }


def _folder_datasets(args, need_train: bool, class_map: Optional[Dict[str, int]] = None):
    """Raw (untransformed) ImageFolder datasets, their class indices following `class_map`
    when given; synthetic ones come later, once the image size is known."""
    if args.synthetic or not (need_train or args.val_split):
        return None, None, None
    return data.build_datasets(
        args.data, False, (0, 0), train_split=args.train_split if need_train else None,
        val_split=args.val_split or None, num_classes=args.num_classes, class_map=class_map)


def _train_transform(args, size, settings: Dict[str, Any]):
    return data.train_transform(
        size, no_aug=args.no_aug, aa=args.aa, color_jitter=args.color_jitter,
        reprob=args.reprob, remode=args.remode, recount=args.recount,
        interpolation=args.interpolation, mean=settings["mean"], std=settings["std"])


def _finish_datasets(args, train_ds, val_ds, spec, settings, num_classes: int, need_train: bool):
    """Synthetic datasets, or transforms on top of the folder datasets."""
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
    return data.build_mixup(no_aug=args.no_aug, mixup=args.mixup, cutmix=args.cutmix,
                            prob=args.mixup_prob, switch_prob=args.mixup_switch_prob,
                            mode=args.mixup_mode, smoothing=args.smoothing, num_classes=num_classes)


def dense_model(args, num_classes: int):
    """The dense starting model: timm architecture with random, pretrained or local weights;
    returns (model, the metadata of a vtp.save checkpoint, the record of how it was built)."""
    torch.manual_seed(args.seed)  # same initial weights in every process
    kwargs = model_kwargs_from_args(args)
    pretrained_path = getattr(args, "pretrained_path", None)
    pretrained = models.starts_pretrained(args)
    model = models.create_dense_model(args.model, num_classes, kwargs, drop_path=0.0,
                                      pretrained=pretrained, pretrained_path=pretrained_path)
    metadata: Dict[str, Any] = {}
    head_reset = pretrained and models.pretrained_classes(args.model, pretrained_path) != num_classes
    if args.checkpoint and os.path.isdir(args.checkpoint):
        loaded, metadata = models.load_vtp_model(args.checkpoint)
        head_reset = models.load_state(model, loaded.state_dict(), args.checkpoint, args.reset_head)
    elif args.checkpoint:
        head_reset = models.load_weights(model, args.checkpoint, reset_head=args.reset_head)
    return model, metadata, dense_record(args, num_classes, kwargs, head_reset)


# ---------------------------------------------------------------------------------------------
# Writing a stage's results


def write_stage_config(ctx: Context, args, parser, out_dir: str) -> None:
    if ctx.info.is_main:
        write_config(os.path.join(out_dir, "config.yaml"), resolved_config(args, parser))


def _publish(ctx: Context, out_dir: str, model, metadata: Dict[str, Any],
             summary: Dict[str, Any]) -> None:
    """Rank 0 writes out_dir/model (vtp.save) and summary.json; every process returns once
    both are complete, so none reads them early (the next stage of `vtp run` loads model/)."""
    error = None
    if ctx.info.is_main:
        directory = os.path.join(out_dir, "model")
        try:
            vtp.save(model, directory, metadata=jsonable(metadata))
        except (TypeError, ValueError, FileExistsError) as e:
            error = f"cannot save the model to {directory}: {e}"
        else:
            write_json(os.path.join(out_dir, "summary.json"), jsonable(summary))
    # A collective: also the barrier, and every process stops on rank 0's error.
    error = distributed.broadcast_object(error, ctx.info)
    if error:
        raise VTPError(error)


def _human(n: float) -> str:
    """1234567 -> '1.23 M': readable for DeiT-B and for test-sized models alike."""
    for scale, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.3g} "


# ---------------------------------------------------------------------------------------------
# Stages (callable on their own or chained by `vtp run`)


def _train(args, ctx: Context, cfg: train.TrainConfig, model, train_ds, val_ds, out_dir: str,
           resume: bool, after_step, headline: str,
           distiller: Optional[Distiller] = None) -> Dict[str, Any]:
    """The training loop of a stage on this process's device, after a first log line."""
    model.to(ctx.info.device)
    seed_everything(args.seed + ctx.info.rank)
    ctx.say(f"{headline}, lr {cfg.scaled_lr(ctx.info.world_size):.3g} for a global batch of "
            f"{cfg.global_batch(ctx.info.world_size)}; writing {out_dir}")
    return train.fit(model, cfg, ctx.info, train_ds, val_ds, out_dir,
                     mixup_fn=_build_mixup(args, model.num_classes), resume=resume,
                     say=ctx.say, after_step=after_step, distiller=distiller)


def _starting_point(args) -> str:
    if args.checkpoint:
        return f"from {args.checkpoint}"
    if models.starts_pretrained(args):
        return f"from timm's pretrained weights{f' ({args.pretrained_path})' if args.pretrained_path else ''}"
    return "from random weights"


def _img_size(args, model):
    """--img-size (default: the model's), once the model is known to take it."""
    size = (args.img_size,) * 2 if args.img_size else default_img_size(model)
    try:
        check_img_size(model, size)
    except ValueError as e:
        raise VTPError(f"--img-size {args.img_size}: {str(e).removeprefix('img_size: ')}") from None
    return size


def _check_saveable(args, model) -> None:
    """A model vtp.save would refuse stops the stage before training, not after."""
    try:
        check_saveable(model)
    except TypeError as e:
        raise VTPError(f"--model {args.model}: the trained model could not be saved: {e}") from None


class DenseStart(NamedTuple):
    """What a training stage from a dense model starts with."""
    model: Any
    record: Dict[str, Any]        # how the dense model was built (dense_record)
    num_classes: int
    settings: Dict[str, Any]      # the data settings the model takes
    train_ds: Any
    val_ds: Any
    spec: Any                     # the DataSpec, None for synthetic data

    def metadata(self, args, stage: str) -> Dict[str, Any]:
        return {"stage": stage, "model": args.model, "num_classes": self.num_classes,
                "data": {**self.settings, "class_to_idx": self.spec.class_to_idx if self.spec else None}}


def _dense_start(args, ctx: Context, gated: bool) -> DenseStart:
    """Data and the dense starting model of `vtp train` (gated=False) or `vtp sparse-train`
    (gates added), checked saveable before the first step."""
    train_ds, val_ds, spec = _folder_datasets(args, need_train=True)
    num_classes = args.num_classes or (spec.num_classes if spec else 1000)
    model, metadata, record = dense_model(args, num_classes)
    if gated and not args.checkpoint and not record["pretrained"]:
        ctx.say("warning: sparse training starts from random weights (no --checkpoint or "
                "--pretrained); VTP prunes a trained model: see `vtp train`")
    models.set_drop_path(model, args.drop_path)
    if gated:
        try:
            vtp.add_gates(model, args.sites)
        except (TypeError, ValueError) as e:
            raise VTPError(f"--model {args.model}: {e}") from None
    _check_saveable(args, model)
    settings = _data_settings(model, metadata)
    train_ds, val_ds, spec = _finish_datasets(args, train_ds, val_ds, spec, settings, num_classes, True)
    return DenseStart(model, record, num_classes, settings, train_ds, val_ds, spec)


def stage_train(args, ctx: Context, out_dir: str, resume: bool, prefix: str = "",
                after_step=None) -> Dict[str, Any]:
    """Dense training (`vtp train`, and `vtp run --train-epochs`): an ordinary timm model
    trained or fine-tuned on the data; writes model/ for sparse training to start from."""
    cfg = train_config(args, "train", prefix)
    start = _dense_start(args, ctx, gated=False)
    summary = _train(args, ctx, cfg, start.model, start.train_ds, start.val_ds, out_dir, resume, after_step,
                     f"train: {args.model} {_starting_point(args)}, {len(start.train_ds)} training "
                     f"images, {start.num_classes} classes")
    if summary["stopped"]:
        return summary
    models.set_drop_path(start.model, 0.0)  # the saved model describes inference, not a recipe
    start.model.to("cpu")
    meta = {**start.metadata(args, "train"), "started_from": start.record,
            "last_epoch": summary.get("last_epoch", {})}
    _publish(ctx, out_dir, start.model, meta, summary)
    return summary


def stage_sparse_train(args, ctx: Context, out_dir: str, resume: bool, prefix: str = "",
                       after_step=None) -> Dict[str, Any]:
    cfg = train_config(args, "sparse-train", prefix)
    start = _dense_start(args, ctx, gated=True)
    summary = _train(args, ctx, cfg, start.model, start.train_ds, start.val_ds, out_dir, resume, after_step,
                     f"sparse-train: {args.model}, {len(start.train_ds)} training images, "
                     f"{start.num_classes} classes, lambda {cfg.lam}")
    if summary["stopped"]:
        return summary
    start.model.to("cpu")
    summary["gate_stats"] = vtp.gate_stats(start.model)["all"]
    meta = {**start.metadata(args, "sparse-train"), "dense": start.record,
            "last_epoch": summary.get("last_epoch", {})}
    _publish(ctx, out_dir, start.model, meta, summary)
    return summary


def stage_prune(args, ctx: Context, source: str, out_dir: str) -> Dict[str, Any]:
    model, metadata = models.load_vtp_model(source)
    if not vtp.gates(model):
        raise VTPError(f"{source}: the model has no gates; prune a sparse-trained model")
    model.to(ctx.info.device)
    img_size = _img_size(args, model)
    try:
        if args.plan:
            plan = vtp.PruningPlan.load(args.plan)
        else:
            ratio = None if args.flops_target is not None else args.ratio
            plan = vtp.plan(model, ratio, scope=args.scope, flops_target=args.flops_target,
                            round_to=args.round_to, min_keep=args.min_keep, img_size=img_size)
        pruned = vtp.prune(model, plan, fold=not args.no_fold, layout=args.layout)
    except (TypeError, ValueError) as e:
        raise VTPError(f"cannot prune {source}: {e}") from None
    before, after = vtp.profile(model, img_size), vtp.profile(pruned, img_size)
    summary = {
        "source": os.path.abspath(source), "ratio": args.ratio, "scope": args.scope,
        "flops_target": args.flops_target, "round_to": args.round_to, "fold": not args.no_fold,
        "layout": args.layout,
        "pruned_ratio": plan.pruned_ratio, "kept": plan.num_kept, "total": plan.total,
        "params_before": before.params, "params_after": after.params,
        "macs_before": before.macs, "macs_after": after.macs, "img_size": list(img_size),
    }
    if ctx.info.is_main:
        os.makedirs(out_dir, exist_ok=True)
        plan.save(os.path.join(out_dir, "plan.json"))
        write_json(os.path.join(out_dir, "gates.json"),
                   {name: g.detach().float().tolist() for name, g in vtp.gates(model).items()})
    _publish(ctx, out_dir, pruned.to("cpu"), {**metadata, "stage": "prune", "prune": summary},
             summary)
    ctx.say(plan.summary())
    ctx.say(f"prune: {_human(before.params)}-> {_human(after.params)}params, "
            f"{_human(before.macs)}-> {_human(after.macs)}MACs; wrote {out_dir}")
    return summary


def stage_finetune(args, ctx: Context, source: str, teacher: Optional[TeacherSpec], out_dir: str,
                   resume: bool, prefix: str = "", after_step=None) -> Dict[str, Any]:
    """Fine-tuning of the pruned model in `source`, distilled from `teacher` (what
    `finetune_teacher` found and checked; None: no distillation)."""
    cfg = train_config(args, "finetune", prefix)
    model, metadata = models.load_vtp_model(source)
    train_ds, val_ds, spec, settings = _saved_model_datasets(args, model, metadata, source,
                                                             need_train=True)
    saved_drop_path = models.set_drop_path(model, args.drop_path)
    distiller = None
    headline = f"finetune: {source}, {len(train_ds)} training images"
    if teacher is not None:
        cfg.teacher = teacher.describe()
        # Every process builds its own copy from the same description: no weights travel.
        distiller = Distiller(build_teacher(teacher), cfg.distill, cfg.distill_alpha,
                              cfg.distill_tau)
        headline += (f", distilled ({cfg.distill}, alpha {cfg.distill_alpha}, tau "
                     f"{cfg.distill_tau}) from {teacher.label}: {cfg.teacher}")
    summary = _train(args, ctx, cfg, model, train_ds, val_ds, out_dir, resume, after_step,
                     headline, distiller=distiller)
    if summary["stopped"]:
        return summary
    # The saved architecture keeps the drop-path rate it was described with.
    models.set_drop_path(model, saved_drop_path)
    model.to("cpu")
    class_map = spec.class_to_idx if spec else (metadata.get("data") or {}).get("class_to_idx")
    meta = {**metadata, "stage": "finetune", "source": os.path.abspath(source),
            "data": {**settings, "class_to_idx": class_map},
            "distill": ({"type": cfg.distill, "alpha": cfg.distill_alpha, "tau": cfg.distill_tau,
                         "teacher": cfg.teacher} if teacher is not None else None),
            "last_epoch": summary.get("last_epoch", {})}
    _publish(ctx, out_dir, model, meta, summary)
    return summary


def stage_eval_dense(args, ctx: Context, out_dir: str) -> Dict[str, Any]:
    """`vtp run`'s first stage: the starting model, labelled with the class indices sparse
    training will use and normalised as its checkpoint says."""
    _, _, spec = _folder_datasets(args, need_train=True)
    num_classes = args.num_classes or (spec.num_classes if spec else 1000)
    model, metadata, _ = dense_model(args, num_classes)
    data_meta = {**(metadata.get("data") or {}), "class_to_idx": spec.class_to_idx if spec else None}
    return stage_eval(args, ctx, model, {**metadata, "data": data_meta}, out_dir, "dense")


def _profile_and_time(args, ctx: Context, model, runner, name: str, settings: Dict[str, Any]) -> Dict[str, Any]:
    """Size, MACs and (rank 0) measured images/s of ``runner``, the model or its export."""
    img_size = tuple(settings["img_size"])
    prof = vtp.profile(model, img_size)
    out: Dict[str, Any] = dict(params=prof.params, macs=prof.macs, **settings)
    if ctx.info.is_main and args.bench_steps > 0:
        speed = measure_throughput({name: runner}, img_size, args.bench_batch_size, args.bench_steps,
                                   ctx.info.device, in_chans=input_channels(model),
                                   amp=args.amp, amp_dtype=args.amp_dtype)[name]
        out.update(images_per_s=speed["images_per_s"], bench_seconds=speed["seconds"],
                   bench_batch_size=args.bench_batch_size, device=str(ctx.info.device), amp=bool(args.amp))
    return out


def check_runtime(args: argparse.Namespace) -> None:
    """`vtp eval --runtime onnxruntime` runs the exported model on the CPU."""
    if getattr(args, "runtime", "torch") != "onnxruntime":
        return
    if args.device == "cuda":
        raise VTPError("--runtime onnxruntime: runs on the CPU; pass --device cpu (or auto)")
    args.device = "cpu"
    if args.amp:
        raise VTPError("--runtime onnxruntime: runs the float32 export; drop --amp")
    if importlib.util.find_spec("onnxruntime") is None:
        raise VTPError("--runtime onnxruntime: ONNX Runtime is not installed: pip install 'vtp[export]'")


def check_export_args(args: argparse.Namespace) -> None:
    """Where `vtp export` writes must be writable before any work."""
    if not args.output:
        raise VTPError("--output: give the FILE to write (e.g. model.onnx)")
    if os.path.isdir(args.output):
        raise VTPError(f"--output {args.output}: is a directory; give a file name")
    parent = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(parent):
        raise VTPError(f"--output {args.output}: the folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise VTPError(f"--output {args.output}: the folder {parent} is not writable")


def stage_export(args, model, metadata: Dict[str, Any], source: str, say) -> Dict[str, Any]:
    """The model in SOURCE as one ONNX or torch.export file, checked against the model."""
    img_size = _img_size(args, model)
    try:
        check = vtp.export(model, args.output, format=args.format, img_size=img_size,
                           batch_size=args.batch_size, opset=args.opset)
    except ImportError as e:
        raise VTPError(str(e)) from None
    except ValueError as e:
        raise VTPError(f"export of {source} failed its check: {e}") from None
    say(f"export: {source} -> {args.output} ({args.format}, {check.bytes / 1e6:.1f} MB); checked at "
        f"batch {', '.join(map(str, check.batch_sizes))}: max |difference| {check.max_abs_error:.2g} "
        f"(tolerance {check.tolerance:.2g})")
    return check.to_dict()


def stage_eval(args, ctx: Context, model, metadata: Dict[str, Any], out_dir: str,
               name: str) -> Dict[str, Any]:
    """Accuracy on the validation split, size, MACs and measured images/s; eval.json."""
    _, val_ds, _, settings = _saved_model_datasets(args, model, metadata, name, need_train=False)
    model.eval().to(ctx.info.device)
    runtime = getattr(args, "runtime", "torch")
    result: Dict[str, Any] = {"name": name, "runtime": runtime}
    with tempfile.TemporaryDirectory() as tmp:
        runner = model
        if runtime == "onnxruntime":
            # What a deployment runs: the exported file, checked against the model first.
            check = vtp.export(model, os.path.join(tmp, "model.onnx"), format="onnx",
                               img_size=tuple(settings["img_size"]))
            runner = OnnxRuntimeModel(check.path, threads=torch.get_num_threads())
            result["export_check"] = check.to_dict()
        if val_ds is not None and len(val_ds):
            loader = data.eval_loader(val_ds, batch_size=args.eval_batch_size, rank=ctx.info.rank,
                                      world_size=ctx.info.world_size, workers=args.workers,
                                      pin_memory=ctx.info.device.type == "cuda")
            result.update(evaluate(runner, loader, ctx.info, args.amp, args.amp_dtype))
        result.update(_profile_and_time(args, ctx, model, runner, name, settings))
    if ctx.info.is_main:
        write_json(os.path.join(out_dir, "eval.json"), jsonable(result))
        acc = f"top-1 {result['val_acc1']:.2f} %, " if "val_acc1" in result else ""
        ips = f", {result['images_per_s']:.1f} images/s" if "images_per_s" in result else ""
        via = " through ONNX Runtime" if runtime == "onnxruntime" else ""
        ctx.say(f"eval {name}{via}: {acc}{_human(result['params'])}params, {_human(result['macs'])}MACs{ips}")
    distributed.barrier(ctx.info)
    model.to("cpu")
    return result
