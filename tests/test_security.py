"""Security holes of issue 13: what a model folder, a job or a server message can make the package do."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from fedbrats.evaluation import predict as predict_cli
from fedbrats.federated.methods import METHODS, build_method, register_method
from fedbrats.federated.server.aggregation import STRATEGIES, WeightedAverage
from fedbrats.networks import NETWORKS, build_from_spec, build_network, model_spec, register_network
from fedbrats.registry import Registry


def _gadget(marker: Path) -> dict[str, Any]:
    """The spec of issue 13: a package function that runs a command, named as if it were a network."""
    return {
        "path": "fedbrats.deploy.provision.run_cli",
        "args": {"args": ["touch", str(marker)], "env": {"PATH": "/usr/bin:/bin"}, "what": "x"},
    }


def _tiny_image(path: Path) -> str:
    import nibabel as nib
    import numpy as np

    data = np.zeros((16, 16, 16), dtype=np.float32)
    data[4:12, 4:12, 4:12] = np.linspace(1, 2, 512, dtype=np.float32).reshape(8, 8, 8)
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))
    return str(path)


# ---- item 1: only registered network classes are built ------------------------------------------------------
def test_model_folder_cannot_run_a_command(tmp_path: Path) -> None:
    """The exact gadget of the issue, in an exported model folder: predict refuses it and nothing runs."""
    marker = tmp_path / "x"
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "metadata.json").write_text(json.dumps({"model_spec": _gadget(marker)}))
    torch.save({"w": torch.zeros(1)}, folder / "model.pt")
    flair = _tiny_image(tmp_path / "p_flair.nii.gz")
    code = predict_cli.main(
        ["--model", str(folder), "--flair", flair, "--out", str(tmp_path / "seg.nii.gz"), "--device", "cpu"]
    )
    assert code == 1
    assert not marker.exists(), "the spec's command ran"


def test_server_sent_spec_cannot_run_a_command(tmp_path: Path) -> None:
    """The builder every site uses for the server's model_spec refuses the gadget, naming its path."""
    marker = tmp_path / "x"
    with pytest.raises(ValueError, match="fedbrats.deploy.provision.run_cli"):
        build_from_spec(_gadget(marker))
    assert not marker.exists()


@pytest.mark.parametrize(
    "spec",
    [
        {"path": "fedbrats.networks.segresnet.BraTSSegResNet", "args": {"init_filters": {"a": 1}}},
        {"path": "fedbrats.networks.segresnet.BraTSSegResNet", "args": {"no_such_argument": 1}},
        {"path": "fedbrats.networks.segresnet.BraTSSegResNet", "args": ["init_filters", 8]},
        {"path": ["fedbrats.networks.segresnet.BraTSSegResNet"], "args": {}},
        "fedbrats.networks.segresnet.BraTSSegResNet",
    ],
)
def test_registered_network_with_bad_arguments_is_refused(spec: Any) -> None:
    """Arguments must be JSON scalars or lists the constructor declares; anything else is a ValueError."""
    with pytest.raises(ValueError):
        build_from_spec(spec)


def test_registered_networks_still_round_trip() -> None:
    net = build_network("segresnet", init_filters=16, blocks_down=[1, 1, 1, 1])
    rebuilt = build_from_spec(json.loads(json.dumps(model_spec(net))))
    assert type(rebuilt) is type(net) and rebuilt.init_filters == 16


def test_registering_something_that_is_not_a_module_is_refused_when_built(monkeypatch: pytest.MonkeyPatch) -> None:
    """Even a registered path must name a torch.nn.Module subclass."""
    monkeypatch.setattr(NETWORKS, "_paths", dict(NETWORKS._paths))  # the registration ends with the test
    register_network("test_not_a_module", "fedbrats.deploy.provision.run_cli")
    with pytest.raises(ValueError, match="not a torch.nn.modules.module.Module"):
        build_network("test_not_a_module", args=["true"], env={}, what="x")


def test_build_method_refuses_unregistered_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A job's method name that is a dotted path outside the registry is never imported."""
    with pytest.raises(ValueError, match="fedbrats.deploy.provision.run_cli"):
        build_method("fedbrats.deploy.provision.run_cli", args=["touch", str(tmp_path / "x")], env={}, what="x")
    with pytest.raises(ValueError, match="os.system"):
        build_method("os.system")
    assert not (tmp_path / "x").exists()
    monkeypatch.setattr(METHODS, "_paths", dict(METHODS._paths))  # the registration ends with the test
    register_method("test_plugin", "fedbrats.federated.methods.supervised.SupervisedMethod")
    assert type(build_method("test_plugin", dice_weight=0.5)).__name__ == "SupervisedMethod"


def test_strategies_are_registered() -> None:
    assert isinstance(STRATEGIES.build("fedbrats.federated.server.aggregation.WeightedAverage", {}), WeightedAverage)
    with pytest.raises(ValueError, match="subprocess.Popen"):
        STRATEGIES.build("subprocess.Popen", {"args": ["true"]})


def test_registry_rejects_malformed_registration() -> None:
    registry: Registry[torch.nn.Module] = Registry("network", torch.nn.Module, {})
    with pytest.raises(ValueError, match="module.Class"):
        registry.register("x", "nodots")
