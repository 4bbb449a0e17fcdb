"""Job folders, defined once here and written by ``fedbrats make-jobs``.

The committed folders under ``jobs/`` are exactly what :func:`write_job` produces (a test checks it), so an
option lives in one place and a job holds configuration only; the code comes from the installed package.
"""

from __future__ import annotations

import json
import os
from typing import Any

from fedbrats.federated.methods import JOBS as METHOD_JOBS
from fedbrats.federated.protocol import KEY_METRIC, PAYLOAD_AUDIT_IN_FILE
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

DEFAULT_ROUNDS = 10

#: Seconds a client waits after sending a result before asking the server for its next task (NVFlare's default
#: is 2 s). Every round waits for it: the next round's task is ready well before a site asks again, so a shorter
#: interval removes about a second of idle time per round (benchmarks/README.md); idle sites poll a little more.
TASK_REQUEST_INTERVAL = 0.5

# NVFlare treats a job with app/custom as bring-your-own-code and then skips the site's class allow-list;
# without it, every fedbrats class must be on each site's allow-list. The folder holds no code on purpose.
CUSTOM_README = """This folder is intentionally free of code.

The job's classes come from the `fedbrats` package installed at every site (`pip install` of the project).
NVFlare treats a job that has an `app/custom` folder as bring-your-own-code: the submitter needs that right,
and the site's class allow-list is not consulted. To run without it, delete this folder and add `fedbrats.`
to `class_allow_list` in each site's `local/resources.json` (see docs/deployment.md in the project).
"""


#: The tasks of every job (the executor and the filters handle all three).
TASKS = ["train", "validate", "submit_model"]
_SVD = "fedbrats.federated.compression"


def _compression_args(
    default: dict[str, Any] | None, choice: dict[str, Any] | bool | None, num_rounds: int
) -> dict[str, Any] | None:
    """The SVD filters' arguments (None: no compression) from the job's default and the caller's choice."""
    if choice is None:
        choice = default if default is not None else False
    if choice is False:
        return None
    if choice is True:
        choice = default or {}
    from fedbrats.federated.compression import DEFAULT_ENERGY_END, DEFAULT_ENERGY_START, check_energies

    unknown = sorted(set(choice) - {"energy_start", "energy_end"})
    if unknown:
        raise ValueError(f"compression takes energy_start and energy_end, got {unknown}")
    args = {"energy_start": DEFAULT_ENERGY_START, "energy_end": DEFAULT_ENERGY_END, **choice}
    check_energies(args["energy_start"], args["energy_end"])
    return {**args, "num_rounds": num_rounds}


def job_configs(
    name: str,
    num_rounds: int = DEFAULT_ROUNDS,
    aggregation_args: dict[str, Any] | None = None,
    min_clients: int | None = None,
    controller_args: dict[str, Any] | None = None,
    privacy: dict[str, Any] | None = None,
    seed: int = 0,
    network_args: dict[str, Any] | None = None,
    compression: dict[str, Any] | bool | None = None,
    **training_overrides: Any,
) -> dict[str, Any]:
    """The three files of job ``name``: ``meta.json``, server and client configs, as dicts.

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
        compression: SVD-compressed updates both ways (:mod:`fedbrats.federated.compression`): ``True`` or a dict
            of energies (``{"energy_start": 0.95, "energy_end": 0.98}``) turns it on, ``False`` off, None keeps
            the job's default. Sites then send weight differences.
        training_overrides: replace training options (nested dicts are merged), e.g. ``epochs_per_round=1``.
    """
    if name not in JOBS:
        raise ValueError(f"job must be one of {sorted(JOBS)}, got {name!r}")
    spec = JOBS[name]
    training = deep_merge(deep_merge(BASE_TRAINING, spec.get("training", {})), training_overrides)
    training["seed"] = seed
    network = deep_merge(deep_merge(BASE_NETWORK, spec.get("network", {})), {"args": network_args or {}})
    aggregation = deep_merge(spec["aggregation"], {"args": aggregation_args or {}})
    min_clients = spec["min_clients"] if min_clients is None else min_clients
    meta = {
        "name": name,
        "description": spec["description"],
        "resource_spec": {},
        "deploy_map": {"app": ["@ALL"]},
        "min_clients": max(1, min_clients),
    }
    server = {
        "format_version": 2,
        "server": {"task_request_interval": TASK_REQUEST_INTERVAL},
        "workflows": [
            {
                "id": "controller",
                "path": "fedbrats.federated.server.controller.FedBratsController",
                "args": {
                    "num_rounds": num_rounds,
                    "min_clients": min_clients,
                    "seed": seed,
                    **(controller_args or {}),
                },
            }
        ],
        "components": [
            {
                "id": "persistor",
                "path": "nvflare.app_opt.pt.file_model_persistor.PTFileModelPersistor",
                "args": {"model": {"path": network_class_path(network["name"]), "args": network["args"]}},
            },
            {"id": "aggregation", **aggregation},
            {
                "id": "model_selector",
                "path": "nvflare.app_common.widgets.intime_model_selector.IntimeModelSelector",
                "args": {"key_metric": KEY_METRIC},
            },
            {
                "id": "model_locator",
                "path": "nvflare.app_opt.pt.file_model_locator.PTFileModelLocator",
                "args": {"pt_persistor_id": "persistor"},
            },
            {
                "id": "tb_receiver",
                "path": "nvflare.app_opt.tracking.tb.tb_receiver.TBAnalyticsReceiver",
                "args": {"events": ["fed.analytix_log_stats"]},
            },
        ],
    }
    privacy = privacy or {}
    result_filters: list[dict[str, Any]] = []
    if "weights" in privacy:
        result_filters.append(privacy["weights"])
    if "prototypes" in privacy:
        result_filters.append(
            {"path": "fedbrats.federated.filters.PrototypePrivacyFilter", "args": privacy["prototypes"]}
        )
    svd = _compression_args(spec.get("compression"), compression, num_rounds)
    data_filters: list[dict[str, Any]] = []
    if svd is not None:
        # Privacy filters act on the update first; the audits see exactly what crosses the wire, both ways.
        result_filters.append({"path": f"{_SVD}.SVDUpdateCompressor", "args": svd})
        data_filters = [
            {"path": "fedbrats.federated.filters.PayloadAuditFilter", "args": {"file_name": PAYLOAD_AUDIT_IN_FILE}},
            {"path": f"{_SVD}.SVDDecompressor", "args": {}},
        ]
        server["task_data_filters"] = [
            {"tasks": TASKS, "filters": [{"path": f"{_SVD}.SVDBroadcastCompressor", "args": svd}]}
        ]
        server["task_result_filters"] = [{"tasks": TASKS, "filters": [{"path": f"{_SVD}.SVDDecompressor", "args": {}}]}]
    # The audit comes last, so it records exactly what leaves the site.
    result_filters.append({"path": "fedbrats.federated.filters.PayloadAuditFilter", "args": {}})
    executor_args: dict[str, Any] = {"training": training}
    if "weights" in privacy or svd is not None:
        executor_args["params_transfer_type"] = "DIFF"
    client = {
        "format_version": 2,
        "executors": [
            {
                "tasks": TASKS,
                "executor": {
                    "path": "fedbrats.federated.client.executor.FedBratsExecutor",
                    "args": executor_args,
                },
            }
        ],
        "components": [
            {
                "id": "event_to_fed",
                "path": "nvflare.app_common.widgets.convert_to_fed_event.ConvertToFedEvent",
                "args": {"events_to_convert": ["analytix_log_stats"], "fed_event_prefix": "fed."},
            }
        ],
        "task_data_filters": [{"tasks": TASKS, "filters": data_filters}] if data_filters else [],
        "task_result_filters": [{"tasks": TASKS, "filters": result_filters}],
    }
    return {
        "meta.json": meta,
        os.path.join("app", "custom", "README.md"): CUSTOM_README,
        os.path.join("app", "config", "config_fed_server.json"): server,
        os.path.join("app", "config", "config_fed_client.json"): client,
    }


def write_job(
    name: str,
    out_dir: str,
    num_rounds: int = DEFAULT_ROUNDS,
    aggregation_args: dict[str, Any] | None = None,
    min_clients: int | None = None,
    controller_args: dict[str, Any] | None = None,
    privacy: dict[str, Any] | None = None,
    seed: int = 0,
    network_args: dict[str, Any] | None = None,
    compression: dict[str, Any] | bool | None = None,
    **training_overrides: Any,
) -> str:
    """Write job ``name`` into ``out_dir/name`` (arguments as :func:`job_configs`) and return that folder."""
    job_dir = os.path.join(out_dir, name)
    for rel, content in job_configs(
        name,
        num_rounds,
        aggregation_args,
        min_clients,
        controller_args,
        privacy,
        seed,
        network_args,
        compression,
        **training_overrides,
    ).items():
        path = os.path.join(job_dir, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            if isinstance(content, str):
                f.write(content)
            else:
                json.dump(content, f, indent=2)
                f.write("\n")
    return job_dir


def write_all_jobs(out_dir: str) -> list[str]:
    """Write every job of :data:`JOBS` with its defaults (what ``jobs/`` in the repository holds)."""
    return [write_job(name, out_dir) for name in sorted(JOBS)]
