"""Inputs a user or another party hands the package: files, folders, specs and stores that must not destroy,
leak or allocate what they should not (issue "One site cannot break the federation", the smaller holes)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from fedbrats.data.prepare import prepare
from tests.helpers import IDS_2018, write_case


def _volume(path: Path, data: np.ndarray | None = None, affine: np.ndarray | None = None) -> str:
    if data is None:
        data = np.zeros((16, 16, 16), dtype=np.float32)
        data[2:14, 2:14, 2:14] = np.random.default_rng(0).uniform(1, 100, (12, 12, 12))
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), str(path))
    return str(path)


@pytest.fixture(scope="module")
def model_dir(exported_segresnet: str) -> str:
    return exported_segresnet


# ---- outputs never written through a link onto an input ------------------------------------------------------
def test_predict_overwrite_onto_a_hard_link_of_its_input_keeps_the_input(model_dir: str, tmp_path: Path) -> None:
    from fedbrats.evaluation.predict import main

    flair = _volume(tmp_path / "flair.nii.gz")
    before = Path(flair).read_bytes()
    linked = tmp_path / "out.nii.gz"
    os.link(flair, linked)
    argv = ["--model", model_dir, "--flair", flair, "--out", str(linked), "--device", "cpu", "--overwrite"]
    assert main(argv) == 1  # the output is the input under another name
    assert Path(flair).read_bytes() == before


def test_predict_output_is_private_and_replaces_a_link_without_writing_through_it(
    model_dir: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedbrats.evaluation.predict import main

    flair = _volume(tmp_path / "flair.nii.gz")
    other = tmp_path / "ground_truth.nii.gz"
    other.write_bytes(b"someone else's file")
    out = tmp_path / "seg.nii.gz"
    os.symlink(other, out)
    assert main(["--model", model_dir, "--flair", flair, "--out", str(out), "--device", "cpu", "--overwrite"]) == 0
    assert other.read_bytes() == b"someone else's file", "written through the link"
    assert not out.is_symlink() and stat.S_IMODE(out.stat().st_mode) == 0o600
    monkeypatch.setenv("FEDBRATS_PRIVATE_OUTPUTS", "0")
    assert main(["--model", model_dir, "--flair", flair, "--out", str(out), "--device", "cpu", "--overwrite"]) == 0
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~_umask()


def _nan_affine(path: Path) -> None:
    """A volume whose stored affine holds NaN (nibabel refuses to make one from an affine, so through the header)."""
    header = nib.Nifti1Image(np.ones((8, 8, 8), np.float32), np.eye(4)).header
    header["srow_x"], header["sform_code"], header["qform_code"] = [np.nan, 0, 0, 0], 1, 0
    data = np.random.default_rng(0).uniform(1, 100, (8, 8, 8)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, None, header), str(path))


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@pytest.mark.parametrize(
    ("make", "said"),
    [
        (lambda p: p.write_bytes(b"not a nifti at all"), "not a readable NIfTI"),
        (lambda p: _volume(p, np.ones((16, 16), np.float32)), "3-D"),
        (lambda p: _volume(p, np.ones((8, 8, 8, 3), np.float32)), "3-D"),
        (lambda p: _volume(p, np.full((8, 8, 8), np.nan, np.float32)), "NaN"),
        (lambda p: _volume(p, np.zeros((8, 8, 8), np.float32)), "only zeros"),
        (lambda p: _nan_affine(p), "affine"),
    ],
)
def test_predict_refuses_what_is_not_a_sequence(model_dir: str, tmp_path: Path, make, said: str, caplog) -> None:
    from fedbrats.evaluation.predict import main

    bad = tmp_path / "flair.nii.gz"
    make(bad)
    assert (
        main(["--model", model_dir, "--flair", str(bad), "--out", str(tmp_path / "o.nii.gz"), "--device", "cpu"]) == 1
    )
    assert said in caplog.text and "flair.nii.gz" in caplog.text


def test_anomaly_refuses_its_input_by_a_link_and_impossible_options(tmp_path: Path, caplog) -> None:
    from fedbrats.evaluation.anomaly import map_main

    flair = _volume(tmp_path / "flair.nii.gz")
    before = Path(flair).read_bytes()
    link = tmp_path / "map.nii.gz"
    os.symlink(flair, link)
    base = ["--model", str(tmp_path / "no_model"), "--image", flair, "--device", "cpu"]
    assert map_main([*base, "--out", str(link), "--overwrite"]) == 1
    assert "input" in caplog.text and Path(flair).read_bytes() == before
    out = str(tmp_path / "m.nii.gz")
    for option, value in (
        ("--zoom", "0"),
        ("--zoom", "nan"),
        ("--erosion-disk-radius", "1000"),
        ("--erosion-disk-radius", "-1"),
        ("--masks", "0"),
    ):
        caplog.clear()
        assert map_main([*base, "--out", out, option, value]) == 1
        assert option in caplog.text
    seg = np.zeros((16, 16, 16), np.float32)
    seg[4:8, 4:8, 4:8] = 2
    label_map = _volume(tmp_path / "seg.nii.gz", seg)
    caplog.clear()
    assert map_main(["--model", "m", "--image", label_map, "--out", out, "--device", "cpu"]) == 1
    assert "looks like a segmentation" in caplog.text


# ---- a spec cannot make the receiver allocate ------------------------------------------------------------------
def test_a_spec_asking_for_a_huge_network_is_refused_before_it_is_built() -> None:
    from fedbrats.networks import build_from_spec

    with pytest.raises(ValueError, match="parameters"):
        build_from_spec({"path": "fedbrats.networks.segresnet.BraTSSegResNet", "args": {"init_filters": 4096}})
    assert build_from_spec({"path": "segresnet", "args": {"init_filters": 8}}) is not None


# ---- prepare ---------------------------------------------------------------------------------------------------
def test_prepare_refuses_site_names_of_its_own_files(tmp_path: Path) -> None:
    data = tmp_path / "data"
    for i, case in enumerate(IDS_2018):
        write_case(data, case, seed=i)
    for name in ("dataset", "nnunet_cases", "folds", "sites"):
        mapping = {name: IDS_2018[:7], "other": IDS_2018[7:]}
        with pytest.raises(ValueError, match=f"site name '{name}'"):
            prepare(str(data), str(tmp_path / f"out_{name}"), split="map", split_map=mapping)


def test_prepare_refuses_links_out_of_the_data_folder_and_shared_files(tmp_path: Path) -> None:
    data, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    for i, case in enumerate(IDS_2018):
        write_case(data, case, seed=i)
    write_case(elsewhere, "Brats18_CBICA_ZZZ_1", seed=99)
    victim = data / IDS_2018[0] / f"{IDS_2018[0]}_flair.nii.gz"
    victim.unlink()
    os.symlink(elsewhere / "Brats18_CBICA_ZZZ_1" / "Brats18_CBICA_ZZZ_1_flair.nii.gz", victim)
    with pytest.raises(ValueError, match="outside --data-dir"):
        prepare(str(data), str(tmp_path / "o1"), nnunet="off")
    victim.unlink()
    os.symlink(data / IDS_2018[1] / f"{IDS_2018[1]}_flair.nii.gz", victim)  # one image, two cases
    with pytest.raises(ValueError, match="same file as one of case"):
        prepare(str(data), str(tmp_path / "o2"), nnunet="off")
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


# ---- a case's identity, for privacy floors ---------------------------------------------------------------------
def test_a_datalist_without_case_ids_gives_each_case_its_image_as_identity(tmp_path: Path) -> None:
    from fedbrats.data.loader import read_datalist

    entries = [{"image": [f"case{i}/t1.nii.gz", None, None, None], "label": f"case{i}/seg.nii.gz"} for i in range(2)]
    path = tmp_path / "plain.json"
    path.write_text(json.dumps({"training": entries}))
    read = read_datalist(str(path), "training")
    assert [e["case_id"] for e in read] == [str(tmp_path / f"case{i}" / "t1.nii.gz") for i in range(2)]
    assert read_datalist(str(path), "training")[0]["case_id"] == read[0]["case_id"], "stable"


# ---- site-only models ------------------------------------------------------------------------------------------
def test_a_corrupt_fedmic_personal_file_is_named_and_no_unsafe_advice_given(tmp_path: Path) -> None:
    from fedbrats.federated.methods.fedmic import FedMICMethod
    from fedbrats.networks import build_network

    method = FedMICMethod()
    method.setup(build_network("segresnet", init_filters=8), ("t1", "t1ce", "t2", "flair"), torch.device("cpu"))
    path = tmp_path / "fedmic_personal.pt"
    path.write_bytes(b"\x80\x04garbage")
    with pytest.raises(ValueError, match="fedmic_personal.pt") as err:
        method.load_state(str(path))
    assert "weights_only=False" not in str(err.value)


# ---- PoC and provisioned stores --------------------------------------------------------------------------------
def test_env_poc_needs_a_new_private_workspace(tmp_path: Path) -> None:
    from fedbrats.job import private_poc_workspace

    with pytest.raises(ValueError, match="--poc-workspace"):
        private_poc_workspace(None)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "server").mkdir()
    with pytest.raises(ValueError, match="not an empty folder"):
        private_poc_workspace(str(busy))
    made = private_poc_workspace(str(tmp_path / "new"))
    assert stat.S_IMODE(os.stat(made).st_mode) == 0o700


def test_a_server_kit_keeps_its_job_and_snapshot_stores_inside_it(tmp_path: Path) -> None:
    from deploy.kits import private_stores

    kit = tmp_path / "server"
    (kit / "local").mkdir(parents=True)
    default = {
        "snapshot_persistor": {"args": {"storage": {"args": {"root_dir": "/tmp/nvflare/snapshot-storage"}}}},
        "components": [{"id": "job_manager", "args": {"uri_root": "/tmp/nvflare/jobs-storage"}}],
        "class_allow_list": ["nvflare."],
    }
    (kit / "local" / "resources.json.default").write_text(json.dumps(default))
    stores = private_stores(str(kit))
    resources = json.loads((kit / "local" / "resources.json").read_text())
    assert resources["components"][0]["args"]["uri_root"] == stores["jobs"] == str(kit / "jobs-storage")
    assert resources["snapshot_persistor"]["args"]["storage"]["args"]["root_dir"] == str(kit / "snapshot-storage")
    assert resources["class_allow_list"] == ["nvflare."], "the rest of the kit's resources stays"
    for folder in stores.values():
        assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700
