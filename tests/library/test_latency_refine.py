"""vtp.plan(latency_target=..., refine=N): the table's plan timed whole and planned again.
The measurement is replaced by a script of known shares where the rule is checked (budget
scaling, the clamp, the choice); one real measurement of a tiny ViT checks what is recorded.
Nothing asserts on this machine's speed."""
import statistics

import pytest
import torch

import vtp
import vtp._latency_plan as latency_plan
from vtp._latency_measure import PlanTimer, paired_share, table_device
from vtp.latency_model import LatencyTable

from test_latency_plan import gated, reachable, synthetic_table, tiny_vit


class ScriptedTimer:
    """Measures plan i at ``shares[i]`` (the last one again past the end); remembers each
    plan it was given."""

    def __init__(self, shares):
        self.shares, self.kept, self.repeats = list(shares), [], []
        self.device = torch.device("cpu")

    def __call__(self, kept, sizes, head_dim, repeats):
        share = self.shares[min(len(self.kept), len(self.shares) - 1)]
        self.kept.append(kept)
        self.repeats.append(repeats)
        return {"share": {"median": share, "q1": share * 0.99, "q3": share * 1.01},
                "samples_ms": {"dense": [10.0] * repeats, "pruned": [10.0 * share] * repeats}}


@pytest.fixture
def scripted(monkeypatch):
    """Plans against the synthetic table with the measurement scripted: ``run(target, shares
    as multiples of the target, **plan kwargs)`` -> (plan, timer)."""
    def run(target, multiples, model=None, **kwargs):
        model = model if model is not None else gated(seed=11)
        timer = ScriptedTimer([m * target for m in multiples])
        monkeypatch.setattr(latency_plan, "table_device", lambda *a: torch.device("cpu"))
        monkeypatch.setattr(latency_plan, "PlanTimer", lambda *a: timer)
        plan = vtp.plan(model, latency_target=target, table=synthetic_table(model), **kwargs)
        return plan, timer
    return run


def test_refine_0_is_the_table_plan_and_times_nothing(monkeypatch):
    model = gated(seed=11)
    monkeypatch.setattr(latency_plan, "PlanTimer", lambda *a: pytest.fail("timed a plan with refine=0"))
    plan = vtp.plan(model, latency_target=0.6, table=synthetic_table(model), refine=0)
    lat = plan.rule["latency"]
    assert lat["refine"] == 0 and "measured_share" not in lat and "rounds" not in lat
    assert lat["predicted_ms"] <= 0.6 * lat["dense_ms"] * (1 + 1e-9)


def test_a_hit_on_the_first_measurement_keeps_the_table_plan(scripted):
    model = gated(seed=11)
    table_plan = vtp.plan(model, latency_target=0.6, table=synthetic_table(model), refine=0)
    plan, timer = scripted(0.6, [1.01], model=model)  # within the 2 % tolerance: no second plan
    lat = plan.rule["latency"]
    assert plan.kept == table_plan.kept and len(timer.kept) == 1 and timer.repeats == [7]
    assert lat["refine"] == 1 and lat["chosen_round"] == 0 and len(lat["rounds"]) == 1
    assert lat["measured_share"] == pytest.approx(0.606) and lat["measured_iqr"] == pytest.approx([0.606 * 0.99,
                                                                                                   0.606 * 1.01])
    assert lat["predicted_share"] == table_plan.rule["latency"]["predicted_share"]
    (r,) = lat["rounds"]
    assert r["budget_share"] == 0.6 and r["predicted_share"] == lat["predicted_share"]
    assert r["samples_ms"]["pruned"] == [6.06] * 7


def test_a_slow_plan_is_planned_again_for_the_budget_scaled_by_target_over_measured(scripted):
    plan, timer = scripted(0.6, [1.1, 1.0], refine_repeats=3)
    lat = plan.rule["latency"]
    first, second = lat["rounds"]
    assert first["budget_share"] == 0.6 and second["budget_share"] == pytest.approx(0.6 / 1.1)
    assert second["predicted_share"] <= second["budget_share"] * (1 + 1e-9) < first["predicted_share"]
    # the second plan hits (1.0 x target): it is the one kept, and its prediction is recorded
    assert lat["chosen_round"] == 1 and plan.kept == timer.kept[1] and lat["measured_share"] == pytest.approx(0.6)
    assert lat["predicted_share"] == second["predicted_share"] and timer.repeats == [3, 3]


@pytest.mark.parametrize("multiple, factor", [(2.0, 0.8), (0.5, 1.25), (1.1, 1 / 1.1), (0.9, 1 / 0.9)])
def test_one_round_scales_the_budget_by_at_most_the_clamp(scripted, multiple, factor):
    plan, _ = scripted(0.6, [multiple, 1.0])
    assert plan.rule["latency"]["rounds"][1]["budget_share"] == pytest.approx(0.6 * factor)


def test_the_budget_never_passes_the_dense_model(scripted):
    plan, _ = scripted(0.9, [0.5, 1.0])  # 0.9 x 1.25 would ask for more than the dense model
    assert plan.rule["latency"]["rounds"][1]["budget_share"] == 1.0


def test_rounds_stop_at_refine_or_at_a_hit(scripted):
    plan, timer = scripted(0.6, [1.1, 1.08, 1.05, 1.03], refine=2)
    assert len(timer.kept) == 3 and len(plan.rule["latency"]["rounds"]) == 3
    plan, timer = scripted(0.6, [1.1, 0.99, 1.2], refine=5)
    assert len(timer.kept) == 2


@pytest.mark.parametrize("multiples, refine, chosen", [
    ([1.05, 0.95, 1.01], 3, 2),   # of those at most 2 % over the target, the closest
    ([1.05, 0.97, 1.015], 3, 2),  # a plan 1.5 % over is closer than one 3 % under
    ([0.97, 1.05], 1, 0),         # the faster first plan, not the closer-looking slow one
    ([1.03, 0.9], 1, 1),          # 3 % over is past the tolerance: the plan under the target
    ([1.10, 1.06], 1, 1),         # all too slow: the fastest
    ([1.06, 1.10], 1, 0),
])
def test_the_plan_kept_is_closest_to_the_target_from_below(scripted, multiples, refine, chosen):
    plan, timer = scripted(0.6, multiples, refine=refine)
    lat = plan.rule["latency"]
    assert lat["chosen_round"] == chosen and plan.kept == timer.kept[chosen]
    assert lat["measured_share"] == pytest.approx(0.6 * multiples[chosen])
    assert lat["predicted_share"] == lat["rounds"][chosen]["predicted_share"]


def test_a_scaled_budget_out_of_reach_ends_the_rounds(scripted):
    model = gated(seed=11)
    table = synthetic_table(model)
    floor = reachable(table, 0.0) - 0.05  # the narrowest plan's share: constant branches only
    target = floor / 0.85  # reachable, but 0.8 x it is not
    plan, timer = scripted(target, [2.0, 1.0], model=model, refine=3)
    lat = plan.rule["latency"]
    assert len(timer.kept) == 1 and lat["rounds"][1]["unreachable"] is True
    assert lat["rounds"][1]["budget_share"] == pytest.approx(0.8 * target)
    assert lat["chosen_round"] == 0 and plan.kept == timer.kept[0]


@pytest.mark.parametrize("kwargs, flag", [
    ({"latency_target": 0.5, "refine": -1}, "refine"), ({"latency_target": 0.5, "refine": 1.0}, "refine"),
    ({"latency_target": 0.5, "refine": True}, "refine"),
    ({"latency_target": 0.5, "refine_repeats": 0}, "refine_repeats"),
    ({"latency_target": 0.5, "refine_repeats": 2.5}, "refine_repeats"),
    ({"ratio": 0.4, "refine": 1}, "refine: .* not with ratio"),
    ({"flops_target": 0.5, "refine_repeats": 3}, "refine_repeats: .* not with flops_target"),
])
def test_bad_refine_arguments_are_value_errors_naming_them(kwargs, flag, monkeypatch):
    monkeypatch.setattr(latency_plan, "PlanTimer", lambda *a: pytest.fail("timed before checking the arguments"))
    with pytest.raises(ValueError, match=flag):
        vtp.check_plan_args(**kwargs)
    with pytest.raises(ValueError, match=flag):
        vtp.plan(gated(), **kwargs)


def test_refine_needs_the_table_device_here():
    model = gated()
    table = synthetic_table(model)  # measured on a 'synthetic' CPU: not this machine's
    with pytest.raises(ValueError, match=r"table: measured on cpu \(synthetic\).*refine=0"):
        vtp.plan(model, latency_target=0.5, table=table)
    if not torch.cuda.is_available():
        gpu = LatencyTable.from_dict({**table.to_dict(), "key": {**table.key, "device_type": "cuda",
                                                                 "device": "NVIDIA H100"}})
        with pytest.raises(ValueError, match=r"table: measured on cuda .*no CUDA device.*refine=0"):
            vtp.plan(model, latency_target=0.5, table=gpu)
    vtp.plan(model, latency_target=0.5, table=table, refine=0)  # the table alone needs no device


def test_paired_share_is_the_median_of_per_round_ratios():
    s = paired_share([5.0, 6.0, 9.0, 4.0], [10.0, 10.0, 10.0, 5.0])
    assert s["median"] == pytest.approx(statistics.median([0.5, 0.6, 0.9, 0.8]))
    assert s["q1"] <= s["median"] <= s["q3"] and s["q1"] >= 0.5 and s["q3"] <= 0.9
    assert paired_share([3.0], [6.0]) == {"median": 0.5, "q1": 0.5, "q3": 0.5}
    with pytest.raises(ValueError, match="paired_share"):
        paired_share([1.0], [1.0, 2.0])


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    return vtp.latency_table(tiny_vit(), 1, threads=1, repeats=2, cache_dir=tmp_path_factory.mktemp("cache"))


def test_a_real_refine_records_paired_measurements_of_the_plan_it_keeps(measured):
    model = gated(seed=13)
    target = reachable(measured, 0.7)
    threads = torch.get_num_threads()
    plan = vtp.plan(model, latency_target=target, batch_size=1, table=measured, refine=1, refine_repeats=3)
    assert torch.get_num_threads() == threads  # the table's thread count only while timing
    lat = plan.rule["latency"]
    assert lat["refine"] == 1 and lat["refine_repeats"] == 3 and lat["measured_on"] == "cpu"
    assert 1 <= len(lat["rounds"]) <= 2 and lat["rounds"][0]["budget_share"] == target
    assert lat["rounds"][0]["predicted_share"] <= target * (1 + 1e-9)  # the table's plan fits its prediction
    for r in lat["rounds"]:
        if r.get("unreachable"):
            continue
        dense, pruned = r["samples_ms"]["dense"], r["samples_ms"]["pruned"]
        assert len(dense) == len(pruned) == 3 and min(dense + pruned) > 0
        assert r["measured_share"] == pytest.approx(statistics.median(p / d for p, d in zip(pruned, dense)))
        assert r["measured_iqr"][0] <= r["measured_share"] <= r["measured_iqr"][1]
    chosen = lat["rounds"][lat["chosen_round"]]
    assert lat["measured_share"] == chosen["measured_share"] and lat["predicted_share"] == chosen["predicted_share"]
    # the recorded prediction is that of the model vtp.prune builds from the plan kept
    assert lat["predicted_ms"] == pytest.approx(measured.predict(vtp.model_widths(vtp.prune(model, plan))))


def test_plan_timer_times_the_plan_structure_on_the_table_device(measured):
    model = gated(seed=13)
    timer = PlanTimer(model, measured, (32, 32))
    assert timer.device == table_device(measured, model) == torch.device("cpu") and timer.threads == 1
    assert timer.images.shape == (1, 3, 32, 32) and not vtp.gates(timer.dense)
    plan = vtp.plan(model, latency_target=reachable(measured, 0.7), batch_size=1, table=measured, refine=0)
    out = timer(plan.kept, plan.sizes, plan.head_dim, 2)
    assert len(out["samples_ms"]["dense"]) == len(out["samples_ms"]["pruned"]) == 2
    assert out["share"]["median"] > 0
