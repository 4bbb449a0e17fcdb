"""Region-aware contrastive learning (RCL) of the ``fedkd`` method.

Features are contrasted per *region* (background, WT, TC, ET) instead of per image: the label masks, brought
to feature resolution, average-pool the features into one embedding per region and case
(:func:`region_prototypes`); :class:`RegionContrastiveLoss` then pulls embeddings of the same region together
(across cases, across sequences, and towards the global prototypes the server sends) and pushes different
regions and the background apart, in a supervised-contrastive (SupCon) form. :func:`three_branch_rcl_loss` is
the simpler anchor/positive/negative form of the paper's public, centralized prototype code.

Regions are indexed ``0 = background, 1 = WT, 2 = TC, 3 = ET`` (:data:`RCL_REGIONS`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedbrats.constants import REGIONS
from fedbrats.losses.common import attached_zero

#: Region order of every prototype tensor in this module: background first, then :data:`REGIONS`.
RCL_REGIONS: tuple[str, ...] = ("background", *REGIONS)


def region_weights(
    label: Tensor,
    spatial_size: tuple[int, ...],
    soft: bool = True,
    threshold: float = 0.5,
    brain_mask: Tensor | None = None,
    disjoint: bool = False,
) -> Tensor:
    """Per-region voxel weights at feature resolution.

    The full-resolution region masks are average-pooled to ``spatial_size`` (adaptive average pooling), which
    gives the fraction of each feature voxel covered by the region. With ``soft=True`` (default) these
    fractions are the weights: small regions such as a little ET survive an 8x downsampling instead of
    vanishing, and a region absent from the case has weight exactly 0 everywhere. With ``soft=False`` the
    fractions are thresholded (``>= threshold``) into a binary mask, as in the public code.

    Args:
        label: (B, 3, D, H, W) binary WT/TC/ET masks (multi-label, channel order of :data:`REGIONS`).
        spatial_size: the feature resolution (d, h, w), each no larger than the label's.
        soft: keep area fractions (``True``) or threshold them (``False``).
        threshold: threshold of the hard mode.
        brain_mask: optional (B, 1, D, H, W) or (B, D, H, W) mask of brain voxels; when given, background is
            brain-but-not-WT instead of everything-but-WT (so the air around the head is not "background").
        disjoint: use the disjoint sub-regions ``[background, WT - TC (edema), TC - ET (necrosis), ET]``
            instead of the nested ``[background, WT, TC, ET]``.

    Returns:
        (B, 4, d, h, w) weights in [0, 1], regions in :data:`RCL_REGIONS` order.

    Raises:
        ValueError: on a wrong ``label`` or ``brain_mask`` shape, or a ``spatial_size`` larger than the label.
    """
    if label.ndim != 5 or label.shape[1] != len(REGIONS):
        raise ValueError(f"label must have shape (B, {len(REGIONS)}, D, H, W), got {tuple(label.shape)}")
    spatial_size = tuple(int(s) for s in spatial_size)
    if len(spatial_size) != 3 or any(s > full for s, full in zip(spatial_size, label.shape[2:])):
        raise ValueError(
            f"spatial_size must be 3 sizes no larger than the label's {tuple(label.shape[2:])}, got {spatial_size}"
        )
    lab = (label > 0.5).float()
    wt, tc, et = lab[:, 0], lab[:, 1], lab[:, 2]
    background = 1.0 - wt
    if brain_mask is not None:
        brain = brain_mask.squeeze(1) if brain_mask.ndim == 5 else brain_mask
        if tuple(brain.shape) != (label.shape[0], *label.shape[2:]):
            raise ValueError(
                f"brain_mask must have shape ({label.shape[0]}, 1, {', '.join(map(str, label.shape[2:]))}), "
                f"got {tuple(brain_mask.shape)}"
            )
        background = background * (brain > 0.5).float()
    if disjoint:
        regions = torch.stack([background, wt * (1 - tc), tc * (1 - et), et], dim=1)
    else:
        regions = torch.stack([background, wt, tc, et], dim=1)
    if tuple(regions.shape[2:]) != spatial_size:
        regions = F.adaptive_avg_pool3d(regions, spatial_size)
    if not soft:
        regions = (regions >= threshold).float()
    return regions


def region_prototypes(
    features: Tensor,
    label: Tensor,
    eps: float = 1e-6,
    soft: bool = True,
    threshold: float = 0.5,
    brain_mask: Tensor | None = None,
    disjoint: bool = False,
) -> tuple[Tensor, Tensor]:
    """Masked average pooling of features over each region (background, WT, TC, ET).

    ``proto[b, r] = sum_v w[b, r, v] * f[b, :, v] / (sum_v w[b, r, v] + eps)`` with ``w`` from
    :func:`region_weights` (soft area fractions by default). ``counts[b, r] = sum_v w[b, r, v]`` is the region's
    size in feature-resolution voxels (fractional in soft mode); a region absent from case ``b`` has count 0 and
    a zero prototype, and must be left out of any loss (the losses here do so).

    Args:
        features: (B, C, d, h, w) features, or (B, M, C, d, h, w) per-sequence features (all pooled with the
            same label).
        label: (B, 3, D, H, W) binary WT/TC/ET masks at full (or feature) resolution.
        eps: guard of the division.
        soft, threshold, brain_mask, disjoint: see :func:`region_weights`.

    Returns:
        ``(protos, counts)``: protos (B, 4, C), or (B, M, 4, C) for per-sequence features; counts (B, 4).

    Raises:
        ValueError: on a features rank other than 5 or 6, or a batch mismatch with ``label``.
    """
    if features.ndim not in (5, 6):
        raise ValueError(f"features must have shape (B, C, d, h, w) or (B, M, C, d, h, w), got {tuple(features.shape)}")
    if label.ndim != 5 or label.shape[0] != features.shape[0]:
        raise ValueError(
            f"label must have shape ({features.shape[0]}, {len(REGIONS)}, D, H, W), got {tuple(label.shape)}"
        )
    weights = region_weights(label, tuple(features.shape[-3:]), soft, threshold, brain_mask, disjoint)
    weights = weights.to(features.dtype).flatten(2)  # (B, R, n)
    counts = weights.sum(dim=2)  # (B, R)
    if features.ndim == 5:
        sums = torch.einsum("brn,bcn->brc", weights, features.flatten(2))
        return sums / (counts.unsqueeze(-1) + eps), counts
    sums = torch.einsum("brn,bmcn->bmrc", weights, features.flatten(3))
    return sums / (counts[:, None, :, None] + eps), counts


class RegionContrastiveLoss(nn.Module):
    """Supervised-contrastive (InfoNCE) loss over L2-normalised region embeddings.

    Candidates (all L2-normalised) are:

    * every present region embedding of the batch, ``protos[b, r]`` with ``counts[b, r] > eps``;
    * if given, every per-sequence region embedding ``seq_protos[b, m, r]`` of an available sequence
      (``seq_mask[b, m]``) and a present region;
    * if given, every valid global prototype ``global_protos[r]`` (``global_valid[r]``).

    Anchors are the local (non-global) candidates of tumour regions (r >= 1; also background with
    ``background_anchors=True``). For anchor ``i`` with positives ``P(i)`` = the other candidates of the same
    region (other cases, other sequences of the same or other cases, the global prototype) and
    ``s_ia = cos(e_i, e_a)``::

        loss_i = -1/|P(i)| * sum_{p in P(i)} log( exp(s_ip / t) / sum_{a != i} exp(s_ia / t) )

    Every candidate of another region, background included, is a negative through the denominator. The loss
    is the mean of ``loss_i`` over anchors with at least one positive; 0 (attached to the graph) if none.

    Args:
        temperature: ``t`` (0.07 in the public code).
        eps: a region is present when its count exceeds ``eps``; also the normalisation guard.
        background_anchors: also use background embeddings as anchors (pulling backgrounds together).

    Raises:
        ValueError: on a non-positive temperature.
    """

    def __init__(self, temperature: float = 0.07, eps: float = 1e-6, background_anchors: bool = False) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature
        self.eps = eps
        self.background_anchors = background_anchors

    def forward(
        self,
        protos: Tensor,
        counts: Tensor,
        seq_protos: Tensor | None = None,
        seq_mask: Tensor | None = None,
        global_protos: Tensor | None = None,
        global_valid: Tensor | None = None,
    ) -> Tensor:
        """Compute the loss (see the class docstring).

        Args:
            protos: (B, R, C) region embeddings (e.g. of the fused content), from :func:`region_prototypes`.
            counts: (B, R) region sizes; ``<= eps`` marks an absent region.
            seq_protos: optional (B, M, R, C) per-sequence region embeddings.
            seq_mask: (B, M) availability of the sequences; required with ``seq_protos``.
            global_protos: optional (R, C) global prototypes (constants, e.g. sent by the server).
            global_valid: optional (R,) bool, which global prototypes exist; all when omitted.

        Returns:
            Scalar loss.

        Raises:
            ValueError: on inconsistent shapes or ``seq_protos`` without ``seq_mask``.
        """
        if protos.ndim != 3 or counts.shape != protos.shape[:2]:
            raise ValueError(
                f"protos must be (B, R, C) and counts (B, R), got {tuple(protos.shape)} and {tuple(counts.shape)}"
            )
        batch, n_reg, channels = protos.shape
        region_ids = torch.arange(n_reg, device=protos.device)
        present = counts > self.eps  # (B, R)
        embeddings = [protos[present]]
        labels = [region_ids.expand(batch, n_reg)[present]]
        graph_inputs = [protos]

        if seq_protos is not None:
            if seq_mask is None:
                raise ValueError("seq_mask is required with seq_protos")
            if seq_protos.ndim != 4 or seq_protos.shape[0] != batch or seq_protos.shape[2:] != protos.shape[1:]:
                raise ValueError(
                    f"seq_protos must have shape ({batch}, M, {n_reg}, {channels}), got {tuple(seq_protos.shape)}"
                )
            n_mod = seq_protos.shape[1]
            if tuple(seq_mask.shape) != (batch, n_mod):
                raise ValueError(f"seq_mask must have shape ({batch}, {n_mod}), got {tuple(seq_mask.shape)}")
            avail = seq_mask if seq_mask.dtype == torch.bool else seq_mask > 0.5
            valid = avail.unsqueeze(2) & present.unsqueeze(1)  # (B, M, R)
            embeddings.append(seq_protos[valid])
            labels.append(region_ids.expand(batch, n_mod, n_reg)[valid])
            graph_inputs.append(seq_protos)
        n_local = sum(int(e.shape[0]) for e in embeddings)

        if global_protos is not None:
            if tuple(global_protos.shape) != (n_reg, channels):
                raise ValueError(
                    f"global_protos must have shape ({n_reg}, {channels}), got {tuple(global_protos.shape)}"
                )
            if global_valid is None:
                gvalid = torch.ones(n_reg, dtype=torch.bool, device=protos.device)
            else:
                if tuple(global_valid.shape) != (n_reg,):
                    raise ValueError(f"global_valid must have shape ({n_reg},), got {tuple(global_valid.shape)}")
                gvalid = global_valid.to(protos.device).bool()
            embeddings.append(global_protos.to(protos)[gvalid])
            labels.append(region_ids[gvalid])

        emb = F.normalize(torch.cat(embeddings, dim=0), dim=1, eps=self.eps)  # (N, C)
        lab = torch.cat(labels, dim=0)  # (N,)
        n_total = emb.shape[0]
        is_anchor = torch.zeros(n_total, dtype=torch.bool, device=emb.device)
        is_anchor[:n_local] = True
        if not self.background_anchors:
            is_anchor &= lab != 0
        not_self = ~torch.eye(n_total, dtype=torch.bool, device=emb.device)
        positives = (lab.unsqueeze(0) == lab.unsqueeze(1)) & not_self  # (N, N)
        n_pos = positives.sum(dim=1)
        use = is_anchor & (n_pos > 0)
        if not bool(use.any()):
            return attached_zero(*graph_inputs)

        sim = emb @ emb.t() / self.temperature
        sim = sim.masked_fill(~not_self, float("-inf"))  # exclude a != i from the denominator
        log_prob = sim - torch.logsumexp(sim, dim=1, keepdim=True)
        # where(), not multiplication: the diagonal holds -inf and -inf * 0 is NaN.
        pos_log_prob = torch.where(positives, log_prob, torch.zeros_like(log_prob)).sum(dim=1)
        loss = -pos_log_prob[use] / n_pos[use].to(log_prob.dtype)
        return loss.mean()


def three_branch_rcl_loss(
    anchor: Tensor,
    positive: Tensor,
    negative: Tensor,
    tumour_mask: Tensor,
    temperature: float = 0.07,
    eps: float = 1e-6,
    soft: bool = True,
) -> Tensor:
    """Anchor/positive/negative region contrast of the public prototype code.

    The tumour mask is brought to feature resolution as in :func:`region_weights` (soft area fractions by
    default); ``anchor`` and ``positive`` are average-pooled over the tumour, ``negative`` over the background
    (not tumour), each L2-normalised; per case
    ``-log(exp(a.p/t) / (exp(a.p/t) + exp(a.n/t))) = softplus((a.n - a.p) / t)``, averaged over cases that have
    both tumour and background at feature resolution.

    Args:
        anchor, positive, negative: (B, C, d, h, w) outputs of three parallel branches on the bottleneck.
        tumour_mask: (B, 1, D, H, W) or (B, D, H, W) binary tumour mask (e.g. WT).
        temperature: ``t``.
        eps: presence threshold and normalisation guard.
        soft: soft area fractions (``True``) or a 0.5 threshold (``False``).

    Returns:
        Scalar loss; 0 (attached to the graph) when no case has both tumour and background.

    Raises:
        ValueError: on mismatched shapes.
    """
    if anchor.ndim != 5 or positive.shape != anchor.shape or negative.shape != anchor.shape:
        raise ValueError(
            "anchor, positive and negative must share one (B, C, d, h, w) shape, got "
            f"{tuple(anchor.shape)}, {tuple(positive.shape)}, {tuple(negative.shape)}"
        )
    mask = tumour_mask.unsqueeze(1) if tumour_mask.ndim == 4 else tumour_mask
    if mask.ndim != 5 or mask.shape[0] != anchor.shape[0] or mask.shape[1] != 1:
        raise ValueError(f"tumour_mask must have shape ({anchor.shape[0]}, 1, D, H, W), got {tuple(tumour_mask.shape)}")
    tumour = (mask > 0.5).float()
    if tuple(tumour.shape[2:]) != tuple(anchor.shape[2:]):
        tumour = F.adaptive_avg_pool3d(tumour, tuple(anchor.shape[2:]))
    if not soft:
        tumour = (tumour >= 0.5).float()
    w_t = tumour.flatten(1).to(anchor.dtype)  # (B, n)
    w_b = 1.0 - w_t
    n_t, n_b = w_t.sum(dim=1), w_b.sum(dim=1)

    def pool(features: Tensor, weights: Tensor, count: Tensor) -> Tensor:
        pooled = torch.einsum("bn,bcn->bc", weights, features.flatten(2)) / (count.unsqueeze(1) + eps)
        return F.normalize(pooled, dim=1, eps=eps)

    a, p, n = pool(anchor, w_t, n_t), pool(positive, w_t, n_t), pool(negative, w_b, n_b)
    valid = (n_t > eps) & (n_b > eps)
    if not bool(valid.any()):
        return attached_zero(anchor, positive, negative)
    per_case = F.softplus(((a * n).sum(dim=1) - (a * p).sum(dim=1)) / temperature)
    return per_case[valid].mean()
