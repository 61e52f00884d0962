"""Describing a timm ViT so that it can be built again, without its weights.

A model made by ``timm.create_model`` carries its architecture name
(``model.pretrained_cfg["architecture"]``). Building that name again brings back everything
the name fixes (norm eps, activations, hybrid CNN stems, pooling heads, RoPE, position
biases); the constructor arguments a user changes (depth, width, heads, image size,
classes, dropout rates, ...) are read off the model and kept where they differ from what
the name builds. A model built from a class directly (``VisionTransformer(**kwargs)``) is
described by its class and the arguments read off it.

``describe`` gives ``{"architecture": ..., "model_args": {...}}``; ``build`` makes the model
from that, refusing names that are not timm architectures and argument values of the wrong
type (a ``ValueError`` naming the field). Whether the description is complete is checked by
whoever relies on it (``vtp.save`` rebuilds and compares before it writes).
"""
from __future__ import annotations

import importlib
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import timm
import torch.nn as nn
from timm.layers import DropPath, LayerScale, PatchDropout
from timm.models.beit import Beit
from timm.models.eva import Eva
from timm.models.naflexvit import NaFlexVit
from timm.models.vision_transformer import VisionTransformer
from timm.models.vision_transformer_relpos import VisionTransformerRelPos
from timm.models.vision_transformer_sam import VisionTransformerSAM

from .architectures import branches, drop_path_slots
from ._profile import default_img_size, input_channels

__all__ = ["describe", "build", "read_model_args", "read_drop_path_rate", "CLASSES"]

# Classes a description may name instead of a timm architecture: never arbitrary code.
CLASSES = {
    "timm.models.vision_transformer.VisionTransformer": ("timm.models.vision_transformer", "VisionTransformer"),
    "timm.models.deit.VisionTransformerDistilled": ("timm.models.deit", "VisionTransformerDistilled"),
}

POOLS = ("", "token", "avg", "avgmax", "max", "map")


@dataclass(frozen=True)
class Arg:
    """A constructor argument, how to read it off a model (None: this model cannot say) and
    the JSON type it takes."""
    name: str
    read: Callable[[nn.Module], Any]
    kind: str                      # "int", "float", "bool", "str", "size", "optional_float"
    choices: Tuple[Any, ...] = ()


def _first(model: nn.Module, kind: str):
    return next((b for b in branches(model) if b.kind in kind), None)


def _num_heads(model):
    branch = _first(model, ("attn", "parallel"))
    return branch.module().num_heads if branch is not None else None


def _mlp_hidden(model) -> Optional[int]:
    branch = _first(model, ("mlp",))
    if branch is None:
        parallel = _first(model, ("parallel",))
        return parallel.module().in_split[0] if parallel is not None else None
    mlp = branch.module()
    return mlp.fc2.in_features


def _mlp_ratio(model) -> Optional[float]:
    hidden, dim = _mlp_hidden(model), getattr(model, "embed_dim", None)
    if hidden is None or not dim:
        return None
    ratio = hidden / dim
    # the constructors take int(dim * mlp_ratio): make sure that floors to `hidden`
    return ratio if int(dim * ratio) == hidden else (hidden + 0.5) / dim


def _qkv_bias(model) -> Optional[bool]:
    branch = _first(model, ("attn", "parallel"))
    if branch is None:
        return None
    m = branch.module()
    if branch.kind == "parallel":
        return m.in_proj.bias is not None
    if getattr(m, "q_bias", None) is not None:
        return True
    linear = getattr(m, "qkv", None) or getattr(m, "q_proj", None)
    return linear.bias is not None


def read_drop_path_rate(model) -> float:
    """The stochastic-depth rate of the last block (timm's rates rise to it over the blocks)."""
    slots = drop_path_slots(list(model.blocks)[-1])
    m = getattr(*slots[0]) if slots else None
    return float(m.drop_prob) if isinstance(m, DropPath) else 0.0


def _size(value) -> Any:
    h, w = (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))
    return h if h == w else [h, w]


def _attr(name: str, convert=lambda v: v):
    def read(model):
        return convert(getattr(model, name)) if hasattr(model, name) else None
    return read


def _patch_size(model):
    embed = getattr(model, "patch_embed", None) or getattr(model, "embeds", None)
    return _size(embed.patch_size) if getattr(embed, "patch_size", None) is not None else None


COMMON = (
    Arg("img_size", lambda m: _size(default_img_size(m)), "size"),
    Arg("patch_size", _patch_size, "size"),
    Arg("in_chans", input_channels, "int"),
    Arg("num_classes", _attr("num_classes", int), "int"),
    Arg("global_pool", _attr("global_pool", str), "str", POOLS),
    Arg("embed_dim", _attr("embed_dim", int), "int"),
    Arg("depth", lambda m: len(m.blocks), "int"),
    Arg("num_heads", _num_heads, "int"),
    Arg("mlp_ratio", _mlp_ratio, "float"),
    Arg("qkv_bias", _qkv_bias, "bool"),
    Arg("drop_rate", lambda m: float(m.head_drop.p) if hasattr(m, "head_drop") else None, "float"),
    Arg("drop_path_rate", read_drop_path_rate, "float"),
)


def _layer_scale(model) -> Optional[float]:
    """1.0 where the blocks scale their branches (the value is a weight, loaded later)."""
    block = model.blocks[0]
    scale = getattr(block, "ls1", None)
    present = isinstance(scale, LayerScale) or getattr(block, "gamma_1", None) is not None
    return 1.0 if present else None


VIT = COMMON + (
    Arg("pool_include_prefix", _attr("pool_include_prefix", bool), "bool"),
    Arg("qk_norm", lambda m: not isinstance(getattr(m.blocks[0].attn, "q_norm", nn.Identity()), nn.Identity)
        if hasattr(m.blocks[0], "attn") else None, "bool"),
    Arg("proj_bias", lambda m: m.blocks[0].attn.proj.bias is not None if hasattr(m.blocks[0], "attn") else None,
        "bool"),
    Arg("init_values", _layer_scale, "optional_float"),
    Arg("class_token", lambda m: m.cls_token is not None, "bool"),
    Arg("reg_tokens", _attr("num_reg_tokens", int), "int"),
    Arg("no_embed_class", _attr("no_embed_class", bool), "bool"),
    Arg("pos_embed", lambda m: "learn" if m.pos_embed is not None else "none", "str", ("", "none", "learn")),
    Arg("pre_norm", lambda m: not isinstance(m.norm_pre, nn.Identity), "bool"),
    Arg("final_norm", lambda m: not (isinstance(m.norm, nn.Identity) and isinstance(m.fc_norm, nn.Identity)),
        "bool"),
    Arg("fc_norm", lambda m: not isinstance(m.fc_norm, nn.Identity), "bool"),
    Arg("dynamic_img_size", _attr("dynamic_img_size", bool), "bool"),
    Arg("dynamic_img_pad", lambda m: bool(m.patch_embed.dynamic_img_pad), "bool"),
    Arg("proj_drop_rate", lambda m: float(m.blocks[0].attn.proj_drop.p) if hasattr(m.blocks[0], "attn") else None,
        "float"),
    Arg("attn_drop_rate", lambda m: float(m.blocks[0].attn.attn_drop.p) if hasattr(m.blocks[0], "attn") else None,
        "float"),
    Arg("pos_drop_rate", lambda m: float(m.pos_drop.p), "float"),
    Arg("patch_drop_rate", lambda m: float(m.patch_drop.prob) if isinstance(m.patch_drop, PatchDropout) else 0.0,
        "float"),
)

def _attention(model):
    branch = _first(model, ("attn",))
    return branch.module() if branch is not None else None


EVA = COMMON + (
    Arg("qkv_fused", lambda m: getattr(_attention(m), "qkv", None) is not None, "bool"),
    Arg("init_values", _layer_scale, "optional_float"),
    Arg("class_token", lambda m: m.cls_token is not None, "bool"),
    Arg("num_reg_tokens", lambda m: m.reg_token.shape[1] if m.reg_token is not None else 0, "int"),
    Arg("dynamic_img_size", _attr("dynamic_img_size", bool), "bool"),
)

# What each model family's constructor takes, and so what a description may hold for it.
FAMILIES: Dict[type, Tuple[Arg, ...]] = {
    VisionTransformer: VIT,
    Eva: EVA,
    VisionTransformerRelPos: COMMON,
    Beit: COMMON,
    VisionTransformerSAM: tuple(a for a in COMMON if a.name != "global_pool") + (
        # blocks of global attention have none: the model's window is the largest
        Arg("window_size", lambda m: max(int(b.window_size) for b in m.blocks), "int"),),
    NaFlexVit: tuple(a for a in COMMON if a.name not in ("patch_size",)) + (
        Arg("attn_gated", lambda m: isinstance(getattr(_attention(m), "gate", None), nn.Linear), "bool"),
        Arg("init_values", _layer_scale, "optional_float"),),
}


def _family(model: nn.Module) -> Tuple[Arg, ...]:
    for cls, args in FAMILIES.items():
        if isinstance(model, cls):
            return args
    raise TypeError(f"model: cannot describe a {type(model).__name__} for rebuilding; supported families: "
                    f"{', '.join(c.__name__ for c in FAMILIES)}")


def _read(args: Sequence[Arg], model: nn.Module) -> Dict[str, Any]:
    values = {}
    for arg in args:
        try:
            value = arg.read(model)
        except (AttributeError, TypeError, IndexError):
            value = None
        if value is not None or arg.kind == "optional_float":
            values[arg.name] = value
    return values


# Always recorded: cheap, and the reference architecture is built with another depth.
ALWAYS = ("depth", "num_classes", "img_size")


def architecture_name(model: nn.Module) -> Optional[str]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    name = cfg.get("architecture") if isinstance(cfg, dict) else None
    return name if isinstance(name, str) and timm.is_model(name) else None


def read_model_args(model: nn.Module) -> Dict[str, Any]:
    """Every constructor argument VTP reads off a model of a supported family, whether or
    not it differs from what the model's name builds (``describe`` keeps only those that
    do); ``TypeError`` for another family."""
    return _read(_family(model), model)


def describe(model: nn.Module) -> Dict[str, Any]:
    """``{"architecture": timm name or class path, "model_args": {...}}`` that rebuild the
    dense form of ``model`` (read off a dense or gated model). ``TypeError`` when the model's
    family is not one VTP can describe."""
    args = _family(model)
    values = _read(args, model)
    name = architecture_name(model)
    if name is None:
        path = f"{type(model).__module__}.{type(model).__qualname__}"
        if path not in CLASSES:
            raise TypeError(f"model: cannot save a {type(model).__name__} built without timm.create_model; "
                            f"supported classes: {', '.join(CLASSES)}")
        return {"architecture": path, "model_args": values}
    # What the name builds by itself (at depth 1: cheap; the depth is always recorded), or
    # at the model's depth where the name fixes settings per block.
    try:
        base = timm.create_model(name, pretrained=False, depth=1)
    except (AssertionError, ValueError, TypeError):
        base = timm.create_model(name, pretrained=False, depth=len(model.blocks))
    reference = _read(args, base)
    diff = {k: v for k, v in values.items() if k in ALWAYS or k not in reference or reference[k] != v}
    return {"architecture": name, "model_args": diff}


def _checked(arg: Optional[Arg], key: str, value: Any) -> Any:
    """``value`` if it has the type the argument takes, else a ``ValueError`` naming it."""
    if arg is None:
        return value
    where = f"model_args.{key}"

    def fail(expected: str):
        raise ValueError(f"config: {where}: expected {expected}, got {value!r}")

    if arg.kind == "bool" and not isinstance(value, bool):
        fail("true or false")
    if arg.kind == "int" and (isinstance(value, bool) or not isinstance(value, int)):
        fail("an integer")
    if arg.kind == "float" and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
        fail("a number")
    if arg.kind == "optional_float" and value is not None and (isinstance(value, bool) or
                                                               not isinstance(value, numbers.Real)):
        fail("a number or null")
    if arg.kind == "str" and not isinstance(value, str):
        fail("a string")
    if arg.kind == "size":
        ok = (isinstance(value, int) and not isinstance(value, bool)) or (
            isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) and not isinstance(v, bool)
                                                                for v in value))
        if not ok:
            fail("an integer or a list of two integers")
        value = value if isinstance(value, int) else tuple(value)
    if arg.choices and value not in arg.choices:
        fail(f"one of {', '.join(map(repr, arg.choices))}")
    return value


def build(description: Dict[str, Any], **overrides) -> nn.Module:
    """The model a description names, with random (or skipped) weights."""
    arch = description.get("architecture")
    model_args = description.get("model_args")
    if not isinstance(model_args, dict):
        raise ValueError(f"config: model_args: expected an object, got {type(model_args).__name__}")
    if isinstance(arch, str) and arch in CLASSES:
        module, name = CLASSES[arch]
        cls = getattr(importlib.import_module(module), name)
        known = {a.name: a for a in VIT}
        args = {k: _checked(known.get(k), k, v) for k, v in model_args.items()}
        try:
            return cls(**args, weight_init="skip", **overrides)
        except (TypeError, AssertionError, ValueError) as e:
            raise ValueError(f"config: model_args do not build a {name}: {e}") from None
    if not (isinstance(arch, str) and timm.is_model(arch)):
        raise ValueError(f"config: architecture {arch!r} is neither a timm model name nor one of "
                         f"{', '.join(CLASSES)}")
    known = {a.name: a for args in FAMILIES.values() for a in args}
    args = {k: _checked(known.get(k), k, v) for k, v in model_args.items()}
    try:
        return timm.create_model(arch, pretrained=False, **args, **overrides)
    except (TypeError, AssertionError, ValueError, KeyError) as e:
        raise ValueError(f"config: model_args do not build {arch}: {e}") from None
