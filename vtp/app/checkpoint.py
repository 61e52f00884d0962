"""Training checkpoints: everything the next optimizer step depends on, written atomically.

A checkpoint holds the model, optimizer, schedule and gradient-scaler states, where the loop
stands, every process's random states and the settings of the run, in a file that
``torch.load(weights_only=True)`` reads back (no pickled code). Resuming from it continues
the run exactly.

A run may be killed at any moment (a preemptible job's SIGKILL) and the same command re-run
with ``--resume``: before its first checkpoint it starts again from the beginning, after it
from the checkpoint, and what the killed writes left half-done is removed first
(``discard_interrupted_writes``).
"""
from __future__ import annotations

import os
import signal
from typing import Any, Callable, Dict, Optional

import torch
import torch.nn as nn

from vtp.atomic import atomic_write, remove_interrupted_writes

from .distributed import DistInfo, broadcast_object, gather_objects
from .errors import VTPError
from .random import capture_rng, restore_rng, seed_everything

__all__ = ["CHECKPOINT_NAME", "checkpoint_path", "check_fresh_or_resume", "has_checkpoint",
           "discard_interrupted_writes", "kill_point", "save_checkpoint", "load_checkpoint",
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


def check_fresh_or_resume(out_dir: Optional[str], resume: bool, optional: bool = False) -> bool:
    """Refuses to train over an existing run unless asked to resume; True when resuming.
    `out_dir` None is a new, timestamped directory. A run killed before its first checkpoint
    left none: --resume then starts it from the beginning (the same command can always be
    re-run), the training loop saying so unless the stage is `optional` (one of `vtp run`'s,
    which resumes the stages it finds started and starts the others), where False is
    returned."""
    if out_dir is None:
        if resume:
            raise VTPError("--resume: give the --output of the run to continue")
        return False
    ckpt = checkpoint_path(out_dir)
    if resume:
        return os.path.isfile(ckpt) or not optional
    if os.path.isfile(ckpt):
        raise VTPError(f"{out_dir} already holds a run ({ckpt}); pass --resume to continue it "
                       "or choose another --output")
    return False


def has_checkpoint(path: str, info: DistInfo) -> bool:
    """Whether the checkpoint `path` exists, as rank 0 sees it: every process takes the same
    branch."""
    return broadcast_object(os.path.isfile(path), info)


def discard_interrupted_writes(out_dir: str) -> None:
    """Removes what writes killed half-way left in a stage's directory and its checkpoints/
    (temporary files and directories of checkpoints, metrics, configs, summaries, model/),
    and puts back a model/ a kill left moved aside. Rank 0 alone calls it."""
    for folder in (out_dir, os.path.dirname(checkpoint_path(out_dir))):
        remove_interrupted_writes(folder)


# tests/app/test_killed_runs.py kills real runs at exact points to check that they survive:
# with VTP_TEST_SIGKILL_AT="<point>:<global step>" set, this process kills itself (SIGKILL,
# no clean-up runs) when it reaches that point of that step. The points: "step" (weights
# updated, nothing logged or saved), "checkpoint-write" (written to the temporary file, not
# renamed), "checkpoint-saved" (renamed into place). All it can do is end the process that
# has it set, which whoever sets it could do anyway.
_KILL_ENV = "VTP_TEST_SIGKILL_AT"


def kill_point(point: str, global_step: int) -> None:
    if os.environ.get(_KILL_ENV) == f"{point}:{global_step}":
        os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))


def save_checkpoint(path: str, state: Dict[str, Any]) -> None:
    step = state.get("global_step", -1)

    def write(tmp: str) -> None:
        torch.save(state, tmp)
        kill_point("checkpoint-write", step)

    atomic_write(path, write)
    kill_point("checkpoint-saved", step)


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
