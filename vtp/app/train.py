"""The training loop of the ``vtp`` command: one loop for every stage that trains.

Sparse training is task loss + lambda * sum|gate|; fine-tuning and dense training the same
with lambda = 0, fine-tuning optionally distilled from a teacher (distill.py).
``fit`` runs the epochs of a stage, ``train_one_epoch`` the optimizer steps of one epoch,
``train_step`` the forward and backward passes of one step, and ``evaluate`` (evaluate.py)
the validation after each epoch. A checkpoint (checkpoint.py) is written every
``save_every`` steps and at every epoch end, so a resumed run continues exactly where the
interrupted one stopped: on CPU with ``--workers 0`` it reaches the very same weights.
"""
from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

import torch
import torch.nn as nn
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.scheduler import CosineLRScheduler
from tqdm import tqdm

import vtp

from . import data
from .checkpoint import (checkpoint_path, discard_interrupted_writes, has_checkpoint, kill_point,
                         restore_training_state, save_checkpoint, training_state)
from .distill import Distiller, set_distilled_training
from .distributed import DistInfo, all_reduce_sum, wrap_ddp
from .errors import VTPError
from .evaluate import autocast, evaluate
from .metrics import MetricsLogger, jsonable, read_metrics

__all__ = ["TrainConfig", "LoopState", "create_optimizer", "create_scheduler", "train_criterion",
           "train_step", "train_one_epoch", "fit"]


@dataclass
class TrainConfig:
    """Settings of one training stage; `lr` is the base lr for `lr_base_batch` images."""
    stage: str
    epochs: int
    batch_size: int
    lr: float
    accum_steps: int = 1
    lr_base_batch: int = 512
    min_lr: float = 0.0
    warmup_epochs: float = 0.0
    warmup_lr: float = 1e-6
    weight_decay: float = 0.05
    gate_lr_scale: float = 1.0
    opt_eps: float = 1e-8
    opt_betas: Tuple[float, float] = (0.9, 0.999)
    clip_grad: Optional[float] = None
    lam: float = 0.0
    smoothing: float = 0.1
    seed: int = 0
    aug_repeats: int = 0
    workers: int = 8
    save_every: int = 1000
    stop_after_steps: Optional[int] = None
    log_every: int = 50
    amp: bool = False
    amp_dtype: str = "bfloat16"
    compile: bool = False
    progress: bool = True
    eval_batch_size: int = 128
    distill: str = "none"        # "none", "soft" or "hard"; the teacher itself goes to fit()
    distill_alpha: float = 0.0
    distill_tau: float = 1.0
    teacher: Optional[str] = None  # where the teacher came from, for the records and resume
    augmentation: Dict[str, Any] = field(default_factory=dict)  # the data's settings, for resume

    def global_batch(self, world_size: int) -> int:
        return self.batch_size * self.accum_steps * world_size

    def scaled_lr(self, world_size: int) -> float:
        return self.lr * self.global_batch(world_size) / self.lr_base_batch


@dataclass
class LoopState:
    """Where the loop stands; saved in every checkpoint. The sums run over the steps of
    `epoch` (for its means), across interruptions."""
    epoch: int = 0               # epoch being run (after an epoch-end checkpoint: the next one)
    step_in_epoch: int = 0       # optimizer steps of `epoch` already done
    global_step: int = 0         # optimizer steps done in all
    epoch_loss_sum: float = 0.0  # loss (task + lambda * penalty) of each step
    epoch_task_sum: float = 0.0  # task loss alone of each step
    epoch_seconds: float = 0.0   # time spent on `epoch`, validation excluded
    # The steps since the last metrics line, whose means the next line reports: kept here so
    # that a run resumed between two lines writes the next one as if it had never stopped.
    window_loss_sum: float = 0.0
    window_task_sum: float = 0.0
    window_penalty_sum: float = 0.0
    window_steps: int = 0

    def next_epoch(self) -> None:
        self.epoch += 1
        self.step_in_epoch = 0
        self.epoch_loss_sum = self.epoch_task_sum = self.epoch_seconds = 0.0

    def add_to_window(self, loss: float, task: float, penalty: float) -> None:
        self.window_loss_sum += loss
        self.window_task_sum += task
        self.window_penalty_sum += penalty
        self.window_steps += 1

    def clear_window(self) -> None:
        self.window_loss_sum = self.window_task_sum = self.window_penalty_sum = 0.0
        self.window_steps = 0


def create_optimizer(model: nn.Module, cfg: TrainConfig, lr: float) -> torch.optim.Optimizer:
    groups = vtp.param_groups(model, cfg.weight_decay, lr_scale_gates=cfg.gate_lr_scale)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.opt_betas), eps=cfg.opt_eps)


def create_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int,
                     steps_per_epoch: int):
    """Cosine decay per optimizer step with linear warm-up (timm); stepping per update rather
    than per epoch keeps the schedule smooth and makes its state a single counter."""
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    return CosineLRScheduler(optimizer, t_initial=max(1, total_steps), lr_min=cfg.min_lr,
                             warmup_t=min(warmup, max(0, total_steps - 1)),
                             warmup_lr_init=cfg.warmup_lr, t_in_epochs=False)


def train_criterion(mixup_active: bool, smoothing: float) -> nn.Module:
    if mixup_active:
        return SoftTargetCrossEntropy()  # mixup already smooths the targets
    if smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing)
    return nn.CrossEntropyLoss()


def train_step(model: nn.Module, raw_model: nn.Module, batches: Iterator, cfg: TrainConfig,
               info: DistInfo, criterion: nn.Module, penalty_fn, scaler,
               mixup_fn=None, distiller: Optional[Distiller] = None) -> Tuple[float, float, bool]:
    """Forward and backward of one optimizer step's micro-batches (gradients left in .grad);
    returns (task loss, penalty, finite) averaged over processes. With a `distiller` the
    task loss is the criterion mixed with the distillation term."""
    task_sum = torch.zeros((), device=info.device)
    pen_value = torch.zeros((), device=info.device)
    for micro in range(cfg.accum_steps):
        images, targets = next(batches)
        images = images.to(info.device, non_blocking=True)
        targets = targets.to(info.device, non_blocking=True)
        if mixup_fn is not None:
            images, targets = mixup_fn(images, targets)
        # Gradients are all-reduced once per optimizer step, on the last micro-batch.
        sync = model.no_sync() if (info.distributed and micro < cfg.accum_steps - 1) \
            else contextlib.nullcontext()
        with sync:
            with autocast(info.device, cfg.amp, cfg.amp_dtype):
                outputs = model(images)
                if distiller is not None:
                    task = distiller.loss(images, outputs, targets, criterion)
                else:
                    task = criterion(outputs.float(), targets)
                loss = task
                if penalty_fn is not None:
                    # In every micro-batch's graph, so DDP reduces the gate gradients with
                    # the others; divided by accum_steps like the task loss.
                    pen = penalty_fn(raw_model)
                    loss = task + cfg.lam * pen
                    pen_value = pen.detach()
            scaler.scale(loss / cfg.accum_steps).backward()
        task_sum = task_sum + task.detach().float()
    # One reduction per step: the loss for the logs and a joint verdict on NaN/Inf, so that
    # every process stops at the same step.
    stats = torch.stack([task_sum / cfg.accum_steps, pen_value.float(),
                         (~torch.isfinite(task_sum + pen_value)).float()]).double()
    stats = all_reduce_sum(stats, info).cpu()
    return (stats[0].item() / info.world_size, stats[1].item() / info.world_size,
            stats[2].item() == 0)


@dataclass
class _Stage:
    """What the loop of one stage works with, built once by ``fit``."""
    cfg: TrainConfig
    info: DistInfo
    model: nn.Module          # what runs the steps: wrapped in DDP and compiled as asked
    raw_model: nn.Module      # what is saved and evaluated
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Any
    criterion: nn.Module
    penalty_fn: Optional[Callable]
    mixup_fn: Optional[Callable]
    distiller: Optional[Distiller]
    metrics: MetricsLogger
    ckpt_path: str
    steps_per_epoch: int
    say: Callable[[str], None]
    after_step: Optional[Callable[["LoopState"], None]]
    run_start: float = 0.0
    steps_this_run: int = 0

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.cfg.epochs

    def current_lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]  # the weights' lr (gates may be scaled)

    def save(self, loop: LoopState) -> None:
        state = training_state(self.raw_model, self.optimizer, self.scheduler, self.scaler,
                               asdict(loop), self.cfg.stage, jsonable(asdict(self.cfg)), self.info)
        if self.info.is_main:
            save_checkpoint(self.ckpt_path, state)


class _Window:
    """The speed of this process's steps since the last metrics line (their losses are
    summed in LoopState)."""

    def __init__(self):
        self.n = 0
        self.t0 = time.perf_counter()


def _format_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _optimizer_step(stage: _Stage, loop: LoopState, batches: Iterator) -> Tuple[float, float]:
    """One optimizer step; a NaN/Inf loss stops the run before the weights change."""
    cfg = stage.cfg
    stage.optimizer.zero_grad(set_to_none=True)
    task, pen, finite = train_step(stage.model, stage.raw_model, batches, cfg, stage.info,
                                   stage.criterion, stage.penalty_fn, stage.scaler, stage.mixup_fn,
                                   stage.distiller)
    if not finite:
        where = (f"the checkpoint {stage.ckpt_path}" if os.path.exists(stage.ckpt_path)
                 else "not saved yet")
        raise VTPError(
            f"{cfg.stage}: loss is {task + cfg.lam * pen} at step {loop.global_step + 1} "
            f"(epoch {loop.epoch}, step {loop.step_in_epoch + 1} of {stage.steps_per_epoch}); "
            f"stopped before updating the weights. The last good state is {where}. "
            "Lower --lr or check the data.")
    if cfg.clip_grad is not None:
        stage.scaler.unscale_(stage.optimizer)
        torch.nn.utils.clip_grad_norm_(stage.raw_model.parameters(), cfg.clip_grad)
    stage.scaler.step(stage.optimizer)
    stage.scaler.update()
    loop.step_in_epoch += 1
    loop.global_step += 1
    stage.scheduler.step_update(loop.global_step)
    return task, pen


def train_one_epoch(stage: _Stage, loop: LoopState, train_ds) -> bool:
    """The remaining optimizer steps of ``loop.epoch``; True when --stop-after-steps ended
    the run (after checkpointing), False once the epoch is complete."""
    cfg, info = stage.cfg, stage.info
    tick = time.perf_counter()
    stage.model.train()
    loader = data.train_loader(train_ds, batch_size=cfg.batch_size, rank=info.rank,
                               world_size=info.world_size, seed=cfg.seed, epoch=loop.epoch,
                               skip_batches=loop.step_in_epoch * cfg.accum_steps,
                               aug_repeats=cfg.aug_repeats, workers=cfg.workers,
                               pin_memory=info.device.type == "cuda")
    batches = iter(loader)
    images_per_step = cfg.global_batch(info.world_size)
    window = _Window()
    with tqdm(total=stage.steps_per_epoch, initial=loop.step_in_epoch, unit="step",
              desc=f"{cfg.stage} {loop.epoch + 1}/{cfg.epochs}", dynamic_ncols=True,
              disable=not (cfg.progress and info.is_main)) as bar:
        while loop.step_in_epoch < stage.steps_per_epoch:
            step_t0 = time.perf_counter()
            task, pen = _optimizer_step(stage, loop, batches)
            kill_point("step", loop.global_step)
            loss = task + cfg.lam * pen
            loop.epoch_loss_sum += loss
            loop.epoch_task_sum += task
            now = time.perf_counter()
            loop.epoch_seconds += now - tick
            tick = now
            loop.add_to_window(loss, task, pen)
            window.n += 1
            stage.steps_this_run += 1
            eta = (now - stage.run_start) / stage.steps_this_run * (stage.total_steps - loop.global_step)
            bar.set_postfix({"loss": f"{loss:.4f}", "lr": f"{stage.current_lr():.2e}",
                             "img/s": f"{images_per_step / max(1e-9, now - step_t0):.0f}",
                             "eta": _format_eta(eta)}, refresh=False)
            bar.update(1)
            if loop.global_step % cfg.log_every == 0 or loop.step_in_epoch == stage.steps_per_epoch:
                seconds = time.perf_counter() - window.t0
                stage.metrics.log({
                    "stage": cfg.stage, "kind": "train", "epoch": loop.epoch,
                    "step": loop.global_step, "loss": loop.window_loss_sum / loop.window_steps,
                    "task_loss": loop.window_task_sum / loop.window_steps,
                    "penalty": loop.window_penalty_sum / loop.window_steps,
                    "lr": stage.current_lr(), "eta_s": eta, "time": time.time(),
                    "images_per_s": window.n * images_per_step / max(seconds, 1e-9)})
                loop.clear_window()
                window = _Window()
            if stage.after_step is not None:
                stage.after_step(loop)
            stop_now = cfg.stop_after_steps is not None and loop.global_step >= cfg.stop_after_steps
            if stop_now or (cfg.save_every and loop.global_step % cfg.save_every == 0):
                stage.save(loop)
            if stop_now:
                return True
    loop.epoch_seconds += time.perf_counter() - tick
    return False


def _epoch_row(stage: _Stage, val_ds, loop: LoopState) -> Dict[str, Any]:
    """The metrics line of a finished epoch, with validation and gate statistics."""
    cfg, info = stage.cfg, stage.info
    images = stage.steps_per_epoch * cfg.global_batch(info.world_size)
    row = {"stage": cfg.stage, "kind": "epoch", "epoch": loop.epoch, "step": loop.global_step,
           "train_loss": loop.epoch_loss_sum / stage.steps_per_epoch,
           "train_task_loss": loop.epoch_task_sum / stage.steps_per_epoch, "lr": stage.current_lr(),
           "images_per_s": images / max(loop.epoch_seconds, 1e-9),
           "epoch_time_s": loop.epoch_seconds}
    if val_ds is not None and len(val_ds):
        loader = data.eval_loader(val_ds, batch_size=cfg.eval_batch_size, rank=info.rank,
                                  world_size=info.world_size, workers=cfg.workers,
                                  pin_memory=info.device.type == "cuda")
        # The unwrapped model: processes may hold different numbers of validation batches.
        row.update(evaluate(stage.raw_model, loader, info, cfg.amp, cfg.amp_dtype))
    if stage.penalty_fn is not None:
        stats = vtp.gate_stats(stage.raw_model)["all"]
        row.update({"gate_mean": stats["mean"],
                    **{f"gate_{k}": v for k, v in stats.items() if k.startswith("below_")}})
    return row


def _prepare(model: nn.Module, cfg: TrainConfig, info: DistInfo, train_ds, out_dir: str,
             mixup_fn, distiller, say, after_step) -> _Stage:
    steps_per_epoch = data.train_steps(train_ds, batch_size=cfg.batch_size,
                                       accum_steps=cfg.accum_steps, rank=info.rank,
                                       world_size=info.world_size, seed=cfg.seed,
                                       aug_repeats=cfg.aug_repeats)
    if steps_per_epoch < 1:
        raise VTPError(f"{len(train_ds)} training images give no full step of "
                       f"{cfg.batch_size} x {cfg.accum_steps} per process on {info.world_size} "
                       "processes: lower --batch-size or --accum-steps")
    optimizer = create_optimizer(model, cfg, cfg.scaled_lr(info.world_size))
    return _Stage(
        cfg=cfg, info=info, model=model, raw_model=model, optimizer=optimizer,
        scheduler=create_scheduler(optimizer, cfg, steps_per_epoch * cfg.epochs, steps_per_epoch),
        scaler=torch.amp.GradScaler(info.device.type, enabled=cfg.amp and cfg.amp_dtype == "float16"),
        criterion=train_criterion(mixup_fn is not None, cfg.smoothing),
        penalty_fn=vtp.l1_penalty if cfg.lam > 0 else None, mixup_fn=mixup_fn,
        distiller=distiller, metrics=MetricsLogger(os.path.join(out_dir, "metrics.jsonl"), enabled=info.is_main),
        ckpt_path=checkpoint_path(out_dir), steps_per_epoch=steps_per_epoch, say=say,
        after_step=after_step)


def _start(stage: _Stage, resume: bool) -> LoopState:
    """Where the loop begins: the checkpoint's position, or step 0 of a fresh run (also
    when --resume finds no checkpoint: the run was killed before its first one)."""
    if resume and not has_checkpoint(stage.ckpt_path, stage.info):
        stage.say(f"{stage.cfg.stage}: --resume found no checkpoint ({stage.ckpt_path}): the run "
                  "stopped before its first one; starting from the beginning")
        resume = False
    if not resume:
        stage.metrics.reset()  # lines of an earlier attempt that never reached a checkpoint
        stage.scheduler.step_update(0)
        return LoopState()
    ckpt = restore_training_state(stage.ckpt_path, stage.raw_model, stage.optimizer,
                                  stage.scheduler, stage.scaler, stage.cfg.stage,
                                  jsonable(asdict(stage.cfg)), stage.info, stage.say)
    loop = LoopState(**{f.name: ckpt[f.name] for f in fields(LoopState) if f.name in ckpt})
    stage.metrics.truncate_after(loop.global_step, loop.epoch)
    stage.say(f"resumed {stage.cfg.stage} from {stage.ckpt_path} at epoch {loop.epoch}, "
              f"step {loop.step_in_epoch}/{stage.steps_per_epoch} (global step {loop.global_step})")
    return loop


def fit(model: nn.Module, cfg: TrainConfig, info: DistInfo, train_ds, val_ds, out_dir: str,
        mixup_fn=None, resume: bool = False, say: Callable[[str], None] = print,
        after_step: Optional[Callable[[LoopState], None]] = None,
        distiller: Optional[Distiller] = None) -> Dict[str, Any]:
    """Trains `model` (already on info.device) and returns a summary. Writes
    out_dir/checkpoints/last.pt and out_dir/metrics.jsonl (rank 0 only).

    A `distiller`'s teacher runs on this process's device beside the student, outside DDP:
    it has no gradients to reduce, and every process computes its own batch's targets.
    `after_step` is called after every optimizer step (tests use it to simulate a crash)."""
    if info.is_main:  # what a killed run's writes left half-done
        discard_interrupted_writes(out_dir)
    stage = _prepare(model, cfg, info, train_ds, out_dir, mixup_fn, distiller, say, after_step)
    loop = _start(stage, resume)
    if distiller is not None:
        distiller.to(info.device)
        set_distilled_training(stage.raw_model, True)
    if info.distributed:
        stage.model = wrap_ddp(stage.raw_model, info)
    if cfg.compile:
        stage.model = torch.compile(stage.model)
    summary: Dict[str, Any] = {"stopped": False, "steps_per_epoch": stage.steps_per_epoch,
                               "total_steps": stage.total_steps, "lr": cfg.scaled_lr(info.world_size)}
    # Resumed after an epoch end (after the last one, when killed before the model was
    # saved): that epoch's line, as the uninterrupted run would report it.
    ended = [row for row in read_metrics(stage.metrics.path)
             if row.get("kind") == "epoch" and row.get("epoch") == loop.epoch - 1]
    if ended:
        summary["last_epoch"] = ended[-1]
    stage.run_start = time.perf_counter()
    while loop.epoch < cfg.epochs:
        if train_one_epoch(stage, loop, train_ds):
            say(f"{cfg.stage}: stopped at step {loop.global_step} as asked "
                "(--stop-after-steps); continue with --resume")
            summary.update(stopped=True, global_step=loop.global_step)
            return summary
        row = _epoch_row(stage, val_ds, loop)
        stage.metrics.log(row)
        summary["last_epoch"] = row
        say(f"{cfg.stage} epoch {loop.epoch + 1}/{cfg.epochs}: " + ", ".join(
            f"{k} {row[k]:.4g}" for k in ("train_loss", "val_loss", "val_acc1", "images_per_s")
            if k in row))
        loop.next_epoch()
        stage.save(loop)
    summary["global_step"] = loop.global_step
    if distiller is not None:
        set_distilled_training(stage.raw_model, False)
    return summary
