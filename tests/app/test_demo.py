"""The quick-start demo, cut to one epoch per stage: every stage runs and writes its files."""
import json

import pytest
import torch

import vtp
from vtp.app import demo


def test_demo_pipeline_end_to_end(tmp_path, capsys):
    results = demo.main(["--out", str(tmp_path), "--dense-epochs", "1", "--sparse-epochs", "1",
                         "--finetune-epochs", "1", "--no-progress", "--threads", "1", "--ratio", "0.4",
                         "--round-to", "1"])
    written = json.loads((tmp_path / "results.json").read_text())
    assert written["pruned"]["macs"] == results["pruned"]["macs"] < results["dense"]["macs"]
    assert abs(written["plan"]["pruned_share"] - 0.4) < 1e-3
    for name in ("dense", "pruned"):
        assert 0.0 <= written[name]["test_acc"] <= 1.0 and written[name]["images_per_s"] > 0
        assert len(written[name]["seconds"]) == 15
    small = vtp.load(tmp_path / "pruned")
    assert vtp.profile(small).macs == results["pruned"]["macs"]
    assert vtp.PruningPlan.load(str(tmp_path / "plan.json")) == small.vtp_plan
    assert (tmp_path / "kept_dims.png").stat().st_size > 0 and (tmp_path / "gate_hist.png").stat().st_size > 0
    out = capsys.readouterr().out
    assert "top-1 %" in out and "pruned" in out


def test_demo_data_is_real_mnist():
    from vtp.app.mnist import load_mnist_5k
    images, labels = load_mnist_5k()
    assert images.shape == (5000, 1, 28, 28) and labels.shape == (5000,)
    assert torch.bincount(labels, minlength=10).min() >= 400  # every digit, roughly balanced
    assert abs(images.mean().item()) < 0.05 and abs(images.std().item() - 1) < 0.05


@pytest.mark.parametrize("flag, value, match", [
    ("--ratio", "1.0", "--ratio: expected a share"),
    ("--lam", "-1", "--lam: expected"),
    ("--lr", "0", "--lr: expected"),
    ("--threads", "-2", "--threads: expected"),
    ("--batch-size", "0", "--batch-size: expected"),
    ("--flops-target", "0", "--flops-target: expected"),
    ("--distill-alpha", "1.5", "--distill-alpha: expected"),
    ("--distill-tau", "0", "--distill-tau: expected"),
    ("--finetune-lr", "0", "--finetune-lr: expected"),
])
def test_demo_rejects_bad_settings_before_training(tmp_path, flag, value, match):
    with pytest.raises(ValueError, match=match):
        demo.main(["--out", str(tmp_path / "d"), flag, value])
    assert not (tmp_path / "d").exists()
