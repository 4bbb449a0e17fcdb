"""Post-processing of predicted regions: removing small connected components, chosen on validation cases.

Scattered false-positive specks cost a lot of Dice on small regions (ET) and set HD95 far from the tumour;
nnU-Net and most BraTS entries remove connected components below a size. The size is chosen on validation
data, never on test cases: every site scores each candidate size on its own validation cases during the
final validation (aggregate Dice only leaves the site), and the server keeps the size with the best
site-weighted mean Dice in ``postprocessing.json`` of the run folder (:func:`choose_min_component_voxels`).
``evaluate``, ``export`` and ``predict`` then apply that size (:func:`read_postprocessing`).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform
from monai.utils import convert_to_dst_type
from scipy import ndimage

from fedbrats.federated.protocol import KEY_METRIC
from fedbrats.runs import (
    BUNDLE_CONFIGS_DIR,
    EXPORTED_METADATA_FILE,
    EXPORTED_POSTPROCESSING_KEY,
    POSTPROCESSING_FILE,
    RunFolder,
)

logger = logging.getLogger(__name__)

#: Candidate minimum component sizes (voxels at the model's working resolution) scored at validation; 0 = none.
DEFAULT_CANDIDATES: tuple[int, ...] = (0, 10, 50, 200)
#: Validation metric of the mean Dice after removing components smaller than N voxels.
CANDIDATE_METRIC = f"{KEY_METRIC}_min{{}}"

_CONNECTIVITY = np.ones((3, 3, 3), dtype=bool)  # 26-connected, as nnU-Net


def remove_small_components(regions: torch.Tensor, min_voxels: int) -> torch.Tensor:
    """``regions`` (B x C x H x W x D, binary) without the connected components smaller than ``min_voxels``,
    each channel (WT, TC, ET) on its own.

    Raises:
        ValueError: ``min_voxels`` < 0 or ``regions`` not 5-D.
    """
    if min_voxels < 0:
        raise ValueError(f"min_voxels must be >= 0, got {min_voxels}")
    if regions.ndim != 5:
        raise ValueError(f"regions must be B x C x H x W x D, got shape {tuple(regions.shape)}")
    if min_voxels == 0:
        return regions
    array = regions.detach().cpu().numpy() > 0
    out = np.zeros_like(array)
    for b in range(array.shape[0]):
        for c in range(array.shape[1]):
            labelled, count = ndimage.label(array[b, c], structure=_CONNECTIVITY)
            if count == 0:
                continue
            sizes = np.bincount(labelled.ravel())
            keep = sizes >= min_voxels
            keep[0] = False
            out[b, c] = keep[labelled]
    return torch.as_tensor(out, dtype=regions.dtype, device=regions.device)


class RemoveSmallComponentsd(MapTransform):
    """Dictionary transform of :func:`remove_small_components` on one case's regions (C x H x W x D).

    Args:
        keys: the binary region maps (e.g. ``"pred"``).
        min_voxels: the minimum component size (0: keep everything).
        allow_missing_keys: tolerate an entry without the key.

    Raises:
        ValueError: ``min_voxels`` < 0.
    """

    def __init__(self, keys: KeysCollection = "pred", min_voxels: int = 0, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        if min_voxels < 0:
            raise ValueError(f"min_voxels must be >= 0, got {min_voxels}")
        self.min_voxels = min_voxels

    def __call__(self, data: Mapping[Any, Any]) -> dict[Any, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            regions = torch.as_tensor(d[key])
            kept = remove_small_components(regions[None], self.min_voxels)[0]
            d[key] = convert_to_dst_type(kept, d[key])[0]  # keeps a MetaTensor's meta data
        return d


def choose_min_component_voxels(aggregated: Mapping[str, float]) -> dict[str, Any]:
    """The candidate size with the best aggregated validation mean Dice (ties: the smaller size).

    Args:
        aggregated: the site-weighted validation metrics: ``val_mean_dice`` (no post-processing) and
            ``val_mean_dice_min<N>`` for each candidate size N the sites scored.

    Returns:
        ``{"min_component_voxels": N, "scores": {N: mean Dice}}``; N is 0 when no candidate was scored.
    """
    prefix, _ = CANDIDATE_METRIC.split("{}")
    scores: dict[int, float] = {}
    for key, value in aggregated.items():
        if key == KEY_METRIC:
            size = 0
        elif key.startswith(prefix) and key[len(prefix) :].isdigit():
            size = int(key[len(prefix) :])
        else:
            continue
        if value is not None and np.isfinite(value):
            scores[size] = float(value)
    best = max(scores, key=lambda s: (scores[s], -s)) if scores else 0
    return {"min_component_voxels": int(best), "scores": {str(k): scores[k] for k in sorted(scores)}}


def write_postprocessing(run_dir: str, choice: Mapping[str, Any]) -> str:
    """Write ``postprocessing.json`` into ``run_dir``; return its path."""
    path = RunFolder(run_dir).postprocessing
    with open(path, "w", encoding="utf-8") as f:
        json.dump(dict(choice), f, indent=2)
    return path


def read_postprocessing(folder: str, override: int | None = None) -> int:
    """The chosen minimum component size recorded in ``folder`` (a run folder's ``postprocessing.json`` or an
    exported model's ``configs/metadata.json``), looked for in the folder and up to two parents; 0 when none is.
    ``override`` (a user's explicit choice), when given, wins without reading anything.

    Raises:
        ValueError: the file exists but holds no valid size.
    """
    if override is not None:
        if override < 0:
            raise ValueError(f"the minimum component size must be >= 0, got {override}")
        return override
    folder = os.path.abspath(folder if os.path.isdir(folder) else os.path.dirname(folder))
    for _ in range(3):
        for name, key in (
            (POSTPROCESSING_FILE, None),
            (os.path.join(BUNDLE_CONFIGS_DIR, EXPORTED_METADATA_FILE), EXPORTED_POSTPROCESSING_KEY),
            (EXPORTED_METADATA_FILE, EXPORTED_POSTPROCESSING_KEY),
        ):
            path = os.path.join(folder, name)
            if not os.path.isfile(path):
                continue
            with open(path, encoding="utf-8") as f:
                content = json.load(f)
            if key is not None:
                content = content.get(key) if isinstance(content, dict) else None
                if content is None:
                    continue
            size = content.get("min_component_voxels") if isinstance(content, dict) else None
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise ValueError(f"{path}: 'min_component_voxels' must be a non-negative integer, got {size!r}")
            return size
        folder = os.path.dirname(folder)
    return 0


__all__ = [
    "CANDIDATE_METRIC",
    "DEFAULT_CANDIDATES",
    "RemoveSmallComponentsd",
    "choose_min_component_voxels",
    "read_postprocessing",
    "remove_small_components",
    "write_postprocessing",
]
