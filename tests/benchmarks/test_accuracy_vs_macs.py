"""benchmarks/accuracy_vs_macs.py --smoke: every method, budget and distillation setting on
both datasets ends in the record, within its MAC budget, and a restart resumes."""
import json

import pytest
from scripts import load_script

pytest.importorskip("sklearn")

@pytest.fixture(scope="module")
def bench():
    return load_script("benchmarks/accuracy_vs_macs.py")


def test_smoke_record_covers_every_method_budget_and_setting(bench, tmp_path, capsys):
    argv = ["--smoke", "--budgets", "0.7", "0.4", "--out", str(tmp_path), "--work", str(tmp_path / "work")]
    record = bench.main(argv)
    written = json.loads((tmp_path / "accuracy_vs_macs_smoke.json").read_text())
    assert written["summary"] == record["summary"]
    assert (tmp_path / "accuracy_vs_macs_smoke.png").read_bytes()[:4] == b"\x89PNG"
    assert {"torch", "timm", "sklearn", "mlxtend"} <= set(written["versions"]) and written["smoke"]
    assert "--smoke" in written["command"]
    runs = written["runs"]
    keys = {(r["dataset"], r["budget"], r["method"], r["distill"]) for r in runs}
    assert keys == {(d, b, m, k) for d in ("mnist", "digits") for b in (0.7, 0.4)
                    for m in ("vtp", "vtp_qk", "magnitude", "random", "scratch") for k in (False, True)}
    for r in runs:
        assert r["macs_ratio"] <= r["budget"] + 1e-9 and 0 <= r["acc"] <= 1
    # the scratch baseline has VTP's shape
    by = {(r["dataset"], r["budget"], r["method"], r["distill"]): r for r in runs}
    assert all(by[(d, b, "scratch", k)]["macs"] == by[(d, b, "vtp", k)]["macs"] for d, b, _, k in keys)
    out = capsys.readouterr().out
    assert "fine-tuned + KD" in out and "magnitude" in out
    # a second start with the same settings trains nothing again
    again = bench.main(argv)
    assert again["runs"] == runs
    assert "resuming, 40 fine-tunings already done" in capsys.readouterr().out
