"""Logit distillation shared by the distillation methods (FedKD, MST-KD, FedMIC).

:func:`logit_kd_loss`: per-voxel, per-region binary KL between tempered sigmoids (the outputs are multi-label
WT/TC/ET, so a softmax KL over channels would be wrong). A method's own distillation terms live in its folder.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fedbrats.losses.common import attached_zero


def logit_kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 2.0,
    mask: Tensor | None = None,
) -> Tensor:
    """Binary KL divergence between tempered sigmoid outputs, for multi-label logits.

    With ``q = sigmoid(teacher / T)`` and ``p = sigmoid(student / T)``, per element
    ``KL = q log(q / p) + (1 - q) log((1 - q) / (1 - p))``, computed with log-sigmoids for stability; the loss is
    ``T^2`` times its mean (the ``T^2`` keeps gradient magnitudes comparable across temperatures). The teacher
    is used as given: detach it if it should not be trained.

    Args:
        student_logits: (B, K, ...) logits.
        teacher_logits: logits of the same shape.
        temperature: ``T`` > 0.
        mask: optional weights broadcastable to the logits (e.g. (B, 1, D, H, W) brain mask); the loss is then
            ``sum(KL * mask) / sum(mask)`` over the broadcast shape, 0 if the mask is all zero.

    Returns:
        Scalar loss, 0 when student and teacher agree.

    Raises:
        ValueError: on mismatched shapes, a mask that does not broadcast, or a non-positive temperature.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits and teacher_logits must have the same shape, got {tuple(student_logits.shape)} "
            f"and {tuple(teacher_logits.shape)}"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    s = student_logits / temperature
    t = teacher_logits / temperature
    q = torch.sigmoid(t)
    kl = q * (F.logsigmoid(t) - F.logsigmoid(s)) + (1.0 - q) * (F.logsigmoid(-t) - F.logsigmoid(-s))
    if mask is None:
        return kl.mean() * temperature**2
    try:
        weights = torch.broadcast_to(mask.to(kl.dtype), kl.shape)
    except RuntimeError:
        raise ValueError(
            f"mask of shape {tuple(mask.shape)} does not broadcast to the logits' {tuple(kl.shape)}"
        ) from None
    total = weights.sum()
    if float(total) <= 0:
        return attached_zero(student_logits, teacher_logits)
    return (kl * weights).sum() / total * temperature**2


__all__ = ["logit_kd_loss"]
