"""Tests of the 15-combination evaluation, its reports and model loading (fedbrats.evaluation.evaluate/report)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from fedbrats.constants import HD95_MISS_VALUE, MODALITIES, REGIONS, combination_name, modality_combinations
from fedbrats.data.federation import make_synthetic_federation
from fedbrats.evaluation.evaluate import evaluate_combinations, load_model, main
from fedbrats.evaluation.report import compare_table, format_table, readable_combination, write_reports
from fedbrats.networks import build_network, model_spec
from fedbrats.runs import find_model_spec, resolve_checkpoint
from tests.helpers import run_dir

ROI = {"roi_size": (16, 16, 16)}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ALL_NAMES = [combination_name(c) for c in modality_combinations()]


class RecordingNet(nn.Module):
    """Deterministic stub: WT/TC/ET logits from the t1 channel only; checks that absent channels are zero."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([1.0, 0.5, 0.25]))
        self.seen_masks: set[tuple[int, ...]] = set()

    def forward(self, x: torch.Tensor, modality_mask: torch.Tensor) -> torch.Tensor:
        absent = modality_mask[0] == 0
        assert torch.all(x[:, absent] == 0), "an absent sequence reached the network"
        self.seen_masks.add(tuple(int(v) for v in modality_mask[0].tolist()))
        return x[:, :1] * self.scale.view(1, 3, 1, 1, 1)


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    out = tmp_path_factory.mktemp("federation")
    sites = make_synthetic_federation(str(out), cases_per_site=3, size=16)
    with open(sites, encoding="utf-8") as f:
        test_datalist = json.load(f)["test_datalist"]
    return {"sites": sites, "test": test_datalist}


def _check_ranges(results: dict) -> None:
    assert list(results["combinations"]) == ALL_NAMES
    for row in results["combinations"].values():
        for region in REGIONS:
            assert 0.0 <= row["dice"][region] <= 1.0
            assert 0.0 <= row["hd95"][region] <= HD95_MISS_VALUE + 1e-6
        assert row["mean_dice"] == pytest.approx(np.mean([row["dice"][r] for r in REGIONS]))


@pytest.mark.parametrize("network", ["segresnet", "modality_aware"])
def test_all_15_combinations_with_real_networks(federation: dict[str, str], network: str) -> None:
    torch.manual_seed(0)
    net = build_network(network, init_filters=8)
    results = evaluate_combinations(net, federation["test"], data=ROI, max_cases=2)
    assert results["num_cases"] == 2 and len(results["cases"]) == 2
    _check_ranges(results)
    rows = list(results["combinations"].values())
    mean = results["mean_over_combinations"]
    for region in REGIONS:
        assert mean["dice"][region] == pytest.approx(np.mean([r["dice"][region] for r in rows]))
        assert mean["hd95"][region] == pytest.approx(np.mean([r["hd95"][region] for r in rows]))
    assert mean["mean_dice"] == pytest.approx(np.mean([r["mean_dice"] for r in rows]))
    assert results["full_modality"] == results["combinations"]["t1+t1ce+t2+flair"]
    assert results["full_modality"]["modalities"] == list(MODALITIES)
    json.dumps(results)  # plain JSON, ready for results.json


def test_zero_filling_hides_sequences(federation: dict[str, str]) -> None:
    net = RecordingNet()
    results = evaluate_combinations(net, federation["test"], data=ROI, max_cases=2)
    # Every combination was presented with its own mask (and the stub checked the zero-filling).
    assert net.seen_masks == {tuple(int(m in c) for m in MODALITIES) for c in modality_combinations()}
    rows = results["combinations"]
    with_t1 = [rows[n] for n in ALL_NAMES if "t1" in n.split("+")]
    without_t1 = [rows[n] for n in ALL_NAMES if "t1" not in n.split("+")]
    # The stub only looks at t1: rows differing only in other sequences are identical.
    for group in (with_t1, without_t1):
        for row in group[1:]:
            assert row["per_case"] == group[0]["per_case"]
    assert with_t1[0]["per_case"] != without_t1[0]["per_case"]
    # Without t1 the stub outputs 0 logits: nothing predicted, so every present region is missed.
    assert all(d == 0.0 or d == 1.0 for case in without_t1[0]["per_case"]["dice"] for d in case)


def test_subset_of_combinations_and_datalist_convention(federation: dict[str, str], tmp_path: Path) -> None:
    # A 2023-convention copy of one test case: ET relabelled 4 -> 3, the datalist says "brats2023".
    with open(federation["test"], encoding="utf-8") as f:
        content = json.load(f)
    case = content["test"][0]
    seg = nib.load(case["label"])
    labels = np.asarray(seg.dataobj).astype(np.uint8)
    assert (labels == 4).any()
    labels[labels == 4] = 3
    label_2023 = tmp_path / "seg2023.nii.gz"
    nib.save(nib.Nifti1Image(labels, seg.affine), str(label_2023))
    datalist = tmp_path / "test2023.json"
    datalist.write_text(json.dumps({"convention": "brats2023", "test": [{**case, "label": str(label_2023)}]}))
    # Loading succeeds only if the datalist's convention is read (3 is not a 2018 label).
    results = evaluate_combinations(RecordingNet(), str(datalist), data=ROI, combinations=["flair+t1", ("t2",)])
    assert results["convention"] == "brats2023"
    assert list(results["combinations"]) == ["t1+flair", "t2"]
    assert results["full_modality"] is None
    # Same case, same stub: identical scores under either convention.
    ref = evaluate_combinations(RecordingNet(), federation["test"], data=ROI, combinations=["t1+flair"], max_cases=1)
    assert ref["combinations"]["t1+flair"]["per_case"] == results["combinations"]["t1+flair"]["per_case"]


def test_case_missing_a_sequence_is_named(federation: dict[str, str], tmp_path: Path) -> None:
    with open(federation["test"], encoding="utf-8") as f:
        content = json.load(f)
    case = content["test"][0]
    case["image"][1] = None
    path = tmp_path / "partial.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ValueError, match=case["case_id"]) as info:
        evaluate_combinations(RecordingNet(), str(path), data=ROI)
    assert "t1ce" in str(info.value)


def test_bad_options_raise() -> None:
    with pytest.raises(ValueError, match="does not exist"):
        evaluate_combinations(RecordingNet(), "/nonexistent/test.json", data=ROI)
    with pytest.raises(ValueError, match="not among"):
        evaluate_combinations(RecordingNet(), "/nonexistent/test.json", combinations=["t1+dwi"])


def test_reports_are_written_and_well_formed(federation: dict[str, str], tmp_path: Path) -> None:
    results = evaluate_combinations(RecordingNet(), federation["test"], data=ROI, max_cases=1)
    paths = write_reports(results, str(tmp_path / "report"), label="stub")
    assert set(paths) == {"json", "markdown", "heatmap_dice", "heatmap_hd95"}
    saved = json.loads(Path(paths["json"]).read_text())
    assert list(saved["combinations"]) == ALL_NAMES
    md = Path(paths["markdown"]).read_text()
    table = [line for line in md.splitlines() if line.startswith("|")]
    assert len(table) == 2 + 16  # header, separator, 15 combinations and the mean row
    assert "mean over 15" in table[-1]
    assert table[2].count("●") == 1 and table[-2].count("●") == 4
    assert "Dice WT" in table[0] and "HD95 ET" in table[0]
    for key in ("heatmap_dice", "heatmap_hd95"):
        data = Path(paths[key]).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 1000
    assert format_table(results) in md


def test_compare_table_lists_methods_and_combinations(federation: dict[str, str]) -> None:
    a = evaluate_combinations(RecordingNet(), federation["test"], data=ROI, max_cases=1, model_name="a")
    b = json.loads(json.dumps(a))
    for row in b["combinations"].values():
        row["mean_dice"] = min(1.0, row["mean_dice"] + 0.1)
    b["mean_over_combinations"]["mean_dice"] += 0.1
    text = compare_table({"FedAvg": a, "FedKD": b})
    assert "| FedAvg |" in text and "| FedKD |" in text
    per_combo = text.split("Mean Dice per sequence combination")[1]
    rows = [line for line in per_combo.splitlines() if line.startswith("|")][2:]
    assert len(rows) == 16
    assert rows[0].startswith(f"| {readable_combination(('t1',))} |")
    assert "**" in rows[-1].split("|")[-2]  # the better method is bold
    with pytest.raises(ValueError):
        compare_table({})


def test_load_model_from_run_dir_and_checkpoints(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = build_network("segresnet", init_filters=8)
    run = run_dir(tmp_path / "run", net)
    x = torch.randn(1, 4, 16, 16, 16)
    expected = net.eval()(x)
    for source in (run, run / "app_server" / "best_FL_global_model.pt"):
        loaded = load_model(str(source))
        assert torch.allclose(loaded(x), expected)
    # Fallback to the last global model, and a bare state dict in site_models/ (spec two folders up).
    run2 = run_dir(tmp_path / "run2", net, best=False)
    assert resolve_checkpoint(str(run2)).endswith("app_server/FL_global_model.pt")
    (run2 / "site_models").mkdir()
    torch.save(net.state_dict(), run2 / "site_models" / "site-1.pt")
    assert torch.allclose(load_model(str(run2 / "site_models" / "site-1.pt"))(x), expected)
    # An explicit spec, as a dict or a path.
    spec = model_spec(net)
    assert torch.allclose(load_model(str(run2), spec)(x), expected)
    assert torch.allclose(load_model(str(run2), str(run2 / "model_spec.json"))(x), expected)
    assert find_model_spec(str(run2 / "app_server" / "FL_global_model.pt")) == str(run2 / "model_spec.json")


def test_load_model_errors_name_the_file(tmp_path: Path) -> None:
    net = build_network("segresnet", init_filters=8)
    lone = tmp_path / "lone" / "a" / "b" / "c"
    lone.mkdir(parents=True)
    torch.save({"model": net.state_dict()}, lone / "model.ckpt")
    with pytest.raises(ValueError, match="no model_spec.json"):
        load_model(str(lone / "model.ckpt"))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="bad.pt"):
        load_model(str(bad), model_spec(net))
    with pytest.raises(ValueError, match="does not exist"):
        load_model(str(tmp_path / "missing.pt"), model_spec(net))
    with pytest.raises(ValueError, match="holds no model"):
        load_model(str(tmp_path / "lone"))
    other = build_network("segresnet", init_filters=16)
    with pytest.raises(ValueError, match="does not fit"):
        load_model(str(lone / "model.ckpt"), model_spec(other))


def test_cli_writes_reports(federation: dict[str, str], tmp_path: Path) -> None:
    torch.manual_seed(0)
    run = run_dir(tmp_path / "run", build_network("modality_aware", init_filters=8))
    out = tmp_path / "eval"
    argv = ["--model", str(run), "--sites", federation["sites"], "--roi-size", "16", "--max-cases", "1"]
    assert main([*argv, "--out-dir", str(out), "--label", "fedkd", "--device", "cpu"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["model"] == "fedkd" and results["num_cases"] == 1
    assert math.isfinite(results["mean_over_combinations"]["mean_dice"])
    for name in ("results.md", "heatmap_dice.png", "heatmap_hd95.png"):
        assert (out / name).is_file()
    assert main(["--model", str(tmp_path / "nothing"), "--datalist", federation["test"]]) == 1
