"""Voxel spacing from affines (HD95 in millimetres) and the resampled data copy that keeps world coordinates."""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np
import pytest
import torch

from experiments.resample_cases import resample_case
from fedbrats.constants import MODALITIES
from fedbrats.data.loader import DataConfig, eval_transforms, voxel_spacing


def test_voxel_spacing_reads_the_affine_and_the_zoom() -> None:
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    assert voxel_spacing(affine, 0.5) == (2.0, 2.0, 2.0)
    oblique = np.eye(4)
    oblique[:3, :3] = np.array([[0.0, -1.5, 0.0], [1.5, 0.0, 0.0], [0.0, 0.0, 3.0]])  # rotated, anisotropic
    assert voxel_spacing(oblique) == pytest.approx((1.5, 1.5, 3.0))
    batch = torch.from_numpy(np.stack([np.diag([2.0, 2.0, 2.0, 1.0])] * 3))  # collated by a data loader
    assert voxel_spacing(batch) == (2.0, 2.0, 2.0)
    with pytest.raises(ValueError, match="4 x 4"):
        voxel_spacing(np.eye(3))


def _write_case(root: str, case_id: str, shape: tuple[int, int, int]) -> str:
    case_dir = os.path.join(root, case_id)
    os.makedirs(case_dir)
    rng = np.random.default_rng(0)
    head = np.zeros(shape, dtype=np.int16)
    head[4:-4, 6:-6, 2:-2] = rng.integers(100, 1000, size=(shape[0] - 8, shape[1] - 12, shape[2] - 4))
    label = np.zeros(shape, dtype=np.uint8)
    label[10:18, 12:20, 8:14] = 2
    label[12:16, 14:18, 9:12] = 4
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    affine[:3, 3] = [-20.0, 5.0, 7.0]
    for name in MODALITIES:
        nib.save(nib.Nifti1Image(head, affine), os.path.join(case_dir, f"{case_id}_{name}.nii.gz"))
    nib.save(nib.Nifti1Image(label, affine), os.path.join(case_dir, f"{case_id}_seg.nii.gz"))
    return case_dir


def test_resampled_copy_matches_the_pipeline_and_keeps_world_coordinates(tmp_path) -> None:
    case_dir = _write_case(str(tmp_path / "in"), "Brats18_X_1_1", (32, 36, 24))
    shape = resample_case(case_dir, str(tmp_path / "out"), 0.5)
    assert shape == (12, 12, 10)  # the head box (24 x 24 x 20) halved
    out_case = tmp_path / "out" / "Brats18_X_1_1"
    written = nib.load(str(out_case / "Brats18_X_1_1_flair.nii.gz"))
    assert written.shape == shape
    assert voxel_spacing(written.affine) == pytest.approx((2.0, 2.0, 2.0))
    # The first written voxel's centre lies at the centre of the first 2 x 2 x 2 block of the head box.
    first_block_centre = np.array([4 + 0.5, 6 + 0.5, 2 + 0.5]) + np.array([-20.0, 5.0, 7.0])
    assert written.affine[:3, 3] == pytest.approx(first_block_centre)

    # The copy at zoom 1 gives what the pipeline gives from the original at zoom 0.5 (up to int16 rounding).
    def entry(root: str) -> dict:
        prefix = os.path.join(root, "Brats18_X_1_1", "Brats18_X_1_1_")
        return {"image": [prefix + m + ".nii.gz" for m in MODALITIES], "label": prefix + "seg.nii.gz"}

    cfg = {"roi_size": [16, 16, 16]}
    original = eval_transforms(MODALITIES, "brats2018", DataConfig.from_dict({**cfg, "zoom": 0.5}))(
        entry(str(tmp_path / "in"))
    )
    copy = eval_transforms(MODALITIES, "brats2018", DataConfig.from_dict({**cfg, "zoom": 1.0}))(
        entry(str(tmp_path / "out"))
    )
    assert torch.equal(torch.as_tensor(copy["label"]), torch.as_tensor(original["label"]))
    assert torch.allclose(torch.as_tensor(copy["image"]), torch.as_tensor(original["image"]), atol=0.05)


def test_resampling_refuses_a_non_empty_output_folder(tmp_path) -> None:
    from experiments.resample_cases import main

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("user file")
    with pytest.raises(SystemExit, match="not empty"):
        main(["--data-dir", str(tmp_path), "--out-dir", str(tmp_path / "out")])
    assert (tmp_path / "out" / "keep.txt").read_text() == "user file"
