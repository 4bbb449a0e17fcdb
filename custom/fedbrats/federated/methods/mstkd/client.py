"""MST-KDNet at a site: a local full-sequence teacher distils into the federated student.

After "Bridging the Gap in Missing Modalities: Leveraging Knowledge Distillation and Style Matching for Brain
Tumor Segmentation" (MST-KDNet, Zhu et al., MICCAI 2025), a centralised method, brought into the federation as
this project's design (see docs/mstkd.md):

* the trainer's ``model`` is the **student**, the only network that is federated (FedAvg) and deployed;
* at a site with two or more sequences the method keeps a **teacher** of the same architecture and a style
  **discriminator** as local state, each with its own Adam optimiser, and steps both inside
  :meth:`MSTKDMethod.training_loss`; neither ever leaves the site;
* every batch there trains the teacher on the teacher's view (every sequence the site has, before the loader's
  sequence dropout: :func:`fedbrats.data.transforms.teacher_view`) and the student on a per-case random non-empty
  subset of those sequences (zero-filled; at a site with all four, one of the 15 subsets, as in the paper) with
  Dice plus distillation:

      L_student = w_dice·Dice(z_s, y)
                + w_hid·L_hid + w_att·L_att                           (multi-scale transformer KD)
                + w_lkd·KL_T(z-score(z_s) || z-score(z_t))·T²        (logit-standardised KD)
                + ramp(epoch)·MSE(σ(z_s), σ(z_t))                     (output consistency)
                + w_gram·L_gram + w_adv·ℓ(D(style_s), real)           (global style matching)

* at a site with one sequence there is nothing to distil: the student trains alone on its (dropout-shaped) view.

The share of steps the distillation acted on is logged as ``acted_kd`` with the loss terms.
"""

from __future__ import annotations

import copy
import logging
from typing import Any, ClassVar

import torch

from fedbrats.constants import modality_combinations, modality_mask
from fedbrats.data.transforms import apply_modality_mask, teacher_view
from fedbrats.federated.methods.base import ClientMethod, check_non_negative
from fedbrats.federated.methods.mstkd.losses import (
    GAN_MODES,
    adversarial_loss,
    attention_kd_loss,
    discriminator_loss,
    gram_style_loss,
    hidden_state_kd_loss,
    standardized_logit_kd_loss,
)
from fedbrats.federated.methods.mstkd.network import StyleDiscriminator
from fedbrats.losses.consistency import consistency_rampup_weight, output_consistency_loss
from fedbrats.losses.segmentation import DiceBCELoss

logger = logging.getLogger(__name__)

#: The 15 non-empty sequence subsets as (15, 4) float masks in :data:`MODALITIES` order.
SUBSET_MASKS: torch.Tensor = torch.tensor([modality_mask(c) for c in modality_combinations()], dtype=torch.float32)


def random_subset_masks(batch_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """One uniformly drawn non-empty sequence subset per case, as a (batch_size, 4) float mask.

    Uses torch's global generator, which the trainer seeds per site.

    Raises:
        ValueError: ``batch_size`` < 1.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    idx = torch.randint(len(SUBSET_MASKS), (batch_size,))
    return SUBSET_MASKS[idx].to(device)


def random_subsets_of(available: torch.Tensor) -> torch.Tensor:
    """Per case, one uniformly drawn non-empty subset of its available sequences, as a (B, 4) float mask.

    With all four sequences available this is :func:`random_subset_masks`'s distribution (one of the 15 subsets).
    Uses torch's global generator.

    Raises:
        ValueError: ``available`` is not (B, C), or a case has no available sequence.
    """
    if available.ndim != 2:
        raise ValueError(f"available must be a (batch, sequences) mask, got shape {tuple(available.shape)}")
    out = torch.zeros_like(available, dtype=torch.float32)
    for b in range(available.shape[0]):
        present = torch.nonzero(available[b] > 0).flatten()
        if present.numel() == 0:
            raise ValueError(f"available: case {b} has no sequence")
        pick = int(torch.randint(1, 2 ** present.numel(), (1,)))  # a non-empty bit pattern over the present ones
        for bit, channel in enumerate(present.tolist()):
            if pick >> bit & 1:
                out[b, channel] = 1.0
    return out


class MSTKDMethod(ClientMethod):
    """The site side of MST-KDNet distillation. Every loss weight is an option; 0 switches a term off.

    Args:
        dice_weight: the student's soft Dice (every batch).
        bce_weight: the student's voxel-wise binary cross-entropy (every batch); the teacher trains on the same
            Dice + BCE pair.
        teacher_dice_weight: the teacher's soft Dice on the full input (its own optimiser).
        hidden_kd_weight: MSE of transformer hidden states at the network's ``kd_layers`` (paper: 0.2).
        attn_kd_weight: extreme-value attention distillation (token-scaled, see
            :func:`fedbrats.federated.methods.mstkd.losses.attention_kd_loss`; docs/mstkd.md derives 1.0 from the
            paper's 1e8).
        logit_kd_weight: logit-standardised binary KL.
        kd_temperature: its temperature ``T`` (paper: 7).
        consistency_weight: final weight of the output-consistency MSE (paper: 10).
        rampup_epochs: epochs of the sigmoid ramp-up of the consistency weight (paper: 20); counted over the
            whole federation run (the trainer's ``epochs_done``).
        gram_weight: Gram-matrix style matching.
        adv_weight: the student's adversarial term against the style discriminator (paper: 2e-4).
        gan_mode: ``"bce"`` (paper) or ``"lsgan"``.
        teacher_lr: Adam learning rate of the teacher.
        teacher_weight_decay: Adam weight decay of the teacher.
        discriminator_lr: Adam learning rate of the discriminator (paper: 1e-4, betas 0.9, 0.99).
        discriminator_filters: channels of the discriminator's first convolution.

    Raises:
        ValueError: a negative weight or learning rate, a non-positive temperature, or an unknown ``gan_mode``.
    """

    name: ClassVar[str] = "mstkd"
    payload_keys: ClassVar[frozenset[str]] = frozenset()
    uses_teacher_view: ClassVar[bool] = True

    def __init__(
        self,
        dice_weight: float = 1.0,
        bce_weight: float = 1.0,
        teacher_dice_weight: float = 1.0,
        hidden_kd_weight: float = 0.2,
        attn_kd_weight: float = 1.0,
        logit_kd_weight: float = 1.0,
        kd_temperature: float = 7.0,
        consistency_weight: float = 10.0,
        rampup_epochs: float = 20.0,
        gram_weight: float = 1.0,
        adv_weight: float = 2e-4,
        gan_mode: str = "bce",
        teacher_lr: float = 1e-3,
        teacher_weight_decay: float = 1e-5,
        discriminator_lr: float = 1e-4,
        discriminator_filters: int = 16,
    ) -> None:
        weights = {
            "dice_weight": dice_weight,
            "bce_weight": bce_weight,
            "teacher_dice_weight": teacher_dice_weight,
            "hidden_kd_weight": hidden_kd_weight,
            "attn_kd_weight": attn_kd_weight,
            "logit_kd_weight": logit_kd_weight,
            "consistency_weight": consistency_weight,
            "gram_weight": gram_weight,
            "adv_weight": adv_weight,
            "rampup_epochs": rampup_epochs,
            "teacher_weight_decay": teacher_weight_decay,
        }
        check_non_negative(weights)
        for arg, value in (("teacher_lr", teacher_lr), ("discriminator_lr", discriminator_lr)):
            if not value > 0:
                raise ValueError(f"{arg} must be > 0, got {value}")
        if kd_temperature <= 0:
            raise ValueError(f"kd_temperature must be > 0, got {kd_temperature}")
        if gan_mode not in GAN_MODES:
            raise ValueError(f"gan_mode must be one of {GAN_MODES}, got {gan_mode!r}")
        if discriminator_filters < 1:
            raise ValueError(f"discriminator_filters must be >= 1, got {discriminator_filters}")
        self.dice_weight = dice_weight
        self.bce_weight = bce_weight
        self.teacher_dice_weight = teacher_dice_weight
        self.hidden_kd_weight = hidden_kd_weight
        self.attn_kd_weight = attn_kd_weight
        self.logit_kd_weight = logit_kd_weight
        self.kd_temperature = kd_temperature
        self.consistency_weight = consistency_weight
        self.rampup_epochs = rampup_epochs
        self.gram_weight = gram_weight
        self.adv_weight = adv_weight
        self.gan_mode = gan_mode
        self.teacher_lr = teacher_lr
        self.teacher_weight_decay = teacher_weight_decay
        self.discriminator_lr = discriminator_lr
        self.discriminator_filters = discriminator_filters
        self.segmentation_loss = DiceBCELoss(1.0, bce_weight)
        self.teacher: torch.nn.Module | None = None
        self.teacher_optimizer: torch.optim.Optimizer | None = None
        self.discriminator: StyleDiscriminator | None = None
        self.discriminator_optimizer: torch.optim.Optimizer | None = None
        self.several_sequences = False

    @property
    def distils(self) -> bool:
        """Whether any distillation term has a weight: without one the teacher would teach nothing, so none is
        kept (the ``mstkd_net_only`` ablation: the same network and student views, no distillation)."""
        weights = (self.hidden_kd_weight, self.attn_kd_weight, self.logit_kd_weight, self.consistency_weight)
        return any(w > 0 for w in (*weights, self.gram_weight, self.adv_weight))

    # ---- set-up -------------------------------------------------------------------------------------------
    def setup(self, model: torch.nn.Module, modalities: tuple[str, ...], device: torch.device) -> None:
        """Create the site-local teacher and discriminator (and their Adam optimisers) at a site with two or more
        sequences.

        Raises:
            ValueError: ``model`` is not an MST-KDNet-style network (no ``style_channels``).
        """
        super().setup(model, modalities, device)
        style_channels = getattr(model, "style_channels", None)
        if not style_channels:
            raise ValueError(
                f"method 'mstkd' needs a network with hidden/attn/style outputs (network 'mstkd'), got model "
                f"{type(model).__name__}"
            )
        self.several_sequences = len(set(modalities)) > 1
        if not self.several_sequences:
            logger.info("mstkd: site has only %s: nothing to distil, student-only training", list(modalities))
            return
        if not self.distils:
            logger.info("mstkd: every distillation weight is 0: no teacher, the student alone on its views")
            return
        # Same architecture as the student; starting from the student's initial weights is as good as any
        # random start, and the teacher never leaves the site, so its initial weights reveal nothing.
        self.teacher = copy.deepcopy(model).to(device).train()
        self.teacher_optimizer = torch.optim.Adam(
            self.teacher.parameters(), lr=self.teacher_lr, weight_decay=self.teacher_weight_decay
        )
        if self.adv_weight > 0:
            self.discriminator = StyleDiscriminator(style_channels[-1], self.discriminator_filters).to(device)
            self.discriminator_optimizer = torch.optim.Adam(
                self.discriminator.parameters(), lr=self.discriminator_lr, betas=(0.9, 0.99)
            )
        extra = " and style discriminator" if self.discriminator is not None else ""
        logger.info("mstkd: site has %s: site-local teacher%s", list(modalities), extra)

    def on_global_model(self, model: torch.nn.Module, global_meta: dict[str, Any], current_round: int) -> None:
        """Nothing to do: the teacher and discriminator persist across rounds at the site; only the student is
        replaced by the global model."""

    # ---- the loss of a batch ------------------------------------------------------------------------------
    def training_loss(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor], epoch: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Student loss of one batch; at a site with a teacher, first steps the teacher and the discriminator.

        Returns:
            ``(loss, terms)``: the student's weighted loss (the trainer back-propagates and steps it) and every
            term as a float (unweighted), including ``teacher_dice`` and ``disc``, which were already stepped
            here and are not part of ``loss``.
        """
        image, label, mask = batch["image"], batch["label"], batch["modality_mask"]
        if self.several_sequences:
            full_image, full_mask = teacher_view(batch)
            image, mask = full_image, random_subsets_of(full_mask)
        if self.teacher is None:
            out = model(apply_modality_mask(image, mask), mask)
            seg = self._segmentation_terms(out["logits"], label)
            return sum(w * v for w, v in seg.values()), {k: float(v.detach()) for k, (_, v) in seg.items()}

        floats: dict[str, float] = {"acted_kd": 1.0}
        teacher_out = self._teacher_step(full_image, full_mask, label, floats)
        out = model(apply_modality_mask(full_image, mask), mask)
        logits = out["logits"]
        ramp = consistency_rampup_weight(epoch, self.consistency_weight, self.rampup_epochs)
        terms: dict[str, tuple[float, torch.Tensor]] = self._segmentation_terms(logits, label)
        # Teacher outputs are detached inside every KD loss: the teacher learns from its Dice only.
        if self.hidden_kd_weight > 0:
            terms["hidden_kd"] = (self.hidden_kd_weight, hidden_state_kd_loss(out["hidden"], teacher_out["hidden"]))
        if self.attn_kd_weight > 0:
            terms["attn_kd"] = (self.attn_kd_weight, attention_kd_loss(out["attn"], teacher_out["attn"]))
        if self.logit_kd_weight > 0:
            kd = standardized_logit_kd_loss(logits, teacher_out["logits"], self.kd_temperature)
            terms["logit_kd"] = (self.logit_kd_weight, kd)
        if self.consistency_weight > 0:
            terms["consistency"] = (ramp, output_consistency_loss(logits, teacher_out["logits"]))
        if self.gram_weight > 0:
            terms["gram"] = (self.gram_weight, gram_style_loss(out["style"], teacher_out["style"]))
        if self.discriminator is not None:
            # The discriminator steps before the student's adversarial forward: stepping it afterwards would
            # modify, in place, weights that the student's pending backward pass still needs.
            self._discriminator_step(teacher_out["style"][-1], out["style"][-1], floats)
            terms["adv"] = (self.adv_weight, adversarial_loss(self.discriminator, out["style"][-1], self.gan_mode))
        loss = sum(w * v for w, v in terms.values())
        floats.update({k: float(v.detach()) for k, (_, v) in terms.items()})
        return loss, floats

    def _segmentation_terms(self, logits: torch.Tensor, label: torch.Tensor) -> dict[str, tuple[float, torch.Tensor]]:
        """The student's supervised terms with their weights: ``{"dice": (w, Dice), "bce": (w, BCE)}``."""
        terms = self.segmentation_loss.terms(logits, label)
        weights = {"dice": self.dice_weight, "bce": self.bce_weight}
        return {k: (weights[k], v) for k, v in terms.items()}

    # ---- local auxiliary optimisers -----------------------------------------------------------------------
    def _teacher_step(
        self, image: torch.Tensor, mask: torch.Tensor, label: torch.Tensor, floats: dict[str, float]
    ) -> dict[str, Any]:
        """One Adam step of the teacher on the full input; returns its (pre-step) outputs for distillation."""
        assert self.teacher is not None and self.teacher_optimizer is not None
        self.teacher.train()
        teacher_out = self.teacher(image, mask)
        teacher_dice = self.segmentation_loss(teacher_out["logits"], label)
        if not torch.isfinite(teacher_dice):
            raise FloatingPointError(f"mstkd: the teacher's Dice loss became {float(teacher_dice)}; lower teacher_lr")
        self.teacher_optimizer.zero_grad(set_to_none=True)
        (self.teacher_dice_weight * teacher_dice).backward()
        self.teacher_optimizer.step()
        # Cleared so that the trainer's backward of the student loss (which never reaches the teacher) leaves
        # the teacher with no gradients at all, and nothing stale is stepped later.
        self.teacher_optimizer.zero_grad(set_to_none=True)
        floats["teacher_dice"] = float(teacher_dice.detach())
        return teacher_out

    def _discriminator_step(self, real: torch.Tensor, fake: torch.Tensor, floats: dict[str, float]) -> None:
        """One Adam step of the discriminator (teacher style = real, student style = fake; both detached)."""
        assert self.discriminator is not None and self.discriminator_optimizer is not None
        self.discriminator.train()
        self.discriminator_optimizer.zero_grad(set_to_none=True)
        loss = discriminator_loss(self.discriminator, real, fake, self.gan_mode)
        loss.backward()
        self.discriminator_optimizer.step()
        self.discriminator_optimizer.zero_grad(set_to_none=True)
        floats["disc"] = float(loss.detach())


__all__ = ["SUBSET_MASKS", "MSTKDMethod", "random_subset_masks", "random_subsets_of"]
