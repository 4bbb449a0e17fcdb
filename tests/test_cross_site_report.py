"""The report of the federated cross-site evaluation (`fedbrats cross-site`): every model scored at every site."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pytest

from fedbrats.cli import main as cli_main
from fedbrats.constants import REGIONS
from fedbrats.federated.protocol import (
    TEST_NUM_CASES_KEY,
    cross_site_combination_key,
    cross_site_metric_key,
)
from fedbrats.federated.server.cross_site_report import (
    NO_METRICS_REASON,
    cross_site_scalars,
    cross_site_summary,
    format_cross_site_markdown,
    plot_cross_site_heatmap,
    read_cross_site_results,
    write_cross_site_report,
)
from fedbrats.runs import BEST_GLOBAL_MODEL_FILE as BEST
from fedbrats.runs import GLOBAL_MODEL_FILE as FINAL
from fedbrats.runs import RunFolder

PNG = b"\x89PNG\r\n\x1a\n"


def metrics(cases: int, dice: float, hd95: float = 10.0, all15: float | None = None) -> dict[str, float]:
    """A site's metrics of one model: every region at ``dice`` (WT a little higher), HD95 ``hd95``."""
    out = {TEST_NUM_CASES_KEY: float(cases), cross_site_metric_key("dice"): dice, cross_site_metric_key("hd95"): hd95}
    for region in REGIONS:
        out[cross_site_metric_key("dice", region)] = dice + (0.1 if region == "WT" else 0.0)
        out[cross_site_metric_key("hd95", region)] = hd95
    if all15 is not None:
        out[cross_site_metric_key("dice", all15=True)] = all15
        out[cross_site_metric_key("hd95", all15=True)] = 2 * hd95
        out[cross_site_combination_key("flair")] = all15 / 2
        out[cross_site_combination_key(("flair", "t2", "t1ce", "t1"))] = dice
    return out


#: Three sites: CBICA (4 cases, all four sequences), TCIA (12 cases), EMPTY (no labelled test cases); the final and
#: best global models and CBICA's own model. TCIA failed to score the best global model.
RESULTS: dict[str, dict[str, dict[str, float]]] = {
    "CBICA": {FINAL: metrics(4, 0.8, all15=0.6), BEST: metrics(4, 0.9, all15=0.7), "CBICA": metrics(4, 0.85)},
    "TCIA": {FINAL: metrics(12, 0.4, hd95=30.0), "CBICA": metrics(12, 0.3)},
    "EMPTY": {FINAL: {TEST_NUM_CASES_KEY: 0.0}, BEST: {}, "CBICA": {TEST_NUM_CASES_KEY: 0.0}},
}
ERRORS = {"TCIA": {BEST: "RuntimeError: CUDA out of memory"}}


def write_run(run_dir: Path, results: Any = RESULTS, errors: Any = ERRORS) -> RunFolder:
    folder = RunFolder(str(run_dir))
    os.makedirs(folder.cross_site_dir, exist_ok=True)
    Path(folder.cross_site_results).write_text(json.dumps(results))
    if errors is not None:
        Path(folder.cross_site_errors).write_text(json.dumps(errors))
    return folder


def test_the_key_names_are_the_contracts() -> None:
    assert cross_site_metric_key("dice", "WT") == "test_dice_WT"
    assert cross_site_metric_key("hd95") == "test_mean_hd95"
    assert cross_site_metric_key("dice", "ET", all15=True) == "test_all15_dice_ET"
    assert cross_site_metric_key("dice", all15=True) == "test_all15_mean_dice"
    assert cross_site_combination_key("flair+t2+t1+t1ce") == "test_combo_t1+t1ce+t2+flair_mean_dice"
    assert cross_site_combination_key(("flair",)) == "test_combo_flair_mean_dice"
    with pytest.raises(ValueError, match="metric"):
        cross_site_metric_key("auroc")
    with pytest.raises(ValueError, match="region"):
        cross_site_metric_key("dice", "NCR")
    with pytest.raises(ValueError, match="modalities"):
        cross_site_combination_key("dwi")


def test_the_site_weighted_mean_weights_sites_by_their_test_cases() -> None:
    final = cross_site_summary(RESULTS, ERRORS)["models"][FINAL]
    weighted, plain = final["site_weighted_mean"], final["mean_over_sites"]
    # CBICA 0.8 over 4 cases, TCIA 0.4 over 12: (4 * 0.8 + 12 * 0.4) / 16 = 0.5; unweighted it would be 0.6.
    assert weighted["mean_dice"] == pytest.approx(0.5)
    assert plain["mean_dice"] == pytest.approx(0.6)
    assert weighted["dice"]["WT"] == pytest.approx(0.6) and weighted["dice"]["ET"] == pytest.approx(0.5)
    assert weighted["mean_hd95"] == pytest.approx((4 * 10.0 + 12 * 30.0) / 16)
    assert (weighted["num_sites"], weighted["num_cases"]) == (2, 16)


def test_the_worst_site_is_the_one_with_the_lowest_mean_dice() -> None:
    models = cross_site_summary(RESULTS, ERRORS)["models"]
    assert models[FINAL]["worst_site"] == {"site": "TCIA", "mean_dice": pytest.approx(0.4)}
    assert models["CBICA"]["worst_site"] == {"site": "TCIA", "mean_dice": pytest.approx(0.3)}


def test_a_site_without_test_cases_is_named_and_left_out() -> None:
    summary = cross_site_summary(RESULTS, ERRORS)
    assert summary["no_test_cases"] == ["EMPTY"]
    for name in (FINAL, BEST, "CBICA"):
        model = summary["models"][name]
        assert model["no_test_cases"] == ["EMPTY"], "0 cases and no count at all both mean no test cases"
        assert "EMPTY" not in model["sites"]
        assert model["worst_site"]["site"] != "EMPTY"


def test_a_failed_evaluation_is_named_and_left_out() -> None:
    summary = cross_site_summary(RESULTS, ERRORS)
    best = summary["models"][BEST]
    assert best["errors"] == {"TCIA": "RuntimeError: CUDA out of memory"}
    assert summary["errors"] == [{"model": BEST, "site": "TCIA", "reason": "RuntimeError: CUDA out of memory"}]
    assert list(best["sites"]) == ["CBICA"]
    assert best["site_weighted_mean"]["mean_dice"] == pytest.approx(0.9), "CBICA alone"
    assert best["worst_site"]["site"] == "CBICA"
    # An error wins over results of the same pair: the evaluator said they are not to be trusted.
    both = cross_site_summary(RESULTS, {"CBICA": {FINAL: "bad"}})["models"][FINAL]
    assert list(both["sites"]) == ["TCIA"] and both["errors"] == {"CBICA": "bad"}


def test_models_are_ordered_final_best_then_by_name_and_labelled() -> None:
    results = {"A": {"zeta.pt": metrics(1, 0.5), "B": metrics(1, 0.5), BEST: metrics(1, 0.5), FINAL: metrics(1, 0.5)}}
    models = cross_site_summary(results)["models"]
    assert list(models) == [FINAL, BEST, "B", "zeta.pt"]
    assert [m["label"] for m in models.values()] == ["global (final)", "global (best)", "B", "zeta.pt"]


def test_the_15_combination_means_come_from_the_sites_that_have_them() -> None:
    final = cross_site_summary(RESULTS, ERRORS)["models"][FINAL]
    assert final["sites"]["CBICA"]["all15"]["mean_dice"] == pytest.approx(0.6)
    assert final["sites"]["CBICA"]["combinations"] == {"flair": 0.3, "t1+t1ce+t2+flair": 0.8}
    assert "all15" not in final["sites"]["TCIA"]
    assert final["all15"]["sites"] == ["CBICA"]
    assert final["all15"]["site_weighted_mean"]["mean_dice"] == pytest.approx(0.6)
    assert cross_site_summary(RESULTS, ERRORS)["models"]["CBICA"]["all15"] is None


def test_the_summary_is_plain_json_without_nan() -> None:
    results = {"A": {FINAL: {**metrics(3, 0.5), cross_site_metric_key("dice", "ET"): math.nan}}}
    summary = cross_site_summary(results)
    text = json.dumps(summary, allow_nan=False)  # a NaN score is null, never NaN (JSON has none)
    assert json.loads(text)["models"][FINAL]["site_weighted_mean"]["dice"]["ET"] is None


def test_the_markdown_names_every_site_model_and_failure() -> None:
    text = format_cross_site_markdown(cross_site_summary(RESULTS, ERRORS))
    for site in ("CBICA (4 cases)", "TCIA (12 cases)", "EMPTY (no test cases)"):
        assert site in text
    for label in ("global (final)", "global (best)", "| CBICA |"):
        assert label in text
    assert "on the site's own labelled test cases, given the site's own sequences" in text
    assert "TCIA (0.400)" in text, "the worst site with its mean Dice"
    assert "| 0.500 | 0.600 |" in text, "site-weighted mean, then the mean over sites"
    assert "Sites without test cases (left out): EMPTY." in text
    assert "global (best) at TCIA: RuntimeError: CUDA out of memory" in text
    assert "Mean over the 15 sequence combinations" in text


def test_the_heatmap_is_a_png(tmp_path: Path) -> None:
    out = tmp_path / "heatmap.png"
    assert plot_cross_site_heatmap(cross_site_summary(RESULTS, ERRORS), str(out)) == str(out)
    assert out.read_bytes()[:8] == PNG
    with pytest.raises(ValueError, match="no model"):
        plot_cross_site_heatmap(cross_site_summary({}), str(out))


def test_the_scalars_name_each_model(tmp_path: Path) -> None:
    scalars = cross_site_scalars(cross_site_summary(RESULTS, ERRORS))
    assert scalars["cross_site/global_final/site_weighted_mean_dice"] == pytest.approx(0.5)
    assert scalars["cross_site/global_final/worst_site_mean_dice"] == pytest.approx(0.4)
    assert scalars["cross_site/global_best/all15_site_weighted_mean_dice"] == pytest.approx(0.7)
    assert "cross_site/CBICA/mean_over_sites_dice" in scalars
    assert all(isinstance(v, float) and math.isfinite(v) for v in scalars.values())


def test_read_accepts_the_run_folder_or_the_file_and_moves_null_metrics_to_the_errors(tmp_path: Path) -> None:
    folder = write_run(tmp_path, {**RESULTS, "NULL": {FINAL: None}})
    results, errors = read_cross_site_results(str(tmp_path))
    assert set(results) == {"CBICA", "TCIA", "EMPTY"}
    assert errors == {**ERRORS, "NULL": {FINAL: NO_METRICS_REASON}}
    assert read_cross_site_results(folder.cross_site_results) == (results, errors)
    assert read_cross_site_results(folder.cross_site_dir) == (results, errors)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "is not"),
        ('{"A": [1]}', "is not"),
        ('{"A": {"m": {"test_mean_dice": "high"}}}', "not numbers"),
        ('{"A": {"m": 0.5}}', "not a JSON object"),
    ],
)
def test_malformed_results_are_a_value_error_naming_the_file(tmp_path: Path, content: str, match: str) -> None:
    folder = RunFolder(str(tmp_path))
    os.makedirs(folder.cross_site_dir)
    Path(folder.cross_site_results).write_text(content)
    with pytest.raises(ValueError, match=match) as info:
        read_cross_site_results(str(tmp_path))
    assert folder.cross_site_results in str(info.value)


def test_a_malformed_errors_file_is_named(tmp_path: Path) -> None:
    folder = write_run(tmp_path, errors=["oops"])
    with pytest.raises(ValueError, match="cross-site errors") as info:
        read_cross_site_results(str(tmp_path))
    assert folder.cross_site_errors in str(info.value)


def test_the_report_writes_its_three_files_and_never_through_a_link(tmp_path: Path) -> None:
    write_run(tmp_path / "run")
    out = tmp_path / "report"
    out.mkdir()
    outside = tmp_path / "precious.json"
    outside.write_text("keep")
    (out / "cross_site_summary.json").symlink_to(outside)
    paths = write_cross_site_report(str(tmp_path / "run"), str(out))
    assert {os.path.dirname(p) for p in paths.values()} == {str(out)}
    assert outside.read_text() == "keep", "the link is replaced, the file it pointed to is left as it was"
    assert json.loads(Path(paths["summary"]).read_text())["models"][FINAL]["worst_site"]["site"] == "TCIA"
    with pytest.raises(ValueError, match="hold no evaluation"):
        write_cross_site_report(str(write_run(tmp_path / "empty", {}, None).path))


def test_the_command_writes_the_report_into_the_run_folder(tmp_path: Path) -> None:
    folder = write_run(tmp_path)
    assert cli_main(["cross-site", str(tmp_path)]) == 0
    assert "global (final)" in Path(folder.cross_site_matrix).read_text()
    assert Path(folder.cross_site_heatmap).read_bytes()[:8] == PNG
    assert json.loads(Path(folder.cross_site_summary).read_text())["no_test_cases"] == ["EMPTY"]


def test_the_command_fails_in_one_line_without_results(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert cli_main(["cross-site", str(tmp_path / "missing")]) == 1
    assert "does not exist" in caplog.text
    assert cli_main(["cross-site", str(tmp_path)]) == 1, "a folder without cross_site_val/ is an error"
    assert "cross_val_results.json" in caplog.text
