"""Knowledge distillation while training: a frozen teacher's predictions guide the student.

    loss = (1 - alpha) * task(student, targets) + alpha * kd(student_kd, teacher)

    soft  kd = T^2 * KL(softmax(teacher / T) || softmax(student_kd / T)), averaged over the
          images (Hinton et al.; T^2 keeps the gradient scale independent of T)
    hard  kd = cross-entropy of student_kd against the teacher's top class (DeiT's
          hard-label distillation)

A distilled student (timm's ``VisionTransformerDistilled``, two tokens) returns two sets of
logits while training: as in DeiT, the class token's take the task loss and the
distillation token's take the distillation term. Any other student uses its one set of
logits for both. The teacher runs in eval mode, under the student's autocast, without
gradients; it is never part of the student, so nothing of it is saved with the student.
"""
from __future__ import annotations

from typing import Callable, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["DISTILL_KINDS", "distillation_loss", "Distiller", "check_distill_settings",
           "split_outputs", "set_distilled_training"]

DISTILL_KINDS = ("soft", "hard")

Outputs = Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]


def check_distill_settings(kind: str, alpha: float, tau: float) -> None:
    """ValueError naming the setting when the distillation settings make no sense."""
    if kind not in DISTILL_KINDS:
        raise ValueError(f"distillation kind: expected one of {', '.join(DISTILL_KINDS)}, got {kind!r}")
    if not (isinstance(alpha, (int, float)) and 0.0 <= alpha <= 1.0):
        raise ValueError(f"distillation weight alpha: expected a number in [0, 1], got {alpha!r}")
    if not (isinstance(tau, (int, float)) and tau > 0):
        raise ValueError(f"distillation temperature tau: expected a number > 0, got {tau!r}")


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str,
                      tau: float = 1.0) -> torch.Tensor:
    """The distillation term alone, in float32: soft (KL at temperature `tau`, times tau^2,
    mean over images) or hard (cross-entropy against the teacher's argmax)."""
    student_logits = student_logits.float()
    teacher_logits = teacher_logits.float()
    if kind == "hard":
        return F.cross_entropy(student_logits, teacher_logits.argmax(dim=-1))
    if kind != "soft":
        raise ValueError(f"distillation kind: expected one of {', '.join(DISTILL_KINDS)}, got {kind!r}")
    log_p_student = F.log_softmax(student_logits / tau, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits / tau, dim=-1)
    # "batchmean" is the KL divergence itself, per image; DeiT's code divides by
    # batch x classes instead, which shrinks the term by the class count.
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return kl * (tau * tau)


def split_outputs(outputs: Outputs) -> Tuple[torch.Tensor, torch.Tensor]:
    """(logits for the task loss, logits for the distillation term) of a student's output."""
    if isinstance(outputs, (tuple, list)):
        if len(outputs) != 2:
            raise ValueError(f"a distilled student returns (class logits, distillation logits), "
                             f"got {len(outputs)} outputs")
        return outputs[0], outputs[1]
    return outputs, outputs


class Distiller:
    """The teacher and the rule that mixes its predictions into the student's loss."""

    def __init__(self, teacher: nn.Module, kind: str = "soft", alpha: float = 0.5,
                 tau: float = 1.0):
        check_distill_settings(kind, alpha, tau)
        self.teacher = teacher.eval()
        self.teacher.requires_grad_(False)
        self.kind, self.alpha, self.tau = kind, float(alpha), float(tau)

    def to(self, device: torch.device) -> "Distiller":
        self.teacher.to(device)
        return self

    def teacher_logits(self, images: torch.Tensor) -> torch.Tensor:
        """The teacher's logits in eval mode, without a graph (a distilled teacher's eval
        forward already averages its two heads)."""
        if self.teacher.training:  # a caller's model.train() must not reach the teacher
            self.teacher.eval()
        with torch.no_grad():
            out = self.teacher(images)
        if isinstance(out, (tuple, list)):
            out = (out[0] + out[1]) / 2
        return out.detach()

    def loss(self, images: torch.Tensor, outputs: Outputs, targets: torch.Tensor,
             criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """(1 - alpha) * criterion(task logits, targets) + alpha * distillation term.

        Call it under the autocast of the student's forward: the teacher then runs in the
        same precision."""
        task_logits, kd_logits = split_outputs(outputs)
        task = criterion(task_logits.float(), targets)
        if self.alpha == 0.0:
            return task
        kd = distillation_loss(kd_logits, self.teacher_logits(images), self.kind, self.tau)
        return (1.0 - self.alpha) * task + self.alpha * kd


def set_distilled_training(model: nn.Module, enabled: bool) -> bool:
    """Lets a two-token student return both heads' logits while training (timm's switch);
    False for a model without a distillation head."""
    if hasattr(model, "set_distilled_training"):
        model.set_distilled_training(enabled)
        return True
    return False

