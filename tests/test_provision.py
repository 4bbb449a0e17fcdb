"""Production provisioning (poc_setup/project.yml, deploy.provision): kits, mutual TLS, clean shutdown."""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

import pytest
import torch

from deploy.admin import connected_clients, open_admin_session, wait_for_clients
from deploy.kits import (
    FEDBRATS_CLASS_ALLOW_LIST,
    Kits,
    allow_fedbrats_classes,
    make_demo_federation,
    provision,
    stage_job,
    write_site_configs,
)
from deploy.processes import (
    DeploymentError,
    deployment_env,
    ensure_stopped,
    find_free_port,
    find_processes,
    port_is_free,
    request_kit_stop,
    start_kit,
    wait_for_listener,
)
from deploy.project import (
    LOCAL_HOST,
    PROJECT_FILE,
    client_names,
    load_project,
    local_project,
    project_admin,
    server_name,
    write_project,
)
from deploy.provision import ProvisionedDeployment
from fedbrats.recipe import write_job
from tests.helpers import nvflare_available

TINY_TRAINING = {"epochs_per_round": 1, "data": {"roi_size": [16, 16, 16], "batch_size": 1}}
CERT_ERRORS = ("CERTIFICATE_VERIFY_FAILED", "SSLCertVerificationError", "certificate verify failed")


@pytest.fixture(scope="module", autouse=True)
def _needs_nvflare() -> None:
    nvflare_available()


def _json(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


# ---- the project file and the kits (seconds) ------------------------------------------------------------------
def test_project_file_has_hospitals_roles_and_default_builders() -> None:
    project = load_project(PROJECT_FILE)
    assert project["api_version"] == 3
    assert client_names(project) == ["site-1", "site-2", "site-3", "site-4"]  # the jobs' site names
    roles = {p["name"]: p.get("role") for p in project["participants"] if p["type"] == "admin"}
    assert project_admin(project) in roles
    assert "lead" in roles.values()
    client_orgs = {p["org"] for p in project["participants"] if p["type"] == "client"}
    org_admin_orgs = {p["org"] for p in project["participants"] if p.get("role") == "org_admin"}
    assert client_orgs == org_admin_orgs  # one IT admin per hospital
    assert [b["path"].rsplit(".", 1)[-1] for b in project["builders"]] == [
        "WorkspaceBuilder",
        "StaticFileBuilder",
        "CertBuilder",
        "SignatureBuilder",
    ]


def test_local_variant_keeps_n_sites_and_moves_the_server_to_loopback() -> None:
    project = local_project(load_project(), 2, 12345)
    assert server_name(project) == LOCAL_HOST
    server = next(p for p in project["participants"] if p["type"] == "server")
    assert server["fed_learn_port"] == 12345
    assert client_names(project) == ["site-1", "site-2"]
    orgs = {p["org"] for p in project["participants"] if p.get("role") == "org_admin"}
    assert orgs == {"hospital_a", "hospital_b"}
    assert client_names(local_project(load_project(), 6, 1))[-2:] == ["site-5", "site-6"]


def test_production_project_provisions(tmp_path: Path) -> None:
    kits = provision(str(PROJECT_FILE), str(tmp_path / "prov"))
    assert kits.clients == ("site-1", "site-2", "site-3", "site-4")
    client = _json(Path(kits.dir("site-1"), "startup", "fed_client.json"))
    assert client["servers"][0]["service"]["target"].endswith(":8002")
    assert client["client"]["connection_security"] == "mtls"
    server = _json(Path(kits.dir(kits.server), "startup", "fed_server.json"))
    assert server["servers"][0]["connection_security"] == "mtls"
    # the hospital IT admin cannot ship code (no BYOC), the lead and the project admin can
    authz = _json(Path(kits.dir("site-1"), "local", "authorization.json.default"))["permissions"]
    assert authz["org_admin"]["byoc"] == "none" and authz["lead"]["byoc"] == "any"
    assert authz["project_admin"] == "any"


def test_site_configs_allow_list_and_staged_job(tmp_path: Path) -> None:
    kits = provision(
        write_project(local_project(load_project(), 2, find_free_port()), tmp_path / "p.yml"), str(tmp_path)
    )
    sites_json = make_demo_federation(str(tmp_path / "data"), kits.clients, cases_per_site=2, size=16)
    written = write_site_configs(sites_json, kits.client_dirs)
    for site, path in written.items():
        assert path == os.path.join(kits.dir(site), "local", "fedbrats_site.json")
        assert list(_json(path)["sites"]) == [site]  # a site sees its own entry only
    with pytest.raises(DeploymentError, match="no entry for site 'site-9'"):
        write_site_configs(sites_json, {"site-9": kits.dir("site-1")})

    resources = allow_fedbrats_classes(kits.dir("site-1"))
    allow = _json(resources)["class_allow_list"]
    assert all(p in allow for p in FEDBRATS_CLASS_ALLOW_LIST)
    assert "nvflare.app_common.widgets.convert_to_fed_event.ConvertToFedEvent" in allow  # defaults kept

    job = write_job("fedavg", str(tmp_path / "jobs"), num_rounds=5)
    staged = stage_job(job, str(tmp_path / "staged"), num_rounds=1, byoc=False)
    assert not Path(staged, "app", "custom").exists() and Path(job, "app", "custom").is_dir()
    server = _json(Path(staged, "app", "config", "config_fed_server.json"))
    assert server["workflows"][0]["args"]["num_rounds"] == 1


def test_unreachable_server_error_names_host_and_port(tmp_path: Path) -> None:
    port = find_free_port()
    project = local_project(load_project(), 1, port)
    kits = provision(write_project(project, tmp_path / "p.yml"), str(tmp_path))
    with pytest.raises(DeploymentError, match=rf"localhost:{port}.*firewall"):
        open_admin_session(kits, timeout=2)


# ---- running kits (integration) ----------------------------------------------------------------------------------
@pytest.mark.integration
def test_provisioned_kits_run_one_round_with_mutual_tls_and_shut_down(tmp_path: Path) -> None:
    job = write_job("fedavg", str(tmp_path / "jobs"), num_rounds=1, **TINY_TRAINING)
    deployment = ProvisionedDeployment(str(tmp_path / "ws"), 2, cases_per_site=3, size=16)
    try:
        report = deployment.run(job, str(tmp_path / "out"), timeout=240)
    finally:
        leftovers = find_processes(deployment.marker, [deployment.workspace])

    assert report.error == "", report.error
    assert report.status == "FINISHED:COMPLETED"
    kits = deployment.kits
    assert kits is not None and kits.clients == ("site-1", "site-2")
    for site in kits.clients:  # started from production kits that require mutual TLS
        assert _json(Path(kits.dir(site), "startup", "fed_client.json"))["client"]["connection_security"] == "mtls"
    checkpoint = torch.load(report.global_model, weights_only=True)
    assert checkpoint["model"]
    assert [r["round"] for r in report.timings["rounds"]] == [0]
    assert report.leftovers == [] and leftovers == []
    assert report.port_free and port_is_free(report.port)


@pytest.mark.integration
def test_client_with_a_certificate_of_another_provisioning_is_refused(tmp_path: Path) -> None:
    port = find_free_port()
    project_file = write_project(local_project(load_project(), 1, port), tmp_path / "project.yml")
    marker = uuid.uuid4().hex
    env = deployment_env(marker, home=str(tmp_path / "home"))
    ours: Kits = provision(project_file, str(tmp_path / "ours"), env)
    theirs: Kits = provision(project_file, str(tmp_path / "theirs"), env)  # same names and port, another root CA
    assert Path(ours.dir("site-1"), "startup", "rootCA.pem").read_bytes() != (
        Path(theirs.dir("site-1"), "startup", "rootCA.pem").read_bytes()
    )
    session = None
    started: list[str] = []
    try:
        started.append(ours.dir(ours.server))
        start_kit(ours.dir(ours.server), env)
        wait_for_listener(port, "127.0.0.1", 60, "the FL server")
        started.append(theirs.dir("site-1"))
        start_kit(theirs.dir("site-1"), env)
        session = open_admin_session(ours)

        foreign_log = Path(theirs.dir("site-1"), "log.txt")
        refused, deadline = False, time.monotonic() + 90
        while time.monotonic() < deadline:
            assert connected_clients(session) == [], "a client with a foreign certificate joined the federation"
            text = foreign_log.read_text(errors="replace") if foreign_log.is_file() else ""
            if any(e in text for e in CERT_ERRORS):
                refused = True
                break
            time.sleep(1)
        assert refused, f"no TLS certificate error in {foreign_log} within 90s"
        time.sleep(3)
        assert connected_clients(session) == []

        # control: the same site with this provisioning's kit is let in by the same server
        started.append(ours.dir("site-1"))
        start_kit(ours.dir("site-1"), env)
        wait_for_clients(session, ours, timeout=60)
    finally:
        if session is not None:
            try:
                session.shutdown("all", wait=False)
            except Exception:
                pass
        for kit in started:
            request_kit_stop(kit)
        cleanup = ensure_stopped(marker, [str(tmp_path)], port, timeout=30)
    assert find_processes(marker, [str(tmp_path)]) == []
    assert cleanup.port_free
