"""Plain supervised training: the loss of FedAvg, local-only and centralized baselines."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from monai.losses import DiceLoss

from fedbrats.federated.methods.base import ClientMethod


def segmentation_logits(output: Any) -> torch.Tensor:
    """Logits of a network output that is either a tensor or a dict with ``"logits"``."""
    return output["logits"] if isinstance(output, dict) else output


class SupervisedMethod(ClientMethod):
    """Soft Dice loss on sigmoid WT/TC/ET outputs (the loss of MONAI's BraTS tutorial and NVFlare's brats18).

    Args:
        dice_weight: weight of the Dice loss (kept so every loss term of every method has a weight).
    """

    name: ClassVar[str] = "supervised"

    def __init__(self, dice_weight: float = 1.0) -> None:
        self.dice_weight = dice_weight
        self.dice = DiceLoss(smooth_nr=0, smooth_dr=1e-5, squared_pred=True, sigmoid=True)

    def training_loss(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor], epoch: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
        logits = segmentation_logits(model(batch["image"], batch["modality_mask"]))
        loss = self.dice_weight * self.dice(logits, batch["label"])
        return loss, {"dice": float(loss.detach())}
