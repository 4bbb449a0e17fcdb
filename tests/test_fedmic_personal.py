"""experiments/fedmic_personal.py --summarise: seeds' per-site tables into mean ± std and paired differences."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from experiments.fedmic_personal import main


def _seed(folder: Path, personal: float, shared: float) -> str:
    row = {"WT": 0.0, "TC": 0.0, "ET": 0.0}
    sites = {
        "site-1": {
            "sequences": "t1+t1ce+t2+flair",
            "personalised": {**row, "mean": personal},
            "shared (FedMIC global)": {**row, "mean": shared},
        }
    }
    folder.mkdir()
    (folder / "personal.json").write_text(json.dumps({"command": "x", "sites": sites}))
    return str(folder)


def test_summary_of_three_seeds(tmp_path: Path) -> None:
    seeds = [_seed(tmp_path / f"s{i}", p, s) for i, (p, s) in enumerate([(0.5, 0.6), (0.7, 0.6), (0.6, 0.9)])]
    assert main(["--summarise", *seeds, "--out-dir", str(tmp_path / "out")]) == 0
    text = (tmp_path / "out" / "summary.md").read_text()
    assert "| site-1 | t1+t1ce+t2+flair | 0.600 ± 0.100 | 0.700 ± 0.173 |" in text
    assert "| site-1 | -0.100 (2 of 3) |" in text
    with pytest.raises(ValueError, match="personal.json"):
        main(["--summarise", str(tmp_path / "missing"), "--out-dir", str(tmp_path / "out")])
