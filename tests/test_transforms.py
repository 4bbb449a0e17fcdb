"""Tests of the BraTS transforms: loading with missing sequences, label conversion, masking, modality dropout."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import fedbrats.data.transforms as transforms_module
from fedbrats.constants import MODALITIES
from fedbrats.data.conventions import BRATS2018
from fedbrats.data.synthetic import generate_case
from fedbrats.data.transforms import (
    MASK_KEY,
    ConvertBraTSLabels,
    ConvertBraTSLabelsd,
    LoadBraTSCase,
    LoadBraTSCased,
    ModalityDropout,
    ModalityDropoutd,
    apply_modality_mask,
    convert_brats_labels,
)
from fedbrats.data.validation import CaseValidationError

CASE_ID = "Brats18_SITEA_001_1"
SIZE = 16


@pytest.fixture(scope="module")
def case_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One synthetic 16^3 case in the 2018 convention, generated once for the module."""
    return Path(generate_case(str(tmp_path_factory.mktemp("case")), CASE_ID, size=SIZE, seed=3))


def _paths(case_dir: Path) -> list[str]:
    return [str(case_dir / BRATS2018.filename(CASE_ID, m)) for m in MODALITIES]


def _label(case_dir: Path) -> str:
    return str(case_dir / BRATS2018.filename(CASE_ID, "seg"))


def _volume(path: str) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj, dtype=np.float32)


def _write(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> str:
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), str(path))
    return str(path)


# ------------------------------------------------------------------------------------------------- loading


def test_load_reads_only_site_sequences_and_zero_fills(case_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An absent sequence is never opened (even with a path to a missing file) and its channel is all zeros."""
    opened: list[str] = []
    real = transforms_module.load_nifti_checked

    def spy(path: str, case_id: str, **kwargs: object) -> tuple[np.ndarray, np.ndarray]:
        opened.append(path)
        return real(path, case_id, **kwargs)

    monkeypatch.setattr(transforms_module, "load_nifti_checked", spy)
    paths = _paths(case_dir)
    paths[0] = str(case_dir / "does_not_exist_t1.nii.gz")  # t1 absent: must not be touched
    out = LoadBraTSCase(("t1ce", "t2", "flair"))(paths, _label(case_dir), CASE_ID)

    assert paths[0] not in opened
    assert set(opened) == set(paths[1:]) | {_label(case_dir)}
    image = out["image"]
    assert image.dtype == torch.float32 and tuple(image.shape) == (4, SIZE, SIZE, SIZE)
    assert torch.count_nonzero(image[0]) == 0
    for channel in (1, 2, 3):
        np.testing.assert_array_equal(image[channel].numpy(), _volume(paths[channel]))
    assert out[MASK_KEY].tolist() == [0.0, 1.0, 1.0, 1.0]
    assert out["label"].dtype == torch.uint8 and tuple(out["label"].shape) == (1, SIZE, SIZE, SIZE)
    assert set(torch.unique(out["label"]).tolist()) <= {0, 1, 2, 4}
    np.testing.assert_array_equal(out["affine"], np.eye(4))


def test_load_single_sequence_site_with_null_paths(case_dir: Path) -> None:
    """A site with only flair: null paths for the others are fine, mask is [0, 0, 0, 1], no label without a path."""
    paths: list[str | None] = [None, None, None, _paths(case_dir)[3]]
    out = LoadBraTSCase(("flair",))(paths, None, CASE_ID)
    assert out[MASK_KEY].tolist() == [0.0, 0.0, 0.0, 1.0]
    assert torch.count_nonzero(out["image"][:3]) == 0
    assert torch.count_nonzero(out["image"][3]) > 0
    assert "label" not in out


def test_load_present_sequence_without_path_names_it(case_dir: Path) -> None:
    """A sequence the site claims to have but the datalist leaves null is an error naming that sequence."""
    paths: list[str | None] = list(_paths(case_dir))
    paths[1] = None
    with pytest.raises(CaseValidationError, match="t1ce") as info:
        LoadBraTSCase(MODALITIES)(paths, _label(case_dir), CASE_ID)
    assert info.value.case_id == CASE_ID


def test_load_wrong_number_of_paths() -> None:
    """The image list must have one entry per canonical sequence."""
    with pytest.raises(ValueError, match="4 paths"):
        LoadBraTSCase(("t1",))(["a.nii.gz"], None, CASE_ID)


def test_load_shape_mismatch_names_both_files(case_dir: Path, tmp_path: Path) -> None:
    """Sequences on different grids (shape) are refused, naming the odd file and the reference one."""
    paths = _paths(case_dir)
    odd = _write(tmp_path / "odd_t2.nii.gz", np.ones((SIZE, SIZE, SIZE - 2), np.float32))
    paths[2] = odd
    with pytest.raises(CaseValidationError) as info:
        LoadBraTSCase(MODALITIES)(paths, None, CASE_ID)
    message = str(info.value)
    assert odd in message and paths[0] in message and "shape" in message


def test_load_affine_mismatch_names_both_files(case_dir: Path, tmp_path: Path) -> None:
    """Same shape but a shifted affine is refused, naming both files."""
    paths = _paths(case_dir)
    affine = np.eye(4)
    affine[0, 3] = 5.0
    odd = _write(tmp_path / "odd_flair.nii.gz", _volume(paths[3]), affine)
    paths[3] = odd
    with pytest.raises(CaseValidationError) as info:
        LoadBraTSCase(("t2", "flair"))(paths, None, CASE_ID)
    message = str(info.value)
    assert odd in message and paths[2] in message and "affine" in message


def test_load_label_shape_mismatch(case_dir: Path, tmp_path: Path) -> None:
    """A label on another grid than the images is refused, naming the label file."""
    label = _write(tmp_path / "seg.nii.gz", np.zeros((SIZE, SIZE, SIZE - 1), np.uint8))
    with pytest.raises(CaseValidationError, match="label shape") as info:
        LoadBraTSCase(MODALITIES)(_paths(case_dir), label, CASE_ID)
    assert label in str(info.value)


def test_load_label_value_3_rejected_under_brats2018(case_dir: Path, tmp_path: Path) -> None:
    """Label 3 is not a 2018 label (ET is 4 there); accepted once read as 2023."""
    seg = np.zeros((SIZE, SIZE, SIZE), np.uint8)
    seg[4:8, 4:8, 4:8] = 3
    seg[8:10, 8:10, 8:10] = 1
    label = _write(tmp_path / "seg3.nii.gz", seg)
    with pytest.raises(CaseValidationError, match=r"\[3\]") as info:
        LoadBraTSCase(MODALITIES, "brats2018")(_paths(case_dir), label, CASE_ID)
    assert label in str(info.value)
    out = LoadBraTSCase(MODALITIES, "brats2023")(_paths(case_dir), label, CASE_ID)
    assert set(torch.unique(out["label"]).tolist()) == {0, 1, 3}


def test_load_dict_version(case_dir: Path) -> None:
    """LoadBraTSCased fills image, mask, affine, spatial_shape and label and keeps other keys."""
    paths: list[str | None] = [None, None, *_paths(case_dir)[2:]]
    entry = {"image": paths, "label": _label(case_dir), "case_id": CASE_ID, "other": 7}
    d = LoadBraTSCased(modalities=("t2", "flair"))(entry)
    assert tuple(d["image"].shape) == (4, SIZE, SIZE, SIZE)
    assert d[MASK_KEY].tolist() == [0.0, 0.0, 1.0, 1.0]
    assert d["spatial_shape"].tolist() == [SIZE] * 3
    assert tuple(d["label"].shape) == (1, SIZE, SIZE, SIZE)
    assert d["other"] == 7 and entry["image"] is paths  # input entry not modified
    assert os.path.isfile(entry["label"])


# ------------------------------------------------------------------------------------------------- labels

# WT = {1, 2, ET}, TC = {1, ET}, ET = {ET}.
_EXPECTED_2018 = {  # value -> (WT, TC, ET)
    0: (0, 0, 0),
    1: (1, 1, 0),
    2: (1, 0, 0),
    4: (1, 1, 1),
}


def test_convert_brats2018_labels() -> None:
    """BraTS 2018 (ET = 4): each label value maps to the right WT/TC/ET channels."""
    label = torch.tensor([[[0, 1, 2, 4], [4, 2, 1, 0]]], dtype=torch.uint8)  # (1, 2, 4) -> H x W x D
    out = convert_brats_labels(label[None], et_label=4)
    assert out.dtype == torch.float32 and tuple(out.shape) == (3, 1, 2, 4)
    for idx in np.ndindex(*label.shape):
        value = int(label[idx])
        assert tuple(out[(slice(None), *idx)].tolist()) == _EXPECTED_2018[value], value
    assert torch.equal(ConvertBraTSLabels("brats2018")(label.numpy()), out)


def test_convert_brats2023_labels() -> None:
    """BraTS 2023 (ET = 3): 3 is enhancing tumour and counts in WT, TC and ET."""
    label = np.array([[[0, 1, 2, 3]]], dtype=np.uint8)
    out = ConvertBraTSLabels("brats2023")(label)
    expected = torch.tensor(
        [
            [[[0, 1, 1, 1]]],  # WT
            [[[0, 1, 0, 1]]],  # TC
            [[[0, 0, 0, 1]]],  # ET
        ],
        dtype=torch.float32,
    )
    assert torch.equal(out, expected)
    # Under 2018 a 3 is no region at all.
    assert torch.equal(convert_brats_labels(label, et_label=4)[:, 0, 0, 3], torch.zeros(3))


def test_convert_labels_rejects_multichannel_and_dict_version() -> None:
    """A 4-D label must have one channel; the dict version converts only the label key."""
    with pytest.raises(ValueError, match="one channel"):
        convert_brats_labels(torch.zeros(2, 2, 2, 2), et_label=4)
    d = ConvertBraTSLabelsd(convention="brats2018")({"label": torch.full((1, 2, 2, 2), 4), "image": 1})
    assert tuple(d["label"].shape) == (3, 2, 2, 2) and bool((d["label"] == 1).all()) and d["image"] == 1


# ----------------------------------------------------------------------------------------------- masking


def test_apply_modality_mask_channel_first() -> None:
    """C x H x W x D with a C-entry mask zeros exactly the absent channels."""
    image = torch.rand(4, 3, 3, 3) + 1.0
    out = apply_modality_mask(image, [1, 0, 1, 0])
    assert torch.equal(out[0], image[0]) and torch.equal(out[2], image[2])
    assert torch.count_nonzero(out[1]) == 0 and torch.count_nonzero(out[3]) == 0


def test_apply_modality_mask_batched() -> None:
    """B x C x ... with one mask for the batch, and with one mask per case."""
    image = torch.rand(2, 4, 3, 3, 3) + 1.0
    out = apply_modality_mask(image, torch.tensor([0.0, 1.0, 1.0, 1.0]))
    assert torch.count_nonzero(out[:, 0]) == 0 and torch.equal(out[:, 1:], image[:, 1:])

    per_case = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    out = apply_modality_mask(image, per_case)
    assert torch.equal(out[0, :2], image[0, :2]) and torch.count_nonzero(out[0, 2:]) == 0
    assert torch.equal(out[1, 3], image[1, 3]) and torch.count_nonzero(out[1, :3]) == 0


# ---------------------------------------------------------------------------------------- modality dropout


@pytest.mark.parametrize("present", [[1, 1, 1, 1], [0, 1, 0, 1], [1, 0, 0, 0], [0, 0, 1, 1]])
def test_modality_dropout_keeps_one_never_adds(present: list[int]) -> None:
    """Over many draws at prob=1, drop_rate=1: at least one present sequence stays, absent ones stay absent."""
    dropper = ModalityDropout(prob=1.0, drop_rate=1.0).set_random_state(seed=0)
    mask = torch.tensor(present, dtype=torch.float32)
    image = torch.rand(4, 2, 2, 2) + 1.0
    for _ in range(200):
        out, new_mask = dropper(image, mask)
        assert new_mask.sum() >= 1
        assert bool((new_mask <= mask).all())
        for c in range(4):
            if new_mask[c] == 0:
                assert torch.count_nonzero(out[c]) == 0
            else:
                assert torch.equal(out[c], image[c])
        if sum(present) > 1:
            assert new_mask.sum() == 1  # drop_rate 1 hides all but the one kept


def test_modality_dropout_drops_sometimes_and_prob0_never() -> None:
    """prob=1 sometimes hides a sequence of a complete case; prob=0 never does."""
    mask = torch.ones(4)
    image = torch.ones(4, 2, 2, 2)
    dropper = ModalityDropout(prob=1.0, drop_rate=0.5).set_random_state(seed=1)
    sums = [int(dropper(image, mask)[1].sum()) for _ in range(100)]
    assert min(sums) >= 1 and any(s < 4 for s in sums)
    never = ModalityDropout(prob=0.0).set_random_state(seed=1)
    assert all(int(never(image, mask)[1].sum()) == 4 for _ in range(50))


def test_modality_dropout_is_deterministic_with_seed() -> None:
    """Two droppers with the same seed draw the same masks; a different seed draws other masks."""
    mask = torch.ones(4)
    image = torch.ones(4, 2, 2, 2)

    def draws(seed: int) -> list[list[float]]:
        dropper = ModalityDropout(prob=0.9, drop_rate=0.5).set_random_state(seed=seed)
        return [dropper(image, mask)[1].tolist() for _ in range(30)]

    assert draws(7) == draws(7)
    assert draws(7) != draws(8)


def test_modality_dropout_rejects_bad_probabilities() -> None:
    """prob and drop_rate outside [0, 1] are refused by name."""
    with pytest.raises(ValueError, match="prob"):
        ModalityDropout(prob=1.5)
    with pytest.raises(ValueError, match="drop_rate"):
        ModalityDropout(drop_rate=-0.1)


def test_modality_dropoutd_updates_image_and_mask_together() -> None:
    """The dict version zeroes exactly the channels its new mask marks absent, and is seedable."""
    image = torch.rand(4, 3, 3, 3) + 1.0
    sample = {"image": image, MASK_KEY: torch.tensor([1.0, 1.0, 0.0, 1.0]), "label": "keep"}
    dropper = ModalityDropoutd("image", prob=1.0, drop_rate=0.5).set_random_state(seed=0)
    masks = []
    for _ in range(50):
        out = dropper(sample)
        new_mask = out[MASK_KEY]
        masks.append(new_mask.tolist())
        assert out["label"] == "keep"
        assert new_mask[2] == 0 and new_mask.sum() >= 1
        for c in range(4):
            if new_mask[c]:
                assert torch.equal(out["image"][c], image[c])
            else:
                assert torch.count_nonzero(out["image"][c]) == 0
    assert any(sum(m) < 3 for m in masks)
    again = ModalityDropoutd("image", prob=1.0, drop_rate=0.5).set_random_state(seed=0)
    assert [again(sample)[MASK_KEY].tolist() for _ in range(50)] == masks
