"""Saving and loading VTP models: a JSON config plus safetensors weights, no pickle.

This module alone knows the file format. A model directory holds

* ``config.json``: the timm class and the arguments that rebuild the dense model,
  which sites are gated, the pruning plan (if pruned), the dtype, user metadata, and the
  weights file's size and SHA-256;
* ``model.safetensors``: the state_dict.

``load`` rebuilds the dense model, re-applies gates and the plan, checks the weights'
checksum and loads them strictly: a truncated or altered file is an error, never a
silently different model. ``save`` writes into a temporary directory and renames it
into place, so an interruption leaves either the old directory or the new one.
``read_config`` reads what a directory holds without building the model.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import safetensors
import safetensors.torch
import torch
import torch.nn as nn

from .atomic import recover_directory, replace_directory, write_json
from ._gates import ALL_SITES, add_gates, gates
from .pruning_plan import PruningPlan
from ._prune import HEAD_DIM_PADDED, LAYOUTS, prune
from .rebuild import build, describe, read_drop_path_rate

__all__ = ["save", "load", "read_config", "is_model_dir", "check_saveable", "SavedConfig", "build_model"]

MODEL_FORMAT = "vtp-model"
MODEL_VERSION = 3
# 1 named timm classes only; 2 also timm architecture names; 3 pads V to each block's
# attention width where 1 and 2 padded it to head_dim (read as layout "padded_head_dim")
READABLE_VERSIONS = (1, 2, 3)
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
DTYPES = ("float32", "float64", "float16", "bfloat16")


@dataclass(frozen=True)
class SavedConfig:
    """What a ``vtp.save`` directory's config.json says, read without building the model."""

    directory: Path
    architecture: str
    model_args: Dict[str, Any]
    gated_sites: Tuple[str, ...]
    plan: Optional[PruningPlan]
    fold: bool
    layout: str
    dtype: str
    metadata: Dict[str, Any] = field(default_factory=dict)
    raw: Dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def num_classes(self) -> int:
        return int(self.model_args.get("num_classes", 0))

    @property
    def img_size(self) -> Tuple[int, int]:
        size = self.model_args.get("img_size")
        return (int(size), int(size)) if isinstance(size, int) else tuple(int(s) for s in size)

    @property
    def is_pruned(self) -> bool:
        return self.plan is not None

    @property
    def is_gated(self) -> bool:
        """Gated and not pruned yet: what sparse training leaves."""
        return bool(self.gated_sites) and self.plan is None


def _field(config: dict, key: str, check, expected: str, default=None):
    value = config.get(key, default)
    if not check(value):
        raise ValueError(f"config: {key}: expected {expected}, got {value!r}")
    return value


def _fields(config: dict) -> Dict[str, Any]:
    """The fields of config.json besides the architecture, checked: a wrong type is a
    ``ValueError`` naming the field."""
    plan = config.get("plan")
    if plan is not None and not isinstance(plan, dict):
        raise ValueError(f"config: plan: expected an object or null, got {plan!r}")
    metadata = _field(config, "metadata", lambda v: isinstance(v, dict), "an object", {})
    return dict(
        dtype=_field(config, "dtype", lambda v: v in DTYPES, f"one of {', '.join(DTYPES)}", "float32"),
        gated_sites=tuple(_field(config, "gated_sites", lambda v: isinstance(v, list) and all(s in ALL_SITES for s in v),
                                 f"a list of sites among {', '.join(ALL_SITES)}", [])),
        fold=_field(config, "fold", lambda v: isinstance(v, bool), "true or false", True),
        layout=_layout(config),
        plan=PruningPlan.from_dict(plan) if plan is not None else None, metadata=dict(metadata))


def _layout(config: dict) -> str:
    """The ``vtp.prune`` layout a file's weights are in. Version 1 and early version 2 files
    hold packed values and say nothing; versions before 3 padded V to head_dim."""
    layout = _field(config, "layout", lambda v: v in LAYOUTS, f"one of {', '.join(LAYOUTS)}", "packed")
    version = config.get("version", MODEL_VERSION)
    if layout == "padded" and isinstance(version, int) and version < 3:
        return HEAD_DIM_PADDED
    return layout


def build_model(config: dict) -> nn.Module:
    """Rebuild a model (dense, gated or pruned) from a ``config.json`` dict, without weights.
    A field of the wrong type is a ``ValueError`` naming it."""
    fields = _fields(config)
    model = build({"architecture": config.get("architecture"), "model_args": config.get("model_args")})
    if fields["gated_sites"]:
        add_gates(model, fields["gated_sites"])
    if fields["plan"] is not None:
        model = prune(model, fields["plan"], fold=fields["fold"], layout=fields["layout"])
    return model.to(getattr(torch, fields["dtype"]))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _describe(model: nn.Module) -> dict:
    plan = getattr(model, "vtp_plan", None)
    if plan is not None:
        # The pruned model's own modules no longer say what the dense one was: describe the
        # structure vtp.prune recorded, with the drop-path rate fine-tuning may have set.
        try:
            base = describe(model.vtp_pruned_from.dense)
        except TypeError as e:
            raise TypeError(f"model: pruned from a model whose architecture cannot be described for "
                            f"vtp.load ({e})") from None
        base["model_args"]["drop_path_rate"] = read_drop_path_rate(model)
        sites = sorted({n.split(".")[-1] for n in plan.kept}, key=ALL_SITES.index)
        base.update(gated_sites=sites, plan=plan.to_dict(), fold=model.vtp_pruned_from.fold,
                    layout=model.vtp_pruned_from.layout)
    else:
        base = describe(model)
        sites = sorted({n.split(".")[-1] for n in gates(model)}, key=ALL_SITES.index)
        base.update(gated_sites=sites, plan=None)
    return base


def is_model_dir(path: Union[str, os.PathLike]) -> bool:
    """Whether ``path`` is a directory written by ``vtp.save`` (its config.json says so)."""
    try:
        read_config(path)
    except (OSError, ValueError):
        return False
    return True


def save(model: nn.Module, directory: Union[str, os.PathLike], metadata: Optional[dict] = None) -> Path:
    """Save ``model`` (dense, gated or pruned timm ViT) to ``directory``, atomically.

    ``metadata`` is any JSON-serialisable dict stored alongside (e.g. accuracy, the command).
    An existing directory is replaced only if it is empty or holds a previous save.
    """
    target = Path(directory)
    if target.exists() and not (target.is_dir() and (not any(target.iterdir()) or is_model_dir(target))):
        raise FileExistsError(f"directory: {target} exists and is not a vtp model directory; refusing to overwrite")
    if metadata is not None:
        if not isinstance(metadata, dict):
            raise TypeError(f"metadata: expected a dict, got {type(metadata).__name__}")
        try:
            json.dumps(metadata)
        except TypeError as e:
            raise TypeError(f"metadata: must be JSON-serialisable ({e})") from None
    config = _saveable_config(model)
    state, storages = {}, set()
    for k, v in model.state_dict().items():
        t = v.detach().contiguous().cpu()
        # safetensors refuses tensors that share memory: a gate shared by q, k and v
        # projections is written under each of their names, as three copies.
        if t.untyped_storage().data_ptr() in storages:
            t = t.clone()
        storages.add(t.untyped_storage().data_ptr())
        state[k] = t
    config["metadata"] = metadata or {}

    def fill(tmp: Path) -> None:
        weights = tmp / WEIGHTS_FILE
        safetensors.torch.save_file(state, str(weights), metadata={"format": "pt"})
        config["weights"] = {"file": WEIGHTS_FILE, "bytes": weights.stat().st_size, "sha256": _sha256(weights)}
        write_json(tmp / CONFIG_FILE, config)

    return replace_directory(target, fill)


def _saveable_config(model: nn.Module) -> dict:
    """config.json's description of ``model``, once a model built from it has been found
    identical in structure; a ``TypeError`` otherwise."""
    config = {"format": MODEL_FORMAT, "version": MODEL_VERSION, **_describe(model),
              "dtype": str(next(model.parameters()).dtype).replace("torch.", "")}
    _check_rebuild(model, config, model.state_dict())
    return config


def check_saveable(model: nn.Module) -> None:
    """Raise the ``TypeError`` that ``save`` would raise for ``model``, without writing
    anything: worth calling before a long job whose result is saved."""
    _saveable_config(model)


def _check_rebuild(model: nn.Module, config: dict, state: dict) -> None:
    """Refuse to save what ``load`` would not rebuild identically."""
    try:
        rebuilt = build_model(config)
    except (TypeError, ValueError) as e:
        raise TypeError(f"model: its architecture cannot be described for vtp.load ({e}); "
                        "only timm ViTs built from standard options are supported") from None
    expected = {k: (tuple(v.shape), v.dtype) for k, v in state.items()}
    got = {k: (tuple(v.shape), v.dtype) for k, v in rebuilt.state_dict().items()}
    # Options a module keeps as plain attributes (pooling, padding, ...) show in neither.
    attrs, rebuilt_attrs = _plain_attributes(model), _plain_attributes(rebuilt)
    if expected != got or repr(rebuilt) != repr(model) or attrs != rebuilt_attrs:
        diff = sorted(set(expected.items()) ^ set(got.items()))[:3]
        diff += sorted(k for k in set(attrs) | set(rebuilt_attrs) if attrs.get(k) != rebuilt_attrs.get(k))[:3]
        raise TypeError(f"model: its architecture cannot be described for vtp.load (first differences: {diff}); "
                        "only timm ViTs built from standard options are supported")


_RUNTIME_ATTRIBUTES = ("training", "grad_checkpointing", "distilled_training", "fused_attn",
                       "weight_init_mode", "init_values", "fix_init")


def _plain_attributes(model: nn.Module) -> dict:
    """Every module's scalar, string and tuple attributes, but those that only say how the
    module was initialised or how it runs (checkpointing, attention implementation)."""
    out = {}
    for name, module in model.named_modules():
        for key, value in vars(module).items():
            if key.startswith("_") or key in _RUNTIME_ATTRIBUTES:
                continue
            if isinstance(value, (bool, int, float, str, tuple, type(None))):
                out[f"{name}.{key}"] = value
    return out


def _read_config_file(path: Path) -> dict:
    config_path = path / CONFIG_FILE
    recover_directory(path)  # a save killed between its two renames
    if not config_path.is_file():
        raise FileNotFoundError(f"directory: {path} has no {CONFIG_FILE}; not a directory written by vtp.save")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{config_path}: not valid JSON ({e}); the file is truncated or altered") from None
    if not isinstance(config, dict) or config.get("format") != MODEL_FORMAT:
        raise ValueError(f"{config_path}: not a vtp model config (format != {MODEL_FORMAT!r})")
    if config.get("version") not in READABLE_VERSIONS:
        raise ValueError(f"{config_path}: unsupported version {config.get('version')!r} "
                         f"(this vtp reads {', '.join(map(str, READABLE_VERSIONS))})")
    return config


def read_config(directory: Union[str, os.PathLike]) -> SavedConfig:
    """What the ``vtp.save`` directory holds (architecture, gates, plan, metadata), without
    building the model or reading the weights. ``FileNotFoundError`` when there is no
    config.json, ``ValueError`` when it is not one of vtp's or is malformed."""
    path = Path(directory)
    config = _read_config_file(path)
    config_path = path / CONFIG_FILE
    try:
        model_args = config["model_args"]
        if not isinstance(model_args, dict):
            raise TypeError("config: model_args: expected an object")
        return SavedConfig(directory=path, architecture=str(config.get("architecture")),
                           model_args=dict(model_args), raw=config, **_fields(config))
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{config_path}: malformed ({e})") from None


def load(directory: Union[str, os.PathLike], map_location: Union[str, torch.device] = "cpu") -> nn.Module:
    """Load a model saved by ``vtp.save``; returned in eval mode on ``map_location``."""
    path = Path(directory)
    config = _read_config_file(path)
    config_path = path / CONFIG_FILE
    try:
        info = config["weights"]
        weights = path / info["file"]
        expected_bytes, expected_sha = int(info["bytes"]), str(info["sha256"])
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"{config_path}: missing or malformed 'weights' entry") from None
    if info["file"] != WEIGHTS_FILE:
        # never a path of the config's choosing: it could point out of the directory
        raise ValueError(f"{config_path}: weights.file: expected {WEIGHTS_FILE!r}, got {info['file']!r}")
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: weights file missing")
    if weights.stat().st_size != expected_bytes:
        raise ValueError(f"{weights}: {weights.stat().st_size} bytes, expected {expected_bytes}; "
                         "the file is truncated or altered")
    if _sha256(weights) != expected_sha:
        raise ValueError(f"{weights}: SHA-256 does not match config.json; the file is altered or corrupt")
    try:
        model = build_model(config)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{config_path}: cannot rebuild the model ({e})") from None
    try:
        state = safetensors.torch.load_file(str(weights), device=str(map_location))
    except safetensors.SafetensorError as e:
        raise ValueError(f"{weights}: not a valid safetensors file ({e})") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{weights}: does not fit the model described by config.json ({e})") from None
    return model.to(map_location).eval()
