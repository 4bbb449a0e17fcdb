"""Tests that the committed job folders are the recipes' export and that every job can be instantiated."""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from fedbrats.federated.client.executor import FedBratsExecutor, decode_config, encode_config
from fedbrats.federated.client.trainer import TrainConfig
from fedbrats.federated.methods.fedkd.network import ModalityAwareSegNet
from fedbrats.federated.server.aggregation import AggregationStrategy
from fedbrats.jobgen import JOBS
from fedbrats.networks import BraTSSegResNet, build_from_spec, model_spec
from fedbrats.recipe import job_files, write_job
from fedbrats.simulate import parse_overrides

REPO = Path(__file__).resolve().parents[1]
JOBS_DIR = REPO / "jobs"
SIGNATURE_PREFIX = ".__nvfl_"


def _files(root: Path) -> set[str]:
    return {
        str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and not p.name.startswith(SIGNATURE_PREFIX)
    }


def _config(job: str, name: str) -> dict[str, Any]:
    return json.loads((JOBS_DIR / job / "app" / "config" / name).read_text(encoding="utf-8"))


def _components(job: str) -> list[dict[str, Any]]:
    server = _config(job, "config_fed_server.json")
    client = _config(job, "config_fed_client.json")
    return (
        server["workflows"] + server["components"] + client["components"] + [e["executor"] for e in client["executors"]]
    )


def _import(path: str) -> type:
    module_name, cls_name = path.rsplit(".", 1)
    return getattr(importlib.import_module(module_name), cls_name)


# ------------------------------------------------------------------------------------------ committed == export


@pytest.mark.parametrize("name", sorted(JOBS))
def test_committed_job_equals_recipe_export(name: str, tmp_path: Path) -> None:
    """jobs/<name>/ holds exactly the files the job's recipe exports, byte for byte (run `fedbrats make-jobs`)."""
    generated = Path(write_job(name, str(tmp_path)))
    committed = JOBS_DIR / name
    assert committed.is_dir(), f"{committed} is missing; run `fedbrats make-jobs`"
    gen_files, repo_files = _files(generated), _files(committed)
    assert repo_files == gen_files, f"extra: {repo_files - gen_files}, missing: {gen_files - repo_files}"
    for rel in sorted(gen_files):
        assert (committed / rel).read_bytes() == (generated / rel).read_bytes(), f"{name}/{rel} is stale"


def test_every_recipe_job_is_committed() -> None:
    """No job folder without a recipe, and none missing."""
    folders = {p.name for p in JOBS_DIR.iterdir() if p.is_dir()}
    assert folders == set(JOBS)


# ------------------------------------------------------------------------------------------ components


@pytest.mark.parametrize("name", sorted(JOBS))
def test_job_component_paths_import(name: str) -> None:
    """Every class a job names imports; the client's training options pass TrainConfig.from_dict."""
    components = _components(name)
    assert len(components) >= 7
    for component in components:
        cls = _import(component["path"])
        assert isinstance(cls, type), component["path"]
    client = _config(name, "config_fed_client.json")
    (executor,) = client["executors"]
    assert {"train", "validate", "submit_model"} <= set(executor["tasks"])
    training = executor["executor"]["args"]["training"]
    config = TrainConfig.from_dict(training)
    assert config.method == JOBS[name].get("training", {}).get("method", "fedavg")
    meta = json.loads((JOBS_DIR / name / "meta.json").read_text(encoding="utf-8"))
    assert meta["name"] == name and meta["min_clients"] >= 1


@pytest.mark.parametrize("name", sorted(JOBS))
def test_job_aggregation_and_executor_instantiate(name: str) -> None:
    """The job's aggregation strategy and executor build with the job's own arguments."""
    server = _config(name, "config_fed_server.json")
    (aggregation,) = [c for c in server["components"] if c["id"] == "aggregation"]
    strategy = _import(aggregation["path"])(**aggregation["args"])
    assert isinstance(strategy, AggregationStrategy)
    executor = _config(name, "config_fed_client.json")["executors"][0]["executor"]
    FedBratsExecutor(**executor["args"])


@pytest.mark.parametrize("name", sorted(JOBS))
def test_persistor_model_spec_rebuilds(name: str) -> None:
    """The job's persistor model spec builds through build_from_spec, and model_spec round-trips it."""
    (persistor,) = [c for c in _components(name) if c.get("id") == "persistor"]
    spec = persistor["args"]["model"]
    model = build_from_spec(spec)
    assert f"{type(model).__module__}.{type(model).__qualname__}" == spec["path"]
    described = model_spec(model)
    assert described["path"] == spec["path"]
    assert spec["args"].items() <= described["args"].items()
    rebuilt = build_from_spec(json.loads(json.dumps(described)))  # survives JSON, as in model_spec.json
    assert type(rebuilt) is type(model)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()} == shapes


def test_fedkd_job_uses_modality_aware_network() -> None:
    """The fedkd job's server builds the modality-aware network its aggregation relies on."""
    (persistor,) = [c for c in _components("fedkd") if c.get("id") == "persistor"]
    assert isinstance(build_from_spec(persistor["args"]["model"]), ModalityAwareSegNet)
    (aggregation,) = [c for c in _components("fedkd") if c.get("id") == "aggregation"]
    assert aggregation["path"].endswith(".ModalityAwareAggregation")


def test_model_spec_round_trip_non_default_args() -> None:
    """Non-default constructor arguments survive model_spec -> build_from_spec."""
    net = BraTSSegResNet(init_filters=16, blocks_down=(1, 1, 2, 2), blocks_up=(1, 1, 1), dropout_prob=0.1)
    spec = model_spec(net)
    assert spec["args"]["blocks_down"] == [1, 1, 2, 2] and spec["args"]["init_filters"] == 16
    rebuilt = build_from_spec(spec)
    assert model_spec(rebuilt) == spec
    net2 = ModalityAwareSegNet(init_filters=4, fusion="attention", style_channels=3)
    rebuilt2 = build_from_spec(model_spec(net2))
    assert rebuilt2.fusion == "attention" and rebuilt2.style_channels == 3 and rebuilt2.content_channels == 16
    x = torch.zeros(1, 4, 16, 16, 16)
    rebuilt2.load_state_dict(net2.state_dict())
    rebuilt2.eval()
    net2.eval()
    with torch.no_grad():
        assert torch.equal(rebuilt2(x)["logits"], net2(x)["logits"])


@pytest.mark.parametrize("path", ["torch.nn.Linear", "os.system", "", "fedbratsx.evil.Net"])
def test_build_from_spec_refuses_outside_package(path: str) -> None:
    """Only registered network classes can be built from a spec sent over the wire."""
    with pytest.raises(ValueError, match="not a registered network"):
        build_from_spec({"path": path, "args": {}})


# ------------------------------------------------------------------------------------------ executor options


def test_executor_rejects_unknown_training_option() -> None:
    """A typo in the job's training options fails when the executor is built, naming it."""
    with pytest.raises(ValueError, match="epochs_per_rond"):
        FedBratsExecutor(training={"epochs_per_rond": 2})
    with pytest.raises(ValueError, match="roi_szie"):
        FedBratsExecutor(training={"data": {"roi_szie": [16, 16, 16]}})
    executor = FedBratsExecutor(training={"epochs_per_round": 1})
    assert executor.training == {"epochs_per_round": 1}


def test_encode_decode_config_round_trip() -> None:
    """Options with spaces and nested dicts survive the script-argument encoding, which has no whitespace."""
    config = {
        "method": "fedkd",
        "method_args": {"note": "a b\tc\nd", "nested": {"x": [1, 2.5, None], "y": True}},
        "data": {"roi_size": [16, 16, 16]},
        "text": "  spaced  ",
    }
    token = encode_config(config)
    assert token and not any(ch.isspace() for ch in token)
    assert decode_config(token) == config
    assert decode_config(encode_config({})) == {}


# ------------------------------------------------------------------------------------------ overrides


def test_parse_overrides_nested_and_json() -> None:
    """Dotted keys nest; values parse as JSON where they can, else stay strings."""
    out = parse_overrides(
        [
            "method_args.rcl_weight=0",
            "method_args.kd_weight=0.5",
            "data.roi_size=[16,16,16]",
            "data.augment=false",
            "method=fedkd",
            "note=a=b",
            'deep.er.key={"x": null}',
        ]
    )
    assert out == {
        "method_args": {"rcl_weight": 0, "kd_weight": 0.5},
        "data": {"roi_size": [16, 16, 16], "augment": False},
        "method": "fedkd",
        "note": "a=b",
        "deep": {"er": {"key": {"x": None}}},
    }
    assert parse_overrides([]) == {}
    with pytest.raises(ValueError, match="key.sub=value"):
        parse_overrides(["method_args.rcl_weight"])


def test_overrides_merge_into_the_exported_job() -> None:
    """Overrides merge into the job's nested training options without dropping the others."""
    files = job_files(
        "fedkd",
        num_rounds=3,
        aggregation_args={"modality_aware": False},
        **parse_overrides(["data.roi_size=[16,16,16]"]),
    )
    server = json.loads(files["app/config/config_fed_server.json"])
    client = json.loads(files["app/config/config_fed_client.json"])
    training = client["executors"][0]["executor"]["args"]["training"]
    assert training["data"] == {"roi_size": [16, 16, 16], "batch_size": 2, "modality_dropout": 0.5}
    assert training["method"] == "fedkd"
    assert server["workflows"][0]["args"]["num_rounds"] == 3
    (aggregation,) = [c for c in server["components"] if c["id"] == "aggregation"]
    assert aggregation["args"] == {"modality_aware": False}
    TrainConfig.from_dict(training)
    with pytest.raises(ValueError, match="nope"):
        job_files("nope")
