"""MMCCD (jobs/mmccd): band masks, the diffusion forward process, the masked cycle error, slice selection, the
anomaly metrics and the threshold chosen on validation, a site's training and validation, and a simulator run."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch

import fedbrats.federated.methods.mmccd as mmccd
from fedbrats.data.site_config import load_site_config
from fedbrats.federated.client.trainer import SiteTrainer, TrainConfig
from fedbrats.federated.methods.mmccd import (
    BACKGROUND,
    MMCCDMethod,
    ModalityCycleNet,
    anomaly_scores,
    band_masks,
    case_slices,
    fit_in_plane,
    random_band_masks,
    translation_terms,
    unfit_in_plane,
    window_intensities,
)
from fedbrats.scoring.detection import auprc, auroc, best_dice_on, choose_threshold, dice_at, mean_dice_at

#: Networks and data small enough for a test: 16^3 synthetic volumes, 32 x 32 slices, 8-px bands.
TINY_NET = {"image_size": 32, "band": 8, "init_filters": 8, "attention": False, "num_train_timesteps": 50}
TINY_TRAINING = {
    "method": "mmccd",
    "method_args": {"slices_per_volume": 2, "brain_fraction": 0.3, "val_masks": 8, "val_steps": 2},
    "epochs_per_round": 1,
    "max_steps_per_epoch": 2,
    "postprocess_candidates": [],
    "data": {
        "roi_size": [16, 16, 16],
        "zoom": 1.0,
        "batch_size": 1,
        "tumour_crop_fraction": 0.0,
        "modality_dropout": 0.0,
        "augment": False,
    },
}


# ---- masks ----------------------------------------------------------------------------------------------------
def test_inference_masks_cover_every_pixel_in_each_orientation_and_refuse_too_few() -> None:
    masks = band_masks(16, 32, 8)
    assert masks.shape == (16, 1, 32, 32)
    horizontal, vertical = masks[:8], masks[8:]
    # Each horizontal band is 8 full rows; together they cover every row (and likewise columns).
    assert torch.all(horizontal.sum((1, 3)) % 32 == 0) and torch.all(horizontal.sum((1, 2, 3)) == 8 * 32)
    assert torch.all(horizontal.amax(0).squeeze() == 1) and torch.all(vertical.amax(0).squeeze() == 1)
    assert torch.all(vertical.sum((1, 2)) % 32 == 0)
    with pytest.raises(ValueError, match="num_masks"):
        band_masks(6, 32, 8)  # 3 per axis cannot cover 32 px with 8-px bands
    with pytest.raises(ValueError, match="num_masks"):
        band_masks(9, 32, 8)


def test_training_masks_are_one_band_at_an_even_offset() -> None:
    masks = random_band_masks(200, 32, 8, torch.Generator().manual_seed(0))
    assert torch.all(masks.sum((1, 2, 3)) == 8 * 32)
    rows = masks[:, 0].amax(2)  # (n, 32): which rows hold a horizontal band (all rows for a vertical one)
    cols = masks[:, 0].amax(1)
    horizontal = rows.sum(1) == 8
    vertical = cols.sum(1) == 8
    assert torch.all(horizontal ^ vertical) and horizontal.any() and vertical.any()
    starts = torch.where(horizontal, rows.argmax(1), cols.argmax(1))
    assert torch.all(starts % 2 == 0) and int(starts.max()) <= 24


# ---- diffusion ------------------------------------------------------------------------------------------------
def test_forward_process_is_the_linear_ddpm_one_and_the_loss_is_on_x0() -> None:
    net = ModalityCycleNet(**TINY_NET)
    scheduler = net.noise_scheduler()
    betas = torch.linspace(1e-4, 2e-2, 50)
    assert torch.allclose(scheduler.betas, betas, atol=1e-7)
    x0, noise = torch.full((2, 1, 4, 4), 2.0), torch.ones(2, 1, 4, 4)
    t = torch.tensor([0, 49])
    alpha_bar = torch.cumprod(1 - betas, 0)[t].view(-1, 1, 1, 1)
    expected = alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise
    assert torch.allclose(scheduler.add_noise(x0, noise, t), expected, atol=1e-5)

    # A translator that outputs the clean target has zero translation loss: the target is x0, not the noise.
    class Oracle(torch.nn.Module):
        def __init__(self, target: torch.Tensor) -> None:
            super().__init__()
            self.target = target

        def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
            assert x.shape[1] == 2 and timesteps.shape == (x.shape[0],)
            return self.target

    source, target = torch.randn(3, 1, 32, 32), torch.randn(3, 1, 32, 32)
    net.translator = Oracle(target)
    terms = translation_terms(net, source, target)
    assert float(terms["translate"].detach()) == 0.0 and float(terms["back"].detach()) > 0


def test_masked_error_is_averaged_over_the_masks_covering_each_pixel(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the band replaced by zeros and an identity translation, each band's error is x1² inside it: the
    average over the masks that cover a pixel is x1² everywhere (an average over all masks would be smaller)."""
    net = ModalityCycleNet(**TINY_NET)
    net.back = torch.nn.Identity()
    monkeypatch.setattr(mmccd, "mask_source", lambda source, masks, generator=None: source * (1 - masks))
    monkeypatch.setattr(mmccd, "sample_translation", lambda net, condition, steps, generator=None: condition)
    x1 = torch.arange(2 * 32 * 32, dtype=torch.float32).reshape(2, 1, 32, 32) / 1000
    brain = torch.ones_like(x1, dtype=torch.bool)
    scores = anomaly_scores(net, x1, brain, num_masks=8, steps=1, erosion_disk_radius=0, chunk=5)
    assert torch.allclose(scores, x1**2, rtol=1e-5)
    # The eroded brain mask zeroes the rim.
    eroded = anomaly_scores(net, x1, brain, num_masks=8, steps=1, erosion_disk_radius=1)
    assert float(eroded[..., 0, :].abs().sum()) == 0
    assert torch.allclose(eroded[..., 1:-1, 1:-1], (x1**2)[..., 1:-1, 1:-1])


def test_sampling_is_seeded_and_the_map_stays_in_the_brain() -> None:
    torch.manual_seed(0)
    net = ModalityCycleNet(**TINY_NET)
    x1 = torch.randn(1, 1, 32, 32)
    brain = torch.zeros_like(x1, dtype=torch.bool)
    brain[..., 3:29, 3:29] = True
    a = anomaly_scores(net, x1, brain, num_masks=8, steps=2, erosion_disk_radius=1, seed=3)
    b = anomaly_scores(net, x1, brain, num_masks=8, steps=2, erosion_disk_radius=1, seed=3)
    assert torch.equal(a, b) and float(a[~brain].abs().sum()) == 0 and float(a[brain].sum()) > 0


# ---- the brain mask's erosion ------------------------------------------------------------------------------------
def test_disk_footprint_is_the_public_codes() -> None:
    """skimage's ``disk(r)``: the points of the (2r+1)² grid with x² + y² <= r²."""
    assert mmccd.disk(0).tolist() == [[True]]
    assert mmccd.disk(1).astype(int).tolist() == [[0, 1, 0], [1, 1, 1], [0, 1, 0]]
    d4 = mmccd.disk(4)
    assert d4.shape == (9, 9) and d4.dtype == bool and int(d4.sum()) == 49
    assert d4[4].all() and d4[:, 4].all() and not d4[0, 3] and not d4[1, 1] and d4[1, 2]  # 1² + 2² ... 3² + 2² <= 16
    assert np.array_equal(d4, d4.T) and np.array_equal(d4, d4[::-1])


@pytest.mark.parametrize("radius", [1, 2, 4])
def test_erosion_by_a_disk_shrinks_a_square_by_the_radius_in_every_plane(radius: int) -> None:
    """A 20-pixel square loses ``radius`` pixels on each side; each 2-D plane (the last two axes) is eroded on its
    own, so the first and last slices of a stack keep their squares."""
    brain = np.zeros((3, 1, 40, 40), dtype=bool)
    brain[..., 10:30, 10:30] = True
    eroded = mmccd.erode_brain(brain, radius)
    side = 20 - 2 * radius
    expected = np.zeros_like(brain)
    expected[..., 10 + radius : 30 - radius, 10 + radius : 30 - radius] = True
    assert eroded.shape == brain.shape and np.array_equal(eroded, expected)
    assert int(eroded[0, 0].sum()) == side * side
    assert np.array_equal(mmccd.erode_brain(brain, 0), brain)


def test_erosion_of_the_anomaly_map_is_disk_four_by_default() -> None:
    import inspect

    from fedbrats.evaluation import anomaly

    assert mmccd.EROSION_DISK_RADIUS == 4
    for fn in (anomaly_scores, MMCCDMethod, anomaly.score_slices, anomaly.anomaly_map_case):
        assert inspect.signature(fn).parameters["erosion_disk_radius"].default == 4, fn
    assert MMCCDMethod().erosion_disk_radius == 4
    # A disk of radius 4 takes 4 pixels off a square's sides where the old 2 iterations took 2.
    brain = torch.zeros(1, 1, 32, 32, dtype=torch.bool)
    brain[..., 8:24, 8:24] = True
    net = ModalityCycleNet(variant="autoencoder", **TINY_NET)
    scores = anomaly_scores(net, torch.randn(1, 1, 32, 32), brain)
    assert float(scores[..., :12, :].abs().sum()) == 0 and bool((scores[..., 12:20, 12:20] != 0).all())


@pytest.mark.parametrize("bad", [-1, 33, 1000, 2.5, "4", True, None])
def test_bad_erosion_radii_are_refused_by_name(bad: object) -> None:
    with pytest.raises(ValueError, match="erosion_disk_radius"):
        MMCCDMethod(erosion_disk_radius=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="erosion_disk_radius"):
        mmccd.disk(bad)  # type: ignore[arg-type]
    net = ModalityCycleNet(variant="autoencoder", **TINY_NET)
    x1 = torch.zeros(1, 1, 32, 32)
    with pytest.raises(ValueError, match="erosion_disk_radius"):
        anomaly_scores(net, x1, x1 > 0, erosion_disk_radius=bad)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        MMCCDMethod(erode=2)  # type: ignore[call-arg]  # the old name is gone


def test_the_commands_take_erosion_disk_radius_and_not_erode(capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    from fedbrats.evaluation import anomaly

    evaluate = ["--model", "m", "--datalist", "d", "--val-datalist", "v"]
    for add, base in ((anomaly.add_arguments, evaluate), (anomaly.add_map_arguments, ["--model", "m", "--image", "i"])):
        p = argparse.ArgumentParser()
        add(p)
        base = [*base, "--out", "o"]
        assert p.parse_args(base).erosion_disk_radius == 4
        args = p.parse_args([*base, "--erosion-disk-radius", "3"])
        assert args.erosion_disk_radius == 3
        anomaly.check_erosion_option(args)
        for bad in ("-1", "33"):
            with pytest.raises(ValueError, match="--erosion-disk-radius"):
                anomaly.check_erosion_option(p.parse_args([*base, "--erosion-disk-radius", bad]))
        for argv in ([*base, "--erode", "2"], [*base, "--erosion-disk-radius", "1.5"]):
            with pytest.raises(SystemExit):
                p.parse_args(argv)
        assert "--erosion-disk-radius" in capsys.readouterr().err


# ---- slices ---------------------------------------------------------------------------------------------------
def test_window_maps_the_brain_quantiles_to_plus_minus_three() -> None:
    volume = torch.zeros(10, 10, 10)
    volume[2:8, 2:8, 2:8] = torch.linspace(1, 100, 216).reshape(6, 6, 6)
    brain = volume != 0
    out = window_intensities(volume, brain, (0.0, 1.0))
    assert math.isclose(float(out[brain].min()), -3.0, abs_tol=1e-5)
    assert math.isclose(float(out[brain].max()), 3.0, abs_tol=1e-5)
    assert torch.all(out[~brain] == BACKGROUND)


def test_fit_and_unfit_in_plane_round_trip() -> None:
    x = torch.arange(2 * 10 * 20, dtype=torch.float32).reshape(2, 10, 20)
    fitted, offsets = fit_in_plane(x, 16, value=-1)
    assert fitted.shape == (2, 16, 16) and float(fitted[0, 0, 0]) == -1  # padded rows, cropped columns
    back = unfit_in_plane(fitted, (10, 20), offsets)
    assert torch.equal(back[..., 2:18], x[..., 2:18]) and float(back[..., :2].abs().sum()) == 0


def test_case_slices_choose_central_healthy_slices_and_the_largest_tumour() -> None:
    net = ModalityCycleNet(**TINY_NET)
    image = torch.zeros(4, 12, 12, 6)
    areas = [2, 6, 10, 10, 8, 3]  # brain side per slice
    for z, side in enumerate(areas):
        image[:, :side, :side, z] = torch.rand(4, side, side) + 1
    label = torch.zeros(3, 12, 12, 6)
    label[0, 1:3, 1:3, 2] = 1  # tumour in slice 2 (4 px) and slice 3 (9 px)
    label[0, 1:4, 1:4, 3] = 1
    cs = case_slices(image, label, net, brain_fraction=0.6)
    assert cs.source.shape == (6, 1, 32, 32) and cs.target is not None
    assert cs.central.tolist() == [False, False, True, True, True, False]  # area >= 0.6 * 100
    assert cs.healthy().tolist() == [4] and cs.largest_tumour() == 3
    no_label = case_slices(image, None, net, brain_fraction=0.6)
    assert no_label.healthy().tolist() == [2, 3, 4] and no_label.largest_tumour() is None


# ---- metrics --------------------------------------------------------------------------------------------------
def test_auroc_and_auprc_on_known_cases() -> None:
    y = np.array([0, 0, 1, 1])
    s = np.array([0.1, 0.4, 0.35, 0.8])
    assert math.isclose(auroc(s, y), 0.75)
    assert math.isclose(auprc(s, y), (1 / 1 + 2 / 3) / 2)  # precision at each positive's threshold, averaged
    assert auroc(np.array([1, 2, 3, 4]), y) == 1.0 and auroc(np.array([4, 3, 2, 1]), y) == 0.0
    assert auroc(np.ones(4), y) == 0.5  # ties count one half
    assert math.isclose(auprc(np.ones(4), y), 0.5)  # one threshold, precision = prevalence
    with pytest.raises(ValueError, match="both classes"):
        auroc(s, np.zeros(4))
    with pytest.raises(ValueError, match="same number"):
        auprc(s, y[:3])


def test_threshold_is_chosen_on_validation_and_applied_unchanged_to_test() -> None:
    rng = np.random.default_rng(0)
    y = np.zeros(400, dtype=bool)
    y[:40] = True
    val = [(np.where(y, 0.8, 0.2) + rng.normal(0, 0.01, 400), y)]
    threshold, val_dice = choose_threshold(val)
    assert 0.2 < threshold < 0.8 and val_dice > 0.95
    # On test slices whose tumours score lower, the validation threshold misses them; only choosing on the test
    # slices themselves (the optimistic number) finds them.
    test = [(np.where(y, 0.15, 0.05) + rng.normal(0, 0.01, 400), y)]
    honest = mean_dice_at(test, threshold)
    assert honest < 0.5 < best_dice_on(test)
    assert dice_at(np.zeros(3), np.zeros(3), 0.5) == 1.0


# ---- a site ---------------------------------------------------------------------------------------------------
def test_a_site_trains_on_healthy_slices_and_a_site_without_the_pair_trains_no_step(tiny_federation: str) -> None:
    config = TrainConfig.from_dict(TINY_TRAINING)
    trainer = SiteTrainer(load_site_config(tiny_federation, "site-3"), config, ModalityCycleNet(**TINY_NET))
    before = {k: v.clone() for k, v in trainer.weights().items()}
    summary = trainer.train_round(0, 2)
    assert summary["num_steps"] > 0 and set(summary["loss_terms"]) == {"translate", "back"}
    assert any(not torch.equal(before[k], v) for k, v in trainer.weights().items())
    metrics = trainer.validate()
    assert set(metrics) <= {"val_auroc", "val_auprc", "val_healthy_score"}
    assert all(0.0 <= metrics[k] <= 1.0 for k in ("val_auroc", "val_auprc") if k in metrics)

    t1_only = SiteTrainer(load_site_config(tiny_federation, "site-4"), config, ModalityCycleNet(**TINY_NET))
    before = {k: v.clone() for k, v in t1_only.weights().items()}
    assert t1_only.method.missing == ["flair", "t2"]
    assert t1_only.train_round(0, 2)["num_steps"] == 0 and t1_only.validate() == {}
    assert all(torch.equal(before[k], v) for k, v in t1_only.weights().items())


def test_method_and_network_reject_bad_options_by_name() -> None:
    with pytest.raises(ValueError, match="variant"):
        ModalityCycleNet(variant="gan")
    with pytest.raises(ValueError, match="source and target"):
        ModalityCycleNet(source="t2", target="t2")
    with pytest.raises(ValueError, match="window"):
        ModalityCycleNet(window=[0.9, 0.1])
    with pytest.raises(ValueError, match="brain_fraction"):
        MMCCDMethod(brain_fraction=0)
    with pytest.raises(RuntimeError, match="anomaly_scores"):
        ModalityCycleNet(**TINY_NET)(torch.zeros(1, 1, 32, 32))


@pytest.mark.parametrize("variant", ["cyclic_unet", "autoencoder"])
def test_baselines_train_and_score(variant: str) -> None:
    net = ModalityCycleNet(variant=variant, **TINY_NET)
    x1, x2 = torch.randn(2, 1, 32, 32), torch.randn(2, 1, 32, 32)
    terms = translation_terms(net, x1, x2 if variant != "autoencoder" else None)
    assert set(terms) == ({"reconstruct"} if variant == "autoencoder" else {"translate", "back"})
    scores = anomaly_scores(net, x1, torch.ones_like(x1, dtype=torch.bool), erosion_disk_radius=0)
    assert torch.allclose(scores, (x1 - net(x1)) ** 2)


# ---- the job --------------------------------------------------------------------------------------------------
def test_mmccd_job_runs_two_rounds_in_the_simulator(tiny_federation: str, tmp_path) -> None:
    from fedbrats.simulate import simulate

    result = simulate(
        "mmccd",
        str(tmp_path),
        sites_file=tiny_federation,
        num_rounds=2,
        training=TINY_TRAINING,
        network_args=TINY_NET,
    )
    history = json.loads(open(f"{result.run_dir}/metrics.json", encoding="utf-8").read())
    training = [r for r in history if r.get("sites") and r["sites"]["site-4"].get("num_steps") is not None]
    assert len(training) == 2
    for record in training:
        sites = record["sites"]
        assert sites["site-4"]["num_steps"] == 0  # T1 only: cannot train FLAIR -> T2, so its update weighs nothing
        assert sum(sites[s]["num_steps"] for s in ("site-1", "site-2", "site-3")) > 0
    final = history[-1]["aggregated"]
    assert 0.0 <= final["val_auroc"] <= 1.0  # the selection metric of the job
    spec = json.loads(open(f"{result.run_dir}/model_spec.json", encoding="utf-8").read())
    assert spec["args"]["variant"] == "mmccd" and spec["args"]["image_size"] == 32


def test_anomaly_eval_chooses_the_threshold_on_validation_and_reports_the_test_slices(
    tiny_federation: str, tmp_path
) -> None:
    from fedbrats.cli import main as cli_main
    from fedbrats.networks import model_spec

    torch.manual_seed(0)
    net = ModalityCycleNet(**TINY_NET)
    torch.save({"model": net.state_dict()}, tmp_path / "model.pt")
    (tmp_path / "model_spec.json").write_text(json.dumps(model_spec(net)))
    manifest = json.loads(open(tiny_federation, encoding="utf-8").read())
    base = os.path.dirname(tiny_federation)
    test_list = os.path.join(base, manifest["test_datalist"])
    val_list = os.path.join(base, manifest["sites"]["site-1"]["datalist"])
    out = tmp_path / "anomaly.json"
    args = ["anomaly-eval", "--model", str(tmp_path / "model.pt"), "--datalist", test_list]
    args += ["--val-datalist", val_list, "--zoom", "1", "--masks", "8", "--steps", "1", "--brain-fraction", "0.3"]
    assert cli_main([*args, "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    test = results["test"]
    assert test["num_slices"] >= 1 and 0 <= test["auroc"] <= 1 and 0 <= test["auprc"] <= 1
    assert results["validation"]["num_slices"] >= 1 and math.isfinite(results["threshold"])
    assert test["dice"] <= test["dice_best_threshold_on_these_slices_optimistic"] + 1e-9
    assert results["options"]["erosion_disk_radius"] == 4  # the default, recorded with the results
    assert cli_main([*args, "--out", str(out)]) == 1  # never overwrites
    seg_model = tmp_path / "seg"
    seg_model.mkdir()
    from fedbrats.networks.segresnet import BraTSSegResNet

    seg = BraTSSegResNet(init_filters=8)
    torch.save({"model": seg.state_dict()}, seg_model / "model.pt")
    (seg_model / "model_spec.json").write_text(json.dumps(model_spec(seg)))
    args[2] = str(seg_model / "model.pt")
    assert cli_main(args) == 1  # a segmentation model is refused by name


def test_anomaly_map_of_a_new_patient_is_on_the_input_grid_and_never_overwrites(tmp_path) -> None:
    import nibabel as nib

    from fedbrats.cli import main as cli_main
    from fedbrats.networks import model_spec

    torch.manual_seed(0)
    net = ModalityCycleNet(**TINY_NET)
    torch.save({"model": net.state_dict()}, tmp_path / "model.pt")
    (tmp_path / "model_spec.json").write_text(json.dumps(model_spec(net)))
    rng = np.random.default_rng(0)
    volume = np.zeros((20, 18, 12), dtype=np.float32)
    volume[3:17, 2:16, 2:10] = rng.uniform(1, 2, (14, 14, 8))
    affine = np.diag([1.5, 1.5, 2.0, 1.0])
    nib.save(nib.Nifti1Image(volume, affine), tmp_path / "flair.nii.gz")
    out = tmp_path / "map.nii.gz"
    args = ["anomaly", "--model", str(tmp_path / "model.pt"), "--image", str(tmp_path / "flair.nii.gz")]
    args += ["--out", str(out), "--zoom", "1", "--masks", "8", "--steps", "1", "--erosion-disk-radius", "0"]
    assert cli_main(args) == 0
    result = nib.load(out)
    data = result.get_fdata()
    assert data.shape == volume.shape and np.allclose(result.affine, affine)
    assert data[volume == 0].max() == 0 and data[volume > 0].max() > 0  # scores inside the head only
    assert cli_main(args) == 1  # the existing map is not overwritten
    assert cli_main([*args, "--overwrite"]) == 0
    missing = [*args[:4], str(tmp_path / "nope.nii.gz"), "--out", str(tmp_path / "other.nii.gz")]
    assert cli_main(missing) == 1


def test_imputation_averages_the_samples_where_the_band_did_not_hide_the_source(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    net = ModalityCycleNet(**TINY_NET)
    # A "translation" that returns the condition: outside the band it is the source itself, inside it noise.
    monkeypatch.setattr(mmccd, "sample_translation", lambda net, condition, steps, generator=None: condition)
    x1 = torch.randn(3, 1, 32, 32)
    out = mmccd.impute_target(net, x1, num_masks=2, steps=1)
    # Every pixel outside the corner both bands share is the source (the noise inside a band is never used).
    assert torch.allclose(out[..., 8:, 8:], x1[..., 8:, 8:]) and torch.allclose(out[..., :8, 8:], x1[..., :8, 8:])
    assert torch.all(out[..., :8, :8] == BACKGROUND)
    with pytest.raises(ValueError, match="autoencoder"):
        mmccd.impute_target(ModalityCycleNet(variant="autoencoder", **TINY_NET), x1)


def test_optimistic_dice_is_never_below_the_validation_thresholds() -> None:
    """Both searches share one grid, and the validation threshold is among the optimistic search's candidates."""
    rng = np.random.default_rng(4)
    for _ in range(25):
        y = rng.random(300) < rng.uniform(0.05, 0.4)
        val = [(np.where(y, 0.7, 0.3) + rng.normal(0, 0.15, 300), y)]
        test = [(np.where(y, rng.uniform(0.4, 0.8), 0.3) + rng.normal(0, 0.2, 300), y) for _ in range(3)]
        threshold, _ = choose_threshold(val)
        honest = mean_dice_at(test, threshold)
        assert best_dice_on(test, also=(threshold,)) >= honest
    # a coarse grid alone can miss the validation threshold's Dice; with it among the candidates it cannot
    y = np.arange(100) >= 90
    test = [(np.arange(100) / 100.0, y)]
    assert best_dice_on(test, num=2) < mean_dice_at(test, 0.895) == 1.0
    assert best_dice_on(test, num=2, also=(0.895,)) == 1.0
