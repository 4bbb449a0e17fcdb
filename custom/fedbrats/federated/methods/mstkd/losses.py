"""Loss functions of the ``mstkd`` method (after MST-KDNet, Zhu et al., MICCAI 2025).

Three families, each between a teacher that sees all four sequences and a student that sees a subset:

* multi-scale transformer KD: :func:`hidden_state_kd_loss` (token states) and :func:`attention_kd_loss`
  (attention maps weighted by their element-wise max, min and mean over layers, the paper's "extreme value"
  distillation);
* dual-mode logit distillation: :func:`standardized_logit_kd_loss` (binary KL at temperature ``T`` on z-scored
  logits) and the mean-teacher output consistency (:mod:`fedbrats.losses.consistency`), whose weight ramps up
  over the first epochs;
* global style matching: :func:`gram_style_loss` (Gram matrices of shallow feature maps) and an adversarial
  game with :class:`fedbrats.federated.methods.mstkd.network.StyleDiscriminator` (:func:`discriminator_loss`,
  :func:`adversarial_loss`).

Every distillation loss detaches the teacher itself: in this project the teacher learns only from its own
Dice loss, never from the student. Exact formulas, and which parts are our interpretation, are in
docs/mstkd.md.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedbrats.losses.distillation import logit_kd_loss

#: Accepted values of ``gan_mode``.
GAN_MODES: tuple[str, ...] = ("bce", "lsgan")


def _check_pairs(student: Sequence[Tensor], teacher: Sequence[Tensor], what: str) -> None:
    if len(student) == 0 or len(student) != len(teacher):
        raise ValueError(
            f"student_{what} and teacher_{what} must be non-empty lists of equal length, got {len(student)} "
            f"and {len(teacher)}"
        )
    for i, (s, t) in enumerate(zip(student, teacher)):
        if s.shape != t.shape:
            raise ValueError(f"student_{what}[{i}] and teacher_{what}[{i}] differ in shape: {s.shape} vs {t.shape}")


# ---- multi-scale transformer KD ---------------------------------------------------------------------------


def hidden_state_kd_loss(student_hidden: Sequence[Tensor], teacher_hidden: Sequence[Tensor]) -> Tensor:
    """Mean over the distilled layers of the MSE between student and teacher token states.

    ``L_hid = (1/L) Σ_l mean((h^s_l − h^t_l)²)``. The paper sums over its four layers; we average so that the
    weight does not depend on how many layers are distilled.

    Args:
        student_hidden: per layer, tokens of shape (B, N, D).
        teacher_hidden: the teacher's, same shapes (detached here).

    Returns:
        Scalar loss, 0 when the states agree.

    Raises:
        ValueError: empty or mismatched lists.
    """
    _check_pairs(student_hidden, teacher_hidden, "hidden")
    losses = [F.mse_loss(s, t.detach()) for s, t in zip(student_hidden, teacher_hidden)]
    return torch.stack(losses).mean()


def attention_kd_loss(
    student_attn: Sequence[Tensor], teacher_attn: Sequence[Tensor], scale_by_tokens: bool = True
) -> Tensor:
    """Attention distillation weighted by the element-wise extremes and mean over layers.

    For each network separately, with ``A_l`` the attention probabilities of distilled layer ``l`` (optionally
    multiplied by the number of keys ``N``), ``R_max = max_l A_l``, ``R_min = min_l A_l``,
    ``R_mean = mean_l A_l`` (element-wise over layers). Then

    ``L_att = (1/L) Σ_l Σ_{r ∈ {max, min, mean}} mean((A^s_l ⊙ R^s_r − A^t_l ⊙ R^t_r)²)``.

    The paper's code sums over layers as well; we average over them (as :func:`hidden_state_kd_loss`). With
    ``scale_by_tokens`` the maps are multiplied by ``N`` first, so uniform attention is 1 and the loss does not
    shrink like ``N⁻⁴`` with the token count (the reference code compensates with a weight of 1e8 instead).

    Args:
        student_attn: per layer, attention probabilities (B, heads, N, N).
        teacher_attn: the teacher's, same shapes (detached here).
        scale_by_tokens: multiply the maps by ``N`` (the last dimension) before the products.

    Returns:
        Scalar loss, 0 when the maps agree.

    Raises:
        ValueError: empty or mismatched lists.
    """
    _check_pairs(student_attn, teacher_attn, "attn")

    def weighted(maps: Sequence[Tensor]) -> list[list[Tensor]]:
        scale = float(maps[0].shape[-1]) if scale_by_tokens else 1.0
        stacked = torch.stack(list(maps)) * scale  # (L, B, heads, N, N)
        refs = (stacked.max(dim=0).values, stacked.min(dim=0).values, stacked.mean(dim=0))
        return [[a * ref for ref in refs] for a in stacked]

    student = weighted(student_attn)
    teacher = weighted([t.detach() for t in teacher_attn])
    per_layer = [sum(F.mse_loss(s, t) for s, t in zip(s_l, t_l)) for s_l, t_l in zip(student, teacher)]
    return torch.stack(per_layer).mean()


# ---- dual-mode logit distillation -------------------------------------------------------------------------


def zscore_logits(logits: Tensor, eps: float = 1e-7) -> Tensor:
    """Standardise logits per sample and per channel over the voxels: ``(z − mean) / (std + eps)``.

    The population standard deviation is used (no Bessel correction). A constant channel becomes 0.

    Args:
        logits: (B, K, ...) with at least one spatial element.
        eps: added to the standard deviation.

    Raises:
        ValueError: fewer than three dimensions.
    """
    if logits.ndim < 3:
        raise ValueError(f"logits must be (B, K, ...) with spatial dimensions, got shape {tuple(logits.shape)}")
    flat = logits.flatten(2)
    mean = flat.mean(dim=-1, keepdim=True)
    std = flat.std(dim=-1, keepdim=True, correction=0)
    return ((flat - mean) / (std + eps)).reshape(logits.shape)


def standardized_logit_kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 7.0) -> Tensor:
    """Logit-standardised KD for multi-label (sigmoid) outputs.

    Both logit maps are z-scored per sample and channel (:func:`zscore_logits`); then, per voxel and channel,
    the binary KL between ``q = σ(ẑ^t / T)`` and ``p = σ(ẑ^s / T)`` is averaged and multiplied by ``T²``
    (:func:`fedbrats.losses.logit_kd_loss`). The paper applies a softmax over channels; WT/TC/ET are nested,
    not exclusive, so a per-channel binary KL is the faithful multi-label form.

    Args:
        student_logits: (B, K, ...) logits.
        teacher_logits: the teacher's, same shape (detached here).
        temperature: ``T`` > 0 (paper: 7).

    Returns:
        Scalar loss, 0 when the standardised logits agree (e.g. the teacher is a positive affine map of the
        student per channel).

    Raises:
        ValueError: mismatched shapes or a non-positive temperature.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits and teacher_logits must have the same shape, got {tuple(student_logits.shape)} "
            f"and {tuple(teacher_logits.shape)}"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return logit_kd_loss(zscore_logits(student_logits), zscore_logits(teacher_logits.detach()), temperature)


# ---- global style matching --------------------------------------------------------------------------------


def gram_matrix(features: Tensor) -> Tensor:
    """Per-sample Gram matrix of channel features, normalised by the number of voxels.

    ``G_b = F_b F_bᵀ / N`` with ``F_b`` the (C, N) flattened feature map of sample ``b``: the channels' second
    moments, comparable across resolutions.

    Args:
        features: (B, C, ...) with at least one spatial dimension.

    Returns:
        (B, C, C).

    Raises:
        ValueError: fewer than three dimensions.
    """
    if features.ndim < 3:
        raise ValueError(f"features must be (B, C, ...) with spatial dimensions, got shape {tuple(features.shape)}")
    flat = features.flatten(2)
    return flat @ flat.transpose(1, 2) / flat.shape[-1]


def gram_style_loss(student_features: Sequence[Tensor], teacher_features: Sequence[Tensor]) -> Tensor:
    """Mean over style levels of the MSE between student and teacher Gram matrices.

    Args:
        student_features: per level, (B, C, ...) feature maps.
        teacher_features: the teacher's, same shapes (detached here).

    Raises:
        ValueError: empty or mismatched lists.
    """
    _check_pairs(student_features, teacher_features, "features")
    losses = [F.mse_loss(gram_matrix(s), gram_matrix(t.detach())) for s, t in zip(student_features, teacher_features)]
    return torch.stack(losses).mean()


def _gan_loss(pred: Tensor, target_is_real: bool, gan_mode: str) -> Tensor:
    if gan_mode not in GAN_MODES:
        raise ValueError(f"gan_mode must be one of {GAN_MODES}, got {gan_mode!r}")
    target = torch.full_like(pred, 1.0 if target_is_real else 0.0)
    if gan_mode == "bce":
        return F.binary_cross_entropy_with_logits(pred, target)
    return F.mse_loss(pred, target)


def discriminator_loss(
    discriminator: nn.Module, real_features: Tensor, fake_features: Tensor, gan_mode: str = "bce"
) -> Tensor:
    """The discriminator's loss: teacher style features are real (1), student ones fake (0).

    ``L_D = ½ [ℓ(D(real), 1) + ℓ(D(fake), 0)]`` with ``ℓ`` binary cross-entropy on logits (``"bce"``) or the
    squared error of least-squares GANs (``"lsgan"``). Both inputs are detached, so stepping the discriminator
    with this loss never reaches the networks that produced them.

    Args:
        discriminator: maps (B, C, ...) features to patch logits.
        real_features: the teacher's style features.
        fake_features: the student's style features.
        gan_mode: ``"bce"`` or ``"lsgan"``.

    Raises:
        ValueError: unknown ``gan_mode``.
    """
    real = _gan_loss(discriminator(real_features.detach()), True, gan_mode)
    fake = _gan_loss(discriminator(fake_features.detach()), False, gan_mode)
    return 0.5 * (real + fake)


def adversarial_loss(discriminator: nn.Module, fake_features: Tensor, gan_mode: str = "bce") -> Tensor:
    """The student's adversarial loss: make the discriminator call its style features real, ``ℓ(D(fake), 1)``.

    The discriminator's parameters are excluded from the graph (``requires_grad`` off during the forward pass,
    restored after), so back-propagating this term fills gradients of the student only and an optimiser of the
    discriminator has nothing from it to step.

    Args:
        discriminator: maps (B, C, ...) features to patch logits.
        fake_features: the student's style features (not detached).
        gan_mode: ``"bce"`` or ``"lsgan"``.

    Raises:
        ValueError: unknown ``gan_mode``.
    """
    params = list(discriminator.parameters())
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        pred = discriminator(fake_features)
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
    return _gan_loss(pred, True, gan_mode)


__all__ = [
    "GAN_MODES",
    "adversarial_loss",
    "attention_kd_loss",
    "discriminator_loss",
    "gram_matrix",
    "gram_style_loss",
    "hidden_state_kd_loss",
    "standardized_logit_kd_loss",
    "zscore_logits",
]
