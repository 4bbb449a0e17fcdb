"""Scan a BraTS folder, validate every case and write one Decathlon-style datalist per federated site.

The output folder holds:

- ``<site>.json``: the site's ``training`` and ``validation`` cases; ``image`` lists the four sequences in
  canonical order (:data:`fedbrats.constants.MODALITIES`), ``null`` where the file is absent or the site's
  modality profile says the site does not have that sequence.
- ``test.json``: a held-out ``test`` set, drawn per site (stratified), with all four sequences, because
  evaluation covers all 15 sequence combinations.
- ``sites.json``: the manifest a federated client reads to find its own datalist and available sequences.
- ``dataset.json``, ``nnunet_splits_final.json``, ``nnunet_cases.json``: the same cases as an nnU-Net v2 dataset
  (:mod:`fedbrats.data.nnunet`; ``--nnunet off`` leaves them out).

Command line::

    python -m fedbrats.data.prepare --data-dir /data/brats2018 --out-dir datalists --split institution \\
        --site-modalities "CBICA=t1,t1ce,t2,flair;TCIA=t1,t2,flair;2013=t2,flair"
    python -m fedbrats.data.prepare --data-dir /data/FeTS2022 --out-dir datalists --split fets-csv \\
        --split-map /data/FeTS2022/partitioning_1.csv
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fedbrats.commands import run_command
from fedbrats.constants import MODALITIES
from fedbrats.data.conventions import (
    BRATS2018,
    BRATS2023,
    CONVENTIONS,
    BraTSConvention,
    get_convention,
)
from fedbrats.data.federation import add_pooled_site
from fedbrats.data.nnunet import DATASET_JSON as NNUNET_DATASET_JSON
from fedbrats.data.nnunet import NNUNET_LABEL_MODES, NnUNetCase, dataset_labels, write_nnunet_dataset
from fedbrats.data.nnunet import OUTPUT_NAMES as NNUNET_OUTPUTS
from fedbrats.data.splits import (
    SPLITS,
    assign_folds,
    assign_sites,
    check_fraction,
    split_site,
)
from fedbrats.data.validation import CaseInfo, CaseValidationError, validate_case
from fedbrats.utils import write_json_atomic

logger = logging.getLogger(__name__)


#: Version of the ``sites.json`` layout.
MANIFEST_VERSION: int = 1
#: The manifest of a cross-validated preparation (``--folds``): the folds and their ``sites.json``.
FOLDS_MANIFEST = "folds.json"

#: File names the output folder reserves; a site may not be called after them.
_RESERVED_SITE_NAMES = frozenset(
    {"test", "sites", os.path.splitext(FOLDS_MANIFEST)[0]} | {os.path.splitext(name)[0] for name in NNUNET_OUTPUTS}
)
#: Site names become file names and NVFlare client names: keep them plain.
_SITE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

#: The lists of :func:`split_site`'s result, in its order.
_SUBSETS: tuple[str, ...] = ("training", "validation", "test")

_LABEL_NAMES = {0: "background", 1: "necrotic / non-enhancing tumour core", 2: "peritumoural edema"}


class InvalidCasesError(ValueError):
    """Raised when cases fail validation and invalid cases are not to be skipped.

    Attributes:
        errors: one :class:`CaseValidationError` per bad case.
    """

    def __init__(self, errors: Sequence[CaseValidationError], total: int) -> None:
        self.errors = list(errors)
        lines = "\n".join(f"  - {e}" for e in self.errors)
        super().__init__(
            f"{len(self.errors)} of {total} cases failed validation; fix them, or pass --skip-invalid "
            f"(skip_invalid=True) to leave them out:\n{lines}"
        )


# ----------------------------------------------------------------------------------------------------------
# Scanning and splitting
# ----------------------------------------------------------------------------------------------------------


def _is_case_dir(path: str) -> bool:
    try:
        return any(name.endswith(".nii.gz") for name in os.listdir(path))
    except OSError:
        return False


def _holds_plain_nifti(path: str) -> bool:
    try:
        return any(name.endswith(".nii") for name in os.listdir(path))
    except OSError:
        return False


def scan_cases(data_dir: str) -> list[str]:
    """Case folders directly under ``data_dir``, sorted by name.

    A case folder is a directory holding at least one ``.nii.gz`` file; its name is the case id.

    Args:
        data_dir: the BraTS folder, laid out as ``data_dir/<case_id>/<case_id>_<sequence>.nii.gz``.

    Returns:
        Absolute paths of the case folders.

    Raises:
        ValueError: ``data_dir`` does not exist, holds no case folder, or holds case folders of uncompressed
            ``.nii`` files.
    """
    if not data_dir:
        raise ValueError("data_dir: empty path")
    data_dir = os.path.abspath(data_dir)
    if not os.path.isdir(data_dir):
        raise ValueError(f"data_dir {data_dir!r} does not exist or is not a folder")
    subdirs = sorted(
        os.path.join(data_dir, name)
        for name in os.listdir(data_dir)
        if not name.startswith(".") and os.path.isdir(os.path.join(data_dir, name))
    )
    cases = [d for d in subdirs if _is_case_dir(d)]
    uncompressed = [os.path.basename(d) for d in subdirs if not _is_case_dir(d) and _holds_plain_nifti(d)]
    if uncompressed:
        # Skipping them would drop cases in silence, and "no case folder" would blame the layout.
        raise ValueError(
            f"data_dir {data_dir!r}: {len(uncompressed)} case folder(s) hold uncompressed .nii files "
            f"(e.g. {uncompressed[:3]}); fedbrats reads BraTS's .nii.gz files: compress them, e.g. "
            f"gzip {os.path.join(data_dir, uncompressed[0], '*.nii')}"
        )
    if not cases:
        # The original BraTS 2018 download nests cases under HGG/ and LGG/: say so rather than just "empty".
        nested = [os.path.basename(d) for d in subdirs if any(_is_case_dir(os.path.join(d, n)) for n in os.listdir(d))]
        hint = f"; the subfolders {nested} hold case folders: point data_dir at one of them" if nested else ""
        raise ValueError(
            f"data_dir {data_dir!r} holds no case folder; expected one folder per case with its NIfTI files, "
            f"e.g. {data_dir}/Brats18_CBICA_AAB_1/Brats18_CBICA_AAB_1_t1.nii.gz "
            f"or {data_dir}/BraTS-GLI-00000-000/BraTS-GLI-00000-000-t1n.nii.gz{hint}"
        )
    return cases


# ----------------------------------------------------------------------------------------------------------
# Site modality profiles
# ----------------------------------------------------------------------------------------------------------


def _canonical_modalities(names: Sequence[str] | str, site: str) -> list[str]:
    if isinstance(names, str):
        names = names.split(",")
    cleaned = [str(n).strip() for n in names if str(n).strip()]
    if not cleaned:
        raise ValueError(f"site_modalities: site {site!r} lists no sequence; choose from {list(MODALITIES)}")
    for name in cleaned:
        if name not in MODALITIES:
            hint = ""
            # Help with the 2023+ file suffixes, which are not the canonical names.
            for conv in (BRATS2023, BRATS2018):
                if name in conv.suffixes:
                    hint = f" (did you mean {MODALITIES[conv.suffixes.index(name)]!r}?)"
            raise ValueError(
                f"site_modalities: site {site!r}: unknown sequence {name!r}{hint}; choose from {list(MODALITIES)}"
            )
    return [m for m in MODALITIES if m in set(cleaned)]


def parse_site_modalities(
    spec: str | Mapping[str, Sequence[str] | str] | None, sites: Sequence[str] | None = None
) -> dict[str, list[str]]:
    """Parse a site -> available sequences profile.

    Args:
        spec: a JSON file path (``{"site-1": ["t1", "t2"], ...}``), an inline spec
            (``"site-1=t1,t1ce,t2,flair;site-2=t1,t2,flair"``), a mapping, or ``None`` (all four everywhere).
        sites: the real site names; when given, unknown sites are an error and sites not in ``spec`` get all
            four sequences.

    Returns:
        Site -> available sequences in canonical order.

    Raises:
        ValueError: unreadable file, malformed spec, unknown sequence (naming it and the site), or unknown site
            (listing the real ones).
    """
    raw: Mapping[str, Sequence[str] | str]
    if spec is None or (isinstance(spec, str) and not spec.strip()):
        raw = {}
    elif isinstance(spec, Mapping):
        raw = spec
    elif isinstance(spec, str):
        text = spec.strip()
        if os.path.isfile(text) or text.endswith(".json"):
            if not os.path.isfile(text):
                raise ValueError(f"site_modalities: file {text!r} not found")
            try:
                with open(text, encoding="utf-8") as fh:
                    raw = json.load(fh)
            except (OSError, json.JSONDecodeError) as exc:
                raise ValueError(f"site_modalities: cannot read {text!r} as JSON ({exc})") from exc
            if not isinstance(raw, dict):
                raise ValueError(f"site_modalities: {text!r} must hold a JSON object {{site: [sequences]}}")
        else:
            parsed: dict[str, str] = {}
            for part in (p.strip() for p in text.split(";")):
                if not part:
                    continue
                site, sep, mods = part.partition("=")
                if not sep or not site.strip():
                    raise ValueError(
                        f"site_modalities: cannot parse {part!r}; expected 'site=seq,seq;site=seq,...', "
                        "e.g. 'site-1=t1,t1ce,t2,flair;site-2=t1,t2,flair'"
                    )
                if site.strip() in parsed:
                    raise ValueError(f"site_modalities: site {site.strip()!r} given twice")
                parsed[site.strip()] = mods
            raw = parsed
    else:
        raise ValueError(f"site_modalities: expected a path, an inline spec or a mapping, got {type(spec).__name__}")

    profile = {str(site): _canonical_modalities(mods, str(site)) for site, mods in raw.items()}
    if sites is None:
        return profile
    unknown = sorted(set(profile) - set(sites))
    if unknown:
        raise ValueError(f"site_modalities names unknown site(s) {unknown}; the sites of this split are {list(sites)}")
    for site in sites:
        if site not in profile:
            profile[site] = list(MODALITIES)
    return {site: profile[site] for site in sites}


# ----------------------------------------------------------------------------------------------------------
# Hold-out and datalists
# ----------------------------------------------------------------------------------------------------------


def _check_validation_cases(
    splits: Mapping[str, tuple[list[str], list[str], list[str]]], val_fraction: float, bad_by_site: Mapping[str, int]
) -> None:
    """Refuse a split that leaves a site without validation cases, before anything is written.

    Every site scores the global model on its validation cases each round (the server's best-model selection
    uses those scores), and a site without any fails at start; writing such a federation would only move the
    failure to every site's first round.

    Raises:
        ValueError: the sites without validation cases, and the fix.
    """
    empty = sorted(site for site, (_, val, _) in splits.items() if not val)
    if not empty:
        return
    if val_fraction == 0:
        raise ValueError(
            f"val_fraction (--val-fraction) is 0, so site(s) {empty} get no validation case; every site needs one "
            "to score the global model each round. Use --val-fraction 0.2 (the default)"
        )
    details = [
        f"{site} ({len(splits[site][0])} training case(s) left"
        + (f" after skipping {bad_by_site[site]} invalid" if bad_by_site.get(site) else "")
        + ")"
        for site in empty
    ]
    raise ValueError(
        f"site(s) {', '.join(details)} have too few cases for a validation case; every site needs at least two "
        "usable cases (one to train, one to validate) besides its test cases. Fix or add cases, lower "
        "--test-fraction, or merge the site into another (--split map)"
    )


def _labels_of(convention: BraTSConvention) -> dict[str, str]:
    names = dict(_LABEL_NAMES)
    names[convention.et_label] = "enhancing tumour"
    return {str(v): names.get(v, f"label {v}") for v in convention.labels}


def _entry(info: CaseInfo, modalities: Sequence[str], labelled: bool = True) -> dict[str, Any]:
    entry = {"case_id": info.case_id, "image": [info.paths.get(m) if m in modalities else None for m in MODALITIES]}
    if labelled:
        entry["label"] = info.label
    return entry


def parse_unlabelled_sites(spec: str | Sequence[str] | None, sites: Sequence[str]) -> set[str]:
    """The sites to mark unlabelled, from ``"A,B"`` or a list (``--unlabelled-sites``).

    Raises:
        ValueError: a name that is not a site of the split (the sites are listed).
    """
    if not spec:
        return set()
    names = [n.strip() for n in (spec.split(",") if isinstance(spec, str) else spec) if n.strip()]
    unknown = sorted(set(names) - set(sites))
    if unknown:
        raise ValueError(f"unlabelled_sites names unknown site(s) {unknown}; the sites of this split are {list(sites)}")
    return set(names)


def _datalist(
    name: str, description: str, convention: BraTSConvention, sections: dict[str, list[dict[str, Any]]]
) -> dict[str, Any]:
    return {
        "name": name,
        "description": description,
        "convention": convention.name,
        "modality": {str(i): m for i, m in enumerate(MODALITIES)},
        "labels": _labels_of(convention),
        **sections,
    }


def _refuse_existing_outputs(out_dir: str, names: Sequence[str]) -> None:
    """Refuse to replace a federation's files (another preparation, hand edits) without ``--overwrite``.

    Raises:
        ValueError: some of ``names`` exist in ``out_dir`` (they are listed).
    """
    existing = sorted(name for name in names if os.path.lexists(os.path.join(out_dir, name)))
    if existing:
        raise ValueError(
            f"out_dir {out_dir!r} already holds {existing}; they would be replaced. Choose another --out-dir, or pass "
            "--overwrite (overwrite=True) to replace them"
        )


# ----------------------------------------------------------------------------------------------------------
# The whole preparation
# ----------------------------------------------------------------------------------------------------------


def _check_file_identity(infos: Mapping[str, CaseInfo], data_dir: str) -> None:
    """Refuse case files that are links to files outside ``data_dir``, and one file serving two cases.

    A case folder of links into another data set would be prepared (and trained, and tested) as if it were this
    one's; two links to one image would put one patient into training and test at once.

    Raises:
        ValueError: every such file, named.
    """
    root = os.path.realpath(data_dir)
    owner: dict[str, str] = {}
    problems = []
    for case_id, info in sorted(infos.items()):
        for path in [*(p for p in info.paths.values() if p), *([info.label] if info.label else [])]:
            real = os.path.realpath(path)
            if os.path.commonpath([root, real]) != root:
                problems.append(f"{path} is a link to {real}, outside --data-dir")
            elif real in owner and owner[real] != case_id:
                problems.append(f"{path} is the same file as one of case {owner[real]} ({real})")
            owner.setdefault(real, case_id)
    if problems:
        raise ValueError(
            f"{len(problems)} case file(s) cannot be trusted to belong to their case:\n"
            + "\n".join(f"  - {p}" for p in problems)
            + "\nCopy the files into --data-dir, or remove the links"
        )


def _validate_all(
    case_dirs: dict[str, str],
    site_of: dict[str, str],
    profile: dict[str, list[str]],
    convention: BraTSConvention | None,
    deep: bool,
    progress_every: int,
    unlabelled: set[str] = frozenset(),
) -> tuple[dict[str, CaseInfo], list[CaseValidationError]]:
    infos: dict[str, CaseInfo] = {}
    errors: list[CaseValidationError] = []
    total = len(case_dirs)
    start = time.monotonic()
    logger.info("validating %d cases (%s)", total, "deep: reading all voxels" if deep else "shallow: headers only")
    for i, (case_id, case_dir) in enumerate(sorted(case_dirs.items()), start=1):
        try:
            infos[case_id] = validate_case(
                case_dir,
                convention=convention,
                required_modalities=profile[site_of[case_id]],
                check_label=site_of[case_id] not in unlabelled,
                deep=deep,
            )
        except CaseValidationError as exc:
            errors.append(exc)
        if progress_every > 0 and (i % progress_every == 0 or i == total):
            logger.info(
                "validated %d/%d cases (%d invalid so far, %.1f s)", i, total, len(errors), time.monotonic() - start
            )
    return infos, errors


def prepare(
    data_dir: str,
    out_dir: str,
    *,
    split: str = "institution",
    k: int | None = None,
    split_map: str | Mapping[str, Any] | None = None,
    site_modalities: str | Mapping[str, Sequence[str] | str] | None = None,
    test_fraction: float | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    convention: str | BraTSConvention | None = None,
    deep_validate: bool = True,
    skip_invalid: bool = False,
    progress_every: int = 10,
    overwrite: bool = False,
    unlabelled_sites: str | Sequence[str] | None = None,
    nnunet: str = "regions",
    folds: int = 0,
) -> dict[str, Any]:
    """Scan ``data_dir``, validate every case, split into sites and write the datalists and ``sites.json``.

    Nothing is written unless every check passes (or, with ``skip_invalid``, unless enough cases remain).

    Args:
        data_dir: the BraTS folder (one sub-folder per case).
        out_dir: where ``<site>.json``, ``test.json`` and ``sites.json`` go (created if needed).
        split: ``"institution"`` (one site per institution in the case ids), ``"random"`` (``k`` balanced
            sites), ``"map"`` (``split_map``) or ``"fets-csv"`` (a FeTS partitioning CSV as ``split_map``: one
            site ``site-<Partition_ID>`` per partition).
        k: number of sites for ``split="random"``.
        split_map: JSON file path or mapping for ``split="map"``; the CSV's path for ``split="fets-csv"``.
        site_modalities: site -> available sequences (see :func:`parse_site_modalities`); default all four.
        test_fraction: share of each site's cases held out for the global test set, in [0, 1) (default 0.2);
            not with ``folds``, where each fold's test share is ``1 / folds``.
        val_fraction: share of each site's remaining cases used for validation, in [0, 1).
        seed: random seed for the random split and the hold-outs.
        convention: ``"brats2018"``, ``"brats2023"`` or ``None`` to detect it per case.
        deep_validate: decompress every volume (catches truncated files and bad labels) instead of headers only.
        skip_invalid: leave invalid cases out with a warning instead of aborting.
        progress_every: log validation progress every this many cases (0: only errors and the summary).
        overwrite: replace an existing ``sites.json``, ``test.json`` or site datalist in ``out_dir``; without it
            they are refused before any case is read (``--overwrite``).
        unlabelled_sites: sites without labels (``"A,B"`` or a list, ``--unlabelled-sites``): their segmentations
            are neither required nor read, their datalists name none, and ``sites.json`` marks them
            ``"labelled": false``. Only their cases whose segmentation file exists can join the shared test set.
        nnunet: also write the cases as an nnU-Net v2 dataset (``dataset.json``, ``nnunet_splits_final.json``,
            ``nnunet_cases.json``, see :mod:`fedbrats.data.nnunet`) with ``"regions"`` (region-based BraTS
            training) or ``"labels"``; ``"off"`` writes none of them (``--nnunet``).
        folds: 0 for one federation; ``K >= 2`` for K-fold cross-validation (``--folds``): one complete federation
            per fold in ``out_dir/fold<k>/`` (datalists, ``test.json``, ``sites.json``, nnU-Net files), each site's
            test-eligible cases dealt into the K folds so that every such case is a test case in exactly one fold
            and every site keeps training and validation cases in every fold, and ``out_dir/folds.json`` listing
            them.

    Returns:
        The manifest written to ``sites.json`` (with ``folds``: the one written to ``folds.json``).

    Raises:
        InvalidCasesError: cases failed validation and ``skip_invalid`` is off (lists every bad case).
        ValueError: any bad argument, an empty or mostly invalid site, mixed conventions.
    """
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 0 or folds == 1:
        raise ValueError(f"folds (--folds) must be 0 (no cross-validation) or an integer >= 2, got {folds!r}")
    if folds and test_fraction is not None:
        raise ValueError(
            "test_fraction (--test-fraction) and folds (--folds) exclude each other: with K folds every fold holds "
            "out 1/K of each site's cases"
        )
    test_fraction = check_fraction("test_fraction", 0.2 if test_fraction is None else test_fraction)
    val_fraction = check_fraction("val_fraction", val_fraction)
    if not out_dir:
        raise ValueError("out_dir: empty path")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"out_dir {out_dir!r} exists and is not a folder")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    conv = get_convention(convention) if isinstance(convention, str) else convention
    if nnunet != "off":
        dataset_labels(nnunet)  # an unknown mode fails here, before any case is read
    data_dir = os.path.abspath(data_dir)
    out_dir = os.path.abspath(out_dir)

    case_dirs = {os.path.basename(d): d for d in scan_cases(data_dir)}
    sites = assign_sites(list(case_dirs), split, k, split_map, seed, data_dir)
    for site, members in sites.items():
        if not _SITE_NAME_RE.match(site) or site in _RESERVED_SITE_NAMES:
            raise ValueError(
                f"site name {site!r} cannot be used: it must match {_SITE_NAME_RE.pattern} "
                f"and not be one of {sorted(_RESERVED_SITE_NAMES)}"
            )
        if not members:
            raise ValueError(f"site {site!r} has no cases")
    profile = parse_site_modalities(site_modalities, list(sites))
    unlabelled = parse_unlabelled_sites(unlabelled_sites, list(sites))
    if not overwrite:
        outputs = [*(f"{site}.json" for site in sites), "test.json", "sites.json"]
        outputs += list(NNUNET_OUTPUTS) if nnunet != "off" else []
        if folds:
            outputs = [FOLDS_MANIFEST] + [
                os.path.join(fold_dir_name(k), name) for k in range(folds) for name in outputs
            ]
        _refuse_existing_outputs(out_dir, outputs)
    site_of = {case: site for site, members in sites.items() for case in members}

    infos, errors = _validate_all(case_dirs, site_of, profile, conv, deep_validate, progress_every, unlabelled)
    _check_file_identity(infos, data_dir)
    if errors and not skip_invalid:
        raise InvalidCasesError(errors, len(case_dirs))
    bad_by_site: dict[str, int] = {}
    for err in errors:
        logger.warning("skipping invalid case: %s", err)
        bad_by_site[site_of[err.case_id]] = bad_by_site.get(site_of[err.case_id], 0) + 1
    for site, n_bad in bad_by_site.items():
        n = len(sites[site])
        if 2 * n_bad > n:
            raise ValueError(f"site {site}: {n_bad} of {n} cases invalid; refusing to train on almost nothing")

    conventions_found = sorted({info.convention for info in infos.values()})
    if len(conventions_found) != 1:
        raise ValueError(
            f"data_dir {data_dir!r} mixes conventions {conventions_found}; prepare each release separately "
            "or convert the files to one naming"
        )
    conv = CONVENTIONS[conventions_found[0]]

    # Hold-outs first, all in memory: nothing is written until every site is known to be usable.
    usable: dict[str, tuple[list[str], list[str]]] = {}
    for site, members in sites.items():
        valid = [c for c in members if c in infos]
        if not valid:
            raise ValueError(f"site {site!r} has no valid case left")
        # Test cases need every sequence and, for evaluation, a segmentation (an unlabelled site may lack it).
        eligible = [
            c for c in valid if all(infos[c].paths[m] is not None for m in MODALITIES) and infos[c].label is not None
        ]
        usable[site] = (valid, eligible)
    federation = _Federation(data_dir, conv, profile, infos, site_of, unlabelled, split, seed, nnunet, errors)
    if folds:
        return _write_folds(out_dir, federation, usable, folds, val_fraction, bad_by_site)
    splits: dict[str, tuple[list[str], list[str], list[str]]] = {}
    for site, (valid, eligible) in usable.items():
        train, val, test = split_site(site, valid, eligible, test_fraction, val_fraction, seed)
        if not train:
            raise ValueError(f"site {site!r} has no training case after the test/validation split")
        splits[site] = (train, val, test)
    _check_validation_cases(splits, val_fraction, bad_by_site)
    if test_fraction > 0 and not any(test for _, _, test in splits.values()):
        logger.warning("no test case could be held out (too few cases, or none with all four sequences)")
    manifest = _write_federation(
        out_dir, federation, splits, {"test_fraction": test_fraction, "val_fraction": val_fraction}
    )
    _log_summary(splits, profile, out_dir)
    return manifest


@dataclass(frozen=True)
class _Federation:
    """What every datalist of one preparation is written from (the cases, their sites and sequences)."""

    data_dir: str
    convention: BraTSConvention
    profile: dict[str, list[str]]
    infos: dict[str, CaseInfo]
    site_of: dict[str, str]
    unlabelled: set[str]
    split: str
    seed: int
    nnunet: str
    errors: list[CaseValidationError]


def _write_folds(
    out_dir: str,
    federation: _Federation,
    usable: Mapping[str, tuple[list[str], list[str]]],
    folds: int,
    val_fraction: float,
    bad_by_site: Mapping[str, int],
) -> dict[str, Any]:
    """Write one complete federation per cross-validation fold (``out_dir/fold<k>/``) and ``out_dir/folds.json``.

    Every site's test-eligible cases are dealt into the folds (:func:`assign_folds`); in fold ``k`` they are the
    test cases, and each site's other cases split into training and validation as without folds. Every fold is
    checked before any is written.

    Returns:
        The folds manifest written to ``folds.json``.
    """
    dealt = assign_folds({site: eligible for site, (_, eligible) in usable.items()}, folds, federation.seed)
    for site, (_, eligible) in usable.items():
        if len(eligible) < folds:
            logger.warning(
                "site %s has %d test-eligible case(s) for %d folds: it has no test case in some folds",
                site,
                len(eligible),
                folds,
            )
    fold_splits: list[dict[str, tuple[list[str], list[str], list[str]]]] = []
    for k in range(folds):
        splits = {}
        for site, (valid, _) in usable.items():
            test = dealt[site][k]
            rest = [c for c in valid if c not in set(test)]
            train, val, _ = split_site(site, rest, [], 0.0, val_fraction, federation.seed)
            if not train:
                raise ValueError(
                    f"fold {k}: site {site!r} has no training case once its test cases are held out; use fewer "
                    "--folds or merge the site into another (--split map)"
                )
            splits[site] = (train, val, test)
        try:
            _check_validation_cases(splits, val_fraction, bad_by_site)
        except ValueError as exc:
            raise ValueError(f"fold {k}: {exc}; or use fewer --folds") from None
        fold_splits.append(splits)
    fold_dirs = []
    for k, splits in enumerate(fold_splits):
        fold_dir = os.path.join(out_dir, fold_dir_name(k))
        _write_federation(fold_dir, federation, splits, {"fold": k, "folds": folds, "val_fraction": val_fraction})
        _log_summary(splits, federation.profile, fold_dir)
        fold_dirs.append(fold_dir)
    manifest = {
        "version": MANIFEST_VERSION,
        "data_dir": federation.data_dir,
        "folds": folds,
        "split": federation.split,
        "seed": federation.seed,
        "val_fraction": val_fraction,
        "fold_sites": [os.path.join(d, "sites.json") for d in fold_dirs],
        "num_test": [sum(len(test) for _, _, test in splits.values()) for splits in fold_splits],
    }
    write_json_atomic(os.path.join(out_dir, FOLDS_MANIFEST), manifest)
    return manifest


def fold_dir_name(k: int) -> str:
    """The folder of fold ``k`` in a cross-validated preparation (``fold0``, ``fold1``, ...)."""
    return f"fold{k}"


def _write_federation(
    out_dir: str,
    federation: _Federation,
    splits: Mapping[str, tuple[list[str], list[str], list[str]]],
    extra: Mapping[str, Any],
) -> dict[str, Any]:
    """Write the sites' datalists, ``test.json``, the nnU-Net files and (last) ``sites.json`` of one federation.

    Returns:
        The manifest written to ``sites.json``.
    """
    conv, infos, profile, unlabelled = (
        federation.convention,
        federation.infos,
        federation.profile,
        federation.unlabelled,
    )
    data_dir = federation.data_dir
    test_cases = sorted(c for _, _, test in splits.values() for c in test)
    os.makedirs(out_dir, exist_ok=True)
    manifest_sites: dict[str, Any] = {}
    for site, (train, val, test) in splits.items():
        mods = profile[site]
        labelled = site not in unlabelled
        path = os.path.join(out_dir, f"{site}.json")
        write_json_atomic(
            path,
            _datalist(
                name=f"fedbrats-{site}",
                description=(
                    f"BraTS site {site}: {len(train)} training, {len(val)} validation and {len(test)} test cases "
                    f"from {data_dir}; available sequences {mods}"
                ),
                convention=conv,
                sections={
                    "training": [_entry(infos[c], mods, labelled) for c in train],
                    "validation": [_entry(infos[c], mods, labelled) for c in val],
                    # The site's own test cases, with its own sequences: what the federated (cross-site) evaluation
                    # scores there. They are also in the pooled test.json, with all four sequences, for the
                    # evaluation of a whole federation in one place.
                    "test": [_entry(infos[c], mods, labelled) for c in sorted(test)],
                },
            ),
        )
        manifest_sites[site] = {
            "datalist": path,
            "modalities": mods,
            "convention": conv.name,
            "num_training": len(train),
            "num_validation": len(val),
            "num_test": len(test),
        }
        if site in unlabelled:
            manifest_sites[site]["labelled"] = False
    if federation.nnunet != "off":
        site_of = federation.site_of
        subsets = {c: subset for _, lists in splits.items() for subset, cs in zip(_SUBSETS, lists) for c in cs}
        write_nnunet_dataset(
            out_dir,
            [
                NnUNetCase(
                    c,
                    site_of[c],
                    subsets[c],
                    tuple(infos[c].paths.get(m) for m in MODALITIES),
                    infos[c].label if site_of[c] not in unlabelled else None,
                )
                for c in sorted(subsets)
            ],
            conv,
            mode=federation.nnunet,
            name=f"fedbrats-{os.path.basename(data_dir)}",
            description=f"BraTS cases of {data_dir} as prepared by fedbrats ({federation.split} split, "
            f"seed {federation.seed})",
        )
    test_path = os.path.join(out_dir, "test.json")
    write_json_atomic(
        test_path,
        _datalist(
            name="fedbrats-test",
            description=f"Held-out BraTS test cases ({len(test_cases)}) from {data_dir}, all four sequences",
            convention=conv,
            # Each test case names its site, so that a report can score every site on its own sequences.
            sections={"test": [{**_entry(infos[c], MODALITIES), "site": federation.site_of[c]} for c in test_cases]},
        ),
    )
    manifest: dict[str, Any] = {
        "version": MANIFEST_VERSION,
        "data_dir": data_dir,
        "convention": conv.name,
        "test_datalist": test_path,
        "split": federation.split,
        "seed": federation.seed,
        **extra,
        "num_test": len(test_cases),
        "skipped_cases": sorted(e.case_id for e in federation.errors),
        "sites": manifest_sites,
    }
    if federation.nnunet != "off":
        manifest["nnunet"] = {"dataset_json": os.path.join(out_dir, NNUNET_DATASET_JSON), "labels": federation.nnunet}
    # sites.json last: once it exists, every datalist it points to is complete.
    write_json_atomic(os.path.join(out_dir, "sites.json"), manifest)
    return manifest


def _log_summary(
    splits: dict[str, tuple[list[str], list[str], list[str]]], profile: dict[str, list[str]], out: str
) -> None:
    width = max([len("site")] + [len(s) for s in splits])
    lines = [f"{'site':<{width}}  cases  train  val  test  modalities"]
    for site, (train, val, test) in splits.items():
        n = len(train) + len(val) + len(test)
        lines.append(
            f"{site:<{width}}  {n:>5}  {len(train):>5}  {len(val):>3}  {len(test):>4}  {','.join(profile[site])}"
        )
    logger.info("datalists written to %s:\n%s", out, "\n".join(lines))


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------


def written_sites_files(out_dir: str, folds: int = 0) -> list[str]:
    """The ``sites.json`` files a preparation into ``out_dir`` wrote (one per fold with ``folds``)."""
    if not folds:
        return [os.path.join(out_dir, "sites.json")]
    return [os.path.join(out_dir, fold_dir_name(k), "sites.json") for k in range(folds)]


#: What ``fedbrats prepare`` does (its ``--help``).
PREPARE_DESCRIPTION = "Validate a BraTS folder and write per-site Decathlon-style datalists and sites.json."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``fedbrats prepare`` options."""
    parser.add_argument("--data-dir", required=True, help="BraTS folder with one sub-folder per case")
    parser.add_argument("--out-dir", required=True, help="output folder for <site>.json, test.json, sites.json")
    parser.add_argument("--split", choices=SPLITS, default="institution", help="how cases are assigned to sites")
    parser.add_argument("--num-sites", type=int, default=None, help="number of sites for --split random")
    parser.add_argument(
        "--split-map",
        default=None,
        help="--split map: JSON {case_id: site} or {site: [case_ids]}; --split fets-csv: a FeTS partitioning CSV "
        "(Partition_ID, Subject_ID), one site site-<Partition_ID> per partition",
    )
    parser.add_argument(
        "--site-modalities",
        default=None,
        help="JSON file or inline 'site-1=t1,t1ce,t2,flair;site-2=t1,t2,flair' (default: all four everywhere)",
    )
    parser.add_argument(
        "--unlabelled-sites",
        default=None,
        help="comma-separated sites without labels: no segmentation required or read, marked labelled=false",
    )
    parser.add_argument(
        "--test-fraction", type=float, default=None, help="share of each site held out for test (default 0.2)"
    )
    parser.add_argument(
        "--folds",
        type=int,
        default=0,
        help="K-fold cross-validation: one federation per fold in OUT/fold<k>/, each site's cases dealt into the K "
        "test folds (3 is the RFNet/mmFormer convention for BraTS 2018); 0: one federation (default)",
    )
    parser.add_argument(
        "--pool",
        action="store_true",
        help="also add the pooled 'central' site (the centralized baseline) to every sites.json written",
    )
    parser.add_argument("--val-fraction", type=float, default=0.2, help="share of each site's rest for validation")
    parser.add_argument("--seed", type=int, default=0, help="random seed (random split and hold-outs)")
    parser.add_argument("--convention", choices=sorted(CONVENTIONS), default=None, help="default: detect per case")
    parser.add_argument("--skip-invalid", action="store_true", help="leave invalid cases out instead of aborting")
    parser.add_argument("--shallow", action="store_true", help="check headers only (fast, misses truncated files)")
    parser.add_argument("--progress-every", type=int, default=10, help="log progress every N cases")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace sites.json, datalists and nnU-Net files in --out-dir"
    )
    parser.add_argument(
        "--nnunet",
        choices=[*NNUNET_LABEL_MODES, "off"],
        default="regions",
        help="also write an nnU-Net v2 dataset.json (+ nnunet_splits_final.json, nnunet_cases.json): region-based "
        "BraTS labels (default), plain labels, or off",
    )


def run(args: argparse.Namespace) -> int:
    """Run ``fedbrats prepare`` with parsed options (errors: :func:`fedbrats.commands.run_command`)."""
    prepare(
        args.data_dir,
        args.out_dir,
        split=args.split,
        k=args.num_sites,
        split_map=args.split_map,
        site_modalities=args.site_modalities,
        test_fraction=args.test_fraction,
        val_fraction=args.val_fraction,
        seed=args.seed,
        convention=args.convention,
        deep_validate=not args.shallow,
        skip_invalid=args.skip_invalid,
        progress_every=args.progress_every,
        overwrite=args.overwrite,
        unlabelled_sites=args.unlabelled_sites,
        nnunet=args.nnunet,
        folds=args.folds,
    )
    if args.pool:
        for sites_file in written_sites_files(args.out_dir, args.folds):
            add_pooled_site(sites_file)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the ``prepare`` command.

    Returns:
        0 on success, 1 when the data or the options are wrong (the reason is logged).
    """
    return run_command("prepare", add_arguments, run, argv, PREPARE_DESCRIPTION)


if __name__ == "__main__":
    sys.exit(main())
