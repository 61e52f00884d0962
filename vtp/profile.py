"""Parameter and multiply-add counts of a (gated, pruned or dense) ViT.

MACs are *multiply-accumulates* per image: a ``[M, K] x [K, N]`` product counts
``M * K * N``. That is the unit of the literature's "FLOPs" for ViTs (DeiT-B: 17.6 G).
Counted: every linear layer and convolution, and the two matrix products of each
attention (``Q K^T`` and ``P V``). Not counted: norms, softmax, activations, additions
(together well under 1 % of a ViT).

``profile`` counts by running one image through the model with hooks, so the figures
are those of the modules actually present. ``block_macs`` is the same count computed
from a block's kept sizes alone; the planner uses it to search for a FLOPs target.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
from timm.models.vision_transformer import Attention

from .modules import PrunedAttention

__all__ = ["Profile", "profile", "block_macs", "num_tokens"]


@dataclass(frozen=True)
class Profile:
    params: int
    macs: int
    img_size: Tuple[int, int]

    @property
    def gmacs(self) -> float:
        return self.macs / 1e9

    @property
    def mparams(self) -> float:
        return self.params / 1e6

    def to_dict(self) -> dict:
        return {**asdict(self), "img_size": list(self.img_size)}

    def __str__(self) -> str:
        return f"{self.mparams:.2f} M params, {self.gmacs:.3f} G MACs at {self.img_size[0]}x{self.img_size[1]}"


def _pair(size: Union[int, Tuple[int, int]]) -> Tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def num_tokens(model: nn.Module, img_size: Optional[Union[int, Tuple[int, int]]] = None) -> int:
    """Sequence length the blocks see: patches plus class, distillation and register tokens."""
    h, w = _pair(img_size) if img_size is not None else _pair(model.patch_embed.img_size)
    ph, pw = _pair(model.patch_embed.patch_size)
    if getattr(model.patch_embed, "dynamic_img_pad", False):  # the image is padded to whole patches
        return -(-h // ph) * -(-w // pw) + model.num_prefix_tokens
    return (h // ph) * (w // pw) + model.num_prefix_tokens


def block_macs(tokens: int, dim: int, head_dim: int, *, attn_in: int, v_widths, mlp_in: int,
               mlp_hidden: int) -> int:
    """MACs of one block from its kept sizes (0 for a branch that pruning made constant).

    attn_in: kept inputs of qkv; v_widths: kept value dims of each head (a head with 0
    is gone, its Q/K rows too); mlp_in: kept inputs of fc1; mlp_hidden: kept hidden dims.
    """
    macs = 0
    v_total = sum(v_widths)
    if attn_in and v_total:
        heads = sum(1 for w in v_widths if w)
        qkv_out = 2 * heads * head_dim + v_total
        macs += tokens * attn_in * qkv_out            # qkv
        macs += tokens * tokens * heads * head_dim    # Q K^T
        macs += tokens * tokens * v_total             # P V
        macs += tokens * v_total * dim                # proj
    if mlp_in and mlp_hidden:
        macs += tokens * mlp_in * mlp_hidden + tokens * mlp_hidden * dim
    return macs


def profile(model: nn.Module, img_size: Optional[Union[int, Tuple[int, int]]] = None) -> Profile:
    """Parameters and MACs per image of ``model`` (a timm ViT, dense, gated or pruned).

    Gates count as parameters (they are trained); the pruned model has none.
    ``img_size`` defaults to the size the model was built for.
    """
    if not hasattr(model, "patch_embed"):
        raise TypeError(f"model: expected a timm VisionTransformer, got {type(model).__name__}")
    size = _pair(img_size) if img_size is not None else _pair(model.patch_embed.img_size)
    if min(size) <= 0:
        raise ValueError(f"img_size: expected positive sizes, got {img_size}")
    embed = model.patch_embed
    if getattr(embed, "strict_img_size", False) and size != _pair(embed.img_size):
        raise ValueError(f"img_size: the model takes only {tuple(embed.img_size)} images (no dynamic_img_size), "
                         f"got {size}")
    patch = _pair(embed.patch_size)
    if not getattr(embed, "dynamic_img_pad", False) and (size[0] % patch[0] or size[1] % patch[1]):
        raise ValueError(f"img_size: {size} is not a multiple of the patch size {patch} (no dynamic_img_pad)")
    params = sum(p.numel() for p in model.parameters())
    total = [0]

    def linear_hook(m: nn.Linear, inputs, output):
        total[0] += inputs[0].numel() // m.in_features * m.in_features * m.out_features

    def conv_hook(m: nn.Conv2d, inputs, output):
        k = m.kernel_size[0] * m.kernel_size[1] * m.in_channels // m.groups
        total[0] += output.numel() * k

    def attention_hook(m: nn.Module, inputs, output):
        batch, tokens = inputs[0].shape[:2]
        if isinstance(m, PrunedAttention):
            qk, v = m.qk_dim, m.v_dim
        else:
            qk = v = m.attn_dim
        total[0] += batch * tokens * tokens * (qk + v)

    handles = []
    for m in model.modules():
        if isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
        elif isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, (Attention, PrunedAttention)):
            handles.append(m.register_forward_hook(attention_hook))
    was_training = model.training
    ref = next(model.parameters())
    # A private generator: profiling must not shift the caller's random stream.
    x = torch.randn(1, model.patch_embed.proj.in_channels, *size, generator=torch.Generator().manual_seed(0))
    x = x.to(device=ref.device, dtype=ref.dtype)
    try:
        model.eval()
        with torch.no_grad():
            model(x)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return Profile(params=params, macs=total[0], img_size=size)
