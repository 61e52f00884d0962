"""Parameter and multiply-add counts of a (gated, pruned or dense) ViT.

MACs are *multiply-accumulates* per image: a ``[M, K] x [K, N]`` product counts
``M * K * N``. That is the unit of the literature's "FLOPs" for ViTs (DeiT-B: 17.6 G).
Counted: every linear layer and convolution (a SwiGLU's three, the MLP that computes a
relative-position bias table), and the two matrix products of each attention (``Q K^T``
and ``P V``). Not counted: norms, softmax, activations, additions, rotary embeddings and
position-bias lookups (together well under 1 % of a ViT).

``profile`` counts by running one image through the model with hooks, so the figures
are those of the modules actually present. The planner prunes a copy on the meta device
(no memory, no arithmetic) and profiles it, so a plan's MACs are exactly these figures.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
from timm.models.vision_transformer import ParallelScalingBlock

from .architectures import ATTENTIONS, attention_head_dim
from .modules import PrunedAttention, PrunedParallelBlock

__all__ = ["Profile", "profile", "num_tokens", "input_channels", "default_img_size", "check_img_size"]

@dataclass(frozen=True)
class Profile:
    """``macs`` counts the kept dimensions (what a plan and the literature count);
    ``executed_macs`` also the zeros a layout computes with (padded value rows; q, k and v
    padded to the block's attention width inside attention, as the PyTorch path runs it;
    zero query and key slots that give every head of a block one QK width)."""
    params: int
    macs: int
    img_size: Tuple[int, int]
    executed_macs: int = 0

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


def size_pair(size: Union[int, Tuple[int, int]]) -> Tuple[int, int]:
    """(height, width) of an image or patch size given as one int or a pair."""
    if isinstance(size, int):
        return size, size
    if len(size) != 2:
        raise ValueError(f"img_size: expected an int or (height, width), got {tuple(size)}")
    return int(size[0]), int(size[1])


def num_tokens(model: nn.Module, img_size: Optional[Union[int, Tuple[int, int]]] = None) -> int:
    """Sequence length the blocks of a patch-embedding ViT see: patches plus class,
    distillation and register tokens."""
    h, w = size_pair(img_size) if img_size is not None else size_pair(model.patch_embed.img_size)
    ph, pw = size_pair(model.patch_embed.patch_size)
    if getattr(model.patch_embed, "dynamic_img_pad", False):  # the image is padded to whole patches
        return -(-h // ph) * -(-w // pw) + model.num_prefix_tokens
    return (h // ph) * (w // pw) + model.num_prefix_tokens


def input_channels(model: nn.Module) -> int:
    """Channels of the images ``model`` takes: its patch embedding's, or its first
    convolution's (hybrid stems)."""
    embed = _embed(model)
    if hasattr(embed, "in_chans"):
        return int(embed.in_chans)
    for m in embed.modules():
        if isinstance(m, nn.Conv2d):
            return int(m.in_channels)
    raise TypeError(f"model: cannot tell the input channels of {type(embed).__name__}")


def default_img_size(model: nn.Module) -> Tuple[int, int]:
    """The image size ``model`` was built for."""
    embed = _embed(model)
    size = getattr(embed, "img_size", None) or getattr(embed, "default_img_size", None)
    if size is None and getattr(embed, "pos_embed_grid_size", None) is not None:
        # NaFlex ViTs take any size; their position table is laid out for this one
        size = tuple(g * p for g, p in zip(embed.pos_embed_grid_size, size_pair(embed.patch_size)))
    if size is None:
        raise TypeError(f"model: cannot tell the image size of {type(embed).__name__}")
    return size_pair(size)


def check_img_size(model: nn.Module, size: Tuple[int, int]) -> None:
    """A ``ValueError`` naming ``img_size`` when ``model`` cannot take images of ``size``."""
    embed = _embed(model)
    if min(size) <= 0:
        raise ValueError(f"img_size: expected positive sizes, got {size}")
    if getattr(embed, "strict_img_size", False) and tuple(size) != size_pair(embed.img_size):
        raise ValueError(f"img_size: the model takes only {tuple(embed.img_size)} images (no dynamic_img_size), "
                         f"got {tuple(size)}")
    patch = size_pair(embed.patch_size)
    stride = (size_pair(embed.img_size)[0] // embed.grid_size[0], size_pair(embed.img_size)[1] // embed.grid_size[1]) \
        if getattr(embed, "grid_size", None) is not None and getattr(embed, "img_size", None) is not None else patch
    if not getattr(embed, "dynamic_img_pad", False) and (size[0] % stride[0] or size[1] % stride[1]):
        raise ValueError(f"img_size: {tuple(size)} is not a multiple of the patch size {stride} (no dynamic_img_pad)")


def _embed(model: nn.Module) -> nn.Module:
    embed = getattr(model, "patch_embed", None) or getattr(model, "embeds", None)
    if embed is None:
        raise TypeError(f"model: expected a timm ViT (VisionTransformer, Eva, ...) with a patch embedding, "
                        f"got {type(model).__name__}")
    return embed


def attention_dims(m: nn.Module) -> Tuple[int, int]:
    """(kept query/key width, value width) of an attention module, summed over its heads."""
    if isinstance(m, (PrunedAttention, PrunedParallelBlock)):
        return sum(m.qk_widths), m.v_dim
    dim = m.num_heads * attention_head_dim(m) if not isinstance(m, ParallelScalingBlock) else m.in_split[1]
    return dim, dim


def profile(model: nn.Module, img_size: Optional[Union[int, Tuple[int, int]]] = None) -> Profile:
    """Parameters and MACs per image of ``model`` (a timm ViT, dense, gated or pruned).

    Gates count as parameters (they are trained); the pruned model has none.
    ``img_size`` defaults to the size the model was built for.
    """
    size = size_pair(img_size) if img_size is not None else default_img_size(model)
    check_img_size(model, size)
    params = sum(p.numel() for p in model.parameters())
    total = [0]
    zeros = {"linear": 0, "attention": 0}  # work on zeros a layout adds: executed, not kept

    def linear_hook(m: nn.Linear, inputs, output):
        # An IndexedLinear reads the kept columns of a wider input: count what it multiplies.
        rows = inputs[0].numel() // getattr(m, "full_width", m.in_features)
        total[0] += rows * m.in_features * m.out_features

    def conv_hook(m: nn.Conv2d, inputs, output):
        k = m.kernel_size[0] * m.kernel_size[1] * m.in_channels // m.groups
        total[0] += output.numel() * k

    def attention_hook(m: nn.Module, inputs, output):
        # [B, N, C], or [B, H, W, C] (SAM; windows are batched)
        batch, tokens = inputs[0].shape[0], inputs[0][0, ..., 0].numel()
        qk, v = attention_dims(m)
        total[0] += batch * tokens * tokens * (qk + v)
        if isinstance(m, (PrunedAttention, PrunedParallelBlock)) and m.v_dim:
            projection = m.qkv if isinstance(m, PrunedAttention) else m.in_proj
            # attention runs q, k and v of every head at one width, zeros filling the rest
            zeros["attention"] += batch * tokens * tokens * (2 * m.num_heads * m.attention_width - qk - v)
            if m.v_layout == "padded":   # zero value rows the linear hook counted
                zeros["linear"] += batch * tokens * projection.in_features * (m.v_rows - m.v_dim)
            if m.qk_pruned and not m.qk_full_rows:  # zero query and key rows of the projection
                zeros["linear"] += batch * tokens * projection.in_features * 2 * (m.num_heads * m.qk_width - qk)

    handles = []
    for m in model.modules():
        if isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
        elif isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, ATTENTIONS + (PrunedAttention, ParallelScalingBlock, PrunedParallelBlock)):
            handles.append(m.register_forward_hook(attention_hook))
    was_training = model.training
    ref = next(model.parameters())
    # A private generator: profiling must not shift the caller's random stream.
    x = torch.randn(1, input_channels(model), *size, generator=torch.Generator().manual_seed(0))
    x = x.to(device=ref.device, dtype=ref.dtype)
    try:
        model.eval()
        with torch.no_grad():
            model(x)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return Profile(params=params, macs=total[0] - zeros["linear"], img_size=size,
                   executed_macs=total[0] + zeros["attention"])
