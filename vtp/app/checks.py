"""The checks of a ``vtp`` command's inputs, made before any process group, folder or model.

Each rule is checked by one function here, on the typed settings (settings.py); the rule of
the plan's arguments is the library's own (``vtp.check_plan_args``), its error reworded to
name the flag.
"""
from __future__ import annotations

import importlib.util
import math
import os
import re
from typing import Any, Dict, Optional

import timm
import torch

import vtp
from vtp.io import is_model_dir, read_config
from vtp.rebuild import build, read_model_args

from . import data, models
from .errors import VTPError
from .settings import DataSettings, DistillSettings, ModelStart, PruneSettings, StageSettings
from .teacher import TeacherSpec, check_teacher, resolve_teacher, teacher_from_directory, teacher_shape

__all__ = ["SOURCE_DIRS", "resolve_source", "check_source", "check_data", "check_start",
           "check_model_directory", "check_prune", "check_plan_flags", "check_plan_file", "check_distill_flags",
           "check_trained_start", "check_run_teacher", "finetune_teacher", "check_runtime",
           "check_export_output", "expected_classes"]

# Where a directory given as SOURCE keeps the model each command wants, first match wins:
# a vtp.save directory itself, a stage directory, or a `vtp run` directory.
SOURCE_DIRS = {
    "prune": ("model", "sparse-train/model"),
    "finetune": ("model", "prune/model"),
    "eval": ("model", "finetune/model", "prune/model", "sparse-train/model"),
    "export": ("model", "finetune/model", "prune/model", "sparse-train/model"),
}


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


def check_source(s: StageSettings, source: str) -> None:
    """What a command asks of the model in SOURCE, from its config.json alone: the model
    flags it has must agree with the model the directory holds."""
    saved = _read_saved(source, "SOURCE")
    check_model_directory(s.start, s.data, source, "SOURCE", saved=saved)
    if s.command == "finetune" and saved.is_gated:
        raise VTPError(f"{source} holds a gated model that is not pruned; fine-tune what "
                       "`vtp prune` makes of it")


def _read_saved(directory: str, what: str):
    try:
        return read_config(directory)
    except (OSError, ValueError) as e:
        raise VTPError(f"{what} {directory}: {e}") from None


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        pair = lambda v: tuple(v) if isinstance(v, (list, tuple)) else (v, v)  # noqa: E731
        return pair(a) == pair(b)
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isclose(a, b)
    return a == b


def check_model_directory(start: ModelStart, data_settings: DataSettings, directory: str,
                          what: str, saved=None) -> None:
    """A vtp.save directory carries its model: the model flags given with it must agree
    with its config.json (--model, the shape flags, --model-kwargs, --img-size and, unless
    --reset-head starts the classifier afresh, --num-classes); nothing is overridden."""
    saved = saved or _read_saved(directory, what)
    where = f"the model in {directory}"
    keep_out = "leave the flag out (the directory's config.json gives the architecture) or give that value"
    if start.model is not None and start.model.split(".")[0] != saved.architecture.split(".")[0]:
        raise VTPError(f"--model {start.model}: {where} is a {saved.architecture}; {keep_out}")
    classes = data_settings.num_classes
    if classes is not None and classes != saved.num_classes and not start.reset_head:
        raise VTPError(f"--num-classes {classes}: {where} predicts {saved.num_classes} classes")
    size = start.shape.get("img_size")
    if size is not None and "img_size" in start.from_kwargs and not _same(size, saved.img_size):
        raise VTPError(f"--model-kwargs img_size={size!r}: {where} takes "
                       f"{'x'.join(map(str, saved.img_size))} images; {keep_out}")
    if size is not None and not _same(size, saved.img_size):
        raise VTPError(f"--img-size {size}: {where} takes {'x'.join(map(str, saved.img_size))} "
                       f"images; {keep_out}")
    shape = {k: v for k, v in start.shape.items() if k != "img_size"}
    if not shape:
        return
    try:
        with torch.device("meta"):
            have = read_model_args(build({"architecture": saved.architecture,
                                          "model_args": saved.model_args}))
    except (TypeError, ValueError) as e:
        raise VTPError(f"{what} {directory}: {e}") from None
    for key, value in shape.items():
        flag = (f"--model-kwargs {key}={value!r}" if key in start.from_kwargs
                else f"{_flag(key)} {value}")
        if key not in have:
            raise VTPError(f"{flag}: cannot be checked against {where}; leave it out (the "
                           "directory's config.json gives the architecture)")
        if not _same(value, have[key]):
            raise VTPError(f"{flag}: {where} has {key} {have[key]!r}; {keep_out}")


def check_data(d: DataSettings, need_train: bool, batch_size: int) -> None:
    """The data folders, and training settings that would otherwise fail at the first batch."""
    splits = ([d.train_split] if need_train else []) + ([d.val_split] if d.val_split else [])
    data.check_data_args(d.data, d.synthetic, splits)
    if not need_train:
        return
    if batch_size % 2 and data.mixup_from(d, num_classes=2) is not None:
        raise VTPError(f"--batch-size {batch_size}: mixup/cutmix need an even batch "
                       "(or pass --mixup 0 --cutmix 0)")
    if not d.synthetic:
        try:  # a policy string timm does not know fails here, not at the first batch
            data.train_transform_from(d, (32, 32), {"mean": (0.5,) * 3, "std": (0.5,) * 3})
        except Exception as e:
            raise VTPError(f"--aa {d.aa}: not a timm augmentation policy ({e})") from None


def check_start(start: ModelStart, data_settings: DataSettings) -> None:
    """Where the dense model comes from: files that exist, one source of weights, a known
    timm name, and model flags that agree with a model directory."""
    checkpoint = start.checkpoint
    if checkpoint and not os.path.exists(checkpoint):
        raise VTPError(f"--checkpoint not found: {checkpoint}")
    if checkpoint and os.path.isdir(checkpoint) and not is_model_dir(checkpoint):
        raise VTPError(f"--checkpoint {checkpoint}: a directory must be written by vtp.save")
    if checkpoint and start.pretrained:
        raise VTPError("--checkpoint and --pretrained both give the starting weights: pass one")
    if start.pretrained_path and not os.path.isfile(start.pretrained_path):
        raise VTPError(f"--pretrained-path not found: {start.pretrained_path}")
    if start.model is not None and not timm.is_model(start.model):
        raise VTPError(f"unknown timm model '{start.model}' (see timm.list_models())")
    if checkpoint and os.path.isdir(checkpoint):
        check_model_directory(start, data_settings, checkpoint, "--checkpoint")


def check_prune(p: PruneSettings) -> None:
    """Pruning settings that would otherwise fail only after sparse training: vtp.plan's
    own rule, and a --plan file that reads."""
    check_plan_flags(p.plan_args())
    check_plan_file(p.plan)


_PLAN_ARGS = ("flops_target", "latency_target", "batch_size", "refine", "round_to", "min_keep", "ratio", "scope")
_LATENCY_FLAGS = {"batch_size": "--latency-batch-size", "refine": "--latency-refine"}


def _plan_flag(key: str) -> str:
    return _LATENCY_FLAGS.get(key) or _flag(key)


def check_plan_flags(plan_args: Dict[str, Any]) -> None:
    """vtp.check_plan_args on the values of the flags --ratio, --scope, --flops-target,
    --round-to and --min-keep; its message in the command's words: 'scope: flops_target
    ranks ...' becomes '--scope layer: --flops-target ranks ...'."""
    try:
        vtp.check_plan_args(**plan_args)
    except ValueError as e:
        name, _, rest = str(e).partition(": ")
        if name == "plan" and "exactly one of" in rest:  # two targets: name both flags
            given = [k for k in ("ratio", "flops_target", "latency_target") if plan_args.get(k) is not None]
            raise VTPError(f"{' and '.join(_plan_flag(k) for k in given)}: give one of --ratio, "
                           "--flops-target or --latency-target") from None
        if name not in _PLAN_ARGS:
            raise VTPError(str(e)) from None
        rest = re.sub(r"\b(%s)\b(?:='?([\w.]+)'?)?" % "|".join(_PLAN_ARGS),
                      lambda m: _plan_flag(m.group(1)) + (f" {m.group(2)}" if m.group(2) else ""), rest)
        # a range error ends in 'got <value>'; another names the value after the flag
        flag = _plan_flag(name) if " got " in rest else f"{_plan_flag(name)} {plan_args[name]}"
        raise VTPError(f"{flag}: {rest}") from None


def check_plan_file(path: Optional[str]) -> None:
    if not path:
        return
    if not os.path.isfile(path):
        raise VTPError(f"--plan {path}: file not found")
    try:
        vtp.PruningPlan.load(path)
    except (OSError, ValueError) as e:
        raise VTPError(f"--plan {path}: {e}") from None


def check_distill_flags(d: DistillSettings) -> None:
    if d.teacher and not d.distill:
        raise VTPError(f"--teacher {d.teacher}: add --distill to fine-tune with a teacher")


def expected_classes(d: DataSettings) -> int:
    """The class count a dense model will get, from the flags and the class folders alone."""
    if d.num_classes:
        return d.num_classes
    if d.synthetic:
        return 1000
    root = os.path.join(d.data, d.train_split)
    return sum(1 for entry in os.scandir(root) if entry.is_dir())


def check_trained_start(s: StageSettings) -> None:
    """`vtp run` prunes a trained model: a checkpoint, pretrained weights that already
    predict these classes, or one trained by the run's own dense stage (--train-epochs)."""
    if s.training["train"].epochs > 0:
        return
    start = s.start
    how = ("pass --checkpoint PATH (a trained timm checkpoint file, or a model directory "
           "written by `vtp train` or vtp.save), or add --train-epochs N to train the dense "
           "model in this run first (what `vtp train` does)")
    if not start.checkpoint and not start.pretrained:
        raise VTPError("vtp run prunes a trained model, and none was given: without "
                       f"--checkpoint it would prune random weights. To get one, {how}")
    if start.checkpoint and start.reset_head:
        raise VTPError("--reset-head starts the classifier afresh: the run would prune a model "
                       "that has never seen these classes; add --train-epochs N to train it first")
    if start.pretrained:
        have = models.pretrained_classes(start.name, start.pretrained_path)
        want = expected_classes(s.data)
        if have != want:
            raise VTPError(f"--pretrained: the weights predict {have} classes, the data has {want}: "
                           "the classifier would start afresh and the run would prune a model "
                           "that has never seen these classes; add --train-epochs N to "
                           "fine-tune it first")


def check_run_teacher(s: StageSettings) -> None:
    """A teacher directory given to `vtp run --distill`, checked before any work ('dense' and
    'gated' are made by the run itself)."""
    if not s.distill.distill or (s.distill.teacher or "dense") in ("dense", "gated"):
        return
    classes, size = teacher_shape(teacher_from_directory(s.distill.teacher))
    want = expected_classes(s.data)
    if classes != want:
        raise VTPError(f"--teacher {s.distill.teacher} predicts {classes} classes, the data has {want}")
    student = _student_img_size(s)
    if size is not None and student is not None and tuple(size) != tuple(student):
        raise VTPError(f"--teacher {s.distill.teacher} takes {'x'.join(map(str, size))} images, "
                       f"the student {'x'.join(map(str, student))}")


def _student_img_size(s: StageSettings):
    """The image size of the model `vtp run` prunes, where the flags or a model directory
    tell it without building the model; None otherwise."""
    if s.data.img_size:
        return (s.data.img_size,) * 2
    if s.start.checkpoint and is_model_dir(s.start.checkpoint):
        return read_config(s.start.checkpoint).img_size
    return None


def finetune_teacher(d: DistillSettings, source: str) -> Optional[TeacherSpec]:
    """The teacher of fine-tuning the model in `source` (None without --distill), found
    from the flags and the model's records, and checked against the model."""
    if not d.distill:
        return None
    saved = read_config(source)
    spec = resolve_teacher(d.teacher, saved.metadata, source)
    check_teacher(spec, saved.num_classes, saved.img_size)
    return spec


def check_runtime(runtime: str, device: str, amp: bool) -> None:
    """`vtp eval --runtime onnxruntime` runs the exported model on the CPU."""
    if runtime != "onnxruntime":
        return
    if device == "cuda":
        raise VTPError("--runtime onnxruntime: runs on the CPU; pass --device cpu (or auto)")
    if amp:
        raise VTPError("--runtime onnxruntime: runs the float32 export; drop --amp")
    if importlib.util.find_spec("onnxruntime") is None:
        raise VTPError("--runtime onnxruntime: ONNX Runtime is not installed: pip install 'vtp[export]'")


def check_export_output(output: Optional[str]) -> None:
    """Where `vtp export` writes must be writable before any work."""
    if not output:
        raise VTPError("--output: give the FILE to write (e.g. model.onnx)")
    if os.path.isdir(output):
        raise VTPError(f"--output {output}: is a directory; give a file name")
    parent = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(parent):
        raise VTPError(f"--output {output}: the folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise VTPError(f"--output {output}: the folder {parent} is not writable")

