"""Tests of the site data path: DataConfig, datalists, loaders, site configuration lookup and synthetic federations."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

import fedbrats.data.federation as federation
from fedbrats.constants import MODALITIES
from fedbrats.data.conventions import BRATS2018
from fedbrats.data.federation import POOLED_SITE, add_pooled_site, make_synthetic_federation
from fedbrats.data.loader import DataConfig, make_loaders, read_datalist
from fedbrats.data.site_config import (
    LOCAL_CONFIG_NAME,
    SITE_CONFIG_ENV,
    load_site_config,
    resolve_site_config,
)
from fedbrats.data.synthetic import generate_case
from fedbrats.data.transforms import LoadBraTSCase
from fedbrats.data.validation import CaseValidationError

ROI = (16, 16, 16)


@pytest.fixture(scope="module")
def fed2018(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The default four-site synthetic federation (2018 naming), 3 cases per site, 16^3; its sites.json."""
    return make_synthetic_federation(str(tmp_path_factory.mktemp("fed2018")), cases_per_site=3, size=16)


@pytest.fixture(scope="module")
def fed2023(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The same federation in the BraTS 2023 convention (ET = 3)."""
    return make_synthetic_federation(
        str(tmp_path_factory.mktemp("fed2023")), cases_per_site=3, size=16, convention="brats2023"
    )


def _manifest(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _write_json(path: Path, content: object) -> str:
    path.write_text(json.dumps(content), encoding="utf-8")
    return str(path)


# ------------------------------------------------------------------------------------------------ DataConfig


@pytest.mark.parametrize(
    ("values", "option"),
    [
        ({"roi_size": [12, 16, 16]}, "roi_size"),
        ({"roi_size": [16, 16]}, "roi_size"),
        ({"roi_size": [4, 8, 8]}, "roi_size"),
        ({"zoom": 1.5}, "zoom"),
        ({"batch_size": 0}, "batch_size"),
        ({"cache_rate": 1.2}, "cache_rate"),
        ({"roi_szie": [16, 16, 16]}, "roi_szie"),
        ({"extra": {}}, "extra"),
    ],
)
def test_data_config_errors_name_the_option(values: dict, option: str) -> None:
    """Every invalid or unknown data option fails with a message naming it."""
    with pytest.raises(ValueError, match=option):
        DataConfig.from_dict(values)


def test_data_config_from_dict_defaults_and_tuple() -> None:
    """from_dict(None) gives the defaults; roi_size becomes a tuple of ints."""
    assert DataConfig.from_dict(None) == DataConfig()
    cfg = DataConfig.from_dict({"roi_size": [16, 24, 32], "batch_size": 3})
    assert cfg.roi_size == (16, 24, 32) and cfg.batch_size == 3


# --------------------------------------------------------------------------------------------- read_datalist


def test_read_datalist_missing_file(tmp_path: Path) -> None:
    """A missing datalist is named in the error."""
    path = str(tmp_path / "nope.json")
    with pytest.raises(ValueError, match="does not exist") as info:
        read_datalist(path, "training")
    assert path in str(info.value)


def test_read_datalist_bad_json(tmp_path: Path) -> None:
    """A datalist that is not JSON is named in the error."""
    path = tmp_path / "bad.json"
    path.write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="not valid JSON") as info:
        read_datalist(str(path), "training")
    assert str(path) in str(info.value)


def test_read_datalist_missing_key_and_empty_list(tmp_path: Path) -> None:
    """A missing section and an empty section are errors naming the file and the section."""
    path = _write_json(tmp_path / "dl.json", {"training": [], "other": 1})
    with pytest.raises(ValueError, match="'validation'") as info:
        read_datalist(path, "validation")
    assert path in str(info.value)
    with pytest.raises(ValueError, match="empty") as info:
        read_datalist(path, "training")
    assert path in str(info.value)


def test_read_datalist_resolves_relative_paths(tmp_path: Path) -> None:
    """Relative paths are relative to the datalist; null (absent) sequences and absolute paths are kept."""
    entry = {"image": ["a/t1.nii.gz", None, "/abs/t2.nii.gz", ""], "label": "a/seg.nii.gz", "case_id": "c"}
    path = _write_json(tmp_path / "dl.json", {"training": [entry]})
    (out,) = read_datalist(path, "training")
    assert out["image"] == [str(tmp_path / "a/t1.nii.gz"), None, "/abs/t2.nii.gz", ""]
    assert out["label"] == str(tmp_path / "a/seg.nii.gz") and out["case_id"] == "c"


# ---------------------------------------------------------------------------------------------- make_loaders


def test_train_loader_missing_sequences_stay_zero(fed2018: str) -> None:
    """A t2+flair site: t1/t1ce channels exactly 0 in every batch (augmentation included), mask [0,0,1,1],
    binary 3-channel label, image of the roi size."""
    site = _manifest(fed2018)["sites"]["site-3"]
    assert site["modalities"] == ["t2", "flair"]
    cfg = DataConfig(roi_size=ROI, batch_size=1, augment=True, modality_dropout=0.0)
    train, _ = make_loaders(site["datalist"], ("t2", "flair"), "brats2018", cfg)
    torch.manual_seed(0)
    seen = 0
    for _ in range(25):  # random flips, scale and shift: the absent channels must survive all of them
        for batch in train:
            image, label, mask = batch["image"], batch["label"], batch["modality_mask"]
            assert tuple(image.shape) == (1, 4, *ROI) and image.dtype == torch.float32
            assert torch.count_nonzero(image[:, :2]) == 0
            assert torch.count_nonzero(image[:, 2:]) > 0
            assert mask.tolist() == [[0.0, 0.0, 1.0, 1.0]]
            assert tuple(label.shape) == (1, 3, *ROI)
            assert set(torch.unique(label).tolist()) <= {0.0, 1.0}
            seen += 1
    assert seen == 25 * site["num_training"]


def test_teacher_view_is_the_sample_before_sequence_dropout(fed2018: str) -> None:
    """With teacher_view, a batch also holds the same crop with every sequence the site has; dropout shaped only
    the student's view (image, modality_mask)."""
    site = _manifest(fed2018)["sites"]["site-2"]  # t1, t2, flair
    cfg = DataConfig(roi_size=ROI, batch_size=1, modality_dropout=1.0)
    train, _ = make_loaders(site["datalist"], ("t1", "t2", "flair"), "brats2018", cfg, teacher_view=True)
    hid_something = 0
    for _ in range(10):
        for batch in train:
            student, available = batch["modality_mask"][0], batch["available_modality_mask"][0]
            assert available.tolist() == [1.0, 0.0, 1.0, 1.0]
            assert bool((student <= available).all()) and student.sum() >= 1
            for c in range(4):
                full, seen = batch["available_image"][0, c], batch["image"][0, c]
                if student[c]:
                    assert torch.equal(full, seen)  # the same crop and augmentation
                else:
                    assert torch.count_nonzero(seen) == 0
                    if available[c]:
                        assert torch.count_nonzero(full) > 0
            hid_something += int(student.sum() < available.sum())
    assert hid_something > 0
    plain, _ = make_loaders(site["datalist"], ("t1", "t2", "flair"), "brats2018", cfg)
    assert "available_image" not in next(iter(plain))


def test_train_loader_modality_dropout_consistent(fed2018: str) -> None:
    """With modality dropout, every dropped channel is exactly zero and its mask entry 0; absent ones stay off."""
    site = _manifest(fed2018)["sites"]["site-2"]  # t1, t2, flair
    cfg = DataConfig(roi_size=ROI, batch_size=1, augment=False, modality_dropout=1.0)
    train, _ = make_loaders(site["datalist"], ("t1", "t2", "flair"), "brats2018", cfg)
    masks = set()
    for _ in range(20):
        for batch in train:
            mask = batch["modality_mask"][0]
            masks.add(tuple(mask.tolist()))
            assert mask[1] == 0 and mask.sum() >= 1
            for c in range(4):
                if mask[c] == 0:
                    assert torch.count_nonzero(batch["image"][0, c]) == 0
    assert len(masks) > 1


def test_eval_loader_pads_to_multiple_of_8(fed2018: str) -> None:
    """Validation volumes are whole (cropped) volumes padded to a multiple of 8, label on the same grid."""
    site = _manifest(fed2018)["sites"]["site-1"]
    cfg = DataConfig(roi_size=ROI, augment=False)
    _, val = make_loaders(site["datalist"], MODALITIES, "brats2018", cfg)
    batches = list(val)
    assert len(batches) == site["num_validation"]
    for batch in batches:
        spatial = tuple(batch["image"].shape[2:])
        assert all(s % 8 == 0 for s in spatial)
        assert tuple(batch["label"].shape) == (1, 3, *spatial)
        assert batch["modality_mask"].tolist() == [[1.0, 1.0, 1.0, 1.0]]
    _, val12 = make_loaders(site["datalist"], MODALITIES, "brats2018", cfg, divisor=12)
    for batch in val12:
        assert all(s % 12 == 0 for s in batch["image"].shape[2:])


def test_make_loaders_rejects_unknown_modality(fed2018: str) -> None:
    """An unknown sequence name fails before any data is read."""
    site = _manifest(fed2018)["sites"]["site-1"]
    with pytest.raises(ValueError, match="t1c"):
        make_loaders(site["datalist"], ("t1c",), "brats2018", DataConfig(roi_size=ROI))


# --------------------------------------------------------------------------------------------- site configs


def _single_site_file(path: Path, site: str, datalist: str, modalities: list[str]) -> str:
    return _write_json(path, {"sites": {site: {"datalist": datalist, "modalities": modalities}}})


def test_resolve_site_config_order(fed2018: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """FEDBRATS_SITE_CONFIG wins over the workspace's local/fedbrats_site.json, which wins over the default."""
    sites = _manifest(fed2018)["sites"]
    datalist = sites["site-3"]["datalist"]
    calls: list[int] = []

    def fake_default(cache_dir: str | None = None) -> str:
        calls.append(1)
        return fed2018

    monkeypatch.setattr(federation, "ensure_default_federation", fake_default)
    monkeypatch.delenv(SITE_CONFIG_ENV, raising=False)
    workspace = tmp_path / "ws"
    (workspace / "local").mkdir(parents=True)

    # 3. nothing configured: the embedded default.
    cfg = resolve_site_config("site-3", str(workspace))
    assert cfg.modalities == ("t2", "flair") and cfg.source == fed2018 and calls == [1]

    # 2. the workspace's local file.
    local = _single_site_file(workspace / "local" / LOCAL_CONFIG_NAME, "site-3", datalist, ["flair"])
    cfg = resolve_site_config("site-3", str(workspace))
    assert cfg.modalities == ("flair",) and cfg.source == local and calls == [1]

    # 1. the environment variable.
    env = _single_site_file(tmp_path / "env.json", "site-3", datalist, ["t2"])
    monkeypatch.setenv(SITE_CONFIG_ENV, env)
    cfg = resolve_site_config("site-3", str(workspace))
    assert cfg.modalities == ("t2",) and cfg.source == env and calls == [1]
    assert cfg.datalist == datalist and cfg.mask == [False, False, True, False]


def test_load_site_config_unknown_site_lists_sites(fed2018: str) -> None:
    """An unknown site name is refused, listing the sites the file has."""
    with pytest.raises(ValueError, match="site-9") as info:
        load_site_config(fed2018, "site-9")
    for name in ("site-1", "site-2", "site-3", "site-4", POOLED_SITE):
        assert name in str(info.value)


def test_load_site_config_bad_modality(tmp_path: Path, fed2018: str) -> None:
    """A misspelt sequence name is refused, naming it and the site."""
    datalist = _manifest(fed2018)["sites"]["site-1"]["datalist"]
    path = _single_site_file(tmp_path / "s.json", "site-1", datalist, ["t1", "T2w"])
    with pytest.raises(ValueError, match="T2w") as info:
        load_site_config(path, "site-1")
    assert "site-1" in str(info.value)
    path = _write_json(tmp_path / "s2.json", {"sites": {"site-1": {"datalist": datalist, "modalities": "t1"}}})
    with pytest.raises(ValueError, match="modalities"):
        load_site_config(path, "site-1")


def test_load_site_config_missing_datalist_and_files(tmp_path: Path) -> None:
    """A datalist that does not exist, a missing config file, bad JSON and no 'sites' are named errors."""
    missing = str(tmp_path / "gone.json")
    path = _single_site_file(tmp_path / "s.json", "site-1", missing, ["t1"])
    with pytest.raises(ValueError, match="does not exist") as info:
        load_site_config(path, "site-1")
    assert missing in str(info.value)
    with pytest.raises(ValueError, match="does not exist"):
        load_site_config(str(tmp_path / "none.json"), "site-1")
    (tmp_path / "bad.json").write_text("[", encoding="utf-8")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_site_config(str(tmp_path / "bad.json"), "site-1")
    with pytest.raises(ValueError, match="'sites'"):
        load_site_config(_write_json(tmp_path / "empty.json", {"sites": {}}), "site-1")


def test_load_site_config_relative_datalist_and_order(tmp_path: Path) -> None:
    """A relative datalist is relative to the config file; modalities come back in canonical order."""
    (tmp_path / "lists").mkdir()
    _write_json(tmp_path / "lists" / "a.json", {"training": []})
    path = _single_site_file(tmp_path / "s.json", "a", "lists/a.json", ["flair", "t1"])
    cfg = load_site_config(path, "a")
    assert cfg.datalist == str(tmp_path / "lists" / "a.json")
    assert cfg.modalities == ("t1", "flair") and cfg.convention == "brats2018"


# ------------------------------------------------------------------------------------------------ federation


def test_pooled_site_has_every_case_with_all_sequences(fed2018: str) -> None:
    """The 'central' site holds every site's training, validation and test cases, all four sequence paths set (its
    test cases are what the centralized job's federated evaluation scores)."""
    manifest = _manifest(fed2018)
    sites = manifest["sites"]
    assert sites[POOLED_SITE]["modalities"] == list(MODALITIES)
    central = _manifest(sites[POOLED_SITE]["datalist"])
    for key in ("training", "validation", "test"):
        expected = set()
        for name, entry in sites.items():
            if name != POOLED_SITE:
                expected |= {c["case_id"] for c in _manifest(entry["datalist"])[key]}
        assert {c["case_id"] for c in central[key]} == expected
        assert len(central[key]) == len(expected) == sites[POOLED_SITE][f"num_{key}"]
        for case in central[key]:
            assert len(case["image"]) == 4 and all(case["image"])
            assert all(os.path.isfile(p) for p in case["image"])
            for modality, p in zip(MODALITIES, case["image"]):
                assert p.endswith(BRATS2018.filename(case["case_id"], modality))


def test_add_pooled_site_refuses_a_missing_sequence(tmp_path: Path) -> None:
    """Pooling a case whose absent sequence does not exist on disk fails naming the file."""
    case_id = "Brats18_SITEA_001_1"
    case_dir = Path(generate_case(str(tmp_path / "cases"), case_id, size=16))
    t1ce = case_dir / BRATS2018.filename(case_id, "t1ce")
    os.remove(t1ce)
    image = [str(case_dir / BRATS2018.filename(case_id, m)) if m != "t1ce" else None for m in MODALITIES]
    entry = {"case_id": case_id, "image": image, "label": str(case_dir / BRATS2018.filename(case_id, "seg"))}
    datalist = _write_json(tmp_path / "a.json", {"training": [entry], "validation": []})
    manifest = _write_json(tmp_path / "sites.json", {"sites": {"a": {"datalist": datalist}}})
    with pytest.raises(ValueError, match="all") as info:
        add_pooled_site(manifest)
    assert str(t1ce) in str(info.value)


def test_add_pooled_site_is_idempotent(fed2018: str, tmp_path: Path) -> None:
    """Running it again (e.g. `fedbrats pool-sites` twice) does not pool the central site into itself."""
    root = Path(fed2018).parent
    copy = tmp_path / "copy"
    shutil.copytree(root, copy, ignore=shutil.ignore_patterns("cases"))
    manifest = str(copy / "sites.json")
    before = _manifest(manifest)["sites"][POOLED_SITE]["num_training"]
    add_pooled_site(manifest)
    assert _manifest(manifest)["sites"][POOLED_SITE]["num_training"] == before


def test_brats2023_federation_loads_with_et_label_3(fed2023: str) -> None:
    """A 2023-convention federation: files use 2023 names, ET is 3 on disk and lands in the ET channel."""
    manifest = _manifest(fed2023)
    assert manifest["convention"] == "brats2023"
    site = manifest["sites"]["site-1"]
    assert site["convention"] == "brats2023"
    assert manifest["sites"][POOLED_SITE]["convention"] == "brats2023"
    cfg = load_site_config(fed2023, "site-1")
    (entry,) = read_datalist(cfg.datalist, "validation")
    assert entry["image"][0].endswith("-t1n.nii.gz")
    raw = LoadBraTSCase(MODALITIES, "brats2023")(entry["image"], entry["label"], entry["case_id"])["label"]
    values = set(torch.unique(raw).tolist())
    assert 3 in values and 4 not in values
    with pytest.raises(CaseValidationError, match="ET"):
        LoadBraTSCase(MODALITIES, "brats2018")(entry["image"], entry["label"], entry["case_id"])

    _, val = make_loaders(cfg.datalist, cfg.modalities, cfg.convention, DataConfig(roi_size=ROI, augment=False))
    (batch,) = list(val)
    label = batch["label"][0]
    et = label[2]
    assert et.sum() > 0
    assert bool((label[1] >= et).all()) and bool((label[0] >= label[1]).all())  # ET within TC within WT
