"""Distributed provisioning (deploy.distributed): each participant makes its own key; only signed material returns.

The fast test runs NVFlare 2.9's `nvflare cert init/request/approve` and `nvflare package` for the server, one
hospital site and the lead, each in its own folder, and checks where every private key is; the integration test
starts such kits on loopback and runs a job as the lead without bring-your-own-code.
"""

from __future__ import annotations

import json
import uuid
import zipfile
from pathlib import Path

import pytest
import torch
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import padding

from deploy.distributed import (
    EXCHANGE_DIR,
    PARTIES_DIR,
    PROJECT_ADMIN_DIR,
    REQUEST_DIR,
    DistributedDeployment,
    distributed_provision,
    forbid_byoc,
    participant_definition,
    project_profile,
    site_operators,
)
from deploy.processes import DeploymentError, deployment_env, find_processes, nvflare_cli, port_is_free
from deploy.project import load_project, local_project
from fedbrats.recipe import write_job

TINY_TRAINING = {"epochs_per_round": 1, "data": {"roi_size": [16, 16, 16], "batch_size": 1}}
PRIVATE_KEY_MARKER = b"PRIVATE KEY-----"


@pytest.fixture(scope="module", autouse=True)
def _nvflare_cert_available() -> None:
    try:
        cli = nvflare_cli()
    except DeploymentError as e:
        pytest.skip(f"nvflare CLI unavailable: {e}")
    from importlib.util import find_spec

    if find_spec("nvflare.tool.cert.cert_commands") is None or find_spec("nvflare.tool.package") is None:
        pytest.skip(f"{cli} has no 'nvflare cert' / 'nvflare package' (NVFlare < 2.9)")


def _files_with_private_keys(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (zip members included) that holds private key material, by path."""
    found = {}
    for path in root.rglob("*"):
        if not path.is_file():
            continue
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                for member in zf.namelist():
                    content = zf.read(member)
                    if PRIVATE_KEY_MARKER in content:
                        found[f"{path}:{member}"] = content
        elif PRIVATE_KEY_MARKER in path.read_bytes():
            found[str(path)] = path.read_bytes()
    return found


def test_profile_and_participant_definitions_come_from_the_project_file() -> None:
    project = local_project(load_project(), 2, 12345)
    assert project_profile(project) == {
        "name": "fedbrats",
        "scheme": "grpc",
        "connection_security": "mtls",
        "server": {"host": "localhost", "fed_learn_port": 12345, "admin_port": 12345},
    }
    site = participant_definition(project, "site-2")
    assert site == {"name": "fedbrats", "participants": [{"name": "site-2", "type": "client", "org": "hospital_b"}]}
    lead = participant_definition(project, "lead@fedbrats.example.org")["participants"][0]
    assert lead["role"] == "lead"
    with pytest.raises(DeploymentError, match="project_admin"):
        participant_definition(project, "admin@fedbrats.example.org")
    assert site_operators(project) == {
        "site-1": "it-admin@hospital-a.example.org",
        "site-2": "it-admin@hospital-b.example.org",
    }


def test_each_private_key_is_made_where_it_is_used_and_only_signed_material_returns(tmp_path: Path) -> None:
    project = local_project(load_project(), 1, 12345)
    env = deployment_env(uuid.uuid4().hex, home=str(tmp_path / "home"))
    root = tmp_path / "dist"
    names = ["localhost", "site-1", "lead@fedbrats.example.org"]
    kits = distributed_provision(project, str(root), env, participants=names)
    assert kits.clients == ("site-1",) and kits.admin == "lead@fedbrats.example.org"

    root_ca = x509.load_pem_x509_certificate((root / PROJECT_ADMIN_DIR / "ca" / "rootCA.pem").read_bytes())
    for name in names:
        party = root / PARTIES_DIR / name
        made_here = (party / REQUEST_DIR / f"{name}.key").read_bytes()
        startup = Path(kits.dir(name), "startup")
        (kit_key,) = startup.glob("*.key")
        assert kit_key.read_bytes() == made_here, f"{name}'s kit holds the key made on its own machine"
        assert kit_key.stat().st_mode & 0o077 == 0, f"{kit_key} is readable by others"
        (cert_file,) = startup.glob("*.crt")
        cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
        key = serialization.load_pem_private_key(made_here, password=None)
        assert cert.public_key().public_numbers() == key.public_key().public_numbers(), "the certificate is for it"
        root_ca.public_key().verify(
            cert.signature, cert.tbs_certificate_bytes, padding.PKCS1v15(), cert.signature_hash_algorithm
        )  # signed by the project's root CA (raises otherwise)
        assert (startup / "rootCA.pem").read_bytes() == (root / PROJECT_ADMIN_DIR / "ca" / "rootCA.pem").read_bytes()

    # The project admin holds one private key, the root CA's; what travelled (request and signed zips) holds none.
    admin_keys = _files_with_private_keys(root / PROJECT_ADMIN_DIR)
    assert list(admin_keys) == [str(root / PROJECT_ADMIN_DIR / "ca" / "rootCA.key")]
    assert _files_with_private_keys(root / EXCHANGE_DIR) == {}
    assert sorted(p.name for p in (root / EXCHANGE_DIR).iterdir()) == sorted(
        [f"{n}.request.zip" for n in names] + [f"{n}.signed.zip" for n in names]
    )
    # No party got the CA's key, and the server kit holds no hospital's key.
    ca_key = (root / PROJECT_ADMIN_DIR / "ca" / "rootCA.key").read_bytes()
    for name in names:
        assert ca_key not in _files_with_private_keys(root / PARTIES_DIR / name).values()
    site_key = (root / PARTIES_DIR / "site-1" / REQUEST_DIR / "site-1.key").read_bytes()
    assert site_key not in _files_with_private_keys(root / PARTIES_DIR / "localhost").values()

    client = json.loads(Path(kits.dir("site-1"), "startup", "fed_client.json").read_text())
    assert client["client"]["connection_security"] == "mtls"
    policy = json.loads(Path(forbid_byoc(kits.dir("site-1"))).read_text())["permissions"]
    assert policy["lead"]["byoc"] == "none" and policy["org_admin"]["byoc"] == "none"


@pytest.mark.integration
def test_distributed_kits_run_a_job_as_the_lead_without_byoc(tmp_path: Path) -> None:
    """Kits from the distributed flow on loopback: the lead submits a job without app/custom; the sites run it from
    their installed package (fedbrats. on their allow-list, no BYOC right for anyone); each hospital's IT admin
    shuts its own site down and the lead the server."""
    job = write_job("fedavg", str(tmp_path / "jobs"), num_rounds=1, **TINY_TRAINING)
    deployment = DistributedDeployment(str(tmp_path / "ws"), 2, cases_per_site=3, size=16, byoc=False)
    try:
        report = deployment.run(job, str(tmp_path / "out"), timeout=240)
    finally:
        leftovers = find_processes(deployment.marker, [deployment.workspace])

    assert report.error == "", report.error
    assert report.status == "FINISHED:COMPLETED"
    kits = deployment.kits
    assert kits is not None and kits.clients == ("site-1", "site-2") and kits.admin.startswith("lead@")
    assert not Path(deployment.workspace, "jobs", "fedavg", "app", "custom").exists(), "submitted without BYOC"
    for participant in kits.services:
        local = Path(kits.dir(participant), "local")
        assert "fedbrats." in json.loads((local / "resources.json").read_text())["class_allow_list"]
        rights = json.loads((local / "authorization.json").read_text())["permissions"]
        assert all(r["byoc"] == "none" for r in rights.values() if isinstance(r, dict))
    assert torch.load(report.global_model, weights_only=True)["model"]
    assert report.leftovers == [] and leftovers == [], "the IT admins and the lead stopped everything in order"
    assert report.port_free and port_is_free(report.port)
