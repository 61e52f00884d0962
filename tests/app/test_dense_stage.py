"""The dense stage: `vtp train` (exact resume like the other stages), timm's pretrained weights
from a local file, and `vtp run`, which never prunes an untrained model."""
from __future__ import annotations

import json

import torch

import vtp
from vtp.app import cli

from cli_helpers import (FAST, TINY_MODEL, assert_same_tensors, cli_error, flags, state_dict_of,
                         tiny_dense_checkpoint)


def _train_argv(data_dir, out, *extra):
    # augmentation, mixup, drop path and shuffling on; 4 steps per epoch, 2 epochs
    return flags(["train", "--data", str(data_dir), "--output", str(out), "--epochs", "2", "-b", "8",
                  "--lr", "1e-3", "--lr-base-batch", "8", "--warmup-epochs", "0.5", "--save-every", "3",
                  "--log-every", "1"], TINY_MODEL, FAST, list(extra))


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_train_resumes_to_the_same_weights(tmp_path, data_dir):
    ref = tmp_path / "ref"
    assert cli.main(_train_argv(data_dir, ref)) == 0
    cut = tmp_path / "cut"
    assert cli.main(_train_argv(data_dir, cut, "--stop-after-steps", "3")) == 0  # mid-epoch
    assert not (cut / "model").exists()
    torch.manual_seed(99)
    assert cli.main(_train_argv(data_dir, cut, "--resume")) == 0
    assert_same_tensors(state_dict_of(cut / "model"), state_dict_of(ref / "model"))
    assert [(r["kind"], r["step"], r.get("loss"), r.get("val_loss")) for r in _rows(cut)] == \
        [(r["kind"], r["step"], r.get("loss"), r.get("val_loss")) for r in _rows(ref)]
    saved = vtp.io.read_config(ref / "model")
    assert saved.metadata["stage"] == "train" and not saved.gated_sites
    assert saved.metadata["data"]["class_to_idx"] == {f"class_{c}": c for c in range(4)}
    # what it trained is what sparse training starts from
    assert cli.main(flags(["sparse-train", "--data", str(data_dir), "--checkpoint", str(ref / "model"),
                           "--epochs", "1", "-b", "8", "--save-every", "0", "-o", str(tmp_path / "s")],
                          TINY_MODEL, FAST)) == 0
    assert vtp.io.read_config(tmp_path / "s" / "model").metadata["dense"]["checkpoint"] == str(ref / "model")


def test_pretrained_weights_from_a_local_file(tmp_path, data_dir):
    """--pretrained-path goes through timm's pretrained loading (never the network): the
    weights arrive as they are; another class count drops only the classifier."""
    weights = tiny_dense_checkpoint(tmp_path / "w.pth", num_classes=4)
    expected = torch.load(weights, weights_only=True)["model"]
    frozen = ["--epochs", "1", "-b", "8", "--lr", "0", "--warmup-lr", "0", "--min-lr", "0",
              "--weight-decay", "0", "--save-every", "0"]
    assert cli.main(flags(["train", "--data", str(data_dir), "--pretrained-path", str(weights),
                           "-o", str(tmp_path / "same")], TINY_MODEL, FAST, frozen)) == 0
    assert_same_tensors(state_dict_of(tmp_path / "same" / "model"), expected)
    assert cli.main(flags(["sparse-train", "--data", str(data_dir), "--num-classes", "6",
                           "--pretrained", "--pretrained-path", str(weights),
                           "-o", str(tmp_path / "six")], TINY_MODEL, FAST, frozen)) == 0
    got = state_dict_of(tmp_path / "six" / "model")
    assert got["head.weight"].shape == (6, 32)
    assert_same_tensors({k: v for k, v in got.items() if k in expected and not k.startswith("head.")},
                        {k: v for k, v in expected.items() if not k.startswith("head.")})
    assert vtp.io.read_config(tmp_path / "six" / "model").metadata["dense"]["head_reset"] is True


def test_run_without_a_trained_model_stops_before_any_work(capsys, tmp_path, data_dir):
    out = tmp_path / "o"
    run = flags(["run", "--data", str(data_dir), "-o", str(out)], TINY_MODEL, FAST)
    err = cli_error(capsys, run)
    assert "vtp run prunes a trained model, and none was given" in err
    assert "--checkpoint PATH" in err and "--train-epochs N" in err and "vtp train" in err
    dense = tiny_dense_checkpoint(tmp_path / "ten.pth", num_classes=10)
    err = cli_error(capsys, run + ["--checkpoint", str(dense), "--reset-head"])
    assert "--reset-head starts the classifier afresh" in err and "--train-epochs N" in err
    err = cli_error(capsys, run + ["--pretrained-path", str(dense)])
    assert "the weights predict 10 classes, the data has 4" in err
    err = cli_error(capsys, run + ["--pretrained-path", str(dense), "--checkpoint", str(dense)])
    assert "--checkpoint and --pretrained both give the starting weights" in err
    assert not out.exists()


def test_every_stage_that_builds_a_model_takes_pretrained():
    _, subs = cli.build_parser()
    for name in ("train", "sparse-train", "run"):
        options = {o for a in subs[name]._actions for o in a.option_strings}
        assert {"--pretrained", "--pretrained-path", "--checkpoint", "--reset-head"} <= options, name
    assert subs["run"].get_default("train_epochs") == 0
    assert {"--distill", "--teacher", "--distill-type", "--distill-alpha", "--distill-tau"} <= \
        {o for a in subs["finetune"]._actions for o in a.option_strings}


def test_pretrained_from_the_hub_fails_with_a_clear_message(capsys, tmp_path, monkeypatch):
    """--pretrained without a file goes to timm's hub loader; here a stand-in for it fails as
    it would without network or cache (no test touches the network)."""
    import timm.models._builder as builder

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(builder, "load_state_dict_from_hf", offline)
    monkeypatch.setattr(builder, "load_state_dict_from_url", offline)
    out = tmp_path / "o"
    err = cli_error(capsys, flags(["train", "--synthetic", "--pretrained", "-o", str(out)], TINY_MODEL, FAST))
    assert "--pretrained: cannot load vit_tiny_patch16_224's weights from timm's hub" in err
    assert "--pretrained-path FILE" in err
