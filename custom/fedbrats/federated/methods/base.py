"""The interface a client method implements, and what a method module declares (:class:`Method`)."""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch


class ClientMethod:
    """Per-site logic of a federated method, plugged into :class:`fedbrats.federated.client.trainer.SiteTrainer`.

    The trainer owns the loop, optimiser, data and communication; a method decides the loss of a batch, what
    it does with the server's extras when a global model arrives, and which extras it sends back.

    Attributes:
        name: method name used in configs and logs.
        payload_keys: the meta keys this method adds to a site's update beyond
            :data:`fedbrats.federated.protocol.BASE_META_KEYS`; the server rejects anything undeclared.
        supports_unlabelled: whether the method can train at a site without labels (its batches then hold no
            ``label``); the trainer refuses an unlabelled site for a method that cannot.
        labelled: whether this site's cases carry labels (set by the trainer before :meth:`setup`).
        job_lr: the job's initial learning rate (``training.lr``, before :attr:`lr_scale`), set by the trainer
            before :meth:`setup`; None outside a trainer.
        uses_teacher_view: the training batches also carry the teacher's view, every sequence the site has
            before sequence dropout (:func:`fedbrats.data.transforms.teacher_view`); ``image`` and
            ``modality_mask`` stay the student's view.
    """

    name: ClassVar[str] = "base"
    payload_keys: ClassVar[frozenset[str]] = frozenset()
    supports_unlabelled: ClassVar[bool] = False
    uses_teacher_view: ClassVar[bool] = False
    labelled: bool = True
    job_lr: float | None = None

    @property
    def lr_scale(self) -> float:
        """Factor on the trainer's learning rate (its schedule included) at this site; 1 by default."""
        return 1.0

    def setup(self, model: torch.nn.Module, modalities: tuple[str, ...], device: torch.device) -> None:
        """Called once, after the model is built, with the site's available sequences."""
        self.model = model
        self.modalities = modalities
        self.device = device

    def use_site_folder(self, folder: str) -> None:
        """Called once, after :meth:`setup`, with the site's run folder (for state kept at the site across
        rounds; nothing in it is ever sent)."""

    def on_global_model(self, model: torch.nn.Module, global_meta: dict[str, Any], current_round: int) -> None:
        """Called after the global weights are loaded, before local training (e.g. snapshot a teacher)."""

    def on_round_end(self, model: torch.nn.Module, current_round: int) -> None:
        """Called after a round's local training, before the update is sent (e.g. save site-local state)."""

    def before_round(self, model: torch.nn.Module, train_loader: Any, current_round: int) -> None:
        """Called at the start of a round's local training, after the validation of the received model (e.g. to
        start from other weights, or to pre-train on the site's images). Runs under the trainer's autocast."""

    def on_train_step(self, rounds_done: float, progress: float | None) -> None:
        """Called before each training batch (before :meth:`training_loss`), with where the run stands:
        ``rounds_done`` is the round (0-based) plus the share of its local steps already taken, and ``progress`` is
        ``rounds_done / total_rounds``, the progress that drives the trainer's learning-rate schedule
        (:func:`fedbrats.lr_schedule.lr_factor`; None where the run's length is unknown and the trainer's rate
        stays constant). E.g. for a schedule of the method's own optimiser, or weights ramped over rounds."""

    def training_loss(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor], epoch: int
    ) -> tuple[torch.Tensor | None, dict[str, float]]:
        """Loss of one batch and its named terms (floats, for logging).

        A loss of None skips the batch: no optimiser step, and the step is not counted (so a site whose every
        batch is skipped sends an update that weighs nothing in a step-weighted average).
        """
        raise NotImplementedError

    def validate(self, model: torch.nn.Module, val_loader: Any) -> dict[str, float] | None:
        """The method's own validation scores of ``model`` on the site's validation loader (keys start with
        ``val_``), or None for the trainer's segmentation validation (Dice and HD95 per region)."""
        return None

    def site_model_metrics(self, score: Callable[[torch.nn.Module, str], dict[str, float]]) -> dict[str, float]:
        """Metrics of the site's other networks, reported beside its model's (e.g. a personalised model's).

        Called each time the site scores its model with the trainer's segmentation validation (every round it
        validates the received global model, and in the final validation), after that model is scored.
        ``score(network, prefix)`` is the same validation of ``network`` on the same cases (Dice and HD95 per
        region, the site's own sequences), keys starting with ``prefix`` (``val_<something>_``). Returns the
        metrics to add (keys start with ``val_`` and differ from the site's model's); none by default.
        """
        return {}

    def submitted_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """The site's own model for the cross-site evaluation (NVFlare's ``submit_model`` task, asked of the sites
        of methods whose sites keep models of their own): by default the site's network ``model``. A method with a
        personalised network returns that one; it may be another architecture (its spec goes with it)."""
        return model

    def round_payload(self, model: torch.nn.Module, train_loader: Any) -> dict[str, Any]:
        """Extra items sent with this round's update (numpy arrays, lists or numbers; never tensors)."""
        return {}

    def sends_parameter(self, name: str) -> bool:
        """Whether the weight ``name`` goes into this site's update (default: all of them).

        A method may leave out weights the site never trains (e.g. the encoder of a sequence it lacks), but only
        where the job's aggregation strategy accepts the omission
        (:meth:`fedbrats.federated.server.aggregation.AggregationStrategy.may_omit`); otherwise the server
        rejects the update as incomplete.
        """
        return True


def check_non_negative(values: dict[str, float]) -> None:
    """Raise a ValueError naming the first option (e.g. a loss weight) that is negative."""
    for arg, value in values.items():
        if value < 0:
            raise ValueError(f"{arg} must be >= 0, got {value}")


@dataclass(frozen=True)
class Job:
    """The defaults of one job of a method (its folder under ``jobs/``, written by :mod:`fedbrats.jobgen`).

    Attributes:
        name: the job's name (``jobs/<name>``, ``fedbrats simulate <name>``).
        description: one line for ``meta.json`` and the command listings.
        aggregation: the server's strategy, a class path of
            :data:`fedbrats.federated.server.aggregation.STRATEGIES` (a shared one, or the method's own).
        network: ``{"name": ..., "args": {...}}`` merged over the common network; ``None`` keeps it.
        training: options merged over the common training recipe (e.g. ``{"method": "fedkd"}``).
        min_clients: usable updates a round needs (0: every site).
        compression: SVD-compressed updates both ways by default (``{}`` for the default energies, or
            ``{"energy_start": ..., "energy_end": ...}``; see :mod:`fedbrats.federated.compression`); None: off.
        key_metric: the sites' validation score (higher is better) by which NVFlare's model selector keeps the
            best global model (default: the mean Dice, :data:`fedbrats.federated.protocol.KEY_METRIC`).
        cross_site_eval: whether the job ends with the federated (cross-site) evaluation of its models on every
            site's test cases (:mod:`fedbrats.federated.server.cross_site`): a segmentation's Dice and HD95, so off
            for a method whose network is not a segmenter.
        submit_site_models: whether that evaluation also asks each site for a model of its own (a personalised
            model that never leaves the site in training) and scores it at every site.
    """

    name: str
    description: str
    aggregation: str
    network: Mapping[str, Any] | None = None
    training: Mapping[str, Any] = field(default_factory=dict)
    min_clients: int = 0
    compression: Mapping[str, Any] | None = None
    key_metric: str | None = None
    cross_site_eval: bool = True
    submit_site_models: bool = False

    def definition(self) -> dict[str, Any]:
        """The job as :data:`fedbrats.jobgen.JOBS` holds it."""
        out: dict[str, Any] = {
            "description": self.description,
            "aggregation": {"path": self.aggregation, "args": {}},
        }
        if self.network is not None:
            out["network"] = copy.deepcopy(dict(self.network))
        out["training"] = copy.deepcopy(dict(self.training))
        out["min_clients"] = self.min_clients
        if self.compression is not None:
            out["compression"] = dict(self.compression)
        if self.key_metric is not None:
            out["key_metric"] = self.key_metric
        out["cross_site_eval"] = {"submit_site_models": self.submit_site_models} if self.cross_site_eval else None
        return out


@dataclass(frozen=True)
class Method:
    """Everything a federated method declares, in its own module (as ``METHOD``), registered in one place.

    :mod:`fedbrats.federated.methods` finds every module of its folder that defines ``METHOD`` and derives the
    client registry (``METHODS``), the jobs (``JOBS``, used by :mod:`fedbrats.jobgen`) and the experiments of the
    driver (``EXPERIMENTS``, used by ``experiments/compare.py``) from them.

    Attributes:
        clients: the names a job's ``training.method`` may use, each with its :class:`ClientMethod` class.
        jobs: the method's jobs and their defaults (network, aggregation strategy, training options).
        experiments: the method's runs for the experiment driver: name -> (job, training overrides, aggregation
            overrides); the method's plain job and its ablations.
        networks: networks of its own (name -> ``torch.nn.Module`` class), added to
            :data:`fedbrats.networks.NETWORKS`; the shared ones need no entry.
        strategies: aggregation strategies of its own (name -> ``AggregationStrategy`` class), added to
            :data:`fedbrats.federated.server.aggregation.STRATEGIES`; a job names one by its class path.
    """

    clients: Mapping[str, type[ClientMethod]]
    jobs: tuple[Job, ...]
    experiments: Mapping[str, tuple[str, Mapping[str, Any], Mapping[str, Any]]] = field(default_factory=dict)
    networks: Mapping[str, type[torch.nn.Module]] = field(default_factory=dict)
    strategies: Mapping[str, type] = field(default_factory=dict)
