"""Assigning cases to sites and to hold-outs: the site splits of ``fedbrats prepare`` (by institution, random,
a JSON map, a FeTS partitioning CSV), each site's training / validation / test split, and the cross-validation
folds (:func:`assign_folds`). Pure functions of case ids and a seed: nothing here reads or writes an image.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import random
from collections.abc import Mapping, Sequence
from typing import Any

from fedbrats.data.conventions import institution_of

logger = logging.getLogger(__name__)

#: Ways of assigning cases to sites.
SPLITS: tuple[str, ...] = ("institution", "random", "map", "fets-csv")


def _check_case_ids(case_ids: Sequence[str]) -> list[str]:
    if isinstance(case_ids, str):
        raise ValueError("case_ids: expected a sequence of case ids, got a single string")
    ids = list(case_ids)
    if not ids:
        raise ValueError("case_ids: no cases to split")
    dupes = sorted({c for c in ids if ids.count(c) > 1})
    if dupes:
        raise ValueError(f"case_ids: duplicated case ids {dupes}")
    return ids


def split_by_institution(case_ids: Sequence[str]) -> dict[str, list[str]]:
    """One site per institution encoded in the case ids (see :func:`institution_of`).

    Args:
        case_ids: the case ids.

    Returns:
        Site (institution name) -> sorted case ids, sites sorted by name.

    Raises:
        ValueError: no case ids, or an id from which no institution can be read.
    """
    sites: dict[str, list[str]] = {}
    for case_id in _check_case_ids(case_ids):
        sites.setdefault(institution_of(case_id), []).append(case_id)
    return {site: sorted(sites[site]) for site in sorted(sites)}


def split_random(case_ids: Sequence[str], k: int, seed: int) -> dict[str, list[str]]:
    """Deal the cases at random over ``k`` sites ``site-1`` ... ``site-k`` (sizes differ by at most one).

    Args:
        case_ids: the case ids.
        k: number of sites, ``1 <= k <= len(case_ids)``.
        seed: random seed; the same ids and seed give the same split.

    Returns:
        Site -> sorted case ids.

    Raises:
        ValueError: no case ids, or ``k`` out of range.
    """
    ids = sorted(_check_case_ids(case_ids))
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k (number of sites) must be a positive integer, got {k!r}")
    if k > len(ids):
        raise ValueError(f"k (number of sites) = {k} exceeds the number of cases ({len(ids)})")
    random.Random(seed).shuffle(ids)
    # Round-robin dealing keeps the sites balanced whatever the shuffle.
    return {f"site-{i + 1}": sorted(ids[i::k]) for i in range(k)}


def load_split_map(path: str) -> dict[str, Any]:
    """Read a split map JSON file (``{case_id: site}`` or ``{site: [case_id, ...]}``).

    Raises:
        ValueError: the file is missing, not JSON, or not a JSON object.
    """
    if not os.path.isfile(path):
        raise ValueError(f"split_map: file {path!r} not found")
    try:
        with open(path, encoding="utf-8") as fh:
            mapping = json.load(fh)
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"split_map: cannot read {path!r} as JSON ({exc})") from exc
    if not isinstance(mapping, dict):
        raise ValueError(f"split_map: {path!r} must hold a JSON object, got {type(mapping).__name__}")
    return mapping


#: Columns of a FeTS partitioning CSV (``partitioning_1.csv``, ``partitioning_2.csv`` of the FeTS challenges).
FETS_PARTITION_COLUMN = "Partition_ID"
FETS_SUBJECT_COLUMN = "Subject_ID"


def fets_site_name(partition_id: str) -> str:
    """Site name of a FeTS partition: ``site-<id>``, a numeric id without its leading zeros (``01`` -> ``site-1``).

    FeTS writes the same institution as ``1`` in one file and ``01`` in another; both must give one site, and
    ``site-N`` is also what ``nvflare simulator -n`` calls its clients.
    """
    text = partition_id.strip()
    return f"site-{int(text)}" if text.isdigit() else f"site-{text}"


def load_fets_partitions(path: str) -> dict[str, list[str]]:
    """Read a FeTS partitioning CSV into ``{site: [subject ids]}`` (see :func:`fets_site_name`).

    The file has a header with the columns ``Partition_ID`` and ``Subject_ID`` in either order (FeTS ships
    both orders); other columns are ignored, and the names are matched without regard to case or surrounding
    spaces. Rows whose ``Subject_ID`` is blank list nothing.

    Args:
        path: the CSV file (``--split-map`` with ``--split fets-csv``).

    Returns:
        Site -> subject ids in the order of the file, sites sorted by name.

    Raises:
        ValueError: the file is missing or unreadable, lacks one of the two columns (the columns found are
            named), a row has a subject without a partition, a subject is listed twice (both lines named), or a
            partition lists no subject.
    """
    if not os.path.isfile(path):
        raise ValueError(f"split_map: FeTS partitioning CSV {path!r} not found")
    try:
        # utf-8-sig: a CSV saved by a spreadsheet starts with a byte-order mark that would rename the first column.
        with open(path, encoding="utf-8-sig", newline="") as fh:
            rows = list(csv.reader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ValueError(f"split_map: cannot read {path!r} as a CSV file ({exc})") from exc
    if not rows:
        raise ValueError(f"split_map: FeTS partitioning CSV {path!r} is empty")
    header = [name.strip().lower() for name in rows[0]]
    missing = [c for c in (FETS_PARTITION_COLUMN, FETS_SUBJECT_COLUMN) if c.lower() not in header]
    if missing:
        raise ValueError(
            f"split_map: {path!r} lacks the column(s) {missing} of a FeTS partitioning CSV; its header is "
            f"{rows[0]}; expected e.g. '{FETS_PARTITION_COLUMN},{FETS_SUBJECT_COLUMN}' then '1,FeTS2022_00000'"
        )
    part_col, subj_col = header.index(FETS_PARTITION_COLUMN.lower()), header.index(FETS_SUBJECT_COLUMN.lower())
    sites: dict[str, list[str]] = {}
    line_of: dict[str, int] = {}
    for line, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        partition = row[part_col].strip() if part_col < len(row) else ""
        subject = row[subj_col].strip() if subj_col < len(row) else ""
        if not partition:
            raise ValueError(f"split_map: {path!r} line {line}: subject {subject!r} has no {FETS_PARTITION_COLUMN}")
        members = sites.setdefault(fets_site_name(partition), [])
        if not subject:
            continue
        if subject in line_of:
            raise ValueError(
                f"split_map: {path!r} lists subject {subject!r} twice (lines {line_of[subject]} and {line}); "
                "each subject belongs to exactly one partition"
            )
        line_of[subject] = line
        members.append(subject)
    if not sites:
        raise ValueError(f"split_map: FeTS partitioning CSV {path!r} has a header but no rows")
    empty = sorted(site for site, members in sites.items() if not members)
    if empty:
        raise ValueError(f"split_map: {path!r}: partition(s) {empty} list no subject; remove those rows or fill them")
    return {site: sites[site] for site in sorted(sites)}


def split_from_partitions(
    case_ids: Sequence[str], partitions: Mapping[str, Sequence[str]], data_dir: str | None = None
) -> dict[str, list[str]]:
    """Assign cases to sites as a FeTS partitioning says (:func:`load_fets_partitions`).

    Args:
        case_ids: the case ids found on disk (folders holding NIfTI files).
        partitions: site -> subject ids.
        data_dir: the data folder, to tell a subject without any folder from one whose folder holds no NIfTI file.

    Returns:
        Site -> sorted case ids, sites sorted by name.

    Raises:
        ValueError: subjects without a case folder, subjects whose folder holds no ``.nii.gz`` file, or case
            folders the partitioning does not list (each group named).
    """
    ids = _check_case_ids(case_ids)
    listed = {subject for members in partitions.values() for subject in members}
    unknown = sorted(listed - set(ids))
    if unknown:
        empty = [s for s in unknown if data_dir and os.path.isdir(os.path.join(data_dir, s))]
        absent = [s for s in unknown if s not in set(empty)]
        problems = []
        if absent:
            problems.append(f"{len(absent)} subject(s) with no case folder in the data folder: {absent}")
        if empty:
            problems.append(f"{len(empty)} subject(s) whose folder holds no .nii.gz file: {empty}")
        raise ValueError(
            "the FeTS partitioning lists " + "; ".join(problems) + ". Point --data-dir at the folder of the release "
            "the CSV belongs to, or remove those rows"
        )
    unlisted = sorted(set(ids) - listed)
    if unlisted:
        raise ValueError(
            f"the FeTS partitioning leaves {len(unlisted)} case folder(s) without a partition: {unlisted}; add them "
            "to the CSV or move the folders out of the data folder"
        )
    return {site: sorted(members) for site, members in partitions.items()}


def split_from_map(case_ids: Sequence[str], mapping: Mapping[str, str | Sequence[str]]) -> dict[str, list[str]]:
    """Assign cases to sites as an explicit map says.

    Args:
        case_ids: the case ids found on disk.
        mapping: either ``{case_id: site}`` or ``{site: [case_id, ...]}``.

    Returns:
        Site -> sorted case ids, sites sorted by name.

    Raises:
        ValueError: the map is empty or mixes both forms, names case ids not found on disk, assigns a case twice,
            or leaves cases unassigned.
    """
    ids = _check_case_ids(case_ids)
    if not isinstance(mapping, Mapping) or not mapping:
        raise ValueError("split_map: expected a non-empty mapping {case_id: site} or {site: [case_ids]}")
    values = list(mapping.values())
    site_of: dict[str, str] = {}
    if all(isinstance(v, str) for v in values):
        site_of = {str(case): str(site) for case, site in mapping.items()}
    elif all(isinstance(v, (list, tuple)) for v in values):
        for site, cases in mapping.items():
            for case in cases:
                if not isinstance(case, str):
                    raise ValueError(f"split_map: site {site!r} lists a non-string case id {case!r}")
                if case in site_of:
                    raise ValueError(f"split_map: case {case!r} is assigned to both {site_of[case]!r} and {site!r}")
                site_of[case] = str(site)
    else:
        raise ValueError("split_map: values must be all site names ({case_id: site}) or all lists ({site: [case_ids]})")
    unknown = sorted(set(site_of) - set(ids))
    if unknown:
        raise ValueError(f"split_map names {len(unknown)} case id(s) not found in the data folder: {unknown}")
    unmapped = sorted(set(ids) - set(site_of))
    if unmapped:
        raise ValueError(
            f"split_map leaves {len(unmapped)} case(s) without a site: {unmapped}; assign them or remove the folders"
        )
    sites: dict[str, list[str]] = {}
    for case in ids:
        sites.setdefault(site_of[case], []).append(case)
    return {site: sorted(sites[site]) for site in sorted(sites)}


def _round_half_up(x: float) -> int:
    # Python's round() is banker's rounding (round(2.5) == 2): surprising for case counts.
    return int(math.floor(x + 0.5))


def check_fraction(name: str, value: float) -> float:
    """``value`` as a float after checking it is a share in [0, 1) (``name`` in the message)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
    return float(value)


def split_site(
    site: str,
    case_ids: Sequence[str],
    test_eligible: Sequence[str],
    test_fraction: float,
    val_fraction: float,
    seed: int,
) -> tuple[list[str], list[str], list[str]]:
    """Split one site's cases into training, validation and (held-out) test cases.

    ``round(n * test_fraction)`` cases go to test, chosen among ``test_eligible`` (those with all four
    sequences) and never all of the site's cases; ``round(m * val_fraction)`` of the remaining ``m`` go to
    validation, at least one when ``m >= 2`` and ``val_fraction > 0``, always leaving one for training.

    Args:
        site: the site name (part of the random seed, so sites draw independently).
        case_ids: the site's cases.
        test_eligible: the subset that may be held out for testing.
        test_fraction: share of the site's cases held out for the global test set.
        val_fraction: share of the remaining cases used for validation.
        seed: random seed.

    Returns:
        ``(training, validation, test)``, each sorted.
    """
    test_fraction = check_fraction("test_fraction", test_fraction)
    val_fraction = check_fraction("val_fraction", val_fraction)
    ids = sorted(case_ids)
    eligible = sorted(set(test_eligible) & set(ids))
    # A string seed is hashed deterministically by random (not by PYTHONHASHSEED).
    rng = random.Random(f"{seed}:{site}")

    n = len(ids)
    wanted = _round_half_up(n * test_fraction) if n > 1 else 0
    n_test = max(0, min(wanted, n - 1, len(eligible)))
    if n_test < wanted:
        logger.warning(
            "site %s: only %d of the %d wanted test cases could be held out (%d cases have all four sequences)",
            site,
            n_test,
            wanted,
            len(eligible),
        )
    test = sorted(rng.sample(eligible, n_test))

    rest = [c for c in ids if c not in set(test)]
    m = len(rest)
    n_val = _round_half_up(m * val_fraction)
    if val_fraction > 0 and m >= 2:
        n_val = max(1, n_val)
    n_val = max(0, min(n_val, m - 1))
    order = rng.sample(rest, m)
    return sorted(order[n_val:]), sorted(order[:n_val]), test


def assign_folds(test_eligible: Mapping[str, Sequence[str]], folds: int, seed: int) -> dict[str, list[list[str]]]:
    """Deal every site's test-eligible cases into ``folds`` test folds, stratified by site.

    Each site's cases are shuffled with a generator seeded by ``seed`` and the site, then dealt round-robin, the deal
    continuing from site to site (in name order). So every case is a test case in exactly one fold, each fold holds
    ``floor`` or ``ceil`` of ``n / folds`` of every site's cases, and the folds' sizes differ by at most one case.

    Args:
        test_eligible: site -> the cases that may be test cases (all four sequences and a segmentation).
        folds: number of folds (>= 2).
        seed: random seed.

    Returns:
        site -> ``folds`` sorted lists of case ids.

    Raises:
        ValueError: ``folds`` is not an integer >= 2.
    """
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
        raise ValueError(f"folds must be an integer >= 2, got {folds!r}")
    dealt_so_far = 0
    out: dict[str, list[list[str]]] = {}
    for site in sorted(test_eligible):
        order = sorted(test_eligible[site])
        random.Random(f"{seed}:{site}:folds").shuffle(order)
        site_folds: list[list[str]] = [[] for _ in range(folds)]
        for case in order:
            site_folds[dealt_so_far % folds].append(case)
            dealt_so_far += 1
        out[site] = [sorted(fold) for fold in site_folds]
    return out


def assign_sites(
    case_ids: list[str],
    split: str,
    k: int | None,
    split_map: str | Mapping[str, Any] | None,
    seed: int,
    data_dir: str | None = None,
) -> dict[str, list[str]]:
    """Assign the cases to sites by ``split`` (one of :data:`SPLITS`).

    Raises:
        ValueError: an unknown split, an option of another split, or what the chosen split refuses.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    if split != "random" and k is not None:
        raise ValueError(f"k (--num-sites) is only used with split='random', not split={split!r}")
    if split not in ("map", "fets-csv") and split_map is not None:
        raise ValueError(f"split_map (--split-map) is only used with split='map' or 'fets-csv', not split={split!r}")
    if split == "institution":
        return split_by_institution(case_ids)
    if split == "random":
        if k is None:
            raise ValueError("split='random' needs k (--num-sites)")
        return split_random(case_ids, k, seed)
    if split == "fets-csv":
        if not isinstance(split_map, str):
            raise ValueError("split='fets-csv' needs split_map (--split-map partitioning_1.csv), the CSV's path")
        return split_from_partitions(case_ids, load_fets_partitions(split_map), data_dir)
    if split_map is None:
        raise ValueError("split='map' needs split_map (--split-map FILE.json)")
    mapping = load_split_map(split_map) if isinstance(split_map, str) else split_map
    return split_from_map(case_ids, mapping)
