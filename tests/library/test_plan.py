import json
import math

import pytest
import torch

import vtp
from vtp._plan import plan_macs
from vit_variants import make_vit, randomize_gates


@pytest.fixture
def model():
    m = vtp.add_gates(make_vit())
    randomize_gates(m)
    return m


def _scores(model):
    return {n: g.detach().abs() for n, g in vtp.gates(model).items()}


def test_global_ratio_removes_the_lowest_scores(model):
    plan = vtp.plan(model, ratio=0.4, round_to=1)  # the paper's rule, counts unrounded
    total = sum(g.numel() for g in vtp.gates(model).values())
    assert plan.total == total and total - plan.num_kept == math.floor(0.4 * total)
    scores = _scores(model)
    kept = torch.cat([scores[n][plan.kept[n]] for n in scores])
    removed = torch.cat([scores[n][[i for i in range(len(scores[n])) if i not in set(plan.kept[n])]]
                         for n in scores])
    assert kept.min() >= removed.max()
    assert plan.rule["threshold"] == pytest.approx(removed.max().item())


def test_layer_scope_removes_the_same_share_everywhere(model):
    plan = vtp.plan(model, ratio=0.25, scope="layer", round_to=1)
    scores = _scores(model)
    for name, size in plan.sizes.items():
        assert len(plan.kept[name]) == size - math.floor(0.25 * size)
        dropped = sorted(set(range(size)) - set(plan.kept[name]))
        if dropped:
            assert scores[name][plan.kept[name]].min() >= scores[name][dropped].max()


def test_round_to_and_min_keep(model):
    with torch.no_grad():
        vtp.gates(model)["blocks.0.mlp_in"].mul_(1e-6)  # this gate would vanish entirely
    plan = vtp.plan(model, ratio=0.6, round_to=8, min_keep=16)
    for name, idx in plan.kept.items():
        n = len(idx)
        assert n >= 16 and (n % 8 == 0 or n == plan.sizes[name])
        if name.endswith("attn_out"):  # rounded head by head
            widths = [sum(1 for i in idx if i // plan.head_dim == h) for h in range(3)]
            assert all(w % 8 == 0 for w in widths), widths
    plan = vtp.plan(model, ratio=0.6, round_to=8)
    for name in plan.kept:
        if name.endswith("attn_out"):
            assert all(w % 8 == 0 for w in plan.head_widths(int(name.split(".")[1]), 3)), name
    plan0 = vtp.plan(model, ratio=0.6)
    assert plan0.kept["blocks.0.mlp_in"] == []


def test_flops_target_fits_budget_with_fewest_removals(model):
    dense = vtp.profile(model).macs
    plan = vtp.plan(model, flops_target=0.5, round_to=1)  # one more dim is then one more dim
    macs = plan_macs(model, plan.kept, plan.head_dim)
    assert macs <= 0.5 * dense and plan.rule["macs"] == macs
    assert vtp.profile(vtp.prune(model, plan)).macs == macs
    # keeping one more dim (the best removed one) would break the budget
    scores = _scores(model)
    best = max(((scores[n][i].item(), n, i) for n in scores for i in range(plan.sizes[n])
                if i not in set(plan.kept[n])))
    bigger = {k: sorted(v + [best[2]]) if k == best[1] else v for k, v in plan.kept.items()}
    assert plan_macs(model, bigger, plan.head_dim) > 0.5 * dense


def test_json_round_trip(model, tmp_path):
    plan = vtp.plan(model, ratio=0.3, round_to=4)
    again = vtp.PruningPlan.from_json(plan.to_json())
    assert again == plan
    path = tmp_path / "plan.json"
    plan.save(str(path))
    assert vtp.PruningPlan.load(str(path)) == plan
    assert json.loads(path.read_text())["format"] == "vtp-plan"
    assert "kept" in plan.summary() and "blocks" not in plan.summary().splitlines()[0]


@pytest.mark.parametrize("kwargs, match", [
    (dict(ratio=1.0), "ratio"),
    (dict(ratio=-0.1), "ratio"),
    (dict(ratio="0.4"), "ratio"),
    (dict(), "exactly one"),
    (dict(ratio=0.4, flops_target=0.5), "exactly one"),
    (dict(flops_target=0.0), "flops_target"),
    (dict(flops_target=1e-4), "out of reach"),
    (dict(ratio=0.4, scope="block"), "scope"),
    (dict(ratio=0.4, round_to=0), "round_to"),
    (dict(ratio=0.4, min_keep=-1), "min_keep"),
])
def test_bad_arguments_are_named(model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        vtp.plan(model, **kwargs)
    if match != "out of reach":  # the one rule that needs the model
        with pytest.raises(ValueError, match=match):
            vtp.check_plan_args(**kwargs)


def test_check_plan_args_accepts_what_plan_accepts():
    vtp.check_plan_args(0.4)
    vtp.check_plan_args(0.0, scope="layer", round_to=1, min_keep=2)
    vtp.check_plan_args(flops_target=1.0)
    with pytest.raises(ValueError, match=r"^scope: flops_target"):
        vtp.check_plan_args(flops_target=0.5, scope="layer")


def test_plan_needs_gates_and_valid_json():
    with pytest.raises(ValueError, match="add_gates"):
        vtp.plan(make_vit(), ratio=0.4)
    with pytest.raises(ValueError, match="JSON"):
        vtp.PruningPlan.from_json("{not json")
    with pytest.raises(ValueError, match="format"):
        vtp.PruningPlan.from_json('{"kept": {}}')
    with pytest.raises(ValueError, match="sorted unique"):
        vtp.PruningPlan(kept={"blocks.0.attn_in": [3, 1]}, sizes={"blocks.0.attn_in": 8}, head_dim=4)
    with pytest.raises(ValueError, match="sorted unique"):
        vtp.PruningPlan(kept={"blocks.0.attn_in": [9]}, sizes={"blocks.0.attn_in": 8}, head_dim=4)


@pytest.mark.parametrize("edit", [
    lambda d: d["kept"]["blocks.0.attn_in"].__setitem__(0, 1.5),
    lambda d: d["kept"]["blocks.0.attn_in"].__setitem__(0, "0"),
    lambda d: d["kept"].__setitem__("blocks.0.attn_in", "12"),
    lambda d: d["kept"].__setitem__("blocks.0.attn_in", [True]),
    lambda d: d["sizes"].__setitem__("blocks.0.attn_in", 48.5),
    lambda d: d.__setitem__("head_dim", "16"),
    lambda d: d.__setitem__("head_dim", 0),
])
def test_hand_edited_plan_with_non_integers_is_refused_not_rounded(model, edit):
    data = vtp.plan(model, ratio=0.4).to_dict()
    edit(data)
    with pytest.raises(ValueError, match="integers|>= 1"):
        vtp.PruningPlan.from_json(json.dumps(data))


def test_non_finite_gates_are_refused(model):
    with torch.no_grad():
        vtp.gates(model)["blocks.1.mlp_in"][3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        vtp.plan(model, ratio=0.4)


def test_custom_scores_rank_like_gates(model):
    """scores= ranks by other criteria with the same rules: passing |gate| itself gives the
    gate plan, and negated scores keep the dims the gates would remove."""
    found = vtp.gates(model)
    same = vtp.plan(model, ratio=0.4, scores={n: g.detach().abs() for n, g in found.items()})
    assert same.kept == vtp.plan(model, ratio=0.4).kept
    flipped = vtp.plan(model, ratio=0.5, scope="layer", round_to=1,
                       scores={n: -g.detach().abs() for n, g in found.items()})
    reference = vtp.plan(model, ratio=0.5, scope="layer", round_to=1)
    for name, kept in reference.kept.items():
        assert not set(kept) & set(flipped.kept[name])
    with pytest.raises(ValueError, match="scores: expected one tensor per gate"):
        vtp.plan(model, ratio=0.4, scores={"blocks.0.attn_in": torch.ones(3)})
    bad = {n: g.detach().abs() for n, g in found.items()}
    name = next(iter(bad))
    bad[name] = bad[name][:-1]
    with pytest.raises(ValueError, match=r"scores\['blocks.0.attn_in'\]: expected"):
        vtp.plan(model, ratio=0.4, scores=bad)
