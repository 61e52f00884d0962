"""The stages a ``vtp`` command runs: dense training, sparse training, pruning, fine-tuning
and evaluation.

Each stage works in its own directory (config.yaml, metrics.jsonl, checkpoints/last.pt,
model/ and summary.json once complete) and can run on its own (``vtp prune``, ...) or
chained by ``vtp run``. A stage reads its typed settings (settings.py), never the flags;
checks.py has stopped bad input before any stage starts.
"""
from __future__ import annotations

import datetime
import os
import statistics
import tempfile
from typing import Any, Dict, NamedTuple, Optional

import torch
from timm.data import resolve_model_data_config

import vtp
import vtp_kernels
from vtp.atomic import write_json
from vtp._export import OnnxRuntimeModel
from vtp.io import check_saveable, read_config
from vtp._profile import check_img_size, default_img_size, input_channels
from vtp.rebuild import build

from . import data, distributed, models, train
from .distill import Distiller
from .errors import VTPError
from .evaluate import evaluate, measure_throughput, throughput_spread
from .metrics import jsonable
from .random import seed_everything
from .settings import ModelStart, StageSettings, SystemSettings
from .teacher import TeacherSpec, build_teacher, dense_record

__all__ = ["Context", "dense_model", "stage_train",
           "stage_sparse_train", "stage_prune", "stage_finetune", "stage_eval", "stage_eval_dense",
           "stage_export"]


class Context:
    """What every stage needs: processes, device, output directory and a rank-0 printer."""

    def __init__(self, system: SystemSettings, command: str):
        if system.kernels:
            vtp_kernels.set_backend(system.kernels)
        if system.deterministic:
            torch.use_deterministic_algorithms(True)
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        self.info = distributed.init_distributed(system.device, system.dist_backend)
        out = system.output or os.path.join(
            "runs", f"{command}-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}")
        self.out = distributed.broadcast_object(out, self.info)
        if self.info.is_main:
            os.makedirs(self.out, exist_ok=True)
        distributed.barrier(self.info)

    def say(self, text: str) -> None:
        if self.info.is_main:
            print(text, flush=True)


# ---------------------------------------------------------------------------------------------
# Data and models of a stage


def _norm_and_size(model, metadata: Dict[str, Any]) -> Dict[str, Any]:
    """Image size and normalisation: a saved model's own, else the timm model's config."""
    saved = metadata.get("data") or {}
    cfg = resolve_model_data_config(model)
    return {
        "img_size": list(default_img_size(model)),
        "mean": list(saved.get("mean", cfg["mean"])),
        "std": list(saved.get("std", cfg["std"])),
    }


def _folder_datasets(s: StageSettings, need_train: bool, class_map: Optional[Dict[str, int]] = None):
    """Raw (untransformed) ImageFolder datasets, their class indices following `class_map`
    when given; synthetic ones come later, once the image size is known."""
    d = s.data
    if d.synthetic or not (need_train or d.val_split):
        return None, None, None
    return data.build_datasets(
        d.data, False, (0, 0), train_split=d.train_split if need_train else None,
        val_split=d.val_split or None, num_classes=d.num_classes, class_map=class_map)


def _finish_datasets(s: StageSettings, train_ds, val_ds, spec, norm, num_classes: int,
                     need_train: bool):
    """Synthetic datasets, or transforms on top of the folder datasets."""
    d, size = s.data, tuple(norm["img_size"])
    if d.synthetic:
        return data.build_datasets(
            None, True, size, train_split="train" if need_train else None, val_split="val",
            num_classes=num_classes, synthetic_size=d.synthetic_size,
            synthetic_val_size=d.synthetic_val_size)
    if train_ds is not None:
        train_ds = data.with_transform(train_ds, data.train_transform_from(d, size, norm))
    if val_ds is not None:
        val_ds = data.with_transform(val_ds, data.eval_transform_from(d, size, norm))
    return train_ds, val_ds, spec


def _saved_model_datasets(s: StageSettings, model, metadata: Dict[str, Any], source: str,
                          need_train: bool):
    """Datasets for a trained model: its class indices, image size and normalisation."""
    norm = _norm_and_size(model, metadata)
    class_map = (metadata.get("data") or {}).get("class_to_idx")
    train_ds, val_ds, spec = _folder_datasets(s, need_train, class_map)
    if spec is not None and spec.num_classes > model.num_classes:
        raise VTPError(f"{s.data.data} has {spec.num_classes} classes but the model in {source} "
                       f"predicts {model.num_classes}")
    train_ds, val_ds, spec = _finish_datasets(s, train_ds, val_ds, spec, norm, model.num_classes,
                                              need_train)
    return train_ds, val_ds, spec, norm


def dense_model(start: ModelStart, num_classes: int):
    """The dense starting model: a timm architecture with random, pretrained or local
    weights, or the model a vtp.save directory holds (built from its config.json, the
    classifier afresh with --reset-head); returns (model, the directory's metadata, the
    record of how it was built)."""
    torch.manual_seed(start.seed)  # same initial weights in every process
    metadata: Dict[str, Any] = {}
    if start.checkpoint and os.path.isdir(start.checkpoint):
        saved = read_config(start.checkpoint)
        model_args = {**saved.model_args, "num_classes": num_classes, "drop_path_rate": 0.0}
        try:
            model = build({"architecture": saved.architecture, "model_args": model_args})
        except ValueError as e:
            raise VTPError(f"--checkpoint {start.checkpoint}: {e}") from None
        loaded, metadata = models.load_vtp_model(start.checkpoint)
        head_reset = models.load_state(model, loaded.state_dict(), start.checkpoint, start.reset_head)
        kwargs = {k: v for k, v in saved.model_args.items() if k not in ("num_classes", "drop_path_rate")}
        return model, metadata, dense_record(start, saved.architecture, num_classes, kwargs, head_reset)
    model = models.create_dense_model(start.name, num_classes, start.shape, drop_path=0.0,
                                      pretrained=start.pretrained, pretrained_path=start.pretrained_path)
    head_reset = (start.pretrained and
                  models.pretrained_classes(start.name, start.pretrained_path) != num_classes)
    if start.checkpoint:
        head_reset = models.load_weights(model, start.checkpoint, reset_head=start.reset_head)
    return model, metadata, dense_record(start, start.name, num_classes, start.shape, head_reset)


# ---------------------------------------------------------------------------------------------
# Writing a stage's results


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


def _train(s: StageSettings, ctx: Context, cfg: train.TrainConfig, model, train_ds, val_ds,
           out_dir: str, resume: bool, after_step, headline: str,
           distiller: Optional[Distiller] = None) -> Dict[str, Any]:
    """The training loop of a stage on this process's device, after a first log line."""
    model.to(ctx.info.device)
    seed_everything(cfg.seed + ctx.info.rank)
    ctx.say(f"{headline}, lr {cfg.scaled_lr(ctx.info.world_size):.3g} for a global batch of "
            f"{cfg.global_batch(ctx.info.world_size)}; writing {out_dir}")
    return train.fit(model, cfg, ctx.info, train_ds, val_ds, out_dir,
                     mixup_fn=data.mixup_from(s.data, model.num_classes), resume=resume,
                     say=ctx.say, after_step=after_step, distiller=distiller)


def _starting_point(start: ModelStart) -> str:
    if start.checkpoint:
        return f"from {start.checkpoint}"
    if start.pretrained:
        return f"from timm's pretrained weights{f' ({start.pretrained_path})' if start.pretrained_path else ''}"
    return "from random weights"


def _img_size(size_flag: Optional[int], model):
    """--img-size (default: the model's), once the model is known to take it."""
    size = (size_flag,) * 2 if size_flag else default_img_size(model)
    try:
        check_img_size(model, size)
    except ValueError as e:
        raise VTPError(f"--img-size {size_flag}: {str(e).removeprefix('img_size: ')}") from None
    return size


def _check_saveable(name: str, model) -> None:
    """A model vtp.save would refuse stops the stage before training, not after."""
    try:
        check_saveable(model)
    except TypeError as e:
        raise VTPError(f"--model {name}: the trained model could not be saved: {e}") from None


class DenseStart(NamedTuple):
    """What a training stage from a dense model starts with."""
    model: Any
    record: Dict[str, Any]        # how the dense model was built (dense_record)
    num_classes: int
    norm: Dict[str, Any]          # the image size and normalisation the model takes
    train_ds: Any
    val_ds: Any
    spec: Any                     # the DataSpec, None for synthetic data

    def metadata(self, stage: str) -> Dict[str, Any]:
        return {"stage": stage, "model": self.record["model"], "num_classes": self.num_classes,
                "data": {**self.norm, "class_to_idx": self.spec.class_to_idx if self.spec else None}}


def _dense_start(s: StageSettings, ctx: Context, gated: bool) -> DenseStart:
    """Data and the dense starting model of `vtp train` (gated=False) or `vtp sparse-train`
    (gates added), checked saveable before the first step."""
    train_ds, val_ds, spec = _folder_datasets(s, need_train=True)
    num_classes = s.data.num_classes or (spec.num_classes if spec else 1000)
    model, metadata, record = dense_model(s.start, num_classes)
    if gated and not s.start.checkpoint and not record["pretrained"]:
        ctx.say("warning: sparse training starts from random weights (no --checkpoint or "
                "--pretrained); VTP prunes a trained model: see `vtp train`")
    models.set_drop_path(model, s.start.drop_path)
    if gated:
        try:
            vtp.add_gates(model, list(s.start.sites))
        except (TypeError, ValueError) as e:
            raise VTPError(f"--model {record['model']}: {e}") from None
    _check_saveable(record["model"], model)
    norm = _norm_and_size(model, metadata)
    train_ds, val_ds, spec = _finish_datasets(s, train_ds, val_ds, spec, norm, num_classes, True)
    return DenseStart(model, record, num_classes, norm, train_ds, val_ds, spec)


def stage_train(s: StageSettings, ctx: Context, out_dir: str, resume: bool,
                after_step=None) -> Dict[str, Any]:
    """Dense training (`vtp train`, and `vtp run --train-epochs`): an ordinary timm model
    trained or fine-tuned on the data; writes model/ for sparse training to start from."""
    cfg = s.train_config("train")
    start = _dense_start(s, ctx, gated=False)
    summary = _train(s, ctx, cfg, start.model, start.train_ds, start.val_ds, out_dir, resume,
                     after_step, f"train: {start.record['model']} {_starting_point(s.start)}, "
                     f"{len(start.train_ds)} training images, {start.num_classes} classes")
    if summary["stopped"]:
        return summary
    models.set_drop_path(start.model, 0.0)  # the saved model describes inference, not a recipe
    start.model.to("cpu")
    meta = {**start.metadata("train"), "started_from": start.record,
            "last_epoch": summary.get("last_epoch", {})}
    _publish(ctx, out_dir, start.model, meta, summary)
    return summary


def stage_sparse_train(s: StageSettings, ctx: Context, out_dir: str, resume: bool,
                       after_step=None) -> Dict[str, Any]:
    cfg = s.train_config("sparse-train")
    start = _dense_start(s, ctx, gated=True)
    summary = _train(s, ctx, cfg, start.model, start.train_ds, start.val_ds, out_dir, resume,
                     after_step, f"sparse-train: {start.record['model']}, {len(start.train_ds)} "
                     f"training images, {start.num_classes} classes, lambda {cfg.lam}")
    if summary["stopped"]:
        return summary
    start.model.to("cpu")
    summary["gate_stats"] = vtp.gate_stats(start.model)["all"]
    meta = {**start.metadata("sparse-train"), "dense": start.record,
            "last_epoch": summary.get("last_epoch", {})}
    _publish(ctx, out_dir, start.model, meta, summary)
    return summary


def stage_prune(s: StageSettings, ctx: Context, source: str, out_dir: str) -> Dict[str, Any]:
    p = s.prune
    model, metadata = models.load_vtp_model(source)
    if not vtp.gates(model):
        raise VTPError(f"{source}: the model has no gates; prune a sparse-trained model")
    model.to(ctx.info.device)
    img_size = _img_size(s.data.img_size, model)
    try:
        if p.plan:
            plan = vtp.PruningPlan.load(p.plan)
        else:
            latency = {} if p.latency_target is None else dict(  # the table: measured where this command runs
                device=ctx.info.device, dtype=s.system.amp_dtype if s.system.amp else None)
            plan = vtp.plan(model, **p.plan_args(), img_size=img_size, **latency)
        pruned = vtp.prune(model, plan, fold=p.fold, layout=p.layout)
    except (TypeError, ValueError) as e:
        raise VTPError(f"cannot prune {source}: {e}") from None
    before, after = vtp.profile(model, img_size), vtp.profile(pruned, img_size)
    summary = {
        "source": os.path.abspath(source), "ratio": p.effective_ratio, "scope": p.scope,
        "flops_target": p.flops_target, "latency_target": p.latency_target,
        "latency": plan.rule.get("latency"), "round_to": p.round_to, "fold": p.fold,
        "layout": p.layout,
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
    if summary["latency"]:
        lat = summary["latency"]
        ctx.say(f"prune: predicted latency {lat['predicted_ms']:.2f} ms at batch {lat['batch_size']} "
                f"({lat['predicted_share']:.3f} of the dense model's {lat['dense_ms']:.2f} ms) on {lat['device']}")
        if lat.get("measured_share") is not None:
            q1, q3 = lat["measured_iqr"]
            ctx.say(f"prune: measured {lat['measured_share']:.3f} of the dense model's latency (IQR {q1:.3f}-{q3:.3f}; "
                    f"target {p.latency_target:g}; the plan of round {lat['chosen_round']} kept, 0 being the table's)")
    ctx.say(f"prune: {_human(before.params)}-> {_human(after.params)}params, "
            f"{_human(before.macs)}-> {_human(after.macs)}MACs; wrote {out_dir}")
    return summary


def stage_finetune(s: StageSettings, ctx: Context, source: str, teacher: Optional[TeacherSpec],
                   out_dir: str, resume: bool, after_step=None) -> Dict[str, Any]:
    """Fine-tuning of the pruned model in `source`, distilled from `teacher` (what
    `checks.finetune_teacher` found and checked; None: no distillation)."""
    cfg = s.train_config("finetune")
    model, metadata = models.load_vtp_model(source)
    train_ds, val_ds, spec, norm = _saved_model_datasets(s, model, metadata, source, need_train=True)
    saved_drop_path = models.set_drop_path(model, s.start.drop_path)
    distiller = None
    headline = f"finetune: {source}, {len(train_ds)} training images"
    if teacher is not None:
        cfg.teacher = teacher.describe()
        # Every process builds its own copy from the same description: no weights travel.
        distiller = Distiller(build_teacher(teacher), cfg.distill, cfg.distill_alpha,
                              cfg.distill_tau)
        headline += (f", distilled ({cfg.distill}, alpha {cfg.distill_alpha}, tau "
                     f"{cfg.distill_tau}) from {teacher.label}: {cfg.teacher}")
    summary = _train(s, ctx, cfg, model, train_ds, val_ds, out_dir, resume, after_step,
                     headline, distiller=distiller)
    if summary["stopped"]:
        return summary
    # The saved architecture keeps the drop-path rate it was described with.
    models.set_drop_path(model, saved_drop_path)
    model.to("cpu")
    class_map = spec.class_to_idx if spec else (metadata.get("data") or {}).get("class_to_idx")
    meta = {**metadata, "stage": "finetune", "source": os.path.abspath(source),
            "data": {**norm, "class_to_idx": class_map},
            "distill": ({"type": cfg.distill, "alpha": cfg.distill_alpha, "tau": cfg.distill_tau,
                         "teacher": cfg.teacher} if teacher is not None else None),
            "last_epoch": summary.get("last_epoch", {})}
    _publish(ctx, out_dir, model, meta, summary)
    return summary


def dense_for_eval(s: StageSettings):
    """The starting model of `vtp run`, labelled with the class indices sparse training will
    use and normalised as its checkpoint says: (model, metadata)."""
    _, _, spec = _folder_datasets(s, need_train=True)
    num_classes = s.data.num_classes or (spec.num_classes if spec else 1000)
    model, metadata, _ = dense_model(s.start, num_classes)
    data_meta = {**(metadata.get("data") or {}), "class_to_idx": spec.class_to_idx if spec else None}
    return model, {**metadata, "data": data_meta}


def stage_eval_dense(s: StageSettings, ctx: Context, out_dir: str) -> Dict[str, Any]:
    """`vtp run`'s first stage: the starting model, evaluated."""
    model, metadata = dense_for_eval(s)
    return stage_eval(s, ctx, model, metadata, out_dir, "dense")


def _timed(s: StageSettings, ctx: Context, runners: Dict[str, Any], img_size, in_chans: int):
    """Images/s of each runner, timed in turns in this process (evaluate.measure_throughput),
    with the spread of the repetitions."""
    e, system = s.eval, s.system
    speeds = measure_throughput(runners, img_size, e.bench_batch_size, e.bench_steps,
                                ctx.info.device, in_chans=in_chans, amp=system.amp,
                                amp_dtype=system.amp_dtype)
    return {name: {**throughput_spread(speed["seconds"], e.bench_batch_size), "seconds": speed["seconds"]}
            for name, speed in speeds.items()}


def _profile_and_time(s: StageSettings, ctx: Context, model, runner, name: str,
                      norm: Dict[str, Any], timed_with: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """Size, MACs and (rank 0) measured images/s of ``runner``, the model or its export;
    with ``timed_with`` ({name: model}), those models are timed in turns with it and the
    comparison is recorded under "speed"."""
    img_size = tuple(norm["img_size"])
    prof = vtp.profile(model, img_size)
    out: Dict[str, Any] = dict(params=prof.params, macs=prof.macs, **norm)
    if ctx.info.is_main and s.eval.bench_steps > 0:
        runners = {**(timed_with or {}), name: runner}
        speeds = _timed(s, ctx, runners, img_size, input_channels(model))
        out.update(images_per_s=speeds[name]["images_per_s"], bench_seconds=speeds[name]["seconds"],
                   bench_batch_size=s.eval.bench_batch_size, device=str(ctx.info.device),
                   amp=bool(s.system.amp))
        if timed_with:
            out["speed"] = {"in_turns": True, "pid": os.getpid(), "repeats": s.eval.bench_steps,
                            "batch_size": s.eval.bench_batch_size, "device": str(ctx.info.device),
                            "amp": bool(s.system.amp), "models": speeds}
    return out


def stage_export(s: StageSettings, output: str, export_format: str, batch_size: int,
                 opset: Optional[int], model, source: str, say) -> Dict[str, Any]:
    """The model in SOURCE as one ONNX or torch.export file, checked against the model."""
    img_size = _img_size(s.data.img_size, model)
    try:
        check = vtp.export(model, output, format=export_format, img_size=img_size,
                           batch_size=batch_size, opset=opset)
    except ImportError as e:
        raise VTPError(str(e)) from None
    except ValueError as e:
        raise VTPError(f"export of {source} failed its check: {e}") from None
    say(f"export: {source} -> {output} ({export_format}, {check.bytes / 1e6:.1f} MB); checked at "
        f"batch {', '.join(map(str, check.batch_sizes))}: max |difference| {check.max_abs_error:.2g} "
        f"(tolerance {check.tolerance:.2g})")
    return check.to_dict()


def _measured_latency(s: StageSettings, ctx: Context, runner, planned: Dict[str, Any], img_size,
                      in_chans: int) -> Dict[str, Any]:
    """The pruned model's latency at the batch size its latency plan was made for: the median
    of repeated timed batches (evaluate.measure_throughput, after warm-up), beside the
    plan's prediction. Measured on this command's device, which may differ from the table's
    (both are recorded)."""
    batch = int(planned["batch_size"])
    repeats = max(5, s.eval.bench_steps)
    timed = measure_throughput({"pruned": runner}, img_size, batch, repeats, ctx.info.device,
                               in_chans=in_chans, amp=s.system.amp, amp_dtype=s.system.amp_dtype)
    seconds = timed["pruned"]["seconds"]
    measured = 1e3 * statistics.median(seconds)
    return {"batch_size": batch, "measured_ms": measured, "predicted_ms": planned["predicted_ms"],
            "measured_over_predicted": measured / planned["predicted_ms"], "repeats": len(seconds),
            "samples_ms": [1e3 * t for t in seconds], "device": str(ctx.info.device),
            "table_device": planned.get("device"), "dtype": planned.get("dtype"),
            "predicted_share": planned.get("predicted_share"),
            "planned_measured_share": planned.get("measured_share")}


def stage_eval(s: StageSettings, ctx: Context, model, metadata: Dict[str, Any], out_dir: str,
               name: str, timed_with: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Accuracy on the validation split, size, MACs and measured images/s; eval.json.
    ``timed_with`` ({name: model}): models timed in turns with this one (`vtp run` times the
    dense model with the pruned one), their figures recorded under "speed"."""
    _, val_ds, _, norm = _saved_model_datasets(s, model, metadata, name, need_train=False)
    model.eval().to(ctx.info.device)
    for other in (timed_with or {}).values():
        other.eval().to(ctx.info.device)
    runtime = s.eval.runtime
    result: Dict[str, Any] = {"name": name, "runtime": runtime}
    with tempfile.TemporaryDirectory() as tmp:
        runner = model
        if runtime == "onnxruntime":
            # What a deployment runs: the exported file, checked against the model first.
            check = vtp.export(model, os.path.join(tmp, "model.onnx"), format="onnx",
                               img_size=tuple(norm["img_size"]))
            runner = OnnxRuntimeModel(check.path, threads=torch.get_num_threads())
            result["export_check"] = check.to_dict()
        if val_ds is not None and len(val_ds):
            loader = data.eval_loader(val_ds, batch_size=s.eval.eval_batch_size, rank=ctx.info.rank,
                                      world_size=ctx.info.world_size, workers=s.data.workers,
                                      pin_memory=ctx.info.device.type == "cuda")
            result.update(evaluate(runner, loader, ctx.info, s.system.amp, s.system.amp_dtype))
        result.update(_profile_and_time(s, ctx, model, runner, name, norm, timed_with))
        planned = (metadata.get("prune") or {}).get("latency")
        if planned and ctx.info.is_main and s.eval.bench_steps > 0:
            result["latency"] = _measured_latency(s, ctx, runner, planned, tuple(norm["img_size"]),
                                                  input_channels(model))
    if ctx.info.is_main:
        write_json(os.path.join(out_dir, "eval.json"), jsonable(result))
        acc = f"top-1 {result['val_acc1']:.2f} %, " if "val_acc1" in result else ""
        ips = f", {result['images_per_s']:.1f} images/s" if "images_per_s" in result else ""
        via = " through ONNX Runtime" if runtime == "onnxruntime" else ""
        ctx.say(f"eval {name}{via}: {acc}{_human(result['params'])}params, {_human(result['macs'])}MACs{ips}")
        if "latency" in result:
            lat = result["latency"]
            ctx.say(f"eval {name}: latency at batch {lat['batch_size']}: measured {lat['measured_ms']:.2f} ms "
                    f"(median of {lat['repeats']}), predicted {lat['predicted_ms']:.2f} ms by the plan's table "
                    f"({lat['measured_over_predicted']:.3f} of it)")
            if lat.get("planned_measured_share") is not None:
                ctx.say(f"eval {name}: the plan measured {lat['planned_measured_share']:.3f} of the dense model's "
                        f"latency where its table was measured (predicted {lat['predicted_share']:.3f})")
    distributed.barrier(ctx.info)
    model.to("cpu")
    for other in (timed_with or {}).values():
        other.to("cpu")
    return result
