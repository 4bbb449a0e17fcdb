"""A site with a few unreadable cases skips them with a warning; a site where most fail reports an error."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from fedbrats.data.loader import DataConfig, make_loaders


def _site_with_corrupt_cases(tiny_federation: str, tmp_path: Path, n_corrupt: int) -> str:
    """A copy of the pooled site's datalist in which ``n_corrupt`` training cases point to a truncated T1."""
    sites = json.loads(Path(tiny_federation).read_text())["sites"]
    datalist = json.loads(Path(sites["central"]["datalist"]).read_text())
    for i, case in enumerate(datalist["training"][:n_corrupt]):
        original = Path(case["image"][0]).read_bytes()
        broken = tmp_path / f"broken_{i}_t1.nii.gz"
        broken.write_bytes(original[: len(original) // 2])
        case["image"][0] = str(broken)
    out = tmp_path / "datalist.json"
    out.write_text(json.dumps(datalist))
    return str(out)


def test_a_few_unreadable_cases_are_skipped_with_a_warning(tiny_federation, tmp_path, caplog) -> None:
    path = _site_with_corrupt_cases(tiny_federation, tmp_path, n_corrupt=1)
    n_training = len(json.loads(Path(path).read_text())["training"])
    with caplog.at_level(logging.WARNING, logger="fedbrats.data.loader"):
        train, _ = make_loaders(path, ["t1", "t1ce", "t2", "flair"], "brats2018", DataConfig(roi_size=(16, 16, 16)))
    assert len(train.dataset) == n_training - 1
    assert any("broken_0_t1.nii.gz" in r.getMessage() for r in caplog.records), "the warning must name the file"


def test_a_site_where_most_cases_fail_refuses_to_train(tiny_federation, tmp_path) -> None:
    path = _site_with_corrupt_cases(tiny_federation, tmp_path, n_corrupt=3)
    with pytest.raises(ValueError, match=r"(?s)3 of 4 cases are unreadable.*broken_0_t1\.nii\.gz"):
        make_loaders(path, ["t1", "t1ce", "t2", "flair"], "brats2018", DataConfig(roi_size=(16, 16, 16)))


def test_cached_cases_are_not_modified_by_random_augmentation(tiny_federation) -> None:
    """Random steps work on a copy: drawing the same case twice starts from the same preprocessed volume."""
    site = json.loads(Path(tiny_federation).read_text())["sites"]["central"]
    train, _ = make_loaders(site["datalist"], ["t1", "t1ce", "t2", "flair"], "brats2018", DataConfig((16, 16, 16)))
    before = train.dataset.data[0]["image"].clone()
    for _ in range(3):
        train.dataset[0]
    assert (train.dataset.data[0]["image"] == before).all()
