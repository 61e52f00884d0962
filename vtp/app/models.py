"""timm models and the files their weights come from: built by name, with timm's pretrained
weights when asked (hub, cache or a local file), loaded from a timm checkpoint or a
``vtp.save`` directory, with clear errors when they do not fit."""
from __future__ import annotations

import functools
import os
from typing import Any, Dict, List, Optional, Tuple

import timm
import torch
import torch.nn as nn
from timm.layers import DropPath
from timm.models import load_state_dict as timm_load_state_dict

import vtp
from vtp.architectures import drop_path_slots
from vtp.io import read_config
from vtp.rebuild import read_drop_path_rate

from .errors import VTPError

__all__ = ["create_dense_model", "pretrained_classes", "read_state_dict", "load_weights",
           "load_state", "load_vtp_model", "set_drop_path"]


def create_dense_model(name: str, num_classes: int, model_kwargs: Dict[str, Any],
                       drop_path: float = 0.0, pretrained: bool = False,
                       pretrained_path: Optional[str] = None) -> nn.Module:
    """A timm model: random weights, or timm's pretrained ones adapted by timm (classifier
    dropped when the class count differs, position embedding resized). Pretrained weights
    come from `pretrained_path` when given (never the network), else from timm's hub or
    its cache."""
    if not timm.is_model(name):
        raise VTPError(f"unknown timm model '{name}' (see timm.list_models())")
    kwargs = dict(model_kwargs)
    if pretrained_path:
        if not os.path.isfile(pretrained_path):
            raise VTPError(f"--pretrained-path not found: {pretrained_path}")
        kwargs["pretrained_cfg_overlay"] = dict(
            file=os.path.abspath(pretrained_path),
            num_classes=pretrained_classes(name, pretrained_path))
    try:
        return timm.create_model(name, pretrained=pretrained or bool(pretrained_path),
                                 num_classes=num_classes, drop_path_rate=drop_path, **kwargs)
    except (TypeError, ValueError, AssertionError, KeyError) as e:
        raise VTPError(f"cannot build {name} with {model_kwargs}: {e}") from None
    except Exception as e:  # network, cache or file errors of the pretrained weights
        if not (pretrained or pretrained_path):
            raise VTPError(f"cannot build {name} with {model_kwargs}: {e}") from None
        where = pretrained_path or "timm's hub (or its local cache)"
        raise VTPError(f"--pretrained: cannot load {name}'s weights from {where}: "
                       f"{type(e).__name__}: {e}. Without network, fetch them once elsewhere "
                       "into the Hugging Face cache or pass --pretrained-path FILE") from None


def pretrained_classes(name: str, pretrained_path: Optional[str] = None) -> int:
    """How many classes the pretrained weights predict: the local file's classifier rows,
    else what timm's pretrained config of `name` says (1000 for ImageNet weights); 0 when
    there is no classifier to keep."""
    if not pretrained_path:
        cfg = timm.models.get_pretrained_cfg(name)
        return int(getattr(cfg, "num_classes", 0) or 0) if cfg is not None else 0
    if not os.path.isfile(pretrained_path):
        raise VTPError(f"checkpoint not found: {pretrained_path}")
    # Asked by the run's early check and by every stage that builds the dense model: the
    # file (hundreds of MB for a ViT-B) is read once for as long as it stays the same.
    stat = os.stat(pretrained_path)
    return _classifier_rows(name, os.path.abspath(pretrained_path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=8)
def _classifier_rows(name: str, path: str, mtime_ns: int, size: int) -> int:
    cfg = timm.models.get_pretrained_cfg(name)
    state = read_state_dict(path)
    heads = getattr(cfg, "classifier", None) or "head"
    for head in (heads,) if isinstance(heads, str) else tuple(heads):
        if f"{head}.weight" in state:
            return int(state[f"{head}.weight"].shape[0])
    return 0


def read_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """A state dict from a timm/DeiT .pth/.pt or a .safetensors file, through timm's reader
    (which unwraps 'state_dict' / 'model' entries and DDP or torch.compile prefixes); the
    weights themselves, not an EMA copy stored beside them."""
    if not os.path.isfile(path):
        raise VTPError(f"checkpoint not found: {path}")
    try:
        state = timm_load_state_dict(path, use_ema=False, device="cpu", weights_only=True)
    except Exception as e:  # pickle errors, truncated files, foreign formats
        raise VTPError(f"cannot read checkpoint {path}: {e}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise VTPError(f"checkpoint {path} holds no state dict of tensors")
    return state


def _classifier_keys(model: nn.Module) -> List[str]:
    names = []
    head = getattr(model, "default_cfg", {}).get("classifier", "head")
    for h in (head,) if isinstance(head, str) else tuple(head):
        names += [f"{h}.weight", f"{h}.bias"]
    return names


def load_weights(model: nn.Module, path: str, reset_head: bool = False) -> bool:
    """Loads a timm checkpoint file into `model`; see load_state."""
    return load_state(model, read_state_dict(path), path, reset_head)


def _listing(title: str, items: List[str], sep: str = ", ", limit: int = 8) -> str:
    more = " ..." if len(items) > limit else ""
    return f"  {title} ({len(items)}): {sep.join(items[:limit])}{more}"


def load_state(model: nn.Module, state: Dict[str, torch.Tensor], source: str,
               reset_head: bool = False) -> bool:
    """Loads `state` into `model`, or stops with the missing, unexpected and mis-shaped keys
    when it does not fit, before any training starts. True when `reset_head` kept the
    model's fresh classifier instead of the checkpoint's."""
    state = dict(state)
    own = model.state_dict()
    head_reset = False
    if reset_head:
        for key in _classifier_keys(model):
            if key in state and key in own and state[key].shape != own[key].shape:
                state[key] = own[key]  # keep the freshly initialised classifier
                head_reset = True
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        lines = [f"checkpoint {source} does not fit the model:"]
        if missing:
            lines.append(_listing("missing keys", missing))
        if unexpected:
            lines.append(_listing("unexpected keys", unexpected))
        if shapes:
            lines.append(_listing("shape mismatches", shapes, sep="; ", limit=6))
        head = set(_classifier_keys(model))
        if shapes and not reset_head and all(s.split(":")[0] in head for s in shapes):
            lines.append("  (only the classifier differs: pass --reset-head to start it afresh)")
        raise VTPError("\n".join(lines))
    model.load_state_dict(state, strict=True)
    return head_reset


def load_vtp_model(path: str) -> Tuple[nn.Module, Dict[str, Any]]:
    """(model, metadata) from a vtp.save directory."""
    try:
        model = vtp.load(path)
        metadata = read_config(path).metadata
    except Exception as e:  # any failure to rebuild the model is a bad input here
        raise VTPError(f"cannot load a vtp model from {path}: {e}") from None
    return model, dict(metadata)


def set_drop_path(model: nn.Module, rate: float) -> float:
    """Stochastic depth rising linearly to `rate` over the blocks, as timm builds it;
    returns the rate the model had."""
    blocks = list(model.blocks)
    old = read_drop_path_rate(model)
    rates = torch.linspace(0, rate, len(blocks)).tolist() if blocks else []
    for block, r in zip(blocks, rates):
        for parent, name in drop_path_slots(block):
            setattr(parent, name, DropPath(r) if r > 0 else nn.Identity())
    return old
