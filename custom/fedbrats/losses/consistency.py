"""Mean-teacher output consistency, shared by MST-KD (teacher to student) and IsoFed (teacher at unlabelled sites):
the MSE of sigmoid probabilities, and the ramp-up of its weight over the first epochs (Laine and Aila, 2017)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def output_consistency_loss(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """MSE between the student's and the teacher's sigmoid probabilities, averaged over every element.

    Args:
        student_logits: (B, K, ...) logits.
        teacher_logits: the teacher's, same shape (detached here).

    Raises:
        ValueError: mismatched shapes.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits and teacher_logits must have the same shape, got {tuple(student_logits.shape)} "
            f"and {tuple(teacher_logits.shape)}"
        )
    return F.mse_loss(torch.sigmoid(student_logits), torch.sigmoid(teacher_logits.detach()))


def sigmoid_rampup(epoch: float, rampup_epochs: float) -> float:
    """``exp(−5 (1 − t)²)`` with ``t = clip(epoch / rampup_epochs, 0, 1)``; 1 when ``rampup_epochs`` is 0.

    The ramp of Laine and Aila (2017), used by the paper for its consistency weight.

    Raises:
        ValueError: negative ``rampup_epochs``.
    """
    if rampup_epochs < 0:
        raise ValueError(f"rampup_epochs must be >= 0, got {rampup_epochs}")
    if rampup_epochs == 0:
        return 1.0
    t = min(max(float(epoch), 0.0), float(rampup_epochs)) / float(rampup_epochs)
    return math.exp(-5.0 * (1.0 - t) ** 2)


def consistency_rampup_weight(epoch: float, consistency_weight: float = 10.0, rampup_epochs: float = 20.0) -> float:
    """Weight of the output-consistency term at ``epoch``: ``consistency_weight * sigmoid_rampup(...)``."""
    return consistency_weight * sigmoid_rampup(epoch, rampup_epochs)


__all__ = ["consistency_rampup_weight", "output_consistency_loss", "sigmoid_rampup"]
