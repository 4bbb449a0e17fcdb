"""Compute measured without NVFlare: training throughput per site and inference on a full-size case."""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import statistics
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from benchmarks.federated import build_job_network, job_definition
from fedbrats.constants import MODALITIES
from fedbrats.federated.protocol import GLOBAL_PROTOTYPE_VALID_KEY, GLOBAL_PROTOTYPES_KEY

logger = logging.getLogger(f"fedbrats.{__name__}")

#: What the report says where CUDA is absent (figures are never estimated).
NO_GPU = "GPU figures not measured (no GPU on this machine)"


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run a block with ``n`` torch CPU threads, then restore the previous number."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, int(n)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _steady_state(trainer: Any) -> None:
    """One untimed round, then put the method in the state of later rounds (distillation on, prototypes)."""
    trainer.method.on_global_model(trainer.model, {}, 0)
    trainer.train_round(0)
    extras = trainer.method.round_payload(trainer.model, trainer.train_loader)
    meta: dict[str, Any] = {}
    if "prototypes" in extras:
        protos = np.asarray(extras["prototypes"], dtype=np.float32)
        meta = {GLOBAL_PROTOTYPES_KEY: protos, GLOBAL_PROTOTYPE_VALID_KEY: np.ones(len(protos), dtype=bool)}
    trainer.method.on_global_model(trainer.model, meta, 1)


def _site_trainer(job: str, sites_file: str, site: str, overrides: Mapping[str, Any] | None, **training: Any) -> Any:
    from fedbrats.data.site_config import load_site_config
    from fedbrats.federated.client.trainer import SiteTrainer, TrainConfig

    definition = job_definition(job, 1, overrides)
    config = TrainConfig.from_dict({**definition["training"], **training})
    return SiteTrainer(load_site_config(sites_file, site), config, build_job_network(definition))


def training_throughput(
    job: str,
    sites_file: str,
    sites: Sequence[str],
    overrides: Mapping[str, Any] | None = None,
    threads: int = 1,
    min_seconds: float = 2.0,
    min_rounds: int = 1,
    **training: Any,
) -> dict[str, Any]:
    """Training cases/s and voxels/s of each site on the CPU, at the job's crop size, in steady state.

    Each site's trainer does one untimed round (warm-up; it also switches on FedKD's distillation and
    prototypes, as in every round after the first), then whole local rounds (``epochs_per_round`` epochs over
    its training cases, data augmentation included) are timed until ``min_seconds`` and ``min_rounds`` are
    reached. A case is one training crop of ``roi_size``.
    """
    out: dict[str, Any] = {}
    for site in sites:
        with torch_threads(threads):
            trainer = _site_trainer(job, sites_file, site, overrides, num_threads=threads, device="cpu", **training)
            torch.set_num_threads(threads)  # SiteTrainer sets its own; keep the one asked for
            _steady_state(trainer)
            cfg = trainer.config
            roi = tuple(cfg.data.roi_size)
            cases_per_round = trainer.num_train_cases * cfg.epochs_per_round
            rounds, steps, seconds = 0, 0, 0.0
            while rounds < min_rounds or seconds < min_seconds:
                t0 = time.perf_counter()
                summary = trainer.train_round(rounds + 1)
                seconds += time.perf_counter() - t0
                steps += int(summary["num_steps"])
                rounds += 1
        cases = cases_per_round * rounds
        out[site] = {
            "modalities": list(trainer.site.modalities),
            "threads": threads,
            "roi_size": list(roi),
            "batch_size": cfg.data.batch_size,
            "rounds_timed": rounds,
            "steps": steps,
            "cases": cases,
            "seconds": seconds,
            "seconds_per_step": seconds / max(steps, 1),
            "precision": trainer.precision,
            "cases_per_second": cases / seconds if seconds else None,
            "voxels_per_second": cases * math.prod(roi) / seconds if seconds else None,
        }
        logger.info(
            "throughput %s %s (%d thread(s)): %.2f cases/s, %.3gs/step",
            job,
            site,
            threads,
            out[site]["cases_per_second"] or 0.0,
            out[site]["seconds_per_step"],
        )
        del trainer
    return out


def gpu_variants(
    job: str,
    sites_file: str,
    site: str,
    overrides: Mapping[str, Any] | None = None,
    steps: int = 20,
) -> dict[str, Any]:
    """Training-step time on the GPU: FP32, AMP, channels-last and ``torch.compile`` variants.

    Returns ``{"measured": False, "reason": NO_GPU}`` without CUDA: GPU figures are never estimated.
    """
    if not torch.cuda.is_available():
        return {"measured": False, "reason": NO_GPU}
    trainer = _site_trainer(job, sites_file, site, overrides, device="cuda")
    _steady_state(trainer)
    batch = next(iter(trainer.train_loader))
    batch = {k: v.to("cuda") if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    variants = {
        "fp32": {},
        "amp": {"amp": True},
        "channels_last": {"channels_last": True},
        "amp+channels_last": {"amp": True, "channels_last": True},
        "compile": {"compile": True},
        "amp+compile": {"amp": True, "compile": True},
    }
    results: dict[str, Any] = {"measured": True, "amp_dtype": str(amp_dtype), "device": torch.cuda.get_device_name()}
    cases = batch["image"].shape[0]
    voxels = math.prod(batch["image"].shape[2:])
    for name, opts in variants.items():
        try:
            results[name] = _gpu_variant(trainer, batch, amp_dtype, steps, **opts)
            results[name]["cases_per_second"] = cases / results[name]["seconds_per_step"]
            results[name]["voxels_per_second"] = cases * voxels / results[name]["seconds_per_step"]
        except Exception as exc:  # a variant that fails (e.g. no compiler) is reported, not fatal
            logger.warning("GPU variant %s failed: %s", name, exc)
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
    return results


def _gpu_variant(
    trainer: Any,
    batch: dict[str, Any],
    amp_dtype: torch.dtype,
    steps: int,
    amp: bool = False,
    channels_last: bool = False,
    compile: bool = False,  # noqa: A002 - mirrors torch.compile
) -> dict[str, float]:
    model = copy.deepcopy(trainer.model).train()
    b = dict(batch)
    if channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
        b["image"] = b["image"].contiguous(memory_format=torch.channels_last_3d)
    run_model = torch.compile(model) if compile else model
    optimizer = torch.optim.Adam(model.parameters(), lr=trainer.config.lr)
    scaler = torch.amp.GradScaler("cuda", enabled=amp and amp_dtype == torch.float16)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=amp_dtype, enabled=amp):
            loss, _ = trainer.method.training_loss(run_model, b, 1)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    for _ in range(5 if compile else 3):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / steps
    return {"seconds_per_step": seconds, "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30}


# ---- inference ---------------------------------------------------------------------------------------------

INFERENCE_CASE_ID = "Synth18_BENCH_000_1"


def inference_case(cache_dir: str, size: Sequence[int]) -> dict[str, str]:
    """A synthetic case of ``size`` voxels (generated once into ``cache_dir``); sequence -> NIfTI path."""
    from fedbrats.data.conventions import get_convention
    from fedbrats.data.synthetic import generate_case

    folder = os.path.join(cache_dir, f"bench-case-{'x'.join(str(s) for s in size)}")
    conv = get_convention("brats2018")
    paths = {m: os.path.join(folder, INFERENCE_CASE_ID, conv.filename(INFERENCE_CASE_ID, m)) for m in MODALITIES}
    if not all(os.path.isfile(p) for p in paths.values()):
        logger.info("generating a %s synthetic case for inference in %s", "x".join(map(str, size)), folder)
        started = time.monotonic()
        generate_case(folder, INFERENCE_CASE_ID, size=tuple(int(s) for s in size))
        logger.info("case generated in %.1fs", time.monotonic() - started)
    return paths


def inference_benchmark(
    jobs: Sequence[str],
    case_paths: Mapping[str, str],
    case_size: Sequence[int],
    configs: Sequence[Mapping[str, Any]],
    threads: int,
    repeats: int = 1,
) -> list[dict[str, Any]]:
    """Seconds per case of :func:`fedbrats.evaluation.predict.predict_case`, whole pipeline (reading, cropping,
    resampling, normalising, sliding-window inference, resampling back).

    Args:
        jobs: jobs whose network is timed (randomly initialised: the time does not depend on the weights).
        case_paths: sequence -> NIfTI path of the case.
        case_size: the case's shape (for voxels/s).
        configs: each ``{"job": ..., "subset": [...], "roi_size": [...], "overlap": ..., "zoom": ...,
            "precision": ...}``; ``job`` may be absent (then every job), ``precision`` too (then ``fp32``).
        threads: torch CPU threads.
        repeats: timed runs of each configuration (the median is reported).
    """
    from fedbrats.evaluation.predict import predict_case

    rows = []
    with torch_threads(threads):
        for job in jobs:
            torch.manual_seed(0)
            model = build_job_network(job_definition(job, 1, None)).eval()
            for cfg in configs:
                if cfg.get("job", job) != job:
                    continue
                subset = list(cfg["subset"])
                roi = [int(s) for s in cfg["roi_size"]]
                with torch.no_grad():  # warm-up: first-call allocations and lazy imports are not timed
                    mask = torch.ones(1, len(MODALITIES))
                    model(torch.zeros(1, len(MODALITIES), *roi), mask)
                times = []
                for _ in range(max(1, repeats)):
                    t0 = time.perf_counter()
                    predict_case(
                        model,
                        {m: case_paths[m] for m in subset},
                        roi_size=roi,
                        overlap=float(cfg["overlap"]),
                        zoom=float(cfg["zoom"]),
                        precision=cfg.get("precision", "fp32"),
                    )
                    times.append(time.perf_counter() - t0)
                seconds = statistics.median(times)
                row = {
                    "job": job,
                    "subset": "+".join(subset),
                    "num_sequences": len(subset),
                    "roi_size": roi,
                    "overlap": float(cfg["overlap"]),
                    "zoom": float(cfg["zoom"]),
                    "precision": cfg.get("precision", "fp32"),
                    "threads": threads,
                    "repeats": len(times),
                    "seconds": seconds,
                    "all_seconds": times,
                    "voxels_per_second": math.prod(case_size) / seconds,
                }
                rows.append(row)
                logger.info(
                    "inference %s %s roi %s zoom %.2f: %.1fs/case", job, row["subset"], roi, row["zoom"], seconds
                )
    return rows
