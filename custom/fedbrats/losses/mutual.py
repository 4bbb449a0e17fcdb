"""Mutual (dual) distillation between two networks of one site, as FedMIC / FedKD (Wu et al. 2022) do it.

Each network learns from the other at two levels, and both distillation terms are scaled adaptively by the task
losses (FedKD's code: divided by the sum of the two networks' task losses, so that distillation weighs more once
both networks solve the task and less while their predictions are still poor):

* decision level: :func:`fedbrats.losses.distillation.logit_kd_loss`, the voxel-wise binary KL between tempered
  sigmoid outputs (the WT/TC/ET outputs are multi-label);
* representation level: :func:`feature_mse` between intermediate features, through a learnable 1x1x1 projection
  (:class:`FeatureProjection`) where the two widths differ.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def adaptive_kd_scale(task_loss_a: Tensor, task_loss_b: Tensor, eps: float = 1e-6) -> Tensor:
    """FedKD's adaptive weight of a distillation term: ``1 / (task_loss_a + task_loss_b)``, detached.

    Our interpretation: the scale is a weight, not a path for gradients (through it the task losses would be pushed
    up to shrink the distillation terms), hence detached.

    Args:
        task_loss_a: scalar task loss of one network.
        task_loss_b: scalar task loss of the other.
        eps: lower bound of the denominator.

    Raises:
        ValueError: a non-scalar loss or ``eps`` <= 0.
    """
    if task_loss_a.numel() != 1 or task_loss_b.numel() != 1:
        raise ValueError(
            f"task_loss_a and task_loss_b must be scalars, got shapes {tuple(task_loss_a.shape)} and "
            f"{tuple(task_loss_b.shape)}"
        )
    if eps <= 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    return 1.0 / (task_loss_a.detach().float() + task_loss_b.detach().float()).clamp_min(eps)


def feature_mse(student_feat: Tensor, teacher_feat: Tensor) -> Tensor:
    """Mean squared difference of two feature maps of one shape, in float32 (the teacher is used as given: detach
    it if it should not learn).

    Raises:
        ValueError: different shapes.
    """
    if student_feat.shape != teacher_feat.shape:
        raise ValueError(
            f"student_feat and teacher_feat must have the same shape, got {tuple(student_feat.shape)} and "
            f"{tuple(teacher_feat.shape)}"
        )
    return F.mse_loss(student_feat.float(), teacher_feat.float())


class FeatureProjection(torch.nn.Module):
    """A learnable 1x1x1 convolution from ``in_channels`` to ``out_channels`` features (the identity when equal).

    Args:
        in_channels: channels of the features to project.
        out_channels: channels of the features they are compared with.

    Raises:
        ValueError: a channel count < 1.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        for arg, value in (("in_channels", in_channels), ("out_channels", out_channels)):
            if value < 1:
                raise ValueError(f"{arg} must be >= 1, got {value}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.conv = torch.nn.Conv3d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: Tensor, frozen: bool = False) -> Tensor:
        """Project ``x``; with ``frozen`` the projection's own weights receive no gradient (``x`` still does)."""
        if self.conv is None:
            return x
        if not frozen:
            return self.conv(x)
        bias = self.conv.bias.detach() if self.conv.bias is not None else None
        return F.conv3d(x, self.conv.weight.detach(), bias)


__all__ = ["FeatureProjection", "adaptive_kd_scale", "feature_mse"]
