"""The analytic MAC count (vtp/_macs.py) against the profile of the pruned model, across the
families VTP prunes: it is what the FLOPs planner budgets with, so it must be exact."""

import pytest
import timm

import vtp
import vtp._macs as macs_module
import vtp._plan as plan_module
from vtp._macs import MacCounter
from vtp.pruning_plan import PruningPlan
from vit_variants import make_vit
from scripts import load_script

coverage = load_script("benchmarks/timm_coverage.py")

SMALL = dict(depth=2, embed_dim=48, num_heads=3, num_classes=5)

# name -> (timm architecture or a vit_variants name, overrides, pixels per token)
FAMILIES = {
    "plain ViT": ("deit", None, 8),
    "qk-norm ViT": ("qk_norm", None, 8),
    "registers": ("registers", None, 8),
    "EVA-02: RoPE, SwiGLU, q/v biases": ("eva02_small_patch14_224", {}, 14),
    "EVA-02 SwiGLU with a hidden norm": ("eva02_base_patch14_224", {}, 14),
    "EVA-02 CLIP: attention output norm": ("eva02_base_patch16_clip_224", {}, 16),
    "RoPE ViT, separate q/k/v": ("vit_small_patch16_rope_224", dict(qkv_fused=False), 16),
    "BEiT: position bias table": ("beit_base_patch16_224", {}, 16),
    "relative-position MLP bias": ("vit_relpos_small_patch16_224", {}, 16),
    "post-norm relative position": ("vit_relpos_medium_patch16_rpn_224", {}, 16),
    "post-norm ViT": ("vit_base_patch16_rpn_224", {}, 16),
    "SAM: windows, decomposed bias": ("samvit_base_patch16", dict(window_size=2), 16),
    "NaFlex ViT, gated attention": ("naflexvit_base_patch16_gap", dict(attn_gated=True), 16),
    "parallel branches": ("vit_small_patch16_18x2_224", {}, 16),
    "fused parallel block": ("vit_base_patch16_xp_224", {}, 16),
    "fused parallel block with q/k norms": ("vit_base_patch16_xp_224", dict(qk_norm=True), 16),
    "DINOv3 SwiGLU": ("vit_small_plus_patch16_dinov3", {}, 16),
}


def build(arch, overrides, stride, sites):
    if overrides is None:
        model = make_vit(arch)
    else:
        model = timm.create_model(arch, pretrained=False, img_size=4 * stride, **{**SMALL, **overrides})
        model = coverage.perturb(model.double().eval())
    vtp.add_gates(model, sites)
    coverage.randomize(model)
    return model


def _profiled(model, kept, head_dim):
    plan = PruningPlan(kept=kept, sizes={n: g.numel() for n, g in vtp.gates(model).items()}, head_dim=head_dim)
    return vtp.profile(vtp.prune(model, plan)).macs


def _variants(plan):
    """The plan; one with a whole head and a whole branch of each kind gone; one with every
    attention and MLP input of the last block gone."""
    kept = {n: list(v) for n, v in plan.kept.items()}
    yield "plan", kept
    gone = dict(kept)
    for name in gone:
        if name.startswith("blocks.0.") and name.endswith("attn_out"):
            gone[name] = [i for i in gone[name] if i >= plan.head_dim]  # head 0 goes
        if name.startswith("blocks.0.") and name.endswith("mlp_hidden"):
            gone[name] = []
        if name.startswith("blocks.1.") and name.endswith("attn_out"):
            gone[name] = []
        if name.startswith("blocks.1.") and name.endswith("attn_qk"):
            gone[name] = gone[name][: len(gone[name]) // 3]
    yield "heads and branches gone", gone
    last = max(int(n.split(".")[1]) for n in kept)
    inputs = {n: ([] if n.startswith(f"blocks.{last}.") and n.endswith(("attn_in", "mlp_in")) else v)
              for n, v in kept.items()}
    yield "inputs gone", inputs


@pytest.mark.parametrize("sites", ["paper", "qk"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_analytic_macs_equal_the_profile_of_the_pruned_model(family, sites):
    arch, overrides, stride = FAMILIES[family]
    model = build(arch, overrides, stride, vtp.SITES if sites == "paper" else vtp.ALL_SITES)
    counter = MacCounter(model)
    assert counter({}) == vtp.profile(model).macs
    for round_to in (1, 8):
        plan = vtp.plan(model, ratio=0.5, round_to=round_to)
        for what, kept in _variants(plan):
            assert counter(kept) == _profiled(model, kept, plan.head_dim), (what, round_to)


def test_analytic_macs_at_another_image_size():
    model = build("vit_small_patch16_224", dict(dynamic_img_size=True), 16, vtp.ALL_SITES)
    plan = vtp.plan(model, ratio=0.4)
    small = vtp.prune(model, plan)
    assert MacCounter(model, 96)(plan.kept) == vtp.profile(small, 96).macs != vtp.profile(small).macs
    assert vtp.plan(model, flops_target=0.5, img_size=96).rule["macs"] == \
        vtp.profile(vtp.prune(model, vtp.plan(model, flops_target=0.5, img_size=96)), 96).macs


def test_flops_planner_prunes_no_model(monkeypatch):
    """The planner's cost is structural: it counts candidates, it does not prune them."""
    model = build("eva02_small_patch14_224", {}, 14, vtp.ALL_SITES)
    calls = []
    real = plan_module.MacCounter
    for module in (plan_module, macs_module):
        monkeypatch.setattr(module, "prune", lambda *a, **k: calls.append("prune"), raising=False)
    monkeypatch.setattr(plan_module, "MacCounter", lambda *a, **k: calls.append("counter") or real(*a, **k))
    plan = vtp.plan(model, flops_target=0.5)
    assert calls == ["counter"]
    assert vtp.profile(vtp.prune(model, plan)).macs == plan.rule["macs"] <= 0.5 * plan.rule["dense_macs"]
