"""Federations of sites: the embedded synthetic default and the pooled ("central") site of a federation.

The embedded default lets every job, test and demo run on a fresh machine: four synthetic hospitals with
different scanners and different sequences, as in the project's reference scenario.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence

from fedbrats.constants import MODALITIES

logger = logging.getLogger(__name__)

#: Sequences each default site has: complete, no T1ce, FLAIR+T2 only, T1 only.
DEFAULT_SITE_MODALITIES: dict[str, tuple[str, ...]] = {
    "site-1": ("t1", "t1ce", "t2", "flair"),
    "site-2": ("t1", "t2", "flair"),
    "site-3": ("t2", "flair"),
    "site-4": ("t1",),
}
#: Name of the site that pools every site's cases with all sequences (the centralized upper bound).
POOLED_SITE = "central"

CACHE_ENV = "FEDBRATS_CACHE_DIR"


def default_cache_dir() -> str:
    """Where generated data is kept: ``$FEDBRATS_CACHE_DIR`` or ``~/.cache/fedbrats``."""
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "fedbrats")


@contextlib.contextmanager
def _locked(path: str) -> Iterator[None]:
    # Simulated sites start together and all want the same default data: one generates, the others wait.
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def make_synthetic_federation(
    out_dir: str,
    *,
    cases_per_site: int = 10,
    size: int = 32,
    seed: int = 0,
    site_modalities: Mapping[str, Sequence[str]] | None = None,
    convention: str = "brats2018",
    test_fraction: float = 0.2,
    val_fraction: float = 0.25,
) -> str:
    """Generate a synthetic federation and its datalists; return the path of its ``sites.json``.

    Each site is one synthetic institution with its own scanner style; ``test_fraction`` of every site's
    cases form the shared, complete-sequence test set. A pooled site (:data:`POOLED_SITE`) with all cases and
    sequences is added for the centralized baseline.

    Args:
        out_dir: folder for ``cases/`` and the datalists.
        cases_per_site: cases generated per site (before the test hold-out).
        size: voxels per side.
        seed: generator seed.
        site_modalities: site name -> available sequences (default :data:`DEFAULT_SITE_MODALITIES`).
        convention: ``brats2018`` or ``brats2023`` file naming and labels.
        test_fraction: share of each site's cases held out for the test set.
        val_fraction: share of each site's remaining cases used for validation.
    """
    from fedbrats.data.prepare import prepare
    from fedbrats.data.synthetic import generate_dataset

    if cases_per_site < 2:
        raise ValueError(f"cases_per_site must be >= 2 (training and validation), got {cases_per_site}")
    profiles = dict(site_modalities or DEFAULT_SITE_MODALITIES)
    # Institution tokens are letters only, because institution_of() strips trailing digits.
    institutions = [f"SITE{chr(ord('A') + i)}" for i in range(len(profiles))]
    cases_dir = os.path.join(out_dir, "cases")
    case_dirs = generate_dataset(
        cases_dir,
        cases_per_site * len(profiles),
        institutions=institutions,
        convention=convention,
        size=size,
        seed=seed,
    )
    from fedbrats.data.conventions import institution_of
    from fedbrats.data.synthetic import synthetic_case_id

    # The institution token inside a case id depends on the naming convention (2023 ids prefix it with SYN).
    site_of_institution = {
        institution_of(synthetic_case_id(inst, 0, convention)): site for inst, site in zip(institutions, profiles)
    }
    split_map = {os.path.basename(c): site_of_institution[institution_of(os.path.basename(c))] for c in case_dirs}
    prepare(
        cases_dir,
        out_dir,
        split="map",
        split_map=split_map,
        site_modalities={site: list(mods) for site, mods in profiles.items()},
        test_fraction=test_fraction,
        val_fraction=val_fraction,
        seed=seed,
        overwrite=True,  # the cases were just generated again: datalists of an earlier generation are stale
        nnunet="off",  # the jobs' data: nnU-Net files (converted label copies for 2018 names) would only cost time
    )
    manifest = os.path.join(out_dir, "sites.json")
    add_pooled_site(manifest)
    return manifest


def add_pooled_site(manifest_path: str, name: str = POOLED_SITE, force: bool = False) -> None:
    """Add a site that holds every site's training, validation and test cases with all four sequences.

    This is the centralized upper bound: the same cases, pooled in one place, nothing missing. Running it again
    rebuilds a pooled site it made (marked ``"pooled": true``); a real site of that name is never replaced
    unless ``force``.

    Raises:
        ValueError: a case lacks one of the four sequences on disk (pooling needs them all), or the manifest
            already has a site ``name`` that is not a pooled one and ``force`` is off.
    """
    with open(manifest_path, encoding="utf-8") as f:
        manifest = json.load(f)
    existing = manifest.get("sites", {}).get(name)
    if existing is not None and not (isinstance(existing, dict) and existing.get("pooled")) and not force:
        raise ValueError(
            f"{manifest_path} already has a site {name!r} that is not a pooled site; pooling would replace it and "
            "its datalist. Rename that site, or pass --force to replace it"
        )
    sites = {k: v for k, v in manifest["sites"].items() if k != name}
    unlabelled = sorted(k for k, v in sites.items() if v.get("labelled", True) is False)
    if unlabelled:
        logger.info("pooling leaves out the unlabelled site(s) %s: a centralized model trains on labels", unlabelled)
        sites = {k: v for k, v in sites.items() if k not in unlabelled}
    pooled: dict[str, list] = {"training": [], "validation": [], "test": []}
    base = os.path.dirname(os.path.abspath(manifest_path))
    datalist: dict = {}
    for site, entry in sorted(sites.items()):
        path = entry["datalist"] if os.path.isabs(entry["datalist"]) else os.path.join(base, entry["datalist"])
        with open(path, encoding="utf-8") as f:
            datalist = json.load(f)
        for key in pooled:
            for case in datalist.get(key, []):
                pooled[key].append(_with_all_sequences(case, site))
    out = {k: v for k, v in datalist.items() if k not in ("training", "validation", "test")}
    out.update(name=name, description="all sites' cases pooled, all sequences (centralized upper bound)", **pooled)
    out_path = os.path.join(base, f"{name}.json")
    _write_json(out_path, out)
    manifest["sites"][name] = {
        "datalist": out_path,
        "modalities": list(MODALITIES),
        "convention": manifest.get("convention", "brats2018"),
        "num_training": len(pooled["training"]),
        "num_validation": len(pooled["validation"]),
        "num_test": len(pooled["test"]),
        "pooled": True,  # made here: pooling again may rebuild it (see above)
    }
    _write_json(manifest_path, manifest)


def _with_all_sequences(case: dict, site: str) -> dict:
    """The case with every sequence's path, found next to its label where the site's datalist hides one."""
    from fedbrats.data.conventions import detect_convention

    case = dict(case)
    if all(case["image"]):
        return case
    case_dir = os.path.dirname(case.get("label") or next(p for p in case["image"] if p))
    convention = detect_convention(case_dir)
    case_id = os.path.basename(case_dir)
    paths = []
    for modality, path in zip(MODALITIES, case["image"]):
        path = path or os.path.join(case_dir, convention.filename(case_id, modality))
        if not os.path.isfile(path):
            raise ValueError(
                f"case {case_id} of site {site}: {path} does not exist; a pooled (centralized) site needs all "
                "four sequences of every case"
            )
        paths.append(path)
    case["image"] = paths
    return case


def ensure_default_federation(cache_dir: str | None = None) -> str:
    """Generate the embedded default federation once (kept in the cache) and return its ``sites.json``."""
    out_dir = os.path.join(cache_dir or default_cache_dir(), "synthetic-default-v2")
    manifest = os.path.join(out_dir, "sites.json")
    with _locked(os.path.join(out_dir + ".lock")):
        if not os.path.isfile(manifest):
            logger.info("generating the embedded synthetic federation in %s (first use only)", out_dir)
            make_synthetic_federation(out_dir)
    return manifest


def _write_json(path: str, content: dict) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(content, f, indent=2)
    os.replace(tmp, path)


# ---- commands ---------------------------------------------------------------------------------------------------
#: What ``fedbrats synth-federation`` does (its ``--help``).
SYNTH_FEDERATION_DESCRIPTION = "Generate a synthetic federation: cases, per-site datalists and sites.json."
#: What ``fedbrats pool-sites`` does (its ``--help``).
POOL_SITES_DESCRIPTION = "Add the pooled 'central' site (the centralized baseline) to a sites.json."


def add_synth_federation_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``fedbrats synth-federation`` options."""
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--cases-per-site", type=int, default=10)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--convention", default="brats2018", choices=["brats2018", "brats2023"])
    parser.add_argument(
        "--site-modalities",
        default=None,
        help=f"JSON mapping site -> sequences (default {json.dumps(DEFAULT_SITE_MODALITIES)})",
    )


def run_synth_federation(args: argparse.Namespace) -> int:
    """Run ``fedbrats synth-federation``."""
    try:
        profiles = json.loads(args.site_modalities) if args.site_modalities else None
    except json.JSONDecodeError as exc:
        raise ValueError(f"--site-modalities is not valid JSON: {exc}") from None
    path = make_synthetic_federation(
        args.out_dir,
        cases_per_site=args.cases_per_site,
        size=args.size,
        seed=args.seed,
        site_modalities=profiles,
        convention=args.convention,
    )
    logger.info("federation written: %s", path)
    return 0


def add_pool_sites_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``fedbrats pool-sites`` options."""
    parser.add_argument("sites_file")
    parser.add_argument("--force", action="store_true", help="replace an existing site of that name that is not a pool")


def run_pool_sites(args: argparse.Namespace) -> int:
    """Run ``fedbrats pool-sites``."""
    add_pooled_site(args.sites_file, force=args.force)
    return 0
