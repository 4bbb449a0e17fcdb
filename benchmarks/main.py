"""Settings of each benchmark mode, the orchestration of the sections, and the command line.

``python benchmarks/run.py --mode quick --out-dir benchmarks/results/quick`` writes ``results.json``, ``report.md``
and PNG plots into the output folder. ``--mode full`` is the realistic setting; ``--smoke`` shrinks everything
further (the test suite uses it; its figures mean nothing).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import logging
import os
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

from benchmarks import compute, federated
from benchmarks.report import write_report
from benchmarks.system import OtherWork, load_average, machine_info
from fedbrats.logging_setup import add_log_level_argument, configure_logging
from fedbrats.simulate import parse_overrides

logger = logging.getLogger(f"fedbrats.{__name__}")

SECTIONS: tuple[str, ...] = ("federated", "throughput", "inference", "scale")


@dataclass
class BenchSettings:
    """What a benchmark run measures and at what size.

    Attributes:
        mode: ``smoke``, ``quick`` or ``full``.
        jobs: the jobs measured.
        sites: sites of the main federation (sequences cycle through the default four profiles).
        size: voxels per side of the synthetic training volumes.
        cases_per_site: synthetic cases per site (20 % go to the test set, a quarter of the rest to validation).
        rounds: federated rounds of the main runs (overhead, memory, communication).
        epochs_per_round: local epochs per round (None: the job's own).
        scale_sites: numbers of sites of the scale runs.
        scale_rounds: rounds of each scale run.
        throughput_min_seconds: timed seconds per site and thread setting.
        throughput_all_threads: also time the first site with every core (one process using the machine).
        inference_size: shape of the synthetic inference case.
        inference_configs: sliding-window settings and sequence subsets timed (see
            :func:`benchmarks.compute.inference_benchmark`).
        inference_repeats: timed runs of each inference configuration.
        sample_interval: seconds between memory readings.
        seed: data seed.
        sites_file: an existing federation's ``sites.json`` (e.g. real cases) for the federated and throughput
            sections instead of a generated synthetic one (None: generate).
        training: further training-option overrides of every run (nested, as ``--set`` gives them).
    """

    mode: str
    jobs: tuple[str, ...] = ("fedavg", "fedkd")
    sites: int = 4
    size: int = 24
    cases_per_site: int = 4
    rounds: int = 3
    epochs_per_round: int | None = 1
    scale_sites: tuple[int, ...] = (2, 4)
    scale_rounds: int = 3
    throughput_min_seconds: float = 2.0
    throughput_all_threads: bool = True
    inference_size: tuple[int, int, int] = (240, 240, 155)
    inference_configs: list[dict[str, Any]] = field(default_factory=list)
    inference_repeats: int = 1
    sample_interval: float = 0.5
    seed: int = 0
    sites_file: str | None = None
    training: dict[str, Any] = field(default_factory=dict)

    def overrides(self) -> dict[str, Any]:
        """Training-option overrides of every run: the epochs (None: the job's own) and ``training``."""
        out = {} if self.epochs_per_round is None else {"epochs_per_round": self.epochs_per_round}
        return {**out, **self.training}


_ALL = list(compute.MODALITIES)
_SINGLES = [[m] for m in compute.MODALITIES]

MODES: dict[str, BenchSettings] = {
    "smoke": BenchSettings(
        mode="smoke",
        sites=2,
        size=16,
        cases_per_site=3,
        rounds=2,
        epochs_per_round=1,
        scale_sites=(2,),
        scale_rounds=2,
        throughput_min_seconds=0.0,
        throughput_all_threads=False,
        inference_size=(48, 48, 32),
        inference_configs=[
            {"subset": s, "roi_size": [32, 32, 32], "overlap": 0.25, "zoom": 1.0} for s in (_ALL, ["t1"])
        ],
    ),
    "quick": BenchSettings(
        mode="quick",
        sites=4,
        size=24,
        cases_per_site=4,
        rounds=3,
        epochs_per_round=1,
        scale_sites=(2, 4),
        scale_rounds=3,
        throughput_min_seconds=2.0,
        inference_size=(240, 240, 155),
        inference_configs=[
            *({"subset": s, "roi_size": [96, 96, 96], "overlap": 0.5, "zoom": 0.5} for s in (_ALL, ["t1"])),
            # The job's own crop as the window (what `fedbrats predict` uses for these models by default).
            {"job": "fedavg", "subset": _ALL, "roi_size": [32, 32, 32], "overlap": 0.5, "zoom": 0.5},
            {"subset": _ALL, "roi_size": [96, 96, 96], "overlap": 0.5, "zoom": 0.5, "precision": "bf16"},
            # The real-data recipe's inference: its 64^3 training crop as the window (the networks normalise over
            # the window, so this is the window evaluation and `fedbrats predict` use), bfloat16.
            {"subset": _ALL, "roi_size": [64, 64, 64], "overlap": 0.5, "zoom": 0.5, "precision": "bf16"},
        ],
    ),
    "full": BenchSettings(
        mode="full",
        sites=4,
        size=32,
        cases_per_site=10,
        rounds=10,
        epochs_per_round=None,
        scale_sites=(2, 4, 8, 16),
        scale_rounds=5,
        throughput_min_seconds=10.0,
        inference_size=(240, 240, 155),
        inference_configs=[
            *(
                {"subset": s, "roi_size": [96, 96, 96], "overlap": 0.5, "zoom": z}
                for z in (1.0, 0.5)
                for s in (_ALL, *_SINGLES)
            ),
            *({"subset": _ALL, "roi_size": [32, 32, 32], "overlap": 0.5, "zoom": z} for z in (1.0, 0.5)),
            # The recipe's inference: bfloat16 where the CPU runs it natively, at the real-data training zoom.
            *(
                {"subset": s, "roi_size": [96, 96, 96], "overlap": o, "zoom": 0.5, "precision": "bf16"}
                for s in (_ALL, *_SINGLES)
                for o in (0.5, 0.25)
            ),
        ],
    ),
}


def _save(results: dict[str, Any], out_dir: str) -> str:
    path = os.path.join(out_dir, "results.json")
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1, default=_json_default)
    os.replace(tmp, path)
    return path


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def run_benchmarks(
    settings: BenchSettings,
    out_dir: str,
    work_dir: str,
    sections: tuple[str, ...] = SECTIONS,
    command: str = "",
    cache_dir: str | None = None,
) -> dict[str, Any]:
    """Run the chosen sections and write ``results.json``, ``report.md`` and the plots into ``out_dir``.

    Args:
        settings: sizes and counts (see :data:`MODES`).
        out_dir: where the results go.
        work_dir: simulator workspaces and generated data.
        sections: any of :data:`SECTIONS`.
        command: the command line, recorded in the report.
        cache_dir: where the (slow to generate) full-size inference case is kept between runs.
    """
    from fedbrats.data.federation import default_cache_dir
    from fedbrats.jobgen import TASK_REQUEST_INTERVAL

    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        raise ValueError(f"unknown section(s) {unknown}; sections are {list(SECTIONS)}")
    os.makedirs(out_dir, exist_ok=True)
    os.makedirs(work_dir, exist_ok=True)
    started, whole_run = time.monotonic(), OtherWork()
    results: dict[str, Any] = {
        "started": dt.datetime.now().isoformat(timespec="seconds"),
        "command": command,
        "settings": dataclasses.asdict(settings),
        "sections": list(sections),
        "machine": machine_info(),
        "section_seconds": {},
        "section_load_average": {},
        "section_other_work_cores": {},
    }
    overrides = settings.overrides()
    if settings.sites_file is not None:
        if not os.path.isfile(settings.sites_file):
            raise ValueError(f"--sites-file {settings.sites_file!r} does not exist")
        main_fed = settings.sites_file
    else:
        main_fed = federated.make_federation(
            os.path.join(work_dir, f"federation-{settings.sites}"),
            settings.sites,
            settings.cases_per_site,
            settings.size,
            settings.seed,
        )
    results["federation"] = {"sites_file": main_fed, "cases": federated.site_case_counts(main_fed)}
    results["task_request_interval"] = TASK_REQUEST_INTERVAL
    results["job_settings"] = {
        job: federated.job_definition(job, settings.rounds, overrides)["training"] for job in settings.jobs
    }

    def timed(section: str, fn: Any) -> None:
        t0, load0, other = time.monotonic(), load_average(), OtherWork()
        logger.info("=== %s ===", section)
        fn()
        results["section_seconds"][section] = time.monotonic() - t0
        results["section_load_average"][section] = [load0, load_average()]
        results["section_other_work_cores"][section] = other.cores()
        _save(results, out_dir)

    def run_federated() -> None:
        out: dict[str, Any] = {}
        for job in settings.jobs:
            fed = federated.run_simulated(
                job,
                os.path.join(work_dir, f"sim-{job}-{settings.sites}"),
                main_fed,
                settings.rounds,
                overrides,
                settings.sample_interval,
            )
            local = federated.run_local_baseline(job, main_fed, settings.rounds, overrides, settings.sample_interval)
            out[job] = {"federated": fed, "local": local, "overhead": federated.overhead(fed, local)}
        results["federated"] = out

    def run_throughput() -> None:
        sites = federated.federation_sites(main_fed)
        cores = os.cpu_count() or 1
        out: dict[str, Any] = {}
        for job in settings.jobs:
            entry = {
                "one_thread": compute.training_throughput(
                    job, main_fed, sites, overrides, threads=1, min_seconds=settings.throughput_min_seconds
                ),
                "gpu": compute.gpu_variants(job, main_fed, sites[0], overrides),
            }
            if entry["one_thread"] and any(r["precision"] != "fp32" for r in entry["one_thread"].values()):
                # The recipe's mixed precision against float32, same sites and settings.
                entry["one_thread_fp32"] = compute.training_throughput(
                    job,
                    main_fed,
                    sites,
                    overrides,
                    threads=1,
                    min_seconds=settings.throughput_min_seconds,
                    precision="fp32",
                )
            if cores > 1 and settings.throughput_all_threads:
                entry["all_threads"] = compute.training_throughput(
                    job, main_fed, sites[:1], overrides, threads=cores, min_seconds=settings.throughput_min_seconds
                )
            out[job] = entry
        results["throughput"] = out

    def run_inference() -> None:
        paths = compute.inference_case(cache_dir or default_cache_dir(), settings.inference_size)
        threads = os.cpu_count() or 1
        results["inference"] = {
            "case_size": list(settings.inference_size),
            "threads": threads,
            "rows": compute.inference_benchmark(
                settings.jobs,
                paths,
                settings.inference_size,
                settings.inference_configs,
                threads,
                settings.inference_repeats,
            ),
        }

    def run_scale() -> None:
        out: dict[str, Any] = {}
        for job in settings.jobs:
            runs: dict[int, Any] = {}
            for n in settings.scale_sites:
                main = results.get("federated", {}).get(job, {}).get("federated")
                reusable = main is not None and settings.sites_file is None and settings.scale_rounds == settings.rounds
                if reusable and n == settings.sites:
                    runs[n] = main  # the main run is this point of the scale series
                    continue
                fed_file = federated.make_federation(
                    os.path.join(work_dir, f"federation-{n}"), n, settings.cases_per_site, settings.size, settings.seed
                )
                run = federated.run_simulated(
                    job,
                    os.path.join(work_dir, f"sim-{job}-{n}"),
                    fed_file,
                    settings.scale_rounds,
                    overrides,
                    settings.sample_interval,
                )
                run.pop("memory_series", None)
                runs[n] = run
            summary = federated.scale_summary(runs)
            summary["reused_main_run"] = (
                settings.sites_file is None and settings.sites in runs and settings.scale_rounds == settings.rounds
            )
            out[job] = summary
        results["scale"] = out

    steps = {
        "federated": run_federated,
        "throughput": run_throughput,
        "inference": run_inference,
        "scale": run_scale,
    }
    try:
        for section in SECTIONS:
            if section in sections:
                timed(section, steps[section])
    finally:
        results["total_seconds"] = time.monotonic() - started
        results["finished"] = dt.datetime.now().isoformat(timespec="seconds")
        results["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
        results["machine"]["other_work_cores"] = whole_run.cores()
        _save(results, out_dir)
        write_report(results, out_dir)
    logger.info("benchmarks done in %.0fs; report %s", results["total_seconds"], os.path.join(out_dir, "report.md"))
    return results


def rewrite_report(out_dir: str) -> str:
    """Recompute the derived figures (memory growth) of ``out_dir/results.json`` from its raw readings and rewrite
    ``results.json``, ``report.md`` and the plots; returns the report's path.

    Raises:
        ValueError: ``out_dir`` holds no ``results.json``.
    """
    path = os.path.join(out_dir, "results.json")
    if not os.path.isfile(path):
        raise ValueError(f"--report-only: {path} does not exist; run the benchmark into {out_dir} first")
    with open(path, encoding="utf-8") as f:
        results = json.load(f)
    federated.refresh_memory_growth(results)
    _save(results, out_dir)
    return write_report(results, out_dir)


def build_parser() -> argparse.ArgumentParser:
    """The benchmark command's parser."""
    p = argparse.ArgumentParser(
        prog="benchmarks/run.py",
        description="Measure speed, memory, communication and scale of the federated jobs, and report them.",
    )
    p.add_argument("--mode", choices=["quick", "full"], default="quick", help="quick: minutes; full: realistic")
    p.add_argument("--smoke", action="store_true", help="even smaller than quick (tests); figures mean nothing")
    p.add_argument("--out-dir", default=None, help="results, report and plots (default: benchmarks/results/<mode>)")
    p.add_argument("--work-dir", default=None, help="workspaces and data (default: a temporary folder, removed)")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--jobs", default=None, help="comma-separated jobs (default: fedavg,fedkd)")
    p.add_argument(
        "--sites-file",
        default=None,
        help="measure the federated and throughput sections on this federation's sites.json (e.g. prepared real "
        "cases) instead of generating a synthetic one",
    )
    p.add_argument("--rounds", type=int, default=None, help="rounds of the main federated runs (default: the mode's)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="training-option override of every run, as `fedbrats simulate --set` (e.g. data.zoom=0.5); repeatable",
    )
    p.add_argument(
        "--report-only",
        action="store_true",
        help="measure nothing: recompute derived figures of OUT_DIR/results.json and rewrite its report and plots",
    )
    add_log_level_argument(p)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark command; returns the exit status."""
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level)
    logging.getLogger("fedbrats").setLevel(args.log_level)
    out_dir = args.out_dir or os.path.join("benchmarks", "results", "smoke" if args.smoke else args.mode)
    if args.report_only:
        rewrite_report(out_dir)
        return 0
    settings = dataclasses.replace(MODES["smoke" if args.smoke else args.mode])
    if args.jobs:
        settings.jobs = tuple(j.strip() for j in args.jobs.split(",") if j.strip())
    if args.rounds is not None:
        if args.rounds < 2:
            raise SystemExit("--rounds must be at least 2 (the overhead is measured on the rounds after the first)")
        settings.rounds = args.rounds
    settings.sites_file = args.sites_file
    settings.training = parse_overrides(args.overrides)
    sections = tuple(s.strip() for s in args.sections.split(",") if s.strip())
    command = shlex.join(["python", "benchmarks/run.py", *(sys.argv[1:] if argv is None else argv)])
    work_dir = args.work_dir or tempfile.mkdtemp(prefix="fedbrats-bench-")
    try:
        run_benchmarks(settings, out_dir, work_dir, sections, command=command)
    finally:
        if args.work_dir is None:
            shutil.rmtree(work_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
