"""The training loop: exact resume, gradient accumulation, checkpoints, state dict loading."""
from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest
import torch

from vtp.app import checkpoint, cli, metrics, models, train
from vtp.app import random as vtp_random
from vtp.app.errors import VTPError

from cli_helpers import FAST, TINY_MODEL, assert_same_tensors, flags, state_dict_of


def _sparse_argv(data_dir, out, *extra):
    # Every source of randomness on: RandAugment, random erasing, mixup/cutmix, drop path,
    # shuffling; 4 steps per epoch, 2 epochs, a mid-epoch checkpoint every 3 steps.
    return flags(["sparse-train", "--data", str(data_dir), "--output", str(out), "--epochs", "2",
                  "-b", "8", "--lr", "1e-3", "--lr-base-batch", "8", "--save-every", "3", "--log-every", "1",
                  "--warmup-epochs", "0.5", "--drop-path", "0.1"], TINY_MODEL, FAST, list(extra))


def _epoch_losses(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return ([(r["epoch"], r["train_loss"], r["val_loss"]) for r in rows if r["kind"] == "epoch"],
            [(r["step"], r["loss"]) for r in rows if r["kind"] == "train"])


class _Crash(KeyboardInterrupt):
    pass


def test_resume_reaches_the_same_weights(tmp_path, data_dir):
    """Crash mid-epoch (at step 7, after the step-6 checkpoint), resume; also stop cleanly at an
    epoch boundary with --stop-after-steps and resume: both end bitwise equal to one
    uninterrupted run, with the same metrics lines."""
    ref = tmp_path / "ref"
    assert cli.main(_sparse_argv(data_dir, ref)) == 0

    crashed = tmp_path / "crashed"

    def crash_at_7(loop):
        if loop.global_step == 7:
            raise _Crash()

    parser, subs = cli.build_parser()
    args = parser.parse_args(_sparse_argv(data_dir, crashed))
    with pytest.raises(KeyboardInterrupt):
        cli.cmd_sparse_train(args, subs["sparse-train"], after_step=crash_at_7)
    assert torch.load(crashed / "checkpoints" / "last.pt", weights_only=True)["global_step"] == 6
    assert not [p for p in (crashed / "checkpoints").iterdir() if ".tmp" in p.name]
    # what a fresh process would start from: other global random states
    torch.manual_seed(1234), random.seed(5), np.random.seed(6)
    assert cli.main(_sparse_argv(data_dir, crashed, "--resume")) == 0

    stopped = tmp_path / "stopped"
    assert cli.main(_sparse_argv(data_dir, stopped, "--stop-after-steps", "4")) == 0
    assert not (stopped / "model").exists()
    assert cli.main(_sparse_argv(data_dir, stopped, "--resume")) == 0

    expected = state_dict_of(ref / "model")
    for run in (crashed, stopped):
        assert_same_tensors(state_dict_of(run / "model"), expected)
        assert _epoch_losses(run) == _epoch_losses(ref)
        # the speed of an epoch counts its steps before the interruption too
        assert all(r["images_per_s"] > 0 and r["epoch_time_s"] > 0
                   for r in metrics.read_metrics(str(run / "metrics.jsonl")) if r["kind"] == "epoch")
    ckpt = torch.load(ref / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["step_in_epoch"] == 0 and ckpt["global_step"] == 8
    assert {"model", "optimizer", "scheduler", "scaler", "rng"} <= ckpt.keys()


def test_resume_with_float16_autocast_from_a_float32_checkpoint(tmp_path, capsys):
    """A checkpoint written without a gradient scaler resumes under --amp-dtype float16: the
    scaler starts afresh instead of failing on the empty state."""
    argv = flags(["sparse-train", "--synthetic", "--synthetic-size", "8", "--synthetic-val-size", "0",
                  "--num-classes", "3", "-b", "4", "--epochs", "1", "--mixup", "0", "--cutmix", "0",
                  "--output", str(tmp_path)], TINY_MODEL, FAST)
    assert cli.main(argv + ["--stop-after-steps", "1"]) == 0
    assert cli.main(argv + ["--resume", "--amp", "--amp-dtype", "float16"]) == 0
    assert "the scaler starts afresh" in capsys.readouterr().out
    ckpt = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["global_step"] == 2 and ckpt["scaler"]["scale"] > 0


def test_gradient_accumulation_matches_a_big_batch(tmp_path, data_dir):
    """4 images x 2 micro-batches per step equals 8 images per step (no augmentation, no
    randomness), up to float rounding of the summed gradients."""
    base = flags(["sparse-train", "--data", str(data_dir), "--epochs", "1", "--lr", "1e-3",
                  "--no-aug", "--drop-path", "0", "--save-every", "0"], TINY_MODEL, FAST)
    assert cli.main(base + ["-b", "8", "--output", str(tmp_path / "big")]) == 0
    assert cli.main(base + ["-b", "4", "--accum-steps", "2", "--output", str(tmp_path / "acc")]) == 0
    assert_same_tensors(state_dict_of(tmp_path / "acc" / "model"),
                        state_dict_of(tmp_path / "big" / "model"), atol=1e-5)


def test_lr_is_scaled_by_the_global_batch():
    cfg = train.TrainConfig(stage="finetune", epochs=1, batch_size=64, lr=5e-4, accum_steps=2)
    assert cfg.global_batch(8) == 1024
    assert cfg.scaled_lr(8) == pytest.approx(1e-3)


def test_scheduler_warms_up_then_decays_to_min_lr():
    model = torch.nn.Linear(2, 2)
    cfg = train.TrainConfig(stage="finetune", epochs=10, batch_size=1, lr=1.0, lr_base_batch=1,
                             warmup_epochs=1, warmup_lr=0.0, min_lr=0.01)
    opt = torch.optim.AdamW(model.parameters(), lr=1.0)
    sched = train.create_scheduler(opt, cfg, total_steps=100, steps_per_epoch=10)
    lrs = []
    for step in range(101):
        sched.step_update(step)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[0] == 0.0 and lrs[5] == pytest.approx(0.5) and max(lrs) <= 1.0
    assert lrs[10] == pytest.approx(max(lrs), rel=1e-3) and lrs[100] == pytest.approx(0.01)


def test_gates_get_no_weight_decay_and_their_own_lr_scale():
    import timm
    import vtp

    model = vtp.add_gates(timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=4,
                                            img_size=32, patch_size=8, embed_dim=32, depth=1,
                                            num_heads=2))
    cfg = train.TrainConfig(stage="sparse-train", epochs=1, batch_size=8, lr=1e-3, lr_base_batch=8,
                             gate_lr_scale=10.0, weight_decay=0.05)
    opt = train.create_optimizer(model, cfg, cfg.scaled_lr(1))
    train.create_scheduler(opt, cfg, total_steps=10, steps_per_epoch=10).step_update(0)
    gate_ids = {id(g) for g in vtp.gates(model).values()}
    for group in opt.param_groups:
        is_gate = {id(p) in gate_ids for p in group["params"]}
        assert len(is_gate) == 1
        if is_gate == {True}:
            assert group["weight_decay"] == 0 and group["lr"] == pytest.approx(1e-2)
        else:
            assert group["lr"] == pytest.approx(1e-3)


def test_rng_state_round_trip_through_a_weights_only_checkpoint(tmp_path):
    vtp_random.seed_everything(3)
    state = vtp_random.capture_rng(torch.device("cpu"))
    checkpoint.save_checkpoint(str(tmp_path / "c.pt"), {"rng": [state]})
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    vtp_random.seed_everything(99)
    vtp_random.restore_rng(checkpoint.load_checkpoint(str(tmp_path / "c.pt"))["rng"][0], torch.device("cpu"))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a
    assert os.listdir(tmp_path) == ["c.pt"]


def test_read_state_dict_unwraps_timm_and_ddp_checkpoints(tmp_path):
    weights = {"a.weight": torch.ones(2, 2), "b.bias": torch.zeros(2)}
    torch.save({"model": {f"module.{k}": v for k, v in weights.items()}, "epoch": 3}, tmp_path / "x.pth")
    assert models.read_state_dict(str(tmp_path / "x.pth")).keys() == weights.keys()
    from safetensors.torch import save_file
    save_file(weights, str(tmp_path / "x.safetensors"))
    assert models.read_state_dict(str(tmp_path / "x.safetensors")).keys() == weights.keys()
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(VTPError, match="cannot read checkpoint"):
        models.read_state_dict(str(tmp_path / "bad.pth"))


def test_metrics_past_the_checkpoint_are_dropped(tmp_path):
    log = metrics.MetricsLogger(str(tmp_path / "m.jsonl"))
    for step in range(1, 7):
        log.log({"kind": "train", "step": step})
    log.log({"kind": "epoch", "epoch": 0, "step": 4})
    with open(tmp_path / "m.jsonl", "a") as f:
        f.write('{"kind": "tra')  # cut short by the crash
    log.truncate_after(global_step=3, epoch=0)
    rows = metrics.read_metrics(str(tmp_path / "m.jsonl"))
    assert [r["step"] for r in rows] == [1, 2, 3]
