"""The training recipe: learning-rate schedule, Dice + BCE, tumour-centred crops, mixed precision, seeds."""

from __future__ import annotations

import math
from unittest import mock

import pytest
import torch

from fedbrats.data.loader import DataConfig, make_loaders
from fedbrats.data.site_config import load_site_config
from fedbrats.federated.client.trainer import SiteTrainer, TrainConfig, lr_factor
from fedbrats.federated.server.controller import _seeded_initial_params
from fedbrats.losses.segmentation import DiceBCELoss
from fedbrats.networks import build_network, model_spec
from fedbrats.precision import autocast, resolve_precision

CPU = torch.device("cpu")


def _trainer(sites_file: str, site: str = "site-1", **training: object) -> SiteTrainer:
    torch.manual_seed(123)  # the network's initialisation; the trainer seeds everything else itself
    net = build_network("segresnet", init_filters=8, blocks_down=(1, 1, 1), blocks_up=(1, 1))
    data = {"roi_size": [16, 16, 16], "batch_size": 1, "modality_dropout": 0.5}
    config = TrainConfig.from_dict({"data": data, "device": "cpu", "precision": "fp32", **training})
    return SiteTrainer(load_site_config(sites_file, site), config, net)


# ---- learning rate -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("schedule", "progress", "expected"),
    [
        ("poly", 0.0, 1.0),
        ("poly", 0.5, 0.5**0.9),
        ("poly", 1.0, 0.0),
        ("cosine", 0.5, 0.5),
        ("cosine", 1.0, 0.0),
        ("constant", 0.7, 1.0),
        ("poly", 1.5, 0.0),  # clamped: a resumed run that overshoots never gets a negative rate
    ],
)
def test_lr_factor(schedule: str, progress: float, expected: float) -> None:
    assert lr_factor(schedule, progress) == pytest.approx(expected, abs=1e-9)


def test_unknown_schedule_and_options_are_named() -> None:
    with pytest.raises(ValueError, match="lr_schedule"):
        TrainConfig(lr_schedule="step")
    with pytest.raises(ValueError, match="val_every"):
        TrainConfig(val_every=0)
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(precision="fp16")
    with pytest.raises(ValueError, match="tumour_crop_fraction"):
        DataConfig(tumour_crop_fraction=1.5)


def test_schedule_continues_across_rounds(tiny_federation: str) -> None:
    """The rate at the end of a round follows the whole run's progress, not the round's."""
    trainer = _trainer(tiny_federation, epochs_per_round=1)
    first = trainer.train_round(0, total_rounds=4)["lr"]
    third = trainer.train_round(2, total_rounds=4)["lr"]
    assert first == pytest.approx(trainer.config.lr * lr_factor("poly", 0.0 + 0.0 / 4), rel=0.5)
    assert third < first
    assert third == pytest.approx(trainer.config.lr * lr_factor("poly", 2 / 4), rel=0.3)
    assert trainer.optimizer.param_groups[0]["lr"] == third


def test_validation_every_n_rounds(tiny_federation: str) -> None:
    trainer = _trainer(tiny_federation, val_every=3)
    assert [trainer.should_validate(r) for r in range(7)] == [False, False, True, False, False, True, False]
    every = _trainer(tiny_federation, val_every=1)
    assert all(every.should_validate(r) for r in range(4))


# ---- loss --------------------------------------------------------------------------------------------------
def test_dice_bce_weights_and_gradient_on_empty_prediction() -> None:
    """BCE gives the gradient that Dice lacks where a region is missing from the prediction."""
    target = torch.zeros(1, 3, 8, 8, 8)
    target[:, :, 2:5, 2:5, 2:5] = 1
    logits = torch.full_like(target, -8.0, requires_grad=True)  # predicts nothing anywhere
    dice_only = DiceBCELoss(1.0, 0.0)
    dice_only(logits, target).backward()
    dice_grad = logits.grad.abs().max().item()
    logits.grad = None
    loss = DiceBCELoss(1.0, 1.0)
    terms = loss.terms(logits, target)
    assert float(loss(logits, target).detach()) == pytest.approx(float(terms["dice"] + terms["bce"]), rel=1e-6)
    loss(logits, target).backward()
    assert logits.grad.abs().max().item() > 10 * dice_grad
    with pytest.raises(ValueError, match="bce_weight"):
        DiceBCELoss(1.0, -1.0)


# ---- crops -------------------------------------------------------------------------------------------------
def _crops_with_tumour(sites_file: str, fraction: float, draws: int = 24) -> int:
    site = load_site_config(sites_file, "site-1")
    cfg = DataConfig(roi_size=(8, 8, 8), batch_size=1, augment=False, tumour_crop_fraction=fraction)
    loader, _ = make_loaders(site.datalist, site.modalities, site.convention, cfg)
    hits = 0
    for _ in range(draws // len(loader.dataset)):
        for batch in loader:
            assert batch["image"].shape[-3:] == (8, 8, 8)
            assert "label_fg_indices" not in batch  # the cached indices never reach the network
            hits += int(batch["label"][:, 0].sum() > 0)
    return hits


def test_tumour_crops_always_hold_tumour(tiny_federation: str) -> None:
    draws = _crops_with_tumour(tiny_federation, 1.0)
    assert draws == 24


def test_zero_fraction_gives_uniform_crops() -> None:
    from monai.transforms import RandCropByPosNegLabeld, RandSpatialCropd

    from fedbrats.data.loader import train_transforms

    kinds = {type(t) for t in train_transforms(("t1",), "brats2018", DataConfig(tumour_crop_fraction=0.0)).transforms}
    assert RandSpatialCropd in kinds and RandCropByPosNegLabeld not in kinds


def test_spatial_augmentation_rotates_crops_and_keeps_labels_and_absent_sequences(tiny_federation: str) -> None:
    """With ``spatial_augment`` 1 every crop is rotated/scaled: labels stay integer regions, an absent sequence stays
    exactly zero, and the crops differ from the unaugmented ones drawn with the same seed."""
    import json
    from pathlib import Path

    from monai.utils import set_determinism

    site = json.loads(Path(tiny_federation).read_text())["sites"]["site-2"]  # no T1ce
    crops = {}
    for p in (0.0, 1.0):
        set_determinism(seed=7)
        cfg = DataConfig(roi_size=(16, 16, 16), spatial_augment=p, augment=False, tumour_crop_fraction=1.0)
        train, _ = make_loaders(site["datalist"], site["modalities"], "brats2018", cfg)
        item = train.dataset[0]
        crops[p] = item[0] if isinstance(item, list) else item  # the positive/negative crop returns a list
    set_determinism(seed=None)
    rotated = crops[1.0]
    assert rotated["image"].shape == crops[0.0]["image"].shape
    assert set(torch.unique(rotated["label"]).tolist()) <= {0.0, 1.0}
    assert (rotated["image"][1] == 0).all(), "the absent T1ce channel must stay zero"
    assert not torch.equal(rotated["image"], crops[0.0]["image"])
    with pytest.raises(ValueError, match="spatial_augment"):
        DataConfig(spatial_augment=1.5)


# ---- precision ---------------------------------------------------------------------------------------------
def test_precision_resolution() -> None:
    assert resolve_precision("fp32", CPU) == "fp32"
    assert resolve_precision("bf16", CPU) == "bf16"
    with mock.patch("fedbrats.precision.cpu_has_native_bf16", return_value=False):
        assert resolve_precision("auto", CPU) == "fp32"
    with mock.patch("fedbrats.precision.cpu_has_native_bf16", return_value=True):
        assert resolve_precision("auto", CPU) == "bf16"


def test_bf16_training_keeps_float32_weights(tiny_federation: str) -> None:
    trainer = _trainer(tiny_federation, precision="bf16", epochs_per_round=1)
    summary = trainer.train_round(0, total_rounds=2)
    assert math.isfinite(summary["train_loss"]) and summary["num_steps"] > 0
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    with autocast("bf16", CPU):
        out = trainer.model(torch.zeros(1, 4, 16, 16, 16))
    assert out.dtype == torch.bfloat16
    metrics = trainer.validate()
    assert 0.0 <= metrics["val_mean_dice"] <= 1.0


# ---- reproducibility ---------------------------------------------------------------------------------------
def test_same_seed_same_training(tiny_federation: str) -> None:
    """Two trainers with the same seed draw the same batches, crops, augmentation and dropout: equal weights."""
    runs = []
    for _ in range(2):
        trainer = _trainer(tiny_federation, seed=7, epochs_per_round=2)
        trainer.train_round(0, total_rounds=2)
        runs.append(trainer.weights())
    other = _trainer(tiny_federation, seed=8, epochs_per_round=2)
    other.train_round(0, total_rounds=2)
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert not all(torch.equal(runs[0][k], other.weights()[k]) for k in runs[0])


def test_seeded_initial_model() -> None:
    spec = model_spec(build_network("segresnet", init_filters=8))
    before = torch.get_rng_state()
    a, b, c = (_seeded_initial_params(spec, s) for s in (3, 3, 4))
    assert torch.equal(torch.get_rng_state(), before)  # the caller's random stream is untouched
    assert all((a[k] == b[k]).all() for k in a)
    assert not all((a[k] == c[k]).all() for k in a)
