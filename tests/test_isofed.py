"""Tests of the isofed job: IM loss, mean teacher, isolated aggregation, unlabelled sites, a simulator run."""

from __future__ import annotations

import json
import math
import os
from dataclasses import replace

import numpy as np
import pytest
import torch

from fedbrats.data.site_config import load_site_config, site_config_from_entry
from fedbrats.federated.client.trainer import SiteTrainer, TrainConfig
from fedbrats.federated.methods import build_method
from fedbrats.federated.methods.isofed import HANDOFFS, METHOD, IsoFedAggregation, IsoFedMethod, ema_update
from fedbrats.federated.protocol import BASE_META_KEYS, HANDOFF_PARAMS_KEY, LABELLED_KEY
from fedbrats.federated.server.aggregation import SiteUpdate
from fedbrats.losses.unsupervised import binary_entropy, information_maximisation_loss, information_maximisation_terms
from fedbrats.networks.segresnet import BraTSSegResNet

LN2 = math.log(2.0)
SMALL = {"epochs_per_round": 1, "data": {"roi_size": [16, 16, 16], "batch_size": 1}}
#: Label-free validation scores of an unlabelled site.
LABEL_FREE_METRICS = {"val_entropy", "val_im"}


# ------------------------------------------------------------------------------------------- IM loss


def test_im_loss_on_known_distributions() -> None:
    shape = (2, 3, 4, 4, 4)
    # p = 0.5 everywhere: each voxel has maximal entropy, so does the marginal: IM = ln2 - ln2 = 0.
    terms = information_maximisation_terms(torch.zeros(shape))
    assert float(terms["entropy"]) == pytest.approx(LN2, abs=1e-4)
    assert float(terms["diversity"]) == pytest.approx(LN2, abs=1e-4)
    assert float(information_maximisation_loss(torch.zeros(shape))) == pytest.approx(0.0, abs=1e-4)
    # Half the voxels certain of 1, half certain of 0: confident and diverse, the minimum -ln2.
    half = torch.full(shape, -30.0)
    half[..., :2] = 30.0
    terms = information_maximisation_terms(half)
    assert float(terms["entropy"]) == pytest.approx(0.0, abs=1e-3)
    assert float(terms["diversity"]) == pytest.approx(LN2, abs=1e-4)
    assert float(information_maximisation_loss(half)) == pytest.approx(-LN2, abs=1e-3)
    # Certain of 1 everywhere: confident but collapsed: IM = 0 - 0.
    assert float(information_maximisation_loss(torch.full(shape, 30.0))) == pytest.approx(0.0, abs=1e-3)
    # p = 0.2 everywhere: H(0.2) = 0.5004 nats; the diversity weight scales the second term only.
    p = torch.full(shape, math.log(0.2 / 0.8))
    h = -(0.2 * math.log(0.2) + 0.8 * math.log(0.8))
    assert float(binary_entropy(torch.tensor(0.2))) == pytest.approx(h, abs=1e-4)
    assert float(information_maximisation_loss(p, diversity_weight=0.0)) == pytest.approx(h, abs=1e-4)
    assert float(information_maximisation_loss(p, diversity_weight=0.5)) == pytest.approx(h / 2, abs=1e-4)


def test_im_voxel_mask_selects_voxels_and_errors_name_the_argument() -> None:
    logits = torch.zeros(1, 3, 4, 4, 4)
    logits[..., :2] = 30.0  # certain where the mask is on
    mask = torch.zeros(1, 1, 4, 4, 4, dtype=torch.bool)
    mask[..., :2] = True
    terms = information_maximisation_terms(logits, voxel_mask=mask)
    assert float(terms["entropy"]) == pytest.approx(0.0, abs=1e-3)
    assert float(terms["diversity"]) == pytest.approx(0.0, abs=1e-3)
    with pytest.raises(ValueError, match="voxel_mask"):
        information_maximisation_terms(logits, voxel_mask=torch.ones(1, 3, 4, 4, 4))
    with pytest.raises(ValueError, match="diversity_weight"):
        information_maximisation_loss(logits, diversity_weight=-1.0)
    with pytest.raises(ValueError, match="logits"):
        information_maximisation_terms(torch.zeros(2, 3))


# ------------------------------------------------------------------------------------- mean teacher


def test_ema_update_values() -> None:
    teacher, student = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    with torch.no_grad():
        for p in teacher.parameters():
            p.zero_()
        for p in student.parameters():
            p.fill_(1.0)
    ema_update(teacher, student, 0.99)
    assert all(torch.allclose(p, torch.full_like(p, 0.01)) for p in teacher.parameters())
    ema_update(teacher, student, 0.99)  # 0.99 * 0.01 + 0.01
    assert all(torch.allclose(p, torch.full_like(p, 0.0199)) for p in teacher.parameters())
    with pytest.raises(ValueError, match="decay"):
        ema_update(teacher, student, 1.5)


def _unlabelled_method(**kwargs) -> tuple[IsoFedMethod, BraTSSegResNet]:
    torch.manual_seed(0)
    model = BraTSSegResNet(init_filters=8)
    method = IsoFedMethod(**kwargs)
    method.labelled = False
    method.setup(model, ("t1", "t2", "flair"), torch.device("cpu"))
    return method, model


def _batch() -> dict[str, torch.Tensor]:
    mask = torch.tensor([[1.0, 0.0, 1.0, 1.0]])
    image = torch.randn(1, 4, 16, 16, 16) * mask[:, :, None, None, None]
    return {"image": image, "modality_mask": mask}


def test_consistency_ramp_up_values_and_no_gradient_into_the_teacher() -> None:
    method, model = _unlabelled_method(consistency_weight=0.1, rampup_epochs=40.0, im_steps=0)
    method.before_round(model, [], current_round=0)
    assert method.teacher is not None and not any(p.requires_grad for p in method.teacher.parameters())
    # Sigmoid ramp-up exp(-5 (1 - t)^2) of UA-MT: t = epoch / 40.
    for epoch, expected in ((0, 0.1 * math.exp(-5.0)), (20, 0.1 * math.exp(-1.25)), (40, 0.1), (100, 0.1)):
        _, terms = method.training_loss(model, _batch(), epoch)
        assert terms["consistency_weight"] == pytest.approx(expected)
    teacher_before = {k: v.clone() for k, v in method.teacher.state_dict().items()}
    loss, terms = method.training_loss(model, _batch(), 40)
    assert set(terms) == {"consistency", "consistency_weight"} and loss.requires_grad
    loss.backward()
    assert all(p.grad is None for p in method.teacher.parameters()), "a gradient reached the teacher"
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    # The EMA moves the teacher only towards the student's new weights, before the next step.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    method.training_loss(model, _batch(), 40)
    student = dict(model.state_dict())
    for name, value in method.teacher.state_dict().items():
        if value.is_floating_point() and name in dict(model.named_parameters()):
            torch.testing.assert_close(value, 0.99 * teacher_before[name] + 0.01 * student[name])


def test_strong_view_keeps_absent_sequences_zero_and_one_sequence() -> None:
    method, _ = _unlabelled_method(strong_dropout=1.0)
    batch = _batch()
    for _ in range(10):
        image, mask = method.strong_view(batch["image"], batch["modality_mask"])
        assert mask[0, 1] == 0 and 1 <= mask.sum() < 3, "dropout keeps a non-empty proper subset of present ones"
        assert not image[:, mask[0] == 0].any(), "hidden and absent sequences are exactly zero"


def test_handoff_weights_replace_the_received_model_before_training() -> None:
    method, model = _unlabelled_method(im_steps=0)
    method.labelled = True
    target = {k: torch.full_like(v, 0.5) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    method.on_global_model(model, {HANDOFF_PARAMS_KEY: {k: v.numpy() for k, v in target.items()}}, 1)
    assert not torch.equal(next(model.parameters()), torch.full_like(next(model.parameters()), 0.5))
    method.before_round(model, [], 1)
    assert all(torch.equal(v, target[k]) for k, v in model.state_dict().items())


def test_method_argument_errors() -> None:
    for kwargs, arg in (
        ({"im_steps": -1}, "im_steps"),
        ({"im_lr": 0.0}, "im_lr"),
        ({"ema_decay": 1.2}, "ema_decay"),
        ({"strong_dropout": -0.1}, "strong_dropout"),
        ({"consistency_weight": -1.0}, "consistency_weight"),
        ({"unlabelled_lr_scale": 0.0}, "unlabelled_lr_scale"),
    ):
        with pytest.raises(ValueError, match=arg):
            IsoFedMethod(**kwargs)
    with pytest.raises(ValueError, match="mode"):
        IsoFedAggregation(mode="average")
    with pytest.raises(ValueError, match="handoff"):
        IsoFedAggregation(handoff="sometimes")


# ------------------------------------------------------------------------------- isolated aggregation


def _update(site: str, value: float, steps: float, labelled: bool) -> SiteUpdate:
    return SiteUpdate(site, {"w": np.array([value], dtype=np.float32)}, {LABELLED_KEY: labelled}, {}, steps)


def test_isolated_aggregation_keeps_the_two_models_apart_by_hand() -> None:
    agg = IsoFedAggregation()
    global_params = {"w": np.array([0.0], dtype=np.float32)}
    assert agg.task_groups(["site-1", "site-2"]) == [(["site-1", "site-2"], {})], "round 0: no hand-off yet"
    updates = [
        _update("site-1", 1.0, 1, True),
        _update("site-3", 3.0, 3, True),
        _update("site-2", 10.0, 1, False),
        _update("site-4", 20.0, 3, False),
    ]
    theta_l = agg.aggregate(global_params, updates, 0)
    # Weighted by steps within each group only: (1*1 + 3*3) / 4 and (10*1 + 20*3) / 4.
    assert theta_l["w"][0] == pytest.approx(2.5)
    assert agg.unlabelled_params["w"][0] == pytest.approx(17.5)
    groups = dict((tuple(g), extras) for g, extras in agg.task_groups(["site-1", "site-2", "site-3", "site-4"]))
    assert groups[("site-2", "site-4")] == {}, "unlabelled sites train from the labelled model they receive"
    assert groups[("site-1", "site-3")][HANDOFF_PARAMS_KEY]["w"][0] == pytest.approx(17.5)
    # A round with labelled updates only leaves the unlabelled model as it was, and the reverse.
    theta_l = agg.aggregate(theta_l, [_update("site-1", 5.0, 1, True)], 1)
    assert theta_l["w"][0] == pytest.approx(5.0) and agg.unlabelled_params["w"][0] == pytest.approx(17.5)
    theta_l = agg.aggregate(theta_l, [_update("site-2", 7.0, 1, False)], 2)
    assert theta_l["w"][0] == pytest.approx(5.0) and agg.unlabelled_params["w"][0] == pytest.approx(7.0)
    # The state (saved every round) restores both groups and the unlabelled model.
    restored = IsoFedAggregation()
    restored.load_state({k: np.asarray(v) for k, v in agg.state().items()})
    assert restored.labelled_sites == {"site-1", "site-3"} and restored.unlabelled_sites == {"site-2", "site-4"}
    assert restored.unlabelled_params["w"][0] == pytest.approx(7.0)


#: Per schedule, over rounds 0-3: the model each kind of site trains from ("L" the global θ_L, "U" the hand-off
#: θ_U), and the history of the deployed θ_L after round 3 (one digit a round: 1 trained at a labelled site, 2 at an
#: unlabelled one; oldest first).
SCHEDULES = {
    "every": ({"labelled": "LUUU", "unlabelled": "LLLL"}, "2121"),
    "alternate": ({"labelled": "LULU", "unlabelled": "LLUL"}, "1221"),
    "none": ({"labelled": "LLLL", "unlabelled": "LUUU"}, "1111"),
}


@pytest.mark.parametrize("handoff", HANDOFFS)
def test_handoff_schedule_over_four_rounds(handoff: str) -> None:
    """Each site trains from what the task groups hand it (the hand-off, else the global model) and appends a digit
    to the weights' history; the schedule decides which lineage each kind of site extends."""
    assert set(SCHEDULES) == set(HANDOFFS)
    expected_starts, expected_history = SCHEDULES[handoff]
    sites = {"site-1": True, "site-2": False, "site-3": True, "site-4": False}
    agg = IsoFedAggregation(handoff=handoff)
    theta_l = {"w": np.array([0.0], dtype=np.float32)}
    starts: dict[str, str] = {name: "" for name in sites}
    for current_round in range(4):
        if current_round == 2:  # a resumed run picks the schedule up where it was
            restored = IsoFedAggregation(handoff=handoff)
            restored.load_state({k: np.asarray(v) for k, v in agg.state().items()})
            agg = restored
        groups = agg.task_groups(list(sites))
        assert sorted(t for group, _ in groups for t in group) == sorted(sites)
        updates = []
        for group, extras in groups:
            for name in group:
                start = extras.get(HANDOFF_PARAMS_KEY, theta_l)
                assert start is theta_l or start is agg.unlabelled_params
                starts[name] += "U" if start is agg.unlabelled_params else "L"
                digit = 1.0 if sites[name] else 2.0
                updates.append(_update(name, float(start["w"][0]) * 10 + digit, 1, sites[name]))
        theta_l = agg.aggregate(theta_l, updates, current_round)
    for name, labelled in sites.items():
        assert starts[name] == expected_starts["labelled" if labelled else "unlabelled"], (handoff, name)
    assert f"{int(theta_l['w'][0])}" == expected_history, "the deployed model is θ_L, with this history"
    other = "".join("2" if d == "1" else "1" for d in expected_history)
    assert f"{int(agg.unlabelled_params['w'][0])}" == other


def test_handoff_experiments_and_the_default_schedule() -> None:
    assert IsoFedAggregation().handoff == "every", "the default is IsoFed as it was before the option"
    experiments = METHOD.experiments
    assert experiments["isofed_handoff_alternate"] == ("isofed", {}, {"handoff": "alternate"})
    assert experiments["isofed_no_handoff"] == ("isofed", {}, {"handoff": "none"})
    assert experiments["isofed_slow_unlabelled"][1] == {"method_args": {"unlabelled_lr_scale": 0.1}}
    for name in ("isofed_handoff_alternate", "isofed_no_handoff"):
        IsoFedAggregation(**experiments[name][2])


def test_an_unlabelled_site_trains_from_its_hand_off_too() -> None:
    """Under the "alternate" and "none" schedules an unlabelled site gets θ_U as its hand-off."""
    method, model = _unlabelled_method(im_steps=0)
    target = {k: torch.full_like(v, 0.25) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    method.on_global_model(model, {HANDOFF_PARAMS_KEY: {k: v.numpy() for k, v in target.items()}}, 2)
    method.before_round(model, [], 2)
    assert all(torch.equal(v, target[k]) for k, v in model.state_dict().items())
    assert method.teacher is not None and all(
        torch.equal(v, target[k]) for k, v in method.teacher.state_dict().items()
    ), "the teacher starts from the hand-off model"


def test_baseline_modes_labelled_only_and_joint() -> None:
    updates = [_update("site-1", 1.0, 1, True), _update("site-2", 11.0, 1, False)]
    zero = {"w": np.array([0.0], dtype=np.float32)}
    labelled_only = IsoFedAggregation(mode="labelled_only")
    assert labelled_only.aggregate(zero, updates, 0)["w"][0] == pytest.approx(1.0)
    assert labelled_only.task_groups(["site-1", "site-2"]) == [(["site-1", "site-2"], {})]
    joint = IsoFedAggregation(mode="joint")
    assert joint.aggregate(zero, updates, 0)["w"][0] == pytest.approx(6.0)
    assert joint.task_groups(["site-1", "site-2"]) == [(["site-1", "site-2"], {})]


# ---------------------------------------------------------------------------------- unlabelled sites


def test_site_config_reads_labelled_flag(tiny_federation: str, tmp_path) -> None:
    site = load_site_config(tiny_federation, "site-2")
    assert site.labelled
    manifest = json.loads(open(tiny_federation, encoding="utf-8").read())
    entry = dict(manifest["sites"]["site-2"], labelled=False)
    base = os.path.dirname(tiny_federation)
    assert not site_config_from_entry("site-2", entry, base_dir=base).labelled
    with pytest.raises(ValueError, match="labelled"):
        site_config_from_entry("site-2", dict(entry, labelled="no"), base_dir=base)


def test_an_unlabelled_site_reads_no_label_file_and_sends_no_label_statistics(
    tiny_federation: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The site's datalist names segmentation files that exist on disk: an unlabelled site never opens one."""
    import fedbrats.data.transforms as transforms

    site = load_site_config(tiny_federation, "site-2")
    datalist = json.loads(open(site.datalist, encoding="utf-8").read())
    labels = [case["label"] for case in datalist["training"] + datalist["validation"]]
    assert labels and all(os.path.isfile(os.path.join(os.path.dirname(site.datalist), p)) for p in labels)
    opened: list[str] = []
    original = transforms.load_nifti_checked

    def spy(path: str, *args, **kwargs):
        opened.append(os.path.basename(path))
        return original(path, *args, **kwargs)

    monkeypatch.setattr(transforms, "load_nifti_checked", spy)
    config = TrainConfig.from_dict(
        {**SMALL, "method": "isofed", "method_args": {"im_steps": 1, "im_start_round": 0}, "unlabelled_sites": []}
    )
    trainer = SiteTrainer(replace(site, labelled=False), config, BraTSSegResNet(init_filters=8))
    assert not trainer.method.labelled
    assert all("label" not in batch for batch in trainer.train_loader)
    metrics = trainer.validate(postprocess_candidates=[10])
    summary = trainer.train_round(0, 2)
    payload = trainer.method.round_payload(trainer.model, trainer.train_loader)
    assert opened and not [name for name in opened if "seg" in name], f"label files read: {opened}"
    assert set(metrics) == LABEL_FREE_METRICS and all(math.isfinite(v) for v in metrics.values())
    assert set(summary["loss_terms"]) == {"consistency", "consistency_weight", "im_pretrain"}
    assert payload == {LABELLED_KEY: False}
    assert set(payload) <= BASE_META_KEYS | IsoFedMethod.payload_keys


def test_the_job_option_hides_labels_and_a_method_without_unlabelled_support_is_refused(tiny_federation: str) -> None:
    site = load_site_config(tiny_federation, "site-4")
    config = TrainConfig.from_dict({**SMALL, "method": "isofed", "unlabelled_sites": ["site-4"]})
    trainer = SiteTrainer(site, config, BraTSSegResNet(init_filters=8))
    assert not trainer.site.labelled and not trainer.method.labelled
    with pytest.raises(ValueError, match="has no labels"):
        SiteTrainer(site, TrainConfig.from_dict({**SMALL, "unlabelled_sites": ["site-4"]}), BraTSSegResNet())
    with pytest.raises(ValueError, match="unlabelled_sites"):
        TrainConfig.from_dict({"unlabelled_sites": "site-4"})
    assert build_method("isofed").supports_unlabelled


def test_unlabelled_lr_scale_slows_only_the_unlabelled_sites(tiny_federation: str) -> None:
    """The option scales the trainer's learning rate, its schedule included, at unlabelled sites only."""
    site = load_site_config(tiny_federation, "site-4")
    args = {"im_steps": 0, "unlabelled_lr_scale": 0.1}
    lrs = {}
    for hidden in ([], ["site-4"]):
        config = TrainConfig.from_dict({**SMALL, "method": "isofed", "method_args": args, "unlabelled_sites": hidden})
        trainer = SiteTrainer(site, config, BraTSSegResNet(init_filters=8))
        trainer.train_round(0, 2)
        lrs[bool(hidden)] = trainer.optimizer.param_groups[0]["lr"]
    assert lrs[True] == pytest.approx(0.1 * lrs[False]) and lrs[False] > 0
    assert IsoFedMethod().lr_scale == 1.0


def test_unlabelled_lr_scale_shrinks_an_unlabelled_sites_update(tiny_federation: str) -> None:
    """One Adam step on the same batch from the same weights and seed: the weights move ten times less at 0.1."""
    site = load_site_config(tiny_federation, "site-4")
    batch = _batch()
    moved = {}
    for scale in (1.0, 0.1):
        config = TrainConfig.from_dict(
            {
                **SMALL,
                "method": "isofed",
                "method_args": {"im_steps": 0, "unlabelled_lr_scale": scale},
                "unlabelled_sites": ["site-4"],
            }
        )
        torch.manual_seed(0)
        trainer = SiteTrainer(site, config, BraTSSegResNet(init_filters=8))
        trainer.train_loader = [batch]
        before = [p.detach().clone() for p in trainer.model.parameters()]
        summary = trainer.train_round(0)
        assert summary["num_steps"] == 1 and not trainer.method.labelled
        moved[scale] = float(
            torch.sqrt(sum(((p.detach() - b) ** 2).sum() for p, b in zip(trainer.model.parameters(), before)))
        )
    assert moved[1.0] > 0
    assert moved[0.1] == pytest.approx(0.1 * moved[1.0], rel=0.05)


def test_prepare_marks_unlabelled_sites_and_needs_no_segmentation_there(tmp_path) -> None:
    """``fedbrats prepare --unlabelled-sites TCIA``: TCIA's segmentations are neither required nor listed."""
    from fedbrats.data.conventions import BRATS2018
    from fedbrats.data.federation import add_pooled_site
    from fedbrats.data.prepare import main
    from tests.helpers import IDS_2018, write_case

    data = tmp_path / "data"
    for i, case_id in enumerate(IDS_2018):
        # One TCIA case has no segmentation at all: an unlabelled hospital need not have any.
        write_case(data, case_id, BRATS2018, missing=("seg",) if case_id == "Brats18_TCIA01_101_1" else (), seed=i)
    out = tmp_path / "out"
    assert main(["--data-dir", str(data), "--out-dir", str(out), "--unlabelled-sites", "TCIA", "--shallow"]) == 0
    manifest = json.loads((out / "sites.json").read_text())
    assert manifest["sites"]["TCIA"]["labelled"] is False and "labelled" not in manifest["sites"]["CBICA"]
    tcia = json.loads((out / "TCIA.json").read_text())
    assert all("label" not in e for e in tcia["training"] + tcia["validation"])
    assert not load_site_config(str(out / "sites.json"), "TCIA").labelled
    test = json.loads((out / "test.json").read_text())["test"]
    assert all(e["label"] for e in test), "every test case keeps its segmentation for evaluation"
    add_pooled_site(str(out / "sites.json"))
    pooled = json.loads((out / "central.json").read_text())
    assert not [e for e in pooled["training"] + pooled["validation"] if "TCIA" in e["case_id"]]
    assert main(["--data-dir", str(data), "--out-dir", str(tmp_path / "o2"), "--unlabelled-sites", "MGH"]) == 1


# ------------------------------------------------------------------------------------------ simulator


@pytest.mark.integration
def test_isofed_two_rounds(tiny_federation: str, tmp_path) -> None:
    """jobs/isofed on the 4-site federation with site-2 and site-4 unlabelled (the job's default)."""
    from fedbrats.simulate import simulate
    from tests.helpers import NVFLARE_ITEMS, audit_records

    overrides = {
        "epochs_per_round": 2,
        "method_args": {"im_steps": 2},
        "data": {"roi_size": [16, 16, 16], "batch_size": 1, "cache_rate": 1.0},
    }
    result = simulate("isofed", str(tmp_path), sites_file=tiny_federation, num_rounds=2, training=overrides)
    for name in ("FL_global_model.pt", "best_FL_global_model.pt"):
        state = torch.load(os.path.join(result.run_dir, "app_server", name), weights_only=True)["model"]
        assert state and all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    rounds = [r for r in result.history if not r.get("final_validation")]
    assert [r["round"] for r in rounds] == [0, 1]
    for r in rounds:
        assert sorted(r["sites"]) == ["site-1", "site-2", "site-3", "site-4"] and not r["rejected"]
        for site in ("site-1", "site-3"):
            assert "val_mean_dice" in r["sites"][site]["metrics"] and {"dice", "bce"} <= set(
                r["sites"][site]["loss_terms"]
            )
        for site in ("site-2", "site-4"):
            assert set(r["sites"][site]["metrics"]) == LABEL_FREE_METRICS
            assert "consistency" in r["sites"][site]["loss_terms"] and "dice" not in r["sites"][site]["loss_terms"]
    assert "im_pretrain" in rounds[1]["sites"]["site-1"]["loss_terms"], "IM pre-training from round 1"
    # The best model is chosen on the labelled sites' Dice only (the aggregate holds both kinds of score).
    assert {"val_mean_dice", "val_entropy"} <= set(rounds[1]["aggregated"])
    with np.load(os.path.join(result.run_dir, "server_state.npz")) as saved:
        assert sorted(saved["labelled_sites"].tolist()) == ["site-1", "site-3"]
        assert sorted(saved["unlabelled_sites"].tolist()) == ["site-2", "site-4"]
        assert any(k.startswith("unlabelled_model.") for k in saved.files)
    log = open(os.path.join(tmp_path, "simulator.log"), encoding="utf-8").read()
    assert "Sending task train to ['site-1', 'site-3']" in log, "round 1: the hand-off went to the labelled sites"
    assert "starting from the hand-off model" in log
    allowed = BASE_META_KEYS | IsoFedMethod.payload_keys | NVFLARE_ITEMS | {"site_name"}
    for site in ("site-2", "site-4"):
        for record in audit_records(str(tmp_path), site):
            assert set(record["meta"]) <= allowed, f"{site} sent undeclared items"
            metrics = record["meta"].get("initial_metrics", {}).get("items", {})
            assert set(metrics) <= LABEL_FREE_METRICS, f"{site} sent label-derived metrics {sorted(metrics)}"
            terms = record["meta"].get("loss_terms", {}).get("items", {})
            assert not {"dice", "bce"} & set(terms), f"{site} sent supervised loss terms"
            if "labelled" in record["meta"]:
                assert record["meta"]["labelled"] == {"type": "bool", "value": False}


def test_the_alternate_schedule_keeps_the_round_after_a_round_without_updates() -> None:
    """Round 2 aggregated nothing (every site failed): round 3 is odd, so the lineages swap (the controller says
    which round it sends; the round after the last aggregated one would be 2, and even)."""
    agg = IsoFedAggregation(handoff="alternate")
    theta = {"w": np.array([0.0], dtype=np.float32)}
    for current_round in (0, 1):
        agg.begin_round(current_round)
        updates = [_update("site-1", 1.0, 1, True), _update("site-2", 2.0, 1, False)]
        theta = agg.aggregate(theta, updates, current_round)
    agg.begin_round(2)  # no update arrives: aggregate is never called for round 2
    agg.begin_round(3)
    receivers = [group for group, extras in agg.task_groups(["site-1", "site-2"]) if extras]
    assert receivers == [["site-1"]], "round 3 swaps: the labelled site trains from θ_U"
