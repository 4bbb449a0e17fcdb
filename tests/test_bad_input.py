"""Bad input and silent wrong results of issue 13: each is refused or named, before anything is damaged."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import pytest


def _real_named_federation(tiny_federation: str, tmp_path: Path) -> Path:
    """The tiny federation's site-1/site-2 renamed CBICA/TCIA (as `prepare --split institution` names them)."""
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


# ---- item 5: FEDBRATS_SITE_CONFIG is honoured by simulate, compare and evaluate -----------------------------
def test_simulate_uses_the_exported_site_config(
    tiny_federation: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from fedbrats.federated import simulate as sim

    sites = _real_named_federation(tiny_federation, tmp_path)
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
    tiny_federation: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedbrats.evaluation import compare
    from fedbrats.evaluation.evaluate import default_test_datalist

    sites = _real_named_federation(tiny_federation, tmp_path)
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
