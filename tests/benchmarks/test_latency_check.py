"""benchmarks/latency_check.py --smoke: the record holds every plan's prediction, raw times and
both errors, and the two pictures are written (no claim on how close: a tiny ViT is all overhead)."""
import json
import statistics

import pytest
from scripts import load_script

@pytest.fixture(scope="module")
def bench():
    return load_script("benchmarks/latency_check.py")


def test_smoke_record_holds_predictions_raw_times_and_errors(bench, tmp_path):
    record = bench.main(["--smoke", "--out", str(tmp_path), "--cache-dir", str(tmp_path / "cache")])
    written = json.loads((tmp_path / "latency_check_smoke.json").read_text())
    assert written["summary"] == record["summary"] and written["smoke"] and "--smoke" in written["command"]
    assert len(written["plans"]) == 2
    for p in written["plans"]:
        assert len(p["samples_ms"]["dense"]) == len(p["samples_ms"]["pruned"]) == 2
        assert p["error"] == pytest.approx(p["predicted_ms"] / p["measured_ms"] - 1)
        assert p["ratio_error"] == pytest.approx(p["predicted_ratio"] / p["measured_ratio"] - 1)
        paired = statistics.median(t / d for t, d in zip(p["samples_ms"]["pruned"], p["samples_ms"]["dense"]))
        assert p["paired_ratio"]["median"] == pytest.approx(paired)
        assert p["paired_ratio"]["q1"] <= p["paired_ratio"]["median"] <= p["paired_ratio"]["q3"]
        assert p["paired_ratio_error"] == pytest.approx(p["predicted_ratio"] / paired - 1)
    assert written["summary"]["max_abs_error"] == max(abs(p["error"]) for p in written["plans"])
    # the summary's ratio errors are the paired ratio's; those of the ratio of medians beside them
    assert written["summary"]["max_abs_ratio_error"] == max(abs(p["paired_ratio_error"]) for p in written["plans"])
    assert written["summary"]["max_abs_ratio_error_of_medians"] == max(abs(p["ratio_error"]) for p in written["plans"])
    assert written["table"]["key"]["batch_size"] == 2 and written["table"]["key"]["threads"] == 1
    for png in ("latency_check_smoke_table.png", "latency_check_smoke_blocks.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    assert len(list((tmp_path / "cache").iterdir())) == 1


def test_bad_flags_stop_before_any_work(bench, capsys):
    with pytest.raises(SystemExit):
        bench.main(["--smoke", "--plans", "0"])
    assert "--plans" in capsys.readouterr().err
