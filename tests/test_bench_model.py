"""benchmarks/bench_model.py --smoke runs on the CPU and writes a complete record and plot."""
import importlib.util
import json
import os

import pytest

BENCH = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "bench_model.py")


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_model", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smoke_eager_record(bench, tmp_path):
    bench.main(["--smoke", "--no-compile", "--ratios", "0.4", "--flops-targets", "0.5",
                "--round-to-sweep", "8", "--iters", "2", "--out", str(tmp_path)])
    record = json.loads((tmp_path / "model_smoke.json").read_text())
    assert (tmp_path / "model_smoke.png").stat().st_size > 0
    for field in ("device", "versions", "command", "config", "models", "results", "medians_ms", "speedups"):
        assert field in record, field
    assert {"torch", "timm", "python"} <= set(record["versions"])
    assert "--smoke" in record["command"]
    rows = record["results"]
    assert not [r for r in rows if "error" in r]
    variants = {r["variant"] for r in rows}
    assert variants == {"dense", "ratio=0.4", "flops=0.5", "ratio=0.4,round_to=8"}
    assert {(r["mode"], r["compile"]) for r in rows} == {("infer", False), ("train", False)}
    for r in rows:
        assert len(r["raw_ms"]) == 2 and r["median_ms"] > 0 and r["images_per_s"] > 0
        if r["variant"] == "dense":
            assert r["macs_ratio"] == 1.0 and r["backend"] is None
        else:
            assert r["backend"] == "torch" and 0 < r["macs_ratio"] < 1 and r["speedup_vs_dense"] > 0
    flops = next(r for r in rows if r["variant"] == "flops=0.5")
    assert flops["macs_ratio"] <= 0.5  # the plan meets its MACs budget


def test_smoke_compiled_inference(bench, tmp_path):
    record = bench.main(["--smoke", "--modes", "infer", "--ratios", "0.4", "--flops-targets",
                         "--iters", "2", "--warmup", "0", "--no-plot", "--out", str(tmp_path)])
    compiled = [r for r in record["results"] if r["compile"]]
    assert {r["variant"] for r in compiled} == {"dense", "ratio=0.4"}
    assert all("median_ms" in r for r in compiled), [r.get("error") for r in compiled]
