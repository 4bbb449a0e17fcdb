"""Interchange with FeTS, nnU-Net and BraTS 2023+: FeTS partitioning CSVs, nnU-Net v2 dataset.json, the 2023 naming."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fedbrats.constants import MODALITIES
from fedbrats.data.conventions import BRATS2023
from fedbrats.data.nnunet import dataset_labels, label_lookup
from fedbrats.data.prepare import main, prepare
from fedbrats.data.splits import load_fets_partitions
from tests.helpers import IDS_2023

#: The data-folder factory fixture of the prepare tests (tiny random cases), shared.

#: Nine FeTS 2022 subjects (FeTS names its files as BraTS 2018-2021 does: ``<id>_t1.nii.gz``, ET = 4).
FETS_IDS = [f"FeTS2022_{i:05d}" for i in range(9)]


def _load(path: Path | str) -> dict:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def _csv(path: Path, text: str, bom: bool = False) -> Path:
    path.write_text(("\ufeff" if bom else "") + text, encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------ FeTS partitions


def test_fets_csv_makes_one_site_per_partition(make_dataset, tmp_path: Path) -> None:
    data = make_dataset(FETS_IDS)
    # As partitioning_2.csv: Subject_ID first, zero-padded partitions; plus a byte-order mark and an extra column.
    rows = [f"{s},{'01' if i < 3 else '1' if i < 4 else '02' if i < 7 else '3'},x" for i, s in enumerate(FETS_IDS)]
    csv_path = _csv(tmp_path / "partitioning_2.csv", "Subject_ID,Partition_ID,Note\n" + "\n".join(rows) + "\n", True)
    assert (
        load_fets_partitions(str(csv_path))
        == {
            "site-1": FETS_IDS[:4],  # "01" and "1" are one partition
            "site-2": FETS_IDS[4:7],
            "site-3": FETS_IDS[7:],
        }
    )
    manifest = prepare(str(data), str(tmp_path / "out"), split="fets-csv", split_map=str(csv_path), test_fraction=0)
    assert manifest["split"] == "fets-csv"
    members = {}
    for site, entry in manifest["sites"].items():
        datalist = _load(entry["datalist"])
        members[site] = sorted(e["case_id"] for e in datalist["training"] + datalist["validation"])
    assert members == {"site-1": FETS_IDS[:4], "site-2": FETS_IDS[4:7], "site-3": FETS_IDS[7:]}
    # The column order of partitioning_1.csv / small_split.csv reads the same.
    csv_1 = _csv(tmp_path / "p1.csv", "Partition_ID,Subject_ID\n" + "".join(f"0,{s}\n" for s in FETS_IDS))
    assert load_fets_partitions(str(csv_1)) == {"site-0": FETS_IDS}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "Partition,Subject_ID\n1,FeTS2022_00000\n",
            r"lacks the column\(s\) \['Partition_ID'\].*header is \['Partition', 'Subject_ID'\]",
        ),
        ("", "is empty"),
        ("Partition_ID,Subject_ID\n", "no rows"),
        ("Partition_ID,Subject_ID\n1,FeTS2022_00000\n2,FeTS2022_00000\n", r"twice \(lines 2 and 3\)"),
        ("Partition_ID,Subject_ID\n1,FeTS2022_00000\n2,\n", r"partition\(s\) \['site-2'\] list no subject"),
        ("Partition_ID,Subject_ID\n,FeTS2022_00000\n", "line 2: subject 'FeTS2022_00000' has no Partition_ID"),
    ],
)
def test_fets_csv_format_errors(tmp_path: Path, text: str, message: str) -> None:
    path = _csv(tmp_path / "partitioning.csv", text)
    with pytest.raises(ValueError, match=message) as err:
        load_fets_partitions(str(path))
    assert str(path) in str(err.value)


def test_fets_csv_subjects_and_folders_that_do_not_match(make_dataset, tmp_path: Path, caplog) -> None:
    data = make_dataset(FETS_IDS)
    (data / "FeTS2022_00099").mkdir()  # a subject folder without its files
    (data / "FeTS2022_00099" / "notes.txt").write_text("x")
    listed = "Partition_ID,Subject_ID\n" + "".join(f"{i % 3 + 1},{s}\n" for i, s in enumerate(FETS_IDS))
    bad = _csv(tmp_path / "bad.csv", listed + "1,FeTS2022_00099\n2,FeTS2022_00123\n")
    with pytest.raises(ValueError) as err:
        prepare(str(data), str(tmp_path / "out"), split="fets-csv", split_map=str(bad))
    text = str(err.value)
    assert "no case folder in the data folder: ['FeTS2022_00123']" in text
    assert "holds no .nii.gz file: ['FeTS2022_00099']" in text
    short = _csv(tmp_path / "short.csv", "Partition_ID,Subject_ID\n" + "".join(f"1,{s}\n" for s in FETS_IDS[:-1]))
    with pytest.raises(ValueError, match=rf"leaves 1 case folder\(s\) without a partition: \['{FETS_IDS[-1]}'\]"):
        prepare(str(data), str(tmp_path / "out"), split="fets-csv", split_map=str(short))
    with pytest.raises(ValueError, match="needs split_map"):
        prepare(str(data), str(tmp_path / "out"), split="fets-csv")
    assert not (tmp_path / "out").exists()
    # The command line: --split fets-csv --split-map FILE; a bad file is one error line and exit 1.
    argv = ["--data-dir", str(data), "--out-dir", str(tmp_path / "cli"), "--split", "fets-csv", "--split-map"]
    with caplog.at_level(logging.ERROR, logger="fedbrats"):
        assert main([*argv, str(bad), "--shallow"]) == 1
    assert "FeTS2022_00123" in caplog.text and not (tmp_path / "cli").exists()


# ------------------------------------------------------------------------------------------ nnU-Net


def _regions_back_to_labels(label: np.ndarray, content: dict) -> np.ndarray:
    """What nnU-Net does with region-based labels: regions from the labels, then painted back in
    ``regions_class_order``; a correct dataset.json gives the labels back unchanged."""
    regions = [v for k, v in content["labels"].items() if k != "background"]
    out = np.zeros_like(label)
    for values, paint in zip(regions, content["regions_class_order"]):
        out[np.isin(label, values)] = paint
    return out


def test_prepare_writes_nnunet_dataset_with_converted_2018_labels(make_dataset, tmp_path: Path) -> None:
    data = make_dataset()  # BraTS 2018 names, ET = 4
    out = tmp_path / "out"
    manifest = prepare(str(data), str(out), split="institution", unlabelled_sites="2013")
    content = _load(out / "dataset.json")
    assert manifest["nnunet"] == {"dataset_json": str(out / "dataset.json"), "labels": "regions"}
    assert content["channel_names"] == {"0": "T1", "1": "T1ce", "2": "T2", "3": "FLAIR"}
    assert content["labels"] == {
        "background": 0,
        "whole tumor": [1, 2, 3],
        "tumor core": [1, 3],
        "enhancing tumor": [3],
    }
    assert content["file_ending"] == ".nii.gz"
    mapping = _load(out / "nnunet_cases.json")["cases"]
    splits = _load(out / "nnunet_splits_final.json")
    train_val = {}
    for site in ("CBICA", "TCIA"):
        datalist = _load(out / f"{site}.json")
        train_val.update({e["case_id"]: ("training", e) for e in datalist["training"]})
        train_val.update({e["case_id"]: ("validation", e) for e in datalist["validation"]})
    # Every labelled training/validation case, and nothing else, is an nnU-Net training case.
    assert sorted(content["dataset"]) == sorted(train_val) and content["numTraining"] == len(train_val)
    assert splits == [
        {
            "train": sorted(c for c, (s, _) in train_val.items() if s == "training"),
            "val": sorted(c for c, (s, _) in train_val.items() if s == "validation"),
        }
    ]
    test_ids = {e["case_id"] for e in _load(out / "test.json")["test"]}
    assert {c for c, r in mapping.items() if r["subset"] == "test"} == test_ids
    assert all("test case" in mapping[c]["excluded"] for c in test_ids)
    unlabelled = [c for c, r in mapping.items() if r["site"] == "2013" and r["subset"] != "test"]
    assert unlabelled and all(mapping[c]["excluded"] == "no segmentation (unlabelled site)" for c in unlabelled)
    for case_id, entry in content["dataset"].items():
        source = train_val[case_id][1]
        assert entry["images"] == source["image"] and mapping[case_id]["identifier"] == case_id
        # The label is a converted copy: same geometry, ET 4 -> 3, and nnU-Net's regions give the BraTS regions.
        assert entry["label"] == str(out / "nnunet_labels" / f"{case_id}.nii.gz")
        original, converted = nib.load(source["label"]), nib.load(entry["label"])
        assert converted.shape == original.shape and np.allclose(converted.affine, original.affine)
        old, new = np.asarray(original.dataobj), np.asarray(converted.dataobj)
        assert new.dtype == np.uint8 and set(np.unique(new)) <= {0, 1, 2, 3}
        assert np.array_equal(new == 3, old == 4) and np.array_equal(new == 1, old == 1)
        assert np.array_equal(np.isin(new, [1, 3]), np.isin(old, [1, 4]))  # tumour core
        assert np.array_equal(_regions_back_to_labels(new, content), new)


def test_prepare_nnunet_for_2023_names_files_in_place_and_modes(make_dataset, tmp_path: Path) -> None:
    data = make_dataset(IDS_2023, BRATS2023)
    out = tmp_path / "out"
    prepare(str(data), str(out), nnunet="labels", test_fraction=0)
    content = _load(out / "dataset.json")
    assert content["labels"] == {"background": 0, "necrotic tumor core": 1, "edema": 2, "enhancing tumor": 3}
    assert "regions_class_order" not in content
    assert content["numTraining"] == len(IDS_2023)
    for case_id, entry in content["dataset"].items():
        assert entry["label"] == str(data / case_id / f"{case_id}-seg.nii.gz")  # the 2023 numbering is nnU-Net's
        assert [Path(p).name for p in entry["images"]] == [BRATS2023.filename(case_id, m) for m in MODALITIES]
    assert not (out / "nnunet_labels").exists()
    assert label_lookup(BRATS2023) == {0: 0, 1: 1, 2: 2, 3: 3}
    # --nnunet off writes none of the nnU-Net files.
    prepare(str(data), str(tmp_path / "off"), nnunet="off")
    assert not (tmp_path / "off" / "dataset.json").exists() and (tmp_path / "off" / "sites.json").is_file()
    with pytest.raises(ValueError, match="--nnunet"):
        dataset_labels("region")


def test_existing_dataset_json_is_never_replaced_without_overwrite(make_dataset, tmp_path: Path) -> None:
    data = make_dataset(IDS_2023, BRATS2023)
    out = tmp_path / "out"
    out.mkdir()
    (out / "dataset.json").write_text('{"mine": true}')
    with pytest.raises(ValueError, match=r"already holds \['dataset.json'\].*--overwrite"):
        prepare(str(data), str(out))
    assert _load(out / "dataset.json") == {"mine": True} and not (out / "sites.json").exists()
    prepare(str(data), str(out), nnunet="off")  # nothing of nnU-Net's to write: the user's file stays
    assert _load(out / "dataset.json") == {"mine": True}
    prepare(str(data), str(out), overwrite=True)
    assert _load(out / "dataset.json")["numTraining"] > 0


# ------------------------------------------------------------------------------------------ BraTS 2023+ end to end


def test_brats2023_folders_end_to_end(tmp_path: Path) -> None:
    """BraTS-GLI-00000-000 folders (t1n/t1c/t2w/t2f/seg, ET = 3): prepare, a site's loader, evaluate with the
    lesion-wise option, on tiny synthetic cases."""
    import torch

    from fedbrats.data.loader import DataConfig, make_loaders
    from fedbrats.data.site_config import load_site_config
    from fedbrats.data.synthetic import generate_case
    from fedbrats.evaluation.evaluate import main as evaluate_main
    from fedbrats.networks import build_network
    from tests.helpers import run_dir

    data = tmp_path / "BraTS2024-GLI"
    ids = [f"BraTS-GLI-{i:05d}-{t:03d}" for i, t in ((0, 0), (1, 0), (2, 0), (2, 1), (3, 0), (4, 0))]
    for seed, case_id in enumerate(ids):
        generate_case(str(data), case_id, convention="brats2023", size=16, seed=seed)
    assert sorted(p.name for p in (data / ids[0]).iterdir()) == sorted(
        f"{ids[0]}-{s}.nii.gz" for s in ("t1n", "t1c", "t2w", "t2f", "seg")
    )
    out = tmp_path / "lists"
    manifest = prepare(str(data), str(out), split="random", k=2, test_fraction=0.34, val_fraction=0.5)
    assert manifest["convention"] == "brats2023" and manifest["num_test"] == 2

    # A site reads its entry and loads its cases with ET = 3 turned into the ET region.
    site = load_site_config(str(out / "sites.json"), "site-1")
    assert site.convention == "brats2023"
    _, val_loader = make_loaders(site.datalist, site.modalities, site.convention, DataConfig.from_dict({}))
    entry = _load(site.datalist)["validation"][0]
    seg = np.asarray(nib.load(entry["label"]).dataobj)
    assert (seg == 3).any()
    label = next(iter(val_loader))["label"][0]
    assert int(label[2].sum()) == int((seg == 3).sum())  # ET
    assert int(label[1].sum()) == int(np.isin(seg, [1, 3]).sum())  # TC
    assert int(label[0].sum()) == int((seg > 0).sum())  # WT

    # evaluate on the held-out cases, case-wise and lesion-wise, from the sites.json prepare wrote.
    torch.manual_seed(0)
    run = run_dir(tmp_path / "run", build_network("segresnet", init_filters=8))
    report = tmp_path / "eval"
    argv = ["--model", str(run), "--sites", str(out / "sites.json"), "--roi-size", "16", "--device", "cpu"]
    assert evaluate_main([*argv, "--lesion-wise", "--out-dir", str(report)]) == 0
    results = _load(report / "results.json")
    assert results["convention"] == "brats2023" and results["num_cases"] == 2
    assert results["lesion_wise"] == {"dilation": 3, "min_volume_mm3": 50.0, "hd95_miss_value": 374.0}
    for row in results["combinations"].values():
        lesion = row["lesion_wise"]
        assert all(0.0 <= lesion["dice"][r] <= 1.0 and 0.0 <= lesion["hd95"][r] <= 374.0 for r in ("WT", "TC", "ET"))
        assert len(lesion["per_case"]["dice"]) == 2 and set(lesion["lesions"]) == {"tp", "fp", "fn"}
    assert "lesion_wise" in results["mean_over_combinations"]
    markdown = (report / "results.md").read_text(encoding="utf-8")
    assert "## Lesion-wise (BraTS 2023)" in markdown and markdown.count("**mean over 15**") == 2
