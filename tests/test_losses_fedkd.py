"""Tests of the fedkd losses (DRL, RCL, distillation) against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from fedbrats.federated.methods.fedkd.distillation import prototype_kd_loss, self_distillation_loss
from fedbrats.federated.methods.fedkd.drl import (
    DRLLoss,
    content_consistency_loss,
    content_style_independence_loss,
    style_separation_loss,
)
from fedbrats.federated.methods.fedkd.network import ModalityAwareSegNet, parameter_modality
from fedbrats.federated.methods.fedkd.rcl import (
    RCL_REGIONS,
    RegionContrastiveLoss,
    region_prototypes,
    region_weights,
    three_branch_rcl_loss,
)
from fedbrats.losses.distillation import logit_kd_loss

NAN = float("nan")


def _content(vectors: list[list[list[float]]]) -> torch.Tensor:
    """(B, M, C) nested lists -> (B, M, C, 1, 1, 1) content with one voxel."""
    return torch.tensor(vectors, dtype=torch.float32)[..., None, None, None]


# ----------------------------------------------------------------------------------------------------- DRL


def test_consistency_zero_for_identical_contents() -> None:
    torch.manual_seed(0)
    one = torch.randn(1, 1, 5, 2, 2, 2)
    content = torch.cat([one, 3.0 * one, one], dim=1)  # same directions, different norms
    assert content_consistency_loss(content, torch.ones(1, 3)).item() == pytest.approx(0.0, abs=1e-6)


def test_consistency_two_sequences_by_hand() -> None:
    # a = (1, 0), b = (0, 1): reference (0.5, 0.5), each squared distance 0.5.
    content = _content([[[1.0, 0.0], [0.0, 1.0]]])
    assert content_consistency_loss(content, torch.ones(1, 2)).item() == pytest.approx(0.5)
    # Scale does not matter (L2-normalised along channels).
    content = _content([[[3.0, 0.0], [0.0, 0.2]]])
    assert content_consistency_loss(content, torch.ones(1, 2)).item() == pytest.approx(0.5)
    # Two voxels, agreeing in the first: mean over voxels of (0, 0.5).
    content = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]], [[1.0, 0.0], [0.0, 1.0]]]])  # (1, 2, C=2, 2 voxels)
    assert content_consistency_loss(content, torch.ones(1, 2)).item() == pytest.approx(0.25)


def test_consistency_batch_mean_skips_single_sequence_cases_and_absent() -> None:
    # Case 0: a=(1,0), b=(0,1), absent NaN -> 0.5.
    # Case 1: a=(1,0), b=(0,1), c=(1,0): reference (2/3, 1/3), distances 2/9, 8/9, 2/9 -> 4/9.
    # Case 2: a single sequence -> left out.
    content = _content(
        [
            [[1.0, 0.0], [NAN, NAN], [0.0, 1.0]],
            [[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]],
            [[NAN, 7.0], [5.0, 1.0], [NAN, NAN]],
        ]
    )
    mask = torch.tensor([[True, False, True], [True, True, True], [False, True, False]])
    expected = (0.5 + 4.0 / 9.0) / 2.0
    assert content_consistency_loss(content, mask).item() == pytest.approx(expected)


def test_consistency_zero_with_grad_when_no_case_has_two_sequences() -> None:
    content = _content([[[1.0, 2.0], [NAN, NAN]]]).requires_grad_(True)
    loss = content_consistency_loss(content, torch.tensor([[1.0, 0.0]]))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(content.grad, torch.zeros_like(content))


def test_consistency_gradient_ignores_absent_nan() -> None:
    content = _content([[[1.0, 0.5], [0.2, 1.0], [NAN, NAN]]]).requires_grad_(True)
    content_consistency_loss(content, torch.tensor([[1, 1, 0]])).backward()
    assert torch.isfinite(content.grad).all()
    assert torch.count_nonzero(content.grad[0, 2]) == 0
    assert torch.count_nonzero(content.grad[0, :2]) > 0


def test_independence_correlated_and_uncorrelated_by_hand() -> None:
    # Three available (case, sequence) pairs, C = S = 1; one absent entry holds NaN and is ignored.
    content = _content([[[1.0], [2.0]], [[3.0], [NAN]]])
    mask = torch.tensor([[True, True], [True, False]])
    style = torch.tensor([[[2.0], [4.0]], [[6.0], [NAN]]])  # linear in content -> correlation 1
    assert content_style_independence_loss(content, style, mask).item() == pytest.approx(1.0, abs=1e-4)
    style = torch.tensor([[[1.0], [-2.0]], [[1.0], [NAN]]])  # centred (1, -2, 1) . (-1, 0, 1) = 0
    assert content_style_independence_loss(content, style, mask).item() == pytest.approx(0.0, abs=1e-6)
    # Mean of squared correlations over C x S = 1 x 2 entries: (1 + 0) / 2.
    style = torch.tensor([[[2.0, 1.0], [4.0, -2.0]], [[6.0, 1.0], [NAN, NAN]]])
    assert content_style_independence_loss(content, style, mask).item() == pytest.approx(0.5, abs=1e-4)


def test_independence_needs_two_pairs() -> None:
    content = _content([[[1.0], [2.0]]]).requires_grad_(True)
    style = torch.ones(1, 2, 3, requires_grad=True)
    loss = content_style_independence_loss(content, style, torch.tensor([[True, False]]))
    assert loss.item() == 0.0
    loss.backward()


def test_style_separation_by_hand() -> None:
    s = 1.0 / math.sqrt(2.0)
    style = torch.tensor([[[1.0, 0.0], [s, s], [NAN, NAN]]])
    mask = torch.tensor([[True, True, False]])
    assert style_separation_loss(style, mask).item() == pytest.approx(s)
    assert style_separation_loss(style, mask, margin=0.5).item() == pytest.approx(s - 0.5)
    orthogonal = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])
    assert style_separation_loss(orthogonal, torch.ones(1, 2)).item() == pytest.approx(0.0)
    # Same sequence in two cases is never a pair: nothing to separate.
    same = torch.tensor([[[1.0, 0.0], [NAN, NAN]], [[1.0, 0.0], [NAN, NAN]]])
    assert style_separation_loss(same, torch.tensor([[1, 0], [1, 0]])).item() == 0.0
    # Pairs across cases count: case 0 seq 0 = (1, 0), case 1 seq 1 = (1, 0) -> cos 1.
    cross = torch.tensor([[[1.0, 0.0], [NAN, NAN]], [[NAN, NAN], [1.0, 0.0]]])
    assert style_separation_loss(cross, torch.tensor([[1, 0], [0, 1]])).item() == pytest.approx(1.0)


def test_drl_loss_combines_weighted_terms() -> None:
    torch.manual_seed(0)
    content = torch.randn(2, 4, 6, 2, 2, 2)
    style = torch.randn(2, 4, 3)
    mask = torch.tensor([[1, 1, 0, 1], [0, 1, 1, 0]])
    drl = DRLLoss(w_consistency=2.0, w_independence=0.5, w_style=0.25)
    terms = drl.terms(content, style, mask)
    expected = (
        2.0 * content_consistency_loss(content, mask)
        + 0.5 * content_style_independence_loss(content, style, mask)
        + 0.25 * style_separation_loss(style, mask)
    )
    torch.testing.assert_close(terms["total"], expected)
    torch.testing.assert_close(drl(content, style, mask), expected)
    with pytest.raises(ValueError, match="w_style"):
        DRLLoss(w_style=-1.0)


def test_drl_shape_errors() -> None:
    with pytest.raises(ValueError, match=r"mask must have shape \(2, 4\), got \(2, 3\)"):
        content_consistency_loss(torch.zeros(2, 4, 3, 1, 1, 1), torch.ones(2, 3))
    with pytest.raises(ValueError, match="style"):
        content_style_independence_loss(torch.zeros(2, 4, 3, 1, 1, 1), torch.zeros(2, 3, 5), torch.ones(2, 4))
    with pytest.raises(ValueError, match="content"):
        content_consistency_loss(torch.zeros(4, 3), torch.ones(4, 3))


# ----------------------------------------------------------------------------------------------------- RCL


def test_region_prototypes_same_resolution_by_hand() -> None:
    # Two voxels: v0 in WT (and TC), v1 background; ET absent.
    features = torch.tensor([[[1.0, 3.0], [2.0, 4.0]]]).view(1, 2, 2, 1, 1)
    label = torch.zeros(1, 3, 2, 1, 1)
    label[0, 0, 0] = 1.0
    label[0, 1, 0] = 1.0
    protos, counts = region_prototypes(features, label)
    assert RCL_REGIONS == ("background", "WT", "TC", "ET")
    torch.testing.assert_close(counts, torch.tensor([[1.0, 1.0, 1.0, 0.0]]))
    torch.testing.assert_close(protos[0, 0], torch.tensor([3.0, 4.0]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(protos[0, 1], torch.tensor([1.0, 2.0]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(protos[0, 3], torch.zeros(2))


def test_region_prototypes_downsampled_soft_hard_and_brain() -> None:
    # Label 4x2x2 -> features 2x1x1: each feature voxel covers 8 label voxels. WT covers 3 of cell 0.
    features = torch.tensor([[[2.0, 10.0]]]).view(1, 1, 2, 1, 1)
    label = torch.zeros(1, 3, 4, 2, 2)
    label[0, 0, 0, 0, :] = 1.0
    label[0, 0, 1, 0, 0] = 1.0
    protos, counts = region_prototypes(features, label)
    torch.testing.assert_close(counts[0], torch.tensor([1.625, 0.375, 0.0, 0.0]))
    assert protos[0, 1, 0].item() == pytest.approx(2.0, rel=1e-4)
    assert protos[0, 0, 0].item() == pytest.approx((0.625 * 2.0 + 10.0) / 1.625, rel=1e-4)
    # Hard mode: 3/8 < 0.5 -> WT vanishes at feature resolution, background fills both cells.
    _, hard_counts = region_prototypes(features, label, soft=False)
    torch.testing.assert_close(hard_counts[0], torch.tensor([2.0, 0.0, 0.0, 0.0]))
    # Brain mask: only the first label slab (cell 0) is brain -> background = 5/8 of cell 0.
    brain = torch.zeros(1, 1, 4, 2, 2)
    brain[:, :, :2] = 1.0
    _, brain_counts = region_prototypes(features, label, brain_mask=brain)
    assert brain_counts[0, 0].item() == pytest.approx(0.625)
    # Disjoint regions: WT=TC gives zero edema.
    label[0, 1] = label[0, 0]
    weights = region_weights(label, (2, 1, 1), disjoint=True)
    assert weights[0, 1].sum().item() == 0.0
    assert weights[0, 2].sum().item() == pytest.approx(0.375)


def test_region_prototypes_per_sequence_and_errors() -> None:
    torch.manual_seed(0)
    features = torch.randn(2, 4, 5, 2, 2, 2)
    label = (torch.rand(2, 3, 8, 8, 8) > 0.5).float()
    protos, counts = region_prototypes(features, label)
    assert protos.shape == (2, 4, 4, 5)
    assert counts.shape == (2, 4)
    single, single_counts = region_prototypes(features[:, 2], label)
    torch.testing.assert_close(protos[:, 2], single)
    torch.testing.assert_close(counts, single_counts)
    with pytest.raises(ValueError, match="label"):
        region_prototypes(features[:, 0], label[:1])
    with pytest.raises(ValueError, match="features"):
        region_prototypes(torch.zeros(2, 5, 2, 2), label)
    with pytest.raises(ValueError, match="spatial_size"):
        region_weights(label, (16, 8, 8))


def _supcon_reference(emb: list[list[float]], labels: list[int], anchors: list[int], t: float) -> float:
    """Plain-Python SupCon: mean over anchors of -mean_p log(exp(s_ip/t) / sum_{a != i} exp(s_ia/t))."""

    def cos(u: list[float], v: list[float]) -> float:
        return sum(a * b for a, b in zip(u, v)) / math.sqrt(sum(a * a for a in u) * sum(b * b for b in v))

    losses = []
    for i in anchors:
        others = [a for a in range(len(emb)) if a != i]
        positives = [p for p in others if labels[p] == labels[i]]
        if not positives:
            continue
        denom = sum(math.exp(cos(emb[i], emb[a]) / t) for a in others)
        losses.append(-sum(math.log(math.exp(cos(emb[i], emb[p]) / t) / denom) for p in positives) / len(positives))
    return sum(losses) / len(losses)


def test_region_contrastive_two_cases_by_hand() -> None:
    t = 0.5
    # Case 0: background (0, 1), WT (1, 0); case 1: background (-1, 0), WT (0.6, 0.8). TC, ET absent (NaN).
    protos = torch.tensor(
        [
            [[0.0, 1.0], [1.0, 0.0], [NAN, NAN], [NAN, NAN]],
            [[-1.0, 0.0], [0.6, 0.8], [NAN, NAN], [NAN, NAN]],
        ]
    )
    counts = torch.tensor([[5.0, 2.0, 0.0, 0.0], [5.0, 3.0, 0.0, 0.0]])
    loss = RegionContrastiveLoss(temperature=t)(protos, counts)
    wt0 = -math.log(math.exp(0.6 / t) / (math.exp(0.6 / t) + math.exp(0.0 / t) + math.exp(-1.0 / t)))
    wt1 = -math.log(math.exp(0.6 / t) / (math.exp(0.6 / t) + math.exp(0.8 / t) + math.exp(-0.6 / t)))
    assert loss.item() == pytest.approx((wt0 + wt1) / 2, rel=1e-5)


def test_region_contrastive_with_sequences_and_globals_matches_reference() -> None:
    torch.manual_seed(3)
    t = 0.2
    protos = torch.randn(2, 4, 3)
    counts = torch.tensor([[4.0, 2.0, 1.0, 0.0], [6.0, 1.0, 0.0, 0.0]])
    seq_protos = torch.randn(2, 2, 4, 3)
    seq_mask = torch.tensor([[True, False], [True, True]])
    seq_protos[0, 1] = NAN  # absent sequence: must be ignored
    global_protos = torch.randn(4, 3)
    global_valid = torch.tensor([True, True, False, True])
    loss = RegionContrastiveLoss(temperature=t)(protos, counts, seq_protos, seq_mask, global_protos, global_valid)

    emb, labels, n_local = [], [], 0
    for b in range(2):
        for r in range(4):
            if counts[b, r] > 0:
                emb.append(protos[b, r].tolist())
                labels.append(r)
    for b in range(2):
        for m in range(2):
            for r in range(4):
                if seq_mask[b, m] and counts[b, r] > 0:
                    emb.append(seq_protos[b, m, r].tolist())
                    labels.append(r)
    n_local = len(emb)
    for r in range(4):
        if global_valid[r]:
            emb.append(global_protos[r].tolist())
            labels.append(r)
    anchors = [i for i in range(n_local) if labels[i] != 0]
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx(_supcon_reference(emb, labels, anchors, t), rel=1e-5)


def test_region_contrastive_no_positive_is_zero_with_grad() -> None:
    protos = torch.randn(1, 4, 3, requires_grad=True)
    counts = torch.tensor([[5.0, 2.0, 0.0, 0.0]])  # WT in one case only: no positive
    loss = RegionContrastiveLoss()(protos, counts)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(protos.grad, torch.zeros_like(protos))
    # A global WT prototype provides the positive.
    loss = RegionContrastiveLoss()(protos, counts, global_protos=torch.randn(4, 3))
    assert loss.item() > 0.0


def test_region_contrastive_pulls_same_region_together() -> None:
    # Aligned same-region embeddings give a lower loss than swapped ones.
    aligned = torch.tensor([[[0.0, 1.0], [1.0, 0.0], [0.7, 0.7], [0.0, 0.0]]] * 2)
    swapped = aligned.clone()
    swapped[1, 1], swapped[1, 2] = aligned[1, 2], aligned[1, 1]
    counts = torch.tensor([[5.0, 3.0, 2.0, 0.0]] * 2)
    rcl = RegionContrastiveLoss(temperature=0.1)
    assert rcl(aligned, counts) < rcl(swapped, counts)


def test_region_contrastive_errors() -> None:
    rcl = RegionContrastiveLoss()
    with pytest.raises(ValueError, match="counts"):
        rcl(torch.zeros(2, 4, 3), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="seq_mask is required"):
        rcl(torch.zeros(2, 4, 3), torch.ones(2, 4), seq_protos=torch.zeros(2, 2, 4, 3))
    with pytest.raises(ValueError, match="global_protos"):
        rcl(torch.zeros(2, 4, 3), torch.ones(2, 4), global_protos=torch.zeros(3, 3))
    with pytest.raises(ValueError, match="temperature"):
        RegionContrastiveLoss(temperature=0.0)


def test_three_branch_rcl_by_hand() -> None:
    t = 0.07
    anchor = torch.zeros(1, 2, 2, 1, 1)
    anchor[0, :, 0] = torch.tensor([1.0, 0.0]).view(2, 1, 1)  # tumour voxel
    positive = anchor.clone()
    negative = torch.zeros(1, 2, 2, 1, 1)
    negative[0, :, 1] = torch.tensor([0.0, 3.0]).view(2, 1, 1)  # background voxel
    tumour = torch.tensor([1.0, 0.0]).view(1, 1, 2, 1, 1)
    loss = three_branch_rcl_loss(anchor, positive, negative, tumour, temperature=t)
    expected = -math.log(math.exp(1.0 / t) / (math.exp(1.0 / t) + math.exp(0.0)))
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # No tumour -> 0.
    assert three_branch_rcl_loss(anchor, positive, negative, torch.zeros(1, 2, 1, 1)).item() == 0.0


# --------------------------------------------------------------------------------------------- distillation


def test_logit_kd_zero_when_equal_positive_otherwise() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 4, 4)
    assert logit_kd_loss(logits, logits.clone()).item() == pytest.approx(0.0, abs=1e-7)
    assert logit_kd_loss(logits + 0.5, logits).item() > 0.0


def test_logit_kd_by_hand() -> None:
    # teacher 0 -> q = 0.5; student log 3 -> p = 0.75 at T = 1: KL = 0.5 log(4/3).
    kl = 0.5 * math.log(4.0 / 3.0)
    s = torch.tensor([[math.log(3.0)]])
    t = torch.tensor([[0.0]])
    assert logit_kd_loss(s, t, temperature=1.0).item() == pytest.approx(kl, rel=1e-5)
    # At T = 2 the same probabilities need logits doubled, and the loss is scaled by T^2 = 4.
    assert logit_kd_loss(2 * s, t, temperature=2.0).item() == pytest.approx(4 * kl, rel=1e-5)
    # Mask: the second element (a huge disagreement) is weighted out.
    s2 = torch.tensor([[math.log(3.0), 20.0]])
    t2 = torch.tensor([[0.0, -20.0]])
    mask = torch.tensor([[1.0, 0.0]])
    assert logit_kd_loss(s2, t2, temperature=1.0, mask=mask).item() == pytest.approx(kl, rel=1e-5)
    assert logit_kd_loss(s2, t2, temperature=1.0, mask=torch.zeros(1, 2)).item() == 0.0
    with pytest.raises(ValueError, match="same shape"):
        logit_kd_loss(s2, t)
    with pytest.raises(ValueError, match="broadcast"):
        logit_kd_loss(s2, t2, mask=torch.ones(3))


def test_self_distillation_trains_only_the_dropped_path() -> None:
    full = torch.randn(1, 3, 2, 2, 2, requires_grad=True)
    dropped = torch.randn(1, 3, 2, 2, 2, requires_grad=True)
    loss = self_distillation_loss(full, dropped, temperature=2.0)
    torch.testing.assert_close(loss, logit_kd_loss(dropped, full.detach(), temperature=2.0))
    loss.backward()
    assert full.grad is None
    assert torch.count_nonzero(dropped.grad) > 0


def test_prototype_kd_by_hand() -> None:
    local = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]])
    glob = torch.tensor([[0.0, 1.0], [2.0, 0.0]])
    both = (1.0 - 0.0 + 1.0 - 1.0 / math.sqrt(2.0)) / 2.0
    assert prototype_kd_loss(local, torch.tensor([[1.0, 2.0]]), glob).item() == pytest.approx(both, rel=1e-5)
    only_r1 = 1.0 - 1.0 / math.sqrt(2.0)
    assert prototype_kd_loss(local, torch.tensor([[0.0, 2.0]]), glob).item() == pytest.approx(only_r1, rel=1e-5)
    valid = torch.tensor([True, False])
    assert prototype_kd_loss(local, torch.tensor([[1.0, 2.0]]), glob, valid).item() == pytest.approx(1.0)
    local_g = local.clone().requires_grad_(True)
    loss = prototype_kd_loss(local_g, torch.tensor([[0.0, 2.0]]), glob, valid)
    assert loss.item() == 0.0
    loss.backward()
    with pytest.raises(ValueError, match="global_protos"):
        prototype_kd_loss(local, torch.ones(1, 2), torch.zeros(3, 2))


# ------------------------------------------------------------------------------------ with the network


def test_fedkd_losses_on_network_outputs_reach_available_encoders_only() -> None:
    torch.manual_seed(0)
    net = ModalityAwareSegNet()
    image = torch.randn(2, 4, 16, 16, 16)
    mask = torch.tensor([[True, True, False, False], [False, True, False, True]])  # t2 absent everywhere
    image[:, 2] = NAN
    image[0, 3] = NAN
    label = torch.zeros(2, 3, 16, 16, 16)
    label[:, 0, 4:12, 4:12, 4:12] = 1.0
    label[:, 1, 6:10, 6:10, 6:10] = 1.0
    label[0, 2, 7:9, 7:9, 7:9] = 1.0
    out = net(image, mask)
    protos, counts = region_prototypes(out["fused"], label)
    seq_protos, _ = region_prototypes(out["content"], label)
    global_protos = torch.randn(4, out["fused"].shape[1])
    loss = (
        DRLLoss()(out["content"], out["style"], out["modality_mask"])
        + RegionContrastiveLoss()(protos, counts, seq_protos, out["modality_mask"], global_protos)
        + prototype_kd_loss(protos, counts, global_protos)
        + logit_kd_loss(out["logits"], torch.zeros_like(out["logits"]))
    )
    assert torch.isfinite(loss)
    loss.backward()
    for name, param in net.named_parameters():
        if parameter_modality(name) == "t2":
            assert param.grad is None, name
        else:
            assert param.grad is not None and torch.isfinite(param.grad).all(), name
    assert torch.count_nonzero(net.encoders[3].stages[0][0][0].weight.grad) > 0


# ------------------------------------------------------------------ the terms as their ideas (issue: distillation)


def test_independence_has_a_gradient_on_a_two_sample_batch_only_with_memory() -> None:
    """Two samples alone: every standardised dimension is +-1, the loss is 1 and has no gradient. With a memory of
    earlier samples it has one, and descending it lowers the content/style correlation it measures."""
    from fedbrats.federated.methods.fedkd.drl import DRLLoss, content_style_independence_loss

    torch.manual_seed(0)
    mask = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    content = torch.randn(2, 2, 6, requires_grad=True)
    style = torch.randn(2, 2, 3)
    # Alone, the loss is ~1 whatever the features: nothing to learn from.
    for other in (content, torch.randn(2, 2, 6), 5 * torch.randn(2, 2, 6)):
        assert content_style_independence_loss(other, style, mask).item() == pytest.approx(1.0, abs=5e-3)
    # Memory: style linked to content (a dependence the term should remove from the batch's features).
    past_style = torch.randn(40, 3)
    past_content = torch.cat([past_style, past_style], dim=1) + 0.1 * torch.randn(40, 6)
    with_memory = content_style_independence_loss(content, style, mask, memory=(past_content, past_style))
    (grad,) = torch.autograd.grad(with_memory, content)
    assert float(grad.abs().max()) > 1e-4
    drl = DRLLoss(0.0, 1.0, 0.0, memory_size=4)
    for _ in range(3):
        drl(content, style, mask)
    assert drl._memory is not None and drl._memory[0].shape == (4, 6)  # bounded, newest first
    drl.reset_memory()
    assert drl._memory is None
    # Descending the term on a batch whose features copy the style lowers the measured dependence.
    batch_style = torch.randn(8, 1, 3)
    feats = (torch.cat([batch_style, batch_style], dim=2) + 0.1 * torch.randn(8, 1, 6)).requires_grad_(True)
    ones = torch.ones(8, 1)
    memory = (torch.randn(8, 6), torch.randn(8, 3))
    first = content_style_independence_loss(feats, batch_style, ones, memory=memory).item()
    opt = torch.optim.SGD([feats], lr=10.0)
    for _ in range(50):
        opt.zero_grad()
        content_style_independence_loss(feats, batch_style, ones, memory=memory).backward()
        opt.step()
    assert content_style_independence_loss(feats, batch_style, ones, memory=memory).item() < 0.25 * first


def test_disjoint_regions_share_no_voxel_and_make_the_nested_ones() -> None:
    """rcl_regions=disjoint: background, oedema, non-enhancing core and ET never overlap (so no region is a negative
    of voxels it contains), and they sum to the nested regions."""
    from fedbrats.federated.methods.fedkd.rcl import region_weights

    label = torch.zeros(1, 3, 8, 8, 8)
    label[:, 0, 1:7, 1:7, 1:7] = 1
    label[:, 1, 2:6, 2:6, 2:6] = 1
    label[:, 2, 3:5, 3:5, 3:5] = 1
    disjoint = region_weights(label, (8, 8, 8), disjoint=True)
    nested = region_weights(label, (8, 8, 8))
    assert float(disjoint.sum(1).max()) == pytest.approx(1.0) and float(nested.sum(1).max()) > 1.5
    assert torch.allclose(disjoint[:, 1:].sum(1), nested[:, 1])  # oedema + core + ET = WT
    assert torch.allclose(disjoint[:, 2:].sum(1), nested[:, 2])  # core + ET = TC
