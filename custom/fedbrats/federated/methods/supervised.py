"""Plain supervised training: the loss of FedAvg, local-only and centralized baselines."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from fedbrats.federated.methods.base import ClientMethod, Job, Method
from fedbrats.losses.segmentation import DiceBCELoss


def segmentation_logits(output: Any) -> torch.Tensor:
    """Logits of a network output that is either a tensor or a dict with ``"logits"``."""
    return output["logits"] if isinstance(output, dict) else output


class SupervisedMethod(ClientMethod):
    """Soft Dice plus binary cross-entropy on sigmoid WT/TC/ET outputs (:class:`DiceBCELoss`).

    Args:
        dice_weight: weight of the soft Dice loss.
        bce_weight: weight of the voxel-wise BCE (0 gives the Dice-only loss of MONAI's BraTS tutorial).
    """

    name: ClassVar[str] = "supervised"

    def __init__(self, dice_weight: float = 1.0, bce_weight: float = 1.0) -> None:
        self.dice_weight = dice_weight
        self.bce_weight = bce_weight
        self.segmentation_loss = DiceBCELoss(dice_weight, bce_weight)

    def training_loss(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor], epoch: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
        logits = segmentation_logits(model(batch["image"], batch["modality_mask"]))
        terms = self.segmentation_loss.terms(logits, batch["label"])
        loss = sum(getattr(self, f"{k}_weight") * v for k, v in terms.items())
        return loss, {k: float(v.detach()) for k, v in terms.items()}


#: FedAvg, local-only and centralized: the supervised loss with the common network (SegResNet) and recipe.
METHOD = Method(
    clients={"supervised": SupervisedMethod, "fedavg": SupervisedMethod},
    jobs=(
        Job(
            "fedavg",
            "FedAvg over sites with missing sequences (zero-filled), MONAI SegResNet, Dice loss.",
            aggregation="fedbrats.federated.server.aggregation.WeightedAverage",
        ),
        Job(
            "local_only",
            "Local-only baseline: every site trains alone on its own sequences; no averaging.",
            aggregation="fedbrats.federated.server.aggregation.LocalOnly",
        ),
        Job(
            "centralized",
            "Centralized upper bound: run with the single site 'central' (all cases, all sequences).",
            aggregation="fedbrats.federated.server.aggregation.WeightedAverage",
            min_clients=1,
        ),
    ),
    experiments={
        "centralized": ("centralized", {}, {}),
        "local_only": ("local_only", {}, {}),
        "fedavg": ("fedavg", {}, {}),
        # FedAvg with an aggregation one site cannot drag alone (fedbrats.federated.server.aggregation): the
        # coordinate-wise median, the mean without each coordinate's largest and smallest quarter, and the mean of
        # updates clipped to twice the round's median update norm.
        "fedavg_median": ("fedavg", {}, {"rule": "median"}),
        "fedavg_trimmed_mean": ("fedavg", {}, {"rule": "trimmed_mean", "trim_fraction": 0.25}),
        "fedavg_clipped": ("fedavg", {}, {"clip_factor": 2.0}),
    },
)
