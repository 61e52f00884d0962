"""vtp.plan(latency_target=...): a plan meets its predicted target, its widths land where the
table says time drops, the best-scoring dims stay, bad input is refused before anything is
measured, and the plan records (and round-trips) its prediction. Tables here are synthetic
(known times) or one tiny real measurement; nothing asserts on this machine's speed."""
import math

import pytest
import torch
from timm.layers import SwiGLU
from timm.models.vision_transformer import VisionTransformer

import vtp
import vtp._latency as latency
from vtp.latency_model import BlockWidths, Curve, Grid2, LatencyTable, ShapeTable
from vit_variants import randomize_gates


def tiny_vit(**kw):
    args = dict(img_size=32, patch_size=8, embed_dim=64, depth=3, num_heads=2, mlp_ratio=2, num_classes=5)
    return VisionTransformer(**{**args, **kw}).eval()


def gated(seed=0, **kw):
    model = vtp.add_gates(tiny_vit(**kw))
    randomize_gates(model, seed=seed)
    return model


def synthetic_table(model, step_hidden=16, batch_size=8):
    """A table of ``model``'s block shape whose times are known: the hidden width costs
    ceil(w / step_hidden) steps in fc1, fc2 and the activation (a staircase: time drops only
    at multiples of step_hidden), everything else grows linearly with its width."""
    shape = latency.block_shapes(model)[0]
    E, H, D, M = shape.embed, shape.heads, shape.head_dim, shape.hidden
    line = lambda full: Curve(latency.width_grid(full), [0.1 + w / full for w in latency.width_grid(full)])
    stairs = Curve(latency.width_grid(M), [0.1 + math.ceil(w / step_hidden) for w in latency.width_grid(M)])
    curves = {n: line(f) for n, f in (("qkv_in", E), ("qkv_out", 3 * E), ("proj_in", H * D), ("fc1_in", E),
                                     ("v_gather", H * D), ("norm_gather", E))}
    heads = list(range(8, D + 1, 8))
    curves.update(fc1_out=stairs, fc2_in=stairs, act=stairs, attn_heads=Curve(list(range(1, H + 1)),
                                                                               [float(h) for h in range(1, H + 1)]),
                  attn_diag=Curve(heads, [w / 8 for w in heads]))
    product = lambda kind, xs, ys: Grid2(xs, ys, [[curves[f"{kind}_in"].at(k) * curves[f"{kind}_out"].at(n)
                                                   / curves[f"{kind}_in"].at(E) for n in ys] for k in xs])
    grids = {"qkv_2d": product("qkv", [16, 32], [48, 96]), "fc1_2d": product("fc1", [16, 32], [32, 64]),
             "attn": Grid2(heads, heads, [[a / 8 + b / 8 for b in heads] for a in heads])}
    t = ShapeTable(shape, curves, grids, {"norm": 0.5, "add": 0.1, "scale": 0.1})
    n = len(model.blocks)
    dense = BlockWidths.dense(shape)
    key = {"synthetic": True, "batch_size": batch_size, "device": "synthetic", "device_type": "cpu",
           "dtype": "float32", "threads": 1, "img_size": [32, 32]}
    return LatencyTable(key, {shape.name: t}, [shape.name] * n, 1.0, [{"widths": [dense.to_dict()] * n, "ms": 20.0}])


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """One real measurement of the tiny ViT (batch 1, one thread, two rounds)."""
    return vtp.latency_table(tiny_vit(), 1, threads=1, repeats=2, cache_dir=tmp_path_factory.mktemp("cache"))


def _pruned_prediction(model, plan, table):
    return table.predict(vtp.model_widths(vtp.prune(model, plan)))


@pytest.mark.parametrize("target", [0.9, 0.7, 0.5, 0.35])
def test_plan_meets_its_predicted_target(target):
    model = gated(seed=int(target * 100))
    table = synthetic_table(model)
    plan = vtp.plan(model, refine=0, latency_target=target, table=table)
    lat = plan.rule["latency"]
    dense = table.predict(table.dense_widths())
    assert lat["dense_ms"] == pytest.approx(dense)
    # the recorded prediction is that of the model vtp.prune builds, and it fits the target
    assert lat["predicted_ms"] == pytest.approx(_pruned_prediction(model, plan, table))
    assert lat["predicted_ms"] <= target * dense * (1 + 1e-9)
    assert lat["predicted_share"] == pytest.approx(lat["predicted_ms"] / dense)
    assert plan.rule["latency_target"] == target and "round_to" not in plan.rule
    # and it does not give away more than a step: the smallest step of this table is 0.1/8 of a
    # linear's time per 8 columns, the staircase's 1 ms per 16 hidden; the plan stays within one
    # staircase step (times the calibration slope) of the budget
    assert lat["predicted_ms"] >= target * dense - 1.0 * table.slope - 1e-9


def test_widths_land_on_the_table_grid_where_time_drops():
    model = gated(seed=3)
    table = synthetic_table(model, step_hidden=16)
    plan = vtp.plan(model, refine=0, latency_target=0.6, table=table)
    embed_grid = set(range(0, 65, 8))
    head_dim = plan.head_dim
    for i in range(3):
        assert plan.kept_count(i, "attn_in") in embed_grid and plan.kept_count(i, "mlp_in") in embed_grid
        # the hidden width's time drops only at multiples of 16: never a width between (round_to 8 would)
        assert plan.kept_count(i, "mlp_hidden") % 16 == 0
        assert all(w % 8 == 0 and w <= head_dim for w in plan.head_widths(i, 2))
    assert any(plan.kept_count(i, "mlp_hidden") < 128 for i in range(3))


def test_the_lowest_scores_go_first_and_a_worthless_branch_goes_whole():
    model = gated(seed=5)
    with torch.no_grad():  # block 1's hidden features are worth nothing
        vtp.gates(model)["blocks.1.mlp_hidden"].mul_(1e-6)
    table = synthetic_table(model)
    plan = vtp.plan(model, refine=0, latency_target=0.8, table=table)
    assert plan.kept_count(1, "mlp_hidden") < plan.kept_count(0, "mlp_hidden")
    for name, kept in plan.kept.items():  # within a gate (a head), the kept dims are its best-scoring ones
        scores = vtp.gates(model)[name].detach().abs()
        groups = [range(len(scores))] if not name.endswith("attn_out") else \
            [range(h * 32, (h + 1) * 32) for h in range(2)]
        for g in groups:
            inside = [i for i in g if i in set(kept)]
            dropped = [i for i in g if i not in set(kept)]
            if inside and dropped:
                assert min(scores[inside]) >= max(scores[dropped])


def test_plan_json_round_trip_keeps_the_latency_record(tmp_path):
    model = gated(seed=7)
    plan = vtp.plan(model, refine=0, latency_target=0.5, table=synthetic_table(model))
    plan.save(str(tmp_path / "plan.json"))
    back = vtp.PruningPlan.load(str(tmp_path / "plan.json"))
    assert back.kept == plan.kept and back.rule == plan.rule
    lat = back.rule["latency"]
    for field in ("predicted_ms", "dense_ms", "predicted_share", "batch_size", "device", "dtype", "threads",
                  "table_key", "table_file", "img_size", "block_ms"):
        assert field in lat
    assert lat["batch_size"] == 8 and lat["table_key"]["synthetic"] is True and len(lat["block_ms"]) == 3
    vtp.prune(model, back)  # still prunes


def reachable(table, share):
    """``share``, or more where this machine's measurement puts even a model of constant
    branches (the narrowest plan) above it: a target the plan can meet."""
    floor = table.predict([BlockWidths(0, (), (), (), 0, 0)] * len(table.blocks)) / table.dense_ms
    return min(1.0, max(share, floor + 0.05))


def test_a_measured_table_plan_fits_and_is_cached(measured, tmp_path, monkeypatch):
    model = gated(seed=9)
    target = reachable(measured, 0.6)
    plan = vtp.plan(model, refine=0, latency_target=target, batch_size=1, table=measured)
    lat = plan.rule["latency"]
    assert lat["predicted_ms"] <= target * measured.predict(measured.dense_widths()) * (1 + 1e-9)
    assert lat["predicted_ms"] == pytest.approx(_pruned_prediction(model, plan, measured))
    assert lat["batch_size"] == 1 and lat["threads"] == 1 and lat["device_type"] == "cpu"
    # without table=: measured on the model's device (here: from the cache the first call fills)
    monkeypatch.setenv("VTP_CACHE", str(tmp_path))
    calls = []
    monkeypatch.setattr(latency, "_measure", lambda m, key, *a: calls.append(key) or
                        LatencyTable.from_dict({**measured.to_dict(), "key": key}))
    first = vtp.plan(model, refine=0, latency_target=target, batch_size=1, threads=1)
    again = vtp.plan(model, refine=0, latency_target=target, batch_size=1, threads=1)
    assert len(calls) == 1 and first.kept == again.kept
    assert first.rule["latency"]["table_file"] == str(latency.cache_path(calls[0]))
    assert calls[0]["batch_size"] == 1 and calls[0]["device_type"] == "cpu"


@pytest.mark.parametrize("kwargs, flag", [
    ({"latency_target": 0.0}, "latency_target"), ({"latency_target": 1.5}, "latency_target"),
    ({"latency_target": -0.5}, "latency_target"), ({"latency_target": True}, "latency_target"),
    ({"latency_target": 0.5, "ratio": 0.4}, "ratio and latency_target"),
    ({"latency_target": 0.5, "flops_target": 0.5}, "flops_target and latency_target"),
    ({"latency_target": 0.5, "batch_size": 0}, "batch_size"), ({"latency_target": 0.5, "batch_size": 2.0}, "batch_size"),
    ({"latency_target": 0.5, "device": "cuda:7"}, "device"), ({"latency_target": 0.5, "device": "tpu"}, "device"),
    ({"latency_target": 0.5, "scope": "layer"}, "scope"),
])
def test_bad_input_is_a_value_error_naming_it_before_any_measurement(kwargs, flag, monkeypatch):
    if kwargs.get("device") == "cuda:7" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has 8 CUDA devices")
    monkeypatch.setattr(latency, "_measure", lambda *a: pytest.fail("measured before checking the arguments"))
    with pytest.raises(ValueError, match=flag):
        vtp.check_plan_args(**kwargs)
    with pytest.raises(ValueError, match=flag):
        vtp.plan(gated(), **kwargs)


def test_a_table_that_does_not_fit_the_call_is_refused():
    model = gated()
    table = synthetic_table(model, batch_size=4)
    with pytest.raises(ValueError, match="batch_size"):
        vtp.plan(model, refine=0, latency_target=0.5, table=table)  # planned for batch 8
    with pytest.raises(ValueError, match="dtype"):
        vtp.plan(model, refine=0, latency_target=0.5, batch_size=4, table=table, dtype="bfloat16")
    with pytest.raises(ValueError, match="table"):
        vtp.plan(gated(depth=2), refine=0, latency_target=0.5, batch_size=4, table=table)
    with pytest.raises(ValueError, match="table"):
        vtp.plan(model, refine=0, latency_target=0.5, table={"not": "a table"})


def test_an_unreachable_target_says_so():
    model = gated()
    with pytest.raises(ValueError, match="latency_target"):  # the fixed parts alone cost 1 of 20 ms
        vtp.plan(model, refine=0, latency_target=0.01, min_keep=64, table=synthetic_table(model))


def test_a_family_the_table_does_not_cover_is_its_type_error(monkeypatch):
    monkeypatch.setattr(latency, "_measure", lambda *a: pytest.fail("measured a model it does not cover"))
    with pytest.raises(TypeError, match=r"blocks\[0\]\.mlp"):
        vtp.plan(gated(mlp_layer=SwiGLU), latency_target=0.5, batch_size=1)
