"""Dice and HD95 per BraTS region, with defined values where a region is empty or missed; and the lesion-wise
Dice and HD95 by which BraTS 2023+ ranks (:func:`lesion_wise`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance
from scipy import ndimage

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


# ---- lesion-wise scores (BraTS 2023+) -------------------------------------------------------------------------
#: HD95 (mm) BraTS 2023 gives a missed lesion and a false-positive lesion in its lesion-wise score.
LESION_HD95_MISS_VALUE: float = 374.0


@dataclass(frozen=True)
class LesionWiseParams:
    """How BraTS 2023+ matches lesions, per challenge.

    Attributes:
        dilation: dilation iterations (3-D, 18-connected structuring element) that merge ground-truth lesions
            closer than that and let a predicted component count for a lesion it does not touch but nears.
        min_volume_mm3: ground-truth lesions of at most this volume are left out of the score (a prediction
            of one is still no false positive).
    """

    dilation: int = 3
    min_volume_mm3: float = 50.0

    def __post_init__(self) -> None:
        if isinstance(self.dilation, bool) or not isinstance(self.dilation, int) or self.dilation < 0:
            raise ValueError(f"dilation must be an integer >= 0, got {self.dilation!r}")
        if not self.min_volume_mm3 >= 0:
            raise ValueError(f"min_volume_mm3 must be >= 0, got {self.min_volume_mm3!r}")


#: The parameters of the BraTS 2023/2024 challenges (glioma, sub-Saharan Africa, meningioma, paediatric, metastases).
BRATS_LESION_PARAMS: dict[str, LesionWiseParams] = {
    "GLI": LesionWiseParams(3, 50.0),
    "SSA": LesionWiseParams(3, 50.0),
    "MEN": LesionWiseParams(1, 50.0),
    "PED": LesionWiseParams(3, 50.0),
    "MET": LesionWiseParams(1, 2.0),
}

_CONNECTIVITY_26 = ndimage.generate_binary_structure(3, 3)
_DILATION_18 = ndimage.generate_binary_structure(3, 2)


def _grown(box: tuple[slice, ...], margin: int, shape: tuple[int, ...]) -> tuple[slice, ...]:
    """``box`` widened by ``margin`` voxels on every side, within ``shape``."""
    return tuple(slice(max(s.start - margin, 0), min(s.stop + margin, n)) for s, n in zip(box, shape))


def _union(boxes: Sequence[tuple[slice, ...]]) -> tuple[slice, ...]:
    return tuple(slice(min(b[d].start for b in boxes), max(b[d].stop for b in boxes)) for d in range(len(boxes[0])))


def _hd95_masks(a: np.ndarray, b: np.ndarray, spacing: Sequence[float]) -> float:
    """HD95 (mm) of two non-empty binary masks of one volume (MONAI's, as the case-wise score)."""
    pair = [torch.as_tensor(m[None, None], dtype=torch.float32) for m in (a, b)]
    value = float(compute_hausdorff_distance(*pair, include_background=True, percentile=95, spacing=list(spacing)))
    return value if np.isfinite(value) else LESION_HD95_MISS_VALUE


def lesion_wise_region(
    pred: np.ndarray,
    label: np.ndarray,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    params: LesionWiseParams | None = None,
) -> dict[str, float]:
    """BraTS 2023 lesion-wise Dice and HD95 of one region (binary 3-D masks of one case).

    Ground-truth lesions are the 26-connected components of ``label``, merged where their dilations
    (``params.dilation`` iterations) touch. Each lesion is scored against the union of the 26-connected predicted
    components that meet its own dilation: Dice, and HD95 (374 mm when nothing meets it). Lesions of at most
    ``params.min_volume_mm3`` are left out; every predicted component that meets no lesion is a false positive
    scoring Dice 0 and HD95 374 mm. The region's score is the mean over the kept lesions and the false positives;
    with neither (nothing in truth or prediction) it is Dice 1 and HD95 0.

    Args:
        pred: predicted mask (3-D).
        label: ground-truth mask, same shape.
        spacing: voxel size in mm (volumes and HD95).
        params: the challenge's parameters (default glioma: dilation 3, 50 mm³).

    Returns:
        ``{"dice", "hd95", "tp", "fp", "fn"}``: the scores and the counts of matched and missed kept lesions and of
        false-positive components.

    Raises:
        ValueError: shapes differ or the masks are not 3-D.
    """
    params = params or BRATS_LESION_PARAMS["GLI"]
    pred, label = np.asarray(pred) > 0, np.asarray(label) > 0
    if pred.shape != label.shape or pred.ndim != 3:
        raise ValueError(f"pred and label must be 3-D masks of one shape, got {pred.shape} and {label.shape}")
    spacing = tuple(float(s) for s in (spacing if not np.isscalar(spacing) else [spacing] * 3))
    voxel_mm3 = float(np.prod(spacing))
    pred_cc, _ = ndimage.label(pred, structure=_CONNECTIVITY_26)
    if params.dilation:
        grown = ndimage.binary_dilation(label, structure=_DILATION_18, iterations=params.dilation)
        lesions, _ = ndimage.label(grown, structure=_CONNECTIVITY_26)
        lesions[~label] = 0  # each truth voxel takes the number of the dilated component around it
    else:
        lesions, _ = ndimage.label(label, structure=_CONNECTIVITY_26)
    pred_boxes = ndimage.find_objects(pred_cc)
    matched: set[int] = set()
    dices: list[float] = []
    hds: list[float] = []
    tp = fn = 0
    # Work in each lesion's neighbourhood only: a full-volume dilation per lesion is slow on 240³ volumes.
    for number, box in enumerate(ndimage.find_objects(lesions), start=1):
        if box is None:  # cannot happen (every dilated component holds truth voxels); never index None
            continue
        near = _grown(box, params.dilation, label.shape)
        lesion_near = lesions[near] == number
        reach = (
            ndimage.binary_dilation(lesion_near, structure=_DILATION_18, iterations=params.dilation)
            if params.dilation
            else lesion_near
        )
        hits = sorted(int(v) for v in np.unique(pred_cc[near][reach]) if v)
        matched.update(hits)
        volume = float(lesion_near.sum()) * voxel_mm3
        if volume <= params.min_volume_mm3:
            continue
        if not hits:
            fn += 1
            dices.append(0.0)
            hds.append(LESION_HD95_MISS_VALUE)
            continue
        tp += 1
        # One margin voxel so that every surface lies inside the crop.
        crop = _grown(_union([box, *(pred_boxes[h - 1] for h in hits)]), 1, label.shape)
        lesion_mask = lesions[crop] == number
        pred_mask = np.isin(pred_cc[crop], hits)
        overlap = float(np.logical_and(lesion_mask, pred_mask).sum())
        dices.append(2.0 * overlap / float(lesion_mask.sum() + pred_mask.sum()))
        hds.append(_hd95_masks(pred_mask, lesion_mask, spacing))
    fp = sum(1 for h in range(1, len(pred_boxes) + 1) if h not in matched)
    count = len(dices) + fp
    if count == 0:
        return {"dice": 1.0, "hd95": 0.0, "tp": 0, "fp": 0, "fn": 0}
    return {
        "dice": float(sum(dices) / count),
        "hd95": float((sum(hds) + fp * LESION_HD95_MISS_VALUE) / count),
        "tp": tp,
        "fp": fp,
        "fn": fn,
    }


def lesion_wise(
    pred: torch.Tensor,
    label: torch.Tensor,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    params: LesionWiseParams | None = None,
) -> dict[str, torch.Tensor]:
    """:func:`lesion_wise_region` of every case and region of B x 3 x spatial masks (as :func:`region_dice`).

    Returns:
        ``{"dice", "hd95"}`` (B x 3 float tensors) and ``{"tp", "fp", "fn"}`` (B x 3 integer tensors).
    """
    _check_pair(pred, label)
    pred_np, label_np = pred.detach().cpu().numpy(), label.detach().cpu().numpy()
    scores = [
        [lesion_wise_region(pred_np[b, r], label_np[b, r], spacing, params) for r in range(pred.shape[1])]
        for b in range(pred.shape[0])
    ]
    return {
        key: torch.tensor(
            [[s[key] for s in case] for case in scores], dtype=torch.float32 if key in ("dice", "hd95") else torch.int64
        )
        for key in ("dice", "hd95", "tp", "fp", "fn")
    }
