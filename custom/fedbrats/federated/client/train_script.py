"""Client API training script run by :class:`fedbrats.federated.client.executor.FedBratsExecutor` at each site.

Per round: receive the global model (and the method's extras), score it on the site's validation cases
(the metric the server uses to select the best model), train locally, and send back the weights, the
metrics and the method's declared extras. Each training round also appends a ``site_work`` event (when the
site's work started, its seconds and steps) to ``site_events.jsonl`` of the site's run folder, for tools (see
:mod:`fedbrats.federated.events`), and streams the round's curves (training loss, every loss term, learning rate,
validation of the global model; stepped by the round, see :mod:`fedbrats.federated.tracking`) to the server's
tracking receiver; the log lines are for people.
"""

from __future__ import annotations

import argparse
import logging
import os
import time

import nvflare.client as flare
from nvflare.app_common.abstract.fl_model import FLModel
from nvflare.client.tracking import SummaryWriter
from nvflare.fuel.utils.memory_utils import try_malloc_trim

import fedbrats.federated.methods  # noqa: F401 - registers the methods' own networks and strategies
from fedbrats.constants import REGIONS
from fedbrats.data.site_config import SiteConfig, resolve_site_config
from fedbrats.federated.client.executor import decode_config
from fedbrats.federated.client.site_evaluation import score_received_model
from fedbrats.federated.client.trainer import SiteTrainer, TrainConfig
from fedbrats.federated.events import SITE_WORK, RoundEventWriter
from fedbrats.federated.protocol import (
    CROSS_SITE_MODEL_KEY,
    KEEP_LOCAL_WEIGHTS_KEY,
    METRIC_PREFIX,
    MODEL_SPEC_KEY,
    NUM_STEPS_KEY,
    NVFLARE_NUM_STEPS_KEY,
    SITE_NAME_KEY,
    TEST_NUM_CASES_KEY,
    TEST_PREFIX,
    TRAIN_LOSS_KEY,
    model_params,
    site_error_meta,
    site_update_meta,
    to_wire,
)
from fedbrats.federated.tracking import site_scalars
from fedbrats.networks import build_from_spec, model_spec
from fedbrats.runs import SITE_EVENTS_FILE

logger = logging.getLogger("fedbrats.client")


def site_events_writer(run_dir: str | None) -> RoundEventWriter | None:
    """The writer of ``site_events.jsonl`` in the site's run folder (None without one): best effort, so that a
    folder it cannot write warns once and training goes on."""
    return RoundEventWriter(os.path.join(run_dir, SITE_EVENTS_FILE), best_effort=True) if run_dir else None


def run(training: dict, workspace: str | None, run_dir: str | None = None) -> None:
    """The site's federated loop (returns when the server ends the job).

    Args:
        training: the job's training options.
        workspace: the site's workspace root (for ``local/`` settings).
        run_dir: the site's run folder of this job: its events file (``site_events.jsonl``) and site-local
            state of a method (e.g. FedMIC's personalised model). None: no events, such state in memory only.
    """
    flare.init()
    site_name = flare.get_site_name()
    answered = [True]  # whether the last task received has been answered (a list: _run sets it)
    try:
        _run(site_name, training, workspace, answered, run_dir)
    except Exception as exc:
        logger.exception("site %s failed", site_name)
        _answer_with_error(site_name, exc, pending=not answered[0])


def _answer_with_error(site_name: str, exc: BaseException, pending: bool) -> None:
    """Answer the pending task and every later one with the failure's reason, until the job ends.

    Without this the server only sees an execution error without a message and, when every site fails, would
    run all its rounds on an unchanged model; with it the server stops the job and repeats each site's reason.
    """
    # metrics={} rather than None: NVFlare refuses a result without params and metrics.
    failed = FLModel(metrics={}, meta=site_error_meta(site_name, exc))
    if pending:
        flare.send(failed)
    while flare.is_running():
        if flare.receive() is None:
            break
        flare.send(failed)


def _run(
    site_name: str, training: dict, workspace: str | None, answered: list[bool], run_dir: str | None = None
) -> None:
    """The loop of :func:`run` (``answered[0]`` False while a received task is not yet answered)."""
    config = TrainConfig.from_dict(training)
    events = site_events_writer(run_dir)
    site = resolve_site_config(site_name, workspace)
    writer = SummaryWriter()
    trainer: SiteTrainer | None = None
    has_local_weights = False

    while flare.is_running():
        input_model = flare.receive()
        if input_model is None:
            break
        answered[0] = False
        meta = input_model.meta or {}
        current_round = input_model.current_round or 0
        if flare.is_evaluate() and meta.get(CROSS_SITE_MODEL_KEY):
            _answer_cross_site(site, config, input_model)
            answered[0] = True
            continue
        if flare.is_submit_model():
            _answer_submit_model(site_name, trainer)
            answered[0] = True
            continue
        if trainer is None:
            # The server sends the network's spec with the weights: the architecture is defined once, on the server.
            model = build_from_spec(meta[MODEL_SPEC_KEY])
            trainer = SiteTrainer(site, config, model)
            if run_dir:
                trainer.method.use_site_folder(run_dir)
            logger.info("site %s: method %s, %d training cases", site_name, config.method, trainer.num_train_cases)

        keep_local = bool(meta.get(KEEP_LOCAL_WEIGHTS_KEY)) and has_local_weights
        if not keep_local:
            trainer.load_weights(input_model.params)
        trainer.method.on_global_model(trainer.model, meta, current_round)

        if flare.is_evaluate():
            # The final validation also scores the post-processing candidates (the server keeps the best).
            metrics = trainer.validate(postprocess_candidates=config.postprocess_candidates)
            logger.info("round %d | site %s | validation %s", current_round, site_name, _fmt(metrics))
            _track(writer, {"metrics": metrics}, current_round)
            # The weights go back unchanged only so that NVFlare's model selector, which ignores metrics-only
            # results, also judges the final global model.
            flare.send(FLModel(params=trainer.weights(), metrics=metrics, meta={SITE_NAME_KEY: site_name}))
            answered[0] = True
            continue

        started, started_at = time.monotonic(), time.time()
        metrics = trainer.validate() if trainer.should_validate(current_round) else {}
        if metrics:
            logger.info(
                "round %d | site %s | global model on local validation: %s", current_round, site_name, _fmt(metrics)
            )
        summary = trainer.train_round(current_round, input_model.total_rounds)
        trainer.method.on_round_end(trainer.model, current_round)
        extras = trainer.method.round_payload(trainer.model, trainer.train_loader)
        has_local_weights = True
        _track(writer, {**summary, "metrics": metrics}, current_round)
        out_meta = site_update_meta(site_name, site.modalities, trainer.num_train_cases, summary, to_wire(extras))
        out_meta[NVFLARE_NUM_STEPS_KEY] = summary[NUM_STEPS_KEY]
        flare.send(FLModel(params=trainer.update_weights(), metrics=metrics, meta=out_meta))
        answered[0] = True
        seconds, steps = time.monotonic() - started, int(summary[NUM_STEPS_KEY])
        if events is not None:
            events.write(SITE_WORK, current_round, site=site_name, started=started_at, seconds=seconds, steps=steps)
        logger.info(
            "round %d | site %s | sent update: %d steps, loss %.4f, %.1fs",
            current_round,
            site_name,
            steps,
            summary[TRAIN_LOSS_KEY],
            seconds,
        )
        # Free heap pages back to the OS every round (well under a millisecond); the garbage-cycle collection is
        # NVFlare's Client API option, the executor's memory_gc_rounds (see fedbrats.federated.memory).
        try_malloc_trim()


def _answer_cross_site(site: SiteConfig, config: TrainConfig, input_model: FLModel) -> None:
    """Score a model of the cross-site evaluation on the site's own test cases and send the aggregates back.

    A failure answers this task with its reason (the server names the site and the model, the other results
    stand) and the site goes on with the next task.
    """
    meta = input_model.meta or {}
    name = meta.get(CROSS_SITE_MODEL_KEY)
    try:
        params = model_params(input_model.params or {})
        metrics = score_received_model(meta.get(MODEL_SPEC_KEY), params, site, config)
    except Exception as exc:  # one model the site cannot score must not end its part of the evaluation
        logger.exception("site %s: cross-site evaluation of model %s failed", site.site_name, name)
        flare.send(FLModel(metrics={}, meta=site_error_meta(site.site_name, exc)))
        return
    if len(metrics) > 1:
        logger.info("site %s | cross-site evaluation of %s: %s", site.site_name, name, _fmt(metrics, TEST_PREFIX))
    else:
        logger.info(
            "site %s: %d labelled test case(s), fewer than min_test_cases %d: model %s not scored",
            site.site_name,
            int(metrics.get(TEST_NUM_CASES_KEY, 0)),
            config.min_test_cases,
            name,
        )
    flare.send(FLModel(metrics=metrics, meta={SITE_NAME_KEY: site.site_name}))


def _answer_submit_model(site_name: str, trainer: SiteTrainer | None) -> None:
    """Send the site's own model (:meth:`ClientMethod.submitted_model`: e.g. FedMIC's personalised one) and its
    network's spec, for the cross-site evaluation; a site that trained nothing in this job says so."""
    if trainer is None:
        error = ValueError("this site has no model of its own in this job (it trained nothing)")
        flare.send(FLModel(metrics={}, meta=site_error_meta(site_name, error)))
        return
    try:
        model = trainer.method.submitted_model(trainer.model)
        weights = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        spec = model_spec(model)
    except Exception as exc:  # e.g. an unreadable personalised model file: said, and the site goes on
        logger.exception("site %s: its own model cannot be submitted", site_name)
        flare.send(FLModel(metrics={}, meta=site_error_meta(site_name, exc)))
        return
    flare.send(FLModel(params=weights, meta={SITE_NAME_KEY: site_name, MODEL_SPEC_KEY: spec}))


def _track(writer: SummaryWriter, entry: dict, current_round: int) -> None:
    """Stream a round's curves (:func:`fedbrats.federated.tracking.site_scalars` of ``entry``: ``metrics``,
    ``train_loss``, ``loss_terms``, ``lr``) to the server's tracking receiver, stepped by the round."""
    for tag, value in site_scalars(entry).items():
        writer.add_scalar(tag, value, current_round)


def _fmt(metrics: dict[str, float], prefix: str = METRIC_PREFIX) -> str:
    keys = tuple(f"{prefix}dice_{region}" for region in REGIONS) + (f"{prefix}mean_dice",)
    return " ".join(f"{k[len(prefix) :]}={metrics[k]:.3f}" for k in keys if k in metrics)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--training", required=True, help="encoded training options (set by the executor)")
    parser.add_argument("--workspace", default=None, help="the site's workspace root (for local/ settings)")
    parser.add_argument(
        "--run-dir", default=None, help="the site's run folder of this job (its events file, site-local state)"
    )
    args = parser.parse_args(argv)
    run(decode_config(args.training), args.workspace, args.run_dir)


if __name__ == "__main__":
    main()
