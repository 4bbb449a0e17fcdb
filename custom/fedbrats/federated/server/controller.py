"""The server's round controller (an NVFlare ``ModelController``) with pluggable aggregation."""

from __future__ import annotations

import json
import math
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from nvflare.apis.analytix import ANALYTIC_EVENT_TYPE, AnalyticsDataType
from nvflare.apis.utils.analytix_utils import create_analytic_dxo, send_analytic_dxo
from nvflare.app_common.abstract.fl_model import FLModel
from nvflare.app_common.abstract.model import make_model_learnable
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.app_event_type import AppEventType
from nvflare.app_common.workflows.model_controller import ModelController

import fedbrats.federated.methods  # noqa: F401 - registers the methods' own networks and strategies
from fedbrats.federated.events import (
    AGGREGATION_DONE,
    FINAL_VALIDATION,
    JOB_ERROR,
    JOB_STOP,
    RESULT_RECEIVED,
    RESULTS_COLLECTED,
    ROUND_END,
    ROUND_START,
    RUN_END,
    RUN_START,
    TASK_DISPATCHED,
    RoundEventWriter,
)
from fedbrats.federated.memory import SERVER_GC_ROUNDS, release_memory
from fedbrats.federated.protocol import (
    KEY_METRIC,
    LOSS_TERMS_KEY,
    MODALITIES_KEY,
    NUM_STEPS_KEY,
    NUM_TRAIN_CASES_KEY,
    SITE_ERROR_KEY,
    SITE_ERROR_MAX_CHARS,
    SITE_NAME_KEY,
    TRAIN_LOSS_KEY,
    UPDATE_PROBLEM_KEY,
    global_task_meta,
    update_weight,
)
from fedbrats.federated.server.aggregation import AggregationStrategy, SiteUpdate
from fedbrats.federated.server.update_checks import (
    UpdateBounds,
    base_items_problem,
    metrics_problem,
    update_problem,
)
from fedbrats.federated.tracking import global_scalars
from fedbrats.networks import build_from_spec, model_spec
from fedbrats.runs import RunFolder
from fedbrats.scoring.postprocess import choose_min_component_voxels, write_postprocessing

#: Rounds of every job unless overridden (the jobs list it from here). 13, not 10: chosen by an earlier session on the
#: main job's validation scores over three seeds (docs/results.md, "Training recipe"; today's three seeds with 13
#: rounds: docs/results/main-job). The comparisons on the results page pass their rounds explicitly (``--rounds 10``).
DEFAULT_ROUNDS = 13


class FedBratsController(ModelController):
    """Runs the rounds: send the global model and extras, collect, check, aggregate, save, select the best.

    Args:
        num_rounds: training rounds.
        min_clients: usable updates a round needs; a site that fails or is late is left out of that round
            (and named in the log) as long as this many arrive. 0 means every site.
        aggregation_id: id of the :class:`AggregationStrategy` component in the server config.
        train_timeout: seconds a round waits for updates (0: no limit).
        wait_time_after_min_received: seconds to wait for late sites once ``min_clients`` updates arrived.
        final_validation: after the last round, have the sites score the final global model, so that it
            takes part in best-model selection too.
        resume_from: a previous run's folder (the server's run dir, or a copy of it): continue from its last
            saved global model, round counter and server state (prototypes); at most the interrupted round is
            redone. Best-model selection starts afresh.
        persistor_id: id of the model persistor component.
        memory_gc_rounds: the server returns freed memory to the operating system after every round and also
            collects garbage cycles every this many rounds (0: never); see :mod:`fedbrats.federated.memory`.
        seed: seed of the initial global model (None: the persistor's unseeded initialisation). With the
            sites' training ``seed`` it makes a run repeatable on the same machine.
        max_empty_rounds: stop the job (it fails, with each site's reason) after this many consecutive rounds
            without a usable update. The first round of a run stops it at once when it has none: no site could
            even start, so the remaining rounds would only repeat the failure and end in a "successful" job.
    """

    #: Written into an exported job even where equal to the default (NVFlare's Job API otherwise leaves defaults
    #: out): the settings a reader of the job, or a tool that edits it (``deploy``'s ``num_rounds``), looks for.
    _always_serialize_args = ("num_rounds", "min_clients", "seed", "update_bounds")

    def __init__(
        self,
        num_rounds: int = DEFAULT_ROUNDS,
        min_clients: int = 0,
        aggregation_id: str = "aggregation",
        train_timeout: int = 0,
        wait_time_after_min_received: int = 10,
        final_validation: bool = True,
        resume_from: str = "",
        persistor_id: str = "persistor",
        memory_gc_rounds: int = SERVER_GC_ROUNDS,
        seed: int | None = None,
        max_empty_rounds: int = 3,
        key_metric: str = KEY_METRIC,
        update_bounds: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(persistor_id=persistor_id, ignore_result_error=True)
        if num_rounds < 1:
            raise ValueError(f"num_rounds must be >= 1, got {num_rounds}")
        if min_clients < 0:
            raise ValueError(f"min_clients must be >= 0, got {min_clients}")
        if memory_gc_rounds < 0:
            raise ValueError(f"memory_gc_rounds must be >= 0, got {memory_gc_rounds}")
        if max_empty_rounds < 1:
            raise ValueError(f"max_empty_rounds must be >= 1, got {max_empty_rounds}")
        self.max_empty_rounds = max_empty_rounds
        self.num_rounds = num_rounds
        self.min_clients = min_clients
        self.aggregation_id = aggregation_id
        self.train_timeout = train_timeout
        self.wait_time_after_min_received = wait_time_after_min_received
        self.final_validation = final_validation
        self.resume_from = resume_from
        self.persistor_id = persistor_id
        self.memory_gc_rounds = memory_gc_rounds
        self.seed = seed
        self.key_metric = key_metric
        self.update_bounds = dict(update_bounds or {})
        self.bounds = UpdateBounds.from_dict(self.update_bounds)
        self.strategy: AggregationStrategy | None = None
        self.history: list[dict[str, Any]] = []
        self._events: RoundEventWriter | None = None
        self._round: int | None = None  # the round in progress, for the events of a stop or an error

    # ---- the workflow -------------------------------------------------------------------------------------
    def run(self) -> None:
        """The workflow (see the class docstring); its progress goes to ``round_events.jsonl`` as well as the log."""
        self._events = RoundEventWriter(RunFolder(self.get_run_dir()).round_events)
        self._round = None
        try:
            self._run()
        except Exception as exc:
            # Followers learn that the job failed without reading the log (NVFlare logs the traceback).
            self._event(JOB_ERROR, error=f"{type(exc).__name__}: {exc}")
            raise

    def _run(self) -> None:
        strategy = self.get_component(self.aggregation_id)
        if not isinstance(strategy, AggregationStrategy):
            self._stop(f"component {self.aggregation_id!r} must be an AggregationStrategy, got {type(strategy)}")
            return
        self.strategy = strategy
        model = self.load_model()
        spec = self._model_spec()
        global_params = {k: _to_numpy(v) for k, v in model.params.items()}
        if self.seed is not None:
            global_params = _seeded_initial_params(spec, self.seed)
        # Saved models hold weights only; this file says which network they belong to (for evaluation/export).
        with open(RunFolder(self.get_run_dir()).model_spec, "w", encoding="utf-8") as f:
            json.dump(spec, f, indent=2)
        start_round = 0
        if self.resume_from:
            global_params, start_round = self._resume(global_params, spec)
        self._set_global_model(global_params)
        self.info(f"start: {self.num_rounds} rounds, aggregation {strategy.name}, model {spec['path']}")
        self._event(
            RUN_START,
            num_rounds=self.num_rounds,
            aggregation=strategy.name,
            model=spec["path"],
            resumed_from=self.resume_from or None,
        )
        self.fl_ctx.set_prop(AppConstants.NUM_ROUNDS, self.num_rounds, private=True, sticky=False)

        empty_rounds = 0
        any_update = False
        for current_round in range(start_round, self.num_rounds):
            if self.abort_signal and self.abort_signal.triggered:
                self._event(JOB_STOP, reason="aborted")
                return
            started = time.monotonic()
            self._round = current_round
            self.fl_ctx.set_prop(AppConstants.CURRENT_ROUND, current_round, private=True, sticky=True)
            self.event(AppEventType.ROUND_STARTED)
            targets = self.sample_clients()
            strategy.begin_round(current_round)
            self.info(f"round {current_round}/{self.num_rounds - 1}: sending the global model to {targets}")
            self._event(ROUND_START, targets=list(targets))
            results = self._collect("train", self._outgoing(global_params, spec, current_round), targets, global_params)
            updates, record = self._accept(results, targets, current_round)
            self._collected("train", record)
            self.event(AppEventType.BEFORE_AGGREGATION)  # the model selector judges the model just scored
            if updates:
                global_params = strategy.aggregate(global_params, updates, current_round)
                self._set_global_model(global_params)
                self.save_model(FLModel(params=dict(global_params)))
                self._save_extras(updates)
                self._event(AGGREGATION_DONE, sites=[u.site_name for u in updates])
                any_update, empty_rounds = True, 0
            else:
                self.error(f"round {current_round}: no usable update; the global model is unchanged")
                empty_rounds += 1
            record["seconds"] = round(time.monotonic() - started, 2)
            self._record(record)
            self._event(ROUND_END, seconds=record["seconds"], aggregated=record["aggregated"])
            if empty_rounds and (not any_update or empty_rounds >= self.max_empty_rounds):
                self._stop(no_update_message(record, empty_rounds, any_update, self.max_empty_rounds))
                return
            self.event(AppEventType.ROUND_DONE)
            del results, updates
            release_memory(current_round + 1, self.memory_gc_rounds)

        if self.final_validation:
            self._validate_final(global_params, spec)
        self.info(f"finished {self.num_rounds} rounds; results in {self.get_run_dir()}")
        self._event(RUN_END, num_rounds=self.num_rounds)

    # ---- progress events ----------------------------------------------------------------------------------
    def _event(self, event: str, **fields: Any) -> None:
        """Write a progress event of the round in progress (see :mod:`fedbrats.federated.events`)."""
        if self._events is not None:
            self._events.write(event, self._round, **fields)

    def _stop(self, reason: str) -> None:
        """Stop the job (NVFlare's panic: the job fails) with ``reason``, recorded as an event first."""
        self._event(JOB_STOP, reason=reason)
        self.panic(reason)

    def _collected(self, task_name: str, record: dict[str, Any]) -> None:
        """The event of a task's results being in: usable sites, rejected ones (with why) and silent ones."""
        self._event(
            RESULTS_COLLECTED,
            task=task_name,
            usable=sorted(record["sites"]),
            rejected=dict(record["rejected"]),
            left_out=list(record["left_out"]),
        )

    # ---- helpers ------------------------------------------------------------------------------------------
    def _model_spec(self) -> dict[str, Any]:
        net = getattr(self.persistor, "model", None)
        if not isinstance(net, torch.nn.Module):
            raise ValueError("the persistor must hold a fedbrats network (PTFileModelPersistor with 'model')")
        return model_spec(net)

    def _resume(self, params: dict[str, np.ndarray], spec: dict[str, Any]) -> tuple[dict[str, np.ndarray], int]:
        """Load the last saved global model, the completed rounds and the strategy's state of a previous run."""
        assert self.strategy is not None
        run_dir = self.resume_from
        previous = RunFolder(run_dir)
        model_file, metrics_file = previous.global_model, previous.metrics
        for path in (model_file, metrics_file):
            if not os.path.isfile(path):
                raise ValueError(f"resume_from={run_dir!r}: {path} is missing; point it at the server's run folder")
        with open(previous.model_spec, encoding="utf-8") as f:
            old_spec = json.load(f)
        if old_spec != spec:
            raise ValueError(f"resume_from={run_dir!r} holds a {old_spec['path']} with other arguments than this job")
        # Weights only, and a refusal that never suggests loading the file unsafely (see load_state_dict).
        from fedbrats.runs import load_state_dict

        state = load_state_dict(model_file)
        if set(state) != set(params):
            raise ValueError(f"resume_from={run_dir!r}: the saved weights do not fit this job's model")
        with open(metrics_file, encoding="utf-8") as f:
            history = [r for r in json.load(f) if not r.get("final_validation")]
        self.history = history
        start_round = history[-1]["round"] + 1 if history else 0
        state_file = previous.server_state
        if os.path.isfile(state_file):
            with np.load(state_file) as saved:
                self.strategy.load_state({k: saved[k] for k in saved.files})
        self.info(f"resuming from {run_dir}: {len(history)} round(s) done, continuing at round {start_round}")
        return {k: _to_numpy(v) for k, v in state.items()}, start_round

    def _min_responses(self, targets: list[str]) -> int:
        return min(self.min_clients, len(targets)) if self.min_clients else len(targets)

    def _collect(
        self, task_name: str, data: FLModel, targets: list[str], global_params: dict[str, np.ndarray] | None
    ) -> list[_Checked]:
        """Send a task and gather results until ``min_clients`` USABLE ones arrived (then wait
        ``wait_time_after_min_received`` for the rest), every site answered, or ``train_timeout`` passed.

        NVFlare's own min_responses counts a site's error as a response, so a crashed site could end a round
        before a healthy one answers; counting usable results here keeps healthy sites in the round. Each result
        is checked once, as it arrives (``global_params`` None: a validation task, whose weights are not used).
        """
        results: list[_Checked] = []
        usable = 0
        lock = threading.Lock()
        arrived = threading.Event()

        def _on_result(result: FLModel) -> bool:
            nonlocal usable
            checked = self._check(result, global_params)
            with lock:
                results.append(checked)
                usable += int(checked.problem is None)
            arrived.set()
            self._event(
                RESULT_RECEIVED,
                task=task_name,
                site=checked.name,
                usable=checked.problem is None,
                reason=checked.problem,
            )
            return True

        need = self._min_responses(targets)
        # Before sending: a fast site's result must not be recorded ahead of its task.
        self._event(TASK_DISPATCHED, task=task_name, targets=list(targets))
        for group, group_data in self._task_groups(data, targets, training=global_params is not None):
            self.send_model(
                task_name=task_name,
                data=group_data,
                targets=group,
                min_responses=len(group),
                timeout=self.train_timeout,
                callback=_on_result,
            )
        reached_at = None
        while self.get_num_standing_tasks() > 0:
            if self.abort_signal and self.abort_signal.triggered:
                break
            arrived.clear()  # before reading: a result arriving after this read wakes the wait below at once
            with lock:
                n_usable, n_results = usable, len(results)
            if n_results >= len(targets):
                break
            if n_usable >= need:
                reached_at = reached_at or time.monotonic()
                if time.monotonic() - reached_at >= self.wait_time_after_min_received:
                    break
            arrived.wait(0.2)
        if self.get_num_standing_tasks() > 0:
            self.cancel_all_tasks()  # late sites are left out of this round; they get the next one
        with lock:
            collected = list(results)
            # NVFlare's task objects reference each other (a cycle) and keep this callback, and so the list,
            # until a full garbage collection: emptied, it no longer holds a round of sites' weights (16 FedAvg
            # updates, about 75 MB, in the 16-site load run).
            results.clear()
        return collected

    def _task_groups(self, data: FLModel, targets: list[str], training: bool) -> list[tuple[list[str], FLModel]]:
        """The task per group of targets: the strategy may add extras for some sites of a training task
        (:meth:`AggregationStrategy.task_groups`); otherwise one task for every target."""
        assert self.strategy is not None
        if not training:
            return [(list(targets), data)]
        groups = self.strategy.task_groups(list(targets))
        if sorted(name for group, _ in groups for name in group) != sorted(targets):
            raise ValueError(
                f"{type(self.strategy).__name__}.task_groups must place every target of {targets} once, got "
                f"{[group for group, _ in groups]}"
            )
        tasks = []
        for group, extras in groups:
            if group and not extras:
                tasks.append((list(group), data))
            elif group:
                meta = {**data.meta, **extras}
                own = FLModel(
                    params=data.params, current_round=data.current_round, total_rounds=data.total_rounds, meta=meta
                )
                tasks.append((list(group), own))
        return tasks

    def _outgoing(self, params: dict[str, np.ndarray], spec: dict[str, Any], current_round: int) -> FLModel:
        assert self.strategy is not None
        meta = global_task_meta(spec, self.strategy.keep_local_weights, self.strategy.global_meta())
        # numpy on the wire: the clients' exchange format converts to torch (tensors here would need streaming).
        return FLModel(
            params=dict(params),
            current_round=current_round,
            total_rounds=self.num_rounds,
            meta=meta,
        )

    def _check(self, result: FLModel, global_params: dict[str, np.ndarray] | None) -> _Checked:
        """A site's result as full weights, its declared extras and metrics, and why it is unusable (or None).

        Nothing a site sends can raise here: whatever is malformed in a way no check names is rejected too, with
        the error as the reason, and the round goes on.
        """
        try:
            return self._checked(result, global_params)
        except Exception as exc:  # a malformed result must reject that result, never stop the job
            name = _site_name(result)
            return _Checked(name, {}, {}, {}, f"malformed result ({type(exc).__name__}: {str(exc)[:200]})")

    def _checked(self, result: FLModel, global_params: dict[str, np.ndarray] | None) -> _Checked:
        assert self.strategy is not None
        strategy = self.strategy
        name = _site_name(result)
        meta = _site_meta(result.meta)
        if meta.get(SITE_ERROR_KEY):
            # The site could not do the task and said why (see train_script): its reason goes into the record.
            return _Checked(name, {}, {}, {}, f"the site failed: {str(meta[SITE_ERROR_KEY])[:SITE_ERROR_MAX_CHARS]}")
        if meta.get(UPDATE_PROBLEM_KEY):
            # A server-side filter found the payload malformed before the controller saw it (e.g. its compression).
            return _Checked(name, {}, {}, {}, str(meta[UPDATE_PROBLEM_KEY])[:SITE_ERROR_MAX_CHARS])
        metrics = dict(result.metrics or {})
        problem = metrics_problem(metrics)
        if problem:
            return _Checked(name, {}, {}, {}, problem)
        metrics = {k: float(v) for k, v in metrics.items()}
        if global_params is None:
            return _Checked(name, {}, meta, metrics, None)
        problem = base_items_problem(meta, self.bounds)
        if problem:
            return _Checked(name, {}, meta, metrics, problem)
        modalities = tuple(meta[MODALITIES_KEY])
        params, problem = _full_params(result, global_params)
        problem = problem or update_problem(
            global_params,
            params,
            meta,
            set(strategy.accepted_meta_keys),
            may_omit=lambda key: strategy.may_omit(key, modalities),
            bounds=self.bounds,
            extras_problem=strategy.extras_problem,
        )
        return _Checked(name, params, meta, metrics, problem)

    def _accept(
        self, results: list[_Checked], targets: list[str], current_round: int
    ) -> tuple[list[SiteUpdate], dict[str, Any]]:
        updates: list[SiteUpdate] = []
        rejected: dict[str, str] = {}
        sites: dict[str, Any] = {}
        # Sorted by site, so that aggregation sums in the same order whatever order the results arrived in.
        for result in sorted(results, key=lambda r: r.name):
            name, params, meta, metrics, problem = (
                result.name,
                result.params,
                result.meta,
                result.metrics,
                result.problem,
            )
            if problem:
                rejected[name] = problem
                self.warning(f"round {current_round}: rejected the update of {name}: {problem}")
                continue
            weight = update_weight(meta)
            updates.append(SiteUpdate(name, params, meta, metrics, weight))
            sites[name] = {
                "metrics": metrics,
                "train_loss": meta.get(TRAIN_LOSS_KEY),
                "loss_terms": meta.get(LOSS_TERMS_KEY),
                "num_steps": meta.get(NUM_STEPS_KEY),
                "modalities": meta.get(MODALITIES_KEY),
            }
            loss = meta.get(TRAIN_LOSS_KEY, float("nan"))
            score = metrics.get(self.key_metric, float("nan"))
            mods = ",".join(meta.get(MODALITIES_KEY, []))
            self.info(f"round {current_round}: {name} ({mods}) loss {loss:.4f}, {self.key_metric} {score:.3f}")
        responded = {u.site_name for u in updates} | set(rejected)
        left_out = sorted(set(targets) - responded)
        if left_out:
            self.warning(
                f"round {current_round}: no update from {left_out}; aggregating the {len(updates)} that arrived"
            )
        record = {
            "round": current_round,
            "sites": sites,
            "aggregated": _weighted_metrics(updates),
            "left_out": left_out,
            "rejected": rejected,
        }
        return updates, record

    def _set_global_model(self, params: dict[str, np.ndarray]) -> None:
        # Empty meta: the saved checkpoint must load with torch.load(weights_only=True).
        learnable = make_model_learnable(weights=dict(params), meta_props={})
        self.fl_ctx.set_prop(AppConstants.GLOBAL_MODEL, learnable, private=True, sticky=True)

    def _save_extras(self, updates: list[SiteUpdate]) -> None:
        assert self.strategy is not None
        run = RunFolder(self.get_run_dir())
        state = self.strategy.state()
        if state:
            np.savez(run.server_state, **{k: np.asarray(v) for k, v in state.items()})
        if self.strategy.keep_local_weights:
            os.makedirs(run.site_models, exist_ok=True)
            for u in updates:
                weights = {k: torch.as_tensor(v) for k, v in u.params.items()}
                torch.save({"model": weights}, run.site_model(u.site_name))

    def _record(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        agg = record["aggregated"]
        self.info(
            f"round {record['round']} done in {record['seconds']}s: {self.key_metric} "
            f"{agg.get(self.key_metric, float('nan')):.3f} over {len(record['sites'])} site(s)"
        )
        path = RunFolder(self.get_run_dir()).metrics
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.history, f, indent=2, default=_json_default)
        os.replace(tmp, path)
        self._track(record)

    def _track(self, record: dict[str, Any]) -> None:
        """Log the global model's aggregate validation of a round to the job's tracking receiver (TensorBoard or
        MLflow, :mod:`fedbrats.federated.tracking`), stepped by the round as the sites' curves are.

        A local event, under the server's name: the receiver files the sites' forwarded records under theirs.
        """
        for tag, value in global_scalars(record).items():
            dxo = create_analytic_dxo(tag, value, AnalyticsDataType.SCALAR, global_step=int(record["round"]))
            with self.engine.new_context() as fl_ctx:
                send_analytic_dxo(self, dxo, fl_ctx, event_type=ANALYTIC_EVENT_TYPE)

    def _validate_final(self, params: dict[str, np.ndarray], spec: dict[str, Any]) -> None:
        final_round = self.num_rounds
        self._round = final_round
        self.fl_ctx.set_prop(AppConstants.CURRENT_ROUND, final_round, private=True, sticky=True)
        targets = self.sample_clients()
        self.info(f"final validation of the global model on {targets}")
        self._event(FINAL_VALIDATION, targets=list(targets))
        results = self._collect("validate", self._outgoing(params, spec, final_round), targets, None)
        sites = {}
        for r in results:
            sites[r.name] = {"metrics": r.metrics}
        self.event(AppEventType.BEFORE_AGGREGATION)
        updates = [SiteUpdate(n, {}, {}, s["metrics"], 1.0) for n, s in sites.items()]
        aggregated = _weighted_metrics(updates)
        record = {
            "round": final_round,
            "final_validation": True,
            "sites": sites,
            "aggregated": aggregated,
            "left_out": sorted(set(targets) - set(sites)),
            "rejected": {},
            "seconds": 0.0,
        }
        self._collected("validate", record)
        self._record(record)
        choice = choose_min_component_voxels(aggregated)
        if len(choice["scores"]) > 1:  # the sites scored post-processing candidates
            choice["chosen_on"] = "the sites' validation cases, final global model, mean over sites"
            write_postprocessing(self.get_run_dir(), choice)
            self.info(
                f"post-processing: remove components under {choice['min_component_voxels']} voxels "
                f"(validation mean Dice by size: {choice['scores']})"
            )


def no_update_message(record: dict[str, Any], empty_rounds: int, any_update: bool, limit: int) -> str:
    """Why the job stops after rounds without a usable update, with each site's reason (from a round's record)."""
    reasons = dict(record.get("rejected") or {})
    for site in record.get("left_out") or []:
        reasons.setdefault(site, "sent nothing (it failed or was too slow; see its log)")
    why = "; ".join(f"{site}: {reason}" for site, reason in sorted(reasons.items())) or "no site took part"
    if any_update:
        when = f"{empty_rounds} consecutive rounds (max_empty_rounds={limit}) brought no usable update"
    else:
        when = f"round {record['round']}, the first of this run, brought no usable update"
    return f"stopping the job: {when}, so training cannot go on. Sites: {why}"


# Keys NVFlare itself adds to a result's meta on the way (not sent by the site's method).
_NVFLARE_META_KEYS = {
    "current_round",
    "total_rounds",
    "CURRENT_ROUND",
    "TOTAL_ROUNDS",
    "JOB_ID",
    "SITE_NAME",
    "initial_metrics",
    "props",
}


@dataclass
class _Checked:
    """A site's result after the server's checks (``problem`` None means usable)."""

    name: str
    params: dict[str, np.ndarray]
    meta: dict[str, Any]
    metrics: dict[str, float]
    problem: str | None


def _full_params(result: FLModel, global_params: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], str | None]:
    """A site's weights as full weights, and why they cannot be (or None): sites that send differences (for
    NVFlare's privacy filters on weight differences) have them added to the global model they started from, each
    only after its shape is found to be the global weight's (a broadcast could allocate without bound)."""
    raw = result.params or {}
    if not isinstance(raw, Mapping):
        return {}, f"the weights must be a mapping of names to arrays, got {type(raw).__name__}"
    params = {k: _to_numpy(v) for k, v in raw.items()}
    if str(getattr(result.params_type, "value", result.params_type)) != "DIFF":
        return params, None
    for key, value in params.items():
        if key in global_params and value.shape != global_params[key].shape:
            return params, f"weight difference {key!r} has shape {value.shape}, expected {global_params[key].shape}"
        if value.dtype.kind != "f":
            return params, f"weight difference {key!r} must hold floating-point numbers, got {value.dtype}"
    return {k: global_params[k] + v if k in global_params else v for k, v in params.items()}, None


def _site_name(result: FLModel) -> str:
    meta = result.meta or {}
    return str(meta.get("client_name") or meta.get(SITE_NAME_KEY) or "?")


def _site_meta(meta: dict[str, Any] | None) -> dict[str, Any]:
    """What the site itself sent: the meta without the items NVFlare adds on the way."""
    return {
        k: v
        for k, v in (meta or {}).items()
        if not k.startswith("_") and k not in _NVFLARE_META_KEYS and k != "client_name"
    }


def _seeded_initial_params(spec: dict[str, Any], seed: int) -> dict[str, np.ndarray]:
    """Initial weights of the network ``spec`` describes, drawn with ``seed`` (the global RNG is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = build_from_spec(spec)
    return {k: _to_numpy(v) for k, v in net.state_dict().items()}


def _to_numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, bool)


def _weighted_metrics(updates: list[SiteUpdate]) -> dict[str, float]:
    """Validation metrics averaged over sites, weighted by each site's number of training cases."""
    sums: dict[str, float] = {}
    totals: dict[str, float] = {}
    for u in updates:
        w = float(u.meta.get(NUM_TRAIN_CASES_KEY, 1) or 1)
        for k, v in u.metrics.items():
            if math.isfinite(v):
                sums[k] = sums.get(k, 0.0) + w * v
                totals[k] = totals.get(k, 0.0) + w
    return {k: sums[k] / totals[k] for k in sums}


def _json_default(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return str(value)
