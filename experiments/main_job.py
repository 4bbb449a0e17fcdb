"""The README's main command, measured: ``nvflare simulator jobs/fedkd -w W -n 4 -t 4`` once per seed.

Each run copies the committed job folder, sets the seed in both configs (the server's and the sites'), runs NVFlare's
simulator exactly as the README does, with its own fresh data cache (so data generation is part of the time, as a
user's first run), and records the wall time and the final validation the server logged (``metrics.json``: each
site's validation cases with its own sequences, and the site-weighted aggregate). The report (``results.json`` and
``report.md``) names the machine, whether it computes bfloat16 natively (the recipe's precision is ``auto``), and the
command that reproduces it::

    python experiments/main_job.py --out-dir docs/results/main-job --seeds 0,1,2 --workspace W

Run it from a source checkout; it imports the package, the package never imports it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from typing import Any

import torch

from benchmarks.system import cpu_model
from fedbrats.constants import REGIONS
from fedbrats.data.federation import CACHE_ENV
from fedbrats.federated.protocol import KEY_METRIC, METRIC_PREFIX
from fedbrats.logging_setup import configure_logging
from fedbrats.precision import cpu_has_native_bf16
from fedbrats.runs import RunFolder

logger = logging.getLogger(f"fedbrats.{__name__}")

PROG = "python experiments/main_job.py"
#: The README's main command, with the job folder and workspace filled in.
SIMULATOR = ["-m", "nvflare.cli", "simulator", "{job}", "-w", "{workspace}", "-n", "4", "-t", "4"]


def seeded_job(job_dir: str, out_dir: str, seed: int) -> str:
    """A copy of the committed job folder with ``seed`` in the server's and the sites' configuration."""
    target = os.path.join(out_dir, f"{os.path.basename(os.path.normpath(job_dir))}-seed{seed}")
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(job_dir, target)
    config = os.path.join(target, "app", "config")
    server_path, client_path = (os.path.join(config, f"config_fed_{side}.json") for side in ("server", "client"))
    with open(server_path, encoding="utf-8") as f:
        server = json.load(f)
    with open(client_path, encoding="utf-8") as f:
        client = json.load(f)
    controllers = [w for w in server["workflows"] if "seed" in w.get("args", {})]
    trainers = [e for e in client["executors"] if "seed" in e["executor"]["args"].get("training", {})]
    if len(controllers) != 1 or len(trainers) != 1:
        raise ValueError(f"{job_dir}: expected one seed in the server's workflow and one in the sites' training")
    controllers[0]["args"]["seed"] = seed
    trainers[0]["executor"]["args"]["training"]["seed"] = seed
    for path, content in ((server_path, server), (client_path, client)):
        with open(path, "w", encoding="utf-8") as f:
            json.dump(content, f, indent=4)
    return target


def final_validation(run_dir: str) -> dict[str, Any]:
    """The final validation the server recorded: the aggregate (mean and per region) and each site's mean Dice."""
    with open(RunFolder(run_dir).metrics, encoding="utf-8") as f:
        history = json.load(f)
    final = next((r for r in reversed(history) if r.get("final_validation")), None)
    if final is None:
        raise RuntimeError(f"{run_dir}: metrics.json holds no final validation; the run did not finish")
    aggregated = final.get("aggregated") or {}
    trained = [r for r in history if not r.get("final_validation") and r.get("sites")]
    modalities = {site: entry.get("modalities") for site, entry in (trained[-1]["sites"] if trained else {}).items()}
    return {
        "mean_dice": aggregated.get(KEY_METRIC),
        "dice": {r: aggregated.get(f"{METRIC_PREFIX}dice_{r}") for r in REGIONS},
        "sites": {
            site: {
                "modalities": modalities.get(site),
                "mean_dice": (entry.get("metrics") or {}).get(KEY_METRIC),
            }
            for site, entry in sorted((final.get("sites") or {}).items())
        },
        "rounds": sum(1 for r in history if not r.get("final_validation")),
    }


def run_seed(job_dir: str, workspace: str, seed: int) -> dict[str, Any]:
    """Run the README's command on the seeded copy of the job; its wall time and final validation."""
    jobs = os.path.join(workspace, "jobs")
    os.makedirs(jobs, exist_ok=True)
    job = seeded_job(job_dir, jobs, seed)
    sim_ws = os.path.join(workspace, f"seed{seed}")
    shutil.rmtree(sim_ws, ignore_errors=True)
    env = dict(os.environ, **{CACHE_ENV: os.path.join(workspace, f"cache-seed{seed}")})
    shutil.rmtree(env[CACHE_ENV], ignore_errors=True)
    env.pop("FEDBRATS_SITE_CONFIG", None)  # the embedded synthetic federation, as on a fresh machine
    cmd = [sys.executable, *(part.format(job=job, workspace=sim_ws) for part in SIMULATOR)]
    log = os.path.join(workspace, f"seed{seed}.log")
    started = time.monotonic()
    with open(log, "w", encoding="utf-8") as out:
        code = subprocess.run(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, check=False).returncode
    seconds = time.monotonic() - started
    if code != 0:
        raise RuntimeError(f"seed {seed}: the simulator exited with {code}; see {log}")
    run_dir = os.path.join(sim_ws, "server", "simulate_job")
    result = final_validation(run_dir)
    return {"seed": seed, "wall_seconds": round(seconds, 1), "run_dir": run_dir, **result}


def copy_cross_site(run: dict[str, Any], out_dir: str) -> str | None:
    """The federated (cross-site) evaluation the job ended with, as its report in ``out_dir/seed<k>/cross_site``
    (None when the run had none); the site-weighted mean Dice of the final global model goes into ``run``."""
    from fedbrats.federated.server.cross_site_report import write_cross_site_report

    if not run.get("run_dir") or not os.path.isfile(RunFolder(run["run_dir"]).cross_site_results):
        return None
    folder = os.path.join(out_dir, f"seed{run['seed']}", "cross_site")
    written = write_cross_site_report(run["run_dir"], out_dir=folder)
    with open(written["summary"], encoding="utf-8") as f:
        summary = json.load(f)
    final = summary["models"].get("FL_global_model.pt") or {}
    run["cross_site"] = {
        "report": os.path.relpath(folder, out_dir),
        "final_site_weighted_mean_dice": (final.get("site_weighted_mean") or {}).get("mean_dice"),
        "final_worst_site": final.get("worst_site"),
    }
    return folder


def write_report(out_dir: str, runs: list[dict[str, Any]], command: str, job_dir: str) -> None:
    """``results.json`` and ``report.md``: each seed's final validation and wall time, and the machine."""
    machine = {
        "cpu_model": cpu_model(),
        "logical_cores": os.cpu_count(),
        "native_bfloat16": cpu_has_native_bf16(),
        "torch": torch.__version__,
        "os": platform.platform(),
    }
    for run in runs:
        copy_cross_site(run, out_dir)
    runs = [{k: v for k, v in r.items() if k != "run_dir"} for r in runs]  # a path of this machine: not reported
    means = [r["mean_dice"] for r in runs]
    summary = {"mean_over_seeds": sum(means) / len(means), "lowest": min(means), "highest": max(means)}
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.json"), "w", encoding="utf-8") as f:
        json.dump({"command": command, "job": job_dir, "machine": machine, "runs": runs, **summary}, f, indent=2)
    precision = "bfloat16 (native)" if machine["native_bfloat16"] else "float32 (no native bfloat16 on this CPU)"
    lines = [
        f"Produced by: `{command}`",
        "",
        f"Each run: `nvflare simulator {job_dir} -w W -n 4 -t 4` with the seed set in both configs and a fresh data "
        "cache (data generation included in the time). Final validation mean Dice of the global model over the four "
        "sites' validation cases (each site with its own sequences; site-weighted aggregate).",
        "",
        f"Machine: {machine['cpu_model']}, {machine['logical_cores']} logical cores, torch {machine['torch']}; "
        f"training precision `auto` = {precision}.",
        "",
        "| seed | rounds | mean Dice | WT | TC | ET | " + " | ".join(runs[0]["sites"]) + " | wall time (s) |",
        "|--:|--:|--:|--:|--:|--:|" + "--:|" * len(runs[0]["sites"]) + "--:|",
    ]
    for r in runs:
        sites = " | ".join(f"{s['mean_dice']:.3f}" for s in r["sites"].values())
        dice = " | ".join(f"{r['dice'][region]:.3f}" for region in REGIONS)
        lines.append(
            f"| {r['seed']} | {r['rounds']} | {r['mean_dice']:.3f} | {dice} | {sites} | {r['wall_seconds']:.1f} |"
        )
    lines += [
        "",
        f"Mean over seeds {summary['mean_over_seeds']:.3f}, lowest {summary['lowest']:.3f}, highest "
        f"{summary['highest']:.3f}.",
        "",
    ]
    evaluated = [r for r in runs if r.get("cross_site")]
    if evaluated:
        lines += [
            "The federated evaluation the job ended with (each site scores the final and the best global model on "
            "its own test cases, with its own sequences):",
            "",
            "| seed | final model, site-weighted mean Dice | worst site | matrix |",
            "|--:|--:|--|--|",
        ]
        for r in evaluated:
            worst = r["cross_site"]["final_worst_site"] or {}
            weighted = r["cross_site"]["final_site_weighted_mean_dice"]
            lines.append(
                f"| {r['seed']} | {'n/a' if weighted is None else f'{weighted:.3f}'} | "
                f"{worst.get('site', 'n/a')} ({worst.get('mean_dice', float('nan')):.3f}) | "
                f"[{r['cross_site']['report']}]({r['cross_site']['report']}/cross_site_matrix.md) |"
            )
        lines.append("")
    with open(os.path.join(out_dir, "report.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", required=True, help="where results.json and report.md go")
    parser.add_argument("--workspace", required=True, help="the runs' workspace (job copies, simulator, caches)")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    parser.add_argument("--job-dir", default="jobs/fedkd", help="the committed job folder (default: %(default)s)")
    args = parser.parse_args(argv)
    configure_logging("INFO")
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        logger.error("--seeds must be comma-separated integers, got %r", args.seeds)
        return 1
    if not os.path.isdir(args.job_dir):
        logger.error("--job-dir %r is not a job folder", args.job_dir)
        return 1
    command = PROG + " " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    runs = []
    for seed in seeds:
        runs.append(run_seed(args.job_dir, os.path.abspath(args.workspace), seed))
        logger.info(
            "seed %d: final validation mean Dice %.4f in %.1f s", seed, runs[-1]["mean_dice"], runs[-1]["wall_seconds"]
        )
    write_report(args.out_dir, runs, command, args.job_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
