"""Shared fixtures: tiny synthetic federations made once per session, and the real-data location."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

# Before anything imports torch: one OpenMP thread per test process.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from fedbrats.data.conventions import BRATS2018, BraTSConvention
from tests.helpers import IDS_2018, write_case

REPO_ROOT = Path(__file__).resolve().parents[1]
REAL_DATA = REPO_ROOT.parent / "shared" / "data" / "brats2018"


@pytest.fixture(scope="session")
def tiny_federation(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A 4-site synthetic federation (3 cases per site, 16^3 voxels); returns its sites.json."""
    from fedbrats.data.federation import make_synthetic_federation

    out = tmp_path_factory.mktemp("tiny_federation")
    return make_synthetic_federation(str(out), cases_per_site=3, size=16, test_fraction=0.34, val_fraction=0.5)


@pytest.fixture
def real_named_federation(tiny_federation: str, tmp_path: Path) -> Path:
    """The tiny federation's site-1/site-2 renamed CBICA/TCIA (as `prepare --split institution` names real sites),
    with absolute paths, in ``tmp_path/real/sites.json``; returns that file."""
    import json

    manifest = json.loads(Path(tiny_federation).read_text())
    base = os.path.dirname(tiny_federation)
    sites = {}
    for old, new in (("site-1", "CBICA"), ("site-2", "TCIA")):
        entry = dict(manifest["sites"][old])
        entry["datalist"] = os.path.join(base, entry["datalist"])
        sites[new] = entry
    test = os.path.join(base, manifest["test_datalist"])
    path = tmp_path / "real" / "sites.json"
    path.parent.mkdir()
    path.write_text(json.dumps({"sites": sites, "test_datalist": test}))
    return path


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Never write the embedded default data into the user's home during tests."""
    monkeypatch.setenv("FEDBRATS_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))
    monkeypatch.delenv("FEDBRATS_SITE_CONFIG", raising=False)


@pytest.fixture
def make_dataset(tmp_path: Path) -> Callable[..., Path]:
    """Factory writing a data folder of small random cases; returns the folder."""

    def _make(
        ids: Sequence[str] = IDS_2018,
        convention: BraTSConvention = BRATS2018,
        missing: dict[str, Sequence[str]] | None = None,
        name: str = "data",
    ) -> Path:
        root = tmp_path / name
        root.mkdir()
        for i, case_id in enumerate(ids):
            write_case(root, case_id, convention, missing=(missing or {}).get(case_id, ()), seed=i)
        return root

    return _make


@pytest.fixture(scope="session")
def exported_segresnet(tmp_path_factory: pytest.TempPathFactory) -> str:
    """An exported model folder (a MONAI bundle) of an untrained 8-filter SegResNet, 16³ window, 1 mm."""
    import json

    import torch

    from fedbrats.evaluation.export import export_model
    from fedbrats.networks import build_network, model_spec

    root = tmp_path_factory.mktemp("exported_segresnet")
    run = root / "run"
    (run / "app_server").mkdir(parents=True)
    net = build_network("segresnet", init_filters=8)
    (run / "model_spec.json").write_text(json.dumps(model_spec(net)))
    torch.save({"model": net.state_dict()}, run / "app_server" / "best_FL_global_model.pt")
    return export_model(str(run), str(root / "exported"), roi_size=(16, 16, 16), zoom=1.0)


def real_data_or_skip() -> Path:
    """The shared BraTS 2018 cases, or skip the test where they are absent (CI and users)."""
    if not REAL_DATA.is_dir() or not any(REAL_DATA.iterdir()):
        pytest.skip(f"real BraTS data not found at {REAL_DATA}")
    return REAL_DATA
