"""The latency table: measured structure, cache key and re-measure rules, lookups, prediction,
the structure read from models, pictures and bad input. Timing tests assert on structure,
never on this machine's speed."""
import copy
import json
import math
import statistics

import pytest
import torch
from timm.layers import SwiGLU
from timm.models.vision_transformer import VisionTransformer

import vtp
import vtp._latency as latency
from vtp.latency_model import BlockShape, BlockWidths, Curve, Grid2, LatencyTable, ShapeTable
from vit_variants import randomize_gates


def tiny_vit(**kw):
    args = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, mlp_ratio=4, num_classes=5)
    return VisionTransformer(**{**args, **kw}).eval()


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """One real measurement of a tiny ViT (batch 1, one thread, two rounds)."""
    return vtp.latency_table(tiny_vit(), 1, threads=1, repeats=2, cache_dir=tmp_path_factory.mktemp("cache"))


@pytest.fixture
def counting(monkeypatch, measured):
    """latency._measure replaced by a counter that hands back the measured table under the
    key asked for: the cache rules are about when measuring happens, not what it finds."""
    calls = []

    def fake(model, key, *args):
        calls.append(key)
        return LatencyTable.from_dict({**measured.to_dict(), "key": key})
    monkeypatch.setattr(latency, "_measure", fake)
    return calls


# ---------------------------------------------------------------------------------------------
# What is measured


def test_table_measures_each_shape_once_on_grids_that_show_the_steps(measured):
    shape = BlockShape(embed=64, heads=2, head_dim=32, hidden=256, tokens=17, act=repr(torch.nn.GELU()))
    assert measured.blocks == [shape.name, shape.name] and list(measured.shapes) == [shape.name]
    t = measured.shapes[shape.name]
    for name, full in (("qkv_in", 64), ("qkv_out", 192), ("proj_in", 64), ("fc1_in", 64), ("fc1_out", 256),
                       ("fc2_in", 256)):
        widths = t.curves[name].widths
        assert widths[-1] == full and set(range(8, full + 1, 8)) <= set(widths)  # every 8 up to the full width
        assert any(w % 8 for w in widths[1:])  # and odd widths that show the penalty
    assert t.curves["attn_heads"].widths == [1, 2] and t.curves["attn_diag"].widths == [8, 16, 24, 32]
    assert t.grids["attn"].xs == [8, 16, 24, 32] and t.grids["attn"].ys == [8, 16, 24, 32]
    m = measured.measured
    assert m["repeats"] == 2 and len(m["fixed_samples_ms"]) == 2 and m["probes"] > 100
    assert [len(c["samples"]) for c in measured.calibration] == [2] * (1 + len(latency.CALIBRATION_SHARES))
    assert measured.calibration[0]["widths"] == [w.to_dict() for w in measured.dense_widths()]
    assert measured.dense_ms == pytest.approx(sorted(measured.calibration[0]["samples"])[0] / 2
                                              + sorted(measured.calibration[0]["samples"])[1] / 2)


def test_width_grid_every_step_then_coarser_with_odd_widths():
    g = latency.width_grid(3072)
    assert g[0] == 1 and g[-1] == 3072 and g == sorted(set(g))
    assert set(range(8, 257, 8)) <= set(g)
    assert {63, 60, 1535, 3071, 3068} <= set(g)
    gaps = [b - a for a, b in zip(g, g[1:]) if a % 8 == 0 and b % 8 == 0]
    assert max(gaps) == 32 and len(g) < 3072 // 8  # the far range is coarser


# ---------------------------------------------------------------------------------------------
# Cache


def test_cache_key_names_the_file_and_a_hit_does_not_measure(counting, tmp_path):
    model = tiny_vit()
    table = vtp.latency_table(model, 1, threads=1, cache_dir=tmp_path)
    assert len(counting) == 1
    key = counting[0]
    assert {"device", "torch", "dtype", "batch_size", "threads", "img_size", "blocks", "format"} <= set(key)
    assert key["batch_size"] == 1 and key["threads"] == 1 and key["torch"] == torch.__version__
    path = latency.cache_path(key, tmp_path)
    assert path.parent == tmp_path and path.name.startswith("latency-") and list(tmp_path.iterdir()) == [path]
    assert json.loads(path.read_text())["key"] == key  # the key is also stored inside
    again = vtp.latency_table(model, 1, threads=1, cache_dir=tmp_path)
    assert len(counting) == 1 and again.to_dict() == table.to_dict()
    # a pruned model shares its dense model's table
    gated = vtp.add_gates(copy.deepcopy(model))
    randomize_gates(gated)
    vtp.latency_table(vtp.prune(gated, vtp.plan(gated, ratio=0.5)), 1, threads=1, cache_dir=tmp_path)
    assert len(counting) == 1


@pytest.mark.parametrize("change", [{"batch_size": 2}, {"threads": 2}, {"dtype": "bfloat16"}, {"img_size": 48}])
def test_another_key_measures_into_another_file(counting, tmp_path, change):
    model = tiny_vit(dynamic_img_size=True)
    vtp.latency_table(model, 1, threads=1, cache_dir=tmp_path)
    args = {"batch_size": 1, "threads": 1, **change}
    vtp.latency_table(model, args.pop("batch_size"), cache_dir=tmp_path, **args)
    assert len(counting) == 2 and counting[0] != counting[1] and len(list(tmp_path.iterdir())) == 2


def _damage_each_way(path):
    good = path.read_text()
    d = json.loads(good)
    yield "truncated", good[: len(good) // 2]
    yield "not json", "\x00\x01garbage"
    yield "old format", json.dumps({**d, "format": 0})
    yield "other key", json.dumps({**d, "key": {**d["key"], "batch_size": 99}})
    yield "no shapes", json.dumps({k: v for k, v in d.items() if k != "shapes"})
    shape = next(iter(d["shapes"]))
    bad = copy.deepcopy(d)
    bad["shapes"][shape]["curves"]["fc1_out"]["ms"][3] = -1.0
    yield "negative time", json.dumps(bad)
    bad = copy.deepcopy(d)
    bad["shapes"][shape]["curves"]["qkv_in"]["widths"].reverse()
    yield "unsorted widths", json.dumps(bad)
    bad = copy.deepcopy(d)
    del bad["shapes"][shape]["grids"]["attn"]
    yield "missing grid", json.dumps(bad)
    bad = copy.deepcopy(d)
    bad["calibration"][0]["widths"][0]["mlp_hidden"] = 8
    yield "calibration not dense", json.dumps(bad)
    yield "wrong type", json.dumps({**d, "fixed_ms": "fast"})


def test_stale_or_damaged_cache_is_measured_again_never_trusted(counting, tmp_path):
    model = tiny_vit()
    vtp.latency_table(model, 1, threads=1, cache_dir=tmp_path)
    path = latency.cache_path(counting[0], tmp_path)
    good = path.read_text()
    for n, (why, text) in enumerate(_damage_each_way(path), start=2):
        path.write_text(text)
        with pytest.warns(UserWarning, match="stale or damaged"):
            table = vtp.latency_table(model, 1, threads=1, cache_dir=tmp_path)
        assert len(counting) == n, why
        assert json.loads(path.read_text()) == json.loads(good), why  # rewritten whole
        assert table.key == counting[0]


def test_cache_dir_from_environment_and_cache_false(counting, tmp_path, monkeypatch):
    monkeypatch.setenv("VTP_CACHE", str(tmp_path / "env"))
    model = tiny_vit()
    vtp.latency_table(model, 1, threads=1)
    assert len(list((tmp_path / "env").iterdir())) == 1
    vtp.latency_table(model, 1, threads=1, cache=False)
    assert len(counting) == 2 and len(list((tmp_path / "env").iterdir())) == 1


# ---------------------------------------------------------------------------------------------
# Lookups and prediction


def test_lookups_are_monotone_over_aligned_widths_and_the_staircase_never_rises(measured):
    for t in measured.shapes.values():
        for name, c in t.curves.items():
            full = c.widths[-1]
            aligned = [c.at(w) for w in range(c.align, full + 1, c.align)]
            assert all(a <= b for a, b in zip(aligned, aligned[1:])), name
            steps = [c.staircase(w) for w in range(1, full + 1)]
            assert all(a <= b for a, b in zip(steps, steps[1:])), name
            for w in range(1, full + 1):  # a ragged width runs as the next multiple up, times the penalty
                if w % c.align and w not in c.grid:
                    assert c.at(w) == pytest.approx(c.at(c._up(w)) * c.penalty), (name, w)
            with pytest.raises(ValueError, match="width"):
                c.at(full + 1)


def test_curve_drops_a_lone_spike_and_learns_the_ragged_penalty():
    widths = [1, 8, 16, 24, 31, 32, 40, 48, 63, 64]
    ms = [1.0, 1.0, 2.0, 30.0, 6.0, 4.0, 5.0, 6.0, 12.0, 8.0]  # 24 hit by a busy machine
    c = Curve(widths, ms)
    assert c.grid == [1, 8, 16, 24, 32, 40, 48, 64]
    # medians of three: 24 -> 4 (the spike is gone), 32 -> 5, 40 -> 5; then non-decreasing as it is
    assert [c.at(w) for w in c.grid] == [1.0, 1.0, 2.0, 4.0, 5.0, 5.0, 6.0, 8.0]
    assert c.penalty == pytest.approx(statistics.median([6.0 / 5.0, 12.0 / 8.0]))
    assert c.at(60) == pytest.approx(8.0 * c.penalty) == c.at(57)  # time drops only at 64
    assert c.at(56) == pytest.approx(7.0)  # aligned widths between measured ones: linear
    assert c.staircase(57) == 8.0 and c.staircase(9) == c.at(16)


def test_curve_and_grid_reject_bad_points():
    with pytest.raises(ValueError):
        Curve([8, 8], [1.0, 1.0])
    with pytest.raises(ValueError):
        Curve([8, 16], [1.0, float("nan")])
    with pytest.raises(ValueError):
        Grid2([1, 2], [1], [[1.0]])
    g = Grid2([8, 16], [8, 16], [[1.0, 2.0], [3.0, 4.0]])
    assert g.at(12, 12) == pytest.approx(2.5) and g.at(0, 0) == 1.0 and g.at(99, 99) == 4.0


def test_predict_of_the_dense_structure_is_the_sum_of_the_dense_entries(measured):
    dense = measured.dense_widths()
    (t,) = measured.shapes.values()
    c, s = t.curves, t.scalars
    per_block = (2 * s["add"] + 2 * s["norm"] + c["qkv_out"].at(192) + c["attn_diag"].at(32) + c["proj_in"].at(64)
                 + c["fc1_out"].at(256) + c["act"].at(256) + c["fc2_in"].at(256))
    assert measured.raw_ms(dense) == pytest.approx(measured.fixed_ms + 2 * per_block, rel=1e-12)
    assert measured.predict(dense) == pytest.approx(measured.offset + measured.slope * measured.raw_ms(dense))
    # the calibration line runs through the dense model's measured time
    assert measured.predict(dense) == pytest.approx(measured.dense_ms, rel=1e-9)
    assert sum(measured.block_ms(dense)) == pytest.approx(measured.slope * (measured.raw_ms(dense) - measured.fixed_ms))
    assert measured.slope > 0


def test_table_round_trips_through_its_dict(measured):
    again = LatencyTable.from_dict(json.loads(json.dumps(measured.to_dict())))
    dense = measured.dense_widths()
    assert again.predict(dense) == measured.predict(dense) and again.key == measured.key
    with pytest.raises(ValueError, match="format"):
        LatencyTable.from_dict({**measured.to_dict(), "format": 99})


def _synthetic(step_hidden=16):
    """A table of one block shape whose times are known: the hidden width costs
    ceil(w / step_hidden) steps in fc1, fc2 and the activation (a staircase), everything else
    grows linearly."""
    shape = BlockShape(embed=64, heads=2, head_dim=32, hidden=128, tokens=17)
    line = lambda full: Curve(latency.width_grid(full), [0.1 + w / full for w in latency.width_grid(full)])
    stairs = Curve(latency.width_grid(128), [0.1 + math.ceil(w / step_hidden) for w in latency.width_grid(128)])
    curves = {n: line(f) for n, f in (("qkv_in", 64), ("qkv_out", 192), ("proj_in", 64), ("fc1_in", 64),
                                     ("v_gather", 64), ("norm_gather", 64))}
    curves.update(fc1_out=stairs, fc2_in=stairs, act=stairs, attn_heads=Curve([1, 2], [1.0, 2.0]), attn_diag=Curve([8, 16, 24, 32], [1, 2, 3, 4]))
    product = lambda kind, xs, ys: Grid2(xs, ys, [[curves[f"{kind}_in"].at(k) * curves[f"{kind}_out"].at(n)
                                                   / curves[f"{kind}_in"].at(64) for n in ys] for k in xs])
    grids = {"qkv_2d": product("qkv", [16, 32], [48, 96]), "fc1_2d": product("fc1", [16, 32], [32, 64]),
             "attn": Grid2([8, 32], [8, 32], [[1.0, 9.0], [9.0, 4.0]])}
    t = ShapeTable(shape, curves, grids, {"norm": 0.5, "add": 0.1, "scale": 0.1})
    dense = BlockWidths.dense(shape)
    return LatencyTable({"synthetic": True}, {shape.name: t}, [shape.name] * 3, 1.0,
                        [{"widths": [dense.to_dict()] * 3, "ms": 20.0}])


def test_marginal_saving_steps_to_where_time_drops():
    table = _synthetic()
    widths = list(table.dense_widths())
    widths[1] = BlockWidths(64, (32, 32), (32, 32), (32, 32), 64, 64)
    w, saved = table.marginal_saving(widths, 1, "mlp_hidden")
    assert w == 48 and saved > 0  # 56 costs what 64 costs in fc1 (ceil(56/16) == 4): the step is 48
    after = list(widths)
    after[1] = BlockWidths(64, (32, 32), (32, 32), (32, 32), 64, 48)
    assert table.predict(widths) - table.predict(after) == pytest.approx(saved)
    w, saved = table.marginal_saving(widths, 0, "attn_out")
    assert w < 64 and saved > 0
    # queries and keys narrower than the values: attention leaves the fused diagonal for the
    # math path (9 ms against 4 in this table), which costs more than the narrower qkv saves
    w, saved = table.marginal_saving(widths, 0, "attn_qk")
    assert (w, saved) == (0, pytest.approx(table.slope * (table.shapes[table.blocks[0]].block_ms(widths[0])
                                                            - table.shapes[table.blocks[0]].block_ms(
                                                                BlockWidths(0, (), (), (), 64, 128)))))
    with pytest.raises(ValueError, match="site"):
        table.marginal_saving(widths, 0, "attn_qkv")
    with pytest.raises(ValueError, match="block"):
        table.marginal_saving(widths, 3, "mlp_in")


def test_prediction_falls_with_width_and_constant_branches_cost_only_their_add():
    table = _synthetic()
    dense = table.dense_widths()
    narrower = tuple(BlockWidths(32, b.qk_widths, b.v_widths, b.v_kept, 32, 64) for b in dense)
    assert table.predict(narrower) < table.predict(dense)
    constant = tuple(BlockWidths(0, (), (), (), 0, 0) for _ in dense)
    (t,) = table.shapes.values()
    assert table.raw_ms(constant) == pytest.approx(1.0 + 3 * 2 * t.scalars["add"])
    # a non-padded query width runs off the diagonal of the attention grid (the math path)
    assert t.attention(2, 32, 8) == pytest.approx(9.0) and t.attention(2, 32, 32) == pytest.approx(4.0)
    with pytest.raises(ValueError, match="widths"):
        table.predict(dense[:2])
    with pytest.raises(ValueError, match=r"widths\[0\]"):
        table.predict((BlockWidths(65, (), (), (), 0, 0),) + dense[1:])


# ---------------------------------------------------------------------------------------------
# Structure read from models


@pytest.mark.parametrize("round_to", [1, 8])
def test_widths_read_from_a_pruned_model_are_its_real_widths(round_to):
    model = vtp.add_gates(tiny_vit(depth=3))
    randomize_gates(model, seed=round_to)
    plan = vtp.plan(model, ratio=0.6, round_to=round_to)
    pruned = vtp.prune(model, plan)
    widths = vtp.model_widths(pruned)
    for i, (b, block) in enumerate(zip(widths, pruned.blocks)):
        kept = lambda site: plan.kept_count(i, site)
        if isinstance(block.attn, vtp.ConstantBranch):
            assert not b.attention_live
        else:
            assert b.attn_in == kept("attn_in") == block.attn.qkv.in_features
            assert b.qkv_out == block.attn.qkv.out_features
            assert b.proj_in == kept("attn_out") == block.attn.proj.in_features
            assert list(b.v_kept) == [w for w in plan.head_widths(i, 2) if w]
            assert set(b.qk_widths) == {32} and set(b.v_widths) == {32}  # V padded to the head width
        if isinstance(block.mlp, vtp.ConstantBranch):
            assert not b.mlp_live
        else:
            assert (b.mlp_in, b.mlp_hidden) == (kept("mlp_in"), kept("mlp_hidden"))
            assert (block.mlp.fc1.in_features, block.mlp.fc2.in_features) == (b.mlp_in, b.mlp_hidden)


def test_dense_and_gated_models_execute_the_dense_widths(measured):
    model = tiny_vit()
    assert vtp.model_widths(model) == measured.dense_widths()
    assert vtp.model_widths(vtp.add_gates(model)) == measured.dense_widths()


def test_models_the_table_does_not_cover_are_a_type_error():
    with pytest.raises(TypeError, match=r"blocks\[0\]\.mlp"):
        vtp.latency_table(tiny_vit(mlp_layer=SwiGLU), 1, cache=False)
    with pytest.raises(TypeError, match="VisionTransformer"):
        vtp.model_widths(torch.nn.Linear(2, 2))


# ---------------------------------------------------------------------------------------------
# Bad input: before any measurement


@pytest.mark.parametrize("kwargs, flag", [
    ({"batch_size": 0}, "batch_size"), ({"batch_size": 1.5}, "batch_size"), ({"threads": 0}, "threads"),
    ({"device": "cuda"}, "device"), ({"device": "cuda:7"}, "device"), ({"device": "mps"}, "device"),
    ({"device": "nonsense"}, "device"), ({"dtype": "int8"}, "dtype"), ({"dtype": torch.int32}, "dtype"),
    ({"repeats": 0}, "repeats"),
])
def test_bad_input_is_a_value_error_naming_the_argument(counting, kwargs, flag, tmp_path):
    if flag == "device" and torch.cuda.is_available() and kwargs["device"] == "cuda":
        pytest.skip("this machine has CUDA")
    args = {"batch_size": 1, **kwargs}
    with pytest.raises(ValueError, match=flag):
        vtp.latency_table(tiny_vit(), args.pop("batch_size"), cache_dir=tmp_path, **args)
    assert not counting and not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------
# Pictures


def test_pictures_are_png_files(measured, tmp_path):
    table_png = vtp.plot_latency_table(measured, tmp_path / "table.png")
    blocks_png = vtp.plot_block_latency(measured, measured.dense_widths(), tmp_path / "blocks.png")
    for path in (table_png, blocks_png):
        assert open(path, "rb").read(4) == b"\x89PNG"
    with pytest.raises(ValueError, match="shape"):
        vtp.plot_latency_table(measured, tmp_path / "x.png", shape="nope")


# ---------------------------------------------------------------------------------------------
# The CUDA path, checked logically (this machine has no GPU): events and synchronisation


def test_cuda_timer_times_with_events_after_synchronising(monkeypatch):
    log = []

    class Event:
        def __init__(self, enable_timing=False):
            assert enable_timing
            self.name = "start" if not any(e == "new" for e in log) else "end"
            log.append("new")

        def record(self):
            log.append(f"record {self.name}")

        def synchronize(self):
            log.append(f"sync {self.name}")

        def elapsed_time(self, end):
            return 8.0

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: log.append("sync all"))
    timer = latency._Timer(torch.device("cuda"))
    ms = timer(lambda: log.append("call"), 4)
    assert ms == 2.0  # ms per call
    assert log == ["sync all", "new", "new", "record start", "call", "call", "call", "call", "record end", "sync end"]


def test_cuda_device_index_is_checked_against_the_machine(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match="device: 'cuda:3'.*1 CUDA device"):
        latency._check_args(tiny_vit(), 1, "cuda:3", None, None, 1)
    with pytest.raises(ValueError, match="dtype: float16"):
        latency._check_args(tiny_vit(), 1, "cpu", "float16", None, 1)
