"""FedKD's distillation terms beyond plain logit KD (:func:`fedbrats.losses.distillation.logit_kd_loss`).

* :func:`self_distillation_loss`: logit KD from the full-input prediction (teacher, detached) to the prediction
  with sequences dropped (student);
* :func:`prototype_kd_loss`: local region embeddings towards the server's global region prototypes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fedbrats.losses.common import attached_zero
from fedbrats.losses.distillation import logit_kd_loss


def self_distillation_loss(
    full_logits: Tensor,
    dropped_logits: Tensor,
    temperature: float = 2.0,
    mask: Tensor | None = None,
) -> Tensor:
    """Distil the prediction from all available sequences into the prediction with some sequences dropped.

    The full-input prediction is the teacher and is detached here (only the dropped-input path learns).

    Args:
        full_logits: (B, K, ...) logits with every available sequence.
        dropped_logits: logits of the same inputs with some sequences masked out.
        temperature: ``T`` of :func:`logit_kd_loss`.
        mask: optional voxel weights, see :func:`logit_kd_loss`.

    Returns:
        Scalar loss.

    Raises:
        ValueError: as :func:`logit_kd_loss`.
    """
    return logit_kd_loss(dropped_logits, full_logits.detach(), temperature=temperature, mask=mask)


def prototype_kd_loss(
    local_protos: Tensor,
    counts: Tensor,
    global_protos: Tensor,
    global_valid: Tensor | None = None,
    eps: float = 1e-6,
) -> Tensor:
    """Pull each present local region embedding towards the global prototype of its region.

    Loss = mean over pairs ``(b, r)`` with ``counts[b, r] > eps`` and ``global_valid[r]`` of
    ``1 - cos(local_protos[b, r], global_protos[r])``.

    Args:
        local_protos: (B, R, C) region embeddings (from ``region_prototypes``).
        counts: (B, R) region sizes; ``<= eps`` marks an absent region.
        global_protos: (R, C) global prototypes (constants from the server).
        global_valid: (R,) bool, which global prototypes exist; all when ``None``.
        eps: presence threshold and normalisation guard.

    Returns:
        Scalar loss in [0, 2]; 0 (attached to the graph) when no pair qualifies.

    Raises:
        ValueError: on inconsistent shapes.
    """
    if local_protos.ndim != 3 or tuple(counts.shape) != tuple(local_protos.shape[:2]):
        raise ValueError(
            f"local_protos must be (B, R, C) and counts (B, R), got {tuple(local_protos.shape)} and "
            f"{tuple(counts.shape)}"
        )
    n_reg, channels = local_protos.shape[1:]
    if tuple(global_protos.shape) != (n_reg, channels):
        raise ValueError(f"global_protos must have shape ({n_reg}, {channels}), got {tuple(global_protos.shape)}")
    if global_valid is None:
        gvalid = torch.ones(n_reg, dtype=torch.bool, device=local_protos.device)
    else:
        if tuple(global_valid.shape) != (n_reg,):
            raise ValueError(f"global_valid must have shape ({n_reg},), got {tuple(global_valid.shape)}")
        gvalid = global_valid.to(local_protos.device).bool()
    use = (counts > eps) & gvalid.unsqueeze(0)  # (B, R)
    if not bool(use.any()):
        return attached_zero(local_protos)
    target = global_protos.to(local_protos).unsqueeze(0).expand_as(local_protos)
    cos = F.cosine_similarity(local_protos[use], target[use], dim=1, eps=eps)
    return (1.0 - cos).mean()


__all__ = ["prototype_kd_loss", "self_distillation_loss"]
