"""The attn_qk site: one gate per query/key dim of each head, inside the attention scores
(s = sum_d a_d q_d k_d), and pruning that removes the q and k rows of the pruned dims.

Every model is float64, so pruned and masked gated models differ only in the order of sums
(tolerance 1e-9 relative, against differences of whole units when a row is wrong).
"""
import copy
import json
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

import vtp
from vtp._plan import plan_macs
from vtp.architectures import branches, qk_layout
from vtp.modules import PrunedAttention
from vit_variants import make_vit, masked_copy_gates
from scripts import load_script

coverage = load_script("benchmarks/timm_coverage.py")

DATA = Path(__file__).resolve().parent / "data"
SMALL = dict(depth=2, embed_dim=48, num_heads=3, num_classes=5)

# name -> (timm architecture or a vit_variants name, overrides, pixels per token)
FAMILIES = {
    "plain ViT": ("deit", None, 8),
    "qk-norm ViT": ("qk_norm", None, 8),
    "EVA-02: RoPE pairs (half), q/v biases": ("eva02_small_patch14_224", {}, 14),
    "RoPE ViT, interleaved pairs, separate q/k/v": ("vit_small_patch16_rope_224", dict(qkv_fused=False), 16),
    "RoPE ViT, per-head frequencies": ("vit_small_patch16_rope_mixed_224", {}, 16),
    "BEiT: position bias table": ("beit_base_patch16_224", {}, 16),
    "relative-position MLP bias": ("vit_relpos_small_patch16_224", {}, 16),
    "shared relative-position bias": ("vit_srelpos_small_patch16_224", {}, 16),
    "SAM: windows, decomposed bias reading q": ("samvit_base_patch16", dict(window_size=2), 16),
    "parallel branches": ("vit_small_patch16_18x2_224", {}, 16),
    "fused parallel block with q/k norms": ("vit_base_patch16_xp_224", dict(qk_norm=True), 16),
}


def build(arch, overrides, stride):
    if overrides is None:
        return make_vit(arch), 32
    model = timm.create_model(arch, pretrained=False, img_size=4 * stride, **{**SMALL, **overrides})
    return coverage.perturb(model.double().eval()), 4 * stride


def randomize(model, seed=0, dead_block=None):
    """The zoo survey's gates (a dead head, a head with every QK gate at zero), and with
    ``dead_block`` every QK gate of that block at zero."""
    coverage.randomize(model, seed)
    if dead_block is not None:
        with torch.no_grad():
            for name, gate in vtp.gates(model).items():
                if name.startswith(f"blocks.{dead_block}.") and name.endswith("attn_qk"):
                    gate.zero_()


def pruned_attentions(model):
    return [m for m in model.modules() if isinstance(m, (vtp.PrunedAttention, vtp.modules.PrunedParallelBlock))]


def test_sites_stay_the_papers_four_and_attn_qk_is_opt_in():
    assert vtp.SITES == ("attn_in", "attn_out", "mlp_in", "mlp_hidden")
    assert vtp.ALL_SITES == vtp.SITES + ("attn_qk",) and vtp.QK_SITE == "attn_qk"
    assert not any(n.endswith("attn_qk") for n in vtp.gates(vtp.add_gates(make_vit())))
    with pytest.raises(ValueError, match="sites: expected a non-empty subset of .*attn_qk"):
        vtp.add_gates(make_vit(), sites=("attn_kq",))


@pytest.mark.parametrize("family", ["plain ViT", "EVA-02: RoPE pairs (half), q/v biases",
                                    "fused parallel block with q/k norms"])
def test_gates_at_one_change_nothing_and_are_named_and_sized(family):
    model, size = build(*FAMILIES[family])
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    dense = model(x)
    vtp.add_gates(model, sites=vtp.ALL_SITES)
    torch.testing.assert_close(model(x), dense, rtol=1e-12, atol=1e-12)
    found = vtp.gates(model)
    for branch in branches(model):
        if "attn_qk" in branch.sites:
            layout = qk_layout(branch)
            # one value per dim, or per RoPE pair
            per = 2 if "RoPE" in family else 1
            assert found[branch.gate_name("attn_qk")].numel() == layout.heads * layout.head_dim // per
    assert "blocks.0.attn_qk" in found and "blocks.1.attn_qk" in found


def test_gate_scores_each_query_key_dim():
    """Against attention written out from the dense weights: s = scale * sum_d a_d q_d k_d."""
    model = make_vit("qk_norm")
    dense_attn = copy.deepcopy(model.blocks[0].attn)
    vtp.add_gates(model, sites=("attn_qk",))
    attn = model.blocks[0].attn
    a = torch.rand(attn.num_heads * attn.head_dim, dtype=torch.float64)
    with torch.no_grad():
        vtp.gates(model)["blocks.0.attn_qk"].copy_(a)
    x = torch.randn(2, 5, 48, dtype=torch.float64)
    B, N, H, D = 2, 5, attn.num_heads, attn.head_dim
    q, k, v = F.linear(x, dense_attn.qkv.weight, dense_attn.qkv.bias).view(B, N, 3, H, D).permute(2, 0, 3, 1, 4)
    q, k = dense_attn.q_norm(q), dense_attn.k_norm(k)
    scores = torch.einsum("bhnd,bhmd,hd->bhnm", q, k, a.view(H, D)) * D ** -0.5
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, N, H * D)
    torch.testing.assert_close(attn(x), dense_attn.proj(out), rtol=1e-12, atol=1e-12)
    # the gate went after the key norm, whose own parameters stay where they were
    assert isinstance(attn.k_norm, vtp.GatedHeadNorm)
    assert torch.equal(attn.k_norm.norm.weight, dense_attn.k_norm.weight)


@pytest.mark.parametrize("family", ["EVA-02: RoPE pairs (half), q/v biases", "BEiT: position bias table"])
def test_attn_qk_alone_gates_projections_whose_bias_is_added_apart(family):
    """EVA and BEiT add their q/v biases with F.linear on qkv.weight: a gate in qkv alone
    must still be seen (the survey gates every site together, which hid this)."""
    model, size = build(*FAMILIES[family])
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    vtp.add_gates(model, sites=("attn_qk",))
    dense = model(x)
    with torch.no_grad():
        for gate in vtp.gates(model).values():
            gate.zero_()  # every score 0 (or the position bias alone): the output must move
    assert (model(x) - dense).abs().max() > 1e-3
    randomize(model)
    plan = vtp.plan(model, ratio=0.5, round_to=1)
    masked = copy.deepcopy(model)
    masked_copy_gates(masked, plan)
    torch.testing.assert_close(vtp.prune(model, plan)(x), masked(x), rtol=1e-9, atol=1e-9)


def test_sites_added_in_any_order_share_one_projection():
    one = vtp.add_gates(make_vit(), sites=vtp.ALL_SITES)
    two = vtp.add_gates(vtp.add_gates(make_vit(), sites=("attn_qk",)), sites=vtp.SITES)
    three = vtp.add_gates(vtp.add_gates(make_vit(), sites=vtp.SITES), sites=("attn_qk",))
    for model in (two, three):
        assert {n: g.numel() for n, g in vtp.gates(model).items()} == \
            {n: g.numel() for n, g in vtp.gates(one).items()}
        qkv = model.blocks[0].attn.qkv
        assert qkv.gate is vtp.gates(model)["blocks.0.attn_in"] and qkv.qk_gate is vtp.gates(model)["blocks.0.attn_qk"]
    only_qk = vtp.add_gates(make_vit(), sites=("attn_qk",))
    assert list(vtp.gates(only_qk)) == ["blocks.0.attn_qk", "blocks.1.attn_qk", "blocks.2.attn_qk"]
    assert only_qk.blocks[0].attn.qkv.gate is None  # its input is not gated


@pytest.mark.parametrize("family", list(FAMILIES))
def test_pruned_equals_masked_gated_model_and_round_trips(family, tmp_path):
    model, size = build(*FAMILIES[family])
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    vtp.add_gates(model, sites=vtp.ALL_SITES)
    randomize(model, dead_block=1)  # block 1: every QK dim pruned, scores constant
    for round_to in (1, 8):
        plan = vtp.plan(model, ratio=0.5, round_to=round_to)
        for fold in (True, False):
            small = vtp.prune(model, plan, fold=fold)
            masked = copy.deepcopy(model)
            masked_copy_gates(masked, plan, fold=fold)
            torch.testing.assert_close(small(x), masked(x), rtol=1e-9, atol=1e-9)
    attentions = pruned_attentions(small)
    assert any(m.qk_pruned for m in attentions)
    assert any(m.qk_width == 0 for m in attentions)  # block 1 has no QK^T left
    assert not vtp.gates(small)
    profile = vtp.profile(small)
    assert profile.params == sum(p.numel() for p in small.parameters())
    assert plan_macs(model, plan.kept, plan.head_dim) == profile.macs
    vtp.save(small, tmp_path / "pruned")
    assert torch.equal(vtp.load(tmp_path / "pruned")(x), small(x))
    vtp.save(model, tmp_path / "gated")
    loaded = vtp.load(tmp_path / "gated")
    assert torch.equal(loaded(x), model(x))
    assert set(vtp.gates(loaded)) == set(vtp.gates(model))


def test_heads_keep_their_own_query_key_widths():
    model = vtp.add_gates(make_vit(), sites=vtp.ALL_SITES)
    randomize(model)
    plan = vtp.plan(model, ratio=0.5, round_to=4)
    small = vtp.prune(model, plan)
    attn = small.blocks[0].attn
    kept = plan.kept["blocks.0.attn_qk"]
    # head 1's every QK gate is zero (the survey's gates), head 0's values all pruned
    expected = [sum(1 for i in kept if i // 16 == h) for h in attn.kept_heads.tolist()]
    assert list(attn.qk_widths) == expected and attn.qk_width == max(expected)
    assert all(w % 4 == 0 for w in expected) and 0 in expected
    # q and k keep only their slots: qkv emits qk_width rows per head for each, and V padded
    # to the block's attention width, the wider of those slots and the widest head's values
    width = max(attn.qk_width, max(attn.v_widths))
    assert attn.v_head_width == attn.attention_width == width < attn.head_dim
    assert attn.qkv.out_features == 2 * attn.num_heads * attn.qk_width + attn.num_heads * width
    assert attn.scale == model.blocks[0].attn.scale  # the model's own softmax scale


def test_values_pad_to_the_blocks_attention_width_or_to_head_dim(tmp_path):
    """"padded" pads V to each block's attention width; "padded_head_dim" (how files before
    format 3 were laid out) to head_dim: the same model either way, and a format-2 file
    of a model whose queries and keys were pruned still loads."""
    model = vtp.add_gates(make_vit(), sites=vtp.ALL_SITES)
    randomize(model)
    plan = vtp.plan(model, ratio=0.5, round_to=4)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    fitted, full = vtp.prune(model, plan), vtp.prune(model, plan, layout="padded_head_dim")
    narrowed = 0
    for a, b in zip(fitted.blocks, full.blocks):
        if isinstance(a.attn, PrunedAttention):
            assert b.attn.v_head_width == b.attn.head_dim and b.attn.v_layout == "padded"
            assert a.attn.v_head_width == max(a.attn.qk_width, max(a.attn.v_widths))
            narrowed += a.attn.v_head_width < a.attn.head_dim
    assert narrowed  # the plan narrows some block's attention, or the test shows nothing
    torch.testing.assert_close(fitted(x), full(x), rtol=1e-12, atol=1e-12)  # float64: rounding only
    path = vtp.save(full, tmp_path / "old")
    config = json.loads((path / "config.json").read_text())
    assert config["layout"] == "padded_head_dim" and config["version"] == 3
    config.update(version=2, layout="padded")  # what the format-2 writer wrote for this model
    (path / "config.json").write_text(json.dumps(config))
    loaded = vtp.load(path)
    assert torch.equal(loaded(x), full(x))
    assert vtp.read_config(path).layout == "padded_head_dim"


def test_qk_norm_keeps_rows_and_saves_in_the_product_only():
    model = vtp.add_gates(make_vit("qk_norm"), sites=vtp.ALL_SITES)
    randomize(model)
    small = vtp.prune(model, vtp.plan(model, ratio=0.5))
    attn = small.blocks[0].attn
    assert attn.qk_full_rows and attn.qk_pruned
    width = max(attn.qk_width, max(attn.v_widths))  # V padded to the block's attention width
    assert attn.qkv.out_features == 2 * attn.num_heads * attn.head_dim + attn.num_heads * width
    assert isinstance(attn.k_norm, torch.nn.LayerNorm)  # the gate is folded out of the norm
    # fine-tuning reaches the rows the norm reads, and the zero slots stay zero
    small.train()
    small(torch.randn(2, 3, 32, 32, dtype=torch.float64)).square().sum().backward()
    assert attn.qkv.weight.grad.abs().sum() > 0 and "qk_scale" in dict(attn.named_buffers())


def test_profile_counts_kept_and_executed_query_key_widths():
    model = vtp.add_gates(make_vit(), sites=("attn_qk",))
    randomize(model)
    small = vtp.prune(model, vtp.plan(model, ratio=0.5, round_to=1))
    tokens, dim = 17, 48
    macs = 16 * 48 * 3 * 8 * 8 + 48 * 5
    zeros = 0
    for block in small.blocks:
        attn = block.attn
        kept, slots = sum(attn.qk_widths), attn.num_heads * attn.qk_width
        macs += tokens * dim * (2 * kept + dim) + tokens * tokens * (kept + dim) + tokens * dim * dim
        # attention pads the q/k slots to the block's attention width (here head_dim: the
        # values keep every dim), so it executes 2 * heads * width per pair of tokens
        width = attn.attention_width
        assert width == max(attn.qk_width, max(attn.v_widths)) == 16
        zeros += tokens * dim * 2 * (slots - kept) + tokens * tokens * (2 * attn.num_heads * width - kept - dim)
        macs += tokens * 2 * dim * 96
    p = vtp.profile(small)
    assert p.macs == macs
    assert p.executed_macs == macs + zeros > macs


def test_planner_ranks_attn_qk_with_the_other_gates():
    model = vtp.add_gates(make_vit(), sites=vtp.ALL_SITES)
    randomize(model)
    dense = vtp.profile(model).macs
    plan = vtp.plan(model, flops_target=0.5, round_to=1)
    assert plan.rule["macs"] <= 0.5 * dense
    assert vtp.profile(vtp.prune(model, plan)).macs == plan.rule["macs"] == plan_macs(model, plan.kept, plan.head_dim)
    assert any(len(plan.kept[n]) < plan.sizes[n] for n in plan.kept if n.endswith("attn_qk"))
    layer = vtp.plan(model, ratio=0.25, scope="layer", round_to=1)
    for name in layer.kept:
        assert len(layer.kept[name]) == layer.sizes[name] - int(0.25 * layer.sizes[name])
    again = vtp.PruningPlan.from_json(plan.to_json())
    assert again == plan and "attn_qk" in plan.summary()
    stats = vtp.gate_stats(model)
    assert stats["blocks.0.attn_qk"]["size"] == 48
    assert vtp.gate_values(model).numel() == sum(g.numel() for g in vtp.gates(model).values())
    penalty = vtp.l1_penalty(model)
    penalty.backward()
    assert vtp.gates(model)["blocks.2.attn_qk"].grad.abs().sum() > 0
    gate_group = vtp.param_groups(model)[-1]
    assert any(p is vtp.gates(model)["blocks.0.attn_qk"] for p in gate_group["params"])
    assert gate_group["weight_decay"] == 0.0


def test_rope_pairs_round_to_whole_dims():
    model, _ = build(*FAMILIES["EVA-02: RoPE pairs (half), q/v biases"])
    vtp.add_gates(model, sites=vtp.ALL_SITES)
    randomize(model)
    plan = vtp.plan(model, ratio=0.5, round_to=8)
    small = vtp.prune(model, plan)
    for attn in pruned_attentions(small):
        assert all(w % 8 == 0 for w in attn.qk_widths), attn.qk_widths


@pytest.mark.parametrize("name", ["v2_gated", "v2_pruned"])
def test_files_saved_before_attn_qk_still_load(name):
    """Written by vtp at f2039ed (before attn_qk): a tiny float32 ViT, gated on the four
    sites (and pruned), with its outputs on a fixed input in the metadata."""
    config = vtp.read_config(DATA / name)
    assert config.gated_sites == vtp.SITES
    model = vtp.load(DATA / name)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    expected = torch.tensor(config.metadata["output"])
    # float32, the same arithmetic as when it was written: equal to a few ulps
    torch.testing.assert_close(model(x), expected, rtol=1e-6, atol=1e-6)
    raw = json.loads((DATA / name / "config.json").read_text())
    assert raw["version"] == 2


@pytest.mark.parametrize("qk_width", [0, 5, 8])
@pytest.mark.parametrize("v_padded", [False, True])
def test_packed_attention_takes_queries_and_keys_of_another_width(qk_width, v_padded):
    """The reference PrunedAttention calls: q, k [B, H, N, Dqk]; V's heads v_head_width wide
    (padded) or packed; the scale given, not 1/sqrt(Dqk)."""
    import vtp_kernels

    B, H, N, width, widths, scale = 2, 3, 7, 8, (3, 8, 0), 0.3
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(B, H, N, qk_width, dtype=torch.float64, generator=g) for _ in range(2))
    v_full = torch.randn(B, N, H, width, dtype=torch.float64, generator=g)
    bias = torch.randn(1, H, N, N, dtype=torch.float64, generator=g)
    scores = torch.einsum("bhnd,bhmd->bhnm", q, k) * scale + bias
    expected = torch.cat([(scores.softmax(-1) @ v_full[:, :, h, :w].unsqueeze(1).expand(B, H, N, w))[:, h]
                          for h, w in enumerate(widths)], dim=-1)
    if v_padded:
        v = v_full.reshape(B, N, H * width)
    else:
        v = torch.cat([v_full[:, :, h, :w] for h, w in enumerate(widths)], dim=-1)
    got = vtp_kernels.packed_attention(q, k, v, widths, scale, attn_bias=bias, v_padded=v_padded,
                                       v_head_width=width)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="v_head_width: expected an int >= 0"):
        vtp_kernels.packed_attention(q, k, v, widths, scale, v_padded=v_padded, v_head_width=-1)
    if v_padded:  # a padded V narrower than its widths
        with pytest.raises(ValueError, match="v_widths: a padded V holds at most 0 values per head"):
            vtp_kernels.packed_attention(q, k, v, widths, scale, v_padded=True, v_head_width=0)
