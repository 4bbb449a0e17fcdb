"""IsoFed: hospitals with images but no labels join the federation.

After "Isolated Federated Learning for Semi-Supervised Medical Image Classification" (IsoFed; Saha, Mishra, Noble,
MICCAI 2023, arXiv 2310.18815), shown there on 2-D classification with no public code, brought here to 3-D
segmentation with missing sequences. What follows the paper and what is this project's interpretation is marked in
docs/isofed.md; in short:

* **isolated aggregation** (:class:`IsoFedAggregation`): the server keeps two models, ``θ_L`` averaged over the
  labelled sites and ``θ_U`` averaged over the unlabelled sites; they are never averaged into each other;
* **cross hand-off**: in round ``r`` every site receives ``θ_L^r`` (the global model, which it scores); a labelled
  site also receives ``θ_U^r`` and trains from it, an unlabelled site trains from ``θ_L^r``. The labelled sites'
  results become ``θ_L^{r+1}``, the unlabelled sites' ``θ_U^{r+1}``. Round 0 starts both from the seeded initial
  model. That is the default schedule, ``handoff="every"``; ``"alternate"`` swaps in odd rounds only and
  ``"none"`` never (each group trains its own model: the unlabelled sites then receive ``θ_U`` as their hand-off);
* **self-supervised pre-training** at every site on the model it trains from: ``im_steps`` Adam steps of the
  voxel-wise information-maximisation loss (:mod:`fedbrats.losses.unsupervised`) on its own images;
* **fine-tuning**: a labelled site with the recipe's Dice + BCE; an unlabelled site as a mean teacher (teacher =
  EMA of the student, on the weakly augmented batch; student on a strongly augmented copy: intensity, noise,
  sequence dropout; MSE of sigmoid outputs with a sigmoid ramp-up; no gradient reaches the teacher);
* **deployment**: ``θ_L``. It is the server's global model: ``FL_global_model.pt``, and ``best_FL_global_model.pt``
  selected on the labelled sites' validation Dice only (unlabelled sites send label-free scores, which the
  selection ignores). ``θ_U`` lives in ``server_state.npz``.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import torch

from fedbrats.data.transforms import ModalityDropout, apply_modality_mask
from fedbrats.federated.methods.base import Job, Method, check_non_negative
from fedbrats.federated.methods.supervised import SupervisedMethod, segmentation_logits
from fedbrats.federated.protocol import HANDOFF_PARAMS_KEY, LABELLED_KEY
from fedbrats.federated.server.aggregation import SiteUpdate, WeightedAverage
from fedbrats.federated.server.update_checks import UpdateBounds
from fedbrats.losses.consistency import consistency_rampup_weight, output_consistency_loss
from fedbrats.losses.unsupervised import information_maximisation_loss

logger = logging.getLogger(__name__)

#: Modes of :class:`IsoFedAggregation`: IsoFed and its two baselines.
MODES = ("isolated", "labelled_only", "joint")
#: Hand-off schedules of :class:`IsoFedAggregation` (mode ``isolated``): the lineages swap every round (IsoFed as
#: specified, the default), in odd rounds only, or never.
HANDOFFS = ("every", "alternate", "none")
#: Prefix of the unlabelled group's weights in ``server_state.npz``.
_HANDOFF_STATE_PREFIX = "unlabelled_model."


@torch.no_grad()
def ema_update(teacher: torch.nn.Module, student: torch.nn.Module, decay: float) -> None:
    """``teacher <- decay * teacher + (1 - decay) * student`` for every parameter; buffers are copied.

    Raises:
        ValueError: ``decay`` outside [0, 1].
    """
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay must be in [0, 1], got {decay}")
    for t, s in zip(teacher.parameters(), student.parameters()):
        t.mul_(decay).add_(s.detach(), alpha=1.0 - decay)
    for t, s in zip(teacher.buffers(), student.buffers()):
        t.copy_(s)


class IsoFedMethod(SupervisedMethod):
    """The site side of IsoFed; the same method at labelled and unlabelled sites (the site's data decides).

    Args:
        dice_weight: supervised soft Dice (labelled sites).
        bce_weight: supervised binary cross-entropy (labelled sites).
        im_steps: Adam steps of information-maximisation pre-training at the start of each round (0: none).
        im_lr: their learning rate (a fresh Adam each round; the trainer's optimiser is not touched).
        im_start_round: first round with pre-training (round 0's model is untrained: sharpening its random
            predictions teaches nothing).
        diversity_weight: weight of the diversity term of the IM loss (SHOT: 1).
        ema_decay: the mean teacher's EMA decay (UA-MT: 0.99).
        consistency_weight: final weight of the consistency loss (UA-MT: 0.1).
        rampup_epochs: epochs of its sigmoid ramp-up ``exp(-5 (1 - t)^2)`` (UA-MT: 40), counted over the site's
            whole run.
        strong_intensity: the student's view: per-case, per-sequence intensity scale in ``1 ± s`` and shift in
            ``± s`` (z-scored intensities).
        strong_noise_std: the student's view: Gaussian noise standard deviation.
        strong_dropout: the student's view: probability of hiding some present sequences of a case (at least one
            stays).
        unlabelled_training: False: unlabelled sites do not train (their update is the model they received); the
            baseline "FedAvg over the labelled sites only".
        unlabelled_lr_scale: factor on the trainer's learning rate at unlabelled sites (ours, not the paper's: Adam
            is nearly invariant to the consistency loss's scale, so its weight and ramp-up cannot slow those
            sites down; this can).

    Raises:
        ValueError: a negative weight, step count or augmentation strength, a non-positive ``im_lr``, or
            ``ema_decay`` / ``strong_dropout`` outside [0, 1], or a non-positive ``unlabelled_lr_scale``.
    """

    name: ClassVar[str] = "isofed"
    payload_keys: ClassVar[frozenset[str]] = frozenset({LABELLED_KEY})
    supports_unlabelled: ClassVar[bool] = True

    def __init__(
        self,
        dice_weight: float = 1.0,
        bce_weight: float = 1.0,
        im_steps: int = 5,
        im_lr: float = 1e-4,
        im_start_round: int = 1,
        diversity_weight: float = 1.0,
        ema_decay: float = 0.99,
        consistency_weight: float = 0.1,
        rampup_epochs: float = 40.0,
        strong_intensity: float = 0.2,
        strong_noise_std: float = 0.1,
        strong_dropout: float = 0.5,
        unlabelled_training: bool = True,
        unlabelled_lr_scale: float = 1.0,
    ) -> None:
        check_non_negative(
            {
                "im_steps": im_steps,
                "im_start_round": im_start_round,
                "diversity_weight": diversity_weight,
                "consistency_weight": consistency_weight,
                "rampup_epochs": rampup_epochs,
                "strong_intensity": strong_intensity,
                "strong_noise_std": strong_noise_std,
            }
        )
        for arg, value in (("im_lr", im_lr), ("unlabelled_lr_scale", unlabelled_lr_scale)):
            if not value > 0:
                raise ValueError(f"{arg} must be > 0, got {value}")
        for arg, value in (("ema_decay", ema_decay), ("strong_dropout", strong_dropout)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{arg} must be in [0, 1], got {value}")
        super().__init__(dice_weight, bce_weight)
        self.im_steps = int(im_steps)
        self.im_lr = im_lr
        self.im_start_round = int(im_start_round)
        self.diversity_weight = diversity_weight
        self.ema_decay = ema_decay
        self.consistency_weight = consistency_weight
        self.rampup_epochs = rampup_epochs
        self.strong_intensity = strong_intensity
        self.strong_noise_std = strong_noise_std
        self.unlabelled_training = unlabelled_training
        self.unlabelled_lr_scale = float(unlabelled_lr_scale)
        self.dropper = ModalityDropout(prob=strong_dropout)
        self.teacher: torch.nn.Module | None = None
        self.handoff: dict[str, Any] | None = None
        self.im_loss: float | None = None
        self._student_steps = 0

    @property
    def lr_scale(self) -> float:
        """``unlabelled_lr_scale`` at an unlabelled site, else 1."""
        return 1.0 if self.labelled else self.unlabelled_lr_scale

    # ---- round hooks --------------------------------------------------------------------------------------
    def setup(self, model: torch.nn.Module, modalities: tuple[str, ...], device: torch.device) -> None:
        super().setup(model, modalities, device)
        # The sequence dropout of the student's view draws from torch's generator, which the trainer seeds.
        self.dropper.set_random_state(int(torch.randint(2**31 - 1, (1,))))
        logger.info("isofed: %s site", "labelled" if self.labelled else "unlabelled")

    def on_global_model(self, model: torch.nn.Module, global_meta: dict[str, Any], current_round: int) -> None:
        """Keep the hand-off weights (if the server sent any) for :meth:`before_round`: the received global model
        is scored first."""
        handoff = global_meta.get(HANDOFF_PARAMS_KEY)
        self.handoff = dict(handoff) if handoff else None

    def before_round(self, model: torch.nn.Module, train_loader: Any, current_round: int) -> None:
        """Start from the hand-off model, pre-train it with the IM loss, and (unlabelled site) reset the teacher."""
        if self.handoff is not None:
            state = {k: torch.as_tensor(np.asarray(v)) for k, v in self.handoff.items()}
            model.load_state_dict(state, strict=True)
            self.handoff = None
            logger.info("isofed: round %d: starting from the hand-off model (θ_U, not the global θ_L)", current_round)
        self.im_loss = None
        if not self.labelled and not self.unlabelled_training:
            return
        if self.im_steps > 0 and current_round >= self.im_start_round:
            self.im_loss = self._im_pretrain(model, train_loader)
        if not self.labelled:
            self.teacher = copy.deepcopy(model).eval()
            for p in self.teacher.parameters():
                p.requires_grad_(False)
            self._student_steps = 0

    def _im_pretrain(self, model: torch.nn.Module, train_loader: Any) -> float:
        """``im_steps`` Adam steps of the IM loss on the site's training images (labels, if any, unused)."""
        optimizer = torch.optim.Adam(model.parameters(), lr=self.im_lr)
        model.train()
        losses: list[float] = []
        batches = iter(train_loader)
        while len(losses) < self.im_steps:
            try:
                batch = next(batches)
            except StopIteration:
                if not losses and len(train_loader) == 0:
                    break
                batches = iter(train_loader)
                continue
            image, mask = batch["image"].to(self.device), batch["modality_mask"].to(self.device)
            logits = segmentation_logits(model(image, mask))
            loss = information_maximisation_loss(logits, diversity_weight=self.diversity_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        optimizer.zero_grad(set_to_none=True)
        mean = float(np.mean(losses)) if losses else float("nan")
        logger.info("isofed: %d IM pre-training steps, mean IM loss %.4f", len(losses), mean)
        return mean

    # ---- the loss of a batch ------------------------------------------------------------------------------
    def training_loss(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor], epoch: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Labelled site: Dice + BCE. Unlabelled site: the ramped consistency between the student on a strong view
        and the EMA teacher on the batch as loaded (the weak view)."""
        if self.labelled:
            loss, terms = super().training_loss(model, batch, epoch)
        elif not self.unlabelled_training:
            # No forward pass and no gradient: Adam skips every weight, the site sends back what it received.
            loss, terms = torch.zeros((), device=self.device, requires_grad=True), {}
        else:
            loss, terms = self._mean_teacher_loss(model, batch, epoch)
        if self.im_loss is not None:
            terms["im_pretrain"] = self.im_loss
        return loss, terms

    def _mean_teacher_loss(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor], epoch: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
        if self.teacher is None:
            raise RuntimeError("isofed: before_round must run before training_loss at an unlabelled site")
        if self._student_steps:  # the EMA of the weights the previous optimiser step produced
            ema_update(self.teacher, model, self.ema_decay)
        self._student_steps += 1
        image, mask = batch["image"], batch["modality_mask"]
        with torch.no_grad():
            teacher_logits = segmentation_logits(self.teacher(image, mask))
        strong_image, strong_mask = self.strong_view(image, mask)
        student_logits = segmentation_logits(model(strong_image, strong_mask))
        consistency = output_consistency_loss(student_logits, teacher_logits)
        weight = consistency_rampup_weight(epoch, self.consistency_weight, self.rampup_epochs)
        return weight * consistency, {"consistency": float(consistency.detach()), "consistency_weight": weight}

    def strong_view(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The student's view of a batch (same voxels, so the two views stay aligned): per-case, per-sequence
        intensity scale and shift, Gaussian noise, then sequence dropout; absent sequences stay exactly zero.

        Args:
            image: (B, 4, ...) images as loaded.
            mask: (B, 4) sequence availability.
        """
        b, c = image.shape[:2]
        shape = (b, c, *([1] * (image.ndim - 2)))
        s = self.strong_intensity
        scale = 1.0 + (torch.rand(shape, device=image.device) * 2 - 1) * s
        shift = (torch.rand(shape, device=image.device) * 2 - 1) * s
        noisy = image * scale + shift + torch.randn_like(image) * self.strong_noise_std
        masks = [self.dropper(noisy[i], mask[i])[1] for i in range(b)]
        new_mask = torch.stack(masks).to(device=mask.device, dtype=mask.dtype)
        return apply_modality_mask(noisy, new_mask), new_mask

    def round_payload(self, model: torch.nn.Module, train_loader: Any) -> dict[str, Any]:
        """The site's group (``labelled``), so that the server keeps the two groups apart."""
        return {LABELLED_KEY: bool(self.labelled)}


class IsoFedAggregation(WeightedAverage):
    """IsoFed's isolated aggregation, and its two baselines.

    Sites say which group they are in (``labelled`` in their update). With ``mode``:

    * ``"isolated"`` (IsoFed): the labelled sites' updates average into ``θ_L`` (the global model every site
      receives and scores, saved and deployed) and the unlabelled sites' into ``θ_U``. Which of the two each
      site trains from is the ``handoff`` schedule's: a site that is to train from ``θ_U`` gets it as its
      hand-off (:data:`~fedbrats.federated.protocol.HANDOFF_PARAMS_KEY`), a site that is to train from ``θ_L``
      gets none (it trains from the global model it received). A group without an update this round keeps its
      model; until an unlabelled site has sent an update there is no ``θ_U`` and nobody gets a hand-off (every
      site trains from ``θ_L``, as in round 0).
    * ``"labelled_only"``: FedAvg over the labelled sites; unlabelled updates are ignored, nobody gets a hand-off.
    * ``"joint"``: FedAvg over every site (naive semi-supervised FedAvg), no hand-off.

    The ``handoff`` schedule (mode ``isolated`` only), for round ``r`` (the round after the last one aggregated):

    * ``"every"`` (the default, and IsoFed as this project had it before the option existed): the lineages swap
      every round. Labelled sites train from ``θ_U``, unlabelled sites from ``θ_L``; so each chain of weights is
      trained with labels every other round.
    * ``"alternate"``: they swap in odd rounds only (as ``"every"``); in even rounds each group trains its own
      model (labelled sites from ``θ_L``, unlabelled sites from ``θ_U``). Each chain then sees two rounds with
      labels, two without.
    * ``"none"``: they never swap: labelled sites only train ``θ_L``, unlabelled sites only ``θ_U``; the deployed
      ``θ_L`` never passes through an unlabelled site (the unlabelled sites then train for nothing the
      deployed model uses: the ablation of the hand-off itself).

    Args:
        mode: one of :data:`MODES`.
        handoff: one of :data:`HANDOFFS`.
        weight_by_steps: weight sites by their training steps (True) or equally, within each group.
        rule, trim_fraction, clip_factor: how each weight's values are combined, robustly if asked (see
            :class:`~fedbrats.federated.server.aggregation.WeightedAverage`).

    Raises:
        ValueError: an unknown ``mode`` or ``handoff``.
    """

    name = "isofed"
    accepted_meta_keys = frozenset({LABELLED_KEY})

    def __init__(
        self,
        mode: str = "isolated",
        weight_by_steps: bool = True,
        rule: str = "mean",
        trim_fraction: float = 0.2,
        clip_factor: float = 0.0,
        handoff: str = "every",
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if handoff not in HANDOFFS:
            raise ValueError(f"handoff must be one of {HANDOFFS}, got {handoff!r}")
        super().__init__(weight_by_steps, rule, trim_fraction, clip_factor)
        self.mode = mode
        self.handoff = handoff
        #: The round the next training task is for (the controller says so before each round: after a round without
        #: any usable update, the one after the last aggregated round would be one behind).
        self.next_round = 0
        self.unlabelled_params: dict[str, np.ndarray] | None = None
        self.labelled_sites: set[str] = set()
        self.unlabelled_sites: set[str] = set()

    def extras_problem(self, meta: Mapping[str, Any], bounds: UpdateBounds) -> str | None:
        """``labelled`` is one boolean (a site's group), not an array."""
        if LABELLED_KEY in meta and not isinstance(meta[LABELLED_KEY], (bool, np.bool_)):
            return f"{LABELLED_KEY} must be true or false, got {type(meta[LABELLED_KEY]).__name__}"
        return super().extras_problem(meta, bounds)

    @staticmethod
    def is_labelled(update: SiteUpdate) -> bool:
        """A site's group as its update says (a site that does not say counts as labelled)."""
        return bool(update.meta.get(LABELLED_KEY, True))

    def aggregate(
        self, global_params: dict[str, np.ndarray], updates: list[SiteUpdate], current_round: int
    ) -> dict[str, np.ndarray]:
        self.next_round = current_round + 1
        labelled = [u for u in updates if self.is_labelled(u)]
        unlabelled = [u for u in updates if not self.is_labelled(u)]
        for u in labelled:
            self.unlabelled_sites.discard(u.site_name)
            self.labelled_sites.add(u.site_name)
        for u in unlabelled:
            self.labelled_sites.discard(u.site_name)
            self.unlabelled_sites.add(u.site_name)
        if self.mode == "joint":
            return super().aggregate(global_params, updates, current_round)
        if self.mode == "isolated" and unlabelled:
            previous = self.unlabelled_params or global_params
            self.unlabelled_params = super().aggregate(previous, unlabelled, current_round)
        if not labelled:
            logger.warning("round %d: no labelled site's update; the labelled model is unchanged", current_round)
            return dict(global_params)
        return super().aggregate(global_params, labelled, current_round)

    def begin_round(self, current_round: int) -> None:
        """The round whose training task the controller sends next: the schedule's parity comes from it."""
        self.next_round = current_round

    def swaps(self, current_round: int) -> bool:
        """Whether the lineages swap in ``current_round`` (labelled sites train from ``θ_U``, unlabelled ones from
        ``θ_L``) under the ``handoff`` schedule."""
        if self.handoff == "every":
            return True
        if self.handoff == "alternate":
            return current_round % 2 == 1
        return False

    def task_groups(self, targets: list[str]) -> list[tuple[list[str], dict[str, Any]]]:
        """The sites (groups known from their earlier updates) that train from ``θ_U`` this round get it as their
        hand-off: the labelled ones in a round where the lineages swap, the unlabelled ones in a round where they
        do not. A site not yet known trains from ``θ_L``."""
        if self.mode != "isolated" or self.unlabelled_params is None:
            return [(list(targets), {})]
        group = self.labelled_sites if self.swaps(self.next_round) else self.unlabelled_sites
        receivers = [t for t in targets if t in group]
        others = [t for t in targets if t not in group]
        return [(receivers, {HANDOFF_PARAMS_KEY: self.unlabelled_params}), (others, {})]

    def state(self) -> dict[str, Any]:
        """The unlabelled group's model, the two groups and the next round (for a resumed run)."""
        out: dict[str, Any] = {
            "labelled_sites": sorted(self.labelled_sites),
            "unlabelled_sites": sorted(self.unlabelled_sites),
            "next_round": self.next_round,
        }
        for name, value in (self.unlabelled_params or {}).items():
            out[_HANDOFF_STATE_PREFIX + name] = value
        return out

    def load_state(self, state: dict[str, Any]) -> None:
        self.labelled_sites = {str(s) for s in np.asarray(state.get("labelled_sites", [])).tolist()}
        self.unlabelled_sites = {str(s) for s in np.asarray(state.get("unlabelled_sites", [])).tolist()}
        self.next_round = int(np.asarray(state.get("next_round", 0)))
        prefix = _HANDOFF_STATE_PREFIX
        params = {k[len(prefix) :]: np.asarray(v) for k, v in state.items() if k.startswith(prefix)}
        self.unlabelled_params = params or None


__all__ = ["HANDOFFS", "MODES", "IsoFedAggregation", "IsoFedMethod", "ema_update"]


#: The synthetic default of the isofed job: the embedded federation's site-1 (all four sequences) and site-3
#: (FLAIR+T2) keep their labels; site-2 (no T1ce) and site-4 (T1 only) act as hospitals without labels.
DEFAULT_UNLABELLED_SITES = ["site-2", "site-4"]

#: IsoFed: two isolated global models with a cross hand-off; labelled and unlabelled sites; its baselines.
METHOD = Method(
    clients={"isofed": IsoFedMethod},
    strategies={"isofed": IsoFedAggregation},
    jobs=(
        Job(
            "isofed",
            "IsoFed: labelled and unlabelled hospitals; two isolated global models with a cross hand-off, "
            "information-maximisation pre-training, supervised or mean-teacher fine-tuning.",
            aggregation="fedbrats.federated.methods.isofed.IsoFedAggregation",
            training={"method": "isofed", "unlabelled_sites": list(DEFAULT_UNLABELLED_SITES)},
        ),
    ),
    experiments={
        "isofed": ("isofed", {}, {}),
        # (a) FedAvg over the labelled sites only: the unlabelled sites do not train and are not averaged.
        "isofed_labelled_only": (
            "isofed",
            {"method_args": {"im_steps": 0, "unlabelled_training": False}},
            {"mode": "labelled_only"},
        ),
        # (b) Naive semi-supervised FedAvg: one model averaged over every site, the same mean teacher at the
        # unlabelled sites, no hand-off and no IM pre-training.
        "isofed_naive_ssl": ("isofed", {"method_args": {"im_steps": 0}}, {"mode": "joint"}),
        # Ablation: IsoFed without the IM pre-training.
        "isofed_no_im": ("isofed", {"method_args": {"im_steps": 0}}, {}),
        # Ablation (ours): the unlabelled sites train at a tenth of the learning rate.
        "isofed_slow_unlabelled": ("isofed", {"method_args": {"unlabelled_lr_scale": 0.1}}, {}),
        # Ablations (ours) of the hand-off schedule: the lineages swap in odd rounds only, or never (the deployed
        # model then trains at the labelled sites only; the unlabelled sites train their own, unused, model).
        "isofed_handoff_alternate": ("isofed", {}, {"handoff": "alternate"}),
        "isofed_no_handoff": ("isofed", {}, {"handoff": "none"}),
    },
)
