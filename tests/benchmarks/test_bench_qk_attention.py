"""benchmarks/bench_qk_attention.py: its --smoke run writes both records with what they must hold."""
import json

import pytest
from scripts import load_script

def load():
    return load_script("benchmarks/bench_qk_attention.py")


def test_smoke_records(tmp_path):
    bench = load()
    bench.main(["--smoke", "--out", str(tmp_path)])
    sdpa = json.loads((tmp_path / "qk_sdpa_smoke.json").read_text())
    gate = json.loads((tmp_path / "qk_gate_cost_smoke.json").read_text())
    for record in (sdpa, gate):
        for field in ("device", "versions", "command", "config", "load_average_before", "results"):
            assert field in record, field
        assert record["smoke"] and record["config"]["threads"] == 1
        reps = record["config"]["rep" if record is sdpa else "gate_rep"]
        assert all(len(r["raw_ms"]) == reps for r in record["results"])
    # --smoke scales DeiT-S's (Dqk, Dv) cases from head dim 64 to 16
    assert [(c["dqk"], c["dv"]) for c in sdpa["cases"]] == bench.sdpa_cases(16)
    for case in sdpa["cases"]:
        assert case["max_abs_diff_float64"] <= 1e-12            # padding is exact
        assert case["flash_runs"] == (case["dqk"] == case["dv"])  # torch's CPU flash needs one width
        assert case["modes"]["fwd+bwd"]["as_is_over_pad"]["paired_median"] > 0
    assert gate["max_abs_diff_at_gate_1_float64"] <= 1e-12
    assert gate["gate_share_of_step"] > 0 and gate["threshold"] == 0.03
    assert {r["variant"] for r in gate["results"]} == {"plain", "gated", "gate_only"}


def test_bad_flags_name_the_flag():
    bench = load()
    with pytest.raises(SystemExit, match="--parts: unknown"):
        bench.main(["--smoke", "--parts", "sdpa,nope"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--threads", "0"])
