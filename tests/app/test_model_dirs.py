"""A model directory carries its model (issue 16): a `vtp train` result of a non-default
architecture is taken by `vtp run --checkpoint`, SOURCE and `--teacher` without repeating
the architecture's flags; flags that agree are accepted, flags that disagree stop with both
values named. And `vtp run` times the dense and the pruned model in turns, in one process."""
from __future__ import annotations

import json
import os

import pytest
import timm
import torch

import vtp
from vtp.app import cli

from cli_helpers import FAST, cli_error, flags

# The "faces" model: every shape flag differs from what vit_tiny_patch16_224 builds.
FACES_ARCH = ["--img-size", "32", "--patch-size", "8", "--embed-dim", "48", "--depth", "3",
              "--num-heads", "4"]
QUICK = ["-b", "8", "--save-every", "0", "--mixup", "0", "--cutmix", "0"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir):
    """`vtp train` of the faces model for one epoch: T/model."""
    out = tmp_path_factory.mktemp("faces") / "T"
    assert cli.main(flags(["train", "--data", str(data_dir), "--model", "vit_tiny_patch16_224",
                           "--epochs", "1", "-o", str(out)], FACES_ARCH, QUICK, FAST)) == 0
    return out / "model"


@pytest.fixture(scope="module")
def faces_run(tmp_path_factory, data_dir, trained):
    """`vtp run --checkpoint T/model` with no model flags, distilled from --teacher T/model."""
    out = tmp_path_factory.mktemp("faces-run") / "run"
    assert cli.main(flags(["run", "--data", str(data_dir), "--checkpoint", str(trained),
                           "--sparse-epochs", "1", "--finetune-epochs", "1", "--ratio", "0.25",
                           "--round-to", "1", "--distill", "--teacher", str(trained),
                           "--bench-steps", "5", "--bench-batch-size", "4", "-o", str(out)],
                          QUICK, FAST)) == 0
    return out


def _run_argv(data_dir, trained, out, *extra):
    return flags(["run", "--data", str(data_dir), "--checkpoint", str(trained),
                  "--sparse-epochs", "1", "--finetune-epochs", "1", "-o", str(out)],
                 QUICK, FAST, list(extra))


def test_run_builds_the_checkpoint_directory_s_model(faces_run, trained):
    gated = vtp.load(faces_run / "sparse-train" / "model")
    assert len(gated.blocks) == 3 and gated.embed_dim == 48 and gated.blocks[0].attn.num_heads == 4
    assert gated.patch_embed.patch_size == (8, 8)
    distilled = vtp.read_config(faces_run / "finetune" / "model").metadata["distill"]
    assert distilled["teacher"] == os.path.abspath(trained)
    dense = json.loads((faces_run / "eval-dense" / "eval.json").read_text())
    want = vtp.profile(vtp.load(trained), (32, 32))
    assert dense["params"] == want.params and dense["macs"] == want.macs


def test_run_times_dense_and_pruned_in_turns(faces_run):
    """eval-pruned times the dense model in turns with the pruned one: both figures, every
    repetition, medians and spread, in this one process; the report uses those figures."""
    result = json.loads((faces_run / "eval-pruned" / "eval.json").read_text())
    speed = result["speed"]
    assert speed["in_turns"] is True and speed["pid"] == os.getpid()
    assert speed["repeats"] == 5 and speed["batch_size"] == 4
    assert set(speed["models"]) == {"dense", "pruned"}
    for name, record in speed["models"].items():
        assert len(record["seconds"]) == 5 and record["repeats"] == 5, name
        assert record["min"] <= record["q1"] <= record["images_per_s"] <= record["q3"] <= record["max"]
        assert record["images_per_s"] == pytest.approx(4 / sorted(record["seconds"])[2]), name
    assert result["images_per_s"] == speed["models"]["pruned"]["images_per_s"]
    report = (faces_run / "report" / "report.md").read_text()
    assert "timed in turns in one process, medians of 5 batches" in report
    dense_ips = speed["models"]["dense"]["images_per_s"]
    assert f"{dense_ips:.1f}" in report.split("| dense")[1].split("\n")[0]


def test_agreeing_model_flags_are_accepted(tmp_path, data_dir, trained):
    out = tmp_path / "agree"
    assert cli.main(_run_argv(data_dir, trained, out, "--model", "vit_tiny_patch16_224",
                              "--depth", "3", "--embed-dim", "48", "--img-size", "32",
                              "--model-kwargs", '{"num_heads": 4}', "--stop-after-steps", "1")) == 0
    assert (out / "eval-dense" / "eval.json").is_file()
    assert (out / "sparse-train" / "checkpoints" / "last.pt").is_file()


@pytest.mark.parametrize("flag, given, saved", [
    (["--depth", "2"], "--depth 2", "depth 3"),
    (["--embed-dim", "64"], "--embed-dim 64", "embed_dim 48"),
    (["--img-size", "64"], "--img-size 64", "32x32"),
    (["--model", "deit_small_patch16_224"], "--model deit_small_patch16_224", "vit_tiny_patch16_224"),
    (["--model-kwargs", '{"num_heads": 2}'], "num_heads=2", "num_heads 4"),
])
def test_disagreeing_model_flags_name_both_values(tmp_path, capsys, data_dir, trained, flag, given, saved):
    out = tmp_path / "disagree"
    err = cli_error(capsys, _run_argv(data_dir, trained, out, *flag))
    assert given in err and saved in err and str(trained) in err
    assert not out.exists()
    err = cli_error(capsys, flags(["sparse-train", "--data", str(data_dir), "--checkpoint",
                                   str(trained), "-o", str(out)], flag, QUICK, FAST))
    assert given in err and saved in err
    assert not out.exists()


def test_source_directories_carry_their_model(tmp_path, capsys, data_dir, trained):
    """SOURCE of eval and finetune: agreeing --img-size/--num-classes accepted, others not."""
    assert cli.main(flags(["eval", str(trained), "--data", str(data_dir), "--img-size", "32",
                           "--num-classes", "4", "--bench-steps", "0", "-o", str(tmp_path / "e")],
                          FAST)) == 0
    assert json.loads((tmp_path / "e" / "eval.json").read_text())["val_images"] == 16
    err = cli_error(capsys, flags(["eval", str(trained), "--data", str(data_dir), "--img-size", "48",
                                   "-o", str(tmp_path / "e2")], FAST))
    assert "--img-size 48" in err and "32x32" in err
    err = cli_error(capsys, flags(["finetune", str(trained.parent), "--data", str(data_dir),
                                   "--num-classes", "3", "-o", str(tmp_path / "f")], FAST))
    assert "--num-classes 3" in err and "predicts 4 classes" in err
    assert not (tmp_path / "e2").exists() and not (tmp_path / "f").exists()


def test_teacher_directory_must_fit(tmp_path, capsys, data_dir, trained):
    """--teacher DIR carries its model: one of other classes or image size stops the run
    before any work, naming both values."""
    torch.manual_seed(0)
    other_classes = timm.create_model("vit_tiny_patch16_224", num_classes=3, img_size=32,
                                      patch_size=8, embed_dim=48, depth=3, num_heads=4)
    vtp.save(other_classes, tmp_path / "t3")
    other_size = timm.create_model("vit_tiny_patch16_224", num_classes=4, img_size=64,
                                   patch_size=8, embed_dim=48, depth=3, num_heads=4)
    vtp.save(other_size, tmp_path / "t64")
    out = tmp_path / "run"
    err = cli_error(capsys, _run_argv(data_dir, trained, out, "--distill", "--teacher",
                                      str(tmp_path / "t3")))
    assert "predicts 3 classes" in err and "the data has 4" in err
    err = cli_error(capsys, _run_argv(data_dir, trained, out, "--distill", "--teacher",
                                      str(tmp_path / "t64")))
    assert "takes 64x64 images" in err and "the student 32x32" in err
    assert not out.exists()
