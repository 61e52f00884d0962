"""benchmarks/bench_model.py and bench_gated_training.py --smoke run on the CPU and write
complete records; the shared benchmark helpers write whole files; run_all.py runs, times out,
skips and packs its steps (checked with a stand-in interpreter, since it needs a GPU)."""
import importlib.util
import json
import os
import sys

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


# ---------------------------------------------------------------------------------------
# bench_gated_training.py and the pieces the benchmarks share (benchmarks/common.py,
# benchmarks/run_all.py)
# ---------------------------------------------------------------------------------------
def _load(name):
    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gated_training_smoke(tmp_path):
    record = _load("bench_gated_training").main(["--smoke", "--warmup", "0", "--steps", "1", "--name", "smoke",
                                                 "--out", str(tmp_path)])
    assert json.loads((tmp_path / "smoke.json").read_text()) == record
    for field in ("device", "torch", "triton", "timm", "python", "command", "results"):
        assert field in record, field
    assert record["command"].startswith("python benchmarks/bench_gated_training.py --smoke")
    assert [r["variant"] for r in record["results"]] == ["ungated", "gated/torch", "gated/triton"]
    assert all(len(r["times_ms"]) == 1 and r["median_ms"] > 0 for r in record["results"])


def test_write_json_replaces_whole_files(tmp_path):
    common = _load("common")
    path = tmp_path / "sub" / "record.json"
    common.write_json(path, {"a": 1})
    common.write_json(path, {"b": [1, 2]})
    assert json.loads(path.read_text()) == {"b": [1, 2]}

    def broken(tmp):
        with open(tmp, "w") as f:
            f.write("{half")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        common.write_atomically(str(path), broken)
    assert json.loads(path.read_text()) == {"b": [1, 2]}  # the old record, whole
    assert sorted(p.name for p in path.parent.iterdir()) == ["record.json"]  # no temporary files left


def test_common_names_and_commands():
    common = _load("common")
    assert common.slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert common.slug("cpu (x86_64), TRITON_INTERPRET=1") == "cpu--x86-64"
    assert common.command_line("/x/benchmarks/bench_model.py", ["--smoke", "--out", "a b"]) == \
        "python benchmarks/bench_model.py --smoke --out 'a b'"
    assert common.subset("b, a", ["a", "b", "c"], "--x") == ["b", "a"]
    with pytest.raises(SystemExit, match="--x: unknown"):
        common.subset("a,z", ["a", "b"], "--x")


STUB = '''#!{python}
# Stands in for the GPU machine's interpreter: a preflight that finds a GPU, and benchmark
# steps that write a record (bench_gated_training fails).
import json, os, sys
if sys.argv[1] == "-c":
    print(json.dumps({{"device": "Test GPU 1", "gpus": 1, "versions": {{"torch": "t"}}}}))
    sys.exit(0)
out = sys.argv[sys.argv.index("--out") + 1]
name = os.path.basename(sys.argv[1])[:-3]
with open(os.path.join(out, name + ".json"), "w") as f:
    json.dump({{"correctness": {{"err": 0.001}}, "argv": sys.argv[1:]}}, f)
print("ran", name, "TRITON_INTERPRET" in os.environ)
sys.exit(3 if name == "bench_gated_training" else 0)
'''


def test_run_all_runs_every_step_and_packs(tmp_path, monkeypatch):
    import tarfile

    run_all = _load("run_all")
    stub = tmp_path / "python"
    stub.write_text(STUB.format(python=sys.executable))
    stub.chmod(0o755)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # must not reach the steps
    out = tmp_path / "out"
    summary = run_all.main(["--python", str(stub), "--out", str(out), "--pack", "--wheels", ""])

    names = ["gated_linear", "layer_norm_gather", "packed_attention", "model_deit_s", "model_deit_b",
             "gated_training"]
    assert [s["name"] for s in summary["steps"]] == names
    assert [s["status"] for s in summary["steps"]] == ["ok"] * 5 + ["failed"]
    assert summary["environment"]["device"] == "Test GPU 1" and summary["finished"]
    model_b = summary["steps"][4]
    assert model_b["files"] == ["bench_model.json"] and model_b["correctness"] == {"bench_model.json": {"err": 0.001}}
    assert "--tag test-gpu-1_deit-b" in model_b["command"] and "--round-to-sweep 8" in model_b["command"]

    files = sorted(p.name for p in out.iterdir())
    assert len(files) == 2 and files[0].endswith(".json") and files[1].endswith(".tar.gz")
    assert json.loads((out / files[0]).read_text()) == summary
    with tarfile.open(out / files[1]) as tar:
        members = set(tar.getnames())
    assert {f"logs/{n}.log" for n in names} <= members and "bench_gated_linear.json" in members
    with tarfile.open(out / files[1]) as tar:
        log = tar.extractfile("logs/gated_linear.log").read().decode()
    assert "ran bench_gated_linear False" in log


def test_run_all_skips_steps_without_time(tmp_path):
    run_all = _load("run_all")
    stub = tmp_path / "python"
    stub.write_text(STUB.format(python=sys.executable))
    stub.chmod(0o755)
    summary = run_all.main(["--python", str(stub), "--out", str(tmp_path), "--budget-s", "20",
                            "--only", "gated_linear,model_deit_s", "--wheels", ""])
    assert [s["status"] for s in summary["steps"]] == ["skipped", "skipped"]
    assert "needs at least" in summary["steps"][0]["reason"]
