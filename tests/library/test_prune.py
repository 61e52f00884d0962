"""Equivalence: in eval mode, prune(model, plan)(x) equals the gated model with pruned gates set to 0."""
import copy

import pytest
import torch

import vtp
from vtp._plan import plan_macs
from vit_variants import VARIANTS, make_vit, masked_copy_gates, randomize_gates


def _edge_case_plan(model, seed: int):
    """A random global plan, then edge cases forced in: a head with no value dim left, a head
    with one, a block whose attention branch is constant, one whose MLP is constant."""
    plan = vtp.plan(model, ratio=0.5)
    g = torch.Generator().manual_seed(seed)
    head_dim = plan.head_dim
    kept = dict(plan.kept)
    # block 0: drop head 0 entirely, keep a single value dim of head 1
    kept["blocks.0.attn_out"] = [i for i in kept["blocks.0.attn_out"] if i >= 2 * head_dim] + [head_dim + 3]
    # block 1: attention input fully pruned -> constant attention branch; MLP hidden fully pruned
    kept["blocks.1.attn_in"] = []
    kept["blocks.1.mlp_hidden"] = []
    # block 2: every value dim pruned -> constant; MLP input fully pruned -> constant
    kept["blocks.2.attn_out"] = []
    kept["blocks.2.mlp_in"] = []
    # random zeros elsewhere: drop a random extra share of block 0's MLP hidden dims
    hidden = torch.tensor(kept["blocks.0.mlp_hidden"])
    kept["blocks.0.mlp_hidden"] = hidden[torch.rand(len(hidden), generator=g) > 0.3].tolist()
    return vtp.PruningPlan(kept={k: sorted(v) for k, v in kept.items()}, sizes=plan.sizes, head_dim=head_dim)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("fold", [True, False])
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_pruned_equals_masked_gated_model(variant, fold, layout):
    model = vtp.add_gates(make_vit(variant))
    randomize_gates(model, seed=len(variant))
    plan = _edge_case_plan(model, seed=1)
    small = vtp.prune(model, plan, fold=fold, layout=layout)
    masked = copy.deepcopy(model)
    masked_copy_gates(masked, plan, fold=fold)
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    # float64 throughout: the two models differ only in summation order.
    torch.testing.assert_close(small(x), masked(x), rtol=1e-9, atol=1e-9)
    # the structure really shrank and the MACs are what the planner predicts
    assert isinstance(small.blocks[1].attn, vtp.ConstantBranch) and isinstance(small.blocks[2].mlp, vtp.ConstantBranch)
    assert small.blocks[0].attn.v_widths == (1,) + tuple(small.blocks[0].attn.v_widths[1:])
    assert small.blocks[0].attn.num_heads == 2
    assert not vtp.gates(small)
    assert vtp.profile(small).macs == plan_macs(model, plan.kept, plan.head_dim)
    assert vtp.profile(small).params == sum(p.numel() for p in small.parameters())


def test_pruned_model_trains_and_keeps_timm_api():
    model = vtp.add_gates(make_vit("deit", dtype=torch.float32))
    randomize_gates(model)
    small = vtp.prune(model, vtp.plan(model, ratio=0.4)).train()
    x = torch.randn(2, 3, 32, 32)
    small(x).logsumexp(-1).sum().backward()
    assert all(p.grad is not None for p in small.parameters() if p.requires_grad)
    feats = small.forward_features(x)
    assert feats.shape == (2, 1 + 16, 48)
    assert small.forward_head(feats).shape == (2, 5)


def test_unpruned_plan_is_identity():
    model = vtp.add_gates(make_vit())
    randomize_gates(model)
    small = vtp.prune(model, vtp.plan(model, ratio=0.0))
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    torch.testing.assert_close(small(x), model(x), rtol=1e-9, atol=1e-9)
    assert vtp.profile(small).macs == vtp.profile(model).macs


def test_prune_rejects_bad_input():
    model = vtp.add_gates(make_vit())
    plan = vtp.plan(model, ratio=0.3)
    with pytest.raises(TypeError, match="plan"):
        vtp.prune(model, {"kept": {}})
    other = vtp.add_gates(make_vit())
    other.blocks = other.blocks[:2]
    with pytest.raises(ValueError, match="another model"):
        vtp.prune(other, plan)
    small = vtp.prune(model, plan)
    with pytest.raises(ValueError, match="already pruned"):
        vtp.prune(small, plan)
    with pytest.raises(ValueError, match="add_gates"):
        vtp.prune(make_vit(), plan)
    from timm.models.vision_transformer import VisionTransformer
    dropout = vtp.add_gates(VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3,
                                              mlp_ratio=2.0, num_classes=5, attn_drop_rate=0.1).double())
    with pytest.raises(ValueError, match="attn_drop_rate"):
        vtp.prune(dropout, plan)


def test_subclass_that_save_cannot_describe_still_prunes(tmp_path):
    from timm.models.vision_transformer import VisionTransformer
    from vit_variants import BASE

    class CustomViT(VisionTransformer):
        pass

    model = vtp.add_gates(CustomViT(**BASE).double().eval())
    randomize_gates(model)
    plan = vtp.plan(model, ratio=0.5)
    small = vtp.prune(model, plan)
    masked = copy.deepcopy(model)
    masked_copy_gates(masked, plan)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    torch.testing.assert_close(small(x), masked(x), rtol=1e-9, atol=1e-9)
    with pytest.raises(TypeError, match="cannot be described"):
        vtp.save(small, tmp_path / "m")


def test_prune_on_the_meta_device_builds_the_same_structure():
    model = vtp.add_gates(make_vit())
    randomize_gates(model)
    plan = _edge_case_plan(model, seed=2)
    small = vtp.prune(model, plan)
    meta = vtp.prune(copy.deepcopy(model).to("meta"), plan)
    assert repr(meta) == repr(small)
    assert {k: v.shape for k, v in meta.state_dict().items()} == {k: v.shape for k, v in small.state_dict().items()}
    assert all(v.is_meta for v in meta.state_dict().values())
    with pytest.raises(ValueError, match="meta"):
        vtp.plan(copy.deepcopy(model).to("meta"), ratio=0.5)


@pytest.mark.parametrize("training", [True, False])
def test_every_module_of_the_pruned_model_keeps_the_training_mode(training):
    model = vtp.add_gates(make_vit()).train(training)
    randomize_gates(model)
    small = vtp.prune(model, _edge_case_plan(model, seed=3))
    assert {m.training for m in small.modules()} == {training}


def test_layout_is_saved_and_a_bad_one_is_named(tmp_path):
    import json

    model = vtp.add_gates(make_vit())
    randomize_gates(model)
    plan = vtp.plan(model, ratio=0.5)
    for layout in ("packed", "padded"):
        small = vtp.prune(model, plan, layout=layout)
        vtp.save(small, tmp_path / layout)
        assert json.loads((tmp_path / layout / "config.json").read_text())["layout"] == layout
        loaded = vtp.load(tmp_path / layout)
        assert loaded.blocks[0].attn.v_layout == layout
        x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
        assert torch.equal(loaded(x), small(x))
    with pytest.raises(ValueError, match="layout: expected one of packed, padded"):
        vtp.prune(model, plan, layout="sparse")
