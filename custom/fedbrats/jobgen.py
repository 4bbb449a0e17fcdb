"""Every job's defaults, defined once here: the common training recipe and each method's job.

:func:`job_spec` resolves a job with its overrides; :class:`fedbrats.recipe.FedBratsRecipe` turns that into an
NVFlare 2.9 job recipe, whose export is what the committed folders under ``jobs/`` hold (``fedbrats make-jobs``;
a test checks it), so an option lives in one place and a job holds configuration only; the code comes from the
installed package.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fedbrats.federated.client.trainer import TrainConfig
from fedbrats.federated.methods import JOBS as METHOD_JOBS
from fedbrats.federated.protocol import KEY_METRIC
from fedbrats.federated.server.controller import DEFAULT_ROUNDS
from fedbrats.federated.tracking import DEFAULT_TRACKING, check_tracking
from fedbrats.networks import network_class_path
from fedbrats.utils import deep_merge

#: The training options every exported job lists (the rest take their defaults at the sites).
RECIPE_OPTIONS: tuple[str, ...] = (
    "method",
    "method_args",
    "epochs_per_round",
    "lr",
    "lr_schedule",
    "weight_decay",
    "num_threads",
    "precision",
)
RECIPE_DATA_OPTIONS: tuple[str, ...] = ("roi_size", "batch_size", "modality_dropout")


def _recipe() -> dict[str, Any]:
    """The options every job shares unless it overrides them: the training config classes' defaults
    (:class:`~fedbrats.federated.client.trainer.TrainConfig`, :class:`~fedbrats.data.loader.DataConfig`), where the
    recipe and the runs behind it are documented."""
    config = TrainConfig()
    training = {name: copy.deepcopy(getattr(config, name)) for name in RECIPE_OPTIONS}
    training["data"] = {name: getattr(config.data, name) for name in RECIPE_DATA_OPTIONS}
    training["data"]["roi_size"] = list(training["data"]["roi_size"])
    return training


#: Options every job shares unless it overrides them (from the config classes' defaults).
BASE_TRAINING: dict[str, Any] = _recipe()
BASE_NETWORK: dict[str, Any] = {"name": "segresnet", "args": {"init_filters": 8}}

#: Every job, from the method modules (each declares its jobs' network, aggregation and training defaults; see
#: :mod:`fedbrats.federated.methods`).
JOBS: dict[str, dict[str, Any]] = METHOD_JOBS


#: Seconds a client waits after sending a result before asking the server for its next task (NVFlare's default
#: is 2 s). Every round waits for it: the next round's task is ready well before a site asks again, so a shorter
#: interval removes about a second of idle time per round (benchmarks/README.md); idle sites poll a little more.
TASK_REQUEST_INTERVAL = 0.5


@dataclass(frozen=True)
class JobSpec:
    """One job with every default resolved: what :class:`fedbrats.recipe.FedBratsRecipe` turns into NVFlare
    components.

    Attributes:
        name: the job's name (a key of :data:`JOBS`).
        description: one line for ``meta.json``.
        num_rounds: federated rounds.
        min_clients: usable updates a round needs (0: every site).
        seed: seed of the run (the server's initial model; the sites' data order, crops, augmentation, dropout).
        training: the sites' training options (:class:`fedbrats.federated.client.trainer.TrainConfig`).
        network: the server's network as ``{"path": ..., "args": ...}`` (what the persistor builds).
        aggregation: the aggregation strategy as ``{"path": ..., "args": ...}``.
        controller_args: further arguments of the controller (e.g. ``resume_from``).
        privacy: site-side privacy filters (see :func:`job_spec`).
        compression: the SVD compression filters' arguments (``energy_start``, ``energy_end``, ``num_rounds``;
            see :mod:`fedbrats.federated.compression`), None: no compression.
        key_metric: the validation score by which the best global model is kept (higher is better).
        tracking: where the server sends the run's curves, ``tensorboard`` or ``mlflow``
            (:mod:`fedbrats.federated.tracking`).
        tracking_uri: the MLflow tracking store (empty: NVFlare's default, ``mlflow.db`` in the job's result
            folder); only with ``mlflow``.
        cross_site_eval: the arguments of the federated (cross-site) evaluation that ends the job
            (:class:`~fedbrats.federated.server.cross_site.FedBratsCrossSiteEval`); None: the job has none.
    """

    name: str
    description: str
    num_rounds: int
    min_clients: int
    seed: int
    training: dict[str, Any]
    network: dict[str, Any]
    aggregation: dict[str, Any]
    controller_args: dict[str, Any] = field(default_factory=dict)
    privacy: dict[str, Any] = field(default_factory=dict)
    compression: dict[str, Any] | None = None
    key_metric: str = KEY_METRIC
    tracking: str = DEFAULT_TRACKING
    tracking_uri: str = ""
    cross_site_eval: dict[str, Any] | None = None


def compression_args(
    default: dict[str, Any] | None, choice: dict[str, Any] | bool | None, num_rounds: int
) -> dict[str, Any] | None:
    """The SVD filters' arguments (None: no compression) from the job's default and the caller's choice.

    Raises:
        ValueError: an option other than ``energy_start``, ``energy_end``, ``error_feedback`` and ``bits``, or
            values out of range.
    """
    if choice is None:
        choice = default if default is not None else False
    if choice is False:
        return None
    if choice is True:
        choice = default or {}
    from fedbrats.federated.compression.codec import (
        DEFAULT_ENERGY_END,
        DEFAULT_ENERGY_START,
        check_bits,
        check_energies,
    )

    unknown = sorted(set(choice) - {"energy_start", "energy_end", "error_feedback", "bits"})
    if unknown:
        raise ValueError(f"compression takes energy_start, energy_end, error_feedback and bits, got {unknown}")
    args = {"energy_start": DEFAULT_ENERGY_START, "energy_end": DEFAULT_ENERGY_END, "error_feedback": False, **choice}
    check_energies(args["energy_start"], args["energy_end"])
    if "bits" in args:  # float factors (32) unless asked: a job's configuration names it only when it quantises
        check_bits(args["bits"])
    if not isinstance(args["error_feedback"], bool):
        raise ValueError(f"compression error_feedback must be true or false, got {args['error_feedback']!r}")
    return {**args, "num_rounds": num_rounds}


@dataclass(frozen=True)
class JobOptions:
    """Everything that makes one run of a job, built once (from the command line or a driver) and passed whole to
    the recipe (:class:`fedbrats.recipe.FedBratsRecipe`), the simulator runner (:func:`fedbrats.simulate.simulate`)
    and the experiment drivers; :meth:`spec` resolves it against the job's defaults.

    Attributes:
        job: a key of :data:`JOBS`.
        num_rounds: federated rounds.
        training: training options that replace the defaults (nested dicts are merged), e.g.
            ``{"epochs_per_round": 1}`` (``--set``).
        aggregation_args: override arguments of the aggregation strategy (e.g. ``{"modality_aware": False}``).
        network_args: override arguments of the job's network (e.g. ``{"init_filters": 16}``).
        seed: seed of the run: the server's initial model and each site's data order, crops, augmentation and
            sequence dropout (offset per site). The one place a job's seed is set.
        min_clients: usable updates a round needs (default: the job's; 0 means every site).
        controller_args: further controller arguments (e.g. ``{"resume_from": run_dir, "train_timeout": 600}``).
        privacy: site-side privacy filters: ``{"prototypes": {"clip_norm": 1.0, "noise_multiplier": 1.0}}`` (FedKD's
            filter on its prototypes) and/or ``{"weights": {"path": "nvflare.app_common.filters.svt_privacy.
            SVTPrivacy", "args": {...}}}`` (an NVFlare filter on weight differences; sites then send differences).
        compression: SVD-compressed updates both ways (:mod:`fedbrats.federated.compression`): ``True`` or a dict
            of energies (``{"energy_start": 0.95, "energy_end": 0.98}``) turns it on, ``False`` off, None keeps
            the job's default. Sites then send weight differences.
        tracking: where the server sends every site's and its own curves: ``tensorboard`` (event files in the run
            folder) or ``mlflow`` (needs the package's ``mlflow`` extra at the server).
        tracking_uri: the MLflow tracking store, e.g. ``http://mlflow.example.org:5000`` (empty: an SQLite file in
            the server's job result folder).
        cross_site_eval: end the job with the federated (cross-site) evaluation of its models on every site's test
            cases, where the job's method has one (default); False: skip it.

    Raises:
        ValueError: ``job`` is not a job, or ``num_rounds`` is not an integer >= 1.
    """

    job: str
    num_rounds: int = DEFAULT_ROUNDS
    training: Mapping[str, Any] = field(default_factory=dict)
    aggregation_args: Mapping[str, Any] = field(default_factory=dict)
    network_args: Mapping[str, Any] = field(default_factory=dict)
    seed: int = 0
    min_clients: int | None = None
    controller_args: Mapping[str, Any] = field(default_factory=dict)
    privacy: Mapping[str, Any] = field(default_factory=dict)
    compression: Mapping[str, Any] | bool | None = None
    tracking: str = DEFAULT_TRACKING
    tracking_uri: str = ""
    cross_site_eval: bool = True

    def __post_init__(self) -> None:
        if self.job not in JOBS:
            raise ValueError(f"job must be one of {sorted(JOBS)}, got {self.job!r}")
        if isinstance(self.num_rounds, bool) or not isinstance(self.num_rounds, int) or self.num_rounds < 1:
            raise ValueError(f"num_rounds must be an integer >= 1, got {self.num_rounds!r}")

    def replace(self, **changes: Any) -> JobOptions:
        """A copy with ``changes`` (field names)."""
        return dataclasses.replace(self, **changes) if changes else self

    def spec(self) -> JobSpec:
        """The job with every default resolved."""
        return job_spec(self)


def job_spec(options: JobOptions | str, **changes: Any) -> JobSpec:
    """A job with the defaults of this module and its method, and the options' overrides.

    Args:
        options: the run's :class:`JobOptions`, or a job's name (its defaults).
        changes: fields of :class:`JobOptions` to change (e.g. ``num_rounds=2``; None values are left out).

    Raises:
        ValueError: an unknown job, bad ``compression`` options, an unknown ``tracking``, or a ``tracking_uri``
            without ``mlflow``.
    """
    changes = {k: v for k, v in changes.items() if v is not None}
    options = JobOptions(options, **changes) if isinstance(options, str) else options.replace(**changes)
    name, tracking, tracking_uri = options.job, options.tracking, options.tracking_uri
    check_tracking(tracking)
    if tracking_uri and tracking != "mlflow":
        raise ValueError(f"tracking_uri is an MLflow store; it needs tracking='mlflow', got tracking={tracking!r}")
    spec = JOBS[name]
    merged_training = deep_merge(deep_merge(BASE_TRAINING, spec.get("training", {})), dict(options.training))
    merged_training["seed"] = options.seed
    network = deep_merge(deep_merge(BASE_NETWORK, spec.get("network", {})), {"args": dict(options.network_args)})
    return JobSpec(
        name=name,
        description=spec["description"],
        num_rounds=options.num_rounds,
        min_clients=spec["min_clients"] if options.min_clients is None else options.min_clients,
        seed=options.seed,
        training=merged_training,
        network={"path": network_class_path(network["name"]), "args": network["args"]},
        aggregation=deep_merge(spec["aggregation"], {"args": dict(options.aggregation_args)}),
        controller_args=dict(options.controller_args),
        privacy=dict(options.privacy),
        compression=compression_args(spec.get("compression"), options.compression, options.num_rounds),
        key_metric=spec.get("key_metric", KEY_METRIC),
        tracking=tracking,
        tracking_uri=tracking_uri,
        cross_site_eval=dict(spec["cross_site_eval"]) if options.cross_site_eval and spec["cross_site_eval"] else None,
    )
