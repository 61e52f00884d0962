"""benchmarks/bench_pruned_cpu.py --smoke writes a whole record (times, MAC ratios, plot), and
--profile adds each model's operator times."""
import json

import pytest
from scripts import load_script

@pytest.fixture(scope="module")
def bench():
    return load_script("benchmarks/bench_pruned_cpu.py")


def test_smoke_record(bench, tmp_path):
    assert bench.main(["--smoke", "--ratios", "0.4", "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "pruned_cpu_smoke.json").read_text())
    assert (tmp_path / "pruned_cpu_smoke.png").stat().st_size > 0
    assert {"command", "cpu", "threads", "versions", "settings"} <= set(record)
    rows = record["results"]
    assert {r["variant"] for r in rows} >= {"dense", "uniform", "ratio 0.4 round_to 1", "flops 0.55 round_to 8",
                                           "flops 0.55 round_to 8 packed", "flops 0.55 round_to 8 heads"}
    for r in rows:
        assert len(r["seconds"]) == 2 and all(t > 0 for t in r["seconds"])
        assert r["q1_ms"] <= r["median_ms"] <= r["q3_ms"]
        assert r["executed_macs"] >= r["macs"]
        if r["kind"] == "pruned":
            assert r["mac_ratio"] > 1.2
    dense = [r for r in rows if r["variant"] == "dense"][0]
    assert dense["speedup"] == 1.0 and dense["mac_ratio"] == 1.0


def test_profile_record(bench, tmp_path, capsys):
    assert bench.main(["--smoke", "--profile", "--round-to", "8", "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "pruned_cpu_profile_smoke.json").read_text())
    assert not (tmp_path / "pruned_cpu_profile_smoke.png").exists()
    rows = record["results"]
    assert {r["variant"] for r in rows} == {"dense", "uniform", "flops 0.55 round_to 8"}
    for r in rows:
        ops = r["operators"]
        assert ops["aten::addmm"]["median_ms"] > 0  # every model's linears ran under the profiler
        assert all(v["q1_ms"] <= v["median_ms"] <= v["q3_ms"] for v in ops.values())
    pruned = [r for r in rows if r["kind"] == "pruned"][0]
    assert "aten::gather" in pruned["operators"]  # the kept-column gathers are seen
    assert "(total)" in capsys.readouterr().out


def test_qk_variants_in_both_padded_layouts(bench, tmp_path):
    assert bench.main(["--smoke", "--profile", "--qk", "--round-to", "8", "--out", str(tmp_path)]) == 0
    rows = {r["variant"]: r for r in json.loads((tmp_path / "pruned_cpu_profile_smoke.json").read_text())["results"]}
    fitted, full = rows["flops 0.55 round_to 8 qk"], rows["flops 0.55 round_to 8 qk head_dim"]
    assert fitted["layout"] == "padded" and full["layout"] == "padded_head_dim"
    assert fitted["macs"] == full["macs"]  # one plan, two layouts: the same kept dims
    # V padded to each block's attention width executes no more than V padded to head_dim
    assert fitted["executed_macs"] <= full["executed_macs"]
    assert fitted["operators"]["aten::addmm"]["median_ms"] > 0
