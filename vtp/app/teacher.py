"""The teacher of a distilled fine-tuning: which model it is, checked before any work, and
built again from the same description on every process and on every resume.

A model that went through `vtp sparse-train` carries, in its metadata, a description of
the dense model sparse training started from (``dense``: the timm name and arguments, and
where its weights came from: a checkpoint file, a ``vtp.save`` directory or timm's
pretrained weights), and a pruned model the path of the gated model it was pruned from
(``prune.source``). ``--teacher dense`` and ``--teacher gated`` follow those records; a
directory names the teacher directly. Nothing here copies a teacher's weights anywhere.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch.nn as nn

from vtp.io import is_model_dir, read_config

from . import models
from .errors import VTPError

__all__ = ["TeacherSpec", "dense_record", "resolve_teacher", "teacher_from_directory",
           "teacher_shape", "check_teacher", "build_teacher"]


@dataclass(frozen=True)
class TeacherSpec:
    """Where a teacher comes from: a vtp.save directory, or the record of a dense model."""
    label: str                               # what --teacher said: dense, gated or a path
    directory: Optional[str] = None          # a vtp.save directory
    dense: Optional[Dict[str, Any]] = None   # a dense_record, when there is no directory

    def describe(self) -> str:
        """One line for logs, config records and the resume check."""
        if self.directory:
            return os.path.abspath(self.directory)
        d = self.dense or {}
        if d.get("pretrained"):
            return f"timm pretrained {d['model']}" + (f" ({d['pretrained_path']})"
                                                      if d.get("pretrained_path") else "")
        return f"{d.get('model')} from {d.get('checkpoint')}"


def dense_record(start, name: str, num_classes: int, model_kwargs: Dict[str, Any],
                 head_reset: bool) -> Dict[str, Any]:
    """What a dense starting model was built from (`start`, a settings.ModelStart; `name`
    and `model_kwargs`, the architecture it built): enough to build it again."""
    return {
        "model": name, "model_kwargs": dict(model_kwargs), "num_classes": num_classes,
        "checkpoint": os.path.abspath(start.checkpoint) if start.checkpoint else None,
        "pretrained": bool(start.pretrained),
        "pretrained_path": os.path.abspath(start.pretrained_path) if start.pretrained_path else None,
        # A classifier started afresh knows nothing of the classes: no teacher.
        "head_reset": bool(head_reset),
    }


def teacher_from_directory(path: str) -> TeacherSpec:
    """A teacher given as a directory: a vtp.save directory, or a stage directory holding
    one in model/."""
    for candidate in (path, os.path.join(path, "model")):
        if is_model_dir(candidate):
            return TeacherSpec(label=path, directory=candidate)
    if not os.path.exists(path):
        raise VTPError(f"--teacher {path}: not found")
    raise VTPError(f"--teacher {path}: not a directory written by vtp.save (nor a stage "
                   "directory with one in model/); give 'dense', 'gated' or such a directory")


def _from_dense_record(record: Optional[Dict[str, Any]], source: str) -> TeacherSpec:
    if not record:
        raise VTPError(f"--distill --teacher dense: {source} records no dense model (it was not "
                       "made by `vtp sparse-train` and `vtp prune`); pass --teacher gated or "
                       "--teacher DIR (a trained model saved by vtp.save, e.g. `vtp train`'s)")
    if record.get("head_reset"):
        raise VTPError(f"--distill --teacher dense: the dense model of {source} had its classifier "
                       "started afresh (--reset-head or pretrained weights of another class count) "
                       "and was never trained on these classes; pass --teacher gated or "
                       "--teacher DIR")
    checkpoint = record.get("checkpoint")
    if checkpoint:
        if os.path.isdir(checkpoint):
            return TeacherSpec(label="dense", directory=checkpoint)
        if not os.path.isfile(checkpoint):
            raise VTPError(f"--distill --teacher dense: the dense model's checkpoint {checkpoint} "
                           "is gone; pass --teacher gated or --teacher DIR")
    elif not record.get("pretrained"):
        raise VTPError(f"--distill --teacher dense: the dense model of {source} started from "
                       "random weights (no --checkpoint, no --pretrained): it is no teacher; "
                       "pass --teacher gated or --teacher DIR")
    path = record.get("pretrained_path")
    if path and not os.path.isfile(path):
        raise VTPError(f"--distill --teacher dense: the dense model's pretrained file {path} is "
                       "gone; pass --teacher gated or --teacher DIR")
    return TeacherSpec(label="dense", dense=dict(record))


def resolve_teacher(which: Optional[str], metadata: Dict[str, Any], source: str) -> TeacherSpec:
    """The teacher `which` ('dense', 'gated' or a directory; None means 'dense') names for
    fine-tuning the model saved in `source` with `metadata`."""
    which = which or "dense"
    if which == "dense":
        return _from_dense_record(metadata.get("dense"), source)
    if which == "gated":
        gated = (metadata.get("prune") or {}).get("source")
        if not gated:
            raise VTPError(f"--distill --teacher gated: {source} records no gated model it was "
                           "pruned from (it was not made by `vtp prune`); pass --teacher DIR")
        if not is_model_dir(gated):
            raise VTPError(f"--distill --teacher gated: the gated model {gated} that {source} was "
                           "pruned from is gone; pass --teacher DIR")
        return TeacherSpec(label="gated", directory=gated)
    return teacher_from_directory(which)


def teacher_shape(spec: TeacherSpec) -> Tuple[int, Optional[Tuple[int, int]]]:
    """(classes, image size or None when unknown) of the teacher, without building it."""
    if spec.directory:
        try:
            saved = read_config(spec.directory)
        except (OSError, ValueError) as e:
            raise VTPError(f"--teacher {spec.label}: {e}") from None
        return saved.num_classes, saved.img_size
    size = (spec.dense or {}).get("model_kwargs", {}).get("img_size")
    return int(spec.dense["num_classes"]), ((size, size) if isinstance(size, int) else None)


def check_teacher(spec: TeacherSpec, num_classes: int, img_size: Tuple[int, int]) -> None:
    """The teacher must predict the student's classes from the student's images."""
    classes, size = teacher_shape(spec)
    if classes != num_classes:
        raise VTPError(f"--teacher {spec.label} ({spec.describe()}) predicts {classes} classes, "
                       f"the student {num_classes}")
    if size is not None and tuple(size) != tuple(img_size):
        raise VTPError(f"--teacher {spec.label} ({spec.describe()}) takes "
                       f"{'x'.join(map(str, size))} images, the student "
                       f"{'x'.join(map(str, img_size))}")


def build_teacher(spec: TeacherSpec) -> nn.Module:
    """The teacher model on the CPU, in eval mode."""
    if spec.directory:
        model, _ = models.load_vtp_model(spec.directory)
        return model.eval()
    d = spec.dense
    model = models.create_dense_model(d["model"], d["num_classes"], d["model_kwargs"],
                                      pretrained=bool(d.get("pretrained")),
                                      pretrained_path=d.get("pretrained_path"))
    if d.get("checkpoint"):
        models.load_weights(model, d["checkpoint"])
    return model.eval()
