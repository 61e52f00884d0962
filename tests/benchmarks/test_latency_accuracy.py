"""benchmarks/latency_accuracy.py --smoke: the latency plan and the FLOPs plan matched to its
measured latency are both fine-tuned and tested, the bisection's steps and every raw time are
kept, and a restart resumes. Structure only: which plan keeps more is the full run's to say."""
import json

import pytest
from scripts import load_script

@pytest.fixture(scope="module")
def bench():
    return load_script("benchmarks/latency_accuracy.py")


def test_smoke_record_compares_both_plans_and_resumes(bench, tmp_path, capsys):
    argv = ["--smoke", "--out", str(tmp_path), "--work", str(tmp_path / "work")]
    record = bench.main(argv)
    written = json.loads((tmp_path / "latency_accuracy_smoke.json").read_text())
    assert written["summary"] == record["summary"] and written["smoke"] and "--smoke" in written["command"]
    assert (tmp_path / "latency_accuracy_smoke.png").read_bytes()[:4] == b"\x89PNG"
    assert written["table"]["key"]["batch_size"] == 4 and written["table"]["key"]["threads"] == 2
    (run,) = written["runs"]
    assert run["seed"] == 0 and run["target"] == bench.SMOKE_TARGET
    assert run["predicted_share"] <= run["target"] + 1e-9
    assert len(run["bisection"]) == 2
    timed = [s for s in run["bisection"] if "ratio" in s]
    assert timed and run["flops_target"] in [s["flops_target"] for s in timed]
    assert all(len(s["rounds_ms"]["flops"]) == len(s["rounds_ms"]["latency"]) == 2 for s in timed)
    assert {len(v) for v in run["final_ms"].values()} == {2} and set(run["final_ms"]) == {"dense", "latency", "flops"}
    for arm in ("latency", "flops"):
        assert 0 <= run[arm]["acc"] <= 1 and 0 <= run[arm]["acc_before_finetune"] <= 1
        assert 0 < run[arm]["mac_share"] <= 1 and run[arm]["measured_share"] > 0
    (s,) = written["summary"]
    d = 100 * (run["latency"]["acc"] - run["flops"]["acc"])
    assert s["latency_minus_flops"]["mean"] == pytest.approx(d)
    assert s["keeps_more"] == ("latency" if d > 0 else "flops" if d < 0 else "tie")
    assert "keeps more" in capsys.readouterr().out
    # a second start with the same settings trains and times nothing again
    again = bench.main(argv)
    assert again["runs"] == written["runs"]
    assert "resuming, 1 fine-tunings already done" in capsys.readouterr().out


def test_bad_flags_stop_before_any_work(bench, capsys):
    with pytest.raises(SystemExit):
        bench.main(["--width", "50", "--out", "/nonexistent"])  # 50 is no multiple of the 3 heads
    assert "--width" in capsys.readouterr().err
