"""experiments/mmccd_compare.py: the report of MMCCD against its baselines (no training here)."""

from __future__ import annotations

import json
import os
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


def test_report_says_which_erosion_scored_its_rows(tmp_path: Path) -> None:
    from experiments.mmccd_compare import OLD_EROSION, erosion_of

    old = {**_result(0.8, [0.8, 0.9]), "options": {"num_masks": 32}}
    new = {**_result(0.8, [0.8, 0.9]), "options": {"num_masks": 32, "erosion_disk_radius": 4}}
    assert erosion_of(old) == OLD_EROSION and erosion_of(new) == "disk(4)" and erosion_of({}) == "unknown"
    text = write_report({"mmccd federated": {0: [new]}}, str(tmp_path), "cmd")
    assert "eroded by: disk(4)" in text
    assert json.loads((tmp_path / "comparison.json").read_text())["erosion"] == ["disk(4)"]
    text = write_report({"mmccd federated": {0: [new]}, "mmccd local": {0: [old]}}, str(tmp_path), "cmd")
    assert "disk(4)" in text and OLD_EROSION in text  # mixed rows are said to be mixed


def _args(**kw: object):
    import argparse

    defaults = {"rescore": False, "erosion_disk_radius": 4, "zoom": 0.5, "masks": 2, "steps": 1}
    return argparse.Namespace(**{**defaults, "brain_fraction": 0.6, **kw})


def test_rescore_scores_a_finished_run_again_without_training(tmp_path: Path, monkeypatch, caplog) -> None:
    import experiments.mmccd_compare as compare
    from fedbrats.simulate import simulated_run_dir

    ws = tmp_path / "mmccd-federated" / "seed0"
    ws.mkdir(parents=True)
    old = {**_result(0.8, [0.8, 0.9]), "options": {"num_masks": 2}, "training": {"seed": 0, "rounds": 10}}
    (ws / "results.json").write_text(json.dumps(old))

    def never_trains(*a: object, **k: object) -> None:
        raise AssertionError("rescore must not train")

    scored: list[int] = []

    def fake_score(run_dir: str, args, test_list: str, val_list: str) -> tuple[dict, str]:
        scored.append(args.erosion_disk_radius)
        return {**_result(0.7, [0.7, 0.7]), "options": {"erosion_disk_radius": args.erosion_disk_radius}}, "best.pt"

    monkeypatch.setattr(compare, "simulate", never_trains)
    monkeypatch.setattr(compare, "score_run", fake_score)
    # Without --rescore the old results are reused, with a warning that they were scored otherwise.
    assert compare.run_one(str(ws), "mmccd", ["a"], 0, _args(), "s", "t", "v") == old
    assert "--rescore" in caplog.text and not scored
    # --rescore refuses a workspace whose run never finished.
    with pytest.raises(ValueError, match="no finished run"):
        compare.run_one(str(ws), "mmccd", ["a"], 0, _args(rescore=True), "s", "t", "v")
    os.makedirs(simulated_run_dir(str(ws)))
    new = compare.run_one(str(ws), "mmccd", ["a"], 0, _args(rescore=True), "s", "t", "v")
    assert scored == [4] and compare.erosion_of(new) == "disk(4)"
    assert new["training"] == {"seed": 0, "rounds": 10, "checkpoint": "best.pt"}  # carried over
    assert new["rescored_from"]["erosion"] == compare.OLD_EROSION
    assert json.loads((ws / "results.json").read_text()) == new
    assert json.loads((ws / compare.PREVIOUS_RESULTS).read_text()) == old
    # A second rescore keeps the results from before the first.
    compare.run_one(str(ws), "mmccd", ["a"], 0, _args(rescore=True, erosion_disk_radius=2), "s", "t", "v")
    assert json.loads((ws / compare.PREVIOUS_RESULTS).read_text()) == old and scored == [4, 2]


def test_driver_refuses_a_bad_erosion_radius_by_name(capsys) -> None:
    from experiments.mmccd_compare import main

    for bad in ("-1", "99", "1.5"):
        with pytest.raises(SystemExit):
            main(["--workspace", "w", "--out-dir", "o", "--erosion-disk-radius", bad])
        assert "--erosion-disk-radius" in capsys.readouterr().err
