"""Training and evaluation loop of the ``vtp`` command: DDP, AMP, checkpoints, metrics.

One loop serves sparse training (task loss + lambda * sum|gate|) and fine-tuning (lambda = 0).
A checkpoint holds everything the next step depends on (weights, optimizer, schedule, grad
scaler, data position, every random state), so a resumed run continues exactly where the
interrupted one stopped: on CPU with ``--workers 0`` it reaches the very same weights.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from .config import VTPError
from .report import read_metrics

__all__ = [
    "DistInfo", "init_distributed", "cleanup_distributed", "all_reduce_sum", "broadcast_object",
    "barrier", "create_dense_model", "read_state_dict", "load_weights", "load_state",
    "is_vtp_dir", "read_vtp_config", "load_vtp_model", "vtp_metadata", "set_drop_path",
    "TrainConfig", "LoopState", "train_step", "fit", "evaluate", "measure_throughput",
    "MetricsLogger", "read_metrics", "write_json", "capture_rng", "restore_rng",
    "seed_everything", "save_checkpoint", "load_checkpoint", "CHECKPOINT_NAME",
]

CHECKPOINT_NAME = "last.pt"


# ---------------------------------------------------------------------------------------------
# Processes and devices


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto", backend: str = "auto") -> DistInfo:
    """One process per device. Under torchrun (WORLD_SIZE > 1) joins the process group
    from the environment; nccl on CUDA, gloo on CPU unless `backend` says otherwise."""
    if device == "cuda" and not torch.cuda.is_available():
        raise VTPError("--device cuda: no CUDA device is available")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise VTPError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA devices")
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world_size > 1 and not (dist.is_available() and dist.is_initialized()):
        if backend == "auto":
            backend = "nccl" if use_cuda else "gloo"
        kwargs = {"device_id": dev} if dev.type == "cuda" else {}
        dist.init_process_group(backend=backend, init_method="env://", **kwargs)
    return DistInfo(rank, world_size, local_rank, dev)


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj: Any, info: DistInfo) -> Any:
    """Rank 0's value of `obj` on every rank (e.g. a timestamped output directory)."""
    if not info.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj: Any, info: DistInfo) -> List[Any]:
    if not info.distributed:
        return [obj]
    out: List[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


# ---------------------------------------------------------------------------------------------
# Models and weights


def create_dense_model(name: str, num_classes: int, model_kwargs: Dict[str, Any],
                       drop_path: float = 0.0) -> nn.Module:
    """A timm model with random weights; never downloads anything."""
    import timm

    if not timm.is_model(name):
        raise VTPError(f"unknown timm model '{name}' (see timm.list_models())")
    try:
        return timm.create_model(name, pretrained=False, num_classes=num_classes,
                                 drop_path_rate=drop_path, **model_kwargs)
    except (TypeError, ValueError, AssertionError, RuntimeError) as e:
        raise VTPError(f"cannot build {name} with {model_kwargs}: {e}") from None


def read_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """A state dict from a timm/DeiT .pth/.pt (plain or under 'model', 'state_dict' or
    'state_dict_ema', DDP 'module.' prefixes removed) or a .safetensors file."""
    if not os.path.isfile(path):
        raise VTPError(f"checkpoint not found: {path}")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            state = load_file(path, device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, truncated files, foreign formats
        raise VTPError(f"cannot read checkpoint {path}: {e}") from None
    if isinstance(state, dict):
        for key in ("model", "state_dict", "state_dict_ema", "model_ema"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise VTPError(f"checkpoint {path} holds no state dict of tensors")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _classifier_keys(model: nn.Module) -> List[str]:
    names = []
    head = getattr(model, "default_cfg", {}).get("classifier", "head")
    for h in (head,) if isinstance(head, str) else tuple(head):
        names += [f"{h}.weight", f"{h}.bias"]
    return names


def load_weights(model: nn.Module, path: str, reset_head: bool = False) -> None:
    """Loads a timm checkpoint file into `model`; see load_state."""
    load_state(model, read_state_dict(path), path, reset_head)


def load_state(model: nn.Module, state: Dict[str, torch.Tensor], source: str,
               reset_head: bool = False) -> None:
    """Loads `state` into `model`, or stops with the missing, unexpected and mis-shaped keys
    when it does not fit, before any training starts."""
    state = dict(state)
    own = model.state_dict()
    if reset_head:
        for key in _classifier_keys(model):
            if key in state and key in own and state[key].shape != own[key].shape:
                state[key] = own[key]  # keep the freshly initialised classifier
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        def listing(title: str, items: List[str], sep: str = ", ", limit: int = 8) -> str:
            more = " ..." if len(items) > limit else ""
            return f"  {title} ({len(items)}): {sep.join(items[:limit])}{more}"

        lines = [f"checkpoint {source} does not fit the model:"]
        if missing:
            lines.append(listing("missing keys", missing))
        if unexpected:
            lines.append(listing("unexpected keys", unexpected))
        if shapes:
            lines.append(listing("shape mismatches", shapes, sep="; ", limit=6))
        head = set(_classifier_keys(model))
        if shapes and not reset_head and all(s.split(":")[0] in head for s in shapes):
            lines.append("  (only the classifier differs: pass --reset-head to start it afresh)")
        raise VTPError("\n".join(lines))
    model.load_state_dict(state, strict=True)


def read_vtp_config(path: str) -> Dict[str, Any]:
    """The config.json that vtp.save wrote in `path`; {} when there is none (or not one of
    vtp's)."""
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) and config.get("format") == "vtp-model" else {}


def is_vtp_dir(path: str) -> bool:
    """Whether `path` is a directory written by vtp.save."""
    return bool(read_vtp_config(path))


def vtp_metadata(path: str) -> Dict[str, Any]:
    """The metadata dict stored by vtp.save in `path`/config.json."""
    return dict(read_vtp_config(path).get("metadata") or {})


def load_vtp_model(path: str) -> Tuple[nn.Module, Dict[str, Any]]:
    """(model, metadata) from a vtp.save directory."""
    import vtp

    try:
        model = vtp.load(path)
    except Exception as e:  # any failure to rebuild the model is a bad input here
        raise VTPError(f"cannot load a vtp model from {path}: {e}") from None
    return model, vtp_metadata(path)


def set_drop_path(model: nn.Module, rate: float) -> float:
    """Stochastic depth rising linearly to `rate` over the blocks, as timm builds it;
    returns the rate the model had."""
    from timm.layers import DropPath

    blocks = list(model.blocks)
    old = getattr(blocks[-1].drop_path1, "drop_prob", 0.0) if blocks else 0.0
    rates = torch.linspace(0, rate, len(blocks)).tolist() if blocks else []
    for block, r in zip(blocks, rates):
        for name in ("drop_path1", "drop_path2"):
            if hasattr(block, name):
                setattr(block, name, DropPath(r) if r > 0 else nn.Identity())
    return float(old)


# ---------------------------------------------------------------------------------------------
# Random state


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_rng(device: torch.device) -> Dict[str, Any]:
    """This process's random states as plain tensors and lists (loadable with weights_only)."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }
    return state


def restore_rng(state: Dict[str, Any], device: torch.device) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


# ---------------------------------------------------------------------------------------------
# Checkpoints and metrics


def _atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Writes through a temp file in the same folder, then renames: a crash leaves either
    the old file or the new one, never half of one."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(os.path.dirname(os.path.abspath(path)))
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _fsync_dir(path: str) -> None:
    """Makes a rename inside `path` survive a power cut (where the OS allows it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(path: str, state: Dict[str, Any]) -> None:
    _atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: str) -> Dict[str, Any]:
    if not os.path.isfile(path):
        raise VTPError(f"no checkpoint to resume from: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise VTPError(f"cannot read checkpoint {path}: {e}") from None


def _write_text(path: str, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    _atomic_write(path, write)


def write_json(path: str, data: Dict[str, Any]) -> None:
    _write_text(path, json.dumps(data, indent=1))


class MetricsLogger:
    """JSON lines; only rank 0 writes. On resume, lines past the checkpoint are dropped so
    the file reads as if the run had never stopped."""

    def __init__(self, path: Optional[str], enabled: bool = True):
        self.path = path if enabled else None

    def truncate_after(self, global_step: int, epoch: int) -> None:
        if not self.path or not os.path.exists(self.path):
            return
        # read_metrics skips a line cut short by the interruption
        keep = [row for row in read_metrics(self.path)
                if (row.get("epoch", 0) < epoch if row.get("kind") == "epoch"
                    else row.get("step", 0) <= global_step)]
        _write_text(self.path, "".join(json.dumps(row) + "\n" for row in keep))

    def reset(self) -> None:
        if self.path and os.path.exists(self.path):
            os.remove(self.path)

    def log(self, row: Dict[str, Any]) -> None:
        if not self.path:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")


# ---------------------------------------------------------------------------------------------
# Training


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

    def global_batch(self, world_size: int) -> int:
        return self.batch_size * self.accum_steps * world_size

    def scaled_lr(self, world_size: int) -> float:
        return self.lr * self.global_batch(world_size) / self.lr_base_batch


def autocast(device: torch.device, enabled: bool, dtype: str):
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=getattr(torch, dtype))


def create_optimizer(model: nn.Module, cfg: TrainConfig, lr: float) -> torch.optim.Optimizer:
    import vtp

    groups = vtp.param_groups(model, cfg.weight_decay, lr_scale_gates=cfg.gate_lr_scale)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.opt_betas), eps=cfg.opt_eps)


def create_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int,
                     steps_per_epoch: int):
    """Cosine decay per optimizer step with linear warm-up (timm); stepping per update rather
    than per epoch keeps the schedule smooth and makes its state a single counter."""
    from timm.scheduler import CosineLRScheduler

    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    return CosineLRScheduler(optimizer, t_initial=max(1, total_steps), lr_min=cfg.min_lr,
                             warmup_t=min(warmup, max(0, total_steps - 1)),
                             warmup_lr_init=cfg.warmup_lr, t_in_epochs=False)


def train_criterion(mixup_active: bool, smoothing: float) -> nn.Module:
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if mixup_active:
        return SoftTargetCrossEntropy()  # mixup already smooths the targets
    if smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing)
    return nn.CrossEntropyLoss()


@torch.no_grad()
def evaluate(model: nn.Module, loader, info: DistInfo, amp: bool = False,
             amp_dtype: str = "bfloat16") -> Dict[str, float]:
    """Top-1/top-5 accuracy (%) and mean cross-entropy over the whole loader, summed over
    processes."""
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=info.device)  # loss, top1, top5, n
    for images, targets in loader:
        images = images.to(info.device, non_blocking=True)
        targets = targets.to(info.device, non_blocking=True)
        with autocast(info.device, amp, amp_dtype):
            logits = model(images)
        logits = logits.float()
        k = min(5, logits.shape[-1])
        top = logits.topk(k, dim=-1).indices
        hit = top.eq(targets[:, None])
        totals += torch.stack([
            F.cross_entropy(logits, targets, reduction="sum").double(),
            hit[:, 0].sum().double(), hit.any(dim=1).sum().double(),
            torch.tensor(float(len(targets)), dtype=torch.float64, device=info.device)])
    all_reduce_sum(totals, info)
    n = max(1.0, totals[3].item())
    return {"val_loss": totals[0].item() / n, "val_acc1": 100.0 * totals[1].item() / n,
            "val_acc5": 100.0 * totals[2].item() / n, "val_images": int(totals[3].item())}


@torch.inference_mode()
def measure_throughput(model: nn.Module, img_size: Tuple[int, int], batch_size: int, steps: int,
                       device: torch.device, amp: bool = False, amp_dtype: str = "bfloat16",
                       warmup: int = 3) -> float:
    """Inference images/s of `model` on random input of one batch size."""
    if steps <= 0:
        return float("nan")
    model.eval()
    x = torch.randn(batch_size, 3, *img_size, device=device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    with autocast(device, amp, amp_dtype):
        for _ in range(warmup):
            model(x)
        sync()
        start = time.perf_counter()
        for _ in range(steps):
            model(x)
        sync()
    return batch_size * steps / (time.perf_counter() - start)


def _format_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


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

    def next_epoch(self) -> None:
        self.epoch += 1
        self.step_in_epoch = 0
        self.epoch_loss_sum = self.epoch_task_sum = self.epoch_seconds = 0.0


def _checkpoint_state(raw_model: nn.Module, optimizer, scheduler, scaler, loop: LoopState,
                      cfg: TrainConfig, info: DistInfo) -> Dict[str, Any]:
    rng = gather_objects(capture_rng(info.device), info)
    return {
        "format": "vtp-train-checkpoint", "version": 1, "stage": cfg.stage,
        "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
        **asdict(loop), "world_size": info.world_size, "rng": rng,
        "train_config": _plain(asdict(cfg)),
    }


def _plain(d: Dict[str, Any]) -> Dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


# The settings that change the trajectory; a resume with other values is not the same run.
_TRAJECTORY_KEYS = ("epochs", "batch_size", "accum_steps", "lr", "lr_base_batch", "min_lr",
                    "warmup_epochs", "lam", "seed", "aug_repeats", "weight_decay", "gate_lr_scale")


def _check_resume(ckpt: Dict[str, Any], cfg: TrainConfig, info: DistInfo, say: Callable) -> None:
    if ckpt.get("format") != "vtp-train-checkpoint":
        raise VTPError("the checkpoint to resume from is not a vtp training checkpoint")
    if ckpt.get("stage") != cfg.stage:
        raise VTPError(f"the checkpoint to resume from belongs to stage '{ckpt.get('stage')}', "
                       f"not '{cfg.stage}'")
    old = ckpt.get("train_config", {})
    changed = [f"{k}: {old.get(k)} -> {getattr(cfg, k)}" for k in _TRAJECTORY_KEYS
               if k in old and old[k] != getattr(cfg, k)]
    if changed:
        say("warning: resuming with changed settings (" + "; ".join(changed) + ")")
    if ckpt.get("world_size") != info.world_size:
        say(f"warning: resuming on {info.world_size} processes from a checkpoint of "
            f"{ckpt.get('world_size')}: the data order of the current epoch changes")


def _wrap_ddp(raw_model: nn.Module, info: DistInfo) -> nn.Module:
    """DistributedDataParallel without a per-forward buffer broadcast: the buffers (kept-index
    tables of pruned layers) never change. Every parameter takes part in each forward (gates,
    constant branches included), so no search for unused ones."""
    import inspect

    ddp = nn.parallel.DistributedDataParallel
    kwargs: Dict[str, Any] = {"device_ids": [info.device.index]} if info.device.type == "cuda" else {}
    # newer torch names the switch forward_sync_buffers and deprecates broadcast_buffers
    if "forward_sync_buffers" in inspect.signature(ddp.__init__).parameters:
        kwargs["forward_sync_buffers"] = False
    else:
        kwargs["broadcast_buffers"] = False
    return ddp(raw_model, **kwargs)


def train_step(model: nn.Module, raw_model: nn.Module, batches, cfg: TrainConfig, info: DistInfo,
               criterion: nn.Module, penalty_fn, scaler, mixup_fn=None) -> Tuple[float, float, bool]:
    """Forward and backward of one optimizer step's micro-batches (gradients left in .grad);
    returns (task loss, penalty, finite) averaged over processes."""
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
                logits = model(images)
                task = criterion(logits.float(), targets)
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


def _restore(ckpt_path: str, raw_model: nn.Module, optimizer, scheduler, scaler,
             cfg: TrainConfig, info: DistInfo, say: Callable) -> LoopState:
    """Loads a training checkpoint into the live objects; returns the loop position."""
    ckpt = load_checkpoint(ckpt_path)
    _check_resume(ckpt, cfg, info, say)
    try:
        raw_model.load_state_dict(ckpt["model"], strict=True)
    except RuntimeError as e:
        raise VTPError(f"checkpoint {ckpt_path} does not fit the model: {e}") from None
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    if ckpt["scaler"] or not scaler.is_enabled():
        scaler.load_state_dict(ckpt["scaler"])
    else:  # the checkpoint was written without float16 autocast: no scale to continue from
        say("warning: the checkpoint has no gradient-scaler state (it was trained without "
            "--amp-dtype float16); the scaler starts afresh")
    rng = ckpt["rng"]
    if len(rng) == info.world_size:
        restore_rng(rng[info.rank], info.device)
    else:
        seed_everything(cfg.seed + info.rank + 7919 * ckpt["global_step"])
    return LoopState(**{f.name: ckpt[f.name] for f in fields(LoopState) if f.name in ckpt})


def _epoch_row(raw_model: nn.Module, cfg: TrainConfig, info: DistInfo, val_ds, loop: LoopState,
               steps_per_epoch: int, lr: float, gated: bool) -> Dict[str, Any]:
    """The metrics line of a finished epoch, with validation and gate statistics."""
    from . import imagenet_data as data

    images = steps_per_epoch * cfg.global_batch(info.world_size)
    row = {"stage": cfg.stage, "kind": "epoch", "epoch": loop.epoch, "step": loop.global_step,
           "train_loss": loop.epoch_loss_sum / steps_per_epoch,
           "train_task_loss": loop.epoch_task_sum / steps_per_epoch, "lr": lr,
           "images_per_s": images / max(loop.epoch_seconds, 1e-9),
           "epoch_time_s": loop.epoch_seconds}
    if val_ds is not None and len(val_ds):
        loader = data.eval_loader(val_ds, batch_size=cfg.eval_batch_size, rank=info.rank,
                                  world_size=info.world_size, workers=cfg.workers,
                                  pin_memory=info.device.type == "cuda")
        # The unwrapped model: processes may hold different numbers of validation batches.
        row.update(evaluate(raw_model, loader, info, cfg.amp, cfg.amp_dtype))
    if gated:
        import vtp
        stats = vtp.gate_stats(raw_model)["all"]
        row.update({"gate_mean": stats["mean"],
                    **{f"gate_{k}": v for k, v in stats.items() if k.startswith("below_")}})
    return row


class _Window:
    """Averages of the steps since the last metrics line."""

    def __init__(self):
        self.loss = self.task = self.pen = 0.0
        self.n = 0
        self.t0 = time.perf_counter()

    def add(self, loss: float, task: float, pen: float) -> None:
        self.loss += loss
        self.task += task
        self.pen += pen
        self.n += 1


def fit(
        model: nn.Module,
        cfg: TrainConfig,
        info: DistInfo,
        train_ds,
        val_ds,
        out_dir: str,
        mixup_fn=None,
        resume: bool = False,
        say: Callable[[str], None] = print,
        after_step: Optional[Callable[[LoopState], None]] = None,
) -> Dict[str, Any]:
    """Trains `model` (already on info.device) and returns a summary. Writes
    out_dir/checkpoints/last.pt and out_dir/metrics.jsonl (rank 0 only).

    `after_step` is called after every optimizer step (tests use it to simulate a crash)."""
    from tqdm import tqdm

    from . import imagenet_data as data

    raw_model = model
    ckpt_path = os.path.join(out_dir, "checkpoints", CHECKPOINT_NAME)
    metrics = MetricsLogger(os.path.join(out_dir, "metrics.jsonl"), enabled=info.is_main)
    steps_per_epoch = data.train_steps(train_ds, batch_size=cfg.batch_size,
                                       accum_steps=cfg.accum_steps, rank=info.rank,
                                       world_size=info.world_size, seed=cfg.seed,
                                       aug_repeats=cfg.aug_repeats)
    if steps_per_epoch < 1:
        raise VTPError(f"{len(train_ds)} training images give no full step of "
                       f"{cfg.batch_size} x {cfg.accum_steps} per process on {info.world_size} "
                       "processes: lower --batch-size or --accum-steps")
    total_steps = steps_per_epoch * cfg.epochs
    lr = cfg.scaled_lr(info.world_size)
    optimizer = create_optimizer(raw_model, cfg, lr)
    scheduler = create_scheduler(optimizer, cfg, total_steps, steps_per_epoch)
    scaler = torch.amp.GradScaler(info.device.type, enabled=cfg.amp and cfg.amp_dtype == "float16")
    criterion = train_criterion(mixup_fn is not None, cfg.smoothing)
    penalty_fn = None
    if cfg.lam > 0:
        import vtp
        penalty_fn = vtp.l1_penalty

    if resume:
        loop = _restore(ckpt_path, raw_model, optimizer, scheduler, scaler, cfg, info, say)
        metrics.truncate_after(loop.global_step, loop.epoch)
        say(f"resumed {cfg.stage} from {ckpt_path} at epoch {loop.epoch}, "
            f"step {loop.step_in_epoch}/{steps_per_epoch} (global step {loop.global_step})")
    else:
        loop = LoopState()
        metrics.reset()  # lines of an earlier attempt that never reached a checkpoint
        scheduler.step_update(0)

    if info.distributed:
        model = _wrap_ddp(raw_model, info)
    if cfg.compile:
        model = torch.compile(model)

    def save() -> None:
        state = _checkpoint_state(raw_model, optimizer, scheduler, scaler, loop, cfg, info)
        if info.is_main:
            save_checkpoint(ckpt_path, state)

    def current_lr() -> float:
        return optimizer.param_groups[0]["lr"]  # the weights' lr (gates may be scaled)

    images_per_step = cfg.global_batch(info.world_size)
    summary: Dict[str, Any] = {"stopped": False, "steps_per_epoch": steps_per_epoch,
                               "total_steps": total_steps, "lr": lr}
    run_start = time.perf_counter()
    steps_this_run = 0

    while loop.epoch < cfg.epochs:
        tick = time.perf_counter()
        model.train()
        loader = data.train_loader(train_ds, batch_size=cfg.batch_size, rank=info.rank,
                                   world_size=info.world_size, seed=cfg.seed, epoch=loop.epoch,
                                   skip_batches=loop.step_in_epoch * cfg.accum_steps,
                                   aug_repeats=cfg.aug_repeats, workers=cfg.workers,
                                   pin_memory=info.device.type == "cuda")
        batches = iter(loader)
        bar = tqdm(total=steps_per_epoch, initial=loop.step_in_epoch, unit="step",
                   desc=f"{cfg.stage} {loop.epoch + 1}/{cfg.epochs}", dynamic_ncols=True,
                   disable=not (cfg.progress and info.is_main))
        window = _Window()

        while loop.step_in_epoch < steps_per_epoch:
            step_t0 = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            task, pen, finite = train_step(model, raw_model, batches, cfg, info, criterion,
                                           penalty_fn, scaler, mixup_fn)
            if not finite:
                bar.close()
                where = f"the checkpoint {ckpt_path}" if os.path.exists(ckpt_path) else "not saved yet"
                raise VTPError(
                    f"{cfg.stage}: loss is {task + cfg.lam * pen} at step {loop.global_step + 1} "
                    f"(epoch {loop.epoch}, step {loop.step_in_epoch + 1} of {steps_per_epoch}); "
                    f"stopped before updating the weights. The last good state is {where}. "
                    "Lower --lr or check the data.")
            if cfg.clip_grad is not None:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.clip_grad)
            scaler.step(optimizer)
            scaler.update()
            loop.step_in_epoch += 1
            loop.global_step += 1
            scheduler.step_update(loop.global_step)

            loss = task + cfg.lam * pen
            loop.epoch_loss_sum += loss
            loop.epoch_task_sum += task
            now = time.perf_counter()
            loop.epoch_seconds += now - tick
            tick = now
            window.add(loss, task, pen)
            steps_this_run += 1
            eta = (now - run_start) / steps_this_run * (total_steps - loop.global_step)
            bar.set_postfix({"loss": f"{loss:.4f}", "lr": f"{current_lr():.2e}",
                             "img/s": f"{images_per_step / max(1e-9, now - step_t0):.0f}",
                             "eta": _format_eta(eta)}, refresh=False)
            bar.update(1)
            if loop.global_step % cfg.log_every == 0 or loop.step_in_epoch == steps_per_epoch:
                seconds = time.perf_counter() - window.t0
                metrics.log({
                    "stage": cfg.stage, "kind": "train", "epoch": loop.epoch,
                    "step": loop.global_step, "loss": window.loss / window.n,
                    "task_loss": window.task / window.n, "penalty": window.pen / window.n,
                    "lr": current_lr(), "eta_s": eta, "time": time.time(),
                    "images_per_s": window.n * images_per_step / max(seconds, 1e-9)})
                window = _Window()
            if after_step is not None:
                after_step(loop)
            stop_now = cfg.stop_after_steps is not None and loop.global_step >= cfg.stop_after_steps
            if stop_now or (cfg.save_every and loop.global_step % cfg.save_every == 0):
                save()
            if stop_now:
                bar.close()
                say(f"{cfg.stage}: stopped at step {loop.global_step} as asked "
                    "(--stop-after-steps); continue with --resume")
                summary.update(stopped=True, global_step=loop.global_step)
                return summary

        bar.close()
        loop.epoch_seconds += time.perf_counter() - tick
        row = _epoch_row(raw_model, cfg, info, val_ds, loop, steps_per_epoch, current_lr(),
                         penalty_fn is not None)
        metrics.log(row)
        summary["last_epoch"] = row
        say(f"{cfg.stage} epoch {loop.epoch + 1}/{cfg.epochs}: " + ", ".join(
            f"{k} {row[k]:.4g}" for k in ("train_loss", "val_loss", "val_acc1", "images_per_s")
            if k in row))
        loop.next_epoch()
        save()

    summary["global_step"] = loop.global_step
    return summary
