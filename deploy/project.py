"""The project file (``poc_setup/project.yml``) and its variants for one machine.

The one project file is ``poc_setup/project.yml`` (server, one client per hospital, admin users, NVFlare 2.9's
default builders). :func:`local_project` turns it into a variant for one machine (the first N clients, the server
renamed to ``localhost`` so that it listens on loopback only, a free port); the PoC and the tests use that variant,
so what is rehearsed is what the hospitals receive.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from deploy.processes import DeploymentError

#: The repository root (``poc_setup/`` and ``jobs/`` live there in a source checkout).
REPO_ROOT = Path(__file__).resolve().parents[1]
#: The production project file; every variant is derived from it.
PROJECT_FILE = REPO_ROOT / "poc_setup" / "project.yml"
#: Host name of the server in loopback variants: the server then binds to 127.0.0.1 only.
LOCAL_HOST = "localhost"


# ---- the project file -------------------------------------------------------------------------------------------
def load_project(path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Read a project file (default: ``poc_setup/project.yml`` of this checkout).

    Raises:
        DeploymentError: the file is missing or not a project (no participants).
    """
    path = Path(path) if path else PROJECT_FILE
    if not path.is_file():
        raise DeploymentError(
            f"project file {path} does not exist; pass --project with the path of poc_setup/project.yml"
        )
    with open(path, encoding="utf-8") as f:
        project = yaml.safe_load(f)
    if not isinstance(project, dict) or not isinstance(project.get("participants"), list):
        raise DeploymentError(f"project file {path} has no 'participants' list; is it an NVFlare project.yml?")
    return project


def _participants(project: Mapping[str, Any], kind: str) -> list[dict[str, Any]]:
    return [p for p in project["participants"] if p.get("type") == kind]


def server_name(project: Mapping[str, Any]) -> str:
    """The server participant's name (its host name)."""
    servers = _participants(project, "server")
    if len(servers) != 1:
        raise DeploymentError(f"the project needs exactly one server participant, found {len(servers)}")
    return servers[0]["name"]


def client_names(project: Mapping[str, Any]) -> list[str]:
    """The client (site) names, in the file's order."""
    return [p["name"] for p in _participants(project, "client")]


def project_admin(project: Mapping[str, Any]) -> str:
    """The one admin with role ``project_admin`` (it has the bring-your-own-code right)."""
    admins = [p["name"] for p in _participants(project, "admin") if p.get("role") == "project_admin"]
    if len(admins) != 1:
        raise DeploymentError(f"the project needs exactly one admin with role project_admin, found {admins}")
    return admins[0]


def local_project(
    project: Mapping[str, Any],
    num_sites: int,
    port: int,
    *,
    server_host: str = LOCAL_HOST,
    name: str | None = None,
) -> dict[str, Any]:
    """The project for one machine: the first ``num_sites`` clients, the server at ``server_host:port``.

    Clients beyond those of the file are added as ``site-<k>`` of org ``hospital_<k>``. Org admins of orgs without
    a remaining client are dropped; the other admins stay. The port serves both the clients and the admins.

    Args:
        project: the production project (:func:`load_project`).
        num_sites: number of FL clients.
        port: the server's port (``fed_learn_port``).
        server_host: the server's name, which is also the host its certificate is made for.
        name: project name (default: the file's).
    """
    if num_sites < 1:
        raise DeploymentError(f"the number of sites must be >= 1, got {num_sites}")
    out = copy.deepcopy(dict(project))
    if name:
        out["name"] = name
    server_name(out)  # exactly one
    clients = _participants(out, "client")[:num_sites]
    for k in range(len(clients) + 1, num_sites + 1):
        clients.append({"name": f"site-{k}", "type": "client", "org": f"hospital_{k}"})
    orgs = {c.get("org") for c in clients}
    participants = []
    for p in out["participants"]:
        kind = p.get("type")
        if kind == "server":
            p = {k: v for k, v in p.items() if k not in ("admin_port", "host_names", "default_host")}
            p.update(name=server_host, fed_learn_port=int(port))
            participants.append(p)
        elif kind == "admin" and (p.get("role") != "org_admin" or p.get("org") in orgs):
            participants.append(p)
        elif kind not in ("client", "admin"):
            participants.append(p)
    servers = [p for p in participants if p.get("type") == "server"]
    others = [p for p in participants if p.get("type") != "server"]
    out["participants"] = servers + clients + others
    return out


def write_project(project: Mapping[str, Any], path: str | os.PathLike[str]) -> str:
    """Write a project file and return its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(dict(project), f, sort_keys=False)
    return str(path)
