"""Loss functions of the ``fedkd`` method: DRL (disentanglement), RCL (region contrast) and distillation."""

from __future__ import annotations

from fedbrats.losses.distillation import feature_kd_loss, logit_kd_loss, prototype_kd_loss, self_distillation_loss
from fedbrats.losses.drl import (
    DRLLoss,
    attached_zero,
    content_consistency_loss,
    content_style_independence_loss,
    style_separation_loss,
)
from fedbrats.losses.rcl import (
    RCL_REGIONS,
    RegionContrastiveLoss,
    region_prototypes,
    region_weights,
    three_branch_rcl_loss,
)

__all__ = [
    "RCL_REGIONS",
    "DRLLoss",
    "RegionContrastiveLoss",
    "attached_zero",
    "content_consistency_loss",
    "content_style_independence_loss",
    "feature_kd_loss",
    "logit_kd_loss",
    "prototype_kd_loss",
    "region_prototypes",
    "region_weights",
    "self_distillation_loss",
    "style_separation_loss",
    "three_branch_rcl_loss",
]
