"""Pixel-wise scores of an anomaly map against a binary label: AUROC, AUPRC, Dice at a threshold, and the
threshold chosen on validation data.

Used by unsupervised anomaly segmentation (:mod:`fedbrats.federated.methods.mmccd`), where a model outputs a
continuous score per pixel and the tumour (whole-tumour label) is the anomaly. Everything here works on flat
arrays of the pixels that count (inside the brain); no model, no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

#: Thresholds tried when a threshold is chosen (quantiles of the scores, or an even grid on [0, 1]).
DEFAULT_NUM_THRESHOLDS = 100


def _flat(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).ravel().astype(bool)
    if s.shape != y.shape:
        raise ValueError(f"scores and labels must have the same number of pixels, got {s.size} and {y.size}")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores must be finite")
    return s, y


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (the probability that an anomalous pixel scores above a normal one; ties count
    one half), from the ranks of the scores (Mann-Whitney U).

    Raises:
        ValueError: different sizes, non-finite scores, or labels of one class only (the area is undefined).
    """
    s, y = _flat(scores, labels)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"auroc needs both classes, got {n_pos} anomalous and {n_neg} normal pixels")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(s.size, dtype=np.float64)
    sorted_scores = s[order]
    # Average ranks over ties.
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    ends = np.r_[starts[1:], s.size]
    mean_rank = (starts + ends - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(mean_rank, ends - starts)
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def auprc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the precision-recall curve as average precision: the mean, over the anomalous pixels, of the
    precision at the threshold that first includes each (tied scores enter together), as scikit-learn computes it.

    Raises:
        ValueError: different sizes, non-finite scores, or no anomalous pixel.
    """
    s, y = _flat(scores, labels)
    n_pos = int(y.sum())
    if n_pos == 0:
        raise ValueError("auprc needs at least one anomalous pixel")
    order = np.argsort(-s, kind="mergesort")
    s_sorted, y_sorted = s[order], y[order]
    tp = np.cumsum(y_sorted)
    # Only the last position of each run of tied scores is a threshold.
    last = np.r_[s_sorted[1:] != s_sorted[:-1], True]
    tp_at, n_at = tp[last].astype(np.float64), (np.flatnonzero(last) + 1).astype(np.float64)
    precision = tp_at / n_at
    recall = tp_at / n_pos
    recall_steps = np.diff(np.r_[0.0, recall])
    return float(np.sum(recall_steps * precision))


def dice_at(scores: np.ndarray, labels: np.ndarray, threshold: float) -> float:
    """Dice of ``scores > threshold`` against the labels (1.0 when both are empty)."""
    s, y = _flat(scores, labels)
    pred = s > threshold
    denom = pred.sum() + y.sum()
    return 1.0 if denom == 0 else float(2.0 * np.logical_and(pred, y).sum() / denom)


def mean_dice_at(slices: Sequence[tuple[np.ndarray, np.ndarray]], threshold: float) -> float:
    """Mean over ``(scores, labels)`` slices of :func:`dice_at` (each slice weighs the same, as each subject does
    when every test subject gives one slice)."""
    if not slices:
        raise ValueError("mean_dice_at needs at least one slice")
    return float(np.mean([dice_at(s, y, threshold) for s, y in slices]))


def candidate_thresholds(
    slices: Sequence[tuple[np.ndarray, np.ndarray]], num: int = DEFAULT_NUM_THRESHOLDS
) -> np.ndarray:
    """``num`` thresholds spread over the scores of ``slices``: their quantiles (each an actual score)."""
    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}")
    pooled = np.concatenate([np.asarray(s, dtype=np.float64).ravel() for s, _ in slices])
    return np.unique(np.quantile(pooled, np.linspace(0.0, 0.999, num), method="lower"))


def choose_threshold(
    slices: Sequence[tuple[np.ndarray, np.ndarray]], num: int = DEFAULT_NUM_THRESHOLDS
) -> tuple[float, float]:
    """The threshold with the best mean Dice over ``slices`` (validation data), and that Dice.

    Used on validation slices only: the threshold then goes to the test slices unchanged. (Choosing it on the
    test slices, as the public MMCCD code does, gives an optimistic number; :func:`best_dice_on` reports that.)
    """
    if not slices:
        raise ValueError("choose_threshold needs at least one validation slice")
    best_t, best_d = float("nan"), -1.0
    for t in candidate_thresholds(slices, num):
        d = mean_dice_at(slices, float(t))
        if d > best_d:
            best_t, best_d = float(t), d
    return best_t, best_d


def best_dice_on(
    slices: Sequence[tuple[np.ndarray, np.ndarray]],
    num: int = DEFAULT_NUM_THRESHOLDS,
    also: Sequence[float] = (),
) -> float:
    """The best mean Dice over ``slices`` among the thresholds :func:`choose_threshold` searches (the same grid,
    here over these slices' scores) and ``also``: the Dice of a threshold chosen on the data it reports, as the
    public MMCCD code reports it (optimistic).

    Pass the threshold chosen on validation in ``also``: the optimistic number is then never below the honest one,
    which a different grid could not promise.
    """
    if not slices:
        raise ValueError("best_dice_on needs at least one slice")
    thresholds = [float(t) for t in candidate_thresholds(slices, num)] + [float(t) for t in also]
    return max(mean_dice_at(slices, t) for t in thresholds)
