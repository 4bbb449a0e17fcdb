"""experiments/main_job.py: the README's main command per seed, recorded as a report (no simulator run here)."""

from __future__ import annotations

import json
from pathlib import Path

from experiments.main_job import final_validation, seeded_job, write_report

REPO = Path(__file__).resolve().parents[1]


def test_the_seed_goes_into_both_configs_of_a_copy(tmp_path: Path) -> None:
    job = seeded_job(str(REPO / "jobs" / "fedkd"), str(tmp_path), 2)
    server = json.loads((Path(job) / "app" / "config" / "config_fed_server.json").read_text())
    client = json.loads((Path(job) / "app" / "config" / "config_fed_client.json").read_text())
    assert server["workflows"][0]["args"]["seed"] == 2
    assert client["executors"][0]["executor"]["args"]["training"]["seed"] == 2
    committed = json.loads((REPO / "jobs" / "fedkd" / "app" / "config" / "config_fed_server.json").read_text())
    assert committed["workflows"][0]["args"]["seed"] == 0, "the committed job is left as it is"


def test_the_report_holds_each_seeds_final_validation(tmp_path: Path) -> None:
    history = [
        {"round": 0, "sites": {"site-1": {"modalities": ["t1"], "metrics": {}}}, "aggregated": {}},
        {
            "round": 1,
            "final_validation": True,
            "sites": {"site-1": {"metrics": {"val_mean_dice": 0.7}}},
            "aggregated": {"val_mean_dice": 0.7, "val_dice_WT": 0.8, "val_dice_TC": 0.7, "val_dice_ET": 0.6},
        },
    ]
    (tmp_path / "metrics.json").write_text(json.dumps(history))
    result = final_validation(str(tmp_path))
    assert result["mean_dice"] == 0.7 and result["rounds"] == 1 and result["sites"]["site-1"]["modalities"] == ["t1"]
    runs = [{"seed": s, "wall_seconds": 100.0 + s, **result} for s in (0, 1)]
    write_report(str(tmp_path / "out"), runs, "python experiments/main_job.py --seeds 0,1", "jobs/fedkd")
    report = json.loads((tmp_path / "out" / "results.json").read_text())
    assert report["mean_over_seeds"] == 0.7 and len(report["runs"]) == 2 and "native_bfloat16" in report["machine"]
    assert "| 1 | 1 | 0.700 | 0.800 | 0.700 | 0.600 | 0.700 | 101.0 |" in (tmp_path / "out" / "report.md").read_text()
    # a run that ended with the federated evaluation: its matrix beside the report, no machine path in it
    run_dir = tmp_path / "run"
    (run_dir / "cross_site_val").mkdir(parents=True)
    scores = {
        "test_num_cases": 2.0,
        "test_mean_dice": 0.5,
        "test_dice_WT": 0.6,
        "test_dice_TC": 0.5,
        "test_dice_ET": 0.4,
    }
    (run_dir / "cross_site_val" / "cross_val_results.json").write_text(
        json.dumps(
            {
                "site-1": {"FL_global_model.pt": scores},
                "site-2": {"FL_global_model.pt": {**scores, "test_mean_dice": 0.3}},
            }
        )
    )
    write_report(str(tmp_path / "out2"), [{**runs[0], "run_dir": str(run_dir)}], "cmd", "jobs/fedkd")
    assert (tmp_path / "out2" / "seed0" / "cross_site" / "cross_site_matrix.md").is_file()
    saved = json.loads((tmp_path / "out2" / "results.json").read_text())["runs"][0]
    assert "run_dir" not in saved and saved["cross_site"]["final_worst_site"] == {"site": "site-2", "mean_dice": 0.3}
    assert "| 0 | 0.400 | site-2 (0.300) |" in (tmp_path / "out2" / "report.md").read_text()
