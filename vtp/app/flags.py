"""Flags and YAML configs of the ``vtp`` command.

Every stage is an argparse sub-command. A YAML file given with ``--config`` supplies values
for any of that stage's flags (keys are flag names, ``-`` or ``_`` alike); flags given on the
command line win over the file. The resolved settings of a run are written next to its
outputs (``config.yaml``) and can be fed back with ``--config``.
"""
from __future__ import annotations

import argparse
import difflib
import json
import math
import os
import textwrap
from typing import Any, Callable, Dict, Optional, Sequence

import yaml

from vtp.atomic import atomic_write
from vtp.modules import V_LAYOUTS
from vtp._plan import DEFAULT_ROUND_TO
from vtp._prune import DEFAULT_V_LAYOUT

from .distill import DISTILL_KINDS
from .errors import VTPError

__all__ = [
    "TRAIN_DEFAULTS", "SPARSE_DEFAULTS", "FINETUNE_DEFAULTS", "HelpFormatter",
    "add_data_args", "add_model_args", "add_train_args", "add_prune_args", "add_eval_args",
    "add_distill_args",
    "add_system_args", "add_output_args", "add_config_arg", "apply_yaml_config",
    "load_yaml_config", "resolved_config", "write_config",
    "positive_int",
]


# Dense training (`vtp train`) follows DeiT's recipe from scratch: 300 epochs, lr 5e-4 per
# 512 images, 5 warm-up epochs, cosine to 1e-5. Fine-tuning a pretrained model needs far
# fewer epochs (and often a lower lr): set --epochs/--lr.
TRAIN_DEFAULTS = dict(epochs=300, lr=5e-4, warmup_epochs=5, min_lr=1e-5, lam=0.0)
# The VTP paper trains with the sparsity penalty from a trained DeiT for 100 epochs with
# lr 6.25e-6 and lambda 1e-4. The paper does not tie that lr to a batch size; here it is the
# base lr for a global batch of 512 (lr = base * global_batch / 512, as every lr below).
SPARSE_DEFAULTS = dict(epochs=100, lr=6.25e-6, warmup_epochs=0, min_lr=0.0, lam=1e-4)
# Fine-tuning the pruned model follows the DeiT recipe: lr 5e-4 per 512 images, 5 warm-up
# epochs, cosine to 1e-5. 100 epochs; shorten with --epochs when compute is short.
FINETUNE_DEFAULTS = dict(epochs=100, lr=5e-4, warmup_epochs=5, min_lr=1e-5, lam=0.0)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows each flag's default (unless it is unset or a switch that is off); wraps each line
    of a description or epilog to the terminal, keeping the line breaks written into it."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "\n".join(textwrap.fill(line, width, initial_indent=indent,
                                       subsequent_indent=indent) if line.strip() else ""
                         for line in text.splitlines())

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("%(default)" in text or action.default is None or action.default is False
                or action.default is argparse.SUPPRESS):
            return text
        if action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            text += " (default: %(default)s)"
        return text


def _number(text: str, kind: type):
    """`text` as an int or a finite float, or an argparse error that says which was expected."""
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _checked(kind: type, ok: Callable[[Any], bool], expected: str) -> Callable[[str], Any]:
    """An argparse type: a number of `kind` for which `ok` holds, else '<expected>, got ...'."""
    def convert(text: str) -> Any:
        value = _number(text, kind)
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{expected}, got {text}")
        return value
    return convert


positive_int = _checked(int, lambda v: v >= 1, "must be >= 1")
_non_negative_int = _checked(int, lambda v: v >= 0, "must be >= 0")
_positive_float = _checked(float, lambda v: v > 0, "must be > 0")
_non_negative_float = _checked(float, lambda v: v >= 0, "must be >= 0")
_ratio = _checked(float, lambda v: 0.0 <= v < 1.0, "must be in [0, 1)")
_probability = _checked(float, lambda v: 0.0 <= v <= 1.0, "must be in [0, 1]")
_share = _checked(float, lambda v: 0.0 < v <= 1.0, "must be in (0, 1]")


def _json_dict(text: str) -> Dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object, e.g. '{\"qkv_bias\": false}'")
    return value


# ---------------------------------------------------------------------------------------------
# Flag groups. Each stage's parser is assembled from these; `defaults` carries per-stage values.


def add_config_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", metavar="YAML", default=None,
        help="YAML file of flag values (keys are flag names); flags on the command line win")


def add_output_args(parser: argparse.ArgumentParser, stage: str) -> None:
    group = parser.add_argument_group("output")
    group.add_argument(
        "--output", "-o", metavar="DIR", default=None,
        help=f"run directory to write; default runs/{stage}-<date>-<time>")


def add_data_args(parser: argparse.ArgumentParser, train: bool = True) -> None:
    group = parser.add_argument_group("data")
    group.add_argument(
        "--data", metavar="DIR", default=None,
        help="ImageFolder root holding one sub-folder per split (class folders inside each)")
    if train:
        group.add_argument("--train-split", default="train", help="training sub-folder of --data")
    group.add_argument("--val-split", default="val", help="validation sub-folder of --data")
    group.add_argument(
        "--synthetic", action="store_true",
        help="random images instead of --data, for throughput runs and smoke tests")
    if train:
        group.add_argument("--synthetic-size", type=positive_int, default=12800,
                           help="number of synthetic training images per epoch")
    group.add_argument("--synthetic-val-size", type=_non_negative_int, default=1000,
                       help="number of synthetic validation images")
    group.add_argument(
        "--num-classes", type=positive_int, default=None,
        help="classes of the classifier; default: number of class folders (1000 if --synthetic)")
    group.add_argument(
        "--img-size", type=positive_int, default=None,
        help="input resolution (model and data); default: the model's own")
    group.add_argument("--workers", "-j", type=_non_negative_int, default=8,
                       help="data-loading processes per training process")
    group.add_argument("--crop-pct", type=_share, default=0.875,
                       help="evaluation centre-crop fraction (DeiT: 224/256)")
    group.add_argument("--interpolation", default="bicubic", choices=("bilinear", "bicubic"),
                       help="resize interpolation for training and evaluation")
    if not train:
        return
    aug = parser.add_argument_group("augmentation (DeiT recipe)")
    aug.add_argument("--no-aug", action="store_true",
                     help="no training augmentation at all: no random crop, flip, RandAugment, "
                          "erasing, mixup/cutmix (label smoothing still applies)")
    aug.add_argument("--aa", default="rand-m9-mstd0.5-inc1",
                     help="timm auto-augment policy; 'none' to disable")
    aug.add_argument("--color-jitter", type=_non_negative_float, default=0.3,
                     help="colour jitter strength (timm ignores it when --aa is set)")
    aug.add_argument("--reprob", type=_probability, default=0.25, help="random erasing probability")
    aug.add_argument("--remode", default="pixel", choices=("const", "rand", "pixel"),
                     help="random erasing fill mode")
    aug.add_argument("--recount", type=positive_int, default=1, help="random erasing regions")
    aug.add_argument("--mixup", type=_non_negative_float, default=0.8,
                     help="mixup alpha; 0 disables")
    aug.add_argument("--cutmix", type=_non_negative_float, default=1.0,
                     help="cutmix alpha; 0 disables")
    aug.add_argument("--mixup-prob", type=_probability, default=1.0,
                     help="probability of applying mixup or cutmix to a batch")
    aug.add_argument("--mixup-switch-prob", type=_probability, default=0.5,
                     help="probability of cutmix instead of mixup when both are on")
    aug.add_argument("--mixup-mode", default="batch", choices=("batch", "pair", "elem"),
                     help="how mixup/cutmix parameters are drawn")
    aug.add_argument("--smoothing", type=_ratio, default=0.1, help="label smoothing")
    aug.add_argument("--aug-repeats", type=_non_negative_int, default=0,
                     help="repeated augmentation: copies of each image per epoch, spread over "
                          "processes (DeiT uses 3); 0 disables")


def add_model_args(parser: argparse.ArgumentParser, dense: bool = True) -> None:
    group = parser.add_argument_group("model")
    if dense:
        group.add_argument("--model", default=None,
                           help="timm model name (random weights unless --pretrained or "
                                "--checkpoint); default: the architecture a --checkpoint "
                                "directory names, else deit_base_patch16_224")
        group.add_argument(
            "--checkpoint", metavar="PATH", default=None,
            help="weights to start from: a local timm .pth/.pt/.safetensors file or a "
                 "directory written by vtp.save (e.g. `vtp train`'s model/), which also gives "
                 "the architecture: model flags given with it must agree with it; nothing is "
                 "downloaded")
        group.add_argument("--reset-head", action="store_true",
                           help="drop the checkpoint's classifier when its class count differs")
        group.add_argument(
            "--pretrained", action="store_true",
            help="start from timm's pretrained weights for --model, as timm's train.py does: "
                 "from the Hugging Face hub or its local cache (network needed once); the "
                 "classifier is started afresh when the class count differs, the position "
                 "embedding resized to --img-size")
        group.add_argument(
            "--pretrained-path", metavar="FILE", default=None,
            help="load this local file as timm's pretrained weights instead of the hub "
                 "(timm's pretrained_cfg_overlay file=...; same adaptation); implies "
                 "--pretrained")
        group.add_argument("--model-kwargs", type=_json_dict, default=None, metavar="JSON",
                           help="extra timm.create_model keyword arguments, as a JSON object")
        group.add_argument("--patch-size", type=positive_int, default=None,
                           help="override the model's patch size")
        group.add_argument("--embed-dim", type=positive_int, default=None,
                           help="override the model's width")
        group.add_argument("--depth", type=positive_int, default=None,
                           help="override the model's number of blocks")
        group.add_argument("--num-heads", type=positive_int, default=None,
                           help="override the model's number of attention heads")
        group.add_argument("--mlp-ratio", type=_positive_float, default=None,
                           help="override the model's MLP hidden/width ratio")
    group.add_argument("--drop-path", type=_ratio, default=0.1,
                       help="stochastic depth rate while training (DeiT-B: 0.1)")


def add_train_args(parser: argparse.ArgumentParser, defaults: Dict[str, Any], prefix: str = "",
                   shared: bool = True, optional_stage: bool = False) -> None:
    """Optimisation flags. `prefix` ("train-", "sparse-", "finetune-") names the per-stage
    flags of `vtp run`; `shared=False` leaves out the flags the stages share;
    `optional_stage` lets --<prefix>epochs be 0 (the stage is skipped)."""
    titles = {"train-": "dense training (the run's first stage, when --train-epochs > 0)",
              "sparse-": "sparse training", "finetune-": "fine-tuning"}
    title = titles[prefix] if prefix else "training (DeiT recipe)"
    group = parser.add_argument_group(title)
    if optional_stage:
        group.add_argument(f"--{prefix}epochs", type=_non_negative_int, default=defaults["epochs"],
                           help="epochs of this stage; 0 skips it")
    else:
        group.add_argument(f"--{prefix}epochs", type=positive_int, default=defaults["epochs"],
                           help="training epochs")
    group.add_argument(f"--{prefix}lr", type=_non_negative_float, default=defaults["lr"],
                       help="base learning rate for a global batch of --lr-base-batch images; "
                            "the lr used is lr * global_batch / lr_base_batch")
    group.add_argument(f"--{prefix}warmup-epochs", type=_non_negative_float,
                       default=defaults["warmup_epochs"], help="linear warm-up epochs")
    group.add_argument(f"--{prefix}min-lr", type=_non_negative_float, default=defaults["min_lr"],
                       help="final lr of the cosine schedule (not scaled)")
    if "lam" in defaults and defaults["lam"] > 0:
        group.add_argument("--lam", type=_non_negative_float, default=defaults["lam"],
                           help="weight of the L1 penalty on the gates (paper: 1e-4)")
    if not shared:
        return
    group = parser.add_argument_group("training (both stages)" if prefix else "optimizer")
    group.add_argument("--batch-size", "-b", type=positive_int, default=64,
                       help="images per process and step (global batch = this x processes x "
                            "--accum-steps)")
    group.add_argument("--accum-steps", type=positive_int, default=1,
                       help="micro-batches accumulated per optimizer step")
    group.add_argument("--lr-base-batch", type=positive_int, default=512,
                       help="global batch size the base --lr refers to")
    group.add_argument("--warmup-lr", type=_non_negative_float, default=1e-6,
                       help="lr at the start of warm-up (not scaled)")
    group.add_argument("--weight-decay", type=_non_negative_float, default=0.05,
                       help="AdamW weight decay; gates, biases, norms, tokens and position "
                            "embeddings get none")
    group.add_argument("--gate-lr-scale", type=_non_negative_float, default=1.0,
                       help="multiplier of the lr of the gates (sparse training)")
    group.add_argument("--opt-eps", type=_positive_float, default=1e-8, help="AdamW epsilon")
    group.add_argument("--opt-betas", type=_ratio, nargs=2, default=[0.9, 0.999],
                       metavar=("B1", "B2"), help="AdamW betas")
    group.add_argument("--clip-grad", type=_non_negative_float, default=None,
                       help="clip the global gradient norm to this value; off by default")
    group.add_argument("--seed", type=_non_negative_int, default=0, help="random seed")
    ck = parser.add_argument_group("checkpoints and logging")
    ck.add_argument("--save-every", type=_non_negative_int, default=1000,
                    help="also checkpoint every N optimizer steps (0: only at epoch ends)")
    ck.add_argument("--resume", action="store_true",
                    help="continue from the checkpoint in --output (same model, optimizer, "
                         "schedule, data position and random state); an --output with no "
                         "checkpoint yet starts from the beginning, so a killed job can always "
                         "be re-run with the same command")
    ck.add_argument("--stop-after-steps", type=positive_int, default=None,
                    help="checkpoint and stop once the training stage reaches this optimizer "
                         "step (for time-limited jobs; continue with --resume)")
    ck.add_argument("--log-every", type=positive_int, default=50,
                    help="write a metrics line every N optimizer steps")


def add_prune_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("pruning")
    group.add_argument("--ratio", type=_ratio, default=None,
                       help="share of all gated dimensions to remove (paper: 0.2 and 0.4; "
                            "default 0.4 when neither target is given); ignored with --flops-target, "
                            "an error with --latency-target")
    group.add_argument("--scope", default="global", choices=("global", "layer"),
                       help="one threshold over all gates (paper) or the ratio in every gate")
    group.add_argument("--flops-target", type=_share, default=None,
                       help="prune until the model's MACs are this fraction of the dense "
                            "model's (e.g. 0.6) instead of using --ratio (global scope only)")
    group.add_argument("--latency-target", type=_share, default=None,
                       help="prune until the model's latency, predicted from a latency table measured "
                            "on this command's device (--device; in the --amp dtype; at the current "
                            "thread count; cached under $VTP_CACHE), is this fraction of the dense "
                            "model's (e.g. 0.5: twice as fast); dims go by gate score per ms saved and "
                            "widths land where the table says time drops (--round-to is not used); "
                            "not with --ratio or --flops-target")
    group.add_argument("--latency-batch-size", type=positive_int, default=8,
                       help="the batch size the latency table is measured and the plan predicted at "
                            "(with --latency-target); vtp eval times the pruned model at it")
    group.add_argument("--latency-refine", type=_non_negative_int, default=None,
                       help="rounds of measure-and-replan (with --latency-target; default 1): the "
                            "table's plan is timed whole against the dense model where the table was "
                            "measured (paired interleaved rounds) and, if its measured share misses the "
                            "target by more than 2 %%, planned again for the budget scaled by target / "
                            "measured; the table's sum of parts misses uneven plans by a few %%. 0: the "
                            "table's prediction alone")
    group.add_argument("--round-to", type=positive_int, default=DEFAULT_ROUND_TO,
                       help="round kept counts up to a multiple of this: widths the GEMMs run "
                            "fast with (see the README's CPU figures); 1 keeps the paper's exact counts")
    group.add_argument("--min-keep", type=_non_negative_int, default=0,
                       help="keep at least this many dimensions per gate (0 lets heads, "
                            "branches and blocks go)")
    group.add_argument("--no-fold", action="store_true",
                       help="reset kept gates to 1 as in the paper instead of folding their "
                            "values into the weights")
    group.add_argument("--plan", metavar="JSON", default=None,
                       help="apply this plan.json instead of computing one")
    group.add_argument("--layout", default=DEFAULT_V_LAYOUT, choices=V_LAYOUTS,
                       help="how pruned attention holds its values: padded (zero rows up to the "
                            "head width, so attention's fused kernels take them as they are) or "
                            "packed (kept values only)")


def add_distill_args(parser: argparse.ArgumentParser, run: bool = False) -> None:
    """Knowledge distillation while fine-tuning the pruned model (DeiT's scheme)."""
    group = parser.add_argument_group("distillation (fine-tuning)")
    group.add_argument(
        "--distill", action="store_true",
        help="fine-tune with a teacher: loss = (1 - alpha) * task + alpha * distillation term")
    group.add_argument(
        "--teacher", metavar="WHICH", default=None,
        help="the teacher of --distill: 'dense' (default: the model sparse training started "
             "from, as the pruned model records it), 'gated' (the sparse-trained model it was "
             "pruned from) or a directory written by vtp.save (or a stage directory holding "
             "model/)" + ("; in `vtp run` 'dense' is the model eval-dense measured" if run else ""))
    group.add_argument(
        "--distill-type", default="soft", choices=DISTILL_KINDS,
        help="soft: KL divergence to the teacher's softened probabilities, times tau^2; "
             "hard: cross-entropy against the teacher's top class (DeiT). A two-token "
             "(distilled) student takes it on its distillation token, the task loss on its "
             "class token")
    group.add_argument("--distill-alpha", type=_probability, default=0.5,
                       help="weight of the distillation term, in [0, 1] (DeiT: 0.5)")
    group.add_argument("--distill-tau", type=_positive_float, default=1.0,
                       help="temperature of soft distillation, > 0 (DeiT: 1.0)")


def add_eval_args(parser: argparse.ArgumentParser, bench: bool = True) -> None:
    group = parser.add_argument_group("evaluation")
    group.add_argument("--eval-batch-size", type=positive_int, default=128,
                       help="images per process and step when evaluating")
    if not bench:
        return
    group.add_argument("--bench-batch-size", type=positive_int, default=64,
                       help="batch size of the images/s measurement")
    group.add_argument("--bench-steps", type=_non_negative_int, default=20,
                       help="timed forward passes of the images/s measurement (0: skip)")


def add_system_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("system")
    group.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                       help="auto: CUDA when available (one GPU per process: LOCAL_RANK)")
    group.add_argument("--amp", action="store_true",
                       help="mixed precision: autocast to --amp-dtype (made for CUDA; allowed "
                            "on CPU)")
    group.add_argument("--amp-dtype", default="bfloat16", choices=("bfloat16", "float16"),
                       help="autocast dtype; float16 adds a gradient scaler")
    group.add_argument("--compile", action="store_true", help="torch.compile the model")
    group.add_argument("--deterministic", action="store_true",
                       help="torch.use_deterministic_algorithms (slower; for exact reruns)")
    group.add_argument("--kernels", default="auto", choices=("auto", "triton", "torch"),
                       help="vtp_kernels backend: Triton kernels or their PyTorch twins")
    group.add_argument("--dist-backend", default="auto", choices=("auto", "nccl", "gloo"),
                       help="torch.distributed backend under torchrun (auto: nccl on CUDA, "
                            "gloo on CPU)")
    group.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                       help="show a progress bar (rank 0)")


# ---------------------------------------------------------------------------------------------
# YAML


def load_yaml_config(path: str) -> Dict[str, Any]:
    if not os.path.isfile(path):
        raise VTPError(f"config file not found: {path}")
    with open(path, encoding="utf-8") as f:
        try:
            data = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise VTPError(f"config file {path} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise VTPError(f"config file {path} must hold a mapping of flag names to values")
    return data


def _actions_by_dest(parser: argparse.ArgumentParser) -> Dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions if a.dest not in ("help", "config", argparse.SUPPRESS)}


def _coerce(action: argparse.Action, key: str, value: Any) -> Any:
    """Checks a YAML value the way argparse would check the flag's text."""
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction,
                           argparse.BooleanOptionalAction)):
        if not isinstance(value, bool):
            raise ValueError(f"expects true or false, got {value!r}")
        return value
    if value is None:
        return None
    convert = action.type

    def one(v: Any) -> Any:
        if convert is None:
            return v if isinstance(v, (dict, list)) else str(v)
        if convert is float and isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
        if convert is int and isinstance(v, int) and not isinstance(v, bool):
            return v
        if convert is _json_dict and isinstance(v, dict):
            return v
        try:
            return convert(v if isinstance(v, str) else str(v))
        except (argparse.ArgumentTypeError, ValueError, TypeError) as e:
            raise ValueError(f"invalid value {v!r}: {e}") from None

    if action.nargs not in (None, "?"):
        if not isinstance(value, list):
            raise ValueError(f"expects a list, got {value!r}")
        if isinstance(action.nargs, int) and len(value) != action.nargs:
            raise ValueError(f"expects {action.nargs} values, got {len(value)}")
        value = [one(v) for v in value]
        bad = [v for v in value if action.choices is not None and v not in action.choices]
    else:
        value = one(value)
        bad = [value] if action.choices is not None and value not in action.choices else []
    if bad:
        raise ValueError(f"invalid choice {bad[0]!r} (choose from {', '.join(map(str, action.choices))})")
    return value


def apply_yaml_config(parser: argparse.ArgumentParser, path: str) -> None:
    """Makes the YAML file's values the parser's defaults, so command-line flags still win.
    Unknown keys and ill-typed values stop with a parser error naming the key."""
    try:
        data = load_yaml_config(path)
    except VTPError as e:
        parser.error(str(e))
    actions = _actions_by_dest(parser)
    values = {}
    for raw_key, value in data.items():
        key = str(raw_key).replace("-", "_")
        if key in ("command",):
            continue
        if key not in actions:
            close = difflib.get_close_matches(key, list(actions), n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            parser.error(f"config {path}: unknown key '{raw_key}' (not a flag of this command{hint})")
        try:
            values[key] = _coerce(actions[key], raw_key, value)
        except ValueError as e:
            parser.error(f"config {path}: key '{raw_key}': {e}")
    parser.set_defaults(**values)


def resolved_config(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Dict[str, Any]:
    """The stage's settings after YAML and flags, as plain YAML-able values."""
    out = {}
    for dest in _actions_by_dest(parser):
        if hasattr(args, dest):
            value = getattr(args, dest)
            out[dest] = list(value) if isinstance(value, tuple) else value
    return out


def write_config(path: str, config: Dict[str, Any]) -> None:
    """The resolved settings as YAML, atomically; ``--config`` reads the file back."""
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            yaml.safe_dump(config, f, sort_keys=False)
    atomic_write(path, write)


def first_positional(argv: Sequence[str]) -> Optional[str]:
    for token in argv:
        if not token.startswith("-"):
            return token
    return None


def find_config_path(argv: Sequence[str]) -> Optional[str]:
    """Value of --config in argv, without parsing anything else."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(list(argv))
    return known.config
