"""Tests of the fedkd network: shapes, masking of absent sequences, gradients, parameter names, errors."""

from __future__ import annotations

import inspect

import pytest
import torch

from fedbrats.constants import MODALITIES
from fedbrats.federated.methods.fedkd.drl import DRLLoss
from fedbrats.federated.methods.fedkd.network import (
    ModalityAwareSegNet,
    modality_parameter_prefixes,
    parameter_modality,
)

SIZE = 16


def _net(**kwargs) -> ModalityAwareSegNet:
    torch.manual_seed(0)
    return ModalityAwareSegNet(**kwargs)


def _image(batch: int = 2) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(batch, 4, SIZE, SIZE, SIZE)


# t1ce absent in case 0 only; t2 absent in every case.
MIXED = torch.tensor([[True, False, False, True], [True, True, False, False]])


@pytest.mark.parametrize("fusion", ["mean", "attention"])
def test_output_shapes_with_mixed_masks(fusion: str) -> None:
    net = _net(fusion=fusion)
    out = net(_image(), MIXED)
    assert set(out) == {"logits", "content", "style", "fused", "modality_mask"}
    assert out["logits"].shape == (2, 3, SIZE, SIZE, SIZE)
    assert out["content"].shape == (2, 4, 32, 2, 2, 2)
    assert out["style"].shape == (2, 4, 8)
    assert out["fused"].shape == (2, 32, 2, 2, 2)
    assert out["modality_mask"].dtype == torch.float32
    assert torch.equal(out["modality_mask"], MIXED.float())
    # Absent sequences have exactly zero content and style.
    absent = ~MIXED
    assert torch.count_nonzero(out["content"][absent]) == 0
    assert torch.count_nonzero(out["style"][absent]) == 0
    assert torch.all(out["content"][MIXED].abs().sum(dim=(1, 2, 3, 4)) > 0)
    assert torch.isfinite(out["logits"]).all()


def test_default_mask_means_all_present_and_predict_matches() -> None:
    net = _net().eval()
    x = _image()
    out_none = net(x)
    out_all = net(x, torch.ones(2, 4))
    assert torch.equal(out_none["logits"], out_all["logits"])
    assert torch.equal(net.predict(x), out_none["logits"])
    # A (M,) or (1, M) mask is broadcast over the batch (sliding-window batches).
    single = torch.tensor([1.0, 0.0, 1.0, 1.0])
    assert torch.equal(net.predict(x, single), net.predict(x, single.expand(2, 4)))
    assert torch.equal(net.predict(x, single[None]), net.predict(x, single.expand(2, 4)))


def test_custom_sizes() -> None:
    net = _net(init_filters=4, content_channels=6, style_channels=3, out_channels=2)
    out = net(torch.randn(1, 4, 16, 8, 24), torch.tensor([[0, 1, 1, 0]]))
    assert out["logits"].shape == (1, 2, 16, 8, 24)
    assert out["content"].shape == (1, 4, 6, 2, 1, 3)
    assert out["style"].shape == (1, 4, 3)


@pytest.mark.parametrize("fusion", ["mean", "attention"])
@pytest.mark.parametrize("garbage", [float("nan"), 1e30, float("inf")])
def test_absent_sequence_never_contributes(fusion: str, garbage: float) -> None:
    net = _net(fusion=fusion).eval()
    x = _image()
    reference = net(x, MIXED)
    spoiled = x.clone()
    spoiled[0, 1] = garbage  # t1ce of case 0 (absent there, present in case 1)
    spoiled[:, 2] = garbage  # t2, absent everywhere
    out = net(spoiled, MIXED)
    for key in ("logits", "content", "style", "fused"):
        assert torch.isfinite(out[key]).all(), key
        assert torch.equal(out[key], reference[key]), key


def test_absent_sequence_changes_nothing_in_training_mode_with_dropout() -> None:
    net = _net(dropout_prob=0.2).train()
    x = _image()
    spoiled = x.clone()
    spoiled[0, 1] = float("nan")
    torch.manual_seed(5)
    a = net(x, MIXED)["logits"]
    torch.manual_seed(5)
    b = net(spoiled, MIXED)["logits"]
    assert torch.equal(a, b)


def test_masked_mean_fusion_equals_mean_over_available_contents() -> None:
    net = _net().eval()
    out = net(_image(), MIXED)
    expected = out["content"][0, [0, 3]].mean(dim=0)
    torch.testing.assert_close(out["fused"][0], expected)
    expected = out["content"][1, [0, 1]].mean(dim=0)
    torch.testing.assert_close(out["fused"][1], expected)


def test_single_available_sequence_fused_is_its_content() -> None:
    for fusion in ("mean", "attention"):
        net = _net(fusion=fusion).eval()
        out = net(_image(1), torch.tensor([[False, False, False, True]]))
        torch.testing.assert_close(out["fused"][0], out["content"][0, 3])


def test_gradients_reach_available_encoders_only() -> None:
    net = _net(fusion="attention")
    x = _image()
    out = net(x, MIXED)
    loss = out["logits"].sigmoid().mean() + DRLLoss(w_consistency=1.0, w_independence=1.0, w_style=1.0)(
        out["content"], out["style"], out["modality_mask"]
    )
    loss.backward()
    params = dict(net.named_parameters())
    for name, param in params.items():
        owner = parameter_modality(name)
        if owner == "t2":  # absent in every case: never run
            assert param.grad is None or torch.count_nonzero(param.grad) == 0, name
        else:
            assert param.grad is not None, name
            assert torch.count_nonzero(param.grad) > 0, name


def test_encoder_gradient_ignores_cases_without_the_sequence() -> None:
    # The gradient of t1ce's encoder must be the same whatever lies in case 0's (absent) t1ce channel.
    grads = []
    for garbage in (0.0, 1e6):
        net = _net()
        x = _image()
        x[0, 1] = garbage
        net(x, MIXED)["logits"].mean().backward()
        grads.append({n: p.grad.clone() for n, p in net.named_parameters() if n.startswith("encoders.1.stages")})
    for name in grads[0]:
        assert torch.equal(grads[0][name], grads[1][name]), name


def test_parameter_prefixes_and_attributes() -> None:
    prefixes = modality_parameter_prefixes()
    assert prefixes == {m: f"encoders.{i}." for i, m in enumerate(MODALITIES)}
    net = _net(fusion="attention")
    names = [n for n, _ in net.named_parameters()]
    for prefix in prefixes.values():
        assert any(n.startswith(prefix) for n in names)
        assert any(n.startswith(prefix + "style_head.") for n in names)
    shared = {n.split(".")[0] for n in names if parameter_modality(n) is None}
    assert shared == {"content_head", "attention", "decoder"}
    assert parameter_modality("encoders.3.stages.0.0.0.weight") == "flair"
    assert parameter_modality("decoder.head.weight") is None
    # Every constructor argument is an attribute of the same name, and rebuilding from them gives the same model.
    params = [p for p in inspect.signature(ModalityAwareSegNet.__init__).parameters if p != "self"]
    kwargs = {p: getattr(net, p) for p in params}
    rebuilt = ModalityAwareSegNet(**kwargs)
    assert rebuilt.state_dict().keys() == net.state_dict().keys()
    rebuilt.load_state_dict(net.state_dict())
    # Light: roughly 0.3-1 M parameters with the defaults.
    n_params = sum(p.numel() for p in _net().parameters())
    assert 300_000 <= n_params <= 1_000_000


@pytest.mark.parametrize(
    ("shape", "match"),
    [((2, 4, 16, 16, 12), "divisible by 8"), ((2, 3, 16, 16, 16), r"\(B, 4, D, H, W\)"), ((4, 16, 16, 16), "4, 16")],
)
def test_bad_image_shapes_raise(shape: tuple[int, ...], match: str) -> None:
    net = _net()
    with pytest.raises(ValueError, match=match):
        net(torch.zeros(shape))


def test_bad_masks_raise() -> None:
    net = _net()
    x = _image()
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        net(x, torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0]]))
    with pytest.raises(ValueError, match="modality_mask"):
        net(x, torch.ones(2, 3))
    with pytest.raises(ValueError, match="modality_mask"):
        net(x, torch.ones(3, 4))
    with pytest.raises(ValueError, match="8\\^3"):
        net(torch.zeros(1, 4, 8, 8, 8))


def test_bad_constructor_arguments_raise() -> None:
    with pytest.raises(ValueError, match="fusion"):
        ModalityAwareSegNet(fusion="max")
    with pytest.raises(ValueError, match="dropout_prob"):
        ModalityAwareSegNet(dropout_prob=1.0)
    with pytest.raises(ValueError, match="init_filters"):
        ModalityAwareSegNet(init_filters=0)
