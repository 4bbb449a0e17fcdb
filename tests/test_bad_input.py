"""Bad input and silent wrong results of issue 13: each is refused or named, before anything is damaged."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import pytest


# ---- item 5: FEDBRATS_SITE_CONFIG is honoured by simulate, compare and evaluate -----------------------------
def test_simulate_uses_the_exported_site_config(
    real_named_federation: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from fedbrats import simulate as sim

    sites = real_named_federation
    monkeypatch.setenv("FEDBRATS_SITE_CONFIG", str(sites))
    seen: dict[str, Any] = {}

    def fake_run(cmd: list[str], env: dict[str, str], *args: Any, **kwargs: Any) -> int:
        seen.update(cmd=cmd, env=env)
        return 1

    monkeypatch.setattr(sim, "_run_simulator", fake_run)
    caplog.set_level(logging.INFO)
    with pytest.raises(RuntimeError):
        sim.simulate("fedavg", str(tmp_path / "ws"), num_rounds=1)
    assert seen["cmd"][seen["cmd"].index("-c") + 1] == "CBICA,TCIA"
    assert seen["env"]["FEDBRATS_SITE_CONFIG"] == str(sites)
    assert f"uses {sites} (from FEDBRATS_SITE_CONFIG): sites CBICA, TCIA" in caplog.text


def test_compare_and_evaluate_use_the_exported_site_config(
    real_named_federation: Path, tiny_federation: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from experiments import compare
    from fedbrats.evaluation.evaluate import default_test_datalist

    sites = real_named_federation
    monkeypatch.setenv("FEDBRATS_SITE_CONFIG", str(sites))
    assert default_test_datalist() == json.loads(sites.read_text())["test_datalist"]
    seen: dict[str, Any] = {}

    def fake_experiment(name: str, workspace: str, sites_file: str, *args: Any, **kwargs: Any) -> dict:
        seen["sites_file"] = sites_file
        raise RuntimeError("stop here")

    monkeypatch.setattr(compare, "run_experiment", fake_experiment)
    with pytest.raises(RuntimeError, match="stop here"):
        compare.main(["--workspace", str(tmp_path / "w"), "--out-dir", str(tmp_path / "o"), "--experiments", "fedavg"])
    assert seen["sites_file"] == str(sites)
    # an explicit --sites still wins over the variable
    from fedbrats.data.site_config import federation_sites_file

    assert federation_sites_file(tiny_federation) == os.path.abspath(tiny_federation)


def test_missing_exported_site_config_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fedbrats.data.site_config import federation_sites_file

    monkeypatch.setenv("FEDBRATS_SITE_CONFIG", str(tmp_path / "nope.json"))
    with pytest.raises(ValueError, match="nope.json.*FEDBRATS_SITE_CONFIG"):
        federation_sites_file(None)


# ---- items 6-8: predict's output, a label map as input, the label convention of 2023 names ------------------
@pytest.fixture(scope="module")
def model_dir(exported_segresnet: str) -> str:
    return exported_segresnet


def _volume(path: Path, labels: bool = False) -> str:
    import nibabel as nib
    import numpy as np

    data = np.zeros((16, 16, 16), dtype=np.float32)
    if labels:
        data[4:8, 4:8, 4:8], data[8:12, 8:12, 8:12] = 2, 4
    else:
        data[2:14, 2:14, 2:14] = np.random.default_rng(0).uniform(1, 100, (12, 12, 12))
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))
    return str(path)


def test_predict_refuses_to_write_over_its_input(model_dir: str, tmp_path: Path) -> None:
    flair = _volume(tmp_path / "p_flair.nii.gz")
    before = Path(flair).read_bytes()
    for overwrite in ([], ["--overwrite"]):
        argv = ["--model", model_dir, "--flair", flair, "--out", flair, "--device", "cpu", *overwrite]
        assert predict_module().main(argv) == 1
    assert Path(flair).read_bytes() == before, "the patient's FLAIR was replaced"


def test_predict_refuses_an_existing_output_unless_overwrite(
    model_dir: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    predict = predict_module()
    flair = _volume(tmp_path / "p_flair.nii.gz")
    truth = tmp_path / "p_seg.nii.gz"
    truth.write_bytes(b"ground truth")
    # the output is checked before the model is even loaded
    monkeypatch.setattr(predict, "load_model", lambda *a, **k: pytest.fail("model loaded before the output check"))
    argv = ["--model", model_dir, "--flair", flair, "--out", str(truth), "--device", "cpu"]
    assert predict.main(argv) == 1
    assert "already exists" in caplog.text and "--overwrite" in caplog.text
    assert truth.read_bytes() == b"ground truth"
    monkeypatch.undo()
    assert predict.main([*argv, "--overwrite"]) == 0
    assert truth.read_bytes() != b"ground truth"


def test_predict_refuses_a_segmentation_given_as_a_sequence(
    model_dir: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    seg = _volume(tmp_path / "x_seg.nii.gz", labels=True)
    out = tmp_path / "out.nii.gz"
    assert predict_module().main(["--model", model_dir, "--flair", seg, "--out", str(out), "--device", "cpu"]) == 1
    assert "looks like a segmentation" in caplog.text and "x_seg.nii.gz" in caplog.text
    assert not out.exists()


def test_predict_infers_the_2023_convention_from_names(
    model_dir: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from fedbrats.evaluation.predict import infer_convention

    caplog.set_level(logging.INFO)
    t2f = _volume(tmp_path / "BraTS-GLI-00001-000-t2f.nii.gz")
    out = tmp_path / "seg.nii.gz"
    assert predict_module().main(["--model", model_dir, "--flair", t2f, "--out", str(out), "--device", "cpu"]) == 0
    assert "label convention brats2023 (ET=3), inferred from the input file names" in caplog.text
    import nibabel as nib
    import numpy as np

    assert set(np.unique(np.asarray(nib.load(str(out)).dataobj)).tolist()) <= {0, 1, 2, 3}
    assert infer_convention({"t1": "/d/c_t1.nii.gz", "flair": "/d/c_flair.nii.gz"}) == "brats2018"
    assert infer_convention({"t1": "/d/c-t1n.nii.gz", "flair": "/d/c_flair.nii.gz"}) is None
    assert infer_convention({"t1": "/d/patient.nii.gz"}) is None


def predict_module() -> Any:
    from fedbrats.evaluation import predict

    return predict


# ---- item 15: --version and an unknown command ----------------------------------------------------------------
def test_cli_version_and_unknown_command(capsys: pytest.CaptureFixture[str]) -> None:
    import fedbrats
    from fedbrats.cli import main

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"fedbrats {fedbrats.__version__}"
    assert main(["bogus"]) == 2
    err = capsys.readouterr().err
    assert "'bogus' is not a command" in err and "usage: fedbrats" in err


# ---- item 14: unknown options are refused before the simulator starts -------------------------------------------
@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--set", "foo=1"], "foo"),
        (["--set", "method_args.rcl_wieght=0"], "rcl_wieght"),
        (["--set", "data.roi_szie=[16,16,16]"], "roi_szie"),
        (["--agg", "modality_awre=false"], "modality_awre"),
    ],
)
def test_simulate_rejects_unknown_options_before_starting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, argv: list[str], named: str
) -> None:
    from fedbrats import simulate as sim
    from fedbrats.cli import main

    monkeypatch.setattr(sim, "_run_simulator", lambda *a, **k: pytest.fail("the simulator was started"))
    assert main(["simulate", "fedkd", "--workspace", str(tmp_path), "--rounds", "1", *argv]) == 1
    assert named in caplog.text


def test_committed_jobs_pass_the_option_checks() -> None:
    from fedbrats.simulate import check_job_options

    jobs = Path(__file__).resolve().parents[1] / "jobs"
    for job in sorted(p for p in jobs.iterdir() if (p / "meta.json").is_file()):
        check_job_options(str(job))


# ---- item 13: one clear line naming the file or option -------------------------------------------------------
def test_cuda_device_without_gpu_is_one_clear_error(
    model_dir: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import torch

    from fedbrats.evaluation.evaluate import check_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="--device cuda: this machine has no usable CUDA GPU"):
        check_device("cuda")
    with pytest.raises(ValueError, match="not a torch device"):
        check_device("gpu0")
    flair = _volume(tmp_path / "p_flair.nii.gz")
    argv = ["--model", model_dir, "--flair", flair, "--out", str(tmp_path / "o.nii.gz"), "--device", "cuda"]
    assert predict_module().main(argv) == 1
    assert "no usable CUDA GPU" in caplog.text


@pytest.mark.parametrize("content", ["[1, 2]", '{"sites": ["CBICA"]}', "{not json"])
def test_malformed_sites_file_is_named(tmp_path: Path, content: str, caplog: pytest.LogCaptureFixture) -> None:
    from fedbrats.cli import main

    sites = tmp_path / "sites.json"
    sites.write_text(content)
    assert main(["simulate", "fedavg", "--workspace", str(tmp_path / "w"), "--sites", str(sites)]) == 1
    assert str(sites) in caplog.text
    assert main(["evaluate", "--model", str(tmp_path), "--sites", str(sites)]) == 1


def test_unreadable_sites_file_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fedbrats.data import site_config

    sites = tmp_path / "sites.json"
    sites.write_text("{}")

    def denied(path: str, *args: Any, **kwargs: Any) -> Any:
        raise PermissionError(13, "Permission denied", path)

    # A PermissionError whoever runs the test (root reads any file, so chmod alone proves nothing).
    monkeypatch.setattr(site_config, "open", denied, raising=False)
    with pytest.raises(ValueError, match=r"sites.json.*cannot be read.*Permission denied"):
        site_config.federation_sites_file(str(sites))
    with pytest.raises(ValueError, match=r"sites.json.*cannot be read.*Permission denied"):
        site_config.load_site_config(str(sites), "site-1")


@pytest.mark.parametrize("content", [[{"datalist": "x"}], {"sites": {"site-1": ["t1"]}}])
def test_site_config_of_the_wrong_shape_is_named(tmp_path: Path, content: Any) -> None:
    from fedbrats.data.site_config import load_site_config

    path = tmp_path / "site.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ValueError, match="site.json"):
        load_site_config(str(path), "site-1")


# ---- item 10: nothing a user made is replaced without --overwrite / --force ------------------------------------
def test_prepare_refuses_to_replace_a_federation(tmp_path: Path) -> None:
    from fedbrats.data.prepare import prepare
    from fedbrats.data.synthetic import generate_dataset

    data = tmp_path / "data"
    generate_dataset(str(data), 6, institutions=["SITEA", "SITEB"], size=16, seed=0)
    out = tmp_path / "lists"
    prepare(str(data), str(out), test_fraction=0.0, val_fraction=0.5, deep_validate=False)
    (out / "sites.json").write_text('{"edited": true}')
    with pytest.raises(ValueError, match=r"already holds .*sites.json.*--overwrite"):
        prepare(str(data), str(out), test_fraction=0.0, val_fraction=0.5, deep_validate=False)
    assert (out / "sites.json").read_text() == '{"edited": true}'
    prepare(str(data), str(out), test_fraction=0.0, val_fraction=0.5, deep_validate=False, overwrite=True)
    assert "sites" in json.loads((out / "sites.json").read_text())


def test_pool_sites_never_replaces_a_real_site_named_central(tiny_federation: str, tmp_path: Path) -> None:
    from fedbrats.cli import main

    manifest = json.loads(Path(tiny_federation).read_text())
    manifest["sites"]["central"] = dict(manifest["sites"]["site-1"])  # a hospital site that happens to be 'central'
    manifest["sites"]["central"].pop("pooled", None)
    manifest["test_datalist"] = os.path.join(os.path.dirname(tiny_federation), manifest["test_datalist"])
    for entry in manifest["sites"].values():
        entry["datalist"] = os.path.join(os.path.dirname(tiny_federation), entry["datalist"])
    path = tmp_path / "sites.json"
    path.write_text(json.dumps(manifest))
    assert main(["pool-sites", str(path)]) == 1
    assert json.loads(path.read_text())["sites"]["central"] == manifest["sites"]["central"]
    assert main(["pool-sites", str(path), "--force"]) == 0
    assert json.loads(path.read_text())["sites"]["central"]["pooled"] is True
    assert main(["pool-sites", str(path)]) == 0, "re-pooling a pool it made stays possible"


def test_make_jobs_refuses_to_revert_hand_edits(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from fedbrats.cli import main

    out = tmp_path / "jobs"
    assert main(["make-jobs", "--out-dir", str(out)]) == 0
    assert main(["make-jobs", "--out-dir", str(out)]) == 0, "an unchanged folder is rewritten without asking"
    config = out / "fedavg" / "app" / "config" / "config_fed_server.json"
    edited = json.loads(config.read_text())
    edited["workflows"][0]["args"]["num_rounds"] = 3
    config.write_text(json.dumps(edited))
    assert main(["make-jobs", "--out-dir", str(out)]) == 1
    assert str(config) in caplog.text and "--force" in caplog.text
    assert json.loads(config.read_text())["workflows"][0]["args"]["num_rounds"] == 3
    assert main(["make-jobs", "--out-dir", str(out), "--force"]) == 0
    assert json.loads(config.read_text())["workflows"][0]["args"]["num_rounds"] != 3


def test_export_refuses_an_existing_model_folder(model_dir: str, tmp_path: Path) -> None:
    from fedbrats.evaluation.export import export_model

    before = (Path(model_dir) / "configs" / "metadata.json").read_text()
    with pytest.raises(ValueError, match="already holds an exported model.*--overwrite"):
        export_model(model_dir, model_dir)
    assert (Path(model_dir) / "configs" / "metadata.json").read_text() == before
    target = tmp_path / "copy"
    export_model(model_dir, str(target))
    export_model(model_dir, str(target), overwrite=True, description="again")
    assert json.loads((target / "configs" / "metadata.json").read_text())["description"] == "again"


# ---- item 11: files follow the umask; a file the site may not read is named ------------------------------------
def test_prepare_respects_the_umask(tmp_path: Path) -> None:
    from fedbrats.data.prepare import prepare
    from fedbrats.data.synthetic import generate_dataset

    data = tmp_path / "data"
    generate_dataset(str(data), 4, institutions=["SITEA"], size=16, seed=0)
    old = os.umask(0o027)
    try:
        prepare(str(data), str(tmp_path / "lists"), test_fraction=0.0, val_fraction=0.5, deep_validate=False)
    finally:
        os.umask(old)
    written = sorted((tmp_path / "lists").glob("*.json"))
    assert written and all(p.stat().st_mode & 0o777 == 0o640 for p in written), [
        (p.name, oct(p.stat().st_mode & 0o777)) for p in written
    ]


def test_permission_denied_on_datalist_or_image_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import nibabel as nib

    from fedbrats.data import loader
    from fedbrats.data.validation import CaseValidationError, load_nifti_checked

    def denied(path: Any, *args: Any, **kwargs: Any) -> Any:
        raise PermissionError(13, "Permission denied", str(path))

    datalist = tmp_path / "site-1.json"
    datalist.write_text('{"training": []}')
    monkeypatch.setattr(loader, "open", denied, raising=False)  # as root, chmod would not stop the read
    with pytest.raises(ValueError, match=r"site-1.json.*permission denied.*cannot read it"):
        loader.read_datalist(str(datalist), "training")
    image = Path(_volume(tmp_path / "c_t1.nii.gz"))
    monkeypatch.setattr(nib, "load", denied)
    with pytest.raises(CaseValidationError, match=r"c_t1.nii.gz.*permission denied"):
        load_nifti_checked(str(image), "c")
