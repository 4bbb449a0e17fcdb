"""Tests of the mstkd job: losses against hand-computed values, gradient flow, network, method, simulator."""

from __future__ import annotations

import math
import os

import pytest
import torch

from fedbrats.constants import modality_combinations
from fedbrats.federated.methods import build_method
from fedbrats.federated.methods.mstkd import MSTKDMethod, random_subset_masks, random_subsets_of
from fedbrats.federated.methods.mstkd.losses import (
    adversarial_loss,
    attention_kd_loss,
    discriminator_loss,
    gram_matrix,
    gram_style_loss,
    hidden_state_kd_loss,
    standardized_logit_kd_loss,
    zscore_logits,
)
from fedbrats.federated.methods.mstkd.network import MSTKDNet, StyleDiscriminator
from fedbrats.losses.consistency import consistency_rampup_weight, output_consistency_loss, sigmoid_rampup
from fedbrats.networks import build_from_spec, build_network, model_spec
from fedbrats.networks.segresnet import BraTSSegResNet
from tests.helpers import RecordingNetwork

SIZE = 16
ALL_FOUR = ("t1", "t1ce", "t2", "flair")


def _net(seed: int = 0, **kwargs) -> MSTKDNet:
    torch.manual_seed(seed)
    return MSTKDNet(**{"init_filters": 4, "vit_depth": 2, **kwargs})


def _batch(batch: int = 2, mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    image = torch.randn(batch, 4, SIZE, SIZE, SIZE, generator=gen)
    label = (torch.rand(batch, 3, SIZE, SIZE, SIZE, generator=gen) > 0.7).float()
    mask = torch.ones(batch, 4) if mask is None else mask
    return {"image": image * mask[:, :, None, None, None], "label": label, "modality_mask": mask}


def _params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def _changed(before: dict[str, torch.Tensor], module: torch.nn.Module) -> bool:
    return any(not torch.equal(before[k], v.detach()) for k, v in module.named_parameters())


# ---------------------------------------------------------------------------------------- transformer KD


def test_hidden_kd_zero_for_identical_and_by_hand() -> None:
    h = [torch.randn(2, 5, 3), torch.randn(2, 5, 3)]
    assert hidden_state_kd_loss(h, [x.clone() for x in h]).item() == 0.0
    # Layer MSEs 1 and 4 -> mean 2.5.
    student = [torch.zeros(1, 2, 2), torch.zeros(1, 2, 2)]
    teacher = [torch.ones(1, 2, 2), torch.full((1, 2, 2), 2.0)]
    assert hidden_state_kd_loss(student, teacher).item() == pytest.approx(2.5)
    with pytest.raises(ValueError, match="student_hidden"):
        hidden_state_kd_loss(student, teacher[:1])


def test_attention_kd_zero_for_identical_and_by_hand() -> None:
    a = [torch.softmax(torch.randn(2, 2, 4, 4), -1) for _ in range(3)]
    assert attention_kd_loss(a, [x.clone() for x in a]).item() == 0.0
    # One layer: max = min = mean = A, so the loss is 3 * MSE(A_s^2, A_t^2) after scaling by N = 2.
    student, teacher = [torch.tensor([[[[0.5, 0.5]]]])], [torch.tensor([[[[1.0, 0.0]]]])]
    # Scaled: (1, 1) vs (2, 0); squared: (1, 1) vs (4, 0); MSE = (9 + 1) / 2 = 5.
    assert attention_kd_loss(student, teacher).item() == pytest.approx(15.0)
    # Unscaled: (.25, .25) vs (1, 0); MSE = (.5625 + .0625) / 2.
    assert attention_kd_loss(student, teacher, scale_by_tokens=False).item() == pytest.approx(3 * 0.3125)
    # Two layers, unscaled: student (1,0),(0,1): max (1,1), min (0,0), mean (.5,.5); teacher (1,0) twice.
    # Layer 1: max 0, min .5, mean .125 -> .625; layer 2: max 1, min .5, mean .625 -> 2.125; mean 1.375.
    student = [torch.tensor([[[[1.0, 0.0]]]]), torch.tensor([[[[0.0, 1.0]]]])]
    teacher = [torch.tensor([[[[1.0, 0.0]]]]), torch.tensor([[[[1.0, 0.0]]]])]
    assert attention_kd_loss(student, teacher, scale_by_tokens=False).item() == pytest.approx(1.375)


# -------------------------------------------------------------------------------------------- logit KD


def test_zscore_per_sample_and_channel() -> None:
    logits = torch.tensor([[[1.0, 3.0], [5.0, 5.0]], [[0.0, -4.0], [2.0, 8.0]]])  # (B=2, K=2, 2 voxels)
    z = zscore_logits(logits)
    expected = torch.tensor([[[-1.0, 1.0], [0.0, 0.0]], [[1.0, -1.0], [-1.0, 1.0]]])
    assert torch.allclose(z, expected, atol=1e-5)
    with pytest.raises(ValueError, match="logits"):
        zscore_logits(torch.ones(2, 3))


def test_standardized_logit_kd_known_values() -> None:
    # Teacher z-scores (-1, 1), student (1, -1): per voxel binary KL = (1 - 2 sigmoid(-1/T)) / T, times T^2.
    student = torch.tensor([[[3.0, 1.0]]])
    teacher = torch.tensor([[[1.0, 3.0]]])
    assert standardized_logit_kd_loss(student, teacher, 1.0).item() == pytest.approx(math.tanh(0.5), rel=1e-5)
    assert standardized_logit_kd_loss(student, teacher, 2.0).item() == pytest.approx(2 * math.tanh(0.25), rel=1e-5)
    # Identical, and invariant to a positive affine map of the teacher per channel.
    s = torch.randn(2, 3, 4, 4, 4)
    assert standardized_logit_kd_loss(s, s.clone()).item() == pytest.approx(0.0, abs=1e-6)
    assert standardized_logit_kd_loss(s, 3.0 * s + 2.0).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="temperature"):
        standardized_logit_kd_loss(s, s, 0.0)
    with pytest.raises(ValueError, match="same shape"):
        standardized_logit_kd_loss(s, s[:1])


def test_output_consistency_by_hand() -> None:
    s = torch.zeros(1, 3, 2, 2, 2)
    assert output_consistency_loss(s, s.clone()).item() == 0.0
    # sigmoid(0) = .5, sigmoid(log 3) = .75.
    assert output_consistency_loss(s, torch.full_like(s, math.log(3.0))).item() == pytest.approx(0.0625)


def test_rampup_values() -> None:
    assert consistency_rampup_weight(0, 10.0, 20) == pytest.approx(10 * math.exp(-5.0))
    assert consistency_rampup_weight(10, 10.0, 20) == pytest.approx(10 * math.exp(-1.25))
    assert consistency_rampup_weight(20, 10.0, 20) == pytest.approx(10.0)
    assert consistency_rampup_weight(35, 10.0, 20) == pytest.approx(10.0)
    assert sigmoid_rampup(3, 0) == 1.0
    with pytest.raises(ValueError, match="rampup_epochs"):
        sigmoid_rampup(1, -1)


# ------------------------------------------------------------------------------------------------ style


def test_gram_matrix_and_style_loss_by_hand() -> None:
    f = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])  # (B=1, C=2, N=2)
    g = gram_matrix(f)
    assert torch.allclose(g, torch.tensor([[[2.5, 5.5], [5.5, 12.5]]]))
    assert gram_style_loss([f], [f.clone()]).item() == 0.0
    # (2.5^2 + 5.5^2 + 5.5^2 + 12.5^2) / 4
    assert gram_style_loss([f], [torch.zeros_like(f)]).item() == pytest.approx(55.75)


def _zero_discriminator(mode_channels: int = 2) -> StyleDiscriminator:
    disc = StyleDiscriminator(mode_channels, base_filters=2, num_layers=1)
    for p in disc.parameters():
        torch.nn.init.zeros_(p)
    return disc


def test_gan_losses_known_values_with_a_constant_discriminator() -> None:
    disc = _zero_discriminator()  # logits 0 everywhere
    real, fake = torch.randn(1, 2, 4, 4, 4), torch.randn(1, 2, 4, 4, 4)
    assert discriminator_loss(disc, real, fake, "bce").item() == pytest.approx(math.log(2.0))
    assert adversarial_loss(disc, fake, "bce").item() == pytest.approx(math.log(2.0))
    assert discriminator_loss(disc, real, fake, "lsgan").item() == pytest.approx(0.5)
    assert adversarial_loss(disc, fake, "lsgan").item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="gan_mode"):
        adversarial_loss(disc, fake, "wgan")
    assert disc(real).shape == (1, 1, 2, 2, 2)


# ------------------------------------------------------------------------------------------ gradients


def test_student_kd_losses_give_no_gradient_to_the_teacher() -> None:
    student, teacher = _net(0), _net(1)
    image = _batch(1)["image"]
    s_out, t_out = student(image), teacher(image)  # teacher output with its graph: the losses must detach it
    loss = (
        hidden_state_kd_loss(s_out["hidden"], t_out["hidden"])
        + attention_kd_loss(s_out["attn"], t_out["attn"])
        + standardized_logit_kd_loss(s_out["logits"], t_out["logits"])
        + output_consistency_loss(s_out["logits"], t_out["logits"])
        + gram_style_loss(s_out["style"], t_out["style"])
    )
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert sum(int(p.grad is not None and p.grad.abs().sum() > 0) for p in student.parameters()) > 10


def test_discriminator_update_touches_only_the_discriminator() -> None:
    student, teacher = _net(0), _net(1)
    image = _batch(1)["image"]
    s_style, t_style = student(image)["style"][-1], teacher(image)["style"][-1]
    disc = StyleDiscriminator(s_style.shape[1], base_filters=4)
    opt = torch.optim.Adam(disc.parameters(), lr=1e-2)
    before = _params(disc)
    discriminator_loss(disc, t_style, s_style).backward()
    opt.step()
    assert _changed(before, disc)
    assert all(p.grad is None for p in [*student.parameters(), *teacher.parameters()])


def test_adversarial_term_reaches_the_student_not_the_discriminator() -> None:
    student = _net(0)
    s_style = student(_batch(1)["image"])["style"][-1]
    disc = StyleDiscriminator(s_style.shape[1], base_filters=4)
    opt = torch.optim.Adam(disc.parameters(), lr=1e-2)
    before = _params(disc)
    adversarial_loss(disc, s_style).backward()
    assert all(p.grad is None for p in disc.parameters())
    assert all(p.requires_grad for p in disc.parameters()), "requires_grad must be restored"
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.enc2.parameters())
    opt.step()
    assert not _changed(before, disc)


# ------------------------------------------------------------------------------------------- network


def test_network_outputs_and_attention_rows_sum_to_one() -> None:
    net = _net(vit_depth=3, kd_layers=(3, 1))
    out = net(_batch(2)["image"])
    n_tokens, dim = (SIZE // 8) ** 3, 16
    assert out["logits"].shape == (2, 3, SIZE, SIZE, SIZE)
    assert net.kd_layers == [1, 3] and len(out["hidden"]) == len(out["attn"]) == 2
    assert all(h.shape == (2, n_tokens, dim) for h in out["hidden"])
    assert all(a.shape == (2, 2, n_tokens, n_tokens) for a in out["attn"])
    for a in out["attn"]:
        assert torch.allclose(a.sum(-1), torch.ones(2, 2, n_tokens), atol=1e-5)
    assert [s.shape for s in out["style"]] == [(2, 4, SIZE, SIZE, SIZE), (2, 8, SIZE // 2, SIZE // 2, SIZE // 2)]
    assert net.style_channels == (4, 8)


def test_network_spec_roundtrip_patches_and_errors() -> None:
    net = build_network("mstkd", init_filters=4, vit_depth=2)
    rebuilt = build_from_spec(model_spec(net))
    rebuilt.load_state_dict(net.state_dict(), strict=True)
    assert model_spec(rebuilt) == model_spec(net)
    patched = _net(vit_patch_size=2)
    assert patched.spatial_divisor == 16
    assert patched(_batch(1)["image"])["attn"][0].shape == (1, 2, 1, 1)
    with pytest.raises(ValueError, match="kd_layers"):
        MSTKDNet(vit_depth=2, kd_layers=(3,))
    with pytest.raises(ValueError, match="num_heads"):
        MSTKDNet(init_filters=4, embed_dim=15, vit_heads=2)
    with pytest.raises(ValueError, match="multiples of 8"):
        _net()(torch.zeros(1, 4, 12, 16, 16))


# -------------------------------------------------------------------------------------------- method


def _method(**kwargs) -> MSTKDMethod:
    return MSTKDMethod(**{"discriminator_filters": 4, **kwargs})


def test_full_site_trains_teacher_and_discriminator_and_student() -> None:
    student = _net(0)
    method = build_method("mstkd", discriminator_filters=4, adv_weight=0.1)
    method.setup(student, ALL_FOUR, torch.device("cpu"))
    assert method.teacher is not None and method.discriminator is not None
    s0, t0, d0 = _params(student), _params(method.teacher), _params(method.discriminator)
    torch.manual_seed(3)
    loss, terms = method.training_loss(student, _batch(2), epoch=10)
    expected = {"dice", "bce", "teacher_dice", "hidden_kd", "attn_kd", "logit_kd", "consistency", "gram", "adv", "disc"}
    assert expected <= set(terms) and all(math.isfinite(v) for v in terms.values())
    # The returned loss is the student's weighted sum, with the consistency weight ramped up at epoch 10.
    weights = {"dice": 1.0, "bce": 1.0, "hidden_kd": 0.2, "attn_kd": 1.0, "logit_kd": 1.0, "gram": 1.0, "adv": 0.1}
    weighted = sum(w * terms[k] for k, w in weights.items()) + 10 * math.exp(-1.25) * terms["consistency"]
    assert loss.item() == pytest.approx(weighted, rel=1e-5)
    # Teacher and discriminator were stepped by their own optimisers; the student only by the trainer.
    assert _changed(t0, method.teacher) and _changed(d0, method.discriminator)
    assert not _changed(s0, student)
    student.zero_grad(set_to_none=True)
    loss.backward()
    assert all(p.grad is None for p in method.teacher.parameters())
    assert all(p.grad is None for p in method.discriminator.parameters())
    assert sum(int(p.grad is not None) for p in student.parameters()) > 10
    opt = torch.optim.Adam(student.parameters(), lr=1e-3)
    opt.step()
    assert _changed(s0, student)


def _two_views(student: torch.Tensor, available: torch.Tensor) -> dict[str, torch.Tensor]:
    """A batch as the loader gives it to a distilling method: the student's view (``student`` mask, image zero-filled
    accordingly) and the teacher's view (``available``: every sequence the site has)."""
    batch = _batch(available.shape[0], available)
    batch["available_image"], batch["available_modality_mask"] = batch["image"], available
    batch["image"], batch["modality_mask"] = batch["image"] * student[:, :, None, None, None], student
    return batch


def test_partial_site_has_a_teacher_on_its_own_sequences() -> None:
    """A site with three sequences keeps a teacher too; it trains on those three whatever the loader hid from the
    student, and the student's view is a non-empty subset of them."""
    student = _net(0)
    method = _method()
    method.setup(student, ("t1", "t2", "flair"), torch.device("cpu"))
    assert method.teacher is not None
    t0 = _params(method.teacher)
    method.teacher = RecordingNetwork(method.teacher)
    recording_student = RecordingNetwork(student)
    available = torch.tensor([[1.0, 0, 1, 1]] * 2)
    hidden = torch.tensor([[1.0, 0, 0, 1], [0, 0, 1, 0]])
    torch.manual_seed(0)
    loss, terms = method.training_loss(recording_student, _two_views(hidden, available), epoch=0)
    assert method.teacher.masks[0].tolist() == available.tolist()
    assert _changed(t0, method.teacher.net)
    seen = recording_student.masks[0]
    assert bool((seen.sum(1) >= 1).all()) and bool((seen <= available).all())
    assert terms["acted_kd"] == 1.0 and {"logit_kd", "hidden_kd", "teacher_dice"} <= set(terms)
    loss.backward()
    assert all(p.grad is not None for p in student.head.parameters())


def test_one_sequence_site_trains_the_student_only() -> None:
    student = _net(0)
    method = _method()
    method.setup(student, ("flair",), torch.device("cpu"))
    assert method.teacher is None and method.discriminator is None
    loss, terms = method.training_loss(student, _batch(2, torch.tensor([[0.0, 0, 0, 1]] * 2)), epoch=0)
    assert set(terms) == {"dice", "bce"}
    loss.backward()
    assert all(p.grad is not None for p in student.head.parameters())


def test_net_only_ablation_keeps_no_teacher_and_the_same_student_views() -> None:
    """mstkd_net_only: every distillation weight 0, so no teacher is kept; the student still trains on random
    subsets of the site's sequences, as in MST-KD."""
    from fedbrats.federated.methods import EXPERIMENTS

    _, training, _ = EXPERIMENTS["mstkd_net_only"]
    method = _method(**training["method_args"])
    assert not method.distils and _method().distils
    student = RecordingNetwork(_net(0))
    method.setup(student.net, ALL_FOUR, torch.device("cpu"))
    assert method.teacher is None and method.discriminator is None
    torch.manual_seed(0)
    for _ in range(20):
        _, terms = method.training_loss(student, _two_views(torch.ones(2, 4), torch.ones(2, 4)), epoch=0)
        assert set(terms) == {"dice", "bce"}
    assert len({tuple(m.tolist()) for batch in student.masks for m in batch}) > 5  # the subsets vary


def test_ablation_weights_switch_terms_off() -> None:
    student = _net(0)
    method = _method(hidden_kd_weight=0, attn_kd_weight=0, logit_kd_weight=0, consistency_weight=0)
    method.setup(student, ALL_FOUR, torch.device("cpu"))
    _, terms = method.training_loss(student, _batch(1), epoch=0)
    assert {"hidden_kd", "attn_kd", "logit_kd", "consistency"}.isdisjoint(terms)
    assert {"gram", "adv", "disc"} <= set(terms)
    no_style = _method(gram_weight=0, adv_weight=0)
    no_style.setup(student, ALL_FOUR, torch.device("cpu"))
    assert no_style.discriminator is None
    _, terms = no_style.training_loss(student, _batch(1), epoch=0)
    assert {"gram", "adv", "disc"}.isdisjoint(terms) and "hidden_kd" in terms


def test_random_subsets_cover_all_fifteen_and_are_never_empty() -> None:
    torch.manual_seed(0)
    masks = random_subset_masks(600)
    assert masks.shape == (600, 4) and bool((masks.sum(1) >= 1).all())
    assert len({tuple(m.tolist()) for m in masks}) == len(modality_combinations()) == 15
    with pytest.raises(ValueError, match="batch_size"):
        random_subset_masks(0)


def test_random_subsets_of_the_available_sequences() -> None:
    """Every non-empty subset of a case's sequences is drawn, and nothing outside them."""
    torch.manual_seed(0)
    available = torch.tensor([[1.0, 0, 1, 1], [0, 0, 1, 1]]).repeat(300, 1)
    masks = random_subsets_of(available)
    assert bool((masks.sum(1) >= 1).all()) and bool((masks <= available).all())
    assert len({tuple(m.tolist()) for m in masks[0::2]}) == 7 and len({tuple(m.tolist()) for m in masks[1::2]}) == 3
    with pytest.raises(ValueError, match="no sequence"):
        random_subsets_of(torch.tensor([[0.0, 0, 0, 0]]))


def test_method_argument_errors() -> None:
    with pytest.raises(ValueError, match="gram_weight"):
        MSTKDMethod(gram_weight=-1.0)
    with pytest.raises(ValueError, match="kd_temperature"):
        MSTKDMethod(kd_temperature=0.0)
    with pytest.raises(ValueError, match="gan_mode"):
        MSTKDMethod(gan_mode="wgan")
    with pytest.raises(ValueError, match="teacher_lr"):
        MSTKDMethod(teacher_lr=0.0)
    assert MSTKDMethod.payload_keys == frozenset()
    with pytest.raises(ValueError, match="network 'mstkd'"):
        MSTKDMethod().setup(BraTSSegResNet(), ALL_FOUR, torch.device("cpu"))


# ------------------------------------------------------------------------------------------- simulator


@pytest.mark.integration
def test_mstkd_two_rounds(tiny_federation: str, tmp_path) -> None:
    """jobs/mstkd: models saved, finite losses, distillation terms at the full site-1, student-only elsewhere."""
    from fedbrats.simulate import simulate

    overrides = {
        "epochs_per_round": 2,
        "lr": 3e-3,
        # The recipe's sequence dropout: the teacher sees the teacher's view whatever the loader hid.
        "data": {"roi_size": [16, 16, 16], "batch_size": 1, "cache_rate": 1.0},
    }
    result = simulate("mstkd", str(tmp_path), sites_file=tiny_federation, num_rounds=2, training=overrides)
    for name in ("FL_global_model.pt", "best_FL_global_model.pt"):
        path = os.path.join(result.run_dir, "app_server", name)
        assert os.path.isfile(path), f"{name} was not saved"
        state = torch.load(path, weights_only=True)["model"]
        assert state and all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    rounds = [r for r in result.history if not r.get("final_validation")]
    assert [r["round"] for r in rounds] == [0, 1]
    for r in rounds:
        assert sorted(r["sites"]) == ["site-1", "site-2", "site-3", "site-4"] and not r["rejected"]
        assert all(math.isfinite(s["train_loss"]) for s in r["sites"].values())
    terms = rounds[1]["sites"]["site-1"]["loss_terms"]
    assert {
        "dice",
        "bce",
        "teacher_dice",
        "hidden_kd",
        "attn_kd",
        "logit_kd",
        "consistency",
        "gram",
        "adv",
        "disc",
    } <= set(terms)
    assert all(math.isfinite(v) for v in terms.values())
    for site in ("site-1", "site-2", "site-3"):  # every site with two or more sequences distils on every step
        assert rounds[1]["sites"][site]["loss_terms"]["acted_kd"] == pytest.approx(1.0), site
    assert set(rounds[1]["sites"]["site-4"]["loss_terms"]) == {"dice", "bce"}, "T1-only site trains the student alone"
