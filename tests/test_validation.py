"""Tests of fedbrats.data.validation: every way a case can be broken gives an error naming case, file, problem."""

from __future__ import annotations

import pickle
from collections.abc import Callable, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fedbrats.constants import MODALITIES
from fedbrats.data.conventions import BRATS2018, BRATS2023, BraTSConvention
from fedbrats.data.validation import (
    CaseInfo,
    CaseValidationError,
    check_label_values,
    load_nifti_checked,
    read_nifti_header_checked,
    validate_case,
)

SHAPE = (16, 16, 16)
CASE_IDS = {"brats2018": "Brats18_CBICA_AAA_1", "brats2023": "BraTS-GLI-00001-000"}


def _save(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    nib.save(nib.Nifti1Image(data, affine), str(path))


@pytest.fixture
def make_case(tmp_path: Path) -> Callable[..., Path]:
    """Factory writing a small random BraTS case folder; returns the folder."""

    def _make(
        case_id: str = CASE_IDS["brats2018"],
        convention: BraTSConvention = BRATS2018,
        missing: Sequence[str] = (),
        shapes: dict[str, tuple[int, ...]] | None = None,
        affines: dict[str, np.ndarray] | None = None,
        label_values: Sequence[int] | None = None,
        root: Path | None = None,
        seed: int = 0,
    ) -> Path:
        rng = np.random.default_rng(seed)
        case_dir = (root or tmp_path) / case_id
        case_dir.mkdir(parents=True, exist_ok=True)
        shapes, affines = shapes or {}, affines or {}
        for key in (*MODALITIES, "seg"):
            if key in missing:
                continue
            shape = shapes.get(key, SHAPE)
            if key == "seg":
                values = np.asarray(label_values if label_values is not None else convention.labels)
                data = rng.choice(values, size=shape).astype(np.uint8)
            else:
                data = rng.normal(100, 20, size=shape).astype(np.int16)
            _save(case_dir / convention.filename(case_id, key), data, affines.get(key, np.eye(4)))
        return case_dir

    return _make


def _file(case_dir: Path, key: str, convention: BraTSConvention = BRATS2018) -> Path:
    return case_dir / convention.filename(case_dir.name, key)


@pytest.mark.parametrize("convention", [BRATS2018, BRATS2023], ids=lambda c: c.name)
@pytest.mark.parametrize("deep", [True, False])
def test_valid_case_both_conventions(make_case, convention: BraTSConvention, deep: bool) -> None:
    case_dir = make_case(CASE_IDS[convention.name], convention)
    info = validate_case(str(case_dir), deep=deep)  # convention detected from the file names
    assert isinstance(info, CaseInfo)
    assert info.case_id == case_dir.name
    assert info.convention == convention.name
    assert info.shape == SHAPE
    assert np.allclose(info.affine, np.eye(4))
    assert list(info.paths) == list(MODALITIES)
    assert info.paths["t1ce"] == str(_file(case_dir, "t1ce", convention))
    assert info.label == str(_file(case_dir, "seg", convention))
    assert info.available == list(MODALITIES)
    if deep:
        assert set(info.label_values) <= set(convention.labels)


def test_optional_sequence_absent_is_none(make_case) -> None:
    case_dir = make_case(missing=("t1ce",))
    info = validate_case(str(case_dir), BRATS2018, required_modalities=("t1", "t2", "flair"))
    assert info.paths["t1ce"] is None
    assert info.available == ["t1", "t2", "flair"]


def test_missing_required_sequence_names_case_and_file(make_case) -> None:
    case_dir = make_case(missing=("t1ce",))
    with pytest.raises(CaseValidationError) as err:
        validate_case(str(case_dir))
    e = err.value
    assert e.case_id == case_dir.name
    assert e.path == str(_file(case_dir, "t1ce"))
    assert "t1ce" in e.problem and "missing" in e.problem
    assert str(e).startswith(f"case {case_dir.name}: file {_file(case_dir, 't1ce')}: ")


def test_missing_label_is_error_unless_not_checked(make_case) -> None:
    case_dir = make_case(missing=("seg",))
    with pytest.raises(CaseValidationError, match="segmentation is missing") as err:
        validate_case(str(case_dir))
    assert err.value.path.endswith("_seg.nii.gz")
    assert validate_case(str(case_dir), check_label=False).label is None


def test_corrupt_file_random_bytes(make_case) -> None:
    case_dir = make_case()
    bad = _file(case_dir, "t2")
    bad.write_bytes(np.random.default_rng(1).bytes(2000))
    for deep in (True, False):
        with pytest.raises(CaseValidationError) as err:
            validate_case(str(case_dir), deep=deep)
        assert err.value.case_id == case_dir.name
        assert err.value.path == str(bad)
        assert "NIfTI" in err.value.problem and "again" in err.value.problem


def test_truncated_gzip_caught_by_deep_check(make_case) -> None:
    case_dir = make_case()
    bad = _file(case_dir, "t1ce")
    raw = bad.read_bytes()
    bad.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CaseValidationError, match="truncated or corrupt NIfTI") as err:
        validate_case(str(case_dir), deep=True)
    assert err.value.path == str(bad)
    assert f"case {case_dir.name}: file {bad}: truncated or corrupt NIfTI (" in str(err.value)


def test_corrupt_gzip_trailer_caught_by_deep_check(make_case) -> None:
    # A damaged CRC at the end of the stream: reading just the voxels may stop before it, a full read does not.
    case_dir = make_case()
    bad = _file(case_dir, "flair")
    raw = bytearray(bad.read_bytes())
    raw[-8:-4] = bytes(b ^ 0xFF for b in raw[-8:-4])
    bad.write_bytes(bytes(raw))
    with pytest.raises(CaseValidationError, match="truncated or corrupt") as err:
        validate_case(str(case_dir))
    assert err.value.path == str(bad)


def test_empty_file(make_case) -> None:
    case_dir = make_case()
    _file(case_dir, "t1").write_bytes(b"")
    with pytest.raises(CaseValidationError, match="empty"):
        validate_case(str(case_dir), deep=False)


def test_shape_mismatch_names_both_files(make_case) -> None:
    case_dir = make_case(shapes={"t2": (16, 16, 12)})
    for deep in (True, False):
        with pytest.raises(CaseValidationError) as err:
            validate_case(str(case_dir), deep=deep)
        msg = str(err.value)
        assert err.value.path == str(_file(case_dir, "t2"))
        assert str(_file(case_dir, "t1")) in msg
        assert "(16, 16, 12)" in msg and "(16, 16, 16)" in msg


def test_affine_mismatch_names_both_files(make_case) -> None:
    shifted = np.eye(4)
    shifted[0, 3] = 1.0
    case_dir = make_case(affines={"flair": shifted})
    with pytest.raises(CaseValidationError, match="affine differs") as err:
        validate_case(str(case_dir), deep=False)
    assert err.value.path == str(_file(case_dir, "flair"))
    assert str(_file(case_dir, "t1")) in str(err.value)


def test_affine_within_tolerance_is_fine(make_case) -> None:
    nudged = np.eye(4)
    nudged[1, 3] = 1e-5
    case_dir = make_case(affines={"seg": nudged})
    validate_case(str(case_dir))


def test_label_3_in_2018_case(make_case) -> None:
    case_dir = make_case(label_values=(0, 1, 2, 3))
    with pytest.raises(CaseValidationError) as err:
        validate_case(str(case_dir))
    e = err.value
    assert e.path == str(_file(case_dir, "seg"))
    assert "unexpected label values [3]" in e.problem
    assert "is the convention right?" in e.problem


def test_label_4_in_2023_case(make_case) -> None:
    case_dir = make_case(CASE_IDS["brats2023"], BRATS2023, label_values=(0, 2, 4))
    with pytest.raises(CaseValidationError, match=r"unexpected label values \[4\]") as err:
        validate_case(str(case_dir))
    assert "label 4 is ET in BraTS 2018-2021, 3 in 2023+" in err.value.problem


def test_label_values_only_checked_when_deep(make_case) -> None:
    case_dir = make_case(label_values=(0, 7))
    validate_case(str(case_dir), deep=False)
    with pytest.raises(CaseValidationError, match=r"\[7\]"):
        validate_case(str(case_dir), deep=True)


def test_check_label_values_direct() -> None:
    assert check_label_values(np.array([0, 4, 1, 1]), BRATS2018, "c", "/x/seg.nii.gz") == [0, 1, 4]
    with pytest.raises(CaseValidationError) as err:
        check_label_values([0, 5, 9], BRATS2018, "c", "/x/seg.nii.gz")
    assert "[5, 9]" in err.value.problem and err.value.case_id == "c" and err.value.path == "/x/seg.nii.gz"


def test_non_3d_volume(make_case, tmp_path: Path) -> None:
    case_dir = make_case()
    _save(_file(case_dir, "t1"), np.zeros((*SHAPE, 2), np.int16), np.eye(4))
    with pytest.raises(CaseValidationError, match="3-D") as err:
        validate_case(str(case_dir), deep=False)
    assert err.value.path == str(_file(case_dir, "t1"))
    # A trailing singleton axis is just a 3-D volume written by a picky tool.
    _save(_file(case_dir, "t1"), np.zeros((*SHAPE, 1), np.int16), np.eye(4))
    assert validate_case(str(case_dir)).shape == SHAPE


def test_missing_folder_and_unknown_naming(tmp_path: Path) -> None:
    with pytest.raises(CaseValidationError, match="folder not found") as err:
        validate_case(str(tmp_path / "Brats18_X_1"))
    assert str(err.value).startswith("case Brats18_X_1: folder ")
    odd = tmp_path / "Brats18_X_2"
    odd.mkdir()
    _save(odd / "image.nii.gz", np.zeros(SHAPE, np.int16), np.eye(4))
    with pytest.raises(CaseValidationError, match="naming convention") as err:
        validate_case(str(odd))
    assert err.value.path == str(odd)


def test_explicit_convention_mismatch_reports_expected_file(make_case) -> None:
    case_dir = make_case()  # 2018 naming, read as 2023: the naming is the problem, not a missing t1ce
    with pytest.raises(CaseValidationError, match="named in the brats2018 convention.*--convention brats2018") as err:
        validate_case(str(case_dir), BRATS2023, required_modalities=("t1ce",))
    assert err.value.path == str(case_dir) and "drop" not in err.value.problem


def test_unknown_required_modality() -> None:
    with pytest.raises(ValueError, match="t1c"):
        validate_case("/nowhere", required_modalities=("t1c",))


def test_load_nifti_checked(make_case, tmp_path: Path) -> None:
    case_dir = make_case()
    data, affine = load_nifti_checked(str(_file(case_dir, "t1")), case_dir.name)
    assert data.dtype == np.float32 and data.shape == SHAPE and affine.shape == (4, 4)
    seg, _ = load_nifti_checked(str(_file(case_dir, "seg")), case_dir.name, label=True)
    assert np.issubdtype(seg.dtype, np.integer)
    assert set(np.unique(seg)) <= set(BRATS2018.labels)
    shape, affine2 = read_nifti_header_checked(str(_file(case_dir, "t2")), case_dir.name)
    assert shape == SHAPE and np.allclose(affine2, affine)
    missing = tmp_path / "nope.nii.gz"
    with pytest.raises(CaseValidationError, match="not found") as err:
        load_nifti_checked(str(missing), "c1")
    assert err.value.path == str(missing) and str(err.value).startswith("case c1: file ")


def test_load_nifti_checked_rejects_nan_and_fractional_labels(tmp_path: Path) -> None:
    img = tmp_path / "img.nii.gz"
    data = np.ones(SHAPE, np.float32)
    data[0, 0, 0] = np.nan
    _save(img, data, np.eye(4))
    with pytest.raises(CaseValidationError, match="NaN"):
        load_nifti_checked(str(img), "c")
    seg = tmp_path / "seg.nii.gz"
    _save(seg, np.full(SHAPE, 0.5, np.float32), np.eye(4))
    with pytest.raises(CaseValidationError, match="non-integer"):
        load_nifti_checked(str(seg), "c", label=True)


def test_uncompressed_nifti_is_read(tmp_path: Path) -> None:
    path = tmp_path / "x.nii"
    _save(path, np.arange(16**3, dtype=np.int16).reshape(SHAPE), np.eye(4))
    data, _ = load_nifti_checked(str(path), "c")
    assert data[15, 15, 15] == 16**3 - 1


def test_error_survives_pickling() -> None:
    e = CaseValidationError("c1", "/a/c1_t1.nii.gz", "broken")
    e2 = pickle.loads(pickle.dumps(e))
    assert (e2.case_id, e2.path, e2.problem, str(e2)) == (e.case_id, e.path, e.problem, str(e))
    assert isinstance(e2, ValueError)
