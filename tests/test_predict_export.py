"""Tests of inference on a new patient (fedbrats.evaluation.predict) and model export (...export)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

import fedbrats
from fedbrats.constants import MODALITIES, REGIONS
from fedbrats.data.federation import make_synthetic_federation
from fedbrats.evaluation import export as export_cli
from fedbrats.evaluation import predict as predict_cli
from fedbrats.evaluation.evaluate import evaluate_combinations, load_model, load_state_dict
from fedbrats.evaluation.export import export_model, training_data_from_sites
from fedbrats.evaluation.predict import predict_case, regions_to_labels, write_segmentation
from fedbrats.networks import build_network, model_spec

ROI = (16, 16, 16)


class ForegroundNet(nn.Module):
    """Deterministic stub: WT wherever a given sequence is non-zero, TC/ET where the inputs are brighter.

    The WT prediction is then exactly the foreground of the given sequences, which shows whether the
    prediction went back to the right voxels of the original grid.
    """

    def forward(self, x: torch.Tensor, modality_mask: torch.Tensor) -> torch.Tensor:
        nonzero = (x != 0).any(1, keepdim=True).float()
        level = x.sum(1, keepdim=True)
        wt = 20.0 * nonzero - 10.0
        tc = torch.where(nonzero > 0, level - 0.0, torch.full_like(level, -10.0))
        et = torch.where(nonzero > 0, level - 1.0, torch.full_like(level, -10.0))
        return torch.cat([wt, tc, et], 1)


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("federation")
    sites = make_synthetic_federation(str(out), cases_per_site=3, size=16)
    with open(sites, encoding="utf-8") as f:
        test = json.load(f)["test_datalist"]
    with open(test, encoding="utf-8") as f:
        case = json.load(f)["test"][0]
    return {"sites": sites, "test": test, "paths": dict(zip(MODALITIES, case["image"]))}


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A run-dir-like folder with an untrained SegResNet, and its export."""
    root = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    net = build_network("segresnet", init_filters=8)
    run = root / "run"
    (run / "app_server").mkdir(parents=True)
    (run / "model_spec.json").write_text(json.dumps(model_spec(net)))
    torch.save({"model": net.state_dict()}, run / "app_server" / "best_FL_global_model.pt")
    out = export_model(
        str(run),
        str(root / "exported"),
        description="test model",
        training_data={"sites": {"site-1": {"modalities": list(MODALITIES), "num_training": 1}}},
        roi_size=ROI,
        zoom=1.0,
        metrics={"mean_dice": 0.5},
    )
    return {"net": net.eval(), "run": run, "dir": Path(out)}


# ---- export -----------------------------------------------------------------------------------------------
def test_export_writes_weights_and_metadata(exported: dict) -> None:
    folder = exported["dir"]
    state = torch.load(folder / "model.pt", map_location="cpu", weights_only=True)
    assert set(state) == set(exported["net"].state_dict())  # a bare state dict
    meta = json.loads((folder / "metadata.json").read_text())
    for key in ("name", "version", "created", "model_spec", "inputs", "outputs", "training_data", "metrics"):
        assert key in meta
    assert meta["version"] == fedbrats.__version__
    assert meta["description"] == "test model"
    assert meta["model_spec"] == model_spec(exported["net"])
    image = meta["inputs"]["image"]
    assert image["num_channels"] == 4 and image["channels"] == list(MODALITIES)
    assert image["roi_size"] == list(ROI) and image["zoom"] == 1.0
    assert "z-score" in image["preprocessing"] and image["spatial"] == "multiple of 8"
    pred = meta["outputs"]["pred"]
    assert pred["num_channels"] == 3 and pred["channels"] == list(REGIONS)
    assert pred["activation"] == "sigmoid" and pred["threshold"] == 0.5
    assert pred["label_conventions"]["brats2018"]["ET"] == 4
    assert pred["label_conventions"]["brats2023"]["ET"] == 3
    assert meta["training_data"]["sites"]["site-1"]["num_training"] == 1
    assert meta["metrics"] == {"mean_dice": 0.5}
    assert meta["references"]


def test_load_model_from_exported_folder(exported: dict) -> None:
    x = torch.randn(1, 4, 16, 16, 16)
    expected = exported["net"](x)
    for source in (exported["dir"], exported["dir"] / "model.pt"):
        assert torch.allclose(load_model(str(source))(x), expected)
    assert set(load_state_dict(str(exported["dir"] / "model.pt"))) == set(exported["net"].state_dict())


def test_export_condenses_results_and_reads_sites(federation: dict, exported: dict, tmp_path: Path) -> None:
    results = evaluate_combinations(ForegroundNet(), federation["test"], data={"roi_size": ROI}, max_cases=1)
    training = training_data_from_sites(federation["sites"])
    assert "central" not in training["sites"] and training["sites"]["site-4"]["modalities"] == ["t1"]
    out = export_model(str(exported["run"]), str(tmp_path / "m"), metrics=results, training_data=training)
    meta = json.loads((Path(out) / "metadata.json").read_text())
    assert meta["metrics"]["num_test_cases"] == 1
    assert len(meta["metrics"]["mean_dice_per_combination"]) == 15
    assert "per_case" not in json.dumps(meta["metrics"])
    assert meta["training_data"]["num_training_cases"] == training["num_training_cases"]
    with pytest.raises(ValueError, match="site-9"):
        training_data_from_sites(federation["sites"], ["site-9"])


def test_export_cli(federation: dict, exported: dict, tmp_path: Path) -> None:
    out = tmp_path / "cli"
    argv = ["--run-dir", str(exported["run"]), "--out-dir", str(out), "--description", "d", "--roi-size", "16"]
    assert export_cli.main([*argv, "--sites", federation["sites"], "--site", "site-1"]) == 0
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["inputs"]["image"]["roi_size"] == [16, 16, 16]
    assert list(meta["training_data"]["sites"]) == ["site-1"]
    assert export_cli.main(["--checkpoint", str(tmp_path / "none.pt"), "--out-dir", str(out)]) == 1


# ---- predict ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("given", [("t1",), ("t2", "flair"), MODALITIES])
def test_predict_keeps_the_input_grid(federation: dict, tmp_path: Path, given: tuple[str, ...]) -> None:
    paths = {m: federation["paths"][m] for m in given}
    labels, affine, header = predict_case(ForegroundNet(), paths, roi_size=ROI)
    out = write_segmentation(labels, affine, header, str(tmp_path / "seg.nii.gz"))
    seg, ref = nib.load(out), nib.load(paths[given[0]])
    assert seg.shape == ref.shape
    assert np.allclose(seg.affine, ref.affine)
    assert seg.get_data_dtype() == np.uint8
    values = np.asarray(seg.dataobj)
    assert set(np.unique(values).tolist()) <= {0, 1, 2, 4}
    # The stub predicts tumour exactly on the given sequences' non-zero voxels: the crop was undone exactly.
    foreground = np.any([np.asarray(nib.load(paths[m]).dataobj) > 0 for m in given], axis=0)
    assert np.array_equal(values > 0, foreground)


def test_predict_with_real_networks_and_zoom(federation: dict, exported: dict) -> None:
    paths = {m: federation["paths"][m] for m in ("t1", "flair")}
    shape = nib.load(paths["t1"]).shape
    for net in (exported["net"], build_network("modality_aware", init_filters=8)):
        for zoom in (1.0, 0.5):
            labels, _, _ = predict_case(net, paths, roi_size=ROI, zoom=zoom)
            assert labels.shape == shape and labels.dtype == np.uint8
            assert set(np.unique(labels).tolist()) <= {0, 1, 2, 4}


def test_brats2023_convention_uses_3_for_et(federation: dict) -> None:
    labels, _, _ = predict_case(ForegroundNet(), federation["paths"], roi_size=ROI, convention="brats2023")
    found = set(np.unique(labels).tolist())
    assert 3 in found and 4 not in found and found <= {0, 1, 2, 3}
    labels_2018, _, _ = predict_case(ForegroundNet(), federation["paths"], roi_size=ROI)
    assert np.array_equal(labels_2018 == 4, labels == 3)


def test_regions_to_labels_nesting() -> None:
    regions = np.zeros((3, 4), dtype=np.uint8)
    regions[0, 1:] = 1  # WT
    regions[1, 2:] = 1  # TC
    regions[2, 3:] = 1  # ET
    assert regions_to_labels(regions).tolist() == [0, 2, 1, 4]
    assert regions_to_labels(regions, "brats2023").tolist() == [0, 2, 1, 3]
    with pytest.raises(ValueError, match="convention"):
        regions_to_labels(regions, "brats2099")


def test_predict_errors_name_the_file(federation: dict, tmp_path: Path) -> None:
    net = ForegroundNet()
    with pytest.raises(ValueError, match="at least one sequence"):
        predict_case(net, {})
    with pytest.raises(ValueError, match="dwi"):
        predict_case(net, {"dwi": federation["paths"]["t1"]})
    missing = str(tmp_path / "missing_t2.nii.gz")
    with pytest.raises(ValueError, match="missing_t2.nii.gz"):
        predict_case(net, {"t1": federation["paths"]["t1"], "t2": missing})
    other = tmp_path / "small_flair.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((8, 8, 8), dtype=np.float32), np.eye(4)), str(other))
    with pytest.raises(ValueError, match="small_flair.nii.gz") as info:
        predict_case(net, {"t1": federation["paths"]["t1"], "flair": str(other)}, roi_size=ROI)
    assert "shape" in str(info.value)
    with pytest.raises(ValueError, match="nii"):
        write_segmentation(np.zeros((2, 2, 2), np.uint8), np.eye(4), None, str(tmp_path / "seg.png"))


def test_predict_cli(federation: dict, exported: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "pred" / "seg.nii.gz"
    paths = federation["paths"]
    argv = ["--model", str(exported["dir"]), "--t1", paths["t1"], "--flair", paths["flair"], "--out", str(out)]
    assert predict_cli.main([*argv, "--convention", "brats2023", "--device", "cpu"]) == 0
    seg = nib.load(str(out))
    assert seg.shape == nib.load(paths["t1"]).shape
    assert set(np.unique(np.asarray(seg.dataobj)).tolist()) <= {0, 1, 2, 3}
    caplog.set_level(logging.ERROR)
    assert predict_cli.main(["--model", str(exported["dir"]), "--out", str(out)]) == 1
    assert "at least one sequence" in caplog.text
    missing = str(tmp_path / "nope_t1ce.nii.gz")
    assert predict_cli.main(["--model", str(exported["dir"]), "--t1ce", missing, "--out", str(out)]) == 1
    assert "nope_t1ce.nii.gz" in caplog.text
