"""Distillation while fine-tuning: the loss against a hand computation, a teacher that gets
no gradients and is never saved with the student, resume that finds the teacher again, and
the flags' errors before any work."""
from __future__ import annotations

import math
import os

import pytest
import timm
import torch
import torch.nn as nn

import vtp
from vtp.app import cli, distill, train
from vtp.app.distributed import DistInfo

from cli_helpers import FAST, TINY_MODEL, assert_same_tensors, cli_error, flags, state_dict_of


def _tiny_vit(num_classes=3, **kwargs):
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=num_classes,
                             img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, **kwargs)


# ---- the loss --------------------------------------------------------------------------------


STUDENT = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]])
TEACHER = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 3.0]])


def _softmax(row, tau):
    e = [math.exp(v / tau) for v in row]
    return [v / sum(e) for v in e]


def test_soft_and_hard_terms_equal_a_hand_computation():
    tau = 2.0
    kl = 0.0
    for s_row, t_row in zip(STUDENT.tolist(), TEACHER.tolist()):
        p_t, p_s = _softmax(t_row, tau), _softmax(s_row, tau)
        kl += sum(t * math.log(t / s) for t, s in zip(p_t, p_s))
    expected_soft = kl / 2 * tau ** 2  # mean over the two images, times T^2
    got = distill.distillation_loss(STUDENT, TEACHER, "soft", tau)
    assert got.item() == pytest.approx(expected_soft, rel=1e-6)
    # hard: cross-entropy against the teacher's top class (0, then 2)
    expected_hard = (-math.log(_softmax(STUDENT[0].tolist(), 1)[0])
                     - math.log(_softmax(STUDENT[1].tolist(), 1)[2])) / 2
    assert distill.distillation_loss(STUDENT, TEACHER, "hard").item() == pytest.approx(expected_hard, rel=1e-6)


class _Fixed(nn.Module):
    """A 'teacher' whose logits are the table above, whatever the images."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits
        self.weight = nn.Parameter(torch.ones(()))

    def forward(self, images):
        return self.logits * self.weight


def test_mixed_loss_and_the_two_token_student():
    targets = torch.tensor([0, 1])
    ce = nn.CrossEntropyLoss()
    d = distill.Distiller(_Fixed(TEACHER), "soft", alpha=0.25, tau=2.0)
    images = torch.zeros(2, 3, 4, 4)
    task = ce(STUDENT, targets).item()
    kd = distill.distillation_loss(STUDENT, TEACHER, "soft", 2.0).item()
    assert d.loss(images, STUDENT, targets, ce).item() == pytest.approx(0.75 * task + 0.25 * kd, rel=1e-6)
    # DeiT's scheme: the class token's logits take the task loss, the distillation token's
    # the teacher's hard labels
    dist_logits = torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    hard = distill.Distiller(_Fixed(TEACHER), "hard", alpha=0.5)
    expected = 0.5 * task + 0.5 * ce(dist_logits, TEACHER.argmax(-1)).item()
    assert hard.loss(images, (STUDENT, dist_logits), targets, ce).item() == pytest.approx(expected, rel=1e-6)
    assert distill.Distiller(_Fixed(TEACHER), alpha=0.0).loss(images, STUDENT, targets, ce).item() \
        == pytest.approx(task)


@pytest.mark.parametrize("kind, alpha, tau, match", [
    ("soft", 1.5, 1.0, "alpha"), ("soft", -0.1, 1.0, "alpha"), ("soft", 0.5, 0.0, "tau"),
    ("warm", 0.5, 1.0, "kind")])
def test_bad_settings_are_errors(kind, alpha, tau, match):
    with pytest.raises(ValueError, match=match):
        distill.Distiller(_Fixed(TEACHER), kind, alpha, tau)


def test_the_teacher_gets_no_gradients_and_stays_in_eval_mode():
    torch.manual_seed(0)
    student, teacher = vtp.add_gates(_tiny_vit()), _tiny_vit()
    teacher.train()  # whatever mode it came in, the distiller runs it in eval mode
    distiller = distill.Distiller(teacher, "soft", 0.5, 2.0)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    cfg = train.TrainConfig(stage="finetune", epochs=1, batch_size=4, lr=1e-3, accum_steps=2)
    batches = iter([(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0]))] * 2)
    student.train()
    task, _, finite = train.train_step(student, student, batches, cfg, DistInfo(), nn.CrossEntropyLoss(),
                                       None, torch.amp.GradScaler("cpu", enabled=False),
                                       distiller=distiller)
    assert finite and task > 0
    assert all(p.grad is not None for p in student.parameters())
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert not teacher.training
    assert_same_tensors(teacher.state_dict(), before)


def test_a_distilled_student_returns_both_heads_while_training():
    student = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, num_classes=3,
                                img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2)
    assert distill.set_distilled_training(student, True)
    out = student.train()(torch.randn(2, 3, 32, 32))
    assert isinstance(out, tuple) and len(out) == 2
    assert not distill.set_distilled_training(_tiny_vit(), True)


# ---- the command -----------------------------------------------------------------------------


SYNTH = ["--synthetic", "--synthetic-size", "16", "--synthetic-val-size", "4", "--num-classes", "3",
         "-b", "4", "--mixup", "0", "--cutmix", "0", "--save-every", "0"]


@pytest.fixture(scope="module")
def distilled_run(tmp_path_factory):
    """`vtp run --train-epochs 1 --distill`: dense stage first, then the whole pipeline with the
    fine-tuning distilled from the dense model the run trained."""
    out = tmp_path_factory.mktemp("distilled") / "run"
    assert cli.main(flags(["run", "--train-epochs", "1", "--sparse-epochs", "1",
                           "--finetune-epochs", "1", "--distill", "--bench-steps", "0",
                           "-o", str(out)],
                          TINY_MODEL, FAST, SYNTH)) == 0
    return out


def test_run_trains_first_and_distils_from_that_model(distilled_run):
    out = distilled_run
    assert (out / "train" / "model" / "config.json").is_file()
    gated = vtp.io.read_config(out / "sparse-train" / "model")
    assert gated.metadata["dense"]["checkpoint"] == str(out / "train" / "model")
    tuned = vtp.io.read_config(out / "finetune" / "model")
    assert tuned.metadata["distill"] == {"type": "soft", "alpha": 0.5, "tau": 1.0,
                                         "teacher": str(out / "train" / "model")}
    # nothing of the teacher in the student's directory, model or checkpoint
    pruned_keys = set(state_dict_of(out / "prune" / "model"))
    assert set(state_dict_of(out / "finetune" / "model")) == pruned_keys
    ckpt = torch.load(out / "finetune" / "checkpoints" / "last.pt", weights_only=True)
    assert set(ckpt["model"]) == pruned_keys
    assert sorted(os.listdir(out / "finetune")) == ["checkpoints", "config.yaml", "metrics.jsonl",
                                                    "model", "summary.json"]


def test_distilled_finetune_resumes_with_the_same_teacher(distilled_run, tmp_path):
    """Stopped mid-way and resumed, a distilled fine-tuning reaches the weights of an
    uninterrupted one: the teacher is found again from the pruned model's records."""
    def argv(out, *extra):
        return flags(["finetune", str(distilled_run), "--distill", "--teacher", "gated",
                      "--distill-type", "hard", "--epochs", "2", "-o", str(out)], FAST, SYNTH,
                     list(extra))

    assert cli.main(argv(tmp_path / "ref")) == 0
    assert cli.main(argv(tmp_path / "cut", "--stop-after-steps", "3")) == 0
    assert not (tmp_path / "cut" / "model").exists()
    assert cli.main(argv(tmp_path / "cut", "--resume")) == 0
    assert_same_tensors(state_dict_of(tmp_path / "cut" / "model"), state_dict_of(tmp_path / "ref" / "model"))
    teacher = vtp.io.read_config(tmp_path / "ref" / "model").metadata["distill"]["teacher"]
    assert teacher == str(distilled_run / "sparse-train" / "model")




def test_bad_distillation_flags_stop_before_any_work(capsys, tmp_path, distilled_run):
    out = tmp_path / "o"
    assert "--distill-tau: must be > 0, got 0" in cli_error(
        capsys, ["finetune", "x", "--distill", "--distill-tau", "0"], code=2)
    assert "--distill-alpha: must be in [0, 1], got 1.5" in cli_error(
        capsys, ["run", "--distill", "--distill-alpha", "1.5"], code=2)
    assert "--distill-alpha: must be in [0, 1], got -0.5" in cli_error(
        capsys, ["finetune", "x", "--distill-alpha", "-0.5"], code=2)
    base = flags(["finetune", str(distilled_run), "-o", str(out)], FAST, SYNTH)
    err = cli_error(capsys, base + ["--teacher", "gated"])
    assert "--teacher gated: add --distill" in err
    err = cli_error(capsys, base + ["--distill", "--teacher", str(tmp_path)])
    assert f"--teacher {tmp_path}: not a directory written by vtp.save" in err
    # a pruned model that records neither its dense nor its gated model: no teacher to find
    gated = vtp.add_gates(_tiny_vit())
    vtp.save(vtp.prune(gated, vtp.plan(gated, ratio=0.3)), tmp_path / "bare")
    bare = flags(["finetune", str(tmp_path / "bare"), "-o", str(out), "--distill"], FAST, SYNTH)
    assert "records no dense model" in cli_error(capsys, bare)
    assert "records no gated model" in cli_error(capsys, bare + ["--teacher", "gated"])
    # a teacher of other classes
    vtp.save(_tiny_vit(num_classes=5), tmp_path / "five")
    err = cli_error(capsys, bare + ["--teacher", str(tmp_path / "five")])
    assert "predicts 5 classes, the student 3" in err
    err = cli_error(capsys, flags(["run", "--train-epochs", "1", "--distill", "--teacher",
                                str(tmp_path / "five"), "-o", str(out)], TINY_MODEL, FAST, SYNTH))
    assert "predicts 5 classes, the data has 3" in err
    assert not out.exists()
