"""Federated runs measured: the simulator, the same work without NVFlare, memory, communication and scale.

The overhead of federation is the simulator's round wall time against the same per-site work run without
NVFlare. To compare like with like, :func:`run_local_baseline` runs every site in its own process, in parallel,
with one torch thread each (as the simulator does with ``-t <sites>``), builds each site's
:class:`~fedbrats.federated.client.trainer.SiteTrainer` from the job's own training options, and per round does
exactly what the Client API script does (load the global weights, hand the server's extras to the method,
validate, train, compute the extras) and then what the server does (the job's aggregation strategy). Only
NVFlare is missing: weights travel through a multiprocessing pipe.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import statistics
import time
from collections.abc import Mapping, Sequence
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from benchmarks.simlog import read_round_timeline, site_events_files
from benchmarks.system import ProcessSampler, Sample, load_average, simulator_roles
from fedbrats.data.federation import DEFAULT_SITE_MODALITIES, POOLED_SITE
from fedbrats.federated.protocol import (
    NUM_STEPS_KEY,
    SITE_NAME_KEY,
    global_task_meta,
    site_update_meta,
    to_wire,
    update_weight,
)
from fedbrats.runs import PAYLOAD_AUDIT_FILE, RunFolder

logger = logging.getLogger(f"fedbrats.{__name__}")

_PROFILES: list[tuple[str, ...]] = list(DEFAULT_SITE_MODALITIES.values())


def site_profiles(n_sites: int) -> dict[str, tuple[str, ...]]:
    """``n_sites`` sites whose sequences cycle through the default federation's four profiles."""
    return {f"site-{i + 1}": _PROFILES[i % len(_PROFILES)] for i in range(n_sites)}


def make_federation(out_dir: str, n_sites: int, cases_per_site: int, size: int, seed: int = 0) -> str:
    """A synthetic federation of ``n_sites`` sites (kept if already generated with these settings).

    Returns:
        The path of its ``sites.json``.
    """
    from fedbrats.data.federation import make_synthetic_federation

    manifest = os.path.join(out_dir, "sites.json")
    stamp = os.path.join(out_dir, "bench_settings.json")
    wanted = {"n_sites": n_sites, "cases_per_site": cases_per_site, "size": size, "seed": seed}
    if os.path.isfile(manifest) and os.path.isfile(stamp):
        with open(stamp, encoding="utf-8") as f:
            if json.load(f) == wanted:
                return manifest
    logger.info("generating a %d-site federation (%d cases/site, %d^3) in %s", n_sites, cases_per_site, size, out_dir)
    started = time.monotonic()
    manifest = make_synthetic_federation(
        out_dir, cases_per_site=cases_per_site, size=size, seed=seed, site_modalities=site_profiles(n_sites)
    )
    with open(stamp, "w", encoding="utf-8") as f:
        json.dump(wanted, f)
    logger.info("federation generated in %.1fs", time.monotonic() - started)
    return manifest


def federation_sites(sites_file: str) -> list[str]:
    """The federated sites of a ``sites.json`` (the pooled site left out)."""
    with open(sites_file, encoding="utf-8") as f:
        return sorted(s for s in json.load(f)["sites"] if s != POOLED_SITE)


def site_case_counts(sites_file: str) -> dict[str, dict[str, int]]:
    """Training and validation cases of each site."""
    with open(sites_file, encoding="utf-8") as f:
        sites = json.load(f)["sites"]
    return {
        s: {"training": int(e.get("num_training", 0)), "validation": int(e.get("num_validation", 0))}
        for s, e in sites.items()
        if s != POOLED_SITE
    }


def site_modalities(sites_file: str) -> dict[str, list[str]]:
    """Sequences of each federated site."""
    with open(sites_file, encoding="utf-8") as f:
        sites = json.load(f)["sites"]
    return {s: list(e.get("modalities", [])) for s, e in sites.items() if s != POOLED_SITE}


# ---- the job's own definition ------------------------------------------------------------------------------


def job_definition(job: str, num_rounds: int, overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """The training options, network and aggregation of ``job`` with ``overrides``, as the simulator gets them."""
    from fedbrats.jobgen import job_spec

    spec = job_spec(job, num_rounds=num_rounds, training=dict(overrides or {}))
    return {"training": spec.training, "network": spec.network, "aggregation": spec.aggregation}


def build_job_network(definition: Mapping[str, Any]) -> Any:
    """The job's network, built as the server's persistor builds it (registered networks only)."""
    from fedbrats.networks import build_from_spec

    return build_from_spec(dict(definition["network"]))


# ---- bytes of payloads -------------------------------------------------------------------------------------


def _itemsize(dtype: str) -> int:
    name = dtype.replace("torch.", "")
    try:
        return int(np.dtype(name).itemsize)
    except TypeError:
        return {"bfloat16": 2, "bool": 1}.get(name, 4)


def described_bytes(desc: Mapping[str, Any]) -> int:
    """Raw bytes of an item described by :func:`fedbrats.federated.filters.describe`.

    Arrays count ``elements x itemsize``; numbers 8 bytes, booleans 1, strings their length, lists 8 bytes an
    element; dicts the sum of their items. Serialisation framing (keys, headers) is not counted.
    """
    kind = desc.get("type")
    if "items" in desc:
        return sum(described_bytes(d) for d in desc["items"].values())
    if "dtype" in desc:
        return int(np.prod(desc.get("shape") or [1])) * _itemsize(str(desc["dtype"]))
    if kind == "bool":
        return 1
    if kind in ("int", "float"):
        return 8
    if kind == "NoneType":
        return 0
    if kind == "str":
        return int(desc.get("length", 0))
    if "shape" in desc:
        return int(np.prod(desc["shape"] or [0])) * 8
    return 0


def model_bytes(run_dir: str) -> dict[str, int]:
    """Parameters and bytes of the saved global model of a run."""
    from fedbrats.runs import load_state_dict

    state = load_state_dict(RunFolder(run_dir).global_model)
    return {
        "parameters": int(sum(v.numel() for v in state.values())),
        "bytes": int(sum(v.numel() * v.element_size() for v in state.values())),
        "tensors": len(state),
    }


def communication(
    sim_ws: str, run_dir: str, sites: Sequence[str], site_modalities: Mapping[str, Sequence[str]] | None = None
) -> dict[str, Any]:
    """Bytes each site sends and receives per training round, from the sites' payload audits.

    Sent: every weight and meta item the site's ``PayloadAuditFilter`` recorded for its ``train`` results.
    Received: the global model (the same tensors) plus the server's extras: the model spec, the
    keep-local flag and, from the second round on, the strategy's global state (FedKD's prototypes, whose
    shapes are read from ``server_state.npz``). With ``site_modalities``, the bytes of per-sequence weights a
    site sends for sequences it does not have (untrained there, and ignored by a modality-aware aggregation)
    are counted apart.
    """
    from fedbrats.federated.methods.fedkd.network import parameter_modality

    model = model_bytes(run_dir)
    with open(RunFolder(run_dir).model_spec, encoding="utf-8") as f:
        spec_bytes = len(json.dumps(json.load(f)).encode())
    state_file = RunFolder(run_dir).server_state
    state_bytes = 0
    state_items: dict[str, list[int]] = {}
    if os.path.isfile(state_file):
        with np.load(state_file) as state:
            for k in state.files:
                state_bytes += int(state[k].nbytes)
                state_items[k] = list(state[k].shape)
    per_site: dict[str, Any] = {}
    for site in sites:
        path = os.path.join(sim_ws, site, "simulate_job", PAYLOAD_AUDIT_FILE)
        if not os.path.isfile(path):
            logger.warning("no payload audit for %s at %s", site, path)
            continue
        rounds: dict[int, dict[str, int]] = {}
        extras: dict[str, int] = {}
        with open(path, encoding="utf-8") as f:
            for line in f:
                rec = json.loads(line)
                # The task name is not always in the result's headers: training results carry step counts.
                is_train = rec.get("task") == "train" or NUM_STEPS_KEY in rec.get("meta", {})
                if not is_train or rec.get("round") is None:
                    continue
                r = int(rec["round"])
                weights = sum(described_bytes(d) for d in rec["data"].values())
                have = set((site_modalities or {}).get(site, ()))
                absent = sum(
                    described_bytes(d)
                    for k, d in rec["data"].items()
                    if site_modalities is not None and parameter_modality(k) not in (None, *have)
                )
                meta = {k: described_bytes(d) for k, d in rec["meta"].items()}
                extras = {k: v for k, v in meta.items() if v >= 64} or extras
                received_extras = spec_bytes + 1 + (state_bytes if r > 0 else 0)
                rounds[r] = {
                    "sent_weights": weights,
                    "sent_meta": sum(meta.values()),
                    "sent_total": weights + sum(meta.values()),
                    "sent_absent_sequence_weights": absent,
                    "received_weights": model["bytes"],
                    "received_extras": received_extras,
                    "received_total": model["bytes"] + received_extras,
                }
        later = [v for r, v in rounds.items() if r > 0] or list(rounds.values())
        per_site[site] = {
            "rounds": rounds,
            "sent_per_round": float(np.mean([v["sent_total"] for v in later])) if later else 0.0,
            "received_per_round": float(np.mean([v["received_total"] for v in later])) if later else 0.0,
            "largest_extras": extras,
            "absent_sequence_weights_per_round": (
                float(np.mean([v["sent_absent_sequence_weights"] for v in later])) if later else 0.0
            ),
            "modalities": list((site_modalities or {}).get(site, [])),
        }
    mb = max(model["bytes"], 1)
    for entry in per_site.values():
        entry["sent_x_model"] = entry["sent_per_round"] / mb
        entry["received_x_model"] = entry["received_per_round"] / mb
    return {
        "model": model,
        "model_spec_bytes": spec_bytes,
        "server_state_bytes": state_bytes,
        "server_state_items": state_items,
        "sites": per_site,
        "note": "raw payload bytes (arrays: elements x itemsize); NVFlare's message framing is not counted; the "
        "final validation sends the model once more each way (the sites return their weights with the metrics)",
    }


# ---- memory ------------------------------------------------------------------------------------------------


def _peak_in(series: list[tuple[float, int]], start: float, end: float) -> int | None:
    values = [rss for t, rss in series if start <= t <= end]
    return max(values) if values else None


def memory_growth(per_round: Mapping[int, int]) -> dict[str, Any] | None:
    """Growth of a process's per-round peak RSS after warm-up, as the target "under 2% after round 2" reads.

    Round 0 includes start-up (building the trainer, caching the data) and round 1 still warms up, so the
    comparison starts at round 2. With eight or more rounds it compares the median peak of rounds 2-4 with that
    of the last three rounds, so that one round's spike (the sampler reads every 0.5 s and may or may not catch
    a round's true peak) cannot decide it; with four to seven rounds, round 2 with the last; with three, round 1
    with the last; with fewer, None.
    """
    rounds = sorted(per_round)
    if len(rounds) >= 8:
        early, late = rounds[2:5], rounds[-3:]
    elif len(rounds) >= 4:
        early, late = rounds[2:3], rounds[-1:]
    elif len(rounds) == 3:
        early, late = rounds[1:2], rounds[-1:]
    else:
        return None
    first = statistics.median(per_round[r] for r in early)
    last = statistics.median(per_round[r] for r in late)
    return {
        "from_round": early[0],
        "to_round": late[-1],
        "from_rounds": early,
        "to_rounds": late,
        "fraction": (last - first) / max(first, 1),
    }


def memory_by_round(
    series: Mapping[str, list[tuple[float, int]]], windows: Mapping[int, tuple[float, float]]
) -> dict[str, Any]:
    """Peak RSS of each process (label) overall and in each round window, and its growth (:func:`memory_growth`)."""
    out: dict[str, Any] = {}
    for label, points in sorted(series.items()):
        per_round = {r: _peak_in(points, s, e) for r, (s, e) in sorted(windows.items())}
        per_round = {r: v for r, v in per_round.items() if v is not None}
        out[label] = {
            "peak_bytes": max(rss for _, rss in points) if points else None,
            "per_round_peak_bytes": per_round,
            "growth": memory_growth(per_round),
        }
    return out


def refresh_memory_growth(results: dict[str, Any]) -> None:
    """Recompute the memory growth of the federated section of saved ``results`` from its per-round peaks (after
    a change of :func:`memory_growth`; the raw readings are kept). The scale rows keep the growth computed when
    they were measured (their per-round peaks are not saved)."""
    for entry in (results.get("federated") or {}).values():
        for run in (entry.get("federated"), entry.get("local")):
            for mem in ((run or {}).get("memory") or {}).values():
                if isinstance(mem, dict) and "per_round_peak_bytes" in mem:
                    per_round = {int(r): v for r, v in mem["per_round_peak_bytes"].items()}
                    mem["growth"] = memory_growth(per_round)


def _label_simulator(samples: list[Sample]) -> dict[str, list[tuple[float, int]]]:
    roles = simulator_roles(samples)
    sums: dict[str, dict[float, int]] = {}
    for s in samples:
        role = roles.get(s.pid)
        if role is None:
            continue
        series = sums.setdefault(role, {})
        series[s.t] = series.get(s.t, 0) + s.rss
    return {k: sorted(v.items()) for k, v in sums.items()}


# ---- a simulator run ---------------------------------------------------------------------------------------


def run_simulated(
    job: str,
    workspace: str,
    sites_file: str,
    num_rounds: int,
    overrides: Mapping[str, Any] | None = None,
    sample_interval: float = 0.5,
) -> dict[str, Any]:
    """Run ``job`` in the simulator (every site in parallel) and measure it.

    Returns:
        Round times (from ``metrics.json``), start-up, the round breakdown (from the controller's round events
        and the sites' events), per-process memory and the communication per site.
    """
    from fedbrats.simulate import SimulatedSiteLostError, simulate, simulator_workspace

    sites = federation_sites(sites_file)
    load_before = load_average()
    for attempt in range(2):
        sampler = ProcessSampler(interval=sample_interval)
        wall_start = time.time()
        try:
            with sampler:
                result = simulate(
                    job,
                    workspace,
                    sites_file=sites_file,
                    num_rounds=num_rounds,
                    training=dict(overrides or {}),
                    clients=sites,
                    threads=len(sites),
                )
            break
        except SimulatedSiteLostError as err:
            # NVFlare's simulator occasionally loses a site's process at start-up (not our code): measure a clean
            # run instead, once.
            if attempt:
                raise
            logger.warning("%s -- running it once more", err)
    wall_end = time.time()
    log_file = os.path.join(workspace, "simulator.log")  # for people reading the results
    timeline = read_round_timeline(RunFolder(result.run_dir).round_events, site_events_files(workspace, sites))
    train_rounds = [r for r in result.history if not r.get("final_validation")]
    round_seconds = {int(r["round"]): float(r["seconds"]) for r in train_rounds}
    windows = {r: (t.sent, t.done) for r, t in timeline.rounds.items() if t.sent and t.done}
    memory = memory_by_round(_label_simulator(sampler.samples), windows)
    clients = [v for k, v in memory.items() if k.startswith("client:")]
    later = [s for r, s in round_seconds.items() if r > 0]
    startup = result.seconds - sum(round_seconds.values())
    phases = {}
    if timeline.workflow_start and 0 in timeline.rounds and timeline.rounds[0].sent:
        phases["before_workflow"] = timeline.workflow_start - wall_start
        phases["workflow_start_to_round0"] = timeline.rounds[0].sent - timeline.workflow_start
    last_done = max((t.done for t in timeline.rounds.values() if t.done), default=None)
    if last_done and timeline.finished:
        phases["final_validation"] = timeline.finished - last_done
        phases["shutdown"] = wall_end - timeline.finished
    breakdowns = {r: t.breakdown() for r, t in sorted(timeline.rounds.items())}
    return {
        "job": job,
        "sites": sites,
        "num_rounds": num_rounds,
        "total_seconds": result.seconds,
        "round_seconds": round_seconds,
        "round0_seconds": round_seconds.get(0),
        "mean_round_seconds": statistics.fmean(later) if later else None,
        "median_round_seconds": statistics.median(later) if later else None,
        "outside_rounds_seconds": startup,
        "outside_rounds_phases": phases,
        "breakdown": breakdowns,
        "mean_breakdown": _mean_breakdown(breakdowns),
        "memory": memory,
        "server_peak_bytes": memory.get("server", {}).get("peak_bytes"),
        "client_peak_bytes_mean": float(np.mean([c["peak_bytes"] for c in clients])) if clients else None,
        "total_peak_bytes": _total_peak(_label_simulator(sampler.samples)),
        "communication": communication(
            simulator_workspace(workspace), result.run_dir, sites, site_modalities(sites_file)
        ),
        "run_dir": result.run_dir,
        "log_file": log_file,
        "load_average": [load_before, load_average()],
        "memory_series": {
            k: [(round(t - wall_start, 2), rss) for t, rss in v] for k, v in _label_simulator(sampler.samples).items()
        },
        "round_windows": {r: (s - wall_start, e - wall_start) for r, (s, e) in windows.items()},
    }


def _total_peak(series: Mapping[str, list[tuple[float, int]]]) -> int | None:
    totals: dict[float, int] = {}
    for points in series.values():
        for t, rss in points:
            totals[t] = totals.get(t, 0) + rss
    return max(totals.values()) if totals else None


def _mean_breakdown(breakdowns: Mapping[int, dict[str, float] | None]) -> dict[str, float] | None:
    later = [b for r, b in breakdowns.items() if r > 0 and b]
    if not later:
        return None
    return {k: float(np.mean([b[k] for b in later])) for k in later[0]}


# ---- the same work without NVFlare --------------------------------------------------------------------------


def _local_site_worker(conn: Connection, site_name: str, sites_file: str, training: dict, spec: dict) -> None:
    """One site of the local baseline (runs in its own process): what the Client API script does, minus NVFlare."""
    started = time.monotonic()
    import torch

    from fedbrats.data.site_config import load_site_config
    from fedbrats.federated.client.trainer import SiteTrainer, TrainConfig
    from fedbrats.networks import build_from_spec

    config = TrainConfig.from_dict(training)
    site = load_site_config(sites_file, site_name)
    trainer = SiteTrainer(site, config, build_from_spec(spec))
    conn.send({"setup_seconds": time.monotonic() - started, "threads": torch.get_num_threads()})
    while True:
        message = conn.recv()
        if message is None:
            break
        params, meta, current_round, total_rounds = message
        t0 = time.monotonic()
        trainer.load_weights(params)
        trainer.method.on_global_model(trainer.model, meta, current_round)
        t1 = time.monotonic()
        metrics = trainer.validate() if trainer.should_validate(current_round) else {}
        t2 = time.monotonic()
        summary = trainer.train_round(current_round, total_rounds)
        extras = trainer.method.round_payload(trainer.model, trainer.train_loader)
        t3 = time.monotonic()
        weights = {k: v.numpy() for k, v in trainer.weights().items()}
        out_meta = site_update_meta(site_name, site.modalities, trainer.num_train_cases, summary, to_wire(extras))
        conn.send(
            {
                "params": weights,
                "meta": out_meta,
                "metrics": metrics,
                "timing": {"load": t1 - t0, "validate": t2 - t1, "train_and_extras": t3 - t2, "work": t3 - t1},
            }
        )


def run_local_baseline(
    job: str,
    sites_file: str,
    num_rounds: int,
    overrides: Mapping[str, Any] | None = None,
    sample_interval: float = 0.5,
) -> dict[str, Any]:
    """The simulator's work without NVFlare: one process per site, all in parallel, the job's aggregation.

    Returns:
        Round wall times (send to aggregated), each site's own work per round (validation + training + extras,
        the same span the sites log in the simulator), setup time and peak memory per site process.
    """
    from fedbrats.federated.server.aggregation import STRATEGIES, SiteUpdate
    from fedbrats.networks import model_spec

    definition = job_definition(job, num_rounds, overrides)
    net = build_job_network(definition)
    spec = model_spec(net)
    global_params = {k: v.detach().cpu().numpy() for k, v in net.state_dict().items()}
    del net
    strategy = STRATEGIES.build(definition["aggregation"]["path"], definition["aggregation"].get("args", {}))
    sites = federation_sites(sites_file)
    ctx = mp.get_context("spawn")
    load_before = load_average()
    sampler = ProcessSampler(interval=sample_interval)
    conns: dict[str, Connection] = {}
    procs: dict[str, Any] = {}
    round_seconds: dict[int, float] = {}
    site_timing: dict[int, dict[str, dict[str, float]]] = {}
    windows: dict[int, tuple[float, float]] = {}
    setup_started = time.monotonic()
    with sampler:
        try:
            for site in sites:
                parent, child = ctx.Pipe()
                proc = ctx.Process(
                    target=_local_site_worker,
                    args=(child, site, sites_file, definition["training"], spec),
                    name=f"bench-local-{site}",
                )
                proc.start()
                child.close()
                conns[site], procs[site] = parent, proc
            setup = {site: conn.recv() for site, conn in conns.items()}
            setup_seconds = time.monotonic() - setup_started
            for current_round in range(num_rounds):
                w0 = time.time()
                t0 = time.monotonic()
                meta = global_task_meta(spec, strategy.keep_local_weights, strategy.global_meta())
                for conn in conns.values():
                    conn.send((global_params, meta, current_round, num_rounds))
                replies = {site: conn.recv() for site, conn in conns.items()}
                updates = [
                    SiteUpdate(
                        site,
                        r["params"],
                        {k: v for k, v in r["meta"].items() if k != SITE_NAME_KEY},
                        r["metrics"],
                        update_weight(r["meta"]),
                    )
                    for site, r in replies.items()
                ]
                global_params = strategy.aggregate(global_params, updates, current_round)
                round_seconds[current_round] = time.monotonic() - t0
                windows[current_round] = (w0, time.time())
                site_timing[current_round] = {site: r["timing"] for site, r in replies.items()}
                logger.info("local baseline %s: round %d in %.2fs", job, current_round, round_seconds[current_round])
        finally:
            for conn in conns.values():
                try:
                    conn.send(None)
                except (BrokenPipeError, OSError):
                    pass
            for proc in procs.values():
                proc.join(timeout=30)
                if proc.is_alive():
                    proc.terminate()
    pid_site = {proc.pid: site for site, proc in procs.items()}
    series = sampler.by_label(lambda s: f"client:{pid_site[s.pid]}" if s.pid in pid_site else None)
    memory = memory_by_round(series, windows)
    later = [s for r, s in round_seconds.items() if r > 0]
    return {
        "job": job,
        "sites": sites,
        "num_rounds": num_rounds,
        "setup_seconds": setup_seconds,
        "site_setup_seconds": {s: v["setup_seconds"] for s, v in setup.items()},
        "round_seconds": round_seconds,
        "mean_round_seconds": statistics.fmean(later) if later else None,
        "median_round_seconds": statistics.median(later) if later else None,
        "site_timing": site_timing,
        "site_work_max_mean": _mean_over_later(site_timing, max),
        "site_work_mean": _mean_over_later(site_timing, statistics.fmean),
        "memory": memory,
        "client_peak_bytes_mean": float(np.mean([m["peak_bytes"] for m in memory.values()])) if memory else None,
        "load_average": [load_before, load_average()],
    }


def _mean_over_later(site_timing: Mapping[int, Mapping[str, Mapping[str, float]]], reduce: Any) -> float | None:
    values = [reduce([t["work"] for t in sites.values()]) for r, sites in site_timing.items() if r > 0]
    return float(np.mean(values)) if values else None


def overhead(fed: Mapping[str, Any], local: Mapping[str, Any]) -> dict[str, Any]:
    """Federated against local: ratios of round wall time and of the sites' own work (rounds after the first)."""
    fb = fed.get("mean_breakdown") or {}
    out: dict[str, Any] = {
        "federated_round_seconds": fed["mean_round_seconds"],
        "local_round_seconds": local["mean_round_seconds"],
        "round_ratio": _ratio(fed["mean_round_seconds"], local["mean_round_seconds"]),
        "federated_median_round_seconds": fed["median_round_seconds"],
        "local_median_round_seconds": local["median_round_seconds"],
        "median_round_ratio": _ratio(fed["median_round_seconds"], local["median_round_seconds"]),
        "federated_site_work_max": fb.get("site_work_max"),
        "local_site_work_max": local["site_work_max_mean"],
        "site_work_ratio": _ratio(fb.get("site_work_max"), local["site_work_max_mean"]),
        "per_round_overhead_seconds": (
            fed["mean_round_seconds"] - local["mean_round_seconds"]
            if fed["mean_round_seconds"] is not None and local["mean_round_seconds"] is not None
            else None
        ),
        "job_startup_seconds": fed["outside_rounds_seconds"],
        "round0_federated_seconds": fed["round0_seconds"],
        "local_setup_seconds": local["setup_seconds"],
        "local_round0_seconds": local["round_seconds"].get(0),
    }
    extra = out["per_round_overhead_seconds"]
    # Round length at which this fixed per-round cost is 10 % of the round (derived, not measured).
    out["break_even_round_seconds_for_1_10"] = extra / 0.10 if extra and extra > 0 else None
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


# ---- scale -------------------------------------------------------------------------------------------------


def fit_scaling(ns: Sequence[int], values: Sequence[float]) -> dict[str, Any] | None:
    """How ``values`` grow with the number of sites ``ns``: a line ``a + b n`` and ``a + b n^k``.

    The exponent ``k`` of the growing part (grid search over 0.1-2.5, least squares for ``a`` and ``b``) is what
    tells linear from sublinear: a plain power law would call any series with a large fixed part (a process's
    baseline memory, the simulator's per-round latency) sublinear. ``k`` below 0.8 is called sublinear, 0.8-1.2
    linear and above 1.2 superlinear. Three points at least are needed for ``k``; with two, only the per-site
    increment ``b`` of the line is known.
    """
    pairs = [(n, v) for n, v in zip(ns, values) if v is not None and v > 0]
    if len(pairs) < 2:
        return None
    x = np.array([p[0] for p in pairs], dtype=float)
    y = np.array([p[1] for p in pairs], dtype=float)
    b, a = np.polyfit(x, y, 1)
    out: dict[str, Any] = {
        "points": len(pairs),
        "linear": {
            "intercept": float(a),
            "slope": float(b),
            "rmse": float(np.sqrt(np.mean((a + b * x - y) ** 2))),
        },
        "exponent": None,
        "verdict": "undetermined (two points)",
    }
    if len(pairs) >= 3:
        best = None
        for k in np.linspace(0.1, 2.5, 97):
            design = np.stack([np.ones_like(x), x**k], axis=1)
            coef, *_ = np.linalg.lstsq(design, y, rcond=None)
            rmse = float(np.sqrt(np.mean((design @ coef - y) ** 2)))
            if best is None or rmse < best[0] - 1e-12:
                best = (rmse, float(k), coef)
        assert best is not None
        rmse, k, coef = best
        out["exponent"] = k
        out["power"] = {"intercept": float(coef[0]), "coefficient": float(coef[1]), "exponent": k, "rmse": rmse}
        out["verdict"] = "sublinear" if k < 0.8 else ("linear" if k <= 1.2 else "superlinear")
    return out


def scale_summary(runs: Mapping[int, Mapping[str, Any]]) -> dict[str, Any]:
    """Round time, server memory and where the time goes against the number of sites, with fits."""
    ns = sorted(runs)
    rows = []
    for n in ns:
        r = runs[n]
        mb = r.get("mean_breakdown") or {}
        server = r["memory"].get("server", {})
        rows.append(
            {
                "sites": n,
                "mean_round_seconds": r["mean_round_seconds"],
                "dispatch": mb.get("dispatch"),
                "site_work_max": mb.get("site_work_max"),
                "site_work_mean": mb.get("site_work_mean"),
                "return": mb.get("return"),
                "aggregate": mb.get("aggregate"),
                "server_peak_bytes": server.get("peak_bytes"),
                "server_growth": (server.get("growth") or {}).get("fraction"),
                "client_peak_bytes_mean": r["client_peak_bytes_mean"],
                "total_peak_bytes": r["total_peak_bytes"],
                "outside_rounds_seconds": r["outside_rounds_seconds"],
            }
        )
    return {
        "rows": rows,
        "fit_round_seconds": fit_scaling(ns, [row["mean_round_seconds"] for row in rows]),
        "fit_server_peak_bytes": fit_scaling(ns, [row["server_peak_bytes"] for row in rows]),
        "fit_total_peak_bytes": fit_scaling(ns, [row["total_peak_bytes"] for row in rows]),
        "fit_site_work_max": fit_scaling(ns, [row["site_work_max"] for row in rows]),
    }
