"""``fedbrats cross-site RUN_DIR``: the report of a job's federated cross-site evaluation.

At the end of a job the server sends each model (the final and the best global model, each site's own model) to
every site; each site scores it on its own labelled test cases, with its own sequences, and sends back aggregates
only (the keys of :func:`fedbrats.federated.protocol.cross_site_metric_key`). NVFlare writes them to
``<run_dir>/cross_site_val/cross_val_results.json`` as ``{data_site: {model_name: metrics}}``, and the evaluator the
failures to ``cross_site_errors.json`` next to it. This module reads both and writes, into the same folder:

- ``cross_site_summary.json``: per model, each site's scores, the worst site, the site-weighted mean (weighted by
  the number of test cases) and the plain mean over sites;
- ``cross_site_matrix.md``: the model x site matrix of mean Dice and the per-region means;
- ``cross_site_heatmap.png``: the same matrix as a heatmap.

Nothing is read from the models or the data, so it works on a downloaded run folder.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fedbrats.commands import run_command
from fedbrats.constants import REGIONS, combination_name, modality_combinations
from fedbrats.federated.protocol import (
    TEST_METRICS,
    TEST_NUM_CASES_KEY,
    cross_site_combination_key,
    cross_site_metric_key,
)
from fedbrats.runs import (
    BEST_GLOBAL_MODEL_FILE,
    CROSS_SITE_DIR,
    CROSS_SITE_ERRORS_FILE,
    CROSS_SITE_HEATMAP_FILE,
    CROSS_SITE_MATRIX_FILE,
    CROSS_SITE_RESULTS_FILE,
    CROSS_SITE_SUMMARY_FILE,
    GLOBAL_MODEL_FILE,
    RunFolder,
    find_in_one_run,
    read_json,
)
from fedbrats.utils import write_atomic, write_json_atomic

logger = logging.getLogger(__name__)

#: How the server's models are named in human-readable output (any other model is shown by its name).
MODEL_LABELS: dict[str, str] = {GLOBAL_MODEL_FILE: "global (final)", BEST_GLOBAL_MODEL_FILE: "global (best)"}
#: Their names in scalar tags (a tag holds no file suffix).
MODEL_TAGS: dict[str, str] = {GLOBAL_MODEL_FILE: "global_final", BEST_GLOBAL_MODEL_FILE: "global_best"}
#: Scalar tags of the cross-site evaluation start with this.
SCALAR_PREFIX = "cross_site"
#: The reason given to a (site, model) pair whose results hold no metrics (NVFlare writes ``null`` then).
NO_METRICS_REASON = "the site returned no metrics"
#: What a cell of the matrix is, said once in the markdown and the heatmap.
CELL_MEANING = (
    "A cell is the model's mean Dice (over WT, TC and ET) on the site's own labelled test cases, given the site's "
    "own sequences; higher is better."
)


# ---- reading -----------------------------------------------------------------------------------------------------
def _results_file(run_dir_or_file: str) -> str:
    """The ``cross_val_results.json`` behind a run folder, its ``cross_site_val/`` folder or the file itself."""
    path = os.fspath(run_dir_or_file)
    if os.path.isfile(path):
        return path
    if not os.path.isdir(path):
        raise ValueError(
            f"{path!r} does not exist; pass the server's run folder (it holds {CROSS_SITE_DIR}/"
            f"{CROSS_SITE_RESULTS_FILE}) or that file"
        )
    for candidate in (RunFolder(path).cross_site_results, os.path.join(path, CROSS_SITE_RESULTS_FILE)):
        if os.path.isfile(candidate):
            return candidate
    # A simulator workspace nests the run folder (e.g. <workspace>/server/simulate_job/cross_site_val).
    found = find_in_one_run(path, CROSS_SITE_DIR, CROSS_SITE_RESULTS_FILE, what="results file")
    if found:
        return found
    raise ValueError(
        f"folder {path!r} holds no {CROSS_SITE_DIR}/{CROSS_SITE_RESULTS_FILE}: did the job run its cross-site "
        "evaluation? Pass the server's run folder or the results file"
    )


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _nested(content: Any, path: str, what: str) -> dict[str, dict[str, Any]]:
    """``content`` checked to be ``{data_site: {model_name: value}}``."""
    if not isinstance(content, dict) or not all(isinstance(v, dict) for v in content.values()):
        raise ValueError(f"{what} {path!r} is not {{data_site: {{model_name: ...}}}} (a JSON object of objects)")
    return content


def read_cross_site_results(
    run_dir_or_file: str,
) -> tuple[dict[str, dict[str, dict[str, float]]], dict[str, dict[str, str]]]:
    """The cross-site results of a run and its failed evaluations.

    Args:
        run_dir_or_file: the server's run folder (its ``cross_site_val/`` is read), that ``cross_site_val/``
            folder, a simulator workspace holding one run, or the ``cross_val_results.json`` itself (the errors are
            read from the file next to it).

    Returns:
        ``(results, errors)``: ``{data_site: {model_name: {metric: value}}}`` and
        ``{data_site: {model_name: reason}}`` (empty when there is no errors file). A model whose results hold
        ``null`` (NVFlare's record of a site that returned no metrics) is moved to the errors.

    Raises:
        ValueError: no results file where the path points, or a file that is not valid JSON of that form (the file
            is named; a metric that is not a number is named with its site and model).
    """
    path = _results_file(run_dir_or_file)
    results = _nested(read_json(path, "cross-site results"), path, "cross-site results")
    errors_path = os.path.join(os.path.dirname(path), CROSS_SITE_ERRORS_FILE)
    errors: dict[str, dict[str, str]] = {}
    if os.path.isfile(errors_path):
        raw = _nested(read_json(errors_path, "cross-site errors"), errors_path, "cross-site errors")
        errors = {site: {model: str(reason) for model, reason in models.items()} for site, models in raw.items()}
    clean: dict[str, dict[str, dict[str, float]]] = {}
    for site, models in results.items():
        for model, metrics in models.items():
            if metrics is None:
                errors.setdefault(site, {}).setdefault(model, NO_METRICS_REASON)
                continue
            if not isinstance(metrics, dict):
                raise ValueError(f"cross-site results {path!r}: {site}/{model} is not a JSON object of metrics")
            bad = sorted(k for k, v in metrics.items() if not _is_number(v))
            if bad:
                raise ValueError(
                    f"cross-site results {path!r}: {site}/{model} holds metrics that are not numbers {bad}"
                )
            clean.setdefault(site, {})[model] = {k: float(v) for k, v in metrics.items()}
    return clean, errors


# ---- the summary -------------------------------------------------------------------------------------------------
def model_label(model: str) -> str:
    """How a model is named in human-readable output: ``global (final)``, ``global (best)``, else its name."""
    return MODEL_LABELS.get(model, model)


def _model_order(models: Sequence[str]) -> list[str]:
    first = [m for m in (GLOBAL_MODEL_FILE, BEST_GLOBAL_MODEL_FILE) if m in models]
    return first + sorted(m for m in set(models) if m not in first)


def _finite(value: Any) -> float | None:
    return float(value) if _is_number(value) and math.isfinite(value) else None


def _scores(metrics: Mapping[str, float], all15: bool = False) -> dict[str, Any]:
    """One site's scores of one model: mean Dice and HD95, and per region (all15: those over the 15 combinations)."""
    scores: dict[str, Any] = {}
    for metric in TEST_METRICS:
        scores[f"mean_{metric}"] = _finite(metrics.get(cross_site_metric_key(metric, all15=all15)))
        # The contract sends no per-region HD95 over the 15 combinations: no column of empty values for it.
        if not (all15 and metric == "hd95"):
            scores[metric] = {r: _finite(metrics.get(cross_site_metric_key(metric, r, all15=all15))) for r in REGIONS}
    return scores


def _site_entry(metrics: Mapping[str, float], num_cases: int) -> dict[str, Any]:
    entry: dict[str, Any] = {"num_cases": num_cases, **_scores(metrics)}
    if _finite(metrics.get(cross_site_metric_key("dice", all15=True))) is not None:
        entry["all15"] = _scores(metrics, all15=True)
    combinations = {
        combination_name(c): _finite(metrics.get(cross_site_combination_key(c))) for c in modality_combinations()
    }
    combinations = {name: value for name, value in combinations.items() if value is not None}
    if combinations:
        entry["combinations"] = combinations
    return entry


def _mean(values: Sequence[float | None], weights: Sequence[float]) -> float | None:
    """The weighted mean of the known values (a site without a value leaves the mean, not the others)."""
    pairs = [(v, w) for v, w in zip(values, weights) if v is not None and w > 0]
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if total > 0 else None


def _aggregate(entries: Mapping[str, Mapping[str, Any]], weighted: bool) -> dict[str, Any] | None:
    """The mean over sites of every score of :func:`_scores`, weighted by the sites' test cases or not."""
    if not entries:
        return None
    sites = list(entries.values())
    weights = [float(e["num_cases"]) if weighted else 1.0 for e in sites]
    out: dict[str, Any] = {"num_sites": len(sites), "num_cases": sum(int(e["num_cases"]) for e in sites)}
    for key, value in sites[0].items():
        if key.startswith("mean_"):
            out[key] = _mean([e.get(key) for e in sites], weights)
        elif key in TEST_METRICS:
            out[key] = {r: _mean([(e.get(key) or {}).get(r) for e in sites], weights) for r in value}
    return out


def _worst(entries: Mapping[str, Mapping[str, Any]]) -> dict[str, Any] | None:
    known = [(e["mean_dice"], site) for site, e in entries.items() if e.get("mean_dice") is not None]
    if not known:
        return None
    value, site = min(known)  # ties go to the first site by name
    return {"site": site, "mean_dice": value}


def cross_site_summary(
    results: Mapping[str, Mapping[str, Mapping[str, float]]],
    errors: Mapping[str, Mapping[str, str]] | None = None,
) -> dict[str, Any]:
    """The cross-site evaluation per model: each site's scores, the worst site and the means over sites.

    A site with no test cases (``test_num_cases`` 0 or absent) and a failed (site, model) evaluation are named
    (``no_test_cases``, ``errors``) and left out of the means and of the worst site. A failure recorded in
    ``errors`` wins over results of the same pair (the evaluator said they are not to be trusted). A site that sent
    its case count without scores (fewer than the job's ``min_test_cases``) is under the model's ``withheld`` (site
    -> cases) and left out likewise. Each mean is over
    the sites that have that score (a NaN score leaves its site out of that mean only).

    Args:
        results: ``{data_site: {model_name: metrics}}``, as :func:`read_cross_site_results` returns.
        errors: ``{data_site: {model_name: reason}}``.

    Returns:
        JSON-serialisable: ``{"sites": [...], "models": {model: {...}}, "no_test_cases": [...], "errors": [...]}``,
        models in the order final global model, best global model, then the others by name. Each model holds
        ``label``, ``sites`` (site -> ``num_cases``, ``mean_dice``, ``dice`` per region, ``mean_hd95``, ``hd95``,
        and where the site has all four sequences ``all15`` and ``combinations``), ``no_test_cases``, ``errors``
        (site -> reason), ``worst_site`` (``{"site", "mean_dice"}``), ``site_weighted_mean`` and
        ``mean_over_sites`` (the scores plus ``num_sites`` and ``num_cases``), and ``all15`` (the same two means
        over the sites that have the 15-combination scores) or ``None``.
    """
    errors = errors or {}
    models = _model_order(
        [m for site in results.values() for m in site] + [m for site in errors.values() for m in site]
    )
    sites = sorted(set(results) | set(errors))
    summary: dict[str, Any] = {"sites": sites, "models": {}, "no_test_cases": [], "errors": []}
    no_cases: set[str] = set()
    for model in models:
        scored: dict[str, dict[str, Any]] = {}
        failed: dict[str, str] = {}
        empty: list[str] = []
        withheld: dict[str, int] = {}
        for site in sites:
            if model in errors.get(site, {}):
                failed[site] = errors[site][model]
                summary["errors"].append({"model": model, "site": site, "reason": errors[site][model]})
                continue
            metrics = results.get(site, {}).get(model)
            if metrics is None:
                continue  # this site was not asked to score this model
            num_cases = int(_finite(metrics.get(TEST_NUM_CASES_KEY)) or 0)
            if num_cases <= 0:
                empty.append(site)
                continue
            if _finite(metrics.get(cross_site_metric_key("dice"))) is None:
                # The site counted its cases but sent no score: too few to be anyone's but a patient's.
                withheld[site] = num_cases
                continue
            scored[site] = _site_entry(metrics, num_cases)
        no_cases.update(empty)
        all15 = {s: {**e["all15"], "num_cases": e["num_cases"]} for s, e in scored.items() if "all15" in e}
        summary["models"][model] = {
            # A model named like a site is that site's own (local-only, personalised): said, beside its column.
            "label": f"{model} (own model)" if model in sites else model_label(model),
            "sites": scored,
            "no_test_cases": empty,
            "withheld": withheld,
            "errors": failed,
            "worst_site": _worst(scored),
            "site_weighted_mean": _aggregate(scored, weighted=True),
            "mean_over_sites": _aggregate(scored, weighted=False),
            "all15": None
            if not all15
            else {
                "sites": sorted(all15),
                "site_weighted_mean": _aggregate(all15, weighted=True),
                "mean_over_sites": _aggregate(all15, weighted=False),
            },
        }
    summary["no_test_cases"] = sorted(no_cases)
    return summary


# ---- markdown ----------------------------------------------------------------------------------------------------
def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _site_cases(summary: Mapping[str, Any], site: str) -> str:
    """A site's test cases over the models it scored: ``4 cases``, ``4-5 cases``, or ``no test cases``."""
    counts = sorted(
        {m["sites"][site]["num_cases"] for m in summary["models"].values() if site in m["sites"]}
        | {m["withheld"][site] for m in summary["models"].values() if site in m.get("withheld", {})}
    )
    if not counts:
        return "no test cases" if site in summary["no_test_cases"] else "not scored"
    text = str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    return f"{text} case{'' if counts == [1] else 's'}"


def _cell(model: Mapping[str, Any], site: str) -> str:
    if site in model["sites"]:
        return _fmt(model["sites"][site]["mean_dice"])
    if site in model["errors"]:
        return "failed"
    if site in model["no_test_cases"]:
        return "no cases"
    if site in model.get("withheld", {}):
        n = model["withheld"][site]
        return f"withheld ({n} case{'' if n == 1 else 's'})"
    return "–"


def _table_head(header: Sequence[str]) -> list[str]:
    """A markdown table's header row and its separator (the first column left-aligned, the numbers right)."""
    return ["| " + " | ".join(header) + " |", "|---|" + "|".join(["--:"] * (len(header) - 1)) + "|"]


def format_cross_site_markdown(summary: Mapping[str, Any]) -> str:
    """Markdown of :func:`cross_site_summary`: the model x site matrix of mean Dice, the per-region means, the
    15-combination means where sites have them, and the sites without test cases and the failed evaluations.

    Raises:
        ValueError: ``summary`` is not what :func:`cross_site_summary` returns.
    """
    if not isinstance(summary, Mapping) or "models" not in summary or "sites" not in summary:
        raise ValueError("summary must be what cross_site_summary returns (with 'models' and 'sites')")
    sites, models = list(summary["sites"]), summary["models"]
    header = ["Model", *(f"{site} ({_site_cases(summary, site)})" for site in sites)]
    header += ["worst site", "site-weighted mean", "mean over sites"]
    lines = [
        "# Cross-site evaluation",
        "",
        f"{CELL_MEANING} The site-weighted mean weights each site by its test cases; the mean over sites weights "
        "each site alike. Sites without test cases and failed evaluations are left out of the means.",
        "",
        "## Mean Dice per model and site",
        "",
        *_table_head(header),
    ]
    for model in models.values():
        worst = model["worst_site"]
        weighted, plain = model["site_weighted_mean"] or {}, model["mean_over_sites"] or {}
        cells = [model["label"], *(_cell(model, site) for site in sites)]
        cells += [
            f"{worst['site']} ({_fmt(worst['mean_dice'])})" if worst else "n/a",
            _fmt(weighted.get("mean_dice")),
            _fmt(plain.get("mean_dice")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    region_header = ["Model", *(f"Dice {r}" for r in REGIONS), "Dice mean", *(f"HD95 {r}" for r in REGIONS)]
    region_header += ["HD95 mean", "sites", "cases"]
    lines += [
        "",
        "## Site-weighted mean per region",
        "",
        "Dice higher is better; HD95 in mm, lower is better.",
        "",
        *_table_head(region_header),
    ]
    for model in models.values():
        mean = model["site_weighted_mean"]
        if not mean:
            lines.append("| " + " | ".join([model["label"], *["n/a"] * 8, "0", "0"]) + " |")
            continue
        cells = [_fmt(mean["dice"][r]) for r in REGIONS] + [_fmt(mean["mean_dice"])]
        cells += [_fmt(mean["hd95"][r], 1) for r in REGIONS] + [_fmt(mean["mean_hd95"], 1)]
        lines.append("| " + " | ".join([model["label"], *cells, str(mean["num_sites"]), str(mean["num_cases"])]) + " |")
    with_all15 = [m for m in models.values() if m["all15"]]
    if with_all15:
        lines += [
            "",
            "## Mean over the 15 sequence combinations",
            "",
            "At the sites that have all four sequences: the model given each of the 15 non-empty subsets of them.",
            "",
            "| Model | sites | site-weighted mean Dice | mean Dice over sites | site-weighted mean HD95 |",
            "|---|---|--:|--:|--:|",
        ]
        for model in with_all15:
            weighted, plain = model["all15"]["site_weighted_mean"], model["all15"]["mean_over_sites"]
            cells = [
                model["label"],
                ", ".join(model["all15"]["sites"]),
                _fmt(weighted["mean_dice"]),
                _fmt(plain["mean_dice"]),
                _fmt(weighted["mean_hd95"], 1),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    if summary["no_test_cases"]:
        lines += [f"Sites without test cases (left out): {', '.join(summary['no_test_cases'])}.", ""]
    withheld = sorted({site for model in models.values() for site in model.get("withheld", {})})
    if withheld:
        lines += [
            f"Sites that withheld their scores (fewer test cases than the job's min_test_cases; a score over one case "
            f"is that patient's): {', '.join(withheld)}.",
            "",
        ]
    if summary["errors"]:
        lines += ["Failed evaluations (left out):", ""]
        lines += [
            f"- {model_label(e['model'])} at {e['site']}: {' '.join(str(e['reason']).split())}"
            for e in summary["errors"]
        ]
        lines.append("")
    return "\n".join(lines)


# ---- heatmap -----------------------------------------------------------------------------------------------------
def plot_cross_site_heatmap(summary: Mapping[str, Any], path: str) -> str:
    """Draw the model x site matrix of mean Dice (plus the site-weighted mean column) into the PNG ``path``.

    Cells of failed evaluations and of sites without test cases are blank (grey), with the reason in words.

    Returns:
        ``path``.

    Raises:
        ValueError: the summary holds no model or no site.
    """
    # The object-oriented API with an explicit Agg canvas: no pyplot state, no display needed, thread safe.
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    sites, models = list(summary.get("sites") or []), list((summary.get("models") or {}).values())
    if not sites or not models:
        raise ValueError("summary holds no model or no site to plot; is it what cross_site_summary returns?")
    matrix = np.full((len(models), len(sites) + 1), np.nan)
    texts = [[_cell(model, site) for site in sites] for model in models]
    for i, model in enumerate(models):
        for j, site in enumerate(sites):
            value = (model["sites"].get(site) or {}).get("mean_dice")
            matrix[i, j] = np.nan if value is None else value
        weighted = (model["site_weighted_mean"] or {}).get("mean_dice")
        matrix[i, -1] = np.nan if weighted is None else weighted
        texts[i].append(_fmt(weighted, 2) if weighted is not None else "n/a")
    columns = [f"{site}\n({_site_cases(summary, site)})" for site in sites] + ["site-weighted\nmean"]

    fig = Figure(figsize=(2.0 + 1.2 * len(columns), 1.8 + 0.45 * len(models)), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    cmap = colormaps["RdYlGn"].with_extremes(bad="lightgrey")  # blank cells grey, not white like a low score
    im = ax.imshow(np.ma.masked_invalid(matrix), cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(columns)), columns, fontsize=8)
    ax.set_yticks(range(len(models)), [m["label"] for m in models], fontsize=8)
    ax.tick_params(axis="x", top=True, labeltop=True, bottom=False, labelbottom=False)
    for i in range(matrix.shape[0]):
        for j in range(matrix.shape[1]):
            value = matrix[i, j]
            text = f"{value:.2f}" if np.isfinite(value) else texts[i][j]
            # Both ends of the red-yellow-green map are dark: white text there, black in the light middle.
            color = "white" if np.isfinite(value) and (value < 0.2 or value > 0.85) else "black"
            weight = "bold" if j == matrix.shape[1] - 1 else "normal"
            ax.text(j, i, text, ha="center", va="center", fontsize=8, color=color, fontweight=weight)
    ax.axvline(matrix.shape[1] - 1.5, color="black", linewidth=1.5)  # the mean column is no site
    fig.colorbar(im, ax=ax, label="mean Dice", shrink=0.8)
    ax.set_title("Cross-site evaluation: mean Dice on each site's own test cases and sequences", fontsize=10)

    def save(tmp: str) -> None:
        fig.savefig(tmp, dpi=120, format="png")

    write_atomic(path, save, suffix=".png")
    return path


# ---- the report --------------------------------------------------------------------------------------------------
def write_cross_site_report(run_dir: str, out_dir: str | None = None) -> dict[str, str]:
    """Read a run's cross-site results and write ``cross_site_summary.json``, ``cross_site_matrix.md`` and
    ``cross_site_heatmap.png``.

    Each file is written under its own name in ``out_dir`` by a rename (:func:`fedbrats.utils.write_atomic`), so a
    link of that name to a file elsewhere is replaced, never written through.

    Args:
        run_dir: what :func:`read_cross_site_results` accepts (the server's run folder, usually).
        out_dir: the folder to write to (created); default the folder of the results file (``cross_site_val/``).

    Returns:
        ``{"summary", "markdown", "heatmap"}`` -> path.

    Raises:
        ValueError: no results, results that are malformed, or results holding no evaluation at all.
    """
    source = _results_file(run_dir)
    results, errors = read_cross_site_results(source)
    summary = cross_site_summary(results, errors)
    if not summary["models"]:
        raise ValueError(f"cross-site results {source!r} hold no evaluation (no site reported any model)")
    out = out_dir if out_dir is not None else os.path.dirname(source)
    if not out:
        out = "."
    os.makedirs(out, exist_ok=True)
    paths = {
        "summary": os.path.join(out, CROSS_SITE_SUMMARY_FILE),
        "markdown": os.path.join(out, CROSS_SITE_MATRIX_FILE),
        "heatmap": os.path.join(out, CROSS_SITE_HEATMAP_FILE),
    }
    markdown = format_cross_site_markdown(summary)
    write_json_atomic(paths["summary"], summary)

    def write_markdown(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(markdown)

    write_atomic(paths["markdown"], write_markdown)
    plot_cross_site_heatmap(summary, paths["heatmap"])
    logger.info(
        "cross-site report of %d model(s) at %d site(s) written to %s (%s)",
        len(summary["models"]),
        len(summary["sites"]),
        out,
        ", ".join(os.path.basename(p) for p in paths.values()),
    )
    return paths


def model_tag(model: str) -> str:
    """A model's name in scalar tags: ``global_final``, ``global_best``, else its name with only tag-safe
    characters (a ``/`` would nest the tag)."""
    return MODEL_TAGS.get(model) or re.sub(r"[^A-Za-z0-9_.-]", "_", model)


def cross_site_scalars(summary: Mapping[str, Any]) -> dict[str, float]:
    """A few scalars of the cross-site evaluation for TensorBoard or MLflow, per model:
    ``cross_site/<model>/site_weighted_mean_dice``, ``.../mean_over_sites_dice``, ``.../worst_site_mean_dice``,
    ``.../site_weighted_dice_<region>`` and, where sites have them, ``.../all15_site_weighted_mean_dice``.

    Only known values are returned (a model that no site scored has none).
    """
    scalars: dict[str, float] = {}
    for name, model in (summary.get("models") or {}).items():
        prefix = f"{SCALAR_PREFIX}/{model_tag(name)}"
        weighted, plain = model.get("site_weighted_mean") or {}, model.get("mean_over_sites") or {}
        candidates = {
            f"{prefix}/site_weighted_mean_dice": weighted.get("mean_dice"),
            f"{prefix}/mean_over_sites_dice": plain.get("mean_dice"),
            f"{prefix}/worst_site_mean_dice": (model.get("worst_site") or {}).get("mean_dice"),
            **{f"{prefix}/site_weighted_dice_{r}": (weighted.get("dice") or {}).get(r) for r in REGIONS},
        }
        if model.get("all15"):
            candidates[f"{prefix}/all15_site_weighted_mean_dice"] = model["all15"]["site_weighted_mean"]["mean_dice"]
        scalars.update({tag: float(v) for tag, v in candidates.items() if _finite(v) is not None})
    return scalars


# ---- the command -------------------------------------------------------------------------------------------------
#: What ``fedbrats cross-site`` does (its ``--help``).
CROSS_SITE_DESCRIPTION = (
    "Report a job's federated cross-site evaluation: from the run folder's cross_site_val/cross_val_results.json "
    "(every model scored at every site on the site's own test cases and sequences), write the model x site "
    "matrix of mean Dice with the worst site and the site-weighted mean as JSON, markdown and a heatmap PNG."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``fedbrats cross-site`` options."""
    parser.add_argument(
        "run_dir", help=f"the server's run folder (holds {CROSS_SITE_DIR}/{CROSS_SITE_RESULTS_FILE}), or that file"
    )
    parser.add_argument(
        "--out-dir", default=None, help=f"folder to write the report to (default: RUN_DIR/{CROSS_SITE_DIR})"
    )


def run(args: argparse.Namespace) -> int:
    """Run ``fedbrats cross-site`` with parsed options."""
    write_cross_site_report(args.run_dir, args.out_dir)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``fedbrats cross-site``: the report of a run's cross-site evaluation; 0 on success."""
    return run_command("cross-site", add_arguments, run, argv, CROSS_SITE_DESCRIPTION)


__all__ = [
    "CROSS_SITE_DESCRIPTION",
    "cross_site_scalars",
    "cross_site_summary",
    "format_cross_site_markdown",
    "model_label",
    "plot_cross_site_heatmap",
    "read_cross_site_results",
    "write_cross_site_report",
]
