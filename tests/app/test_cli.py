"""The `vtp` command end to end on a tiny ImageFolder, and its error messages."""
from __future__ import annotations

import argparse
import json
import os

import pytest
import torch
import yaml

import vtp
from vtp.app import cli

from cli_helpers import FAST, TINY_MODEL, cli_error, flags, tiny_dense_checkpoint

TRAIN = ["-b", "8", "--save-every", "0", "--log-every", "2"]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, data_dir):
    """One `vtp run` shared by the tests that read its outputs. The YAML file sets both
    stages' epochs; the command line overrides one of them. The run first stops inside
    sparse training (--stop-after-steps), then `vtp run --resume` completes it."""
    root = tmp_path_factory.mktemp("run")
    config = root / "settings.yaml"
    config.write_text(yaml.safe_dump({"sparse-epochs": 1, "finetune_epochs": 3, "ratio": 0.25,
                                      "round-to": 1, "bench_steps": 2, "bench-batch-size": 4}))
    out = root / "run"
    dense = tiny_dense_checkpoint(root / "dense.pth")
    argv = flags(["run", "--config", str(config), "--data", str(data_dir), "--output", str(out),
                  "--finetune-epochs", "1", "--checkpoint", str(dense)], TINY_MODEL, FAST, TRAIN)
    assert cli.main(argv + ["--stop-after-steps", "2"]) == 0
    assert (out / "sparse-train" / "checkpoints" / "last.pt").is_file()
    assert not (out / "sparse-train" / "model").exists() and not (out / "prune").exists()
    assert cli.main(argv + ["--resume"]) == 0
    return out


def test_every_flag_has_help_and_default_shown():
    parser, subs = cli.build_parser()
    for name, sub in subs.items():
        formatter = sub._get_formatter()
        for action in sub._actions:
            if action.dest == "help":
                continue
            where = f"vtp {name} {action.option_strings or action.dest}"
            assert action.help, f"{where}: no help"
            if action.default is not None and action.default is not False:
                assert "default" in formatter._get_help_string(action), f"{where}: default not shown"
        sub.format_help()


def test_run_writes_everything(full_run):
    out = full_run
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["sparse_epochs"] == 1 and cfg["finetune_epochs"] == 1 and cfg["ratio"] == 0.25
    for stage in ("sparse-train", "finetune"):
        rows = [json.loads(line) for line in (out / stage / "metrics.jsonl").read_text().splitlines()]
        kinds = {r["kind"] for r in rows}
        assert kinds == {"train", "epoch"}
        epoch = [r for r in rows if r["kind"] == "epoch"][-1]
        assert {"train_loss", "val_loss", "val_acc1", "images_per_s"} <= epoch.keys()
        train = [r for r in rows if r["kind"] == "train"][-1]
        assert {"loss", "lr", "images_per_s", "eta_s"} <= train.keys()
        assert (out / stage / "checkpoints" / "last.pt").is_file()
        assert yaml.safe_load((out / stage / "config.yaml").read_text())["finetune_epochs"] == 1
    # the plan, and three loadable models: gated, pruned, fine-tuned
    plan = vtp.PruningPlan.load(str(out / "prune" / "plan.json"))
    assert abs(plan.pruned_ratio - 0.25) < 0.05
    gated = vtp.load(out / "sparse-train" / "model")
    assert len(vtp.gates(gated)) == 2 * 4
    pruned = vtp.load(out / "prune" / "model")
    final = vtp.load(out / "finetune" / "model")
    assert sum(p.numel() for p in final.parameters()) == sum(p.numel() for p in pruned.parameters())
    assert sum(p.numel() for p in final.parameters()) < sum(p.numel() for p in gated.parameters())
    assert final(torch.randn(2, 3, 32, 32)).shape == (2, 4)
    dense = json.loads((out / "eval-dense" / "eval.json").read_text())
    small = json.loads((out / "eval-pruned" / "eval.json").read_text())
    assert small["params"] < dense["params"] and small["macs"] < dense["macs"]
    assert 0 <= small["val_acc1"] <= 100 and small["val_images"] == 16 and small["images_per_s"] > 0
    for png in ("kept_dims.png", "gate_hist.png", "curves.png"):
        assert (out / "report" / png).read_bytes()[:4] == b"\x89PNG"


def test_stage_commands_on_a_run(full_run, tmp_path, data_dir, capsys):
    """prune, eval and report as separate commands, taking the run directory as SOURCE."""
    assert cli.main(["prune", str(full_run), "--ratio", "0.5", "--round-to", "2",
                     "--output", str(tmp_path / "p")]) == 0
    plan = json.loads((tmp_path / "p" / "plan.json").read_text())
    assert all(len(k) % 2 == 0 for k in plan["kept"].values())
    assert cli.main(flags(["eval", str(tmp_path / "p"), "--data", str(data_dir), "--bench-steps", "1",
                           "--bench-batch-size", "2", "--output", str(tmp_path / "e")], FAST)) == 0
    result = json.loads((tmp_path / "e" / "eval.json").read_text())
    assert result["val_images"] == 16
    # no validation split: size, MACs and speed only
    assert cli.main(flags(["eval", str(tmp_path / "p"), "--data", str(data_dir), "--val-split", "",
                           "--bench-steps", "1", "--bench-batch-size", "2", "--output",
                           str(tmp_path / "e0")], FAST)) == 0
    result = json.loads((tmp_path / "e0" / "eval.json").read_text())
    assert "val_images" not in result and result["images_per_s"] > 0
    capsys.readouterr()
    assert cli.main(["report", str(full_run), "--output", str(tmp_path / "r")]) == 0
    text = capsys.readouterr().out
    assert "| dense |" in text and "fine-tuned" in text and "images/s" in text
    assert (tmp_path / "r" / "report.md").is_file()


def test_sparse_train_synthetic_then_finetune(tmp_path):
    """--synthetic needs no folder; finetune takes a prune directory."""
    common = flags(FAST, ["-b", "4", "--mixup", "0", "--cutmix", "0", "--save-every", "0"])
    assert cli.main(flags(["sparse-train", "--synthetic", "--synthetic-size", "8",
                           "--synthetic-val-size", "4", "--num-classes", "3", "--epochs", "1",
                           "--output", str(tmp_path / "s")], TINY_MODEL, common)) == 0
    assert cli.main(["prune", str(tmp_path / "s"), "--output", str(tmp_path / "p")]) == 0
    assert cli.main(flags(["finetune", str(tmp_path / "p"), "--synthetic", "--synthetic-size", "8",
                           "--synthetic-val-size", "0", "--epochs", "1", "--output",
                           str(tmp_path / "f")], common)) == 0
    assert vtp.load(tmp_path / "f" / "model").num_classes == 3


def test_demo_command_calls_vtp_demo(monkeypatch, tmp_path):
    seen = {}
    monkeypatch.setattr(cli.demo, "run", lambda args: seen.setdefault("args", args))
    assert cli.main(["demo", "--sparse-epochs", "1"]) == 0
    assert isinstance(seen["args"], argparse.Namespace) and seen["args"].sparse_epochs == 1
    # like every command, demo takes --config
    (tmp_path / "demo.yaml").write_text("dense-epochs: 2\n")
    seen.clear()
    assert cli.main(["demo", "--config", str(tmp_path / "demo.yaml")]) == 0
    assert seen["args"].dense_epochs == 2


# ---- errors: one clean message, before any work -------------------------------------------




def test_missing_data_folder(capsys, tmp_path):
    err = cli_error(capsys, ["sparse-train", "--data", str(tmp_path / "nope"), "--output",
                          str(tmp_path / "o")] + TINY_MODEL)
    assert "data folder not found" in err and not (tmp_path / "o").exists()
    (tmp_path / "d" / "train" / "a").mkdir(parents=True)
    err = cli_error(capsys, ["sparse-train", "--data", str(tmp_path / "d")] + TINY_MODEL)
    assert "no 'val' sub-folder" in err


def test_bad_yaml_key_and_value(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: 1\nlearning_rate: 0.1\n")
    err = cli_error(capsys, ["sparse-train", "--config", str(bad)], code=2)
    assert "unknown key 'learning_rate'" in err
    bad.write_text("scope: everywhere\n")
    err = cli_error(capsys, ["prune", "x", "--config", str(bad)], code=2)
    assert "'scope'" in err and "invalid choice" in err
    bad.write_text("epochs: many\n")
    err = cli_error(capsys, ["finetune", "x", "--config", str(bad)], code=2)
    assert "'epochs'" in err


def test_bad_flags(capsys, tmp_path):
    assert "--epochs: must be >= 1" in cli_error(capsys, ["sparse-train", "--epochs", "0"], code=2)
    assert "invalid choice" in cli_error(capsys, ["prune", "x", "--scope", "row"], code=2)
    assert "--model-kwargs" in cli_error(capsys, ["run", "--model-kwargs", "[1]"], code=2)
    out = tmp_path / "o"
    err = cli_error(capsys, ["sparse-train", "--synthetic", "--model", "no_such_vit", "-o", str(out)])
    assert "unknown timm model 'no_such_vit'" in err and not out.exists()


def test_checkpoint_that_does_not_fit(capsys, tmp_path, data_dir):
    import timm

    other = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32,
                              patch_size=8, embed_dim=32, depth=3, num_heads=2)
    torch.save({"model": other.state_dict()}, tmp_path / "deeper.pth")
    argv = flags(["sparse-train", "--data", str(data_dir), "--checkpoint", str(tmp_path / "deeper.pth"),
                  "--output", str(tmp_path / "o")], TINY_MODEL, FAST)
    err = cli_error(capsys, argv)
    assert "does not fit the model" in err and "unexpected keys (" in err and "blocks.2." in err
    assert "head.weight: checkpoint (10, 32) vs model (4, 32)" in err
    assert not (tmp_path / "o" / "checkpoints").exists()
    # same architecture, other class count: only the head differs, --reset-head takes it
    same = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32,
                             patch_size=8, embed_dim=32, depth=2, num_heads=2)
    torch.save({"model": same.state_dict()}, tmp_path / "ten.pth")
    argv[argv.index(str(tmp_path / "deeper.pth"))] = str(tmp_path / "ten.pth")
    assert "--reset-head" in cli_error(capsys, argv)
    assert cli.main(argv + ["--reset-head", "--epochs", "1", "-b", "8", "--save-every", "0"]) == 0
    gated = vtp.load(tmp_path / "o" / "model")
    assert gated.num_classes == 4


def test_nan_loss_stops_with_the_step(capsys, tmp_path, data_dir):
    out = tmp_path / "o"
    argv = flags(["sparse-train", "--data", str(data_dir), "--output", str(out), "--epochs", "1",
                  "-b", "8", "--lr", "1e30", "--lr-base-batch", "8", "--save-every", "1",
                  "--no-aug", "--drop-path", "0"], TINY_MODEL, FAST)
    err = cli_error(capsys, argv)
    assert "loss is nan" in err.lower() or "loss is inf" in err.lower()
    assert "at step 2 (epoch 0, step 2 of 4)" in err
    ckpt = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["global_step"] == 1 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_existing_run_needs_resume(capsys, tmp_path, full_run):
    err = cli_error(capsys, ["run", "--synthetic", "--output", str(full_run)] + TINY_MODEL)
    assert "already holds a run" in err and "--resume" in err
    # --resume where no checkpoint was written yet (a run killed before its first one, or none
    # begun) starts from the beginning and says so: the same command can always be re-run
    new = tmp_path / "new"
    assert cli.main(["sparse-train", "--synthetic", "--synthetic-size", "8", "--synthetic-val-size",
                     "0", "--num-classes", "4", "-b", "4", "--stop-after-steps", "1", "--resume",
                     "-o", str(new)] + TINY_MODEL + FAST) == 0
    said = capsys.readouterr().out
    assert "no checkpoint" in said and "starting from the beginning" in said
    assert torch.load(new / "checkpoints" / "last.pt", weights_only=True)["global_step"] == 1
    assert "--resume: give the --output" in cli_error(capsys, ["finetune", str(full_run), "--synthetic",
                                                            "--resume"])
    err = cli_error(capsys, ["prune", str(tmp_path)])
    assert "holds no model saved by vtp.save" in err


def test_bad_values_and_pruning_settings_stop_before_any_work(capsys, tmp_path, full_run):
    out = tmp_path / "o"
    assert "--mixup-prob: must be in [0, 1]" in cli_error(
        capsys, ["sparse-train", "--mixup-prob", "2"], code=2)
    assert "--seed: must be >= 0" in cli_error(capsys, ["sparse-train", "--seed", "-1"], code=2)
    assert "--img-size: must be >= 1" in cli_error(capsys, ["prune", "x", "--img-size", "0"], code=2)
    assert "--flops-target: must be in (0, 1]" in cli_error(
        capsys, ["run", "--flops-target", "0"], code=2)
    assert "--lr: expected a number, got 'fast'" in cli_error(
        capsys, ["finetune", "x", "--lr", "fast"], code=2)
    # vtp run would otherwise find these only after sparse training
    run = flags(["run", "--synthetic", "--synthetic-size", "4", "--synthetic-val-size", "0",
                 "--sparse-epochs", "1", "--finetune-epochs", "1", "-b", "4", "-o", str(out)],
                TINY_MODEL, FAST)
    err = cli_error(capsys, run + ["--flops-target", "0.5", "--scope", "layer"])
    assert "--flops-target" in err and "--scope layer" in err
    assert "--scope layer: --flops-target ranks dims globally; use --scope global" in err
    assert "--plan nope.json: file not found" in cli_error(capsys, run + ["--plan", "nope.json"])
    (tmp_path / "bad.json").write_text("{")
    assert f"--plan {tmp_path / 'bad.json'}: plan: not valid JSON" in cli_error(
        capsys, run + ["--plan", str(tmp_path / "bad.json")])
    err = cli_error(capsys, ["sparse-train", "--data", str(full_run.parent), "--train-split", "run",
                          "--val-split", "run", "--aa", "bogus", "-o", str(out)] + TINY_MODEL)
    assert "--aa bogus: not a timm augmentation policy" in err
    assert not out.exists()


def test_saved_model_settings_are_checked_before_any_work(capsys, tmp_path, full_run, data_dir):
    out = tmp_path / "o"
    data = ["--data", str(data_dir), "-o", str(out)]
    err = cli_error(capsys, ["eval", str(full_run), "--num-classes", "7"] + data)
    model = full_run / "finetune" / "model"
    assert f"--num-classes 7: the model in {model} predicts 4 classes" in err
    err = cli_error(capsys, ["finetune", str(full_run), "--img-size", "64"] + data)
    assert "--img-size 64: the model in" in err and "takes 32x32 images" in err
    err = cli_error(capsys, ["finetune", str(full_run / "sparse-train")] + data)
    assert "gated model that is not pruned" in err
    assert not out.exists()


def test_class_indices_follow_the_model(capsys, tmp_path, full_run, data_dir, monkeypatch):
    """Fine-tuning and evaluation label images with the class indices the model was trained
    with, also on a folder holding only some of its classes; a class folder the model does not
    know (or one the training split lacks) is an error, not silently dropped images."""
    import shutil

    from vtp.app import train

    subset = tmp_path / "subset"
    shutil.copytree(data_dir, subset)
    for split in ("train", "val"):
        shutil.rmtree(subset / split / "class_0")
    seen = {}

    def fake_fit(model, cfg, info, train_ds, val_ds, out_dir, **kwargs):
        seen["train"], seen["val"] = train_ds, val_ds
        return {"stopped": True}

    monkeypatch.setattr(train, "fit", fake_fit)
    assert cli.main(flags(["finetune", str(full_run), "--data", str(subset), "-b", "8",
                           "-o", str(tmp_path / "f")], FAST)) == 0
    for ds in (seen["train"], seen["val"]):
        samples = ds.base.reader.samples
        assert len(samples) > 0
        folders = {os.path.basename(os.path.dirname(path)) for path, _ in samples}
        assert folders == {"class_1", "class_2", "class_3"}
        assert all(target == int(os.path.basename(os.path.dirname(path))[len("class_"):])
                   for path, target in samples)

    (subset / "val" / "class_9").mkdir()
    shutil.copy(data_dir / "val" / "class_1" / "0.png", subset / "val" / "class_9" / "0.png")
    err = cli_error(capsys, flags(["eval", str(full_run), "--data", str(subset), "--bench-steps", "0",
                                "-o", str(tmp_path / "e")], FAST))
    assert "class folders class_9 are not among the 4 classes of the model" in err
    err = cli_error(capsys, flags(["sparse-train", "--data", str(subset), "-o", str(tmp_path / "s")],
                               TINY_MODEL, FAST))
    assert "class folders class_9 are not among the 3 classes of the training split" in err


def test_run_reads_only_what_rank_0_finished_writing(tmp_path, monkeypatch):
    """Under torchrun, rank 0 alone writes each stage's model and every process loads it for
    the next stage: between the write and any load there must be a collective (barrier or
    broadcast). Checked in one process by recording saves, collectives and loads. The dense
    checkpoint's normalisation also reaches the dense evaluation."""
    import timm

    from vtp.app import distributed, models

    dense = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, img_size=32,
                              patch_size=8, embed_dim=32, depth=2, num_heads=2)
    vtp.save(dense, tmp_path / "dense", metadata={"data": {"mean": [0.5] * 3, "std": [0.25] * 3}})
    events = []

    def spy(kind, real, path_arg=None):
        def call(*args, **kwargs):
            events.append((kind, None if path_arg is None else os.path.abspath(args[path_arg])))
            return real(*args, **kwargs)
        return call

    monkeypatch.setattr(vtp, "save", spy("write", vtp.save, 1))
    monkeypatch.setattr(models, "load_vtp_model", spy("read", models.load_vtp_model, 0))
    monkeypatch.setattr(distributed, "barrier", spy("sync", distributed.barrier))
    monkeypatch.setattr(distributed, "broadcast_object", spy("sync", distributed.broadcast_object))
    out = tmp_path / "run"
    assert cli.main(flags(["run", "--synthetic", "--synthetic-size", "8", "--synthetic-val-size",
                           "4", "--num-classes", "3", "--checkpoint", str(tmp_path / "dense"),
                           "--sparse-epochs", "1", "--finetune-epochs", "1", "-b", "4",
                           "--mixup", "0", "--cutmix", "0", "--bench-steps", "0",
                           "--save-every", "0", "-o", str(out)], TINY_MODEL, FAST)) == 0
    reads = [(i, path) for i, (kind, path) in enumerate(events) if kind == "read"]
    assert {path for _, path in reads} >= {str(out / stage / "model")
                                           for stage in ("sparse-train", "prune", "finetune")}
    for i, path in reads:
        writes = [j for j, event in enumerate(events[:i]) if event == ("write", path)]
        if writes:
            between = [kind for kind, _ in events[writes[-1] + 1:i]]
            assert "sync" in between, f"{path} loaded with no collective after rank 0 wrote it"
    for name in ("eval-dense", "eval-pruned"):
        result = json.loads((out / name / "eval.json").read_text())
        assert result["mean"] == [0.5] * 3 and result["std"] == [0.25] * 3, name


def test_report_plots_the_task_loss(full_run):
    from vtp.app import report

    rows = report.collect(str(full_run))["metrics"]
    sparse = [r for r in rows["sparse-train"] if r["kind"] == "epoch"][-1]
    tuned = [r for r in rows["finetune"] if r["kind"] == "epoch"][-1]
    # sparse training's loss holds lambda * sum|gate|, which the validation loss does not
    assert sparse["train_task_loss"] < sparse["train_loss"]
    assert tuned["train_task_loss"] == tuned["train_loss"]
    assert report._task_loss(sparse, "train_loss") == sparse["train_task_loss"]
    step = [r for r in rows["sparse-train"] if r["kind"] == "train"][-1]
    assert report._task_loss(step, "loss") == step["task_loss"] < step["loss"]
