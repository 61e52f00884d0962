import pytest
import timm
import torch

import vtp
from vit_variants import make_vit, randomize_gates


def test_deit_base_figures():
    # Literature: DeiT-B has 86.6 M parameters and 17.6 G multiply-adds at 224x224.
    with torch.device("cpu"):
        model = timm.create_model("deit_base_patch16_224", pretrained=False)
    p = vtp.profile(model)
    assert round(p.params / 1e6, 1) == 86.6
    # 12 blocks x 1.454 G + patch embedding 0.116 G + head 0.8 M
    assert p.macs == 12 * (197 * 768 * 2304 + 2 * 197 * 197 * 768 + 197 * 768 * 768 + 2 * 197 * 768 * 3072) \
        + 196 * 768 * 768 + 768 * 1000
    assert round(p.gmacs, 1) == 17.6


def test_profile_follows_image_size_and_gates_add_only_parameters():
    model = make_vit()
    base = vtp.profile(model)
    gated = vtp.profile(vtp.add_gates(make_vit()))
    assert gated.macs == base.macs
    assert gated.params == base.params + sum(g.numel() for g in vtp.gates(vtp.add_gates(make_vit())).values())
    with pytest.raises(ValueError, match="img_size"):
        vtp.profile(model, img_size=0)
    with pytest.raises(TypeError, match="VisionTransformer"):
        vtp.profile(torch.nn.Linear(2, 2))


def test_pruned_profile_matches_its_shapes():
    model = vtp.add_gates(make_vit())
    randomize_gates(model)
    small = vtp.prune(model, vtp.plan(model, ratio=0.5))
    p = vtp.profile(small)
    assert p.params == sum(t.numel() for t in small.parameters())
    tokens = 17
    expected = 16 * 48 * 3 * 8 * 8 + 48 * 5  # patch embedding, head
    padding = 0
    for block in small.blocks:
        attn, mlp = block.attn, block.mlp
        # kept MACs: the qkv rows of kept dims only, not the zero rows padding V to head_dim
        expected += tokens * attn.qkv.in_features * (2 * attn.qk_dim + attn.v_dim)
        padding += tokens * attn.qkv.in_features * (attn.qkv.out_features - 2 * attn.qk_dim - attn.v_dim)
        padding += tokens * tokens * (attn.qk_dim - attn.v_dim)  # attention runs on V padded to head_dim
        expected += tokens * tokens * (attn.qk_dim + attn.v_dim)
        expected += tokens * attn.proj.in_features * attn.proj.out_features
        expected += tokens * (mlp.fc1.in_features * mlp.fc1.out_features + mlp.fc2.in_features * mlp.fc2.out_features)
    assert p.macs == expected
    assert p.executed_macs == expected + padding > expected
    packed = vtp.profile(vtp.prune(model, vtp.plan(model, ratio=0.5), layout="packed"))
    assert packed.macs == p.macs and packed.executed_macs < p.executed_macs


@pytest.mark.parametrize("img_size", [36, (40, 44)])
def test_planner_counts_the_tokens_of_padded_dynamic_images(img_size):
    from timm.models.vision_transformer import VisionTransformer
    from vit_variants import BASE
    from vtp._plan import plan_macs

    model = vtp.add_gates(VisionTransformer(**{**BASE, "dynamic_img_size": True, "dynamic_img_pad": True}))
    randomize_gates(model)
    h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
    from vtp._profile import num_tokens
    assert num_tokens(model, img_size) == -(-h // 8) * -(-w // 8) + 1
    plan = vtp.plan(model, flops_target=0.5, img_size=img_size)
    small = vtp.prune(model, plan)
    assert vtp.profile(small, img_size).macs == plan.rule["macs"] == plan_macs(model, plan.kept, plan.head_dim, img_size)
    assert plan.rule["macs"] <= 0.5 * vtp.profile(model, img_size).macs


def test_image_sizes_the_model_cannot_take_are_named():
    from timm.models.vision_transformer import VisionTransformer
    from vit_variants import BASE

    with pytest.raises(ValueError, match="dynamic_img_size"):
        vtp.profile(make_vit(), img_size=48)
    with pytest.raises(ValueError, match="patch size"):
        vtp.profile(VisionTransformer(**{**BASE, "dynamic_img_size": True}), img_size=36)
    assert vtp.profile(make_vit(), img_size=32) == vtp.profile(make_vit())
