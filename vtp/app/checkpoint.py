"""Training checkpoints: everything the next optimizer step depends on, written atomically.

A checkpoint holds the model, optimizer, schedule and gradient-scaler states, where the loop
stands, every process's random states and the settings of the run, in a file that
``torch.load(weights_only=True)`` reads back (no pickled code). Resuming from it continues
the run exactly.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Dict

import torch
import torch.nn as nn

from vtp.atomic import atomic_write

from .distributed import DistInfo, gather_objects
from .errors import VTPError
from .random import capture_rng, restore_rng, seed_everything

__all__ = ["CHECKPOINT_NAME", "checkpoint_path", "save_checkpoint", "load_checkpoint",
           "training_state", "restore_training_state"]

CHECKPOINT_NAME = "last.pt"
CHECKPOINT_FORMAT = "vtp-train-checkpoint"

# The settings that only say how a run is carried out; every other one changes the
# trajectory, and a resume with another value is not the same run.
_RUN_TIME_KEYS = ("stage", "workers", "save_every", "stop_after_steps", "log_every", "compile",
                  "progress", "eval_batch_size")


def checkpoint_path(out_dir: str) -> str:
    """Where a stage writing `out_dir` keeps its checkpoint."""
    return os.path.join(out_dir, "checkpoints", CHECKPOINT_NAME)


def save_checkpoint(path: str, state: Dict[str, Any]) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: str) -> Dict[str, Any]:
    if not os.path.isfile(path):
        raise VTPError(f"no checkpoint to resume from: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise VTPError(f"cannot read checkpoint {path}: {e}") from None


def training_state(raw_model: nn.Module, optimizer, scheduler, scaler, loop: Dict[str, Any],
                   stage: str, train_config: Dict[str, Any], info: DistInfo) -> Dict[str, Any]:
    """The checkpoint of a stage. A collective: every process's random state is gathered."""
    rng = gather_objects(capture_rng(info.device), info)
    return {
        "format": CHECKPOINT_FORMAT, "version": 1, "stage": stage,
        "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
        **loop, "world_size": info.world_size, "rng": rng, "train_config": train_config,
    }


def _check_resume(ckpt: Dict[str, Any], stage: str, train_config: Dict[str, Any], info: DistInfo,
                  say: Callable[[str], None]) -> None:
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        raise VTPError("the checkpoint to resume from is not a vtp training checkpoint")
    if ckpt.get("stage") != stage:
        raise VTPError(f"the checkpoint to resume from belongs to stage '{ckpt.get('stage')}', "
                       f"not '{stage}'")
    old = ckpt.get("train_config", {})
    changed = [f"{k}: {old.get(k)} -> {train_config[k]}" for k in train_config
               if k not in _RUN_TIME_KEYS and k in old and old[k] != train_config[k]]
    if changed:
        say("warning: resuming with changed settings (" + "; ".join(changed) + ")")
    if ckpt.get("world_size") != info.world_size:
        say(f"warning: resuming on {info.world_size} processes from a checkpoint of "
            f"{ckpt.get('world_size')}: the data order of the current epoch changes")


def restore_training_state(path: str, raw_model: nn.Module, optimizer, scheduler, scaler,
                           stage: str, train_config: Dict[str, Any], info: DistInfo,
                           say: Callable[[str], None]) -> Dict[str, Any]:
    """Loads a training checkpoint into the live objects and this process's random state;
    returns the checkpoint (its loop fields say where to continue)."""
    ckpt = load_checkpoint(path)
    _check_resume(ckpt, stage, train_config, info, say)
    try:
        raw_model.load_state_dict(ckpt["model"], strict=True)
    except RuntimeError as e:
        raise VTPError(f"checkpoint {path} does not fit the model: {e}") from None
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
        seed_everything(train_config["seed"] + info.rank + 7919 * ckpt["global_step"])
    return ckpt
