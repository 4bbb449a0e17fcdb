"""Tests of inference on a new patient (fedbrats.evaluation.predict) and model export (...export)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
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
from fedbrats.evaluation.bundle import SCHEMA_URL, check_config_targets
from fedbrats.evaluation.evaluate import evaluate_combinations, load_model, recorded_preprocessing
from fedbrats.evaluation.export import export_model, training_data_from_sites
from fedbrats.evaluation.predict import predict_case, regions_to_labels, write_segmentation
from fedbrats.networks import build_network, model_spec
from fedbrats.runs import load_state_dict

ROI = (16, 16, 16)
#: MONAI's bundle metadata schema (SCHEMA_URL), kept here because verifying would download it (see tests/data/).
SCHEMA_COPY = Path(__file__).parent / "data" / "meta_schema_20240725.json"


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


def write_run(root: Path, net: nn.Module, data: dict | None = None) -> Path:
    """A run folder as a federated job leaves it: the spec, the best global model and the job's site configuration
    (``data``: its data options; ``None`` writes no configuration, as for a bare checkpoint)."""
    run = root / "run"
    (run / "app_server" / "config").mkdir(parents=True)
    (run / "model_spec.json").write_text(json.dumps(model_spec(net)))
    torch.save({"model": net.state_dict()}, run / "app_server" / "best_FL_global_model.pt")
    if data is not None:
        executor = {"path": "fedbrats.federated.client.executor.FedBratsExecutor", "args": {"training": {"data": data}}}
        config = {"format_version": 2, "executors": [{"tasks": ["train"], "executor": executor}]}
        (run / "app_server" / "config" / "config_fed_client.json").write_text(json.dumps(config))
    return run


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A run folder with an untrained SegResNet trained on 16^3 crops at zoom 0.5, and its export."""
    root = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    net = build_network("segresnet", init_filters=8)
    run = write_run(root, net, {"roi_size": list(ROI), "zoom": 0.5})
    out = export_model(
        str(run),
        str(root / "exported"),
        description="test model",
        training_data={"sites": {"site-1": {"modalities": list(MODALITIES), "num_training": 1}}},
        metrics={"mean_dice": 0.5},
    )
    return {"net": net.eval(), "run": run, "dir": Path(out)}


def random_case(folder: Path, given: tuple[str, ...], seed: int = 0) -> dict[str, str]:
    """A new patient: random intensities inside a box of an odd-sized volume, an oblique-free but non-trivial
    affine (anisotropic voxels, an origin), one file per given sequence."""
    rng = np.random.default_rng(seed)
    affine = np.diag([1.2, 1.0, 1.5, 1.0])
    affine[:3, 3] = [5.0, -3.0, 2.0]
    head = np.zeros((30, 26, 22), dtype=np.float32)
    head[4:25, 3:22, 2:19] = rng.uniform(1, 100, (21, 19, 17))
    paths = {}
    for i, modality in enumerate(given):
        path = folder / f"patient_{modality}.nii.gz"
        nib.save(nib.Nifti1Image(head * (1.0 + i), affine), str(path))
        paths[modality] = str(path)
    return paths


# ---- export: a MONAI bundle -------------------------------------------------------------------------------
def test_export_writes_a_monai_bundle(exported: dict) -> None:
    folder = exported["dir"]
    for name in ("configs/metadata.json", "configs/inference.json", "models/model.pt", "models/model.ts"):
        assert (folder / name).is_file(), name
    assert "monai.bundle run" in (folder / "docs" / "README.md").read_text()
    state = torch.load(folder / "models" / "model.pt", map_location="cpu", weights_only=True)
    assert set(state) == set(exported["net"].state_dict())  # a bare state dict
    meta = json.loads((folder / "configs" / "metadata.json").read_text())
    assert meta["schema"] == SCHEMA_URL
    assert meta["version"] == fedbrats.__version__ and meta["description"] == "test model"
    assert meta["model_spec"] == model_spec(exported["net"])
    assert meta["model_file"] == "models/model.pt"
    fmt = meta["network_data_format"]
    assert list(fmt["inputs"]) == ["image", "modality_mask"]  # forward(image, modality_mask), in that order
    image = fmt["inputs"]["image"]
    assert image["num_channels"] == 4 and list(image["channel_def"].values()) == ["T1", "T1ce", "T2", "FLAIR"]
    assert image["spatial_shape"] == list(ROI)
    assert fmt["inputs"]["modality_mask"]["value_range"] == [0, 1]
    pred = fmt["outputs"]["pred"]
    assert pred["num_channels"] == 3 and list(pred["channel_def"].values()) == list(REGIONS)
    assert meta["label_conventions"]["brats2018"]["ET"] == 4 and meta["label_conventions"]["brats2023"]["ET"] == 3
    assert meta["training_data"]["sites"]["site-1"]["num_training"] == 1
    assert meta["metrics"] == {"mean_dice": 0.5} and meta["references"]


def test_export_reads_the_training_preprocessing_from_the_run(exported: dict, tmp_path: Path) -> None:
    """The run trained at zoom 0.5 on 16^3 crops: the bundle says so without being told."""
    folder = exported["dir"]
    meta = json.loads((folder / "configs" / "metadata.json").read_text())
    pre = meta["preprocessing"]
    assert pre["zoom"] == 0.5 and pre["roi_size"] == list(ROI)
    assert pre["read_from"].endswith("config_fed_client.json")
    inference = json.loads((folder / "configs" / "inference.json").read_text())
    steps = {step["_target_"]: step for step in inference["preprocessing"]["transforms"]}
    assert steps["monai.transforms.Zoomd"]["zoom"] == 0.5
    assert steps["monai.transforms.NormalizeIntensityd"]["nonzero"] is True
    assert inference["inferer"]["roi_size"] == list(ROI)
    assert recorded_preprocessing(str(folder))["zoom"] == 0.5  # predict and evaluate read it back
    assert recorded_preprocessing(str(exported["run"]))["roi_size"] == ROI
    with pytest.raises(ValueError, match="config_fed_client.json"):
        export_model(str(exported["run"]), str(tmp_path / "x"), zoom=1.0)  # contradicts the run


def test_export_of_a_bare_checkpoint_needs_its_preprocessing(tmp_path: Path) -> None:
    run = write_run(tmp_path, build_network("segresnet", init_filters=8), data=None)
    with pytest.raises(ValueError, match="--zoom"):
        export_model(str(run), str(tmp_path / "a"))
    out = export_model(str(run), str(tmp_path / "b"), roi_size=ROI, zoom=1.0)
    assert (Path(out) / "models" / "model.ts").is_file()
    export_model(str(run), out, roi_size=ROI, zoom=1.0, torchscript=False, overwrite=True)
    meta = json.loads((Path(out) / "configs" / "metadata.json").read_text())
    assert meta["preprocessing"]["read_from"] == "given by the user"
    # The earlier export's TorchScript would contradict the new weights: it is gone.
    assert meta["torchscript"]["file"] is None and not (Path(out) / "models" / "model.ts").exists()


def test_bundle_metadata_passes_monai_verification(exported: dict, tmp_path: Path) -> None:
    """MONAI's own check against its schema (the vendored copy of SCHEMA_URL: verification would download it)."""
    pytest.importorskip("jsonschema")
    from monai.bundle import verify_metadata

    meta_file = exported["dir"] / "configs" / "metadata.json"
    verify_metadata(meta_file=str(meta_file), filepath=str(SCHEMA_COPY))
    broken = json.loads(meta_file.read_text())
    del broken["network_data_format"]["inputs"]["image"]["num_channels"]
    (tmp_path / "metadata.json").write_text(json.dumps(broken))
    with pytest.raises(ValueError, match="num_channels"):
        verify_metadata(meta_file=str(tmp_path / "metadata.json"), filepath=str(SCHEMA_COPY))


@pytest.mark.parametrize("given", [("flair",), ("t1", "t2"), MODALITIES])
def test_bundle_segments_a_new_patient(exported: dict, tmp_path: Path, given: tuple[str, ...]) -> None:
    """`monai.bundle run` on random NIfTI cases: a label map on the input's grid, the same as `predict`'s."""
    pytest.importorskip("ignite")
    from monai.bundle import run

    paths = random_case(tmp_path, given)
    folder = exported["dir"]
    out_dir = tmp_path / "out"
    run(
        config_file=str(folder / "configs" / "inference.json"),
        bundle_root=str(folder),
        output_dir=str(out_dir),
        **paths,
    )
    written = sorted(out_dir.glob("*.nii.gz"))
    assert [p.name for p in written] == [f"patient_{given[0]}_seg.nii.gz"]
    seg, ref = nib.load(str(written[0])), nib.load(paths[given[0]])
    assert seg.shape == ref.shape and np.allclose(seg.affine, ref.affine)
    assert seg.get_data_dtype() == np.uint8
    labels = np.asarray(seg.dataobj)
    assert set(np.unique(labels).tolist()) <= {0, 1, 2, 4}
    expected, _, _ = predict_case(exported["net"], paths, roi_size=ROI, zoom=0.5, precision="fp32")
    assert expected.any() and np.array_equal(labels, expected)  # one preprocessing definition


def test_bundle_cli_with_the_2023_convention(exported: dict, tmp_path: Path) -> None:
    """The command a user types (`python -m monai.bundle run`, which needs `fire`)."""
    pytest.importorskip("fire")
    pytest.importorskip("ignite")
    paths = random_case(tmp_path, ("t1ce", "flair"))
    folder = exported["dir"]
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(folder / "configs" / "inference.json")]
    cmd += ["--bundle_root", str(folder), "--output_dir", str(tmp_path / "out"), "--convention", "brats2023"]
    cmd += [arg for m, p in paths.items() for arg in (f"--{m}", p)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    seg = nib.load(str(tmp_path / "out" / "patient_t1ce_seg.nii.gz"))
    expected, _, _ = predict_case(
        exported["net"], paths, roi_size=ROI, zoom=0.5, precision="fp32", convention="brats2023"
    )
    assert np.array_equal(np.asarray(seg.dataobj), expected)
    assert set(np.unique(expected).tolist()) <= {0, 1, 2, 3}


def test_torchscript_where_tracing_reproduces_the_network(exported: dict, tmp_path: Path) -> None:
    traced = torch.jit.load(str(exported["dir"] / "models" / "model.ts"))
    x, mask = torch.randn(1, 4, 24, 16, 16), torch.tensor([[0.0, 1.0, 0.0, 1.0]])
    with torch.no_grad():
        assert torch.allclose(traced(x, mask), exported["net"](x, mask), atol=1e-4)
    # The modality-aware network skips absent sequences' encoders: a trace cannot record that, so no .ts.
    run = write_run(tmp_path, build_network("modality_aware", init_filters=8), {"roi_size": list(ROI)})
    out = Path(export_model(str(run), str(tmp_path / "ma")))
    meta = json.loads((out / "configs" / "metadata.json").read_text())
    assert meta["torchscript"]["file"] is None and "absent sequences" in meta["torchscript"]["why_not"]
    assert not (out / "models" / "model.ts").exists()


def test_bundle_config_names_only_registered_classes(exported: dict) -> None:
    config = json.loads((exported["dir"] / "configs" / "inference.json").read_text())
    check_config_targets(config)  # what export wrote passes
    targets = json.dumps(config)
    assert "fedbrats.data.transforms.LoadBraTSCased" in targets and "monai.transforms.Invertd" in targets
    with pytest.raises(ValueError, match="deploy.kits.run_cli"):
        check_config_targets({**config, "gadget": {"_target_": "deploy.kits.run_cli", "args": ["true"]}})
    bad_net = {**config["network_def"], "init_filters": "$__import__('os').getcwd()"}
    with pytest.raises(ValueError, match="init_filters"):
        check_config_targets({**config, "network_def": bad_net})


def test_load_model_from_exported_folder(exported: dict) -> None:
    x = torch.randn(1, 4, 16, 16, 16)
    expected = exported["net"](x)
    for source in (exported["dir"], exported["dir"] / "models" / "model.pt"):
        assert torch.allclose(load_model(str(source))(x), expected)
    assert set(load_state_dict(str(exported["dir"] / "models" / "model.pt"))) == set(exported["net"].state_dict())


def test_export_condenses_results_and_reads_sites(federation: dict, exported: dict, tmp_path: Path) -> None:
    results = evaluate_combinations(ForegroundNet(), federation["test"], data={"roi_size": ROI}, max_cases=1)
    training = training_data_from_sites(federation["sites"])
    assert "central" not in training["sites"] and training["sites"]["site-4"]["modalities"] == ["t1"]
    out = export_model(
        str(exported["run"]), str(tmp_path / "m"), metrics=results, training_data=training, torchscript=False
    )
    meta = json.loads((Path(out) / "configs" / "metadata.json").read_text())
    assert meta["metrics"]["num_test_cases"] == 1
    assert len(meta["metrics"]["mean_dice_per_combination"]) == 15
    assert "per_case" not in json.dumps(meta["metrics"])
    assert set(meta["eval_metrics"]) == {"mean_dice_15_combinations", "mean_dice_all4"}
    assert meta["training_data"]["num_training_cases"] == training["num_training_cases"]
    with pytest.raises(ValueError, match="site-9"):
        training_data_from_sites(federation["sites"], ["site-9"])


def test_export_cli(federation: dict, exported: dict, tmp_path: Path) -> None:
    out = tmp_path / "cli"
    argv = ["--run-dir", str(exported["run"]), "--out-dir", str(out), "--description", "d", "--no-torchscript"]
    assert export_cli.main([*argv, "--sites", federation["sites"], "--site", "site-1"]) == 0
    meta = json.loads((out / "configs" / "metadata.json").read_text())
    assert meta["preprocessing"]["roi_size"] == list(ROI) and meta["preprocessing"]["zoom"] == 0.5
    assert list(meta["training_data"]["sites"]) == ["site-1"]
    assert export_cli.main(["--checkpoint", str(tmp_path / "none.pt"), "--out-dir", str(out)]) == 1
    assert export_cli.main([*argv, "--overwrite", "--zoom", "1"]) == 1  # the run trained at 0.5


# ---- one preprocessing definition ----------------------------------------------------------------------
def test_inference_preprocessing_is_the_validation_preprocessing(federation: dict) -> None:
    """A new patient's sequences go through exactly what the model saw in validation during training."""
    from monai.transforms import Compose

    from fedbrats.data.loader import DataConfig, eval_transforms, inference_steps
    from fedbrats.data.transforms import LoadBraTSCase

    given = ("t2", "flair")
    entry = {"image": [federation["paths"][m] if m in given else None for m in MODALITIES], "case_id": "c"}
    cfg = DataConfig(roi_size=ROI, zoom=0.5)
    validation = eval_transforms(given, "brats2018", cfg)(entry)
    inference = Compose([step.build() for step in inference_steps(cfg.zoom)])(entry)
    assert torch.equal(torch.as_tensor(inference["image"]), torch.as_tensor(validation["image"]))
    assert inference["modality_mask"].tolist() == [0.0, 0.0, 1.0, 1.0]  # from the paths given
    ops = [op["class"] for op in inference["image"].applied_operations]
    assert ops == ["CropForeground", "Zoom", "DivisiblePad"]  # what Invertd undoes
    assert inference["image"].meta["filename_or_obj"] == federation["paths"]["t2"]
    with pytest.raises(ValueError, match="no sequence given"):
        LoadBraTSCase(None)([None] * len(MODALITIES), None, "empty")


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
