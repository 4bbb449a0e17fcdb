"""Tests of the client methods: FedKD's loss terms, gradients and prototype payload, and plain supervised training."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedbrats.constants import MODALITIES
from fedbrats.data.transforms import apply_modality_mask
from fedbrats.federated.methods import build_method
from fedbrats.federated.methods.fedkd import FedKDMethod
from fedbrats.federated.methods.fedkd.network import ModalityAwareSegNet
from fedbrats.federated.methods.fedkd.rcl import region_prototypes
from fedbrats.federated.methods.supervised import SupervisedMethod
from fedbrats.networks import BraTSSegResNet
from tests.helpers import RecordingNetwork

FILTERS = 8
CONTENT = 4 * FILTERS  # content channels of ModalityAwareSegNet(init_filters=8)
CPU = torch.device("cpu")
FULL = [[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]]
PARTIAL = [[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]]
NO_T1 = [[0.0, 1.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]]


def _label(et_in_second: bool = True) -> torch.Tensor:
    """(2, 3, 16, 16, 16) nested binary WT ⊃ TC ⊃ ET masks; every region in both cases unless told otherwise."""
    label = torch.zeros(2, 3, 16, 16, 16)
    label[:, 0, 2:13, 2:13, 2:13] = 1
    label[:, 1, 4:11, 4:11, 4:11] = 1
    label[:, 2, 5:9, 5:9, 5:9] = 1
    if not et_in_second:
        label[1, 2] = 0
    return label


def _batch(mask: list[list[float]], case_ids: list[str] | None = None, et_in_second: bool = True) -> dict:
    generator = torch.Generator().manual_seed(0)
    return {
        "image": torch.randn(2, 4, 16, 16, 16, generator=generator),
        "label": _label(et_in_second),
        "modality_mask": torch.tensor(mask),
        "case_id": case_ids or ["a", "b"],
    }


@pytest.fixture
def model() -> ModalityAwareSegNet:
    """A small, freshly seeded modality-aware network."""
    torch.manual_seed(0)
    return ModalityAwareSegNet(init_filters=FILTERS)


def _method(model: torch.nn.Module, **kwargs: float) -> FedKDMethod:
    method = FedKDMethod(**kwargs)
    method.setup(model, MODALITIES, CPU)
    return method


def _global_meta() -> dict:
    rng = np.random.default_rng(0)
    return {
        "global_prototypes": rng.normal(size=(4, CONTENT)).astype(np.float32),
        "global_prototype_valid": np.array([True, True, True, True]),
    }


def _weighted_sum(method: FedKDMethod, terms: dict[str, float]) -> float:
    weight = {k.removesuffix("_weight"): v for k, v in method.weights.items()}
    return sum(weight[k] * v for k, v in terms.items() if not k.startswith("acted_"))


def _two_views(student: list[list[float]], available: list[list[float]]) -> dict:
    """A batch with the loader's two views: the student's (``student`` mask, its image zero-filled accordingly) and
    the teacher's (``available``: every sequence the site has)."""
    batch = _batch(available)
    batch["available_image"], batch["available_modality_mask"] = batch["image"], batch["modality_mask"]
    batch["modality_mask"] = torch.tensor(student)
    batch["image"] = apply_modality_mask(batch["image"], batch["modality_mask"])
    return batch


def test_terms_before_any_global_model(model: ModalityAwareSegNet) -> None:
    """Right after setup (no global model yet) the loss is dice + DRL + RCL + self-distillation, finite, and their
    weighted sum."""
    method = _method(model)
    loss, terms = method.training_loss(model, _batch(PARTIAL), epoch=0)
    assert set(terms) == {"dice", "bce", "drl", "rcl", "self_distill", "acted_self_distill"}
    assert loss.ndim == 0 and math.isfinite(loss.item()) and loss.requires_grad
    assert all(math.isfinite(v) for v in terms.values())
    assert loss.item() == pytest.approx(_weighted_sum(method, terms), rel=1e-5)


def test_round0_has_no_distillation(model: ModalityAwareSegNet) -> None:
    """Round 0's global model is untrained: no KD and no prototype KD, even with prototypes."""
    method = _method(model)
    method.on_global_model(model, _global_meta(), current_round=0)
    assert method.teacher is None
    _, terms = method.training_loss(model, _batch(PARTIAL), epoch=0)
    assert {"kd", "proto_kd", "acted_kd"}.isdisjoint(terms)


def test_distillation_terms_from_round_1(model: ModalityAwareSegNet) -> None:
    """From kd_start_round on, KD (frozen teacher) and prototype KD join; KD grows once the student moves."""
    method = _method(model)
    method.on_global_model(model, _global_meta(), current_round=1)
    assert method.teacher is not None and method.teacher is not model
    assert not any(p.requires_grad for p in method.teacher.parameters())
    loss, terms = method.training_loss(model, _batch(PARTIAL), epoch=0)
    assert set(terms) == {
        "dice",
        "bce",
        "drl",
        "rcl",
        "kd",
        "proto_kd",
        "self_distill",
        "acted_kd",
        "acted_self_distill",
    }
    assert math.isfinite(loss.item()) and loss.item() == pytest.approx(_weighted_sum(method, terms), rel=1e-5)
    assert terms["kd"] == pytest.approx(0.0, abs=1e-6)  # student == teacher
    assert 0.0 <= terms["proto_kd"] <= 2.0

    with torch.no_grad():
        model.decoder.head.weight.add_(0.5)
    _, terms = method.training_loss(model, _batch(PARTIAL), epoch=0)
    assert terms["kd"] > 1e-4
    teacher_head = method.teacher.decoder.head.weight
    assert not torch.allclose(teacher_head, model.decoder.head.weight)  # the teacher is a frozen snapshot


def test_kd_start_round_delays_distillation(model: ModalityAwareSegNet) -> None:
    """With kd_start_round=3, round 1 and 2 train without KD terms."""
    method = _method(model, kd_start_round=3)
    method.on_global_model(model, _global_meta(), current_round=2)
    _, terms = method.training_loss(model, _batch(PARTIAL), epoch=0)
    assert "kd" not in terms and "proto_kd" not in terms


def test_global_teacher_sees_the_sequences_the_student_view_hides(model: ModalityAwareSegNet) -> None:
    """The frozen global teacher gets the teacher's view (every sequence the site has), the student its dropped
    view; KD then carries what the hidden sequences show, and acts on every step."""
    method = _method(model)
    method.on_global_model(model, _global_meta(), current_round=1)
    recorder = RecordingNetwork(method.teacher)
    method.teacher = recorder
    batch = _two_views(student=[[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 1.0, 0.0]], available=FULL)
    _, terms = method.training_loss(model, batch, epoch=0)
    assert recorder.masks[0].tolist() == FULL
    assert torch.equal(recorder.images[0], batch["available_image"])
    assert torch.count_nonzero(batch["image"][:, 1]) == 0 and torch.count_nonzero(recorder.images[0][:, 1]) > 0
    assert terms["acted_kd"] == 1.0 and terms["kd"] > 0  # teacher and student saw different inputs


@pytest.mark.parametrize("site", [MODALITIES, ("t1", "t2", "flair"), ("t2", "flair")])
def test_self_distillation_acts_at_every_site_with_two_or_more_sequences(
    model: ModalityAwareSegNet, site: tuple[str, ...]
) -> None:
    """Self-distillation acts on every step at a site with >= 2 sequences: from the teacher's view to the hidden
    cases' student view where a sequence is hidden, else to a random proper subset (an extra forward pass); its
    gradient reaches the model."""
    method = FedKDMethod()
    method.setup(model, site, CPU)
    available = [[1.0 if m in site else 0.0 for m in MODALITIES]] * 2
    one_hidden = [list(available[0]), list(available[1])]
    one_hidden[1][MODALITIES.index(site[-1])] = 0.0  # the second case's student view lacks one sequence
    for student in (available, one_hidden):
        model.zero_grad(set_to_none=True)
        loss, terms = method.training_loss(model, _two_views(student, available), epoch=0)
        assert terms["acted_self_distill"] == 1.0 and math.isfinite(terms["self_distill"])
        only_self = FedKDMethod(dice_weight=0, bce_weight=0, drl_weight=0, rcl_weight=0, self_distill_weight=1.0)
        only_self.setup(model, site, CPU)
        with torch.no_grad():
            model.decoder.head.weight.add_(0.3)  # a model whose views disagree
        sd_loss, sd_terms = only_self.training_loss(model, _two_views(student, available), epoch=0)
        assert sd_terms["self_distill"] > 0
        sd_loss.backward()
        assert torch.count_nonzero(model.decoder.head.weight.grad) > 0


def test_self_distillation_never_at_a_one_sequence_site(model: ModalityAwareSegNet) -> None:
    method = FedKDMethod()
    method.setup(model, ("flair",), CPU)
    only_flair = [[0.0, 0.0, 0.0, 1.0]] * 2
    _, terms = method.training_loss(model, _two_views(only_flair, only_flair), epoch=0)
    assert "self_distill" not in terms and "acted_self_distill" not in terms


def test_self_distillation_teaches_the_hidden_cases_from_the_teacher_view(model: ModalityAwareSegNet) -> None:
    """With one case hidden a sequence, the loss equals KD from the model's teacher-view output to that case's
    student-view output, and nothing of the other case."""
    from fedbrats.federated.methods.fedkd.distillation import self_distillation_loss

    method = FedKDMethod(dice_weight=0, bce_weight=0, drl_weight=0, rcl_weight=0, self_distill_weight=1.0)
    method.setup(model, MODALITIES, CPU)
    batch = _two_views(student=[FULL[0], [1.0, 0.0, 1.0, 1.0]], available=FULL)
    model.eval()  # no dropout: the outputs below are reproducible
    loss, _ = method.training_loss(model, batch, epoch=0)
    with torch.no_grad():
        full = model(batch["available_image"], batch["available_modality_mask"])["logits"]
        student = model(batch["image"], batch["modality_mask"])["logits"]
    expected = self_distillation_loss(full[1:], student[1:], method.kd_temperature)
    assert loss.item() == pytest.approx(float(expected), rel=1e-4)


@pytest.mark.parametrize("term", ["drl", "rcl", "kd", "proto_kd", "self_distill"])
def test_zero_weight_removes_term(model: ModalityAwareSegNet, term: str) -> None:
    """A weight of 0 switches its term off entirely (ablations)."""
    method = _method(model, **{f"{term}_weight": 0.0})
    method.on_global_model(model, _global_meta(), current_round=1)
    loss, terms = method.training_loss(model, _batch(FULL), epoch=0)
    expected = {"dice", "bce", "drl", "rcl", "kd", "proto_kd", "self_distill"} - {term}
    expected |= {f"acted_{t}" for t in ("kd", "self_distill") if t in expected}
    assert set(terms) == expected
    assert loss.item() == pytest.approx(_weighted_sum(method, terms), rel=1e-5)


def test_zero_dice_weight_removes_dice_from_loss(model: ModalityAwareSegNet) -> None:
    """dice_weight=0: Dice is still reported, but the loss is only the other terms."""
    method = _method(model, dice_weight=0.0)
    loss, terms = method.training_loss(model, _batch(PARTIAL), epoch=0)
    assert terms["dice"] > 0
    others = {k: v for k, v in terms.items() if k != "dice"}
    assert loss.item() == pytest.approx(_weighted_sum(method, others), rel=1e-5)


def test_absent_sequence_encoder_gets_no_gradient(model: ModalityAwareSegNet) -> None:
    """With t1 absent from every case, no loss term (KD and prototypes included) reaches the t1 encoder."""
    method = _method(model)
    method.on_global_model(model, _global_meta(), current_round=1)
    loss, terms = method.training_loss(model, _batch(NO_T1), epoch=0)
    assert {"kd", "proto_kd"} <= set(terms)
    loss.backward()
    grads = {i: [p.grad for n, p in model.named_parameters() if n.startswith(f"encoders.{i}.")] for i in range(4)}
    assert all(g is None or torch.count_nonzero(g) == 0 for g in grads[0])
    for i in (1, 2, 3):
        assert any(g is not None and torch.count_nonzero(g) > 0 for g in grads[i]), i
    assert model.decoder.head.weight.grad is not None


def test_partial_updates_leave_out_absent_encoders_only(model: ModalityAwareSegNet) -> None:
    """A t2+flair site sends every weight but the t1 and t1ce encoders; with partial_updates off, all of them."""
    method = FedKDMethod()
    method.setup(model, ("t2", "flair"), CPU)
    names = list(model.state_dict())
    sent = {n for n in names if method.sends_parameter(n)}
    assert not any(n.startswith(("encoders.0.", "encoders.1.")) for n in sent)
    assert {n for n in names if n.startswith(("encoders.2.", "encoders.3."))} <= sent
    assert {n for n in names if not n.startswith("encoders.")} <= sent
    everything = FedKDMethod(partial_updates=False)
    everything.setup(model, ("t2", "flair"), CPU)
    assert all(everything.sends_parameter(n) for n in names)
    assert all(_method(model).sends_parameter(n) for n in names), "a complete site sends everything"


# ------------------------------------------------------------------------------------------------ prototypes


def test_round_payload_shapes_and_values(model: ModalityAwareSegNet) -> None:
    """Prototypes are float32 (4, C), counts and cases (4,); the mean fused content per region over the batch."""
    method = _method(model)
    batch = _batch(PARTIAL)
    method.training_loss(model, batch, epoch=0)
    payload = method.round_payload(model, train_loader=None)
    assert set(payload) == {"prototypes", "prototype_counts", "prototype_cases"}
    assert set(payload) == set(FedKDMethod.payload_keys)
    protos, counts, cases = payload["prototypes"], payload["prototype_counts"], payload["prototype_cases"]
    assert all(isinstance(v, np.ndarray) and v.dtype == np.float32 for v in payload.values())
    assert protos.shape == (4, CONTENT) and counts.shape == (4,) and cases.shape == (4,)
    np.testing.assert_array_equal(cases, [2, 2, 2, 2])
    assert bool((counts > 0).all())

    with torch.no_grad():
        fused = model(batch["image"], batch["modality_mask"])["fused"]
        per_case, per_case_counts = region_prototypes(fused, batch["label"], disjoint=True)
    expected = (per_case * per_case_counts[..., None]).sum(0) / per_case_counts.sum(0)[:, None]
    np.testing.assert_allclose(counts, per_case_counts.sum(0).numpy(), rtol=1e-5)
    np.testing.assert_allclose(protos, expected.numpy(), rtol=1e-4, atol=1e-5)


def test_round_payload_withholds_region_seen_in_one_case(model: ModalityAwareSegNet) -> None:
    """ET present in one case only (< min_prototype_cases = 2): its prototype and count are withheld."""
    method = _method(model)
    method.training_loss(model, _batch(PARTIAL, et_in_second=False), epoch=0)
    payload = method.round_payload(model, None)
    np.testing.assert_array_equal(payload["prototype_cases"], [2, 2, 2, 1])
    assert payload["prototype_counts"][3] == 0 and not payload["prototypes"][3].any()
    assert bool((payload["prototype_counts"][:3] > 0).all())
    assert all(payload["prototypes"][r].any() for r in range(3))


def test_same_case_seen_twice_counts_once(model: ModalityAwareSegNet) -> None:
    """Seeing one case in several batches (epochs) does not lift it over the privacy floor."""
    method = _method(model)
    method.training_loss(model, _batch(PARTIAL, ["a", "a"]), epoch=0)
    method.training_loss(model, _batch(PARTIAL, ["a", "a"]), epoch=1)
    payload = method.round_payload(model, None)
    np.testing.assert_array_equal(payload["prototype_cases"], [1, 1, 1, 1])
    assert not payload["prototype_counts"].any() and not payload["prototypes"].any()

    method = _method(model, min_prototype_cases=3)
    method.training_loss(model, _batch(PARTIAL, ["a", "b"]), epoch=0)
    method.training_loss(model, _batch(PARTIAL, ["b", "a"]), epoch=1)
    payload = method.round_payload(model, None)
    np.testing.assert_array_equal(payload["prototype_cases"], [2, 2, 2, 2])
    assert not payload["prototype_counts"].any()
    method.training_loss(model, _batch(PARTIAL, ["c", "a"]), epoch=2)
    assert method.round_payload(model, None)["prototype_counts"].all()


def test_new_global_model_resets_prototype_sums(model: ModalityAwareSegNet) -> None:
    """Each round's payload covers that round only: on_global_model clears the sums and case sets."""
    method = _method(model)
    method.training_loss(model, _batch(PARTIAL, ["a", "b"]), epoch=0)
    method.on_global_model(model, {}, current_round=1)
    method.training_loss(model, _batch(PARTIAL, ["c", "c"]), epoch=0)
    np.testing.assert_array_equal(method.round_payload(model, None)["prototype_cases"], [1, 1, 1, 1])


# ------------------------------------------------------------------------------------------ construction


@pytest.mark.parametrize(
    "arg", ["dice_weight", "drl_weight", "rcl_weight", "kd_weight", "proto_kd_weight", "self_distill_weight"]
)
def test_negative_weight_rejected_by_name(arg: str) -> None:
    """A negative loss weight is refused, naming the argument."""
    with pytest.raises(ValueError, match=arg):
        FedKDMethod(**{arg: -0.1})


def test_build_method() -> None:
    """Methods are built by name with their arguments; an unknown name lists the known ones."""
    with pytest.raises(ValueError, match="nope") as info:
        build_method("nope")
    for name in ("fedavg", "fedkd", "supervised"):
        assert name in str(info.value)
    method = build_method("fedkd", kd_weight=0.25, min_prototype_cases=4)
    assert isinstance(method, FedKDMethod)
    assert method.weights["kd_weight"] == 0.25 and method.min_prototype_cases == 4
    assert isinstance(build_method("fedavg"), SupervisedMethod)
    with pytest.raises(ValueError, match="rcl_weight"):
        build_method("fedavg", rcl_weight=0.1)


# ------------------------------------------------------------------------------------------------ supervised


def test_supervised_method_dice_and_bce(model: ModalityAwareSegNet) -> None:
    """Supervised training reports Dice and BCE, each scaled by its weight; it sends no extras."""
    method = SupervisedMethod(dice_weight=2.0, bce_weight=0.5)
    method.setup(model, MODALITIES, CPU)
    loss, terms = method.training_loss(model, _batch(PARTIAL), epoch=0)
    assert set(terms) == {"dice", "bce"} and math.isfinite(loss.item())
    assert loss.item() == pytest.approx(2.0 * terms["dice"] + 0.5 * terms["bce"], rel=1e-5)
    dice_only = SupervisedMethod(bce_weight=0.0).training_loss(model, _batch(PARTIAL), epoch=0)[0]
    assert dice_only.item() == pytest.approx(terms["dice"], rel=1e-5)
    assert method.round_payload(model, None) == {}


def test_supervised_method_with_plain_tensor_network() -> None:
    """The baseline network returns a tensor, not a dict: the method handles both."""
    torch.manual_seed(0)
    net = BraTSSegResNet(init_filters=8, blocks_down=(1, 1, 1, 1), blocks_up=(1, 1, 1))
    loss, terms = SupervisedMethod().training_loss(net, _batch(PARTIAL), epoch=0)
    assert set(terms) == {"dice", "bce"} and math.isfinite(loss.item())
    loss.backward()
    assert net.conv_final[-1].conv.weight.grad is not None
