"""Write a cropped, resampled copy of a BraTS folder (one folder per case, ``<case>_<sequence>.nii.gz``).

The training pipeline crops each case to the head and zooms it (``data.zoom``) every time it loads a case. This
script does the same once, on disk, so that a smaller copy of the data can be moved to another machine (the
24 shared BraTS 2018 cases are 189 MB at 1 mm and about a tenth of that at 2 mm) and trained on with
``data.zoom=1``. The written affines carry the new voxel size and origin, so distances measured on the copy
(HD95) stay in millimetres. Images are rounded to int16 (the sources' type); labels use nearest-neighbour
sampling. The copy is derived from patient data: keep it where the data may live, never in the repository.

Usage: ``python experiments/resample_cases.py --data-dir DATA --out-dir DATA-2mm --zoom 0.5``
"""

from __future__ import annotations

import argparse
import glob
import logging
import os

import nibabel as nib
import numpy as np
import torch
from monai.transforms import Zoom

from fedbrats.constants import MODALITIES
from fedbrats.logging_setup import configure_logging

logger = logging.getLogger("fedbrats.experiments.resample_cases")


def _sequence_path(case_dir: str, case_id: str, name: str) -> str:
    matches = sorted(glob.glob(os.path.join(case_dir, f"{case_id}_{name}.nii*")))
    if not matches:
        raise FileNotFoundError(f"{case_dir}: no {case_id}_{name}.nii[.gz]")
    return matches[0]


def resample_case(case_dir: str, out_dir: str, zoom: float) -> tuple[int, ...]:
    """Crop one case to the bounding box of its non-zero voxels (all sequences), zoom it, and write it.

    Returns:
        the written volume's shape.
    """
    case_id = os.path.basename(os.path.normpath(case_dir))
    images = [nib.load(_sequence_path(case_dir, case_id, m)) for m in MODALITIES]
    label_img = nib.load(_sequence_path(case_dir, case_id, "seg"))
    stack = np.stack([np.asanyarray(img.dataobj).astype(np.float32) for img in images])
    label = np.asanyarray(label_img.dataobj).astype(np.float32)[None]
    nonzero = np.nonzero(np.any(stack != 0, axis=0))
    lo = np.array([int(axis.min()) for axis in nonzero])
    hi = np.array([int(axis.max()) + 1 for axis in nonzero])
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    stack, label = stack[(slice(None), *box)], label[(slice(None), *box)]
    if zoom < 1.0:
        stack = Zoom(zoom, mode="trilinear", keep_size=False)(torch.from_numpy(stack)).numpy()
        label = Zoom(zoom, mode="nearest", keep_size=False)(torch.from_numpy(label)).numpy()
    affine = images[0].affine.copy()
    affine[:3, 3] = affine[:3, :3] @ lo + affine[:3, 3]
    # The zoomed grid's first voxel centre sits half an old voxel inside the box (area-style resampling).
    scale = np.array(stack.shape[1:]) / (hi - lo)
    affine[:3, 3] += affine[:3, :3] @ (0.5 / scale - 0.5)
    affine[:3, :3] = affine[:3, :3] / scale
    target = os.path.join(out_dir, case_id)
    os.makedirs(target, exist_ok=True)
    for name, volume in zip(MODALITIES, stack):
        nib.save(
            nib.Nifti1Image(np.rint(volume).astype(np.int16), affine), os.path.join(target, f"{case_id}_{name}.nii.gz")
        )
    nib.save(nib.Nifti1Image(np.rint(label[0]).astype(np.uint8), affine), os.path.join(target, f"{case_id}_seg.nii.gz"))
    return tuple(stack.shape[1:])


def main(argv: list[str] | None = None) -> None:
    configure_logging()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", required=True, help="BraTS folder: one sub-folder per case")
    p.add_argument("--out-dir", required=True, help="where the copy goes (must not exist or be empty)")
    p.add_argument("--zoom", type=float, default=0.5, help="resampling factor (0.5: 1 mm -> 2 mm)")
    args = p.parse_args(argv)
    if not 0.05 <= args.zoom <= 1.0:
        raise SystemExit(f"--zoom must be in [0.05, 1], got {args.zoom}")
    if os.path.isdir(args.out_dir) and os.listdir(args.out_dir):
        raise SystemExit(f"--out-dir {args.out_dir} is not empty; choose a new folder (nothing was overwritten)")
    cases = sorted(d for d in glob.glob(os.path.join(args.data_dir, "*")) if os.path.isdir(d))
    if not cases:
        raise SystemExit(f"--data-dir {args.data_dir} holds no case folders")
    for case_dir in cases:
        shape = resample_case(case_dir, args.out_dir, args.zoom)
        logger.info("%s -> %s", os.path.basename(case_dir), "x".join(map(str, shape)))


if __name__ == "__main__":
    main()
