"""experiments/mmccd_compare.py: the report of MMCCD against its baselines (no training here)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from experiments.mmccd_compare import write_report


def _result(auroc: float, per_case: list[float]) -> dict:
    cases = [{"case_id": f"c{i}", "auroc": a, "dice": 0.5} for i, a in enumerate(per_case)]
    test = {"auroc": auroc, "auprc": 0.5, "dice": 0.4, "dice_best_threshold_on_these_slices_optimistic": 0.45}
    baseline = {"auroc": 0.9, "auprc": 0.8, "dice": 0.7, "dice_best_threshold_on_these_slices_optimistic": 0.75}
    return {"test": {**test, "per_case": cases}, "intensity_baseline": {**baseline, "per_case": cases}}


def test_report_averages_seeds_and_local_sites_and_pairs_mmccd_with_each_row(tmp_path: Path) -> None:
    rows = {
        "mmccd federated": {0: [_result(0.8, [0.8, 0.9])], 1: [_result(0.9, [0.9, 1.0])]},
        "cyclic_unet federated": {0: [_result(0.7, [0.7, 0.8])], 1: [_result(0.7, [0.7, 0.8])]},
        "mmccd local": {0: [_result(0.6, [0.6, 0.6]), _result(0.8, [0.8, 0.8])]},
    }
    text = write_report(rows, str(tmp_path), "python experiments/mmccd_compare.py --out-dir OUT")
    summary = json.loads((tmp_path / "comparison.json").read_text())["rows"]
    assert summary["mmccd federated"]["auroc"] == [0.8, 0.9]
    assert summary["mmccd local"]["auroc"] == [pytest.approx(0.7)]  # the sites of one seed averaged
    paired = summary["mmccd federated - cyclic_unet federated"]
    # Per case, over the two seeds: (0.1 + 0.2) / 2 and (0.1 + 0.2) / 2.
    assert paired["mean"] == pytest.approx(0.15) and paired["num_cases"] == 2 and paired["seeds"] == [0, 1]
    assert "mmccd local" not in {k.split(" - ")[-1] for k in summary if " - " in k}  # several models per seed
    assert "source intensity (no model)" in text and "0.961" not in text
