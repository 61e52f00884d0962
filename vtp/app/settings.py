"""Typed settings of a ``vtp`` stage, read from the parsed flags once.

The command layer (``cli``) turns the ``argparse.Namespace`` into these frozen records;
the checks and the stages below it read only them. A flag a command does not have takes
the value the stage would assume without it (no distillation, no pretrained weights, ...).
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

from vtp._plan import DEFAULT_ROUND_TO
from vtp._prune import DEFAULT_V_LAYOUT

from .train import TrainConfig

__all__ = ["DEFAULT_MODEL", "DataSettings", "ModelStart", "PruneSettings", "DistillSettings",
           "EvalSettings", "SystemSettings", "StageSettings", "AUGMENTATION_FLAGS",
           "settings_from_args"]

# The timm model a dense start builds when neither --model nor a model directory names one.
DEFAULT_MODEL = "deit_base_patch16_224"

# What shapes the training images: recorded with the run, so that resuming with other
# values is pointed out.
AUGMENTATION_FLAGS = ("no_aug", "aa", "color_jitter", "reprob", "remode", "recount", "mixup", "cutmix",
                      "mixup_prob", "mixup_switch_prob", "mixup_mode", "interpolation", "crop_pct",
                      "drop_path")

# The timm.create_model arguments the shortcut flags set.
SHAPE_FLAGS = ("patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "img_size")


def _fields_from(cls, args: argparse.Namespace, **renamed: str) -> Dict[str, Any]:
    """The dataclass fields of `cls` read from `args` (flag dest = field name unless
    `renamed` maps the field to another dest); absent flags keep the field's default."""
    values = {}
    for f in dataclasses.fields(cls):
        dest = renamed.get(f.name, f.name)
        if hasattr(args, dest):
            values[f.name] = getattr(args, dest)
    return values


@dataclass(frozen=True)
class DataSettings:
    """Where the images come from and how they are prepared."""
    data: Optional[str] = None
    synthetic: bool = False
    train_split: str = "train"
    val_split: str = "val"
    synthetic_size: int = 0
    synthetic_val_size: int = 1000
    num_classes: Optional[int] = None
    img_size: Optional[int] = None
    workers: int = 8
    crop_pct: float = 0.875
    interpolation: str = "bicubic"
    no_aug: bool = False
    aa: str = "rand-m9-mstd0.5-inc1"
    color_jitter: float = 0.3
    reprob: float = 0.25
    remode: str = "pixel"
    recount: int = 1
    mixup: float = 0.0
    cutmix: float = 0.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: str = "batch"
    smoothing: float = 0.0

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "DataSettings":
        return cls(**_fields_from(cls, args))


@dataclass(frozen=True)
class ModelStart:
    """Where a dense model's architecture and starting weights come from."""
    model: Optional[str] = None            # --model; None: the directory's, else DEFAULT_MODEL
    checkpoint: Optional[str] = None       # a timm weights file or a vtp.save directory
    reset_head: bool = False
    pretrained: bool = False               # timm's pretrained weights (by name or from a file)
    pretrained_path: Optional[str] = None
    shape: Dict[str, Any] = field(default_factory=dict)  # create_model arguments the flags give
    from_kwargs: Tuple[str, ...] = ()      # the keys of `shape` --model-kwargs gave
    drop_path: float = 0.0
    sites: Tuple[str, ...] = ()
    seed: int = 0

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "ModelStart":
        shape = dict(getattr(args, "model_kwargs", None) or {})
        from_kwargs = set(shape)
        for flag in SHAPE_FLAGS:
            if getattr(args, flag, None) is not None:
                shape[flag] = getattr(args, flag)
                from_kwargs.discard(flag)
        pretrained_path = getattr(args, "pretrained_path", None)
        return cls(model=getattr(args, "model", None), checkpoint=getattr(args, "checkpoint", None),
                   reset_head=bool(getattr(args, "reset_head", False)),
                   pretrained=bool(getattr(args, "pretrained", False) or pretrained_path),
                   pretrained_path=pretrained_path, shape=shape,
                   from_kwargs=tuple(sorted(from_kwargs)),
                   drop_path=getattr(args, "drop_path", 0.0),
                   sites=tuple(getattr(args, "sites", None) or ()), seed=getattr(args, "seed", 0))

    @property
    def name(self) -> str:
        """The timm name a start without a model directory builds."""
        return self.model or DEFAULT_MODEL

    def from_directory(self, directory: str) -> "ModelStart":
        """The same start, from the model a stage saved in `directory` (`vtp run` after its
        dense stage); the shape flags have been checked against it already."""
        return dataclasses.replace(self, checkpoint=directory, pretrained=False,
                                   pretrained_path=None, reset_head=False)


DEFAULT_RATIO = 0.4


@dataclass(frozen=True)
class PruneSettings:
    ratio: Optional[float] = None          # None: DEFAULT_RATIO unless a target is given
    scope: str = "global"
    flops_target: Optional[float] = None
    latency_target: Optional[float] = None
    latency_batch_size: int = 8
    latency_refine: Optional[int] = None   # None: vtp.plan's default (1) with a latency target
    round_to: int = DEFAULT_ROUND_TO
    min_keep: int = 0
    fold: bool = True
    plan: Optional[str] = None             # a plan.json to apply instead of planning
    layout: str = DEFAULT_V_LAYOUT

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "PruneSettings":
        return cls(**_fields_from(cls, args), fold=not getattr(args, "no_fold", False))

    @property
    def effective_ratio(self) -> Optional[float]:
        """The ratio vtp.plan gets: --ratio (DEFAULT_RATIO when not given) unless a target is."""
        if self.latency_target is not None:
            return self.ratio
        if self.flops_target is not None:
            return None
        return DEFAULT_RATIO if self.ratio is None else self.ratio

    def plan_args(self) -> Dict[str, Any]:
        """vtp.plan's arguments: --ratio is ignored once --flops-target is given; given with
        --latency-target it goes along, for vtp.check_plan_args to refuse the pair. The latency
        arguments only with --latency-target (the table's device and dtype are the command's),
        but --latency-refine whenever given, for vtp.check_plan_args to refuse it without one."""
        args = dict(ratio=self.effective_ratio, scope=self.scope, flops_target=self.flops_target,
                    round_to=self.round_to, min_keep=self.min_keep)
        if self.latency_target is not None:
            args.update(latency_target=self.latency_target, batch_size=self.latency_batch_size)
        if self.latency_refine is not None:  # without --latency-target too: check_plan_args refuses it
            args.update(refine=self.latency_refine)
        return args


@dataclass(frozen=True)
class DistillSettings:
    distill: bool = False
    teacher: Optional[str] = None          # 'dense', 'gated' or a directory; None: 'dense'
    kind: str = "soft"
    alpha: float = 0.5
    tau: float = 1.0

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "DistillSettings":
        return cls(**_fields_from(cls, args, kind="distill_type", alpha="distill_alpha",
                                  tau="distill_tau"))


@dataclass(frozen=True)
class EvalSettings:
    eval_batch_size: int = 128
    bench_batch_size: int = 64
    bench_steps: int = 0
    runtime: str = "torch"

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "EvalSettings":
        return cls(**_fields_from(cls, args))


@dataclass(frozen=True)
class SystemSettings:
    device: str = "cpu"
    amp: bool = False
    amp_dtype: str = "bfloat16"
    deterministic: bool = False
    kernels: Optional[str] = None
    dist_backend: str = "auto"
    output: Optional[str] = None
    resume: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "SystemSettings":
        values = _fields_from(cls, args)
        if getattr(args, "runtime", "torch") == "onnxruntime" and values.get("device") == "auto":
            values["device"] = "cpu"  # ONNX Runtime runs on the CPU
        return cls(**values)


@dataclass(frozen=True)
class StageSettings:
    """Everything a command's stages read, from one parse of its flags."""
    command: str
    data: DataSettings
    start: ModelStart
    prune: PruneSettings
    distill: DistillSettings
    eval: EvalSettings
    system: SystemSettings
    training: Dict[str, TrainConfig]       # by stage: train, sparse-train, finetune
    batch_size: int = 64
    stop_after_steps: Optional[int] = None

    def train_config(self, stage: str) -> TrainConfig:
        """A fresh copy: a stage records its teacher in it."""
        return dataclasses.replace(self.training[stage])

    def with_start(self, start: ModelStart) -> "StageSettings":
        return dataclasses.replace(self, start=start)


# The training stages of each command, and the prefix of their per-stage flags.
_TRAINING = {"train": {"train": ""}, "sparse-train": {"sparse-train": ""},
             "finetune": {"finetune": ""},
             "run": {"train": "train-", "sparse-train": "sparse-", "finetune": "finetune-"}}


def _train_config(args: argparse.Namespace, stage: str, prefix: str,
                  distill: DistillSettings) -> TrainConfig:
    """TrainConfig of a stage from flags; `prefix` picks the per-stage flags of `vtp run`."""
    def stage_value(name: str):
        return getattr(args, prefix.replace("-", "_") + name)

    lam = getattr(args, "lam", 0.0) if stage == "sparse-train" else 0.0
    distilled = stage == "finetune" and distill.distill
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
        progress=args.progress, eval_batch_size=args.eval_batch_size,
        distill=distill.kind if distilled else "none",
        distill_alpha=distill.alpha if distilled else 0.0,
        distill_tau=distill.tau if distilled else 1.0,
        augmentation={k: getattr(args, k) for k in AUGMENTATION_FLAGS if hasattr(args, k)})


def settings_from_args(args: argparse.Namespace, command: str) -> StageSettings:
    """The one reading of a command's flags."""
    distill = DistillSettings.from_args(args)
    return StageSettings(
        command=command, data=DataSettings.from_args(args), start=ModelStart.from_args(args),
        prune=PruneSettings.from_args(args), distill=distill, eval=EvalSettings.from_args(args),
        system=SystemSettings.from_args(args),
        training={stage: _train_config(args, stage, prefix, distill)
                  for stage, prefix in _TRAINING.get(command, {}).items()},
        batch_size=getattr(args, "batch_size", 64),
        stop_after_steps=getattr(args, "stop_after_steps", None))
