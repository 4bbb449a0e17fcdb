"""Knowledge-distillation losses of the ``fedkd`` method.

* :func:`logit_kd_loss`: per-voxel, per-region binary KL between tempered sigmoids (the outputs are
  multi-label WT/TC/ET, so a softmax KL over channels would be wrong);
* :func:`self_distillation_loss`: the same, from the full-input prediction (teacher, detached) to the
  prediction with sequences dropped (student);
* :func:`prototype_kd_loss`: local region embeddings towards the server's global region prototypes;
* :func:`feature_kd_loss`: feature maps towards a teacher's, on L2-normalised channel vectors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fedbrats.losses.drl import attached_zero


def logit_kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 2.0,
    mask: Tensor | None = None,
) -> Tensor:
    """Binary KL divergence between tempered sigmoid outputs, for multi-label logits.

    With ``q = sigmoid(teacher / T)`` and ``p = sigmoid(student / T)``, per element
    ``KL = q log(q / p) + (1 - q) log((1 - q) / (1 - p))``, computed with log-sigmoids for stability; the loss is
    ``T^2`` times its mean (the ``T^2`` keeps gradient magnitudes comparable across temperatures). The teacher
    is used as given: detach it if it should not be trained.

    Args:
        student_logits: (B, K, ...) logits.
        teacher_logits: logits of the same shape.
        temperature: ``T`` > 0.
        mask: optional weights broadcastable to the logits (e.g. (B, 1, D, H, W) brain mask); the loss is then
            ``sum(KL * mask) / sum(mask)`` over the broadcast shape, 0 if the mask is all zero.

    Returns:
        Scalar loss, 0 when student and teacher agree.

    Raises:
        ValueError: on mismatched shapes, a mask that does not broadcast, or a non-positive temperature.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits and teacher_logits must have the same shape, got {tuple(student_logits.shape)} "
            f"and {tuple(teacher_logits.shape)}"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    s = student_logits / temperature
    t = teacher_logits / temperature
    q = torch.sigmoid(t)
    kl = q * (F.logsigmoid(t) - F.logsigmoid(s)) + (1.0 - q) * (F.logsigmoid(-t) - F.logsigmoid(-s))
    if mask is None:
        return kl.mean() * temperature**2
    try:
        weights = torch.broadcast_to(mask.to(kl.dtype), kl.shape)
    except RuntimeError:
        raise ValueError(
            f"mask of shape {tuple(mask.shape)} does not broadcast to the logits' {tuple(kl.shape)}"
        ) from None
    total = weights.sum()
    if float(total) <= 0:
        return attached_zero(student_logits, teacher_logits)
    return (kl * weights).sum() / total * temperature**2


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


def feature_kd_loss(student_feat: Tensor, teacher_feat: Tensor, eps: float = 1e-6) -> Tensor:
    """Distance between feature maps on L2-normalised channel vectors.

    Both maps are L2-normalised along channels (dim 1) at every position; the loss is the squared Euclidean
    distance between the normalised vectors, ``2 - 2 cos``, averaged over the batch and positions (so in
    [0, 4]; orthogonal vectors give 2). The teacher is used as given: detach it if it should not be trained.

    Args:
        student_feat: (B, C, ...) features.
        teacher_feat: features of the same shape.
        eps: normalisation guard.

    Returns:
        Scalar loss.

    Raises:
        ValueError: on mismatched shapes or fewer than 2 dims.
    """
    if student_feat.ndim < 2 or student_feat.shape != teacher_feat.shape:
        raise ValueError(
            f"student_feat and teacher_feat must share one (B, C, ...) shape, got {tuple(student_feat.shape)} and "
            f"{tuple(teacher_feat.shape)}"
        )
    s = F.normalize(student_feat, dim=1, eps=eps)
    t = F.normalize(teacher_feat, dim=1, eps=eps)
    return ((s - t) ** 2).sum(dim=1).mean()
