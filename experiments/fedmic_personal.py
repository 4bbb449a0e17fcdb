"""FedMIC's personalised models, scored: each site's own model against the shared global model, on the test cases
with that site's sequences.

``python experiments/fedmic_personal.py --workspace W --out-dir OUT`` reads a finished ``fedbrats simulate fedmic``
workspace: every site's personalised model (its run folder: ``fedmic_personal_best.pt``, the best on the site's
validation cases, by default; ``--personal last`` for ``fedmic_personal.pt``) and the server's best global model, and
scores each
on the federation's test cases with the sequences the site has (the combination it is deployed for). With
``--baseline W2`` (a finished run of another job, e.g. FedAvg) its global model is scored the same way. It imports
the package; the package never imports it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
from typing import Any

import torch

from fedbrats.constants import REGIONS
from fedbrats.data.site_config import federation_sites_file, load_site_config
from fedbrats.evaluation.evaluate import default_test_datalist, evaluate_combinations, load_model
from fedbrats.federated.methods.fedmic import PERSONAL_BEST_FILE, PERSONAL_STATE_FILE
from fedbrats.logging_setup import configure_logging
from fedbrats.networks import build_network
from fedbrats.runs import RunFolder
from fedbrats.simulate import simulated_run_dir, simulated_site_run_dir, simulator_workspace

logger = logging.getLogger(f"fedbrats.{__name__}")
PROG = "python experiments/fedmic_personal.py"


def personal_model(path: str) -> torch.nn.Module:
    """The personalised network a site saved (its registered network, built from the saved spec; the best or the
    last file)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    network = state["network"]
    model = build_network(network["name"], **network.get("args", {}))
    model.load_state_dict(state["model"])
    return model.eval()


def global_model(workspace: str) -> torch.nn.Module:
    """The best global model of a finished simulated run (the last one if no best was kept)."""
    run = RunFolder(simulated_run_dir(workspace))
    path = run.best_global_model if os.path.isfile(run.best_global_model) else run.global_model
    return load_model(path, run.model_spec)


def _row(results: dict[str, Any]) -> dict[str, float]:
    row = next(iter(results["combinations"].values()))
    return {**{r: row["dice"][r] for r in REGIONS}, "mean": row["mean_dice"]}


def summarise(folders: list[str], out_dir: str, command: str) -> str:
    """Mean ± std over seeds of each site's row in the ``personal.json`` of ``folders`` (one per seed), and per
    site the mean difference of the personalised model to the others with the seeds where it is lower; returns the
    markdown.

    Raises:
        ValueError: a folder without ``personal.json``.
    """
    runs = []
    for folder in folders:
        path = os.path.join(folder, "personal.json")
        if not os.path.isfile(path):
            raise ValueError(f"--summarise: {path} does not exist; score that seed first")
        with open(path, encoding="utf-8") as f:
            runs.append(json.load(f)["sites"])
    sites = sorted(set.intersection(*(set(r) for r in runs)))
    names = [n for n in ("personalised", "shared (FedMIC global)", "baseline global") if n in runs[0][sites[0]]]
    lines = [
        f"Produced by `{command}`",
        "",
        f"Mean Dice on the test cases with each site's own sequences, mean ± std over {len(runs)} seeds.",
        "",
        "| site | sequences | " + " | ".join(names) + " |",
        "|---|---|" + "--:|" * len(names),
    ]
    for site in sites:
        cells = []
        for n in names:
            values = torch.tensor([r[site][n]["mean"] for r in runs], dtype=torch.float64)
            cells.append(f"{values.mean():.3f} ± {values.std(unbiased=True) if len(runs) > 1 else 0.0:.3f}")
        lines.append(f"| {site} | {runs[0][site]['sequences']} | " + " | ".join(cells) + " |")
    lines += ["", "Personalised minus the other model (mean over seeds; seeds where the personalised is lower):", ""]
    lines += ["| site | " + " | ".join(f"vs {n}" for n in names[1:]) + " |", "|---|" + "--:|" * (len(names) - 1)]
    for site in sites:
        cells = []
        for n in names[1:]:
            diffs = [r[site]["personalised"]["mean"] - r[site][n]["mean"] for r in runs]
            cells.append(f"{sum(diffs) / len(diffs):+.3f} ({sum(d < 0 for d in diffs)} of {len(diffs)})")
        lines.append(f"| {site} | " + " | ".join(cells) + " |")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "summary.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--summarise",
        nargs="+",
        default=None,
        metavar="SEED_OUT_DIR",
        help="score nothing: summarise the --out-dir of several seeds' runs into OUT_DIR/summary.md",
    )
    p.add_argument("--workspace", default=None, help="a finished `fedbrats simulate fedmic` workspace")
    p.add_argument("--baseline", default=None, help="a finished workspace of another job (its global model)")
    p.add_argument("--sites", default=None, help="the federation's sites.json (default: the synthetic one)")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--roi", type=int, default=32, help="sliding-window side")
    p.add_argument("--zoom", type=float, default=1.0)
    p.add_argument(
        "--personal",
        choices=("best", "last"),
        default="best",
        help=f"which personalised model: the best on the site's validation cases ({PERSONAL_BEST_FILE}, written by "
        f"runs since #28) or the last ({PERSONAL_STATE_FILE})",
    )
    a = p.parse_args(argv)
    configure_logging("INFO")
    command = " ".join([PROG, *(shlex.quote(x) for x in (argv if argv is not None else sys.argv[1:]))])
    if a.summarise:
        logger.info("\n%s", summarise(a.summarise, a.out_dir, command))
        return 0
    if not a.workspace:
        p.error("--workspace is required (or --summarise)")
    sites_file = federation_sites_file(a.sites, "fedmic_personal")
    test = default_test_datalist(sites_file)
    data = {"roi_size": [a.roi] * 3, "zoom": a.zoom}
    sim = simulator_workspace(a.workspace)
    sites = sorted(d for d in os.listdir(sim) if d not in ("server", "startup") and os.path.isdir(f"{sim}/{d}"))
    shared = global_model(a.workspace)
    baseline = global_model(a.baseline) if a.baseline else None
    table: dict[str, Any] = {}
    for site in sites:
        personal_file = PERSONAL_BEST_FILE if a.personal == "best" else PERSONAL_STATE_FILE
        path = os.path.join(simulated_site_run_dir(a.workspace, site), personal_file)
        if not os.path.isfile(path):
            logger.warning("%s: no %s; skipped (--personal last for the last model)", site, personal_file)
            continue
        combo = [tuple(load_site_config(sites_file, site).modalities)]
        row = {"sequences": "+".join(combo[0])}
        models = {"personalised": personal_model(path), "shared (FedMIC global)": shared}
        if baseline is not None:
            models["baseline global"] = baseline
        for name, model in models.items():
            row[name] = _row(evaluate_combinations(model, test, data=data, combinations=combo, model_name=name))
        table[site] = row
        logger.info("%s: %s", site, row)
    candidates = ("personalised", "shared (FedMIC global)", "baseline global")
    names = [n for n in candidates if any(n in r for r in table.values())]
    caption = (
        f"Mean Dice on the test cases with each site's own sequences (WT / TC / ET); personalised: the {a.personal} "
        "model."
    )
    lines = [f"Produced by `{command}`", "", caption, ""]
    lines += ["| site | sequences | " + " | ".join(names) + " |", "|---|---|" + "--:|" * len(names)]
    for site, row in table.items():
        cells = [f"{row[n]['mean']:.3f} ({row[n]['WT']:.2f} / {row[n]['TC']:.2f} / {row[n]['ET']:.2f})" for n in names]
        lines.append(f"| {site} | {row['sequences']} | " + " | ".join(cells) + " |")
    os.makedirs(a.out_dir, exist_ok=True)
    with open(os.path.join(a.out_dir, "personal.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(a.out_dir, "personal.json"), "w", encoding="utf-8") as f:
        json.dump({"command": command, "personal": a.personal, "sites": table}, f, indent=2)
    logger.info("\n%s", "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
