"""The ViT families beyond timm's classic VisionTransformer, one small model per new structure:
gated, random gates with zeros (a dead head, a dead MLP, a constant branch), pruned with
folding on and off, equal to the masked gated model, saved and loaded bit for bit.

Every model is float64, depth 2, about 48 wide, on an image of 4 x 4 patches; every
parameter gets random noise, so that zero-initialised heads or layer scales of 1e-5 cannot
hide a difference behind outputs that barely depend on the blocks.
"""
import copy

import pytest
import timm
import torch

import vtp
from vit_variants import masked_copy_gates
from scripts import load_script

# The zoo survey's own perturbation and gates (a dead head, a dead MLP): one definition.
coverage = load_script("benchmarks/timm_coverage.py")

SMALL = dict(depth=2, embed_dim=48, num_heads=3, num_classes=5)

# name -> (timm architecture, overrides, pixels per token): each a structure of its own.
FAMILIES = {
    "eva02 packed SwiGLU, RoPE, q/v biases": ("eva02_small_patch14_224", {}, 14),
    "eva02 SwiGLU with a hidden norm": ("eva02_base_patch14_224", {}, 14),
    "eva02 CLIP: attention output norm": ("eva02_base_patch16_clip_224", {}, 16),
    "rope ViT (AttentionRope)": ("vit_small_patch16_rope_224", {}, 16),
    "rope ViT, separate q/k/v projections": ("vit_small_patch16_rope_224", dict(qkv_fused=False), 16),
    "rope ViT, per-head frequencies": ("vit_small_patch16_rope_mixed_224", {}, 16),
    "DINOv3: separate q/k/v biases, layer scale": ("vit_small_patch16_dinov3_qkvb", {}, 16),
    "DINOv3 SwiGLU": ("vit_small_plus_patch16_dinov3", {}, 16),
    "relative-position MLP bias": ("vit_relpos_small_patch16_224", {}, 16),
    "shared relative-position bias": ("vit_srelpos_small_patch16_224", {}, 16),
    "post-norm relative position": ("vit_relpos_medium_patch16_rpn_224", {}, 16),
    "BEiT: bias table, q/v biases, layer scale": ("beit_base_patch16_224", {}, 16),
    "BEiT-3: attention and MLP norms": ("beit3_base_patch16_224", {}, 16),
    "SAM: windows, decomposed position bias": ("samvit_base_patch16", dict(window_size=2), 16),
    "NaFlex ViT, gated attention": ("naflexvit_base_patch16_gap", dict(attn_gated=True), 16),
    "post-norm ViT (ResPostBlock)": ("vit_base_patch16_rpn_224", {}, 16),
    "parallel branches (ParallelThingsBlock)": ("vit_small_patch16_18x2_224", {}, 16),
    "fused parallel block (ParallelScalingBlock)": ("vit_base_patch16_xp_224", {}, 16),
    "hybrid ResNet stem": ("vit_small_r26_s32_224", {}, 32),
    "CLIP (LayerNorm eps 1e-5, QuickGELU)": ("vit_base_patch32_clip_quickgelu_224", {}, 32),
    "SigLIP (tanh GELU, attention pooling)": ("vit_base_patch16_siglip_224", {}, 16),
}


def build(arch, overrides, stride):
    model = timm.create_model(arch, pretrained=False, img_size=4 * stride, **{**SMALL, **overrides})
    return coverage.perturb(model.double().eval()), 4 * stride


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_prunes_exactly_and_round_trips(family, tmp_path):
    arch, overrides, stride = FAMILIES[family]
    model, size = build(arch, overrides, stride)
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    dense_out = model(x)
    vtp.add_gates(model)
    # gates at 1: the gated model is the dense one
    torch.testing.assert_close(model(x), dense_out, rtol=1e-12, atol=1e-12)
    coverage.randomize(model)
    plan = vtp.plan(model, ratio=0.5)
    for fold in (True, False):
        small = vtp.prune(model, plan, fold=fold)
        masked = copy.deepcopy(model)
        masked_copy_gates(masked, plan, fold=fold)
        # float64 throughout: the two differ only in the order of sums
        torch.testing.assert_close(small(x), masked(x), rtol=1e-9, atol=1e-9)
    assert not vtp.gates(small)
    profile = vtp.profile(small)
    assert profile.macs < vtp.profile(model).macs
    assert profile.params == sum(p.numel() for p in small.parameters())
    vtp.save(small, tmp_path / "pruned")
    loaded = vtp.load(tmp_path / "pruned")
    assert torch.equal(loaded(x), small(x))
    vtp.save(model, tmp_path / "gated")
    assert torch.equal(vtp.load(tmp_path / "gated")(x), model(x))


def test_shared_gates_read_one_input():
    """q, k and v projections of one attention share one gate, and so do a SwiGLU's two input
    projections: one score per input dim, as for a fused projection."""
    model, _ = build("vit_small_patch16_rope_224", dict(qkv_fused=False), 16)
    vtp.add_gates(model)
    attn = model.blocks[0].attn
    assert attn.q_proj.gate is attn.k_proj.gate is attn.v_proj.gate
    assert vtp.gates(model)["blocks.0.attn_in"] is attn.q_proj.gate
    swiglu, _ = build("vit_small_plus_patch16_dinov3", {}, 16)
    vtp.add_gates(swiglu)
    mlp = swiglu.blocks[0].mlp
    assert mlp.fc1_g.gate is mlp.fc1_x.gate
    assert len(vtp.gates(swiglu)) == 8
    assert sum(p.numel() for p in vtp.param_groups(swiglu)[-1]["params"]) == \
        sum(g.numel() for g in vtp.gates(swiglu).values())


def test_parallel_branches_are_named_apart():
    model, _ = build("vit_small_patch16_18x2_224", {}, 16)
    names = list(vtp.gates(vtp.add_gates(model)))
    assert names[:4] == ["blocks.0.0.attn_in", "blocks.0.0.attn_out", "blocks.0.1.attn_in", "blocks.0.1.attn_out"]
    assert "blocks.1.1.mlp_hidden" in names
    fused, _ = build("vit_base_patch16_xp_224", {}, 16)
    # the fused block's MLP reads the attention's input: no mlp_in site
    assert list(vtp.gates(vtp.add_gates(fused)))[:3] == ["blocks.0.attn_in", "blocks.0.attn_out", "blocks.0.mlp_hidden"]


def test_swiglu_and_fused_parallel_macs_by_hand():
    """profile counts what runs: a SwiGLU's three linears; a fused parallel block's one input
    projection, two matrix products of attention and two output projections."""
    model, size = build("vit_small_plus_patch16_dinov3", dict(num_reg_tokens=0), 16)
    tokens, dim = 16 + 1, 48
    hidden = model.blocks[0].mlp.fc2.in_features
    blocks = 2 * (tokens * dim * 3 * dim + 2 * tokens * tokens * dim + tokens * dim * dim
                  + tokens * (2 * dim * hidden + hidden * dim))
    assert vtp.profile(model).macs == blocks + 16 * 3 * 16 * 16 * dim + dim * 5
    fused, _ = build("vit_base_patch16_xp_224", {}, 16)
    hidden = fused.blocks[0].in_split[0]
    tokens = 16 + 1
    block = tokens * dim * (hidden + 3 * dim) + 2 * tokens * tokens * dim + tokens * (dim + hidden) * dim
    assert vtp.profile(fused).macs == 2 * block + 16 * 3 * 16 * 16 * dim + dim * 5


@pytest.mark.parametrize("field, value, match", [
    ("global_pool", 3, "model_args.global_pool: expected a string"),
    ("global_pool", "mean", "model_args.global_pool: expected one of"),
    ("depth", "2", "model_args.depth: expected an integer"),
    ("img_size", [64], "model_args.img_size: expected an integer or a list of two"),
    ("qkv_bias", 1, "model_args.qkv_bias: expected true or false"),
])
def test_hand_edited_config_with_a_wrong_type_names_the_field(field, value, match, tmp_path):
    import json

    model, _ = build("eva02_small_patch14_224", {}, 14)
    vtp.save(model, tmp_path / "m")
    path = tmp_path / "m" / "config.json"
    config = json.loads(path.read_text())
    config["model_args"][field] = value
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=match):
        vtp.load(tmp_path / "m")
    config["model_args"].pop(field)
    config["dtype"] = 32
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="dtype: expected one of"):
        vtp.load(tmp_path / "m")


def test_architecture_name_and_its_differences_are_saved(tmp_path):
    import json

    model, _ = build("eva02_small_patch14_224", {}, 14)
    vtp.save(model, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["architecture"] == "eva02_small_patch14_224"
    assert config["model_args"] == {"img_size": 56, "num_classes": 5, "embed_dim": 48, "depth": 2,
                                    "num_heads": 3}
