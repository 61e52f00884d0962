"""Small timm ViTs covering the family VTP supports, built from config (nothing downloaded)."""
import timm
import torch
from timm.models.vision_transformer import VisionTransformer

import vtp

BASE = dict(img_size=32, patch_size=8, in_chans=3, num_classes=5, embed_dim=48, depth=3, num_heads=3, mlp_ratio=2.0)

VARIANTS = {
    "deit": {},
    "no_qkv_bias": dict(qkv_bias=False),
    "layer_scale": dict(init_values=0.3),
    "qk_norm": dict(qk_norm=True),
    "registers": dict(reg_tokens=4),
    "avg_pool_no_cls": dict(class_token=False, global_pool="avg"),
    "distilled": "deit_tiny_distilled_patch16_224",
}


def make_vit(variant: str = "deit", dtype=torch.float64) -> torch.nn.Module:
    spec = VARIANTS[variant]
    if isinstance(spec, str):
        model = timm.create_model(spec, pretrained=False, **BASE)
    else:
        model = VisionTransformer(**{**BASE, **spec})
    return model.to(dtype).eval()


def randomize_gates(model, seed: int = 0) -> None:
    """Gate values in (0.05, 1.05): distinct, so plans are unambiguous."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gate in vtp.gates(model).values():
            gate.copy_(torch.rand(gate.shape, generator=g, dtype=torch.float64) + 0.05)


def masked_copy_gates(model, plan, fold: bool = True) -> None:
    """Set pruned gates to 0 (and kept ones to 1 when not folding), in place."""
    with torch.no_grad():
        for name, gate in vtp.gates(model).items():
            mask = torch.zeros_like(gate)
            mask[plan.kept[name]] = 1
            gate.copy_(gate * mask if fold else mask)
