"""Checks that a BraTS case folder is complete, readable and self-consistent before anything trains on it.

Every problem is reported as a :class:`CaseValidationError` that names the case, the file (or folder) and what
is wrong, with a hint on what to do, so a hospital's data manager can fix the data without reading code.

Two depths are offered: a *shallow* check reads only the NIfTI headers (file present, a NIfTI, 3-D, shapes and
affines agree), a *deep* check also decompresses every volume, which is the only way to catch a truncated or
corrupt ``.nii.gz`` and to see the label values.
"""

from __future__ import annotations

import gzip
import logging
import os
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import nibabel as nib
import numpy as np

from fedbrats.constants import MODALITIES
from fedbrats.data.conventions import BRATS2018, BRATS2023, BraTSConvention, detect_convention

logger = logging.getLogger(__name__)

#: Largest absolute difference tolerated between the affines of a case's volumes (mm / direction cosines).
AFFINE_TOLERANCE: float = 1e-3

#: Errors nibabel, gzip and zlib raise on a damaged file, at load time or only when the data is read.
_READ_ERRORS: tuple[type[BaseException], ...] = (
    nib.filebasedimages.ImageFileError,
    OSError,  # includes gzip.BadGzipFile (bad magic, CRC mismatch)
    EOFError,  # gzip stream cut short
    zlib.error,
    ValueError,  # nibabel: header fields out of range, fewer bytes than the header promises
    TypeError,
    AttributeError,
    IndexError,
    MemoryError,
)


class CaseValidationError(ValueError):
    """A BraTS case that cannot be used as it is.

    Attributes:
        case_id: the case (folder name), e.g. ``Brats18_CBICA_AME_1``.
        path: the file, or the case folder when the problem is not one file's.
        problem: what is wrong and, where there is one, what to do about it.
    """

    def __init__(self, case_id: str, path: str, problem: str) -> None:
        self.case_id = case_id
        self.path = path
        self.problem = problem
        kind = "file" if path.endswith((".nii", ".nii.gz")) or os.path.isfile(path) else "folder"
        super().__init__(f"case {case_id}: {kind} {path}: {problem}")

    def __reduce__(self) -> tuple[Any, ...]:
        # ValueError pickles with self.args only; keep the three attributes through multiprocessing.
        return (type(self), (self.case_id, self.path, self.problem))


@dataclass
class CaseInfo:
    """What validation learnt about one case.

    Attributes:
        case_id: the case id (the folder name).
        case_dir: absolute path of the case folder.
        convention: name of the naming/label convention (``"brats2018"`` or ``"brats2023"``).
        paths: canonical modality -> absolute file path, ``None`` where the file is absent.
        label: absolute path of the segmentation, ``None`` where absent (only allowed with ``check_label=False``).
        shape: the common 3-D shape of the volumes.
        affine: the common 4x4 voxel-to-world affine, as nested lists (JSON friendly).
        label_values: label values found in the segmentation (deep check only, else empty).
    """

    case_id: str
    case_dir: str
    convention: str
    paths: dict[str, str | None]
    label: str | None
    shape: tuple[int, ...]
    affine: list[list[float]]
    label_values: list[int] = field(default_factory=list)

    @property
    def available(self) -> list[str]:
        """Modalities whose file is present, in canonical order."""
        return [m for m in MODALITIES if self.paths.get(m) is not None]


def _fail(case_id: str, path: str, problem: str) -> CaseValidationError:
    return CaseValidationError(case_id, path, problem)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _spatial_shape(shape: tuple[int, ...], case_id: str, path: str) -> tuple[int, int, int]:
    """The 3-D shape of a volume, accepting trailing singleton axes (some tools write ``(X, Y, Z, 1)``)."""
    if len(shape) < 3 or any(s != 1 for s in shape[3:]):
        raise _fail(
            case_id,
            path,
            f"expected a 3-D volume, got shape {tuple(shape)}; BraTS sequences are single 3-D volumes "
            "(split 4-D series into one file per sequence)",
        )
    if min(shape[:3]) < 1:
        raise _fail(case_id, path, f"volume has an empty axis, shape {tuple(shape)}; re-export the file")
    return (int(shape[0]), int(shape[1]), int(shape[2]))


def permission_problem(exc: PermissionError) -> str:
    """What to tell a user whose process may not read a file: which user, and the fix (not "copy it again")."""
    import getpass

    return (
        f"permission denied ({exc.strerror}): user {getpass.getuser()!r} cannot read it; make it readable by the "
        "user running this site (e.g. a shared group and chmod g+r)"
    )


def _load_image(path: str, case_id: str, deep: bool) -> nib.spatialimages.SpatialImage:
    """Open a NIfTI file; with ``deep`` read every byte so truncation and CRC errors surface now."""
    if not os.path.exists(path):
        raise _fail(case_id, path, "file not found; check the case folder is complete")
    if not os.path.isfile(path):
        raise _fail(case_id, path, "is not a regular file")
    if os.path.getsize(path) == 0:
        raise _fail(case_id, path, "file is empty (0 bytes); copy or download it again")
    try:
        img = nib.load(path)
    except PermissionError as exc:
        raise _fail(case_id, path, permission_problem(exc)) from exc
    except _READ_ERRORS as exc:
        raise _fail(case_id, path, f"not a readable NIfTI file ({_describe(exc)}); copy or download it again") from exc
    if not isinstance(img, nib.spatialimages.SpatialImage):
        raise _fail(case_id, path, f"not a NIfTI volume (nibabel read it as {type(img).__name__})")
    if not deep:
        return img
    try:
        # Decompress the whole file up front: reading only the voxels nibabel needs can stop before the gzip
        # trailer, so a corrupt tail (CRC mismatch) would go unnoticed.
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as fh:
                raw = fh.read()
        else:
            with open(path, "rb") as fh:
                raw = fh.read()
        img = type(img).from_bytes(raw)
    except PermissionError as exc:
        raise _fail(case_id, path, permission_problem(exc)) from exc
    except _READ_ERRORS as exc:
        raise _fail(
            case_id, path, f"truncated or corrupt NIfTI ({_describe(exc)}); copy or download the file again"
        ) from exc
    return img


def read_nifti_header_checked(path: str, case_id: str) -> tuple[tuple[int, int, int], np.ndarray]:
    """Read only the header of a NIfTI file (fast; does not detect a truncated data block).

    Args:
        path: the ``.nii`` / ``.nii.gz`` file.
        case_id: the case the file belongs to, for error messages.

    Returns:
        The 3-D shape and the 4x4 affine.

    Raises:
        CaseValidationError: missing, unreadable or non-3-D file.
    """
    img = _load_image(path, case_id, deep=False)
    return _spatial_shape(tuple(img.shape), case_id, path), np.asarray(img.affine, dtype=np.float64)


def load_nifti_checked(path: str, case_id: str, *, label: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Load a NIfTI volume, turning every way it can be broken into a :class:`CaseValidationError`.

    Args:
        path: the ``.nii`` / ``.nii.gz`` file.
        case_id: the case the file belongs to, for error messages.
        label: ``True`` for a segmentation: values must be whole numbers and come back as ``int16``.

    Returns:
        ``(data, affine)``: the 3-D data (``float32`` for an image, ``int16`` for a label) and the 4x4 affine.

    Raises:
        CaseValidationError: missing, unreadable, truncated or corrupt file, non-3-D volume, non-finite image
            values, or non-integer label values.
    """
    img = _load_image(path, case_id, deep=True)
    shape = _spatial_shape(tuple(img.shape), case_id, path)
    try:
        data = np.asanyarray(img.dataobj)
    except _READ_ERRORS as exc:
        raise _fail(
            case_id, path, f"truncated or corrupt NIfTI ({_describe(exc)}); copy or download the file again"
        ) from exc
    data = data.reshape(shape)
    affine = np.asarray(img.affine, dtype=np.float64)
    if label:
        if not np.issubdtype(data.dtype, np.integer):
            if not np.all(np.isfinite(data)) or not np.array_equal(data, np.round(data)):
                raise _fail(
                    case_id,
                    path,
                    "segmentation holds non-integer values; is this an image saved under the label's name, "
                    "or a resampled label that needs nearest-neighbour interpolation?",
                )
        if data.size and (data.min() < np.iinfo(np.int16).min or data.max() > np.iinfo(np.int16).max):
            raise _fail(case_id, path, f"segmentation values out of range [{data.min()}, {data.max()}]")
        return data.astype(np.int16, copy=False), affine
    data = data.astype(np.float32, copy=False)
    if not np.all(np.isfinite(data)):
        raise _fail(case_id, path, "image holds NaN or infinite values; re-export the sequence")
    return data, affine


def check_label_values(values: Iterable[int], convention: BraTSConvention, case_id: str, path: str) -> list[int]:
    """Check that a segmentation only uses the labels of its convention.

    Args:
        values: the (unique) label values found, e.g. ``np.unique(seg)``.
        convention: the convention the case is read with.
        case_id: the case, for error messages.
        path: the segmentation file, for error messages.

    Returns:
        The sorted unique values as ints.

    Raises:
        CaseValidationError: listing the values the convention does not allow.
    """
    found = sorted({int(v) for v in values})
    unexpected = [v for v in found if v not in convention.labels]
    if not unexpected:
        return found
    hint = f"remap the segmentation to {list(convention.labels)} or fix the file"
    # The one mix-up seen in practice: a 2023+ label map under 2018 naming or the reverse (ET is 4 vs 3).
    other = BRATS2023 if convention.name == BRATS2018.name else BRATS2018
    if other.et_label in unexpected:
        hint = (
            f"label {BRATS2018.et_label} is ET in BraTS 2018-2021, {BRATS2023.et_label} in 2023+; "
            f"is the convention right? (case read as {convention.name})"
        )
    raise _fail(
        case_id,
        path,
        f"unexpected label values {unexpected} (found {found}, {convention.name} allows {list(convention.labels)}); "
        f"{hint}",
    )


def _same_affine(a: np.ndarray, b: np.ndarray) -> bool:
    return bool(np.allclose(a, b, rtol=0.0, atol=AFFINE_TOLERANCE))


def validate_case(
    case_dir: str,
    convention: BraTSConvention | None = None,
    required_modalities: Sequence[str] = MODALITIES,
    check_label: bool = True,
    deep: bool = True,
) -> CaseInfo:
    """Validate one BraTS case folder.

    Checks, in order: the folder exists; the convention (given, or detected from the file names); the required
    sequences are present; every present sequence and the label are readable NIfTI 3-D volumes (with ``deep``,
    fully decompressed, catching truncation); all shapes are equal; all affines agree within
    :data:`AFFINE_TOLERANCE`; the label values belong to the convention (``deep`` only). Optional sequences that
    are absent are fine and come back as ``None`` in :attr:`CaseInfo.paths`.

    Args:
        case_dir: the case folder; its name is the case id.
        convention: the naming/label convention; ``None`` detects it from the file names.
        required_modalities: canonical sequences that must be present.
        check_label: require the segmentation and check it; ``False`` neither requires nor reads it (e.g. data
            for inference only), but still records its path when the file is there.
        deep: read all voxel data (slow on full-size volumes, but the only way to catch a damaged file).

    Returns:
        The :class:`CaseInfo` of the case.

    Raises:
        CaseValidationError: the first problem found, naming the case, the file and the problem.
        ValueError: ``required_modalities`` names an unknown sequence.
    """
    unknown = [m for m in required_modalities if m not in MODALITIES]
    if unknown:
        raise ValueError(f"required_modalities: unknown sequence(s) {unknown}; choose from {list(MODALITIES)}")
    case_dir = os.path.abspath(case_dir)
    case_id = os.path.basename(os.path.normpath(case_dir))
    if not os.path.isdir(case_dir):
        raise _fail(case_id, case_dir, "case folder not found")
    if convention is None:
        try:
            convention = detect_convention(case_dir)
        except ValueError as exc:
            raise _fail(case_id, case_dir, str(exc)) from exc
    else:
        try:
            named = detect_convention(case_dir)
        except ValueError:
            named = convention  # neither or both namings: the checks below name the missing files
        if named.name != convention.name:
            # Otherwise every sequence would be reported missing, with the advice to drop it from the site.
            raise _fail(
                case_id,
                case_dir,
                f"the files are named in the {named.name} convention (e.g. {named.filename(case_id, 't1')}), not "
                f"{convention.name} as asked; pass --convention {named.name}, or leave --convention out to detect it",
            )

    paths: dict[str, str | None] = {}
    for modality in MODALITIES:
        path = os.path.join(case_dir, convention.filename(case_id, modality))
        present = os.path.isfile(path)
        if not present and modality in required_modalities:
            raise _fail(
                case_id,
                path,
                f"required sequence {modality} is missing (expected file {os.path.basename(path)}, "
                f"{convention.name} naming); add the file or drop {modality} from this site's modalities",
            )
        paths[modality] = path if present else None
    if not any(paths.values()):
        raise _fail(
            case_id,
            case_dir,
            f"no sequence found under {convention.name} naming (expected e.g. {convention.filename(case_id, 't1')})",
        )

    label_path: str | None = os.path.join(case_dir, convention.filename(case_id, "seg"))
    if not os.path.isfile(label_path):
        if check_label:
            raise _fail(case_id, label_path, "segmentation is missing; training and evaluation need it")
        label_path = None
    files: list[tuple[str, str]] = [(m, p) for m, p in paths.items() if p is not None]
    if check_label and label_path is not None:
        files.append(("seg", label_path))

    ref_path: str | None = None
    ref_shape: tuple[int, int, int] | None = None
    ref_affine: np.ndarray | None = None
    label_values: list[int] = []
    for key, path in files:
        if deep:
            data, affine = load_nifti_checked(path, case_id, label=key == "seg")
            shape = tuple(int(s) for s in data.shape)
            if key == "seg":
                label_values = check_label_values(np.unique(data), convention, case_id, path)
            del data  # full-size volumes: hold one at a time
        else:
            shape, affine = read_nifti_header_checked(path, case_id)
        if ref_path is None:
            ref_path, ref_shape, ref_affine = path, shape, affine
            continue
        if shape != ref_shape:
            raise _fail(
                case_id,
                path,
                f"shape {shape} differs from {ref_shape} of {ref_path}; all sequences and the label must be "
                "co-registered on the same grid (resample them)",
            )
        if not _same_affine(affine, ref_affine):
            diff = float(np.max(np.abs(affine - ref_affine)))
            raise _fail(
                case_id,
                path,
                f"affine differs from that of {ref_path} (max difference {diff:.4g} > {AFFINE_TOLERANCE}); "
                "the volumes are not on the same grid (co-register / resample them)",
            )

    assert ref_shape is not None and ref_affine is not None  # at least one file was read above
    logger.debug("case %s: valid (%s, %s, sequences %s)", case_id, convention.name, ref_shape, list(paths))
    return CaseInfo(
        case_id=case_id,
        case_dir=case_dir,
        convention=convention.name,
        paths=paths,
        label=label_path,
        shape=ref_shape,
        affine=ref_affine.tolist(),
        label_values=label_values,
    )
