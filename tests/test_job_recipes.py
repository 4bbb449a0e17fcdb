"""Every job is an NVFlare 2.9 recipe: what it exports, and the entry point's three environments."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from nvflare.apis.filter import Filter
from nvflare.recipe import PocEnv, ProdEnv, SimEnv
from nvflare.recipe.spec import Recipe

from fedbrats.commands import command_parser
from fedbrats.data.site_config import SITE_CONFIG_ENV
from fedbrats.job import add_arguments, byoc, job_options, make_env
from fedbrats.recipe import FedBratsRecipe, built_component, job_files

REPO = Path(__file__).resolve().parents[1]
SVT = "nvflare.app_common.filters.svt_privacy.SVTPrivacy"


def _job_parser():
    """The parser of ``python -m fedbrats.job``."""
    parser = command_parser("job", prog="python -m fedbrats.job")
    add_arguments(parser)
    return parser


def test_a_job_is_an_nvflare_recipe_of_one_app_for_every_site() -> None:
    recipe = FedBratsRecipe("fedkd", num_rounds=3)
    assert isinstance(recipe, Recipe) and recipe.name == "fedkd"
    files = job_files("fedkd", num_rounds=3)
    assert set(files) == {
        "meta.json",
        "app/config/config_fed_server.json",
        "app/config/config_fed_client.json",
        "app/custom/README.md",
    }
    assert json.loads(files["meta.json"])["deploy_map"] == {"app": ["@ALL"]}
    server = json.loads(files["app/config/config_fed_server.json"])
    bounds = {"epochs_per_round": 10, "batch_size": 2, "max_steps_per_epoch": 0, "voxels_per_item": 32**3}
    expected = {"num_rounds": 3, "min_clients": 0, "seed": 0, "update_bounds": bounds}
    assert server["workflows"][0]["args"] == expected, "always written"
    assert server["server"] == {"task_request_interval": 0.5}
    assert b"import" not in files["app/custom/README.md"], "app/custom holds no code: the package is installed"
    meta = json.loads(job_files("fedkd", deploy_min_clients=4)["meta.json"])
    assert meta["min_clients"] == 4, "a PoC waits for all its sites before deploying"


def test_production_jobs_go_without_byoc_by_default() -> None:
    """Without app/custom NVFlare checks the sites' class allow-lists; the simulator and PoC need the folder."""
    assert "app/custom/README.md" not in job_files("fedkd", byoc=False)
    parse = _job_parser().parse_args
    assert not byoc(parse(["fedkd", "--env", "prod", "--startup-kit", "kit"])), "production default: no BYOC"
    assert byoc(parse(["fedkd", "--env", "prod", "--startup-kit", "kit", "--byoc", "on"]))
    assert byoc(parse(["fedkd"])) and byoc(parse(["fedkd", "--env", "poc"])), "NVFlare's simulator and PoC need it"
    options = job_options(parse(["fedkd", "--tracking", "mlflow", "--tracking-uri", "http://mlflow:5000"]))
    assert (options.tracking, options.tracking_uri) == ("mlflow", "http://mlflow:5000")
    assert job_options(parse(["fedkd"])).tracking == "tensorboard"


def test_privacy_filters_keep_their_arguments_in_the_export() -> None:
    privacy = {
        "weights": {"path": SVT, "args": {"fraction": 0.5}},
        "prototypes": {"clip_norm": 2.0, "noise_multiplier": 0.5, "seed": 3},
    }
    client = json.loads(job_files("fedkd", privacy=privacy)["app/config/config_fed_client.json"])
    assert client["executors"][0]["executor"]["args"]["params_transfer_type"] == "DIFF"
    chains = client["task_result_filters"]
    assert [c["tasks"] for c in chains] == [["train"], ["validate"], ["submit_model"]], "NVFlare matches exact names"
    privacy_filter = "fedbrats.federated.methods.fedkd.privacy.PrototypePrivacyFilter"
    audit = "fedbrats.federated.filters.PayloadAuditFilter"
    for chain in chains[:2]:
        paths = [f["path"] for f in chain["filters"]]
        assert paths == [SVT, privacy_filter, audit], "the audit comes last"
        assert chain["filters"][0]["args"]["fraction"] == 0.5
        assert chain["filters"][1]["args"] == {"clip_norm": 2.0, "noise_multiplier": 0.5, "seed": 3}
    # a site's own model for the cross-site evaluation goes whole (a noised copy would score another model), audited
    assert [f["path"] for f in chains[2]["filters"]] == [audit]


class _ForgetfulFilter(Filter):
    def __init__(self, strength: float = 1.0) -> None:
        super().__init__()
        self.scale = strength  # not under its own name: an export would lose it

    def process(self, shareable, fl_ctx):  # pragma: no cover - never run
        return shareable


def test_a_component_that_would_lose_an_argument_in_the_export_is_refused() -> None:
    with pytest.raises(ValueError, match=r"\['strength'\]"):
        built_component({"path": f"{__name__}._ForgetfulFilter", "args": {"strength": 2.0}})
    assert built_component({"path": SVT, "args": {"fraction": 0.2}}).fraction == 0.2


def test_the_entry_point_builds_each_environment(
    tiny_federation: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(SITE_CONFIG_ENV, raising=False)
    monkeypatch.delenv("NVFLARE_POC_WORKSPACE", raising=False)
    parse = _job_parser().parse_args
    sim = make_env(parse(["fedavg", "--sites", tiny_federation, "--workspace", str(tmp_path / "ws")]))
    assert isinstance(sim, SimEnv) and sim.clients == ["site-1", "site-2", "site-3", "site-4"]
    assert sim.workspace_root == str(tmp_path / "ws")
    assert os.environ[SITE_CONFIG_ENV] == tiny_federation, "the simulated sites read the federation's sites.json"
    central = make_env(parse(["centralized", "--sites", tiny_federation]))
    assert central.clients == ["central"]
    poc = make_env(parse(["fedkd", "--env", "poc", "--clients", "a,b", "--poc-workspace", str(tmp_path / "poc")]))
    assert isinstance(poc, PocEnv) and poc.clients == ["a", "b"] and poc.num_clients == 2
    assert poc.poc_workspace == str(tmp_path / "poc")
    with pytest.raises(ValueError, match="--startup-kit"):
        make_env(parse(["fedkd", "--env", "prod"]))
    prod = make_env(parse(["fedkd", "--env", "prod", "--startup-kit", str(tmp_path), "--username", "lead@h.org"]))
    assert isinstance(prod, ProdEnv) and prod.username == "lead@h.org"


def test_nvflares_export_flags_write_the_committed_job(tiny_federation: str, tmp_path: Path) -> None:
    """`python -m fedbrats.job fedavg --export --export-dir DIR` writes jobs/fedavg byte for byte."""
    out = tmp_path / "export"
    cmd = [sys.executable, "-m", "fedbrats.job", "fedavg", "--sites", tiny_federation, "--export", "--export-dir"]
    subprocess.run([*cmd, str(out)], check=True, cwd=REPO, capture_output=True)
    committed = REPO / "jobs" / "fedavg"
    exported = sorted(p.relative_to(out / "fedavg") for p in (out / "fedavg").rglob("*") if p.is_file())
    assert exported == sorted(
        p.relative_to(committed) for p in committed.rglob("*") if p.is_file() and not p.name.startswith(".__nvfl_")
    )
    for rel in exported:
        assert (out / "fedavg" / rel).read_bytes() == (committed / rel).read_bytes(), rel


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "jobs").iterdir() if p.is_dir()))
def test_every_task_result_passes_the_audit(name: str) -> None:
    """NVFlare 2.9 looks filters up by exact task name: each task has its own chain, ending with the audit."""
    client = json.loads((REPO / "jobs" / name / "app" / "config" / "config_fed_client.json").read_text())
    chains = {tuple(c["tasks"]): c["filters"] for c in client["task_result_filters"]}
    (executor,) = client["executors"]
    assert set(chains) == {(task,) for task in executor["tasks"]}
    assert all(filters[-1]["path"].endswith(".PayloadAuditFilter") for filters in chains.values())
