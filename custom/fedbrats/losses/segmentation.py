"""The supervised segmentation loss every method trains with: soft Dice plus binary cross-entropy.

Dice alone gives almost no gradient while a region is absent from the prediction, so a network initialised to
predict nothing learns the small regions (TC, ET) slowly; the voxel-wise BCE term fixes that early on. nnU-Net
and most BraTS entries train with the same pair.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss


class DiceBCELoss(torch.nn.Module):
    """``dice_weight * Dice + bce_weight * BCE`` on sigmoid outputs (one channel per region: WT, TC, ET).

    Both terms are computed in float32, also when the forward pass ran under bfloat16 autocast.

    Args:
        dice_weight: weight of the soft Dice loss (squared denominator, as in MONAI's BraTS tutorial).
        bce_weight: weight of the voxel-wise binary cross-entropy (0: Dice only, the old recipe).

    Raises:
        ValueError: a negative weight, or both weights zero.
    """

    def __init__(self, dice_weight: float = 1.0, bce_weight: float = 1.0) -> None:
        super().__init__()
        if dice_weight < 0 or bce_weight < 0:
            raise ValueError(f"dice_weight and bce_weight must be >= 0, got {dice_weight} and {bce_weight}")
        self.dice_weight = dice_weight
        self.bce_weight = bce_weight
        self.dice = DiceLoss(smooth_nr=0, smooth_dr=1e-5, squared_pred=True, sigmoid=True)

    def terms(self, logits: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """The unweighted terms ``{"dice": ..., "bce": ...}`` (both, also where a weight is 0, for logging)."""
        logits, target = logits.float(), target.float()
        return {"dice": self.dice(logits, target), "bce": F.binary_cross_entropy_with_logits(logits, target)}

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        terms = self.terms(logits, target)
        return sum(getattr(self, f"{name}_weight") * value for name, value in terms.items())


__all__ = ["DiceBCELoss"]
