"""Two processes under torchrun (gloo, CPU) train like one process with the same global batch."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch.distributed as dist

import vtp
from vtp.app import cli

from cli_helpers import FAST, REPO, TINY_MODEL, assert_same_tensors, flags, make_image_folder, \
    state_dict_of, subprocess_env

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_match_one(tmp_path):
    """Same global batch of 8: one process x 8 images vs two processes x 4 images. With
    augmentation and drop path off, both see the same images per step and average the same
    gradients; only the summation order differs. Losses agree to 1e-6 (relative). Weights
    agree to 1e-4 after 8 AdamW steps of lr 1e-3: most to 1e-7, but AdamW normalises the
    update, so a parameter whose gradient is nearly zero (the attention key bias, whose exact
    gradient is 0 because softmax ignores a shift) moves by up to lr per step whatever the
    rounding noise; 1e-4 is a tenth of one such step."""
    data = make_image_folder(tmp_path / "data", train_per_class=8, val_per_class=3)
    # 13 validation images: 7 and 6 per process, 3 and 2 batches of 3
    shutil.copy(data / "val" / "class_0" / "0.png", data / "val" / "class_0" / "extra.png")
    common = flags(["sparse-train", "--data", str(data), "--epochs", "2", "--lr", "1e-3",
                    "--lr-base-batch", "8", "--no-aug", "--drop-path", "0", "--save-every", "0",
                    "--log-every", "1", "--eval-batch-size", "3"], TINY_MODEL, FAST)
    assert cli.main(common + ["-b", "8", "--output", str(tmp_path / "one")]) == 0

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "vtp.app"] + common + ["-b", "4", "--output", str(tmp_path / "two")]
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # rank 0 alone prints and writes
    assert proc.stdout.count("sparse-train epoch 2/2") == 1

    assert_same_tensors(state_dict_of(tmp_path / "two" / "model"),
                        state_dict_of(tmp_path / "one" / "model"), atol=1e-4)
    one, two = _rows(tmp_path / "one"), _rows(tmp_path / "two")
    assert [(r["kind"], r["step"]) for r in one] == [(r["kind"], r["step"]) for r in two]
    for a, b in zip(one, two):
        for key in ("loss", "train_loss", "val_loss", "val_acc1", "lr"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-7), (key, a, b)
    # the uneven validation split is counted once, with no image twice or missing
    assert [r["val_images"] for r in two if r["kind"] == "epoch"] == [13, 13]


def _plan_with_every_pruned_form(path):
    """A plan for TINY_MODEL (2 blocks, width 32, 2 heads of 16, MLP 128) that leaves a
    constant attention branch, a head with a narrower value width next to a dropped head, and
    a LayerNorm emitting half its columns: every module DDP has to train after pruning."""
    widths = {"attn_in": 32, "attn_out": 32, "mlp_in": 32, "mlp_hidden": 128}
    sizes = {f"blocks.{b}.{site}": n for b in range(2) for site, n in widths.items()}
    kept = {name: list(range(n)) for name, n in sizes.items()}
    kept.update({"blocks.0.attn_in": [], "blocks.1.attn_out": list(range(16, 24)),
                 "blocks.1.mlp_in": list(range(0, 32, 2)), "blocks.1.mlp_hidden": list(range(40))})
    path.write_text(json.dumps({"format": "vtp-plan", "version": 1, "head_dim": 16, "rule": {},
                                "sizes": sizes, "kept": kept}))
    return path


def test_two_processes_run_the_whole_pipeline(tmp_path):
    """`vtp run` under torchrun: each stage loads what rank 0 wrote for it (the dense stage's
    model too), and the pruned model (constant branch, pruned heads, narrowed LayerNorm)
    trains under DDP, distilled from a teacher that every process builds for itself."""
    plan = _plan_with_every_pruned_form(tmp_path / "plan.json")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "vtp.app"] + flags(
        ["run", "--synthetic", "--synthetic-size", "8", "--synthetic-val-size", "5",
         "--num-classes", "3", "-b", "2", "--accum-steps", "2", "--train-epochs", "1",
         "--sparse-epochs", "1", "--distill",
         "--finetune-epochs", "1", "--bench-steps", "0", "--save-every", "0", "--plan", str(plan),
         "--output", str(out)], TINY_MODEL, FAST)
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("finetune epoch 1/1") == 1
    pruned = vtp.load(out / "finetune" / "model")
    assert type(pruned.blocks[0].attn).__name__ == "ConstantBranch"
    assert pruned.blocks[1].attn.v_widths == (8,)
    for name in ("eval-dense", "eval-pruned"):
        assert json.loads((out / name / "eval.json").read_text())["val_images"] == 5
