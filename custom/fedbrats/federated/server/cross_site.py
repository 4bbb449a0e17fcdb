"""The federated (cross-site) evaluation: every model scored at every site, on the site's own test cases.

:class:`FedBratsCrossSiteEval` is NVFlare's :class:`~nvflare.app_common.workflows.cross_site_eval.CrossSiteEval`
(its ``submit_model`` and ``validate`` tasks, its result callbacks and its ``cross_site_val/cross_val_results.json``,
``{site: {model: metrics}}``), with what fedbrats needs beyond it:

- the models: the run's final and best global models, or, for local-only training (whose global model stays the
  untrained initial one), the sites' own models the server holds (``site_models/``), read as weights only (never
  unpickled objects) with the run's network spec; or given model files (the on-demand evaluation of a finished run
  or an exported bundle). NVFlare's workflow asks its persistor, which knows one network and no site models. A job
  whose sites keep models of their own (FedMIC's personalised model, which never leaves the site during training)
  also asks each site for it (``submit_model``), with its network's spec, and sends it to every other site;
- each model goes with its network's spec, so a site builds it without having trained (an evaluation-only job), and
  is marked (:data:`~fedbrats.federated.protocol.CROSS_SITE_MODEL_KEY`) so that the site scores it on its test cases
  (:mod:`fedbrats.federated.client.site_evaluation`), not on its validation cases, and the SVD compression lets it
  pass whole;
- a site's failure is named, per model, in ``cross_site_errors.json`` and the others' results stand (NVFlare's
  workflow would stop the job on a site's error result); a result holding anything but the declared aggregate test
  metrics is refused (only aggregates may leave a site);
- at the end the server writes the matrix (markdown, heatmap, summary JSON; :mod:`fedbrats.federated.server.
  cross_site_report`) and sends its summary to the job's tracking receiver (TensorBoard or MLflow).
"""

from __future__ import annotations

import glob
import json
import math
import os
import time
from typing import Any

import numpy as np
import torch
from nvflare.apis.analytix import ANALYTIC_EVENT_TYPE, AnalyticsDataType
from nvflare.apis.utils.analytix_utils import create_analytic_dxo, send_analytic_dxo
from nvflare.app_common.abstract.fl_model import FLModel
from nvflare.app_common.app_constant import AppConstants, ModelName
from nvflare.app_common.workflows.cross_site_eval import CrossSiteEval

import fedbrats.federated.methods  # noqa: F401 - registers the methods' own networks
from fedbrats.federated.protocol import (
    CROSS_SITE_MODEL_KEY,
    MODEL_SPEC_KEY,
    SITE_ERROR_KEY,
    SITE_ERROR_MAX_CHARS,
    TEST_PREFIX,
    cross_site_params,
)
from fedbrats.federated.server.cross_site_report import (
    cross_site_scalars,
    write_cross_site_report,
)
from fedbrats.runs import (
    BEST_GLOBAL_MODEL_FILE,
    CROSS_SITE_DIR,
    GLOBAL_MODEL_FILE,
    RunFolder,
    find_model_spec,
    load_state_dict,
    spec_from_json,
)
from fedbrats.utils import write_json_atomic

#: The name of the server's models in the results (NVFlare's checkpoint names, as its own workflow uses them).
FINAL_MODEL = GLOBAL_MODEL_FILE
BEST_MODEL = BEST_GLOBAL_MODEL_FILE


class FedBratsCrossSiteEval(CrossSiteEval):
    """Score every model at every site on the site's own test cases (see the module docstring).

    Args:
        models: model name -> checkpoint file (a global model, a site's model or an exported ``model.pt``), each
            with its network spec found beside it (:func:`fedbrats.runs.find_model_spec`). Empty (the default):
            this run's models (:func:`run_model_files`).
        submit_site_models: also ask every site for its own model (``submit_model``) and score it everywhere.
        participating_clients: the sites (default: every site connected when the workflow starts).
        submit_model_timeout: seconds to wait for a site's own model.
        validation_timeout: seconds to wait for a site's scores of one model (0: no limit).
        write_report: write the matrix, heatmap and summary next to ``cross_val_results.json`` at the end.
    """

    def __init__(
        self,
        models: dict[str, str] | None = None,
        submit_site_models: bool = False,
        participating_clients: list[str] | None = None,
        submit_model_timeout: int = 600,
        validation_timeout: int = 6000,
        write_report: bool = True,
    ) -> None:
        super().__init__(
            cross_val_dir=CROSS_SITE_DIR,
            submit_model_timeout=submit_model_timeout,
            validation_timeout=validation_timeout,
            server_models=[],
            participating_clients=participating_clients,
            ignore_result_error=True,  # a site's error result is recorded, never the end of the job
            persistor_id="",  # the models come from files (see _server_model_files), not a persistor
        )
        if not isinstance(models, (dict, type(None))) or any(
            not isinstance(k, str) or not isinstance(v, str) for k, v in (models or {}).items()
        ):
            raise ValueError(f"models must map model names to checkpoint files, got {models!r}")
        self.models = dict(models) if models else None
        self.submit_site_models = submit_site_models
        self.write_report = write_report
        self._errors: dict[str, dict[str, str]] = {}

    # ---- the workflow -------------------------------------------------------------------------------------
    def run(self) -> None:
        """Send each model to every site, wait for the scores, write the results, the errors and the report."""
        connected = list(self._participating_clients or [])
        sites = self._live_sites(connected)
        self._participating_clients = sites
        files = self._server_model_files()
        if not sites:
            self.warning("cross-site evaluation: no site to evaluate on (none answered the final validation)")
            self._name_silent_sites([], left_out=connected, models=set(files))
            self.save_results()
            write_json_atomic(RunFolder(self.get_run_dir()).cross_site_errors, self._errors)
            return
        self.info(f"cross-site evaluation on {sites}")
        if self.submit_site_models:
            # No params: a site that sends weight differences (its executor's DIFF transfer) would otherwise diff
            # its own model against this empty request and fail.
            request = FLModel(metrics={}, meta={AppConstants.SUBMIT_MODEL_NAME: ModelName.BEST_MODEL})
            self.send_model(
                task_name=AppConstants.TASK_SUBMIT_MODEL,
                data=request,
                targets=sites,
                timeout=self._submit_model_timeout,
                callback=self._receive_local_model_cb,
            )
        for name, checkpoint in files.items():
            try:
                spec = spec_from_json(find_model_spec(checkpoint))
                params = {k: v.numpy() for k, v in load_state_dict(checkpoint).items()}
            except ValueError as exc:
                self.error(f"cross-site evaluation: model {name} cannot be loaded: {exc}")
                for site in sites:
                    self._record_error(site, name, f"the server could not load the model: {exc}")
                continue
            self._send_validation_task(name, FLModel(params=params, meta={MODEL_SPEC_KEY: spec}))
        while self.get_num_standing_tasks():
            if self.abort_signal and self.abort_signal.triggered:
                self.info("abort signal: the cross-site evaluation stops")
                return
            time.sleep(self._task_check_period)
        self._name_silent_sites(sites, [site for site in connected if site not in sites], set(files))
        self.save_results()
        write_json_atomic(RunFolder(self.get_run_dir()).cross_site_errors, self._errors)
        if self.write_report:
            self._report()
        self.info("cross-site evaluation done")

    def _live_sites(self, connected: list[str]) -> list[str]:
        """The sites to ask: after training in the same job, those that answered its final validation.

        A site that crashed during the training may still be connected (a restarted site logs in again) without
        running this job, and would never answer: waiting for it would hold the job for the whole validation
        timeout. The sites left out are named in the errors file.
        """
        if self.models:  # an evaluation-only job: every site it was deployed to
            return connected
        metrics_file = RunFolder(self.get_run_dir()).metrics
        try:
            with open(metrics_file, encoding="utf-8") as f:
                history = json.load(f)
        except (OSError, json.JSONDecodeError):
            return connected  # no training record to go by
        final = next((r for r in reversed(history) if isinstance(r, dict) and r.get("final_validation")), None)
        if final is None:
            return connected
        answered = set(final.get("sites") or {})
        for site in sorted(set(connected) - answered):
            self.warning(f"cross-site evaluation: {site} did not answer the final validation; it is not asked")
        return [site for site in connected if site in answered]

    def _server_model_files(self) -> dict[str, str]:
        """The models the server sends: ``models``, or this run's final and best global models and site models."""
        if self.models:
            return dict(self.models)
        files = run_model_files(self.get_run_dir())
        if not files:
            self.warning(f"cross-site evaluation: no model in {self.get_run_dir()} (the training saved none)")
        return files

    # ---- NVFlare's callbacks, with fedbrats' checks ---------------------------------------------------------
    def _send_validation_task(self, model_name: str, model: FLModel) -> None:
        model.meta[CROSS_SITE_MODEL_KEY] = model_name
        model.params = cross_site_params(model.params or {})
        super()._send_validation_task(model_name, model)

    def _receive_local_model_cb(self, model: FLModel) -> None:
        """A site's own model: kept (weights only) under ``cross_site_val/model_shareables`` and sent to every site."""
        site = str(model.meta.get("client_name", "?"))
        meta = model.meta or {}
        if meta.get(SITE_ERROR_KEY) or not model.params:
            reason = str(meta.get(SITE_ERROR_KEY) or "it sent no weights")[:SITE_ERROR_MAX_CHARS]
            self.warning(f"cross-site evaluation: site {site} did not submit its model: {reason}")
            for data_site in self._participating_clients or []:
                self._record_error(data_site, site, f"the site's own model was not submitted: {reason}")
            return
        params = {k: _to_numpy(v) for k, v in model.params.items()}
        path = os.path.join(self._cross_val_models_dir, f"{site}.pt")
        torch.save({"model": {k: torch.as_tensor(v) for k, v in params.items()}}, path)
        self._client_models[site] = path
        self.info(f"cross-site evaluation: the own model of {site} saved to {path}")
        self._send_validation_task(site, FLModel(params=params, meta={MODEL_SPEC_KEY: meta.get(MODEL_SPEC_KEY)}))

    def _receive_val_result_cb(self, model: FLModel) -> None:
        site = str(model.meta.get("client_name", "?"))
        owner = str((model.meta.get("props") or {}).get(AppConstants.MODEL_OWNER, "?"))
        problem = result_problem(model)
        if problem:
            self.warning(f"cross-site evaluation: {site} on model {owner}: {problem}")
            self._record_error(site, owner, problem)
            return
        super()._receive_val_result_cb(model)

    def _record_error(self, site: str, model_name: str, reason: str) -> None:
        self._errors.setdefault(site, {})[model_name] = reason

    def _name_silent_sites(self, sites: list[str], left_out: list[str], models: set[str] | None = None) -> None:
        """A (site, model) pair without a score or an error: the site never answered (timed out or left), or was not
        asked (``left_out``: it did not answer the training's final validation). ``models``: names known besides
        those of the results."""
        models = set(models or ())
        for site in sites:
            models |= set(self._json_val_results.get(site, {})) | set(self._errors.get(site, {}))
        for site in sites:
            for name in sorted(models):
                if name not in self._json_val_results.get(site, {}) and name not in self._errors.get(site, {}):
                    self._record_error(site, name, "no answer (the site timed out or left)")
        for site in left_out:
            for name in sorted(models):
                self._record_error(site, name, "not asked: the site did not answer the training's final validation")

    def _report(self) -> None:
        try:
            written = write_cross_site_report(self.get_run_dir())
            with open(written["summary"], encoding="utf-8") as f:
                summary = json.load(f)  # the report's own summary: computed once
        except Exception as exc:  # a report that cannot be drawn must not fail a job whose results are saved
            self.exception(f"cross-site evaluation: the report could not be written ({exc}); the results stand")
            return
        self.info(f"cross-site evaluation: matrix in {written}")
        for tag, value in cross_site_scalars(summary).items():
            dxo = create_analytic_dxo(tag, value, AnalyticsDataType.SCALAR, global_step=0)
            with self.engine.new_context() as fl_ctx:
                send_analytic_dxo(self, dxo, fl_ctx, event_type=ANALYTIC_EVENT_TYPE)


def run_model_files(run_dir: str) -> dict[str, str]:
    """A run folder's models by name: the final and best global models, or, where the run kept site models (local
    training: its global model is the untrained initial one), each site's own model, named by the site."""
    run = RunFolder(run_dir)
    site_models = sorted(glob.glob(os.path.join(run.site_models, "*.pt")))
    if site_models:
        return {os.path.splitext(os.path.basename(path))[0]: path for path in site_models}
    files = {FINAL_MODEL: run.global_model, BEST_MODEL: run.best_global_model}
    return {name: path for name, path in files.items() if os.path.isfile(path)}


def result_problem(model: FLModel) -> str | None:
    """Why a site's cross-site result is unusable (its own error, or items beyond the declared aggregates), or None.

    Only the aggregate test metrics (``test_`` keys, finite numbers) may come back: weights or any other item in a
    result would be something the evaluation never asked a site to send.
    """
    meta = model.meta or {}
    if meta.get(SITE_ERROR_KEY):
        return f"the site failed: {str(meta[SITE_ERROR_KEY])[:SITE_ERROR_MAX_CHARS]}"
    if model.params:
        return "the result holds weights; a cross-site result holds aggregate metrics only"
    metrics = model.metrics or {}
    if not metrics:
        return "the result holds no metrics"
    undeclared = sorted(k for k in metrics if not str(k).startswith(TEST_PREFIX))
    if undeclared:
        return f"undeclared metrics {undeclared[:5]} (only {TEST_PREFIX}* aggregates may leave a site)"
    bad = sorted(k for k, v in metrics.items() if not _is_finite_number(v))
    if bad:
        return f"metrics {bad[:5]} are not finite numbers"
    return None


def _is_finite_number(value: Any) -> bool:
    return (
        isinstance(value, (int, float, np.floating, np.integer))
        and not isinstance(value, bool)
        and math.isfinite(float(value))
    )


def _to_numpy(value: Any) -> np.ndarray:
    return value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
