"""The training and validation loop of one site, shared by every method and by the non-federated baselines."""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from fedbrats.data.loader import DataConfig, make_loaders, voxel_spacing
from fedbrats.data.site_config import SiteConfig
from fedbrats.federated.methods import ClientMethod, build_method
from fedbrats.federated.protocol import LOSS_TERMS_KEY, LR_KEY, METRIC_PREFIX, NUM_STEPS_KEY, TRAIN_LOSS_KEY
from fedbrats.losses.unsupervised import information_maximisation_terms
from fedbrats.lr_schedule import LR_SCHEDULES, lr_factor
from fedbrats.precision import autocast, resolve_precision
from fedbrats.scoring.inference import predict_logits
from fedbrats.scoring.metrics import logits_to_regions, region_dice, region_hd95, summarize
from fedbrats.scoring.postprocess import CANDIDATE_METRIC, DEFAULT_CANDIDATES, remove_small_components

logger = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Training options of a job (identical for every site of the job).

    Attributes:
        method: client method name (``fedavg``, ``fedkd``, ...), see :mod:`fedbrats.federated.methods`.
        method_args: keyword arguments of the method (loss weights and options).
        epochs_per_round: local epochs between two aggregations.
        lr: Adam learning rate at the start of the run.
        lr_schedule: ``poly`` (nnU-Net's ``(1 - progress)^0.9``), ``cosine`` or ``constant``. The progress is
            that of the whole federated run (rounds done plus the share of this round), so the schedule
            continues across rounds and a resumed run picks it up where it stopped.
        weight_decay: Adam weight decay.
        max_steps_per_epoch: cap on batches per epoch (0: the whole training list).
        val_overlap: sliding-window overlap during validation.
        val_every: score the received global model on the site's validation cases every this many rounds (the
            model after rounds ``val_every``, ``2 * val_every``, ...; always in the final validation after the
            last round); rounds in between send no metrics, which saves most of a round's time on full-size
            volumes.
        postprocess_candidates: minimum connected-component sizes (voxels at the training resolution) each site
            scores in the final validation; the server keeps the best (see
            :mod:`fedbrats.scoring.postprocess`). ``[]`` turns the choice off.
        precision: ``auto`` (bfloat16 autocast where the hardware runs it natively, else float32), ``fp32`` or
            ``bf16``; weights and optimiser state stay float32 (see :mod:`fedbrats.precision`).
        num_threads: torch CPU threads of this site (1 per simulated site keeps a small machine usable).
        seed: seed of the site's random draws (offset by a hash of the site name).
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
        data: data options, see :class:`fedbrats.data.loader.DataConfig`.
        unlabelled_sites: sites that use no labels in this job even where their configuration has them (to
            simulate a semi-supervised federation on a labelled one); a site whose own configuration says
            ``"labelled": false`` is unlabelled whatever this lists.
        min_test_cases: in the cross-site evaluation, a site sends test scores only over at least this many of its
            test cases (it sends the count alone otherwise, and the matrix says "withheld"): a score over one case
            is that patient's, which nothing declares may leave the site.
    """

    # The training recipe's values (docs/results.md, "Training recipe", has the runs behind each choice): Dice + BCE
    # (the methods' default loss), a poly learning rate over the whole run from 3e-3, 10 local epochs a round,
    # bfloat16 where the CPU/GPU runs it natively. Every job lists them from here (fedbrats.jobgen).
    method: str = "fedavg"
    method_args: dict[str, Any] = field(default_factory=dict)
    epochs_per_round: int = 10
    lr: float = 3e-3
    lr_schedule: str = "poly"
    weight_decay: float = 1e-5
    max_steps_per_epoch: int = 0
    val_overlap: float = 0.25
    val_every: int = 1
    precision: str = "auto"
    postprocess_candidates: list[int] = field(default_factory=lambda: list(DEFAULT_CANDIDATES))
    num_threads: int = 1
    seed: int = 0
    device: str = "auto"
    data: DataConfig = field(default_factory=DataConfig)
    unlabelled_sites: list[str] = field(default_factory=list)
    min_test_cases: int = 2

    def __post_init__(self) -> None:
        if isinstance(self.data, dict):
            self.data = DataConfig.from_dict(self.data)
        if not isinstance(self.unlabelled_sites, (list, tuple)) or not all(
            isinstance(s, str) for s in self.unlabelled_sites
        ):
            raise ValueError(f"unlabelled_sites must be a list of site names, got {self.unlabelled_sites!r}")
        if self.epochs_per_round < 1:
            raise ValueError(f"epochs_per_round must be >= 1, got {self.epochs_per_round}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if any(not isinstance(n, int) or n < 0 for n in self.postprocess_candidates):
            raise ValueError(f"postprocess_candidates must be non-negative integers, got {self.postprocess_candidates}")
        if self.val_every < 1:
            raise ValueError(f"val_every must be >= 1, got {self.val_every}")
        if isinstance(self.min_test_cases, bool) or not isinstance(self.min_test_cases, int) or self.min_test_cases < 1:
            raise ValueError(f"min_test_cases must be an integer >= 1, got {self.min_test_cases!r}")
        resolve_precision(self.precision, torch.device("cpu"))  # rejects an unknown value early
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")

    def torch_device(self) -> torch.device:
        """Where the site computes: CUDA if ``device`` asks for it, or is ``auto`` and a GPU is there; else the CPU."""
        use_cuda = self.device == "cuda" or (self.device == "auto" and torch.cuda.is_available())
        return torch.device("cuda" if use_cuda else "cpu")

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> TrainConfig:
        """Build from a job-config mapping, rejecting unknown keys by name."""
        values = dict(values or {})
        unknown = sorted(set(values) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"unknown training option(s) {unknown}; known: {sorted(cls.__dataclass_fields__)}")
        return cls(**values)


def as_state_dict(params: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Weights received as arrays or tensors, as tensors (for ``load_state_dict``)."""
    return {k: v if isinstance(v, torch.Tensor) else torch.as_tensor(np.asarray(v)) for k, v in params.items()}


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class SiteTrainer:
    """Trains and validates one site's model; knows nothing about NVFlare.

    Args:
        site: the site's data configuration.
        config: training options.
        model: the network (built by the caller, e.g. from the server's model spec).
    """

    def __init__(self, site: SiteConfig, config: TrainConfig, model: torch.nn.Module) -> None:
        if site.labelled and site.site_name in config.unlabelled_sites:
            site = replace(site, labelled=False)  # the job hides this site's labels (simulated unlabelled site)
        self.site = site
        self.config = config
        torch.set_num_threads(config.num_threads)
        seed_everything(config.seed + sum(map(ord, site.site_name)))
        self.device = config.torch_device()
        self.precision = resolve_precision(config.precision, self.device)
        self.model = model.to(self.device)
        self.method: ClientMethod = build_method(config.method, **config.method_args)
        if not site.labelled and not self.method.supports_unlabelled:
            raise ValueError(
                f"site {site.site_name} has no labels, and method {config.method!r} needs them; use a method for "
                "unlabelled sites (e.g. isofed), or leave the site out"
            )
        self.method.labelled = site.labelled
        self.method.job_lr = config.lr
        self.method.setup(self.model, site.modalities, self.device)
        divisor = int(getattr(model, "spatial_divisor", 8))
        self.train_loader, self.val_loader = make_loaders(
            site.datalist,
            site.modalities,
            site.convention,
            config.data,
            divisor,
            labelled=site.labelled,
            teacher_view=self.method.uses_teacher_view,
        )
        self.optimizer = torch.optim.Adam(
            self.model.parameters(), lr=config.lr * self.method.lr_scale, weight_decay=config.weight_decay
        )
        self.global_step = 0
        self.epochs_done = 0

    @property
    def num_train_cases(self) -> int:
        return len(self.train_loader.dataset)

    def load_weights(self, params: dict[str, Any]) -> None:
        """Load (global) weights; arrays or tensors, strict on names and shapes."""
        self.model.load_state_dict(as_state_dict(params), strict=True)

    def weights(self) -> dict[str, torch.Tensor]:
        """The current weights on the CPU."""
        return {k: v.detach().cpu() for k, v in self.model.state_dict().items()}

    def update_weights(self) -> dict[str, torch.Tensor]:
        """The weights of this site's training update: those the method sends (all, unless it leaves some out)."""
        return {k: v for k, v in self.weights().items() if self.method.sends_parameter(k)}

    def should_validate(self, current_round: int) -> bool:
        """Whether the global model received in ``current_round`` is scored (see :attr:`TrainConfig.val_every`):
        every round when ``val_every`` is 1, else the model after each ``val_every`` rounds of training (the
        untrained round-0 model is skipped: model selection ignores it and scoring it is the slowest validation,
        its predictions being everywhere)."""
        return (current_round + 1) % self.config.val_every == 0 or self.config.val_every == 1

    def train_round(self, current_round: int, total_rounds: int | None = None) -> dict[str, Any]:
        """Train ``epochs_per_round`` epochs; return steps, mean loss, the mean of each loss term and the last
        learning rate.

        Args:
            current_round: the federated round (0-based).
            total_rounds: rounds of the whole run, for the learning-rate schedule (None: constant rate).
        """
        self.model.train()
        cfg = self.config
        steps, loss_sum, terms_sum = 0, 0.0, {}
        started = time.monotonic()
        steps_per_epoch = len(self.train_loader)
        if cfg.max_steps_per_epoch:
            steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch)
        lr = cfg.lr * self.method.lr_scale
        with autocast(self.precision, self.device):
            self.method.before_round(self.model, self.train_loader, current_round)
        for epoch in range(cfg.epochs_per_round):
            epoch_loss, epoch_steps = 0.0, 0
            for batch_idx, batch in enumerate(self.train_loader):
                if batch_idx >= steps_per_epoch:
                    break
                within = (epoch + batch_idx / max(steps_per_epoch, 1)) / cfg.epochs_per_round
                progress = (current_round + within) / total_rounds if total_rounds else None
                if progress is not None:
                    lr = cfg.lr * self.method.lr_scale * lr_factor(cfg.lr_schedule, progress)
                    for group in self.optimizer.param_groups:
                        group["lr"] = lr
                self.method.on_train_step(current_round + within, progress)
                batch = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                self.optimizer.zero_grad(set_to_none=True)
                with autocast(self.precision, self.device):
                    loss, terms = self.method.training_loss(self.model, batch, self.epochs_done)
                if loss is None:  # the method has nothing to learn from this batch
                    continue
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"site {self.site.site_name}: loss became {float(loss)} at round {current_round}, "
                        f"epoch {epoch}, batch {batch_idx} (terms {terms}); lower lr or check the data"
                    )
                loss.backward()
                self.optimizer.step()
                value = float(loss.detach())
                epoch_loss += value
                epoch_steps += 1
                loss_sum += value
                steps += 1
                self.global_step += 1
                for k, v in terms.items():
                    terms_sum[k] = terms_sum.get(k, 0.0) + v
            self.epochs_done += 1
            mean = epoch_loss / max(epoch_steps, 1)
            logger.info(
                "round %d | site %s | epoch %d/%d | loss %.4f | %d steps | lr %.2e | %.1fs",
                current_round,
                self.site.site_name,
                epoch + 1,
                cfg.epochs_per_round,
                mean,
                epoch_steps,
                lr,
                time.monotonic() - started,
            )
        summary = self._round_summary(steps, loss_sum, terms_sum)
        summary[LR_KEY] = lr
        return summary

    @staticmethod
    def _round_summary(steps: int, loss_sum: float, terms_sum: dict[str, float]) -> dict[str, Any]:
        n = max(steps, 1)
        return {
            NUM_STEPS_KEY: steps,
            TRAIN_LOSS_KEY: loss_sum / n,
            LOSS_TERMS_KEY: {k: v / n for k, v in terms_sum.items()},
        }

    @torch.no_grad()
    def validate(
        self, model: torch.nn.Module | None = None, postprocess_candidates: Sequence[int] = ()
    ) -> dict[str, float]:
        """Dice and HD95 per region of ``model`` (default: the site's) on the site's validation cases, with the
        site's own sequences. Keys start with ``val_``; ``val_mean_dice`` is the model-selection metric.

        When the site's own model is scored (``model`` None or the site's), the method may score more networks
        of the site the same way (:meth:`ClientMethod.site_model_metrics`, e.g. FedMIC's personalised model:
        ``val_personal_*``); their metrics are added.

        Args:
            model: the network to score (default: the site's).
            postprocess_candidates: minimum connected-component sizes (voxels) to score as well: each adds
                ``val_mean_dice_min<N>``, the mean Dice after removing smaller components
                (:mod:`fedbrats.scoring.postprocess`).
        """
        own_model = model is None or model is self.model
        model = model or self.model
        model.eval()
        own = self.method.validate(model, self.val_loader)
        if own is not None:
            return own
        if not self.site.labelled:
            return self._validate_without_labels(model)
        metrics = self._segmentation_metrics(model, postprocess_candidates, METRIC_PREFIX)
        if own_model and metrics:
            more = self.method.site_model_metrics(self._score_site_model)
            clash = sorted(k for k in more if k in metrics or not k.startswith(METRIC_PREFIX))
            if clash:
                raise ValueError(
                    f"method {self.method.name!r} reports metrics {clash}: each must start with "
                    f"{METRIC_PREFIX!r} and differ from the site's model's"
                )
            metrics.update(more)
        return metrics

    def _score_site_model(self, model: torch.nn.Module, prefix: str) -> dict[str, float]:
        """:meth:`_segmentation_metrics` of another network of the site, keys starting with ``prefix`` (which
        must start with ``val_`` and be another than the site's model's)."""
        if not prefix.startswith(METRIC_PREFIX) or prefix == METRIC_PREFIX:
            raise ValueError(f"prefix must start with {METRIC_PREFIX!r} and name the model, got {prefix!r}")
        return self._segmentation_metrics(model, (), prefix)

    def _segmentation_metrics(
        self, model: torch.nn.Module, postprocess_candidates: Sequence[int] = (), prefix: str = METRIC_PREFIX
    ) -> dict[str, float]:
        """Dice and HD95 per region of ``model`` on the site's (labelled) validation cases, keys starting with
        ``prefix`` (the post-processing candidates' keys are :data:`CANDIDATE_METRIC`'s); {} without cases."""
        model.eval()
        dices, hds = [], []
        candidate_dices: dict[int, list[torch.Tensor]] = {n: [] for n in postprocess_candidates if n > 0}
        for batch in self.val_loader:
            spacing = voxel_spacing(batch["affine"], self.config.data.zoom)
            image = batch["image"].to(self.device)
            mask = batch["modality_mask"].to(self.device)
            logits = predict_logits(
                model, image, mask, self.config.data.roi_size, overlap=self.config.val_overlap, precision=self.precision
            )
            pred = logits_to_regions(logits).cpu()
            label = batch["label"]
            dices.append(region_dice(pred, label))
            hds.append(region_hd95(pred, label, spacing=spacing))
            for size, values in candidate_dices.items():
                values.append(region_dice(remove_small_components(pred, size), label))
        if not dices:
            return {}
        metrics = summarize(torch.cat(dices), torch.cat(hds), prefix=prefix)
        for size, values in candidate_dices.items():
            metrics[CANDIDATE_METRIC.format(size)] = float(torch.cat(values).float().mean())
        for k, v in metrics.items():
            if not math.isfinite(v):
                logger.warning("site %s: validation metric %s is %s", self.site.site_name, k, v)
        return metrics

    def _validate_without_labels(self, model: torch.nn.Module) -> dict[str, float]:
        """Label-free scores of ``model`` on an unlabelled site's validation images: ``val_entropy``, the mean
        binary entropy of the WT/TC/ET predictions over brain voxels (non-zero in some present sequence), and
        ``val_im``, the information-maximisation objective over them (see :mod:`fedbrats.losses.unsupervised`).
        Neither is the model-selection metric; no label is read."""
        entropies, ims = [], []
        for batch in self.val_loader:
            image = batch["image"].to(self.device)
            mask = batch["modality_mask"].to(self.device)
            logits = predict_logits(
                model, image, mask, self.config.data.roi_size, overlap=self.config.val_overlap, precision=self.precision
            )
            brain = image.abs().sum(1, keepdim=True) > 0
            terms = information_maximisation_terms(logits, voxel_mask=brain)
            entropies.append(float(terms["entropy"]))
            ims.append(float(terms["entropy"] - terms["diversity"]))
        if not entropies:
            return {}
        return {f"{METRIC_PREFIX}entropy": float(np.mean(entropies)), f"{METRIC_PREFIX}im": float(np.mean(ims))}
