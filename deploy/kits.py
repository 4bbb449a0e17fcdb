"""Startup kits: provisioning, each site's local settings, the class allow-list and a job staged for submission.

A site's data never comes from the job: :func:`write_site_configs` writes each site's entry of a ``sites.json`` into
its startup kit's ``local/fedbrats_site.json``, where the site's trainer looks first (after the environment
variable ``FEDBRATS_SITE_CONFIG``, which is removed from the environment of every process started here).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deploy.processes import DeploymentError, deployment_env, nvflare_cli
from deploy.project import client_names, load_project, project_admin, server_name
from deploy.secrets import make_private_dir, restrict_secrets
from fedbrats.data.site_config import LOCAL_CONFIG_NAME, load_site_config

logger = logging.getLogger(f"fedbrats.{__name__}")

#: What a site adds to ``class_allow_list`` in ``local/resources.json`` to run fedbrats jobs without ``app/custom``:
#: the package, and the NVFlare class the jobs use that NVFlare 2.9's default list leaves out.
FEDBRATS_CLASS_ALLOW_LIST: tuple[str, ...] = (
    "fedbrats.",
    "nvflare.app_opt.pt.file_model_persistor.PTFileModelPersistor",
)


# ---- startup kits -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Kits:
    """The startup kits of one provisioning (``<workspace>/<project>/prod_NN``).

    Attributes:
        prod_dir: the folder holding one kit per participant.
        server: the server's name (and kit folder).
        clients: the clients' names.
        admin: the name of the admin who submits jobs (the project admin; the lead in distributed provisioning).
        locations: kit folders that are not ``prod_dir/<name>`` (distributed provisioning: each participant
            packages its own kit, on its own machine).
    """

    prod_dir: str
    server: str
    clients: tuple[str, ...]
    admin: str
    locations: dict[str, str] = field(default_factory=dict, compare=False)

    @classmethod
    def from_project(cls, prod_dir: str, project: Mapping[str, Any]) -> Kits:
        """The kits of ``project`` under ``prod_dir`` (checked to exist)."""
        kits = cls(prod_dir, server_name(project), tuple(client_names(project)), project_admin(project))
        for participant in (kits.server, kits.admin, *kits.clients):
            if not os.path.isdir(os.path.join(prod_dir, participant, "startup")):
                raise DeploymentError(f"startup kit {os.path.join(prod_dir, participant)} is missing")
        return kits

    def dir(self, participant: str) -> str:
        """The kit folder of a participant."""
        return self.locations.get(participant) or os.path.join(self.prod_dir, participant)

    @property
    def client_dirs(self) -> dict[str, str]:
        """Client name -> kit folder."""
        return {c: self.dir(c) for c in self.clients}

    @property
    def services(self) -> list[str]:
        """Server and clients (the participants that run a process)."""
        return [self.server, *self.clients]


def latest_prod_dir(workspace: str, project_name: str) -> str:
    """The newest ``prod_NN`` folder a provisioning wrote for ``project_name`` under ``workspace``."""
    root = Path(workspace) / project_name
    prods = sorted((p for p in root.glob("prod_*") if p.name[5:].isdigit()), key=lambda p: int(p.name[5:]))
    if not prods:
        raise DeploymentError(f"no startup kits (prod_NN) under {root}")
    return str(prods[-1])


def run_cli(args: Sequence[str], env: Mapping[str, str], what: str, timeout: float = 300.0) -> str:
    """Run an ``nvflare`` command; return its output (logged at debug level).

    Raises:
        DeploymentError: it failed or timed out (the message holds the end of its output).
    """
    logger.debug("running %s", " ".join(args))
    try:
        done = subprocess.run(
            list(args),
            env=dict(env),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            start_new_session=True,  # Ctrl-C in the terminal reaches this run, which stops everything in order
        )
    except subprocess.TimeoutExpired as e:
        raise DeploymentError(f"{what} did not finish within {timeout:.0f}s: {' '.join(args)}") from e
    output = (done.stdout or "") + (done.stderr or "")
    for line in output.splitlines():
        logger.debug("  %s", line)
    if done.returncode != 0:
        tail = "\n".join(output.strip().splitlines()[-15:])
        raise DeploymentError(f"{what} failed (exit code {done.returncode}): {' '.join(args)}\n{tail}")
    return output


def provision(project_file: str, workspace: str, env: Mapping[str, str] | None = None) -> Kits:
    """``nvflare provision -p project_file -w workspace``; return the kits it wrote.

    A workspace keeps its root CA (``state/``) between provisionings: provision into a new workspace to get a new CA.
    """
    project = load_project(project_file)
    os.makedirs(workspace, exist_ok=True)
    run_cli(
        [nvflare_cli(), "provision", "-p", str(project_file), "-w", str(workspace)],
        env or deployment_env(uuid.uuid4().hex),
        "provisioning",
    )
    restrict_secrets(workspace)
    return Kits.from_project(latest_prod_dir(workspace, project["name"]), project)


def admin_endpoint(admin_dir: str) -> tuple[str, int]:
    """Host and port the admin kit connects to (from ``startup/fed_admin.json``)."""
    with open(os.path.join(admin_dir, "startup", "fed_admin.json"), encoding="utf-8") as f:
        admin = json.load(f)["admin"]
    return admin["host"], int(admin["port"])


# ---- site-local settings ----------------------------------------------------------------------------------------
def make_demo_federation(out_dir: str, site_names: Sequence[str], cases_per_site: int = 10, size: int = 32) -> str:
    """Synthetic data for the named sites (the default sites' sequence profiles, repeated); return ``sites.json``."""
    from fedbrats.data.federation import DEFAULT_SITE_MODALITIES, make_synthetic_federation

    profiles = list(DEFAULT_SITE_MODALITIES.values())
    modalities = {
        name: DEFAULT_SITE_MODALITIES.get(name, profiles[i % len(profiles)]) for i, name in enumerate(site_names)
    }
    started = time.monotonic()
    manifest = make_synthetic_federation(out_dir, cases_per_site=cases_per_site, size=size, site_modalities=modalities)
    logger.info(
        "synthetic data for %s (%d cases each, %d^3) in %s (%.1fs)",
        ", ".join(site_names),
        cases_per_site,
        size,
        out_dir,
        time.monotonic() - started,
    )
    return manifest


def write_site_configs(sites_json: str, kit_dirs: Mapping[str, str]) -> dict[str, str]:
    """Write each site's entry of ``sites_json`` into its kit's ``local/fedbrats_site.json``.

    This is the site's own configuration (data path, available sequences, label convention), read by its trainer;
    the job carries none of it.

    Returns:
        site name -> path written.

    Raises:
        DeploymentError: the file lacks a site or an entry is invalid.
    """
    with open(sites_json, encoding="utf-8") as f:
        manifest = json.load(f)
    sites = manifest.get("sites", {})
    base = os.path.dirname(os.path.abspath(sites_json))
    written = {}
    for name, kit_dir in kit_dirs.items():
        if name not in sites:
            raise DeploymentError(f"{sites_json} has no entry for site {name!r} (it has {sorted(sites)})")
        entry = dict(sites[name])
        if not os.path.isabs(entry.get("datalist", "")):
            entry["datalist"] = os.path.join(base, entry.get("datalist", ""))
        path = os.path.join(kit_dir, "local", LOCAL_CONFIG_NAME)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"sites": {name: entry}}, f, indent=2)
            f.write("\n")
        try:
            cfg = load_site_config(path, name)
        except ValueError as e:
            raise DeploymentError(f"site configuration for {name} is invalid: {e}") from e
        logger.info("%s: %s (sequences %s)", name, path, ",".join(cfg.modalities))
        written[name] = path
    return written


def allow_fedbrats_classes(kit_dir: str, prefixes: Sequence[str] = FEDBRATS_CLASS_ALLOW_LIST) -> str:
    """Add ``prefixes`` to the kit's ``class_allow_list`` (written to ``local/resources.json``); return that path.

    Needed on the server and every client when jobs come without ``app/custom`` (not bring-your-own-code).
    """
    from nvflare.app_common.default_component_policy import DEFAULT_CLASS_ALLOW_LIST

    local = os.path.join(kit_dir, "local")
    target = os.path.join(local, "resources.json")
    source = target if os.path.isfile(target) else os.path.join(local, "resources.json.default")
    with open(source, encoding="utf-8") as f:
        resources = json.load(f)
    allow = list(resources.get("class_allow_list", DEFAULT_CLASS_ALLOW_LIST))
    allow += [p for p in prefixes if p not in allow]
    resources["class_allow_list"] = allow
    with open(target, "w", encoding="utf-8") as f:
        json.dump(resources, f, indent=2)
        f.write("\n")
    return target


#: Where a server kit keeps submitted jobs and their results, and its snapshots, inside its own folder (NVFlare's
#: default is /tmp/nvflare/jobs-storage and /tmp/nvflare/snapshot-storage: shared, pre-creatable by another user and
#: wiped at reboot).
JOB_STORE_DIR = "jobs-storage"
SNAPSHOT_STORE_DIR = "snapshot-storage"


def private_stores(kit_dir: str) -> dict[str, str]:
    """Point a server kit's job store and snapshot store at folders inside the kit, readable by its user only.

    Writes ``local/resources.json`` (from the kit's ``resources.json.default`` where there is none yet) and creates
    both folders mode 0700. Returns the two paths. A kit moved to another machine keeps them relative to nothing:
    run this again there, or edit ``uri_root`` and ``root_dir`` (docs/deployment.md).

    Raises:
        DeploymentError: the kit's resources name no job manager or snapshot persistor to point.
    """
    local = os.path.join(kit_dir, "local")
    target = os.path.join(local, "resources.json")
    source = target if os.path.isfile(target) else os.path.join(local, "resources.json.default")
    with open(source, encoding="utf-8") as f:
        resources = json.load(f)
    stores = {
        "jobs": make_private_dir(os.path.join(kit_dir, JOB_STORE_DIR)),
        "snapshots": make_private_dir(os.path.join(kit_dir, SNAPSHOT_STORE_DIR)),
    }
    try:
        resources["snapshot_persistor"]["args"]["storage"]["args"]["root_dir"] = stores["snapshots"]
        managers = [c for c in resources["components"] if c.get("id") == "job_manager"]
        managers[0]["args"]["uri_root"] = stores["jobs"]
    except (KeyError, IndexError, TypeError) as exc:
        raise DeploymentError(f"{source}: no job manager or snapshot persistor to point at the kit ({exc})") from None
    with open(target, "w", encoding="utf-8") as f:
        json.dump(resources, f, indent=2)
        f.write("\n")
    return stores


def stage_job(job_dir: str, staging_root: str, *, num_rounds: int | None = None, byoc: bool = True) -> str:
    """Copy a job folder for submission (the admin API writes signature files into it); return the copy.

    Args:
        job_dir: a job folder (``meta.json`` and ``app*/config``).
        staging_root: where the copy goes (``<staging_root>/<job name>``).
        num_rounds: if set, replaces ``num_rounds`` of the server workflows.
        byoc: keep ``app*/custom``; ``False`` removes it, and the sites must then allow the classes (see
            :func:`allow_fedbrats_classes`).
    """
    src = Path(job_dir)
    if not (src / "meta.json").is_file():
        raise DeploymentError(f"{job_dir} is not a job folder (no meta.json); pass --job with e.g. jobs/fedavg")
    dst = Path(staging_root) / src.name
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".__nvfl_*", "__pycache__"))
    if not byoc:
        for custom in dst.glob("app*/custom"):
            shutil.rmtree(custom)
    if num_rounds is not None:
        patched = 0
        for config in dst.glob("app*/config/config_fed_server.json"):
            content = json.loads(config.read_text(encoding="utf-8"))
            for wf in content.get("workflows", []):
                if "num_rounds" in wf.get("args", {}):
                    wf["args"]["num_rounds"] = int(num_rounds)
                    patched += 1
            config.write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")
        if not patched:
            raise DeploymentError(f"no server workflow of {job_dir} has a num_rounds argument to set")
    return str(dst)
