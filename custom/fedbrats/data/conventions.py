"""BraTS file-naming and label conventions (2018-2021 and 2023+).

Both conventions are mapped onto the canonical sequences of :data:`fedbrats.constants.MODALITIES` and onto
the same evaluation regions, so the rest of the package never needs to know which release a case came from.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from fedbrats.constants import MODALITIES


@dataclass(frozen=True)
class BraTSConvention:
    """One BraTS naming and labelling convention.

    Attributes:
        name: identifier used in configs (``"brats2018"`` or ``"brats2023"``).
        separator: character between case id and suffix (``"_"`` or ``"-"``).
        suffixes: file suffix for each canonical modality, in :data:`MODALITIES` order.
        label_suffix: suffix of the segmentation file.
        labels: the label values the convention allows (background included).
        et_label: the label of enhancing tumour.
    """

    name: str
    separator: str
    suffixes: tuple[str, ...]
    label_suffix: str
    labels: tuple[int, ...]
    et_label: int

    def filename(self, case_id: str, key: str) -> str:
        """File name of a case's sequence (canonical modality name) or of its label (``"seg"``)."""
        if key == "seg":
            suffix = self.label_suffix
        elif key in MODALITIES:
            suffix = self.suffixes[MODALITIES.index(key)]
        else:
            raise ValueError(f"key must be one of {list(MODALITIES) + ['seg']}, got {key!r}")
        return f"{case_id}{self.separator}{suffix}.nii.gz"


BRATS2018 = BraTSConvention(
    name="brats2018",
    separator="_",
    suffixes=("t1", "t1ce", "t2", "flair"),
    label_suffix="seg",
    labels=(0, 1, 2, 4),
    et_label=4,
)
BRATS2023 = BraTSConvention(
    name="brats2023",
    separator="-",
    suffixes=("t1n", "t1c", "t2w", "t2f"),
    label_suffix="seg",
    labels=(0, 1, 2, 3),
    et_label=3,
)
CONVENTIONS: dict[str, BraTSConvention] = {c.name: c for c in (BRATS2018, BRATS2023)}


def get_convention(name: str) -> BraTSConvention:
    """Look a convention up by name.

    Raises:
        ValueError: if ``name`` is not a known convention.
    """
    try:
        return CONVENTIONS[name]
    except KeyError:
        raise ValueError(f"convention must be one of {sorted(CONVENTIONS)}, got {name!r}") from None


def detect_convention(case_dir: str) -> BraTSConvention:
    """Infer the convention of a case folder from the names of the files in it.

    Raises:
        ValueError: if the folder holds files of neither or of both conventions.
    """
    case_id = os.path.basename(os.path.normpath(case_dir))
    names = set(os.listdir(case_dir)) if os.path.isdir(case_dir) else set()
    found = [c for c in CONVENTIONS.values() if any(c.filename(case_id, m) in names for m in MODALITIES)]
    if len(found) != 1:
        raise ValueError(
            f"case folder {case_dir!r}: cannot tell the BraTS naming convention; expected files like "
            f"{BRATS2018.filename(case_id, 't1')} (2018-2021) or {BRATS2023.filename(case_id, 't1')} (2023+), "
            f"found {sorted(names)[:6]}"
        )
    return found[0]


def institution_of(case_id: str) -> str:
    """Institution (acquisition site) encoded in a BraTS case id.

    BraTS 2018-2021 ids look like ``Brats18_CBICA_AME_1`` or ``Brats18_TCIA01_201_1``: the institution is the
    token after the first separator, trailing digits dropped (``TCIA01`` and ``TCIA10`` are both ``TCIA``;
    an all-digit token such as ``2013`` is kept). 2023+ ids (``BraTS-GLI-00000-000``) carry the task, not the
    institution, in that place, so an institution split of those is one group per task.

    Raises:
        ValueError: if the id has no separator to split on.
    """
    sep = "_" if "_" in case_id else "-" if "-" in case_id else None
    if sep is None:
        raise ValueError(f"case id {case_id!r} has no '_' or '-': cannot read an institution from it")
    token = case_id.split(sep)[1]
    stripped = token.rstrip("0123456789")
    return stripped or token
