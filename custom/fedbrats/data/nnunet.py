"""The federation's cases as an nnU-Net v2 dataset: ``dataset.json``, a splits file and the case mapping.

``fedbrats prepare`` writes, beside the datalists:

- ``dataset.json``: nnU-Net v2's dataset description (``channel_names`` 0..3 = T1, T1ce, T2, FLAIR in our
  canonical order, ``labels``, ``numTraining``, ``file_ending``) with a ``dataset`` section that names every
  training case's files where they are, so nnU-Net reads them without copying (nnU-Net v2 resolves relative
  entries against the dataset folder; ours are absolute). Put the file in ``$nnUNet_raw/Dataset5xx_Name/``.
- ``nnunet_splits_final.json``: one fold whose ``train``/``val`` are the federation's training and validation
  cases (all sites pooled); copy it to ``$nnUNet_preprocessed/Dataset5xx_Name/splits_final.json`` to train
  nnU-Net on exactly the cases the federation trains on.
- ``nnunet_cases.json``: every case's nnU-Net identifier, site and subset (``training``, ``validation``,
  ``test``), and why a case is not in ``dataset.json``.

nnU-Net needs consecutive label values, so labels use the BraTS 2023 numbering (1 necrotic core, 2 edema,
3 enhancing tumour): 2023+ segmentations are named where they are, BraTS 2018-2021 ones (enhancing tumour 4)
are written converted to ``nnunet_labels/<identifier>.nii.gz``. ``regions`` (the default) declares nnU-Net's
region-based BraTS training (whole tumour, tumour core, enhancing tumour, the regions this package trains and
scores); ``labels`` declares the three plain labels.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import nibabel as nib
import numpy as np

from fedbrats.constants import MODALITIES
from fedbrats.data.conventions import BraTSConvention
from fedbrats.utils import write_atomic, write_json_atomic

logger = logging.getLogger(__name__)

#: How ``dataset.json`` declares the labels: nnU-Net's region-based BraTS training, or plain labels.
NNUNET_LABEL_MODES: tuple[str, ...] = ("regions", "labels")

DATASET_JSON = "dataset.json"
SPLITS_FILE = "nnunet_splits_final.json"
CASES_FILE = "nnunet_cases.json"
LABELS_DIR = "nnunet_labels"
#: Every name :func:`write_nnunet_dataset` may create in the output folder.
OUTPUT_NAMES: tuple[str, ...] = (DATASET_JSON, SPLITS_FILE, CASES_FILE, LABELS_DIR)

FILE_ENDING = ".nii.gz"
#: nnU-Net channel index -> name, in :data:`MODALITIES` order. Any name but "CT" gives per-channel z-scoring.
CHANNEL_NAMES: dict[str, str] = {"0": "T1", "1": "T1ce", "2": "T2", "3": "FLAIR"}

_NCR, _ED, _ET = 1, 2, 3  # the BraTS 2023 numbering, which is nnU-Net's (consecutive from 0)
_REGION_LABELS: dict[str, Any] = {
    "background": 0,
    "whole tumor": [_NCR, _ED, _ET],
    "tumor core": [_NCR, _ET],
    "enhancing tumor": [_ET],
}
# The label painted for each region, in the order above, when nnU-Net turns predicted regions back into labels:
# whole tumour outside the core is edema, core outside enhancing tumour is necrosis.
_REGIONS_CLASS_ORDER = [_ED, _NCR, _ET]
_PLAIN_LABELS: dict[str, int] = {"background": 0, "necrotic tumor core": _NCR, "edema": _ED, "enhancing tumor": _ET}


@dataclass(frozen=True)
class NnUNetCase:
    """One case of the federation, as :func:`write_nnunet_dataset` needs it.

    Attributes:
        case_id: the case id (folder name); also its nnU-Net identifier.
        site: the site it belongs to.
        subset: ``"training"``, ``"validation"`` or ``"test"``.
        images: the four sequence files in :data:`MODALITIES` order, ``None`` where absent on disk.
        label: the segmentation file, ``None`` where the case has none (unlabelled site).
    """

    case_id: str
    site: str
    subset: str
    images: tuple[str | None, ...]
    label: str | None


def label_lookup(convention: BraTSConvention) -> dict[int, int]:
    """The convention's label values -> nnU-Net's (the BraTS 2023 numbering)."""
    table = {0: 0, _NCR: _NCR, _ED: _ED, convention.et_label: _ET}
    unknown = sorted(set(convention.labels) - set(table))
    if unknown:
        raise ValueError(f"convention {convention.name!r}: labels {unknown} have no nnU-Net counterpart")
    return table


def dataset_labels(mode: str) -> dict[str, Any]:
    """``labels`` (and ``regions_class_order`` for ``regions``) of ``dataset.json``.

    Raises:
        ValueError: ``mode`` is not one of :data:`NNUNET_LABEL_MODES`.
    """
    if mode == "regions":
        return {"labels": dict(_REGION_LABELS), "regions_class_order": list(_REGIONS_CLASS_ORDER)}
    if mode == "labels":
        return {"labels": dict(_PLAIN_LABELS)}
    raise ValueError(f"nnunet (--nnunet) must be one of {list(NNUNET_LABEL_MODES)} or 'off', got {mode!r}")


def _exclusion(case: NnUNetCase) -> str | None:
    """Why a case cannot be an nnU-Net training case, or ``None``."""
    if case.subset == "test":
        return "held-out test case (nnU-Net must not train on it)"
    if case.label is None:
        return "no segmentation (unlabelled site)"
    missing = [m for m, path in zip(MODALITIES, case.images) if not path]
    if missing:
        return f"lacks {missing} on disk; nnU-Net needs every channel of every case"
    return None


def _write_label(source: str, target: str, lookup: Mapping[int, int]) -> None:
    """``source`` relabelled through ``lookup``, as uint8 with the same geometry, written atomically to ``target``."""
    image = nib.load(source)
    values = np.asarray(image.dataobj)
    table = np.zeros(max(lookup) + 1, dtype=np.uint8)
    for old, new in lookup.items():
        table[old] = new
    # Validation already checked the values; a lookup table keeps the conversion one pass over the volume.
    converted = table[values.astype(np.int64)]
    header = image.header.copy()
    header.set_data_dtype(np.uint8)
    write_atomic(target, lambda tmp: nib.save(nib.Nifti1Image(converted, image.affine, header), tmp), FILE_ENDING)


def write_nnunet_dataset(
    out_dir: str,
    cases: Sequence[NnUNetCase],
    convention: BraTSConvention,
    *,
    mode: str = "regions",
    name: str = "fedbrats",
    description: str = "",
) -> dict[str, Any]:
    """Write ``dataset.json``, ``nnunet_splits_final.json`` and ``nnunet_cases.json`` (see the module doc).

    Args:
        out_dir: the output folder of ``prepare`` (exists).
        cases: every case of the federation, test cases included (they are only listed in the mapping).
        convention: the label convention of the segmentation files.
        mode: ``"regions"`` or ``"labels"`` (:data:`NNUNET_LABEL_MODES`).
        name: the dataset's ``name`` in ``dataset.json``.
        description: its ``description``.

    Returns:
        The content written to ``dataset.json``.

    Raises:
        ValueError: an unknown ``mode``, or a case id given twice.
    """
    labels = dataset_labels(mode)
    ids = [case.case_id for case in cases]
    if len(set(ids)) != len(ids):
        raise ValueError(f"cases: duplicated case ids {sorted({i for i in ids if ids.count(i) > 1})}")
    lookup = label_lookup(convention)
    convert = any(old != new for old, new in lookup.items())
    entries: dict[str, dict[str, Any]] = {}
    mapping: dict[str, dict[str, Any]] = {}
    for case in sorted(cases, key=lambda c: c.case_id):
        record: dict[str, Any] = {"identifier": case.case_id, "site": case.site, "subset": case.subset}
        reason = _exclusion(case)
        if reason is None:
            label = case.label
            if convert:
                os.makedirs(os.path.join(out_dir, LABELS_DIR), exist_ok=True)
                label = os.path.join(out_dir, LABELS_DIR, f"{case.case_id}{FILE_ENDING}")
                _write_label(str(case.label), label, lookup)
            entries[case.case_id] = {"images": list(case.images), "label": label}
            record["label"] = label
        else:
            record["excluded"] = reason
        mapping[case.case_id] = record
    if not entries:
        logger.warning("nnU-Net dataset.json lists no training case (none labelled with all four sequences)")
    content: dict[str, Any] = {
        "name": name,
        "description": description,
        "channel_names": dict(CHANNEL_NAMES),
        **labels,
        "numTraining": len(entries),
        "file_ending": FILE_ENDING,
        "dataset": entries,
    }
    write_json_atomic(os.path.join(out_dir, DATASET_JSON), content)
    subsets = {cid: mapping[cid]["subset"] for cid in entries}
    write_json_atomic(
        os.path.join(out_dir, SPLITS_FILE),
        [
            {
                "train": [cid for cid, subset in subsets.items() if subset == "training"],
                "val": [cid for cid, subset in subsets.items() if subset == "validation"],
            }
        ],
    )
    write_json_atomic(
        os.path.join(out_dir, CASES_FILE),
        {
            "dataset_json": DATASET_JSON,
            "channels": {index: MODALITIES[int(index)] for index in CHANNEL_NAMES},
            "labels_from": convention.name,
            "label_values": {str(old): new for old, new in sorted(lookup.items())},
            "label_files": "converted copies in " + LABELS_DIR if convert else "the original files",
            "cases": mapping,
        },
    )
    logger.info(
        "nnU-Net v2 %s: %d training case(s) (%s labels%s), %d case(s) only in %s",
        DATASET_JSON,
        len(entries),
        mode,
        f", {convention.name} labels converted into {LABELS_DIR}/" if convert and entries else "",
        len(mapping) - len(entries),
        CASES_FILE,
    )
    return content
