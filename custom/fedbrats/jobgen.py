"""Every job's defaults, defined once here: the common training recipe and each method's job.

:func:`job_spec` resolves a job with its overrides; :class:`fedbrats.recipe.FedBratsRecipe` turns that into an
NVFlare 2.9 job recipe, whose export is what the committed folders under ``jobs/`` hold (``fedbrats make-jobs``;
a test checks it), so an option lives in one place and a job holds configuration only; the code comes from the
installed package.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fedbrats.federated.methods import JOBS as METHOD_JOBS
from fedbrats.federated.protocol import KEY_METRIC
from fedbrats.federated.tracking import DEFAULT_TRACKING, check_tracking
from fedbrats.networks import network_class_path
from fedbrats.utils import deep_merge

#: Options every job shares unless it overrides them.
#: The recipe (docs/results.md, "Training recipe", has the runs behind each choice): Dice + BCE (the methods'
#: default), poly learning rate over the whole run from 3e-3, bfloat16 where the CPU/GPU runs it natively,
#: tumour-centred crops, and sequence dropout at every site so that each model is trained for the subsets of
#: its sequences it will be asked about (the pooled centralized site thus sees all 15 combinations).
BASE_TRAINING: dict[str, Any] = {
    "method": "fedavg",
    "method_args": {},
    "epochs_per_round": 10,
    "lr": 3e-3,
    "lr_schedule": "poly",
    "weight_decay": 1e-5,
    "num_threads": 1,
    "precision": "auto",
    "data": {"roi_size": [32, 32, 32], "batch_size": 2, "modality_dropout": 0.5},
}
BASE_NETWORK: dict[str, Any] = {"name": "segresnet", "args": {"init_filters": 8}}

#: Every job, from the method modules (each declares its jobs' network, aggregation and training defaults; see
#: :mod:`fedbrats.federated.methods`).
JOBS: dict[str, dict[str, Any]] = METHOD_JOBS

#: Rounds of every job unless overridden. 13, not 10: the main job (``jobs/fedkd`` on the synthetic default) ended at
#: a final validation mean Dice of 0.684 / 0.710 / 0.710 with 10 rounds (seeds 0, 1, 2) and 0.743 / 0.749 / 0.744
#: with 13, in 2 min 44 s on 2 idle cores (docs/results.md, "Training recipe"). The comparisons on the results
#: page pass their rounds explicitly (``--rounds 10``).
DEFAULT_ROUNDS = 13

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
    from fedbrats.federated.compression import DEFAULT_ENERGY_END, DEFAULT_ENERGY_START, check_bits, check_energies

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


def job_spec(
    name: str,
    num_rounds: int = DEFAULT_ROUNDS,
    aggregation_args: dict[str, Any] | None = None,
    min_clients: int | None = None,
    controller_args: dict[str, Any] | None = None,
    privacy: dict[str, Any] | None = None,
    seed: int = 0,
    network_args: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None,
    compression: dict[str, Any] | bool | None = None,
    tracking: str = DEFAULT_TRACKING,
    tracking_uri: str = "",
) -> JobSpec:
    """Job ``name`` with the defaults of this module and its method, and the given overrides.

    Args:
        name: a key of :data:`JOBS`.
        num_rounds: federated rounds.
        aggregation_args: override arguments of the aggregation strategy (e.g. ``{"modality_aware": False}``).
        min_clients: usable updates a round needs (default: the job's; 0 means every site).
        controller_args: further controller arguments (e.g. ``{"resume_from": run_dir, "train_timeout": 600}``).
        privacy: site-side privacy filters: ``{"prototypes": {"clip_norm": 1.0, "noise_multiplier": 1.0}}`` (our
            filter on FedKD's prototypes) and/or ``{"weights": {"path": "nvflare.app_common.filters.svt_privacy.
            SVTPrivacy", "args": {...}}}`` (an NVFlare filter on weight differences; sites then send differences).
        seed: seed of the run: the server's initial model and each site's data order, crops, augmentation and
            sequence dropout (offset per site). The one place a job's seed is set.
        network_args: override arguments of the job's network (e.g. ``{"init_filters": 16}``).
        training: training options that replace the defaults (nested dicts are merged), e.g.
            ``{"epochs_per_round": 1}``.
        compression: SVD-compressed updates both ways (:mod:`fedbrats.federated.compression`): ``True`` or a dict
            of energies (``{"energy_start": 0.95, "energy_end": 0.98}``) turns it on, ``False`` off, None keeps
            the job's default. Sites then send weight differences.
        tracking: where the server sends every site's and its own curves: ``tensorboard`` (event files in the run
            folder) or ``mlflow`` (needs the package's ``mlflow`` extra at the server).
        tracking_uri: the MLflow tracking store, e.g. ``http://mlflow.example.org:5000`` (empty: an SQLite file in
            the server's job result folder).

    Raises:
        ValueError: ``name`` is not a job, bad ``compression`` options, an unknown ``tracking``, or a
            ``tracking_uri`` without ``mlflow``.
    """
    if name not in JOBS:
        raise ValueError(f"job must be one of {sorted(JOBS)}, got {name!r}")
    check_tracking(tracking)
    if tracking_uri and tracking != "mlflow":
        raise ValueError(f"tracking_uri is an MLflow store; it needs tracking='mlflow', got tracking={tracking!r}")
    spec = JOBS[name]
    merged_training = deep_merge(deep_merge(BASE_TRAINING, spec.get("training", {})), training or {})
    merged_training["seed"] = seed
    network = deep_merge(deep_merge(BASE_NETWORK, spec.get("network", {})), {"args": network_args or {}})
    return JobSpec(
        name=name,
        description=spec["description"],
        num_rounds=num_rounds,
        min_clients=spec["min_clients"] if min_clients is None else min_clients,
        seed=seed,
        training=merged_training,
        network={"path": network_class_path(network["name"]), "args": network["args"]},
        aggregation=deep_merge(spec["aggregation"], {"args": aggregation_args or {}}),
        controller_args=dict(controller_args or {}),
        privacy=dict(privacy or {}),
        compression=compression_args(spec.get("compression"), compression, num_rounds),
        key_metric=spec.get("key_metric", KEY_METRIC),
        tracking=tracking,
        tracking_uri=tracking_uri,
    )
