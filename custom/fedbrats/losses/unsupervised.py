"""Label-free quantities of a segmentation output: voxel-wise binary entropy and information maximisation.

The network's outputs are three sigmoid channels (WT, TC, ET), each a two-class prediction per voxel. For a
probability ``p`` the binary entropy is ``H(p) = -p log(p + eps) - (1 - p) log(1 - p + eps)``.

Information maximisation (SHOT, Liang et al. 2020, code tim-learn/SHOT), brought to segmentation voxel-wise:

    L_IM = mean over voxels and channels of H(p_vc)                   (confident predictions)
         - diversity_weight * mean over channels of H(mean_v p_vc)     (diverse predictions: the marginal)

with ``eps`` 1e-5 as in SHOT. Both terms are averaged over the three channels, so their range is [0, log 2].
"""

from __future__ import annotations

import torch
from torch import Tensor

#: SHOT's epsilon inside the logarithms.
IM_EPS = 1e-5


def binary_entropy(probs: Tensor, eps: float = IM_EPS) -> Tensor:
    """Element-wise binary entropy (nats) of probabilities ``probs``.

    Raises:
        ValueError: ``eps`` is negative.
    """
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    return -probs * torch.log(probs + eps) - (1.0 - probs) * torch.log(1.0 - probs + eps)


def _voxel_weights(logits: Tensor, voxel_mask: Tensor | None) -> Tensor:
    """Voxel weights broadcastable to ``logits`` (B, C, ...): 1 everywhere, or the float ``voxel_mask``."""
    if voxel_mask is None:
        return torch.ones_like(logits[:, :1])
    if voxel_mask.ndim != logits.ndim or voxel_mask.shape[0] != logits.shape[0] or voxel_mask.shape[1] != 1:
        raise ValueError(
            f"voxel_mask must be (B, 1, ...) like logits {tuple(logits.shape)}, got {tuple(voxel_mask.shape)}"
        )
    if voxel_mask.shape[2:] != logits.shape[2:]:
        raise ValueError(f"voxel_mask spatial shape {tuple(voxel_mask.shape[2:])} differs from the logits'")
    return voxel_mask.to(dtype=torch.float32)


def information_maximisation_terms(
    logits: Tensor, voxel_mask: Tensor | None = None, eps: float = IM_EPS
) -> dict[str, Tensor]:
    """The two terms of the voxel-wise information-maximisation loss (unweighted, float32).

    Args:
        logits: (B, C, ...) sigmoid logits.
        voxel_mask: optional (B, 1, ...) mask of the voxels that count (e.g. the brain); default every voxel.
        eps: the logarithms' epsilon.

    Returns:
        ``{"entropy": mean voxel entropy, "diversity": entropy of the mean prediction}``, each averaged over the
        channels. With no voxel in ``voxel_mask`` both are (about) 0.

    Raises:
        ValueError: ``logits`` has fewer than three dimensions, or ``voxel_mask`` does not fit it.
    """
    if logits.ndim < 3:
        raise ValueError(f"logits must be (B, C, ...) with spatial dimensions, got shape {tuple(logits.shape)}")
    probs = torch.sigmoid(logits.float())
    weights = _voxel_weights(probs, voxel_mask)
    dims = [0, *range(2, probs.ndim)]  # batch and space: one value per channel
    count = weights.sum(dims).clamp_min(1e-12)  # (1,)
    mean_entropy = (binary_entropy(probs, eps) * weights).sum(dims) / count  # (C,)
    marginal = (probs * weights).sum(dims) / count  # (C,)
    return {"entropy": mean_entropy.mean(), "diversity": binary_entropy(marginal, eps).mean()}


def information_maximisation_loss(
    logits: Tensor, voxel_mask: Tensor | None = None, diversity_weight: float = 1.0, eps: float = IM_EPS
) -> Tensor:
    """``entropy - diversity_weight * diversity`` of :func:`information_maximisation_terms` (SHOT's IM loss).

    Raises:
        ValueError: a negative ``diversity_weight`` (and see :func:`information_maximisation_terms`).
    """
    if diversity_weight < 0:
        raise ValueError(f"diversity_weight must be >= 0, got {diversity_weight}")
    terms = information_maximisation_terms(logits, voxel_mask, eps)
    return terms["entropy"] - diversity_weight * terms["diversity"]


__all__ = ["IM_EPS", "binary_entropy", "information_maximisation_loss", "information_maximisation_terms"]
