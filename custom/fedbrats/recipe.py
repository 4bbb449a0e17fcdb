"""Every job as an NVFlare 2.9 job recipe: one definition, run in ``SimEnv``, ``PocEnv`` or ``ProdEnv``, or exported.

:class:`FedBratsRecipe` builds a job from :func:`fedbrats.jobgen.job_spec` (the defaults of the common training
recipe and of the method) with NVFlare's Job API; ``recipe.export(out_dir)`` writes the job folder, and the
committed folders under ``jobs/`` are exactly that export with the defaults (:func:`write_all_jobs`, run by
``fedbrats make-jobs``; a test checks it). ``python -m fedbrats.job`` runs a recipe in the three environments.

The export rebuilds every component from its attributes named like its constructor's arguments (and leaves out
arguments equal to their default), so the components added here keep their arguments under their own names;
:func:`built_component` checks that for classes named by a path.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import tempfile
from collections.abc import Mapping
from typing import Any

from nvflare.apis.analytix import ANALYTIC_EVENT_TYPE
from nvflare.app_common.widgets.convert_to_fed_event import ConvertToFedEvent
from nvflare.app_common.widgets.streaming import AnalyticsReceiver
from nvflare.app_opt.pt.file_model_locator import PTFileModelLocator
from nvflare.app_opt.pt.file_model_persistor import PTFileModelPersistor
from nvflare.app_opt.tracking.tb.tb_receiver import TBAnalyticsReceiver
from nvflare.fuel.utils.class_utils import instantiate_class
from nvflare.job_config.api import FedJob
from nvflare.job_config.defs import FilterType
from nvflare.recipe.spec import Recipe

import fedbrats.federated.methods  # noqa: F401 - registers the methods' own networks and strategies
from fedbrats.federated.client.executor import FedBratsExecutor
from fedbrats.federated.client.trainer import TrainConfig
from fedbrats.federated.compression import SVDBroadcastCompressor, SVDDecompressor, SVDUpdateCompressor
from fedbrats.federated.filters import PayloadAuditFilter
from fedbrats.federated.methods.fedkd.privacy import PrototypePrivacyFilter
from fedbrats.federated.server.aggregation import STRATEGIES
from fedbrats.federated.server.controller import FedBratsController
from fedbrats.federated.server.cross_site import FedBratsCrossSiteEval
from fedbrats.federated.server.selection import BestModelSelector
from fedbrats.federated.tracking import MLFLOW_EXPERIMENT, check_tracking
from fedbrats.jobgen import JOBS, TASK_REQUEST_INTERVAL, JobOptions, JobSpec, job_spec
from fedbrats.runs import PAYLOAD_AUDIT_IN_FILE
from fedbrats.utils import deep_merge

logger = logging.getLogger(__name__)

#: The package whose classes the jobs name: installed at every site, so never copied into a job's ``app/custom``.
PACKAGE = "fedbrats"
#: The tasks a site's executor answers.
CLIENT_TASKS = ["train", "validate", "submit_model"]
#: The tasks whose weights the SVD compression and the privacy filters handle. ``submit_model`` (a site's own
#: model for the cross-site evaluation) goes whole and audited: a lossy or noised copy would score another model.
FILTERED_TASKS = ["train", "validate"]
#: Prefix of the site events NVFlare forwards to the server (the sites' tracking records).
FED_EVENT_PREFIX = "fed."
#: What the server's tracking receiver handles: the sites' records (forwarded events) and the server's own (the
#: global model's aggregate, a local event), see :mod:`fedbrats.federated.tracking`.
TRACKING_EVENTS = [ANALYTIC_EVENT_TYPE, FED_EVENT_PREFIX + ANALYTIC_EVENT_TYPE]
#: What every job's ``app/custom`` holds: a README and no code. NVFlare treats a job with ``app/custom`` as
#: bring-your-own-code and then skips the sites' class allow-lists (see the file, and docs/deployment.md).
APP_CUSTOM_README = os.path.join(os.path.dirname(os.path.abspath(__file__)), "app_custom", "README.md")

_MISSING = object()


def tracking_receiver(tracking: str, job_name: str, tracking_uri: str = "") -> AnalyticsReceiver:
    """The server's receiver of every site's and its own curves (see :mod:`fedbrats.federated.tracking`).

    Args:
        tracking: ``tensorboard`` (NVFlare's TensorBoard receiver: ``tb_events/<site>/`` in the run folder) or
            ``mlflow`` (:class:`~fedbrats.federated.server.mlflow_receiver.FedBratsMLflowReceiver`: experiment
            ``fedbrats``, one run per site and one for the server, named after the site, job id and job).
        job_name: the job (an MLflow tag of every run).
        tracking_uri: the MLflow store (empty: NVFlare's default, ``mlflow.db`` in the job's result folder).

    Raises:
        ValueError: an unknown ``tracking``, or ``mlflow`` without the ``mlflow`` package (the extra:
            ``pip install 'fedbrats[mlflow]'``).
    """
    if check_tracking(tracking) == "tensorboard":
        return TBAnalyticsReceiver(events=list(TRACKING_EVENTS))
    try:
        from fedbrats.federated.server.mlflow_receiver import FedBratsMLflowReceiver
    except ImportError as e:
        raise ValueError(
            f"tracking='mlflow' needs the mlflow package ({e}); install the extra: pip install 'fedbrats[mlflow]'"
        ) from e
    # Tags given explicitly: NVFlare's receiver prints a notice for every tag mapping it is not given.
    kw_args = {
        "experiment_name": MLFLOW_EXPERIMENT,
        "run_name": MLFLOW_EXPERIMENT,  # NVFlare names a run "<site>-<job id>-<job name>-<run_name>"
        "experiment_tags": {"mlflow.note.content": "fedbrats federated runs (one MLflow run per site and server)"},
        "run_tags": {"fedbrats.job": job_name},
    }
    return FedBratsMLflowReceiver(tracking_uri=tracking_uri or None, kw_args=kw_args, events=list(TRACKING_EVENTS))


def built_component(spec: Mapping[str, Any], build: Any = instantiate_class) -> Any:
    """Build a component from ``{"path": ..., "args": {...}}`` and check that a job export keeps its arguments.

    Args:
        spec: the class path and constructor arguments.
        build: ``build(path, args)`` returns the instance (default: NVFlare's ``instantiate_class``; the
            aggregation strategies go through their registry).

    Raises:
        ValueError: the class does not store an argument under its own name (or ``_name``), so the exported job
            would silently lose it.
    """
    path, args = spec["path"], dict(spec.get("args", {}))
    obj = build(path, args)
    lost = sorted(
        key
        for key, value in args.items()
        if getattr(obj, key, getattr(obj, f"_{key}", _MISSING)) != value  # as NVFlare's export reads it
    )
    if lost:
        raise ValueError(
            f"{path} does not keep constructor argument(s) {lost} under their own names: an exported job would "
            "lose them; wrap the class so that it stores each argument as an attribute of the same name"
        )
    return obj


def update_bounds(training: Mapping[str, Any]) -> dict[str, int]:
    """What an honest site can report in a round of a job with these training options (the server's checks of
    every update, :class:`fedbrats.federated.server.update_checks.UpdateBounds`)."""
    config = TrainConfig.from_dict(dict(training))
    return {
        "epochs_per_round": config.epochs_per_round,
        "batch_size": config.data.batch_size,
        "max_steps_per_epoch": config.max_steps_per_epoch,
        "voxels_per_item": int(math.prod(config.data.roi_size)),
    }


class FedBratsRecipe(Recipe):
    """One fedbrats job (any method of :data:`fedbrats.jobgen.JOBS`) as an NVFlare job recipe.

    The job has one app for the server and every site (``app/``, deployed to ``@ALL``): the server runs
    :class:`~fedbrats.federated.server.controller.FedBratsController` with the job's aggregation strategy, a
    PyTorch persistor of the job's network, NVFlare's best-model selector and model locator, and the tracking
    receiver (:func:`tracking_receiver`: TensorBoard or MLflow); each site runs
    :class:`~fedbrats.federated.client.executor.FedBratsExecutor` (NVFlare's Client API executor, in-process, with
    the package's training script), forwards its tracking records and passes every result through the optional
    privacy filters and then the payload audit. ``app/custom`` holds a README only, or is left out (``byoc``).

    With compression (``JobSpec.compression``, :mod:`fedbrats.federated.compression`) the sites send weight
    differences; the server compresses what it sends (``SVDBroadcastCompressor``) and rebuilds what it receives
    (``SVDDecompressor``); each site audits what arrives (``payload_audit_in.jsonl``) and rebuilds it, and
    compresses its update after the privacy filters, before the audit. Every filter chain is one task's: each
    task's compressor/decompressor pair is its own (NVFlare builds each chain's filters anew), so the training
    rounds share one view per site and the final validation, another task, gets the full model.

    Args:
        options: the run's :class:`~fedbrats.jobgen.JobOptions`, or a job's name (a key of
            :data:`fedbrats.jobgen.JOBS`) for its defaults.
        deploy_min_clients: sites that must be connected before the job is deployed (``meta.json``'s
            ``min_clients``; default the job's ``min_clients``, at least 1). A job that needs every site
            (``min_clients`` 0) cannot know how many there are: a PoC, which submits while its sites still connect,
            sets it to its number of sites.
        byoc: give the job its ``app/custom`` folder (a README, no code), so that NVFlare treats it as
            bring-your-own-code: the sites then skip their class allow-lists, and the submitter needs the BYOC
            right. NVFlare's simulator and PoC check the classes of a job without it against NVFlare's built-in
            list, which lacks ``fedbrats.``, so the committed jobs keep it. ``False``: the production default, for
            sites that list ``fedbrats.`` in their ``class_allow_list`` and grant no BYOC right
            (docs/deployment.md).
        changes: fields of :class:`~fedbrats.jobgen.JobOptions` to change (``num_rounds``, ``training``, ...).
    """

    def __init__(
        self,
        options: JobOptions | str,
        *,
        deploy_min_clients: int | None = None,
        byoc: bool = True,
        **changes: Any,
    ) -> None:
        self.spec: JobSpec = job_spec(options, **changes)
        job = FedJob(
            name=self.spec.name,
            min_clients=deploy_min_clients or max(1, self.spec.min_clients),
            meta_props={"description": self.spec.description},
        )
        job.set_app_packages([PACKAGE])
        self._add_server(job, self.spec)
        if byoc:
            job.add_file_to_server(APP_CUSTOM_README)
        self._add_clients(job, self.spec)
        super().__init__(job)

    @staticmethod
    def _add_server(job: FedJob, spec: JobSpec) -> None:
        controller = FedBratsController(
            num_rounds=spec.num_rounds,
            min_clients=spec.min_clients,
            seed=spec.seed,
            key_metric=spec.key_metric,
            update_bounds=update_bounds(spec.training),
            **spec.controller_args,
        )
        job.to_server(controller, id="controller")
        if spec.cross_site_eval is not None:
            # After the training: every model scored at every site on its own test cases (NVFlare's workflow).
            job.to_server(FedBratsCrossSiteEval(**spec.cross_site_eval), id="cross_site_eval")
        job.to_server(PTFileModelPersistor(model=spec.network), id=controller.persistor_id)
        job.to_server(built_component(spec.aggregation, STRATEGIES.build), id=controller.aggregation_id)
        job.to_server(BestModelSelector(key_metric=spec.key_metric), id="model_selector")
        job.to_server(PTFileModelLocator(pt_persistor_id=controller.persistor_id), id="model_locator")
        receiver_id = "tb_receiver" if spec.tracking == "tensorboard" else "mlflow_receiver"
        job.to_server(tracking_receiver(spec.tracking, spec.name, spec.tracking_uri), id=receiver_id)
        job.to_server({"server": {"task_request_interval": TASK_REQUEST_INTERVAL}})
        if spec.compression is not None:
            for task in FILTERED_TASKS:
                # The downlink always feeds its error back (the server's per-site views); the option is the uplink's.
                broadcast = {k: v for k, v in spec.compression.items() if k != "error_feedback"}
                job.to_server(SVDBroadcastCompressor(**broadcast), filter_type=FilterType.TASK_DATA, tasks=[task])
                job.to_server(SVDDecompressor(), filter_type=FilterType.TASK_RESULT, tasks=[task])

    @staticmethod
    def _add_clients(job: FedJob, spec: JobSpec) -> None:
        weights_filter = spec.privacy.get("weights")
        svd = spec.compression
        # NVFlare's filters on weights act on differences to the global model, and so does the SVD compression of
        # an update: the sites then send differences.
        diff = bool(weights_filter) or svd is not None
        executor = FedBratsExecutor(training=spec.training, params_transfer_type="DIFF" if diff else "FULL")
        job.to_clients(executor, tasks=list(CLIENT_TASKS))
        job.to_clients(
            ConvertToFedEvent(events_to_convert=[ANALYTIC_EVENT_TYPE], fed_event_prefix=FED_EVENT_PREFIX),
            id="event_to_fed",
        )
        result_filters = []
        if weights_filter:
            result_filters.append(built_component(weights_filter))
        if "prototypes" in spec.privacy:
            result_filters.append(PrototypePrivacyFilter(**spec.privacy["prototypes"]))
        if svd is not None:
            # After the privacy filters (they act on the update itself), before the audit (it sees the wire).
            result_filters.append(SVDUpdateCompressor(**svd))
        # The audit comes last, so it records exactly what leaves the site. One chain per task: NVFlare 2.9 looks a
        # result's filters up by its exact task name (a chain for "*", the Job API's default, matches no task),
        # and the Job API keeps a chain's tasks in a set, whose order would change from one export to the next.
        for task in CLIENT_TASKS:
            if task not in FILTERED_TASKS:
                job.to_clients(PayloadAuditFilter(), filter_type=FilterType.TASK_RESULT, tasks=[task])
                continue
            if svd is not None:
                # What arrives is audited before anything decodes it; the decompressor keeps the site's view.
                job.to_clients(
                    PayloadAuditFilter(file_name=PAYLOAD_AUDIT_IN_FILE), filter_type=FilterType.TASK_DATA, tasks=[task]
                )
                job.to_clients(SVDDecompressor(), filter_type=FilterType.TASK_DATA, tasks=[task])
            for result_filter in [*result_filters, PayloadAuditFilter()]:
                job.to_clients(result_filter, filter_type=FilterType.TASK_RESULT, tasks=[task])


#: The tasks a site answers in an evaluation-only job.
EVALUATION_TASKS = ["validate", "submit_model"]
#: The name of the evaluation-only job.
EVALUATION_JOB = "cross_site_eval"


class CrossSiteEvaluationRecipe(Recipe):
    """The federated (cross-site) evaluation of finished models, on demand, as its own NVFlare job.

    The server runs :class:`~fedbrats.federated.server.cross_site.FedBratsCrossSiteEval` with the given model
    files; each site runs the package's executor, which scores each model on the site's own test cases
    (:mod:`fedbrats.federated.client.site_evaluation`) with the preprocessing the models were trained with, and
    passes every result through the payload audit. Nothing is trained.

    Args:
        models: model name -> checkpoint file on the server's machine (with its network spec beside it, as a run
            folder or an exported bundle keeps it).
        training: the sites' options (:class:`~fedbrats.federated.client.trainer.TrainConfig`): ``data``'s ``zoom``
            and ``roi_size`` (the training crop, also the sliding window) as the models were trained, and e.g.
            ``val_overlap``, ``precision``, ``min_test_cases``.
        tracking: where the server sends the summary (``tensorboard`` or ``mlflow``).
        tracking_uri: the MLflow store (only with ``mlflow``).
        deploy_min_clients: see :class:`FedBratsRecipe`.
        byoc: see :class:`FedBratsRecipe`.
    """

    def __init__(
        self,
        models: Mapping[str, str],
        training: Mapping[str, Any],
        *,
        tracking: str = "tensorboard",
        tracking_uri: str = "",
        deploy_min_clients: int | None = None,
        byoc: bool = True,
    ) -> None:
        if not models:
            raise ValueError("models must name at least one model file to evaluate")
        check_tracking(tracking)
        training = dict(training)
        TrainConfig.from_dict(training)  # the sites' rules, checked before anything is submitted
        job = FedJob(
            name=EVALUATION_JOB,
            min_clients=deploy_min_clients or 1,
            meta_props={"description": f"cross-site evaluation of {sorted(models)} on every site's test cases"},
        )
        job.set_app_packages([PACKAGE])
        job.to_server(FedBratsCrossSiteEval(models=dict(models)), id="cross_site_eval")
        receiver_id = "tb_receiver" if tracking == "tensorboard" else "mlflow_receiver"
        job.to_server(tracking_receiver(tracking, EVALUATION_JOB, tracking_uri), id=receiver_id)
        job.to_server({"server": {"task_request_interval": TASK_REQUEST_INTERVAL}})
        if byoc:
            job.add_file_to_server(APP_CUSTOM_README)
        job.to_clients(FedBratsExecutor(training=training), tasks=list(EVALUATION_TASKS))
        job.to_clients(
            ConvertToFedEvent(events_to_convert=[ANALYTIC_EVENT_TYPE], fed_event_prefix=FED_EVENT_PREFIX),
            id="event_to_fed",
        )
        for task in EVALUATION_TASKS:
            # What leaves a site is audited, as in training (one chain per task: see FedBratsRecipe).
            job.to_clients(PayloadAuditFilter(), filter_type=FilterType.TASK_RESULT, tasks=[task])
        super().__init__(job)


def write_job(
    name: str | JobOptions,
    out_dir: str,
    *,
    deploy_min_clients: int | None = None,
    byoc: bool = True,
    **options: Any,
) -> str:
    """Export a job into ``out_dir/<job>`` and return that folder.

    Args:
        name: the job's :class:`~fedbrats.jobgen.JobOptions`, or its name.
        out_dir: where the job folder goes.
        deploy_min_clients: see :class:`FedBratsRecipe`.
        byoc: see :class:`FedBratsRecipe`.
        options: fields of :class:`~fedbrats.jobgen.JobOptions` (``num_rounds``, ``privacy``, ``tracking``, ...); any
            other is a training-option override (nested dicts are merged), e.g. ``epochs_per_round=1``.
    """
    job_options = JobOptions(name) if isinstance(name, str) else name
    fields = {f.name for f in dataclasses.fields(JobOptions)} - {"job"}
    changes = {key: value for key, value in options.items() if key in fields}
    training = {key: value for key, value in options.items() if key not in fields}
    if training:
        changes["training"] = deep_merge(dict(changes.get("training") or job_options.training), training)
    recipe = FedBratsRecipe(job_options, deploy_min_clients=deploy_min_clients, byoc=byoc, **changes)
    recipe.export(out_dir)
    return os.path.join(out_dir, recipe.spec.name)


def write_all_jobs(out_dir: str) -> list[str]:
    """Export every job of :data:`fedbrats.jobgen.JOBS` with its defaults (what ``jobs/`` in the repository holds)."""
    return [write_job(name, out_dir) for name in sorted(JOBS)]


def job_files(name: str, **kwargs: Any) -> dict[str, bytes]:
    """The files of job ``name`` (arguments as :func:`write_job`) by their path in the job folder."""
    with tempfile.TemporaryDirectory(prefix="fedbrats_job_") as tmp:
        job_dir = write_job(name, tmp, **kwargs)
        files = {}
        for root, _, names in os.walk(job_dir):
            for file_name in names:
                path = os.path.join(root, file_name)
                with open(path, "rb") as f:
                    files[os.path.relpath(path, job_dir)] = f.read()
        return files


# ---- the make-jobs command --------------------------------------------------------------------------------------
#: What ``fedbrats make-jobs`` does (its ``--help``).
MAKE_JOBS_DESCRIPTION = "(Re)write the job folders: the export of each job's recipe."


def edited_job_files(out_dir: str) -> list[str]:
    """Files under ``out_dir`` that ``make-jobs`` would change: hand edits it would silently revert."""
    changed = []
    for name in sorted(JOBS):
        for rel, content in job_files(name).items():
            path = os.path.join(out_dir, name, rel)
            if not os.path.isfile(path):
                continue
            with open(path, "rb") as f:
                text = f.read()
            try:
                same = text == content or json.loads(text) == json.loads(content)
            except json.JSONDecodeError:
                same = False
            if not same:
                changed.append(path)
    return changed


def add_make_jobs_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``fedbrats make-jobs`` options."""
    parser.add_argument("--out-dir", default="jobs")
    parser.add_argument(
        "--force", action="store_true", help="rewrite job files that differ from the recipes' export (hand edits)"
    )


def run_make_jobs(args: argparse.Namespace) -> int:
    """Run ``fedbrats make-jobs``: refuse to revert hand edits unless ``--force``."""
    edited = [] if args.force else edited_job_files(args.out_dir)
    if edited:
        raise ValueError(
            f"make-jobs would revert {len(edited)} edited job file(s): {edited}. Put the change in "
            "custom/fedbrats/jobgen.py (the defaults) or custom/fedbrats/recipe.py (the components), or pass --force "
            "to discard the edits"
        )
    for path in write_all_jobs(args.out_dir):
        logger.info("wrote %s", path)
    return 0
