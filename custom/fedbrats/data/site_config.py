"""Where a site's data is and which sequences it has: the site's own configuration, never the job's.

A site looks for its configuration, in this order:

1. the file named by the environment variable ``FEDBRATS_SITE_CONFIG``;
2. ``<site workspace>/local/fedbrats_site.json`` (NVFlare startup kits keep site-local settings in ``local/``);
3. the embedded default: a synthetic BraTS federation generated on first use (see :mod:`fedbrats.data.federation`).

A configuration file is the ``sites.json`` written by ``fedbrats prepare`` (a site picks its own entry) or a
single-site file of the same shape::

    {"sites": {"site-2": {"datalist": "/data/brats/site-2.json", "modalities": ["t1", "t2", "flair"],
                          "convention": "brats2018"}}}

An entry with ``"labelled": false`` is a site without segmentations: it never reads a label file, even where its
datalist names one (semi-supervised methods such as IsoFed; see docs/isofed.md).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

from fedbrats.constants import MODALITIES, modality_mask
from fedbrats.data.conventions import get_convention

logger = logging.getLogger(__name__)

SITE_CONFIG_ENV = "FEDBRATS_SITE_CONFIG"
LOCAL_CONFIG_NAME = "fedbrats_site.json"


@dataclass(frozen=True)
class SiteConfig:
    """A site's data and sequence availability.

    Attributes:
        site_name: the NVFlare client name.
        datalist: the site's Decathlon-style datalist (``training`` / ``validation``).
        modalities: the sequences the site has, in canonical order.
        convention: BraTS label convention of the site's files.
        source: where this configuration came from (for the log).
        labelled: whether the site has segmentations; an unlabelled site never reads a label file.
    """

    site_name: str
    datalist: str
    modalities: tuple[str, ...]
    convention: str = "brats2018"
    source: str = ""
    labelled: bool = True

    @property
    def mask(self) -> list[bool]:
        """Availability over :data:`MODALITIES`."""
        return modality_mask(list(self.modalities))


def load_site_config(path: str, site_name: str) -> SiteConfig:
    """Read ``site_name``'s entry of a sites file.

    Raises:
        ValueError: the file is missing or malformed, has no entry for the site, or the entry is invalid.
    """
    if not os.path.isfile(path):
        raise ValueError(f"site config {path!r} does not exist (set {SITE_CONFIG_ENV} or fix the path)")
    try:
        with open(path, encoding="utf-8") as f:
            content = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"site config {path!r} is not valid JSON: {e}") from e
    except OSError as e:
        raise ValueError(f"site config {path!r} cannot be read: {e}") from e
    if not isinstance(content, dict):
        raise ValueError(
            f"site config {path!r} holds a JSON {type(content).__name__}; it must be an object "
            '{"sites": {"<site>": {"datalist": ..., "modalities": [...]}}}'
        )
    sites = content.get("sites")
    if not isinstance(sites, dict) or not sites:
        raise ValueError(f"site config {path!r} needs a non-empty 'sites' mapping of site name to settings")
    if site_name not in sites:
        raise ValueError(f"site config {path!r} has no entry for site {site_name!r}; it has {sorted(sites)}")
    entry = sites[site_name]
    return site_config_from_entry(site_name, entry, base_dir=os.path.dirname(os.path.abspath(path)), source=path)


def site_config_from_entry(site_name: str, entry: dict, base_dir: str = "", source: str = "") -> SiteConfig:
    """Validate one site entry (``datalist``, ``modalities``, optional ``convention`` and ``labelled``)."""
    where = f"site {site_name!r} in {source or 'site config'}"
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: the entry must be an object with 'datalist' and 'modalities', got {entry!r}")
    datalist = entry.get("datalist")
    if not datalist:
        raise ValueError(f"{where}: 'datalist' is missing")
    if not os.path.isabs(datalist):
        datalist = os.path.join(base_dir, datalist)
    if not os.path.isfile(datalist):
        raise ValueError(f"{where}: datalist {datalist!r} does not exist")
    modalities = entry.get("modalities", list(MODALITIES))
    if not isinstance(modalities, Sequence) or isinstance(modalities, str):
        raise ValueError(f"{where}: 'modalities' must be a list such as {list(MODALITIES)}, got {modalities!r}")
    try:
        modality_mask(list(modalities))
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    convention = entry.get("convention", "brats2018")
    get_convention(convention)
    labelled = entry.get("labelled", True)
    if not isinstance(labelled, bool):
        raise ValueError(f"{where}: 'labelled' must be true or false, got {labelled!r}")
    ordered = tuple(m for m in MODALITIES if m in set(modalities))
    return SiteConfig(site_name, datalist, ordered, convention, source, labelled)


def federation_sites_file(sites_file: str | None = None, what: str = "run") -> str:
    """The ``sites.json`` a whole-federation command uses (``simulate``, ``compare``, ``evaluate``), logged.

    Order: the explicit ``--sites`` option, then the file named by ``FEDBRATS_SITE_CONFIG`` (as the README's real-data
    steps set it, and as every site of the run then reads it), then the embedded synthetic federation. Using the
    synthetic data while the user exported a real federation would train and score on the wrong data in silence.

    Args:
        sites_file: the ``--sites`` option, if given.
        what: the command, for the log line.

    Returns:
        the absolute path of the chosen file.

    Raises:
        ValueError: the chosen file does not exist (the option or variable that named it is said).
    """
    env_path = os.environ.get(SITE_CONFIG_ENV)
    if sites_file:
        path, source = sites_file, "--sites"
    elif env_path:
        path, source = env_path, SITE_CONFIG_ENV
    else:
        from fedbrats.data.federation import ensure_default_federation

        path, source = ensure_default_federation(), "the embedded synthetic federation"
    if not os.path.isfile(path):
        raise ValueError(f"sites file {path!r} (from {source}) does not exist")
    path = os.path.abspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            content = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"sites file {path!r} (from {source}) cannot be read as JSON: {e}") from e
    sites = content.get("sites") if isinstance(content, dict) else None
    if not isinstance(sites, dict) or not sites:
        raise ValueError(f"sites file {path!r} (from {source}) needs a non-empty 'sites' mapping of site to settings")
    logger.info("%s uses %s (from %s): sites %s", what, path, source, ", ".join(sorted(sites)))
    return path


def resolve_site_config(site_name: str, workspace_root: str | None = None) -> SiteConfig:
    """Find the site's configuration (see the module docstring for the order) and load it."""
    env_path = os.environ.get(SITE_CONFIG_ENV)
    if env_path:
        cfg = load_site_config(env_path, site_name)
    elif workspace_root and os.path.isfile(os.path.join(workspace_root, "local", LOCAL_CONFIG_NAME)):
        cfg = load_site_config(os.path.join(workspace_root, "local", LOCAL_CONFIG_NAME), site_name)
    else:
        from fedbrats.data.federation import ensure_default_federation

        manifest = ensure_default_federation()
        logger.info("no site configuration found; using the embedded synthetic federation at %s", manifest)
        cfg = load_site_config(manifest, site_name)
    logger.info(
        "site %s: sequences %s, %s, datalist %s (from %s)",
        site_name,
        ",".join(cfg.modalities),
        "labelled" if cfg.labelled else "unlabelled",
        cfg.datalist,
        cfg.source,
    )
    return cfg
