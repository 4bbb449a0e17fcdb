"""BraTS 2023 lesion-wise Dice and HD95 (fedbrats.scoring.metrics.lesion_wise) on hand-made label maps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedbrats.evaluation.evaluate import lesion_wise_params
from fedbrats.scoring.metrics import (
    BRATS_LESION_PARAMS,
    LESION_HD95_MISS_VALUE,
    LesionWiseParams,
    lesion_wise,
    lesion_wise_region,
    region_hd95,
)

SHAPE = (40, 40, 40)
MISS = LESION_HD95_MISS_VALUE


def cube(mask: np.ndarray, corner: tuple[int, int, int], side: int) -> np.ndarray:
    """``mask`` with a filled cube of ``side`` voxels at ``corner``."""
    x, y, z = corner
    mask[x : x + side, y : y + side, z : z + side] = True
    return mask


def empty() -> np.ndarray:
    return np.zeros(SHAPE, dtype=bool)


def test_exact_lesion_and_a_false_positive() -> None:
    truth = cube(empty(), (5, 5, 5), 5)  # 125 voxels
    pred = cube(truth.copy(), (30, 30, 30), 2)  # plus a distant speck
    assert lesion_wise_region(truth, truth) == {"dice": 1.0, "hd95": 0.0, "tp": 1, "fp": 0, "fn": 0}
    # The speck is a lesion of its own: Dice 0 and HD95 374 mm, averaged with the perfect lesion.
    assert lesion_wise_region(pred, truth) == pytest.approx({"dice": 0.5, "hd95": MISS / 2, "tp": 1, "fp": 1, "fn": 0})


def test_missed_lesion_counts_and_small_lesions_are_left_out() -> None:
    big = cube(empty(), (5, 5, 5), 5)
    truth = cube(big.copy(), (25, 25, 25), 4)  # a second lesion of 64 voxels > 50 mm³
    assert lesion_wise_region(big, truth) == pytest.approx({"dice": 0.5, "hd95": MISS / 2, "tp": 1, "fp": 0, "fn": 1})
    truth_small = cube(big.copy(), (25, 25, 25), 3)  # 27 voxels <= 50 mm³: not scored, missed or not
    assert lesion_wise_region(big, truth_small) == {"dice": 1.0, "hd95": 0.0, "tp": 1, "fp": 0, "fn": 0}
    # A prediction of the small lesion is not a false positive either.
    assert lesion_wise_region(truth_small, truth_small)["fp"] == 0
    # The threshold is a volume: 27 voxels of 2 mm are 216 mm³, scored (and missed).
    scored = lesion_wise_region(big, truth_small, spacing=(2.0, 2.0, 2.0))
    assert scored["dice"] == pytest.approx(0.5) and scored["fn"] == 1
    # MET's threshold is 2 mm³: the small lesion counts there.
    assert lesion_wise_region(big, truth_small, params=BRATS_LESION_PARAMS["MET"])["dice"] == pytest.approx(0.5)


def test_lesions_whose_dilations_touch_are_one_lesion() -> None:
    truth = cube(cube(empty(), (5, 5, 5), 5), (12, 5, 5), 5)  # two cubes 2 voxels apart
    pred = cube(empty(), (5, 5, 5), 5)  # finds only the first
    merged = lesion_wise_region(pred, truth)  # GLI: dilation 3 joins them
    assert merged["dice"] == pytest.approx(2 * 125 / (125 + 250)) and (merged["tp"], merged["fn"]) == (1, 0)
    apart = lesion_wise_region(pred, truth, params=LesionWiseParams(dilation=0, min_volume_mm3=50))
    assert apart == pytest.approx({"dice": 0.5, "hd95": MISS / 2, "tp": 1, "fp": 0, "fn": 1})


def test_a_prediction_near_a_lesion_is_matched_not_a_false_positive() -> None:
    truth = cube(empty(), (5, 5, 5), 5)
    near = cube(empty(), (12, 5, 5), 5)  # 2 voxels away: inside the lesion's dilation, no overlap
    scores = lesion_wise_region(near, truth)
    assert (scores["tp"], scores["fp"], scores["dice"]) == (1, 0, 0.0)
    expected_hd = float(region_hd95(*(torch.as_tensor(m[None, None].repeat(3, 1)) for m in (near, truth)))[0, 0])
    assert scores["hd95"] == pytest.approx(expected_hd) and 0 < scores["hd95"] < MISS
    far = cube(empty(), (20, 5, 5), 5)  # out of reach: a miss and a false positive
    assert lesion_wise_region(far, truth) == pytest.approx({"dice": 0.0, "hd95": MISS, "tp": 0, "fp": 1, "fn": 1})


def test_empty_regions() -> None:
    assert lesion_wise_region(empty(), empty()) == {"dice": 1.0, "hd95": 0.0, "tp": 0, "fp": 0, "fn": 0}
    speck = cube(empty(), (3, 3, 3), 2)
    assert lesion_wise_region(speck, empty()) == {"dice": 0.0, "hd95": MISS, "tp": 0, "fp": 1, "fn": 0}


def test_batched_per_region_and_parameters() -> None:
    truth = cube(empty(), (5, 5, 5), 5)
    speck = cube(truth.copy(), (30, 30, 30), 2)
    label = torch.as_tensor(np.stack([truth, truth, empty()]))[None].float()
    pred = torch.as_tensor(np.stack([truth, speck, empty()]))[None].float()
    scores = lesion_wise(pred, label)
    assert scores["dice"].tolist() == [[1.0, 0.5, 1.0]]
    assert scores["hd95"][0].tolist() == pytest.approx([0.0, MISS / 2, 0.0])
    assert scores["fp"].tolist() == [[0, 1, 0]] and scores["fp"].dtype == torch.int64
    with pytest.raises(ValueError, match="shapes differ"):
        lesion_wise(pred, label[:, :, :10])
    assert lesion_wise_params("BraTS-MET") == LesionWiseParams(1, 2.0) and lesion_wise_params(None) is None
    with pytest.raises(ValueError, match="GLI"):
        lesion_wise_params("XYZ")
    with pytest.raises(ValueError, match="dilation"):
        LesionWiseParams(dilation=-1)
