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
        "path": "deploy.kits.run_cli",
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
    with pytest.raises(ValueError, match="deploy.kits.run_cli"):
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
    register_network("test_not_a_module", "deploy.kits.run_cli")
    with pytest.raises(ValueError, match="not a torch.nn.modules.module.Module"):
        build_network("test_not_a_module", args=["true"], env={}, what="x")


def test_build_method_refuses_unregistered_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A job's method name that is a dotted path outside the registry is never imported."""
    with pytest.raises(ValueError, match="deploy.kits.run_cli"):
        build_method("deploy.kits.run_cli", args=["touch", str(tmp_path / "x")], env={}, what="x")
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


# ---- item 2: an exported model.pt is checked against its recorded sha256 -------------------------------------
@pytest.fixture
def exported_model(tmp_path: Path) -> Path:
    from fedbrats.evaluation.export import export_model

    run = tmp_path / "run"
    (run / "app_server").mkdir(parents=True)
    net = build_network("segresnet", init_filters=8)
    (run / "model_spec.json").write_text(json.dumps(model_spec(net)))
    torch.save({"model": net.state_dict()}, run / "app_server" / "best_FL_global_model.pt")
    return Path(export_model(str(run), str(tmp_path / "exported"), roi_size=(16, 16, 16), zoom=1.0))


def test_replaced_model_is_refused(exported_model: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A zeroed model.pt (same names and shapes, so it loads) is refused by predict unless the check is skipped."""
    from fedbrats.evaluation.evaluate import load_model

    state = torch.load(exported_model / "models" / "model.pt", weights_only=True)
    torch.save({k: torch.zeros_like(v) for k, v in state.items()}, exported_model / "models" / "model.pt")
    flair = _tiny_image(tmp_path / "p_flair.nii.gz")
    out = tmp_path / "seg.nii.gz"
    argv = ["--model", str(exported_model), "--flair", flair, "--out", str(out), "--device", "cpu"]
    assert predict_cli.main(argv) == 1
    assert "model_sha256" in caplog.text and "model.pt" in caplog.text
    assert not out.exists()
    with pytest.raises(ValueError, match="replaced or damaged"):
        load_model(str(exported_model))
    assert predict_cli.main([*argv, "--skip-integrity-check"]) == 0
    assert out.exists()


def test_intact_export_loads(exported_model: Path) -> None:
    from fedbrats.evaluation.evaluate import load_model
    from fedbrats.runs import verify_exported_model

    assert verify_exported_model(str(exported_model / "models" / "model.pt")) is True
    assert isinstance(load_model(str(exported_model)), torch.nn.Module)


# ---- item 4: no advice to load a file of unknown origin with weights_only=False -------------------------------
class _Pickled:
    """Stands for any object a weights-only load refuses."""


@pytest.mark.parametrize("content", ["object", "garbage"])
def test_failed_load_never_advises_weights_only_false(tmp_path: Path, content: str) -> None:
    from fedbrats.runs import load_state_dict

    path = tmp_path / "model.pt"
    if content == "object":
        torch.save({"model": _Pickled()}, path)
    else:
        path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError) as info:
        load_state_dict(str(path))
    message = str(info.value)
    assert str(path) in message and "refused" in message
    assert "weights_only=False" not in message and "set to `False`" not in message
    assert "will likely succeed" not in message
    if content == "object":
        assert "_Pickled" in message  # the reason stays


# ---- item 3: PoC and provisioning secrets are private to the user ----------------------------------------------
def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_poc_default_workspace_is_per_user_and_private(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import os

    from deploy import poc
    from deploy.secrets import make_private_dir

    seen: dict[str, str] = {}
    monkeypatch.setattr(poc, "run_from_args", lambda cls, args: seen.setdefault("workspace", args.workspace) and 0)
    poc.main([])
    assert seen["workspace"].endswith(f"fedbrats_poc-{os.getuid()}")
    # an existing, world-readable workspace is taken over as 0700
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    os.chmod(shared, 0o755)
    make_private_dir(str(shared))
    assert _mode(shared) == 0o700
    assert _mode(Path(make_private_dir(str(tmp_path / "new" / "ws")))) == 0o700


def test_private_dir_refuses_a_link(tmp_path: Path) -> None:
    from deploy.processes import DeploymentError
    from deploy.secrets import make_private_dir

    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(DeploymentError, match="link"):
        make_private_dir(str(tmp_path / "link"))


def test_provisioned_root_ca_and_keys_are_private(tmp_path: Path) -> None:
    """NVFlare writes state/cert.json (root CA private key) 0644; after provisioning it is 0600, state/ 0700."""
    from deploy.kits import provision
    from deploy.project import PROJECT_FILE

    kits = provision(str(PROJECT_FILE), str(tmp_path / "prov"))
    cert = next((tmp_path / "prov").rglob("state/cert.json"))
    assert _mode(cert) == 0o600 and _mode(cert.parent) == 0o700
    keys = list(Path(kits.prod_dir).rglob("*.key"))
    assert keys and all(_mode(k) == 0o600 for k in keys)


def test_poc_workspace_keys_are_private(tmp_path: Path) -> None:
    """`nvflare poc prepare` output (no process started): workspace 0700, root CA and keys 0600."""
    from deploy.poc import PocDeployment

    deployment = PocDeployment(str(tmp_path / "ws"), 2)
    deployment._setup()
    deployment.prepare(deployment._localized_project())
    assert _mode(tmp_path / "ws") == 0o700
    cert = next((tmp_path / "ws" / "poc").rglob("state/cert.json"))
    assert _mode(cert) == 0o600
    keys = list((tmp_path / "ws" / "poc").rglob("*.key"))
    assert keys and all(_mode(k) == 0o600 for k in keys)
