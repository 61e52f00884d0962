"""benchmarks/latency_target_cpu.py --smoke: every (model, batch, target) case holds the latency
plan's prediction and, measured in the same interleaved group, its FLOPs-plan and uniform
twins of the same MACs; the record keeps every raw time and the table's key; the three
pictures are written. Structure only: a tiny ViT's times say nothing about speed."""
import json
import statistics

import pytest
from scripts import load_script

@pytest.fixture(scope="module")
def bench():
    return load_script("benchmarks/latency_target_cpu.py")


def test_smoke_record_holds_every_case_with_its_twins_and_raw_times(bench, tmp_path):
    record = bench.main(["--smoke", "--out", str(tmp_path), "--cache-dir", str(tmp_path / "cache")])
    written = json.loads((tmp_path / "latency_target_smoke.json").read_text())
    assert written["summary"] == record["summary"] and written["smoke"] and "--smoke" in written["command"]
    assert {"torch", "timm"} <= set(written["versions"]) and written["threads"] == 1
    (group,) = written["groups"]
    assert group["batch"] == 2 and group["table"]["key"]["batch_size"] == 2 and group["table"]["key"]["threads"] == 1
    assert group["table"]["measured"]["wall_s"] > 0
    (case,) = group["cases"]
    assert case["target"] == bench.SMOKE_TARGET and case["reached"]
    # the plan is made with vtp.plan's default refine: the table's plan (round 0) fits its
    # prediction, and the plan's own measured share is recorded beside the independent one
    ref = case["refine"]
    assert ref["refine"] == 1 and ref["rounds"][0]["predicted_share"] <= case["target"] + 1e-9
    assert ref["measured_share"] == ref["rounds"][ref["chosen_round"]]["measured_share"] > 0
    assert case["predicted_share"] == ref["rounds"][ref["chosen_round"]]["predicted_share"]
    # the FLOPs plan keeps no more MACs than the latency plan; the uniform model is its own width
    assert case["flops"]["flops_target"] == pytest.approx(case["mac_share"])
    assert case["flops"]["macs"] <= case["macs"]
    assert case["uniform"]["embed_dim"] < 48
    for arm in ("latency", "flops", "uniform"):
        raw = group["times_s"][case["labels"][arm]]
        assert len(raw) == len(group["times_s"]["dense"]) == 2
        s = case[arm]["round_shares"]
        assert s["q1"] <= s["median"] <= s["q3"]
    # the error (and the hit) is the paired share's; the ratio of medians is kept beside it
    assert case["latency"]["error"] == pytest.approx(case["latency"]["round_shares"]["median"] / case["target"] - 1)
    assert case["latency"]["error_of_medians"] == pytest.approx(case["latency"]["measured_share"] / case["target"] - 1)
    raw = group["times_s"]
    assert case["latency"]["round_shares"]["median"] == pytest.approx(
        statistics.median(t / d for t, d in zip(raw[case["labels"]["latency"]], raw["dense"])))
    assert case["hit"] == (abs(case["latency"]["error"]) <= bench.TOLERANCE)
    assert written["summary"]["reached"] == 1 and written["summary"]["hits"] == int(case["hit"])
    for png in ("latency_target_smoke.png", "latency_target_smoke_table.png", "latency_target_smoke_blocks.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    # a second run reads the table from the cache instead of measuring it again
    again = bench.main(["--smoke", "--out", str(tmp_path), "--cache-dir", str(tmp_path / "cache")])
    assert again["groups"][0]["table"]["key"] == group["table"]["key"]
    assert again["groups"][0]["table"]["measured"] == group["table"]["measured"]
    assert len(list((tmp_path / "cache").iterdir())) == 1


@pytest.mark.parametrize("flags, named", [(["--targets", "1.5"], "--targets"), (["--repeats", "0"], "--repeats"),
                                          (["--batch-sizes", "0"], "--batch-sizes")])
def test_bad_flags_stop_before_any_work(bench, capsys, flags, named):
    with pytest.raises(SystemExit):
        bench.main(flags)
    assert named in capsys.readouterr().err
