"""benchmarks/bench_model.py and bench_gated_training.py --smoke run on the CPU and write
complete records, and rewrite them after every measurement; the shared benchmark helpers
write whole files and run processes under a time limit."""
import importlib
import json
import os
import sys

import pytest
from scripts import BENCHMARKS, load_script

@pytest.fixture(scope="module")
def bench():
    return load_script("benchmarks/bench_model.py")


def test_smoke_eager_record(bench, tmp_path, monkeypatch):
    writes = []
    write_json = bench.records.write_json
    monkeypatch.setattr(bench.records, "write_json", lambda path, rec: writes.append(len(rec["results"])) or
                        write_json(path, rec))
    bench.main(["--smoke", "--no-compile", "--ratios", "0.4", "--flops-targets", "0.5",
                "--round-to-sweep", "8", "--iters", "2", "--out", str(tmp_path)])
    # Written as the measurements come in, not only at the end.
    assert writes[0] == 1 and len(set(writes)) > 3
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
# bench_gated_training.py and the pieces the benchmarks share (benchmarks/harness/)
# ---------------------------------------------------------------------------------------


def _load(name):
    return load_script(f"benchmarks/{name}.py")


def _harness(name):
    """benchmarks/harness/<name>.py, imported as the scripts import it."""
    if str(BENCHMARKS) not in map(os.path.abspath, sys.path):
        sys.path.insert(0, str(BENCHMARKS))
    return importlib.import_module(f"harness.{name}")


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
    records = _harness("records")
    path = tmp_path / "sub" / "record.json"
    records.write_json(path, {"a": 1})
    records.write_json(path, {"b": [1, 2]})
    assert json.loads(path.read_text()) == {"b": [1, 2]}

    def broken(tmp):
        with open(tmp, "w") as f:
            f.write("{half")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        records.write_atomically(str(path), broken)
    assert json.loads(path.read_text()) == {"b": [1, 2]}  # the old record, whole
    assert sorted(p.name for p in path.parent.iterdir()) == ["record.json"]  # no temporary files left


def test_harness_names_and_commands():
    records, arguments = _harness("records"), _harness("arguments")
    assert records.slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert records.slug("cpu (x86_64), TRITON_INTERPRET=1") == "cpu--x86-64"
    assert records.command_line("/x/benchmarks/bench_model.py", ["--smoke", "--out", "a b"]) == \
        "python benchmarks/bench_model.py --smoke --out 'a b'"
    assert arguments.subset("b, a", ["a", "b", "c"], "--x") == ["b", "a"]
    with pytest.raises(SystemExit, match="--x: unknown"):
        arguments.subset("a,z", ["a", "b"], "--x")


def test_run_logged_ends_a_step_at_its_limit(tmp_path):
    processes = _harness("processes")
    log = tmp_path / "logs" / "slow.log"
    slow = processes.run_logged([sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"],
                             dict(os.environ), str(log), timeout=2)
    assert slow["status"] == "timeout" and slow["seconds"] < 30
    text = log.read_text()
    assert "started" in text and "time limit" in text
    fast = processes.run_logged([sys.executable, "-c", "raise SystemExit(3)"], dict(os.environ), str(tmp_path / "f.log"), 30)
    assert fast["status"] == "failed" and fast["returncode"] == 3


def test_pack_writes_one_archive(tmp_path):
    import tarfile

    records = _harness("records")
    (tmp_path / "work" / "logs").mkdir(parents=True)
    (tmp_path / "work" / "a.json").write_text("{}")
    (tmp_path / "work" / "logs" / "a.log").write_text("x")
    archive = records.pack(str(tmp_path / "work"), str(tmp_path / "out" / "run.tar.gz"))
    with tarfile.open(archive) as tar:
        assert sorted(tar.getnames()) == ["a.json", "logs/a.log"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["run.tar.gz"]
