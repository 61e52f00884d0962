"""`vtp prune --latency-target` end to end on the tiny ImageFolder, `vtp eval` of its model
printing measured against predicted latency, and the flags' errors. The latency table is
really measured (a tiny ViT, on this CPU) into a private VTP_CACHE; nothing asserts on
this machine's speed."""
from __future__ import annotations

import json

import pytest

import vtp
from vtp.app import cli

from cli_helpers import FAST, TINY_MODEL, cli_error, flags


@pytest.fixture(scope="module")
def sparse_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("sparse") / "s"
    common = flags(FAST, ["-b", "4", "--mixup", "0", "--cutmix", "0", "--save-every", "0"])
    assert cli.main(flags(["sparse-train", "--synthetic", "--synthetic-size", "8", "--synthetic-val-size", "4",
                           "--num-classes", "4", "--epochs", "1", "--output", str(out)], TINY_MODEL, common)) == 0
    return out


def test_prune_to_a_latency_target_then_eval_measures_it(sparse_dir, data_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VTP_CACHE", str(tmp_path / "cache"))
    # The table measured first, as the command will ask for it (this CPU, batch 2, fp32, the
    # current threads): the command reads it from the cache, and the target is one this
    # measurement can meet (a busy machine can put even constant branches above 0.8).
    table = vtp.latency_table(vtp.load(sparse_dir / "model"), 2)
    target = round(min(1.0, max(0.8, table.predict([vtp.BlockWidths(0, (), (), (), 0, 0)] * len(table.blocks))
                                / table.dense_ms + 0.05)), 3)
    capsys.readouterr()
    assert cli.main(["prune", str(sparse_dir), "--latency-target", str(target), "--latency-batch-size", "2",
                     "--output", str(tmp_path / "p")]) == 0
    said = capsys.readouterr().out
    assert "predicted latency" in said and "at batch 2" in said
    plan = vtp.PruningPlan.load(str(tmp_path / "p" / "plan.json"))
    lat = plan.rule["latency"]
    assert plan.rule["latency_target"] == target and lat["batch_size"] == 2 and lat["device_type"] == "cpu"
    # the table's plan (round 0) fits its prediction; one round of measure-and-replan (the
    # default) may then move the budget by what the model measured, here, on this CPU
    assert lat["refine"] == 1 and 1 <= len(lat["rounds"]) <= 2
    assert lat["rounds"][0]["predicted_share"] <= target * (1 + 1e-9) and lat["rounds"][0]["budget_share"] == target
    assert lat["measured_share"] == lat["rounds"][lat["chosen_round"]]["measured_share"] > 0
    assert "prune: measured" in said and "of the dense model's latency" in said
    assert lat["table_key"] == table.key and lat["table_file"]  # the cached table, not a second measurement
    pruned = vtp.load(tmp_path / "p" / "model")
    table = vtp.LatencyTable.from_dict(json.loads(open(lat["table_file"]).read()))
    assert table.predict(vtp.model_widths(pruned)) == pytest.approx(lat["predicted_ms"])

    assert cli.main(flags(["eval", str(tmp_path / "p"), "--data", str(data_dir), "--bench-steps", "2",
                           "--bench-batch-size", "2", "--output", str(tmp_path / "e")], FAST)) == 0
    said = capsys.readouterr().out
    assert "latency at batch 2: measured" in said and "predicted" in said
    result = json.loads((tmp_path / "e" / "eval.json").read_text())["latency"]
    assert result["batch_size"] == 2 and result["predicted_ms"] == pytest.approx(lat["predicted_ms"])
    assert result["measured_ms"] > 0 and result["repeats"] >= 5 and len(result["samples_ms"]) == result["repeats"]
    assert result["measured_over_predicted"] == pytest.approx(result["measured_ms"] / result["predicted_ms"])
    assert result["planned_measured_share"] == lat["measured_share"] and "the plan measured" in said


def test_latency_refine_0_plans_from_the_table_alone(sparse_dir, tmp_path, monkeypatch, capsys):
    import vtp._latency_plan as latency_plan
    monkeypatch.setenv("VTP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(latency_plan, "PlanTimer", lambda *a: pytest.fail("timed a plan with --latency-refine 0"))
    assert cli.main(["prune", str(sparse_dir), "--latency-target", "1.0", "--latency-batch-size", "1",
                     "--latency-refine", "0", "--output", str(tmp_path / "p")]) == 0
    lat = vtp.PruningPlan.load(str(tmp_path / "p" / "plan.json")).rule["latency"]
    assert lat["refine"] == 0 and "measured_share" not in lat and "prune: measured" not in capsys.readouterr().out


def test_a_model_pruned_without_a_latency_target_has_no_latency_record(sparse_dir, data_dir, tmp_path):
    assert cli.main(["prune", str(sparse_dir), "--output", str(tmp_path / "p")]) == 0
    assert "latency" not in vtp.PruningPlan.load(str(tmp_path / "p" / "plan.json")).rule
    assert cli.main(flags(["eval", str(tmp_path / "p"), "--data", str(data_dir), "--bench-steps", "1",
                           "--bench-batch-size", "2", "--output", str(tmp_path / "e")], FAST)) == 0
    assert "latency" not in json.loads((tmp_path / "e" / "eval.json").read_text())


@pytest.mark.parametrize("extra, message", [
    (["--ratio", "0.3"], "--ratio and --latency-target"),
    (["--flops-target", "0.5"], "--flops-target and --latency-target"),
    (["--latency-batch-size", "0"], "--latency-batch-size"),
    (["--device", "cuda"], "cuda"),
    (["--latency-refine", "-1"], "--latency-refine"),
    (["--latency-refine", "1.5"], "--latency-refine"),
])
def test_latency_flags_errors_name_the_flags_before_any_work(sparse_dir, tmp_path, capsys, extra, message,
                                                            monkeypatch):
    import torch
    import vtp._latency as latency
    if "cuda" in extra and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    monkeypatch.setattr(latency, "_measure", lambda *a: pytest.fail("measured before checking the flags"))
    code = 2 if extra[0] in ("--latency-batch-size", "--latency-refine") else 1
    err = cli_error(capsys, ["prune", str(sparse_dir), "--latency-target", "0.5", *extra,
                             "--output", str(tmp_path / "p")], code=code)
    assert message in err
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize("extra, message", [
    (["--ratio", "0.3"], "--latency-refine 2: measures a latency plan; give it only with --latency-target, "
                         "not with --ratio"),
    (["--flops-target", "0.5"], "--latency-refine 2: measures a latency plan; give it only with --latency-target, "
                                "not with --flops-target"),
])
def test_latency_refine_without_a_latency_target_is_a_flag_error(sparse_dir, tmp_path, capsys, extra, message):
    err = cli_error(capsys, ["prune", str(sparse_dir), *extra, "--latency-refine", "2",
                             "--output", str(tmp_path / "p")], code=1)
    assert message in err
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize("value", ["0", "1.5"])
def test_latency_target_out_of_range_is_a_flag_error(sparse_dir, capsys, value):
    assert "--latency-target" in cli_error(capsys, ["prune", str(sparse_dir), "--latency-target", value], code=2)


def test_help_explains_the_latency_flags(capsys):
    with pytest.raises(SystemExit):
        cli.main(["prune", "--help"])
    text = capsys.readouterr().out
    assert "--latency-target" in text and "--latency-batch-size" in text and "latency table" in text
    assert "--latency-refine" in text and "measure-and-replan" in text
    with pytest.raises(SystemExit):
        cli.main(["run", "--help"])
    text = capsys.readouterr().out
    assert "--latency-target" in text and "--latency-refine" in text
