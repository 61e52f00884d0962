"""benchmarks/gpu_check.py: its CPU smoke run writes every record into one archive; its GPU
runner gives each step a time limit inside the budget, skips and packs (checked with a
stand-in interpreter, since it needs a GPU); benchmarks/decide.py applies the rule that
fills FASTER_ON_CUDA, here to a synthetic record."""
import json
import os
import sys
import tarfile

import pytest

import vtp_kernels.backend as backend
from scripts import load_script

BENCH = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks")


def _load(name):
    return load_script(f"benchmarks/{name}.py")


@pytest.fixture(scope="module")
def gpu_check():
    return _load("gpu_check")


@pytest.fixture(scope="module")
def decide():
    return _load("decide")


def _members(archive):
    with tarfile.open(archive) as tar:
        return {m.name: json.load(tar.extractfile(m)) for m in tar.getmembers() if m.name.endswith(".json")}


def test_smoke_run_writes_every_record(gpu_check, tmp_path):
    summary = gpu_check.main(["--smoke", "--out", str(tmp_path), "--wheels", str(tmp_path / "none")])
    assert [s["name"] for s in summary["steps"]] == [name for name, _ in gpu_check.STEPS]
    assert all(s["status"] == "ok" for s in summary["steps"]), summary["steps"]
    (archive,) = tmp_path.iterdir()
    assert archive.name.startswith("gpu_check_cpu-smoke_") and archive.name.endswith(".tar.gz")
    records = _members(archive)
    assert {f"{name}.json" for name, _ in gpu_check.STEPS} | {"gpu_check.json", "decision.json"} <= set(records)
    assert all(records[f"{name}.json"].get("finished") for name, _ in gpu_check.STEPS)
    assert records["environment.json"]["versions"]["timm"]
    assert records["configs.json"]["all_ok"] and records["correctness.json"]["all_ok"]
    assert all(c["ok"] for c in records["ops.json"]["checks"].values())
    ops = records["ops.json"]["results"]
    assert {r["op"] for r in ops} == {"gated_linear", "layer_norm_gather", "packed_attention"}
    assert {r["role"] for r in ops} == {"candidate", "alternative", "floor"}
    assert all(len(r["rounds_ms"]) == 2 and r["median_ms"] > 0 for r in ops)
    # Dqk != value widths: the kernel with and without the gate checked, every QK variant timed
    qk = records["qk_attention.json"]
    assert qk["all_ok"] and qk["checks"] and all(c["ok"] for c in qk["checks"].values())
    assert all({"triton/dqkv", "triton_gated/dgate"} <= set(c["errors"]) for c in qk["checks"].values())
    assert {r["variant"] for r in qk["results"]} == set(gpu_check.bench_packed_attention.QK_VARIANTS)
    assert all(len(r["rounds_ms"]) == 2 and r["median_ms"] > 0 for r in qk["results"])
    assert all(v["MATH"] == "runs" for v in qk["sdpa_backends"].values())
    training = records["training.json"]["results"]
    assert {(r["gated"], r["backend"], r["compile"]) for r in training} >= {
        (False, "torch", False), (True, "torch", False), (True, "auto:gated_linear", False)}
    assert all("median_ms" in r for r in training), [r.get("error") for r in training]
    pruned = records["pruned.json"]
    assert all(c["ok"] for c in pruned["checks"].values())
    assert {(r["round_to"], r["backend"]) for r in pruned["results"] if r["round_to"]} == {
        (rt, b) for rt in (1, 8) for b in ("torch", "triton", "auto:layer_norm_gather", "auto:packed_attention")}
    # Interpreter timings beat nothing: the rule keeps every op out.
    assert records["decision.json"]["faster_on_cuda"] == []
    # a latency table measured, a plan to the target it predicts, both models timed
    latency = records["latency_target.json"]
    assert latency["table_key"]["batch_size"] == 2 and latency["table_key"]["device_type"] == "cpu"
    # the table's plan fits its prediction; vtp.plan's default refine measured it (and may
    # have planned again) on the device, which the record keeps beside the timing after it
    assert latency["table_predicted_share"] <= gpu_check.latency_check.SMOKE_TARGET + 1e-9
    assert latency["plan"]["latency"]["refine"] == 1 and latency["plan_measured_share"] > 0
    assert latency["predicted_share"] == latency["plan"]["latency"]["predicted_share"]
    assert latency["plan"]["latency_target"] == gpu_check.latency_check.SMOKE_TARGET
    assert {r["model"] for r in latency["results"]} == {"dense", "pruned"}
    assert all(r["median_ms"] > 0 for r in latency["results"]) and latency["measured_share"] > 0


def test_step_limits_fit_the_budget(gpu_check):
    assert sum(limit for _, limit in gpu_check.STEPS) <= gpu_check.BUDGET_S - 10
    assert gpu_check.BUDGET_S <= 7 * 60


STUB = '''#!{python}
# Stands in for the GPU machine's python: a GPU name for the runner, and steps that write
# their record, one of which hangs past its limit.
import json, os, sys, time
if sys.argv[1] == "-c":
    print("Test GPU 1")
    sys.exit(0)
args = sys.argv[1:]
name, work = args[args.index("--step") + 1], args[args.index("--work") + 1]
print("step", name, "TRITON_INTERPRET" in os.environ, os.environ.get("TRITON_CACHE_DIR") is not None, flush=True)
with open(os.path.join(work, name + ".json"), "w") as f:
    json.dump({{"step": name, "results": []}}, f)
if name == "ops":
    time.sleep(60)
sys.exit(3 if name == "configs" else 0)
'''


def test_gpu_runner_limits_skips_and_packs(gpu_check, tmp_path, monkeypatch):
    stub = tmp_path / "python"
    stub.write_text(STUB.format(python=sys.executable))
    stub.chmod(0o755)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # must not reach the steps
    monkeypatch.setattr(gpu_check, "STEPS", [("environment", 10), ("configs", 10), ("ops", 2), ("training", 10),
                                             ("pruned", 30)])
    out = tmp_path / "out"
    summary = gpu_check.main(["--python", str(stub), "--out", str(out), "--budget-s", "20",
                              "--wheels", str(tmp_path / "none")])
    status = {s["name"]: s["status"] for s in summary["steps"]}
    assert status == {"environment": "ok", "configs": "failed", "ops": "timeout", "training": "ok",
                      "pruned": "skipped"}
    (archive,) = out.iterdir()
    assert archive.name.startswith("gpu_check_test-gpu-1_")
    with tarfile.open(archive) as tar:
        names = set(tar.getnames())
        log = tar.extractfile("logs/environment.log").read().decode()
    assert {"gpu_check.json", "decision.json", "environment.json", "ops.json", "logs/ops.log"} <= names
    assert "step environment False True" in log  # no interpreter, a shared Triton cache
    assert _members(archive)["gpu_check.json"]["finished"]


# ---------------------------------------------------------------------------------------
# The decision rule
# ---------------------------------------------------------------------------------------
def _op_rows(op, case, medians, spread=0.01, mode=None):
    roles = {"triton": "candidate", "linear": "floor", "layer_norm": "floor"}
    mode = mode or decide_mode(op)
    return [{"op": op, "case": case, "production": True, "mode": mode, "variant": v,
             "role": roles.get(v, "alternative"), "median_ms": m, "spread": spread} for v, m in medians.items()]


def decide_mode(op):
    return {"gated_linear": "fwd+bwd", "layer_norm_gather": "fwd", "packed_attention": "fwd"}[op]


def _model_row(setting, task, backend, median, spread=0.01, round_to=None, compile=False):
    return {"setting": setting, "task": task, "backend": backend, "median_ms": median, "spread": spread,
            "round_to": round_to, "compile": compile}


def synthetic_record():
    ops = []
    # gated_linear: the four layers together 10 % faster than the best alternative; the
    # ungated nn.Linear floor is faster still and does not count.
    for case in ("qkv", "proj", "fc1", "fc2"):
        ops += _op_rows("gated_linear", case, {"triton": 1.0, "reference": 1.2, "compiled": 1.1, "linear": 0.9})
    # layer_norm_gather: only 4 % faster: not enough.
    ops += _op_rows("layer_norm_gather", "k=461", {"triton": 1.0, "reference": 1.5, "compiled": 1.04, "layer_norm": 0.8})
    # packed_attention: 20 % faster in isolation, but the model gets slower with it.
    ops += _op_rows("packed_attention", "round_to=1", {"triton": 1.0, "reference": 1.3, "sdpa_padded:flash": 1.2})
    # Timings outside production (another mode) never decide.
    ops += _op_rows("layer_norm_gather", "k=461", {"triton": 1.0, "reference": 9.0}, mode="fwd+bwd")
    train = "train deit gated eager"
    training = [_model_row(train, "train", "torch", 100.0), _model_row(train, "train", "auto:gated_linear", 99.5),
                _model_row("train deit gated compiled", "train", "auto:gated_linear", 90.0, compile=True)]
    pruned = []
    for rt, torch_ms in ((1, 50.0), (8, 45.0)):
        setting = f"infer pruned round_to={rt}"
        pruned += [_model_row(setting, "infer", "torch", torch_ms, round_to=rt),
                   _model_row(setting, "infer", "auto:layer_norm_gather", torch_ms * 0.97, round_to=rt),
                   _model_row(setting, "infer", "auto:packed_attention", torch_ms * 1.05, round_to=rt)]
    correctness = [{"op": op, "case": "some case", "dtype": dt, "ok": True}
                   for op in ("gated_linear", "layer_norm_gather", "packed_attention") for dt in ("bf16", "fp16", "fp32")]
    return {"correctness": {"results": correctness}, "configs": {"results": []},
            "ops": {"results": ops, "checks": {"gated_linear qkv": {"ok": True}}},
            "training": {"results": training}, "pruned": {"results": pruned, "checks": {}}}


def test_decision_rule_on_a_synthetic_record(decide):
    decision = decide.decide(synthetic_record())
    assert decision["faster_on_cuda"] == ["gated_linear"]
    gl = decision["ops"]["gated_linear"]
    (combined,) = gl["op_level"]["cases"].values()  # the four layers add up
    assert combined["strongest_alternative"] == "compiled" and combined["speedup"] == pytest.approx(1.1)
    assert combined["needed"] == pytest.approx(1.06)
    # The compiled setting has no torch-backend step beside it: reported, not compared.
    assert gl["model_level"]["settings"]["train deit gated compiled"]["ok"] is None
    ln = decision["ops"]["layer_norm_gather"]
    assert not ln["op_level"]["ok"] and ln["model_level"]["ok"]
    pa = decision["ops"]["packed_attention"]
    assert pa["op_level"]["ok"] and not pa["model_level"]["ok"]
    assert decision["round_to"]["infer torch eager"]["faster"] == "round_to=8"
    text = decide.report(decision)
    assert "FASTER_ON_CUDA = frozenset({'gated_linear'})" in text and "stays out" in text


def test_spread_raises_the_bar(decide):
    record = synthetic_record()
    for r in record["ops"]["results"]:
        if r["op"] == "gated_linear" and r["variant"] == "triton":
            r["spread"] = 0.06  # 10 % faster no longer clears 5 % + a 6 % spread
    assert decide.decide(record)["faster_on_cuda"] == []


def test_a_failed_check_keeps_an_op_out(decide):
    record = synthetic_record()
    record["configs"]["results"].append({"op": "gated_linear", "kernel": "k", "config_index": 3, "ok": False})
    decision = decide.decide(record)
    assert decision["faster_on_cuda"] == [] and decision["ops"]["gated_linear"]["checks"]["failed"] == ["config k #3"]
    assert decide.decide({k: v for k, v in synthetic_record().items() if k != "correctness"})["faster_on_cuda"] == []
    # a failed check of the attention with q/k narrower than V keeps packed_attention out too
    record = synthetic_record()
    record["qk_attention"] = {"checks": {"deit_b/dqk16": {"ok": False}, "deit_b/dqk32": {"ok": True}}}
    checks = decide.decide(record)["ops"]["packed_attention"]["checks"]
    assert not checks["ok"] and checks["failed"] == ["qk_attention deit_b/dqk16"]


def test_decision_reads_an_archive(decide, tmp_path):
    sys.path.insert(0, os.path.abspath(BENCH))  # the harness, as the scripts import it
    from harness import records
    work = tmp_path / "work"
    for name, rec in synthetic_record().items():
        records.write_json(work / f"{name}.json", rec)
    archive = records.pack(str(work), str(tmp_path / "gpu_check_x.tar.gz"))
    assert decide.decide(decide.load(archive))["faster_on_cuda"] == ["gated_linear"]
    assert decide.main([str(work)])["faster_on_cuda"] == ["gated_linear"]


def test_faster_on_cuda_follows_a_recorded_decision(decide):
    # An op is listed only when a gpu_check record committed under benchmarks/results/
    # decided so; none is recorded yet, so the set is empty.
    results = os.path.join(BENCH, "results")
    decided = set()
    for name in os.listdir(results):
        if name.startswith("gpu_check_") and name.endswith(".tar.gz"):
            decided |= set(decide.decide(decide.load(os.path.join(results, name)))["faster_on_cuda"])
    assert set(backend.FASTER_ON_CUDA) <= decided
