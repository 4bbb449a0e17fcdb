"""Dice and HD95 per BraTS region, with defined values where a region is empty or missed."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance

from fedbrats.constants import HD95_MISS_VALUE, REGIONS


def region_dice(pred: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Dice per case and region of binary masks (B x 3 x ...).

    An empty ground truth scores 1 when the prediction is empty too and 0 otherwise (MONAI's
    ``ignore_empty=False``), so a false positive on a case without enhancing tumour is penalised.
    """
    _check_pair(pred, label)
    return compute_dice(pred.float(), label.float(), include_background=True, ignore_empty=False)


def region_hd95(
    pred: torch.Tensor, label: torch.Tensor, spacing: float | Sequence[float] = 1.0, miss_value: float = HD95_MISS_VALUE
) -> torch.Tensor:
    """95th-percentile Hausdorff distance (mm) per case and region.

    Defined everywhere: 0 when both masks are empty, ``miss_value`` (373.13 mm, the BraTS convention) when
    exactly one is empty, so a missed region counts against a model instead of vanishing from the mean.
    """
    _check_pair(pred, label)
    pred_b, label_b = pred.bool(), label.bool()
    spacing_arg = float(spacing) if np.isscalar(spacing) else list(spacing)
    hd = compute_hausdorff_distance(
        pred_b.float(), label_b.float(), include_background=True, percentile=95, spacing=spacing_arg
    ).float()
    pred_empty = ~pred_b.flatten(2).any(-1)
    label_empty = ~label_b.flatten(2).any(-1)
    hd = torch.where(pred_empty & label_empty, torch.zeros_like(hd), hd)
    hd = torch.where(pred_empty ^ label_empty, torch.full_like(hd, miss_value), hd)
    return torch.nan_to_num(hd, nan=miss_value, posinf=miss_value)


def logits_to_regions(logits: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Binary WT/TC/ET masks from sigmoid logits."""
    return (torch.sigmoid(logits) > threshold).float()


def summarize(dice: torch.Tensor, hd95: torch.Tensor | None = None, prefix: str = "") -> dict[str, float]:
    """Mean over cases of each region's Dice (and HD95), plus the mean Dice over regions.

    Keys: ``{prefix}dice_WT`` ..., ``{prefix}mean_dice``, ``{prefix}hd95_WT`` ..., ``{prefix}mean_hd95``.
    """
    out: dict[str, float] = {}
    per_region = dice.float().mean(0)
    for i, region in enumerate(REGIONS):
        out[f"{prefix}dice_{region}"] = float(per_region[i])
    out[f"{prefix}mean_dice"] = float(per_region.mean())
    if hd95 is not None:
        per_region_hd = hd95.float().mean(0)
        for i, region in enumerate(REGIONS):
            out[f"{prefix}hd95_{region}"] = float(per_region_hd[i])
        out[f"{prefix}mean_hd95"] = float(per_region_hd.mean())
    return out


def _check_pair(pred: torch.Tensor, label: torch.Tensor) -> None:
    if pred.shape != label.shape:
        raise ValueError(f"pred and label shapes differ: {tuple(pred.shape)} vs {tuple(label.shape)}")
    if pred.ndim < 3 or pred.shape[1] != len(REGIONS):
        raise ValueError(f"expected B x {len(REGIONS)} x spatial masks, got shape {tuple(pred.shape)}")
