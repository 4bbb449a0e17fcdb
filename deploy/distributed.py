"""Distributed provisioning: every participant makes its own private key; the project admin only signs.

With ``nvflare provision`` (:mod:`deploy.provision`) the coordinating centre makes every participant's private key
and must ship it to the hospital. NVIDIA FLARE 2.9's ``nvflare cert`` / ``nvflare package`` split that up, so that
no private key ever leaves the machine it was made on:

1. the project admin (coordinating centre) makes the root CA once: ``nvflare cert init --profile
   project_profile.yml -o ca/`` (the CA key stays in ``ca/``) and publishes the project profile (project name,
   server host and port, mutual TLS) and the root CA's fingerprint;
2. each participant (the server's host, each hospital's site, each user) writes its participant definition
   (:func:`participant_definition`) and runs ``nvflare cert request -p participant.yml --out request/``: its private
   key and a certificate signing request stay in ``request/``; it sends only ``<name>.request.zip``;
3. the project admin approves: ``nvflare cert approve <name>.request.zip --ca-dir ca/ --profile
   project_profile.yml``, and returns ``<name>.signed.zip`` (its certificate and the root CA, no key);
4. the participant builds its startup kit: ``nvflare package <name>.signed.zip --request-dir request/
   --fingerprint <root CA fingerprint> -w kits/`` (the fingerprint, received out of band, checks the root CA).

:func:`distributed_provision` plays every party on one machine, each in its own folder, passing only the zips
between them (the folder ``exchange/`` is the channel); :class:`DistributedDeployment` then starts the kits on
loopback and runs a job as the lead, the production default of docs/deployment.md: no bring-your-own-code, the
sites allow ``fedbrats.`` classes and grant no BYOC right. ``python -m deploy.distributed --sites 2`` rehearses it.

The flow has no ``project_admin`` user (``nvflare cert request`` makes ``lead``, ``org_admin`` and ``member``
users): the lead submits jobs and manages its own; each hospital's IT admin (``org_admin``) operates its own site.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from deploy.admin import open_admin_session
from deploy.cli import add_run_arguments, run_from_args
from deploy.kits import Kits, run_cli
from deploy.processes import DeploymentError, nvflare_cli, request_kit_stop
from deploy.project import client_names, server_name
from deploy.provision import ProvisionedDeployment
from deploy.secrets import default_workspace, make_private_dir, restrict_secrets

logger = logging.getLogger(f"fedbrats.{__name__}")

#: Admin roles ``nvflare cert request`` makes certificates for (there is no project_admin user in this flow).
REQUESTABLE_ROLES = ("lead", "org_admin", "member")
#: The folder of :func:`distributed_provision`'s workspace that stands for the channel between the parties: only
#: what travels (request zips one way, signed zips the other) is ever put there.
EXCHANGE_DIR = "exchange"
#: The project admin's folder (root CA, project profile, approvals).
PROJECT_ADMIN_DIR = "project_admin"
#: The folder of each participant's own machine: ``parties/<name>/``.
PARTIES_DIR = "parties"
#: Where ``nvflare cert request`` leaves the participant's private key and request (inside its own folder).
REQUEST_DIR = "request"
#: A participant's kit workspace (inside its own folder): the kit is ``kits/<project>/prod_00/<name>``.
KIT_WORKSPACE = "kits"


def project_profile(project: Mapping[str, Any]) -> dict[str, Any]:
    """The project profile the project admin publishes (``nvflare cert init`` and ``approve`` read it): the
    project's name, its server's host and port, and mutual TLS over gRPC (what ``nvflare provision`` gives).

    Raises:
        DeploymentError: the project's server has no ``fed_learn_port``.
    """
    server = next(p for p in project["participants"] if p.get("type") == "server" and p["name"] == server_name(project))
    if "fed_learn_port" not in server:
        raise DeploymentError(f"the server {server['name']!r} of the project needs a fed_learn_port")
    port = int(server["fed_learn_port"])
    return {
        "name": project["name"],
        "scheme": "grpc",
        "connection_security": "mtls",
        "server": {"host": server["name"], "fed_learn_port": port, "admin_port": port},
    }


def participant_definition(project: Mapping[str, Any], name: str) -> dict[str, Any]:
    """What participant ``name`` writes for ``nvflare cert request``: the project's name and its own entry of the
    project file (name, type, org; the server's port; a user's role).

    Raises:
        DeploymentError: ``name`` is not in the project, or is a user whose role this flow cannot certify
            (``project_admin``).
    """
    entry = next((p for p in project["participants"] if p.get("name") == name), None)
    if entry is None:
        raise DeploymentError(f"participant {name!r} is not in project {project.get('name')!r}")
    keep = {"name", "type", "org"} | {"server": {"fed_learn_port"}, "admin": {"role"}}.get(entry["type"], set())
    own = {k: v for k, v in entry.items() if k in keep}
    if entry["type"] == "admin" and own.get("role") not in REQUESTABLE_ROLES:
        raise DeploymentError(
            f"{name} has role {own.get('role')!r}; distributed provisioning certifies the roles {REQUESTABLE_ROLES} "
            "(the lead submits jobs)"
        )
    return {"name": project["name"], "participants": [own]}


def distributed_participants(project: Mapping[str, Any]) -> list[str]:
    """The participants this flow gives a kit: the server, the clients and the users of a certifiable role."""
    users = [
        p["name"] for p in project["participants"] if p.get("type") == "admin" and p.get("role") in REQUESTABLE_ROLES
    ]
    return [server_name(project), *client_names(project), *users]


def submitting_user(project: Mapping[str, Any]) -> str:
    """The user who submits jobs in this flow: the project's one ``lead``.

    Raises:
        DeploymentError: the project has no lead or several.
    """
    leads = [p["name"] for p in project["participants"] if p.get("type") == "admin" and p.get("role") == "lead"]
    if len(leads) != 1:
        raise DeploymentError(f"distributed provisioning needs exactly one admin with role lead, found {leads}")
    return leads[0]


def site_operators(project: Mapping[str, Any]) -> dict[str, str]:
    """Client -> the user who operates it: its hospital's IT admin (``org_admin`` of the client's org). Clients of an
    org without one are left out (their hospital stops them locally, ``startup/stop_fl.sh``)."""
    admins = {
        p["org"]: p["name"]
        for p in reversed(project["participants"])
        if p.get("type") == "admin" and p.get("role") == "org_admin"
    }
    orgs = {p["name"]: p.get("org") for p in project["participants"] if p.get("type") == "client"}
    return {client: admins[org] for client, org in orgs.items() if org in admins}


def _write_yaml(path: str, content: Mapping[str, Any]) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(dict(content), f, sort_keys=False)
    return path


def init_ca(admin_dir: str, project: Mapping[str, Any], env: Mapping[str, str]) -> tuple[str, str]:
    """The project admin's step 1: the root CA in ``<admin_dir>/ca`` and the published project profile; return
    the profile's path and the root CA's fingerprint (which every participant is told out of band)."""
    profile = _write_yaml(os.path.join(admin_dir, "project_profile.yml"), project_profile(project))
    ca_dir = os.path.join(admin_dir, "ca")
    run_cli([nvflare_cli(), "cert", "init", "--profile", profile, "-o", ca_dir], env, "nvflare cert init")
    with open(os.path.join(ca_dir, "ca.json"), encoding="utf-8") as f:
        return profile, json.load(f)["rootCA_fingerprint"]


def request_certificate(party_dir: str, definition: Mapping[str, Any], env: Mapping[str, str]) -> str:
    """A participant's step 2, on its own machine: its private key and request in ``<party_dir>/request``;
    return the request zip (the only thing it sends)."""
    name = definition["participants"][0]["name"]
    participant = _write_yaml(os.path.join(party_dir, "participant.yml"), definition)
    request_dir = os.path.join(party_dir, REQUEST_DIR)
    run_cli(
        [nvflare_cli(), "cert", "request", "-p", participant, "--out", request_dir],
        env,
        f"nvflare cert request ({name})",
    )
    return os.path.join(request_dir, f"{name}.request.zip")


def approve_request(admin_dir: str, request_zip: str, signed_zip: str, env: Mapping[str, str]) -> str:
    """The project admin's step 3: sign a participant's request with the root CA; return the signed zip."""
    ca_dir, profile = os.path.join(admin_dir, "ca"), os.path.join(admin_dir, "project_profile.yml")
    run_cli(
        [nvflare_cli(), "cert", "approve", request_zip, "--ca-dir", ca_dir, "--profile", profile, "--out", signed_zip],
        env,
        f"nvflare cert approve ({os.path.basename(request_zip)})",
    )
    return signed_zip


def package_kit(party_dir: str, signed_zip: str, fingerprint: str, env: Mapping[str, str]) -> None:
    """A participant's step 4: its startup kit from the signed zip and the private key it kept, after checking
    the root CA against the fingerprint it was told."""
    run_cli(
        [
            nvflare_cli(),
            "package",
            signed_zip,
            "--request-dir",
            os.path.join(party_dir, REQUEST_DIR),
            "--fingerprint",
            fingerprint,
            "-w",
            os.path.join(party_dir, KIT_WORKSPACE),
        ],
        env,
        f"nvflare package ({os.path.basename(signed_zip)})",
    )


def _send(path: str, exchange: str) -> str:
    """Put a file on the channel between the parties (a copy in ``exchange``); return the copy."""
    os.makedirs(exchange, exist_ok=True)
    return shutil.copy2(path, os.path.join(exchange, os.path.basename(path)))


def distributed_provision(
    project: Mapping[str, Any], workspace: str, env: Mapping[str, str], participants: Sequence[str] | None = None
) -> Kits:
    """Provision ``project`` the distributed way, every party in its own folder of ``workspace``; return the kits.

    ``<workspace>/project_admin`` holds the root CA and approvals, ``<workspace>/parties/<name>`` each participant's
    machine (its private key in ``request/``, its kit under ``kits/``), and ``<workspace>/exchange`` only what
    travels between them: request zips to the admin, signed zips back. The server's and the lead's kits come from
    the same flow; the lead is the kits' admin (it submits the jobs).

    Args:
        project: the project (one machine's variant of ``poc_setup/project.yml``, :func:`deploy.project.local_project`).
        workspace: the folder of every party (created 0700).
        env: the environment of the ``nvflare`` commands (a private ``HOME``: they keep audit records in
            ``~/.nvflare``).
        participants: the participants to provision (default :func:`distributed_participants`: everyone
            this flow can certify).

    Raises:
        DeploymentError: a step failed (the message holds the end of the command's output).
    """
    make_private_dir(workspace)
    admin_dir = os.path.join(workspace, PROJECT_ADMIN_DIR)
    exchange = os.path.join(workspace, EXCHANGE_DIR)
    _, fingerprint = init_ca(admin_dir, project, env)
    locations = {}
    for name in participants or distributed_participants(project):
        party = os.path.join(workspace, PARTIES_DIR, name)
        request_zip = _send(request_certificate(party, participant_definition(project, name), env), exchange)
        signed_zip = approve_request(admin_dir, request_zip, os.path.join(exchange, f"{name}.signed.zip"), env)
        package_kit(party, signed_zip, fingerprint, env)
        locations[name] = os.path.join(party, KIT_WORKSPACE, project["name"], "prod_00", name)
        if not os.path.isdir(os.path.join(locations[name], "startup")):
            raise DeploymentError(f"nvflare package wrote no startup kit at {locations[name]}")
        logger.info("%s: kit %s (its key was made there; only its request and certificate travelled)", name, party)
    restrict_secrets(workspace)
    return Kits(
        prod_dir=os.path.join(workspace, PARTIES_DIR),
        server=server_name(project),
        clients=tuple(c for c in client_names(project) if c in locations),
        admin=submitting_user(project),
        locations=locations,
    )


def forbid_byoc(kit_dir: str) -> str:
    """Take the bring-your-own-code right from every role at this site (``"byoc": "none"`` in
    ``local/authorization.json``, made from the kit's default); return that path. The site then runs only code it
    installed itself, from classes on its allow-list."""
    local = os.path.join(kit_dir, "local")
    target = os.path.join(local, "authorization.json")
    source = target if os.path.isfile(target) else os.path.join(local, "authorization.json.default")
    with open(source, encoding="utf-8") as f:
        policy = json.load(f)
    for role, rights in policy["permissions"].items():
        if isinstance(rights, dict):
            rights["byoc"] = "none"
        else:  # a role given every right in one word ("any"): every right but BYOC
            logger.debug("%s: role %s keeps %r (no user of that role exists in this flow)", kit_dir, role, rights)
    with open(target, "w", encoding="utf-8") as f:
        json.dump(policy, f, indent=2)
        f.write("\n")
    return target


class DistributedDeployment(ProvisionedDeployment):
    """Kits from the distributed flow (:func:`distributed_provision`), started with their own ``start.sh`` on
    loopback; the lead submits the job. Without BYOC (the default here), the job goes without ``app/custom``,
    every participant allows ``fedbrats.`` classes and no site grants the BYOC right."""

    mode = "distributed"
    #: Client -> the IT admin who shuts it down (:func:`site_operators`), set by :meth:`prepare`.
    operators: dict[str, str]

    def prepare(self, project: dict[str, Any]) -> Kits:
        root = os.path.join(self.workspace, "distributed")
        shutil.rmtree(root, ignore_errors=True)
        self.operators = site_operators(project)
        return distributed_provision(project, root, self.env)

    def stop(self) -> None:
        """Each hospital's IT admin shuts its own site down, then the lead the server: in this flow nobody may
        operate every site (the lead's ``operate`` right covers its own org's sites, the server's)."""
        from nvflare.fuel.flare_api.api_spec import TargetType
        from nvflare.fuel.flare_api.flare_api import new_secure_session

        assert self.kits is not None
        for client in self.kits.clients:
            operator = self.operators.get(client)
            if operator is None:
                request_kit_stop(self.kits.dir(client))  # what its hospital does locally (startup/stop_fl.sh)
                continue
            session = new_secure_session(operator, self.kits.dir(operator), timeout=10)
            try:
                session.shutdown(TargetType.CLIENT, [client], wait=False)
            finally:
                session.close()
        if self.session is None:
            self.session = open_admin_session(self.kits, timeout=10)
        self.session.shutdown(TargetType.SERVER, wait=False)

    def _site_configs(self, kits: Kits) -> None:
        super()._site_configs(kits)
        if not self.byoc:
            for participant in kits.services:
                logger.info("%s: no BYOC right for any role (%s)", participant, forbid_byoc(kits.dir(participant)))


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m deploy.distributed``: rehearse distributed provisioning and a job on loopback."""
    parser = argparse.ArgumentParser(
        prog="python -m deploy.distributed",
        description="Distributed provisioning on one machine (each participant makes its own key and certificate "
        "request; the project admin signs), then start the kits on loopback, run a job as the lead without "
        "bring-your-own-code (fedbrats. on every allow-list), download the model, shut down, check nothing is left.",
    )
    add_run_arguments(parser, default_workspace("fedbrats_distributed"))
    parser.add_argument(
        "--byoc", action="store_true", help="submit the job with app/custom and keep the sites' BYOC right"
    )
    args = parser.parse_args(argv)
    args.no_byoc = not args.byoc
    return run_from_args(DistributedDeployment, args)


if __name__ == "__main__":
    sys.exit(main())
