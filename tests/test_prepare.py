"""Tests of fedbrats.data.prepare: scanning, splits, hold-outs, site profiles, output files and the CLI."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fedbrats.constants import MODALITIES
from fedbrats.data.conventions import BRATS2023, institution_of
from fedbrats.data.prepare import InvalidCasesError, main, parse_site_modalities, prepare, scan_cases
from fedbrats.data.splits import split_by_institution, split_from_map, split_random, split_site
from tests.helpers import CASE_SHAPE, IDS_2018, IDS_2023, write_case


def _load(path: Path | str) -> dict:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def _corrupt(path: Path) -> None:
    path.write_bytes(np.random.default_rng(7).bytes(1500))


def _truncate(path: Path) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])


# ---------------------------------------------------------------------------------------------- scanning


def test_scan_cases_sorted_and_ignores_non_cases(make_dataset) -> None:
    data = make_dataset()
    (data / "notes").mkdir()
    (data / "notes" / "readme.txt").write_text("x")
    (data / "README.md").write_text("x")
    cases = scan_cases(str(data))
    assert [Path(c).name for c in cases] == sorted(IDS_2018)
    assert all(Path(c).is_absolute() for c in cases)


def test_scan_cases_nonexistent_and_empty(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(ValueError, match="does not exist") as err:
        scan_cases(str(missing))
    assert str(missing) in str(err.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no case folder") as err:
        scan_cases(str(empty))
    assert str(empty) in str(err.value) and "_t1.nii.gz" in str(err.value)


def test_scan_cases_hints_at_nested_layout(tmp_path: Path) -> None:
    write_case(tmp_path / "data" / "HGG", "Brats18_CBICA_AAA_1")
    with pytest.raises(ValueError, match=r"\['HGG'\]"):
        scan_cases(str(tmp_path / "data"))


# ---------------------------------------------------------------------------------------------- splits


def test_split_by_institution() -> None:
    sites = split_by_institution(IDS_2018)
    assert list(sites) == ["2013", "CBICA", "TCIA"]
    assert len(sites["CBICA"]) == 6 and len(sites["TCIA"]) == 4 and len(sites["2013"]) == 3
    assert split_by_institution(IDS_2023) == {"GLI": sorted(IDS_2023[:5]), "MEN": sorted(IDS_2023[5:])}
    with pytest.raises(ValueError, match="nosep"):
        split_by_institution(["nosep"])


def test_split_random_balanced_and_deterministic() -> None:
    sites = split_random(IDS_2018, 3, seed=1)
    assert list(sites) == ["site-1", "site-2", "site-3"]
    sizes = sorted(len(v) for v in sites.values())
    assert sizes == [4, 4, 5]
    assert sorted(c for v in sites.values() for c in v) == sorted(IDS_2018)
    assert split_random(list(reversed(IDS_2018)), 3, seed=1) == sites
    assert split_random(IDS_2018, 3, seed=2) != sites
    with pytest.raises(ValueError, match="k"):
        split_random(IDS_2018, 0, seed=0)
    with pytest.raises(ValueError, match="exceeds"):
        split_random(IDS_2018, 14, seed=0)


def test_split_from_map_both_forms() -> None:
    ids = ["a_X_1", "b_X_1", "c_X_1"]
    by_case = split_from_map(ids, {"a_X_1": "s1", "b_X_1": "s2", "c_X_1": "s1"})
    by_site = split_from_map(ids, {"s1": ["c_X_1", "a_X_1"], "s2": ["b_X_1"]})
    assert by_case == by_site == {"s1": ["a_X_1", "c_X_1"], "s2": ["b_X_1"]}


def test_split_from_map_errors() -> None:
    ids = ["a_X_1", "b_X_1"]
    with pytest.raises(ValueError, match=r"not found.*'zz_X_1'"):
        split_from_map(ids, {"s1": ["a_X_1", "b_X_1", "zz_X_1"]})
    with pytest.raises(ValueError, match=r"without a site.*'b_X_1'"):
        split_from_map(ids, {"a_X_1": "s1"})
    with pytest.raises(ValueError, match="both"):
        split_from_map(ids, {"s1": ["a_X_1", "b_X_1"], "s2": ["a_X_1"]})
    with pytest.raises(ValueError, match="all site names"):
        split_from_map(ids, {"a_X_1": "s1", "s2": ["b_X_1"]})


def test_split_site_fractions() -> None:
    ids = [f"c{i:02d}_X_1" for i in range(10)]
    train, val, test = split_site("s", ids, ids, test_fraction=0.2, val_fraction=0.25, seed=0)
    assert (len(train), len(val), len(test)) == (6, 2, 2)
    assert sorted(train + val + test) == ids
    assert split_site("s", ids, ids, 0.2, 0.25, seed=0) == (train, val, test)
    # Only cases with all four sequences may be held out for test.
    _, _, test = split_site("s", ids, ids[:1], 0.3, 0.2, seed=0)
    assert test == ids[:1]
    # Two cases: one validation case at least, one training case always.
    assert split_site("s", ids[:2], ids[:2], 0.2, 0.1, seed=0)[1:] != ([], [])
    train, val, test = split_site("s", ids[:2], ids[:2], 0.2, 0.1, seed=0)
    assert (len(train), len(val), len(test)) == (1, 1, 0)
    assert split_site("s", ids[:1], ids[:1], 0.5, 0.5, seed=0) == (ids[:1], [], [])
    with pytest.raises(ValueError, match="val_fraction"):
        split_site("s", ids, ids, 0.2, 1.0, seed=0)


# ---------------------------------------------------------------------------------------------- site profiles


def test_parse_site_modalities_inline_and_json(tmp_path: Path) -> None:
    spec = "site-1=t1,t1ce,t2,flair; site-2=flair,t1 ,t2;"
    assert parse_site_modalities(spec) == {"site-1": list(MODALITIES), "site-2": ["t1", "t2", "flair"]}
    path = tmp_path / "mods.json"
    path.write_text(json.dumps({"site-2": ["t2", "flair"]}))
    assert parse_site_modalities(str(path), ["site-1", "site-2"]) == {
        "site-1": list(MODALITIES),
        "site-2": ["t2", "flair"],
    }
    assert parse_site_modalities(None, ["a"]) == {"a": list(MODALITIES)}


def test_parse_site_modalities_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"site 'site-2'.*'t1c'.*did you mean 't1ce'"):
        parse_site_modalities("site-1=t1;site-2=t1c,t2")
    with pytest.raises(ValueError, match=r"site 'site-1'.*'T2'"):
        parse_site_modalities("site-1=T2")
    with pytest.raises(ValueError, match=r"unknown site\(s\) \['site-9'\].*\['site-1', 'site-2'\]"):
        parse_site_modalities("site-9=t1", ["site-1", "site-2"])
    with pytest.raises(ValueError, match="cannot parse"):
        parse_site_modalities("t1,t2")
    with pytest.raises(ValueError, match="not found"):
        parse_site_modalities(str(tmp_path / "missing.json"))


# ---------------------------------------------------------------------------------------------- prepare


def _all_entries(out: Path, manifest: dict) -> dict[str, list[dict]]:
    sections: dict[str, list[dict]] = {}
    for site, entry in manifest["sites"].items():
        dl = _load(entry["datalist"])
        sections[f"{site}/training"] = dl["training"]
        sections[f"{site}/validation"] = dl["validation"]
    sections["test"] = _load(out / "test.json")["test"]
    return sections


def test_prepare_institution_split_writes_wellformed_files(make_dataset, tmp_path: Path) -> None:
    data = make_dataset()
    out = tmp_path / "out"
    manifest = prepare(str(data), str(out), split="institution", seed=3)
    assert manifest == _load(out / "sites.json")
    assert manifest["version"] == 1
    assert manifest["data_dir"] == str(data)
    assert manifest["convention"] == "brats2018"
    assert manifest["test_datalist"] == str(out / "test.json")
    assert set(manifest["sites"]) == {"CBICA", "TCIA", "2013"}
    for site, entry in manifest["sites"].items():
        assert entry["datalist"] == str(out / f"{site}.json")
        assert entry["modalities"] == list(MODALITIES)
        assert entry["convention"] == "brats2018"
        dl = _load(entry["datalist"])
        assert dl["convention"] == "brats2018"
        assert dl["modality"] == {"0": "t1", "1": "t1ce", "2": "t2", "3": "flair"}
        assert set(dl["labels"]) == {"0", "1", "2", "4"}
        assert len(dl["training"]) == entry["num_training"] >= 1
        assert len(dl["validation"]) == entry["num_validation"] >= 1
        for e in dl["training"] + dl["validation"]:
            assert set(e) == {"case_id", "image", "label"}
            assert len(e["image"]) == 4
            for modality, p in zip(MODALITIES, e["image"]):
                assert Path(p).is_absolute() and Path(p).is_file()
                assert p.endswith(f"{e['case_id']}_{modality}.nii.gz")
            assert e["label"].endswith("_seg.nii.gz")
    sections = _all_entries(out, manifest)
    ids = [e["case_id"] for entries in sections.values() for e in entries]
    assert sorted(ids) == sorted(IDS_2018)  # every case exactly once
    assert len(sections["test"]) == manifest["num_test"] == 3  # round(0.2 * 6, 4, 3) = 1 per site
    assert {institution_of(e["case_id"]) for e in sections["test"]} == {"CBICA", "TCIA", "2013"}
    assert all(None not in e["image"] and e["label"] for e in sections["test"])
    assert not list(out.glob(".*tmp"))  # atomic writes leave no temporary files


def test_prepare_fractions(make_dataset, tmp_path: Path) -> None:
    data = make_dataset()
    m = prepare(str(data), str(tmp_path / "o1"), test_fraction=0.0, val_fraction=0.5)
    assert m["num_test"] == 0 and _load(tmp_path / "o1" / "test.json")["test"] == []
    cbica = m["sites"]["CBICA"]
    assert (cbica["num_training"], cbica["num_validation"]) == (3, 3)
    m = prepare(str(data), str(tmp_path / "o2"), test_fraction=0.4, val_fraction=0.1)
    assert m["num_test"] == 2 + 2 + 1  # round-half-up of 2.4, 1.6, 1.2
    assert all(s["num_validation"] == 1 for s in m["sites"].values())
    # a split that leaves a site nothing to validate on is refused, naming the site and the fix (issue 13, item 9)
    with pytest.raises(ValueError, match=r"2013 \(1 training case\(s\) left\).*--test-fraction"):
        prepare(str(data), str(tmp_path / "o4"), test_fraction=0.5, val_fraction=0.1)
    with pytest.raises(ValueError, match="--val-fraction 0.2"):
        prepare(str(data), str(tmp_path / "o5"), test_fraction=0.0, val_fraction=0.0)
    assert not (tmp_path / "o4").exists() and not (tmp_path / "o5").exists()
    with pytest.raises(ValueError, match="test_fraction"):
        prepare(str(data), str(tmp_path / "o3"), test_fraction=1.0)


def test_prepare_is_deterministic(make_dataset, tmp_path: Path) -> None:
    data = make_dataset()
    prepare(str(data), str(tmp_path / "a"), split="random", k=2, seed=5)
    prepare(str(data), str(tmp_path / "b"), split="random", k=2, seed=5)
    for name in ("site-1.json", "site-2.json", "test.json"):
        assert _load(tmp_path / "a" / name) == _load(tmp_path / "b" / name)


def test_prepare_random_and_map_splits(make_dataset, tmp_path: Path) -> None:
    data = make_dataset()
    m = prepare(str(data), str(tmp_path / "r"), split="random", k=4, seed=0)
    assert list(m["sites"]) == ["site-1", "site-2", "site-3", "site-4"]
    mapping = {"alpha": IDS_2018[:7], "beta": IDS_2018[7:]}
    map_file = tmp_path / "map.json"
    map_file.write_text(json.dumps(mapping))
    m = prepare(str(data), str(tmp_path / "m"), split="map", split_map=str(map_file))
    assert set(m["sites"]) == {"alpha", "beta"}
    alpha = _all_entries(tmp_path / "m", m)
    assert {e["case_id"] for e in alpha["alpha/training"] + alpha["alpha/validation"]} <= set(IDS_2018[:7])
    with pytest.raises(ValueError, match="num-sites"):
        prepare(str(data), str(tmp_path / "x"), split="random")
    with pytest.raises(ValueError, match="only used with split='random'"):
        prepare(str(data), str(tmp_path / "x"), split="institution", k=3)


def test_prepare_brats2023(make_dataset, tmp_path: Path) -> None:
    data = make_dataset(IDS_2023, BRATS2023)
    m = prepare(str(data), str(tmp_path / "out"))
    assert m["convention"] == "brats2023" and set(m["sites"]) == {"GLI", "MEN"}
    dl = _load(m["sites"]["GLI"]["datalist"])
    assert set(dl["labels"]) == {"0", "1", "2", "3"} and dl["labels"]["3"] == "enhancing tumour"
    assert dl["training"][0]["image"][1].endswith("-t1c.nii.gz")
    assert dl["training"][0]["label"].endswith("-seg.nii.gz")


def test_site_modalities_null_for_absent_sequences(make_dataset, tmp_path: Path) -> None:
    # TCIA has no T1ce at all; CBICA has the files but its profile leaves FLAIR out.
    tcia = [c for c in IDS_2018 if "TCIA" in c]
    data = make_dataset(missing={c: ("t1ce",) for c in tcia})
    m = prepare(str(data), str(tmp_path / "out"), site_modalities="TCIA=t1,t2,flair;CBICA=t1,t1ce,t2")
    assert m["sites"]["TCIA"]["modalities"] == ["t1", "t2", "flair"]
    assert m["sites"]["CBICA"]["modalities"] == ["t1", "t1ce", "t2"]
    assert m["sites"]["2013"]["modalities"] == list(MODALITIES)
    sections = _all_entries(tmp_path / "out", m)
    for e in sections["TCIA/training"] + sections["TCIA/validation"]:
        assert e["image"][1] is None and None not in (e["image"][0], e["image"][2], e["image"][3])
    for e in sections["CBICA/training"] + sections["CBICA/validation"]:
        assert e["image"][3] is None and e["image"][1] is not None
    # Test cases need all four sequences: none can come from TCIA, whose cases lack T1ce.
    assert all("TCIA" not in e["case_id"] and None not in e["image"] for e in sections["test"])
    raw = (tmp_path / "out" / "TCIA.json").read_text()
    assert "null" in raw


def test_site_profile_claims_missing_sequence(make_dataset, tmp_path: Path) -> None:
    data = make_dataset(missing={"Brats18_TCIA01_101_1": ("t1ce",)})
    out = tmp_path / "out"
    with pytest.raises(InvalidCasesError) as err:
        prepare(str(data), str(out), site_modalities="TCIA=t1,t1ce,t2,flair")
    assert len(err.value.errors) == 1
    assert "Brats18_TCIA01_101_1" in str(err.value) and "Brats18_TCIA01_101_1_t1ce.nii.gz" in str(err.value)
    assert not out.exists()


def test_prepare_unknown_site_and_bad_modality(make_dataset, tmp_path: Path) -> None:
    data = make_dataset()
    with pytest.raises(ValueError, match=r"\['site-1'\].*\['2013', 'CBICA', 'TCIA'\]"):
        prepare(str(data), str(tmp_path / "o"), site_modalities="site-1=t1,t2")
    with pytest.raises(ValueError, match=r"site 'CBICA'.*'t3'"):
        prepare(str(data), str(tmp_path / "o"), site_modalities="CBICA=t1,t3")
    assert not (tmp_path / "o").exists()


def test_prepare_aborts_listing_every_bad_case_and_writes_nothing(make_dataset, tmp_path: Path) -> None:
    data = make_dataset()
    corrupt = data / IDS_2018[0] / f"{IDS_2018[0]}_t2.nii.gz"
    truncated = data / IDS_2018[7] / f"{IDS_2018[7]}_t1ce.nii.gz"
    _corrupt(corrupt)
    _truncate(truncated)
    (data / IDS_2018[10] / f"{IDS_2018[10]}_flair.nii.gz").unlink()
    out = tmp_path / "out"
    with pytest.raises(InvalidCasesError) as err:
        prepare(str(data), str(out))
    msg = str(err.value)
    assert msg.startswith("3 of 13 cases failed validation")
    assert f"case {IDS_2018[0]}: file {corrupt}" in msg
    assert f"case {IDS_2018[7]}: file {truncated}: truncated or corrupt NIfTI" in msg
    assert f"{IDS_2018[10]}_flair.nii.gz" in msg and "missing" in msg
    assert {e.case_id for e in err.value.errors} == {IDS_2018[0], IDS_2018[7], IDS_2018[10]}
    assert not out.exists()


def test_prepare_aborts_on_bad_label_shape_affine(make_dataset, tmp_path: Path) -> None:
    data = make_dataset()
    a, b, c = IDS_2018[1], IDS_2018[2], IDS_2018[3]
    write_case(data, a, label_values=(0, 1, 3))  # label 3 in a 2018 case
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 8), np.int16), np.eye(4)), str(data / b / f"{b}_t2.nii.gz"))
    shifted = np.eye(4)
    shifted[2, 3] = 2.0
    nib.save(nib.Nifti1Image(np.zeros(CASE_SHAPE, np.int16), shifted), str(data / c / f"{c}_flair.nii.gz"))
    with pytest.raises(InvalidCasesError) as err:
        prepare(str(data), str(tmp_path / "out"))
    problems = {e.case_id: e.problem for e in err.value.errors}
    assert "unexpected label values [3]" in problems[a] and "convention" in problems[a]
    assert "(16, 16, 8)" in problems[b]
    assert "affine differs" in problems[c]


def test_skip_invalid_warns_and_proceeds(make_dataset, tmp_path: Path, caplog) -> None:
    data = make_dataset()
    bad = data / IDS_2018[0] / f"{IDS_2018[0]}_t1.nii.gz"
    _truncate(bad)
    with caplog.at_level(logging.WARNING, logger="fedbrats"):
        m = prepare(str(data), str(tmp_path / "out"), skip_invalid=True)
    assert str(bad) in caplog.text and "skipping" in caplog.text
    assert m["skipped_cases"] == [IDS_2018[0]]
    ids = [e["case_id"] for entries in _all_entries(tmp_path / "out", m).values() for e in entries]
    assert IDS_2018[0] not in ids and len(ids) == len(IDS_2018) - 1


def test_skip_invalid_refuses_when_most_of_a_site_is_invalid(make_dataset, tmp_path: Path) -> None:
    data = make_dataset()
    for case_id in ("Brats18_2013_1_1", "Brats18_2013_2_1"):
        _corrupt(data / case_id / f"{case_id}_seg.nii.gz")
    with pytest.raises(ValueError, match="site 2013: 2 of 3 cases invalid; refusing to train on almost nothing"):
        prepare(str(data), str(tmp_path / "out"), skip_invalid=True)
    assert not (tmp_path / "out").exists()


def test_shallow_misses_truncation_deep_catches_it(make_dataset, tmp_path: Path) -> None:
    data = make_dataset()
    _truncate(data / IDS_2018[4] / f"{IDS_2018[4]}_t2.nii.gz")
    prepare(str(data), str(tmp_path / "shallow"), deep_validate=False)
    with pytest.raises(InvalidCasesError, match="truncated"):
        prepare(str(data), str(tmp_path / "deep"), deep_validate=True)


def test_mixed_conventions_rejected(tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_case(data, "Brats18_CBICA_AAA_1")
    write_case(data, "Brats18_CBICA_AAB_1")
    write_case(data, "BraTS-GLI-00000-000", BRATS2023)
    write_case(data, "BraTS-GLI-00001-000", BRATS2023)
    with pytest.raises(ValueError, match="mixes conventions"):
        prepare(str(data), str(tmp_path / "out"), test_fraction=0.0)


def test_bad_site_names_rejected(make_dataset, tmp_path: Path) -> None:
    data = make_dataset()
    with pytest.raises(ValueError, match="'test'"):
        prepare(str(data), str(tmp_path / "o"), split="map", split_map={"test": IDS_2018})


# ---------------------------------------------------------------------------------------------- CLI


def test_main_cli(make_dataset, tmp_path: Path, caplog) -> None:
    data = make_dataset()
    out = tmp_path / "out"
    argv = ["--data-dir", str(data), "--out-dir", str(out), "--split", "random", "--num-sites", "2"]
    argv += ["--site-modalities", "site-2=t1,t2,flair", "--val-fraction", "0.3", "--seed", "1", "--shallow"]
    with caplog.at_level(logging.INFO, logger="fedbrats"):
        assert main(argv) == 0
    m = _load(out / "sites.json")
    assert m["sites"]["site-2"]["modalities"] == ["t1", "t2", "flair"]
    assert "site-2" in caplog.text and "modalities" in caplog.text  # the summary table
    caplog.clear()
    bad = ["--data-dir", str(data), "--out-dir", str(tmp_path / "o2"), "--site-modalities", "site-7=t1"]
    with caplog.at_level(logging.ERROR, logger="fedbrats"):
        assert main(bad) == 1
    assert "site-7" in caplog.text and "CBICA" in caplog.text
    assert not (tmp_path / "o2").exists()
    assert main(["--data-dir", str(tmp_path / "nowhere"), "--out-dir", str(tmp_path / "o3")]) == 1


@pytest.mark.realdata
def test_real_brats2018_shallow_institution_split(tmp_path: Path) -> None:
    real = Path(__file__).resolve().parents[1].parent / "shared/data/brats2018"
    if not real.is_dir():
        pytest.skip(f"real BraTS 2018 data not found at {real}")
    start = time.monotonic()
    rc = main(["--data-dir", str(real), "--out-dir", str(tmp_path / "out"), "--split", "institution", "--shallow"])
    elapsed = time.monotonic() - start
    assert rc == 0
    m = _load(tmp_path / "out" / "sites.json")
    assert set(m["sites"]) == {"CBICA", "TCIA", "2013"}
    assert m["convention"] == "brats2018"
    counts = {s: e["num_training"] + e["num_validation"] for s, e in m["sites"].items()}
    assert sum(counts.values()) + m["num_test"] == len(scan_cases(str(real)))
    logging.getLogger(__name__).info("real-data shallow prepare took %.2f s", elapsed)


def test_skip_invalid_leaving_one_case_at_a_site_is_refused(make_dataset, tmp_path: Path) -> None:
    """--skip-invalid must not write a site with a training case but no validation case (issue 13, item 9)."""
    ids = [*IDS_2018[:6], "Brats18_2013_1_1", "Brats18_2013_2_1"]
    data = make_dataset(ids=ids)
    _corrupt(data / "Brats18_2013_2_1" / "Brats18_2013_2_1_seg.nii.gz")
    with pytest.raises(ValueError, match=r"2013 \(1 training case\(s\) left after skipping 1 invalid\)"):
        prepare(str(data), str(tmp_path / "out"), skip_invalid=True)
    assert not (tmp_path / "out" / "sites.json").exists()


def test_convention_that_does_not_match_the_names_is_said(make_dataset, tmp_path: Path) -> None:
    """--convention brats2023 on 2018-named files: the naming is the problem, not a sequence to drop (item 12)."""
    data = make_dataset()
    with pytest.raises(InvalidCasesError) as err:
        prepare(str(data), str(tmp_path / "out"), convention="brats2023", deep_validate=False)
    problems = [e.problem for e in err.value.errors]
    assert problems and all("named in the brats2018 convention" in p for p in problems)
    assert not any("drop" in p for p in problems)


def test_uncompressed_nii_cases_are_named(make_dataset, tmp_path: Path) -> None:
    """Cases of plain .nii files are named with the fix, not reported as "no case folder" (item 12)."""
    import gzip

    data = make_dataset()
    case = data / IDS_2018[0]
    for gz in case.glob("*.nii.gz"):
        (case / gz.name[: -len(".gz")]).write_bytes(gzip.decompress(gz.read_bytes()))
        gz.unlink()
    with pytest.raises(ValueError, match=rf"uncompressed \.nii files.*{IDS_2018[0]}.*gzip"):
        scan_cases(str(data))


# ---------------------------------------------------------------------------------------------- cross-validation


def test_prepare_folds_tests_every_case_once_stratified_by_site(make_dataset, tmp_path: Path) -> None:
    from fedbrats.data.prepare import FOLDS_MANIFEST, main

    data = make_dataset()
    out = tmp_path / "folds"
    assert main(["--data-dir", str(data), "--out-dir", str(out), "--folds", "3", "--pool", "--nnunet", "off"]) == 0
    manifest = _load(out / FOLDS_MANIFEST)
    assert manifest["folds"] == 3 and manifest["fold_sites"] == [str(out / f"fold{k}" / "sites.json") for k in range(3)]
    tested: list[str] = []
    for k in range(3):
        sites = _load(out / f"fold{k}" / "sites.json")
        assert sites["fold"] == k and sites["folds"] == 3
        test = _load(sites["test_datalist"])["test"]
        test_ids = {e["case_id"] for e in test}
        tested += test_ids
        # every test case names its site, and its site is where its institution is
        assert all(e["site"] == institution_of(e["case_id"]) for e in test)
        for site in ("CBICA", "TCIA", "2013"):
            entry = sites["sites"][site]
            dl = _load(entry["datalist"])
            assert entry["num_training"] >= 1 and entry["num_validation"] >= 1
            own = {e["case_id"] for e in dl["training"] + dl["validation"]}
            assert not own & test_ids
            n_site = {"CBICA": 6, "TCIA": 4, "2013": 3}[site]
            in_test = sum(institution_of(c) == site for c in test_ids)
            assert in_test in (n_site // 3, -(-n_site // 3))  # floor or ceil of a third of the site
            assert len(own) + in_test == n_site
            # the site keeps its own test cases, with its own sequences only, for the federated evaluation
            site_test = dl["test"]
            assert {e["case_id"] for e in site_test} == {c for c in test_ids if institution_of(c) == site}
            assert entry["num_test"] == len(site_test)
            mods = entry["modalities"]
            assert all((path is not None) == (m in mods) for e in site_test for m, path in zip(MODALITIES, e["image"]))
        assert "central" in sites["sites"]  # --pool
        central = _load(sites["sites"]["central"]["datalist"])
        assert not {e["case_id"] for e in central["training"]} & test_ids
        assert {e["case_id"] for e in central["test"]} == test_ids and all(all(e["image"]) for e in central["test"])
    assert sorted(tested) == sorted(IDS_2018)  # every case a test case exactly once
    assert manifest["num_test"] == [len(_load(out / f"fold{k}" / "test.json")["test"]) for k in range(3)]
    assert max(manifest["num_test"]) - min(manifest["num_test"]) <= 1
    # the same seed gives the same folds; nothing is replaced without --overwrite
    with pytest.raises(ValueError, match="--overwrite"):
        prepare(str(data), str(out), folds=3, nnunet="off")
    prepare(str(data), str(tmp_path / "again"), folds=3, nnunet="off")
    for k in range(3):
        assert (
            _load(tmp_path / "again" / f"fold{k}" / "test.json")["test"]
            == _load(out / f"fold{k}" / "test.json")["test"]
        )


def test_prepare_folds_refuses_bad_options_and_too_small_sites(make_dataset, tmp_path: Path) -> None:
    data = make_dataset()
    with pytest.raises(ValueError, match="exclude each other"):
        prepare(str(data), str(tmp_path / "a"), folds=3, test_fraction=0.2)
    with pytest.raises(ValueError, match="folds"):
        prepare(str(data), str(tmp_path / "b"), folds=1)
    # a site of two cases: once its test case is held out, one case is left, nothing to validate on
    mapping = {"big": IDS_2018[:11], "small": IDS_2018[11:]}
    with pytest.raises(ValueError, match=r"fold \d: .*small.*fewer --folds"):
        prepare(str(data), str(tmp_path / "c"), split="map", split_map=mapping, folds=2, nnunet="off")
    assert not (tmp_path / "c").exists()


def test_assign_folds_balances_sites_and_folds() -> None:
    from fedbrats.data.splits import assign_folds

    dealt = assign_folds({"a": [f"a{i}" for i in range(7)], "b": [f"b{i}" for i in range(3)]}, 3, seed=0)
    sizes = [len(dealt["a"][k]) + len(dealt["b"][k]) for k in range(3)]
    assert sorted(sizes) == [3, 3, 4]
    assert sorted(len(f) for f in dealt["a"]) == [2, 2, 3] and all(len(f) == 1 for f in dealt["b"])
    assert sorted(c for f in dealt["a"] for c in f) == sorted(f"a{i}" for i in range(7))
    assert assign_folds({"a": ["x", "y"]}, 2, seed=1) == assign_folds({"a": ["y", "x"]}, 2, seed=1)
    with pytest.raises(ValueError, match="folds"):
        assign_folds({"a": ["x"]}, 1, seed=0)
