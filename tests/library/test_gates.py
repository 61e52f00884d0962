import pytest
import timm
import torch
import torch.nn as nn

import vtp
from vit_variants import make_vit


def test_add_gates_places_four_sites_per_block_and_keeps_outputs():
    model = make_vit()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    before = model(x)
    assert vtp.add_gates(model) is model
    names = list(vtp.gates(model))
    assert names[:4] == ["blocks.0.attn_in", "blocks.0.attn_out", "blocks.0.mlp_in", "blocks.0.mlp_hidden"]
    assert len(names) == 4 * len(model.blocks)
    sizes = {n.split(".")[-1]: g.numel() for n, g in vtp.gates(model).items()}
    assert sizes == {"attn_in": 48, "attn_out": 48, "mlp_in": 48, "mlp_hidden": 96}
    torch.testing.assert_close(model(x), before)
    assert "blocks.0.attn.qkv.gate" in model.state_dict()


def test_add_gates_subset_and_idempotent():
    model = make_vit()
    vtp.add_gates(model, sites=("mlp_hidden",))
    assert all(n.endswith("mlp_hidden") for n in vtp.gates(model))
    vtp.add_gates(model, sites="attn_out")
    vtp.add_gates(model, sites="attn_out")
    assert len(vtp.gates(model)) == 2 * len(model.blocks)
    with pytest.raises(ValueError, match="sites"):
        vtp.add_gates(model, sites=("attn",))


def test_l1_penalty_and_stats():
    model = vtp.add_gates(make_vit())
    with torch.no_grad():
        for g in vtp.gates(model).values():
            g.uniform_(-1, 1)
    expected = sum(g.abs().sum() for g in vtp.gates(model).values())
    torch.testing.assert_close(vtp.l1_penalty(model).double(), expected.double())
    stats = vtp.gate_stats(model)
    assert stats["all"]["size"] == vtp.gate_values(model).numel() == sum(g.numel() for g in vtp.gates(model).values())
    assert 0.0 <= stats["blocks.0.attn_in"]["below_0.1"] <= 1.0
    with pytest.raises(ValueError, match="add_gates"):
        vtp.l1_penalty(make_vit())


def test_param_groups_never_decay_gates():
    model = vtp.add_gates(make_vit())
    groups = vtp.param_groups(model, weight_decay=0.05)
    gate_ids = {id(g) for g in vtp.gates(model).values()}
    for group in groups:
        ids = {id(p) for p in group["params"]}
        if ids & gate_ids:
            assert ids == gate_ids and group["weight_decay"] == 0.0
    decayed = [p for g in groups if g["weight_decay"] > 0 for p in g["params"]]
    assert decayed and all(p.ndim == 2 or p.ndim == 4 for p in decayed)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    with pytest.raises(ValueError, match="weight_decay"):
        vtp.param_groups(model, weight_decay=-1)


def test_unsupported_structures_are_named():
    """What VTP's sites cannot prune exactly is a TypeError naming the module and what it found."""
    from timm.layers import GatedMlp
    from timm.models.vision_transformer import VisionTransformer

    with pytest.raises(TypeError, match="timm ViT with a 'blocks' sequence, got Sequential"):
        vtp.add_gates(nn.Sequential(nn.Linear(3, 3)))
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=1, num_heads=3, mlp_layer=GatedMlp)
    with pytest.raises(TypeError, match=r"model\.blocks\.0\.mlp: VTP prunes timm's Mlp, GluMlp and SwiGLU, got GatedMlp"):
        vtp.add_gates(model)
    diff = timm.create_model("vit_dwee_patch16_reg1_gap_256", pretrained=False, depth=1)
    with pytest.raises(TypeError, match=r"model\.blocks\.0\.attn: .*got DiffAttention"):
        vtp.add_gates(diff)
    gqa = timm.create_model("vit_base_patch16_rope_224", pretrained=False, depth=1, attn_type="rope",
                            qkv_fused=False, num_kv_heads=4)
    with pytest.raises(TypeError, match=r"model\.blocks\.0\.attn: grouped-query attention \(12 query heads over 4"):
        vtp.add_gates(gqa)


def test_blocks_with_different_head_dims_are_refused():
    from timm.models.vision_transformer import Attention

    model = make_vit()
    model.blocks[1].attn = Attention(48, num_heads=6, qkv_bias=True).double()
    with pytest.raises(TypeError, match="head_dim"):
        vtp.add_gates(model)
