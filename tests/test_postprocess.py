"""Post-processing: small connected components removed, the size chosen on validation and applied downstream."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedbrats.runs import POSTPROCESSING_FILE
from fedbrats.scoring.postprocess import (
    choose_min_component_voxels,
    read_postprocessing,
    remove_small_components,
    write_postprocessing,
)


def _regions() -> torch.Tensor:
    regions = torch.zeros(1, 3, 12, 12, 12)
    regions[0, 0, 2:7, 2:7, 2:7] = 1  # a 125-voxel tumour
    regions[0, 0, 10, 10, 10] = 1  # a one-voxel speck
    regions[0, 2, 9:11, 1:3, 1:3] = 1  # an 8-voxel ET island
    return regions


def test_small_components_go_large_ones_stay() -> None:
    regions = _regions()
    kept = remove_small_components(regions, 9)
    assert kept[0, 0].sum() == 125 and kept[0, 0, 10, 10, 10] == 0
    assert kept[0, 2].sum() == 0  # each region on its own
    assert torch.equal(remove_small_components(regions, 8)[0, 2], regions[0, 2])
    assert torch.equal(remove_small_components(regions, 0), regions)
    diagonal = torch.zeros(1, 1, 4, 4, 4)
    diagonal[0, 0, 0, 0, 0] = diagonal[0, 0, 1, 1, 1] = 1  # 26-connected: one component of two voxels
    assert remove_small_components(diagonal, 2).sum() == 2
    with pytest.raises(ValueError, match="min_voxels"):
        remove_small_components(regions, -1)
    with pytest.raises(ValueError, match="B x C"):
        remove_small_components(regions[0], 2)


def test_choice_is_the_best_validation_score_ties_to_the_smaller_size() -> None:
    aggregated = {"val_mean_dice": 0.70, "val_mean_dice_min10": 0.74, "val_mean_dice_min50": 0.74, "val_dice_WT": 1}
    choice = choose_min_component_voxels(aggregated)
    assert choice["min_component_voxels"] == 10
    assert choice["scores"] == {"0": 0.70, "10": 0.74, "50": 0.74}
    assert choose_min_component_voxels({"val_mean_dice": 0.7, "val_mean_dice_min10": 0.6})["min_component_voxels"] == 0
    assert choose_min_component_voxels({})["min_component_voxels"] == 0


def test_written_choice_is_found_from_the_run_and_from_an_export(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "app_server").mkdir(parents=True)
    assert read_postprocessing(str(run / "app_server" / "best_FL_global_model.pt")) == 0
    write_postprocessing(str(run), {"min_component_voxels": 50})
    assert read_postprocessing(str(run / "app_server" / "best_FL_global_model.pt")) == 50
    exported = tmp_path / "model"
    exported.mkdir()
    (exported / "metadata.json").write_text(json.dumps({"postprocessing": {"min_component_voxels": 10}}))
    assert read_postprocessing(str(exported / "model.pt")) == 10
    assert read_postprocessing(str(run), override=0) == 0  # an explicit choice wins over the recorded one
    with pytest.raises(ValueError, match=">= 0"):
        read_postprocessing(str(run), override=-5)
    (run / POSTPROCESSING_FILE).write_text(json.dumps({"min_component_voxels": "many"}))
    with pytest.raises(ValueError, match="min_component_voxels"):
        read_postprocessing(str(run))


def test_site_validation_scores_the_candidates(tiny_federation: str) -> None:
    from fedbrats.data.site_config import load_site_config
    from fedbrats.federated.client.trainer import SiteTrainer, TrainConfig
    from fedbrats.networks import build_network

    torch.manual_seed(0)
    net = build_network("segresnet", init_filters=8, blocks_down=(1, 1, 1), blocks_up=(1, 1))
    config = TrainConfig.from_dict({"data": {"roi_size": [16, 16, 16]}, "device": "cpu", "precision": "fp32"})
    trainer = SiteTrainer(load_site_config(tiny_federation, "site-1"), config, net)
    plain = trainer.validate()
    scored = trainer.validate(postprocess_candidates=[0, 5, 100000])
    assert "val_mean_dice_min5" in scored and "val_mean_dice_min0" not in scored
    assert scored["val_mean_dice"] == pytest.approx(plain["val_mean_dice"])
    # Removing every component leaves empty predictions: Dice 1 only where the truth is empty too.
    assert scored["val_mean_dice_min100000"] <= 1.0
    with pytest.raises(ValueError, match="postprocess_candidates"):
        TrainConfig(postprocess_candidates=[-1])
