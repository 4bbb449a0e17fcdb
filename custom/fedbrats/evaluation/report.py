"""Reports of the 15-combination evaluation: JSON, markdown tables and heatmaps, for one model or several."""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fedbrats.constants import MODALITIES, REGIONS, combination_name, modality_combinations

logger = logging.getLogger(__name__)

#: How the sequences are written in reports.
DISPLAY_NAMES: dict[str, str] = {"t1": "T1", "t1ce": "T1ce", "t2": "T2", "flair": "FLAIR"}
PRESENT, ABSENT = "●", "○"


def readable_combination(modalities: Sequence[str] | str) -> str:
    """``"t1+flair"`` or ``("t1", "flair")`` as ``"T1 + FLAIR"`` (canonical order)."""
    names = modalities.split("+") if isinstance(modalities, str) else list(modalities)
    return " + ".join(DISPLAY_NAMES[m] for m in MODALITIES if m in set(names))


def _fmt(value: Any, digits: int) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{float(value):.{digits}f}"


def _rows_in_order(results: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    """The result rows in canonical combination order (results written by other code may be unordered)."""
    rows = results.get("combinations") or {}
    if not rows:
        raise ValueError("results hold no 'combinations' rows; are these results of evaluate_combinations?")
    order = [combination_name(c) for c in modality_combinations()]
    known = [(name, rows[name]) for name in order if name in rows]
    return known + [(name, row) for name, row in rows.items() if name not in order]


def _metric_cells(row: Mapping[str, Any]) -> list[str]:
    dice = [_fmt(row["dice"][r], 3) for r in REGIONS] + [_fmt(row["mean_dice"], 3)]
    hd95 = [_fmt(row["hd95"][r], 1) for r in REGIONS]
    return dice + hd95


def format_table(results: Mapping[str, Any], part: str | None = None) -> str:
    """Markdown table of one model: a row per combination (● present, ○ absent) and the mean row.

    Columns: the four sequences, Dice WT/TC/ET/mean, HD95 WT/TC/ET (mm).

    Args:
        results: what :func:`~fedbrats.evaluation.evaluate.evaluate_combinations` returned.
        part: ``None`` for the case-wise scores, ``"lesion_wise"`` for the lesion-wise ones (then every row must
            have them).

    Raises:
        ValueError: results without combination rows, or without the ``part`` asked for.
    """
    rows = _rows_in_order(results)
    if part is not None:
        if not all(part in row for _, row in rows):
            raise ValueError(f"results hold no {part!r} scores; evaluate with that option")
        rows = [(name, {"modalities": row.get("modalities"), **row[part]}) for name, row in rows]
    header = [DISPLAY_NAMES[m] for m in MODALITIES]
    header += [f"Dice {r}" for r in REGIONS] + ["Dice mean"] + [f"HD95 {r}" for r in REGIONS]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join([":-:"] * len(MODALITIES) + ["--:"] * 7) + "|"]
    for name, row in rows:
        present = set(row.get("modalities") or name.split("+"))
        marks = [PRESENT if m in present else ABSENT for m in MODALITIES]
        lines.append("| " + " | ".join(marks + _metric_cells(row)) + " |")
    mean = results.get("mean_over_combinations")
    if mean and part is not None:
        mean = mean.get(part)
    if mean:
        first = [f"**mean over {len(rows)}**"] + [""] * (len(MODALITIES) - 1)
        lines.append("| " + " | ".join(first + [f"**{c}**" for c in _metric_cells(mean)]) + " |")
    return "\n".join(lines)


def lesion_wise_section(results: Mapping[str, Any]) -> list[str]:
    """The markdown lines of the lesion-wise scores (empty when the results hold none)."""
    params = results.get("lesion_wise")
    if not params:
        return []
    full = results.get("full_modality") or {}
    counts = (full.get("lesion_wise") or {}).get("lesions")
    lines = [
        "## Lesion-wise (BraTS 2023)",
        "",
        f"Each connected ground-truth lesion scored on its own (lesions whose dilations by {params['dilation']} "
        f"voxel(s) touch count as one; lesions of at most {params['min_volume_mm3']:g} mm³ left out), each predicted "
        f"component that meets no lesion a false positive with Dice 0 and HD95 {params['hd95_miss_value']:g} mm; "
        "per case and region, the mean over lesions and false positives.",
        "",
    ]
    if counts:
        per_region = ", ".join(
            f"{r} {counts['tp'][r]}/{counts['fn'][r]}/{counts['fp'][r]}" for r in REGIONS if r in counts["tp"]
        )
        lines += [f"With all four sequences, lesions matched/missed/false positive: {per_region}.", ""]
    return [*lines, format_table(results, "lesion_wise"), ""]


def _jsonable(value: Any) -> Any:
    """Plain JSON: numpy scalars as numbers and non-finite floats as null (JSON has no NaN)."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _heatmap(results: Mapping[str, Any], metric: str, label: str, path: str) -> None:
    """Heatmap combination x region (plus the mean column and the mean-over-combinations row)."""
    # The object-oriented API with an explicit Agg canvas: no pyplot state, no display needed, thread safe.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = _rows_in_order(results)
    mean = results.get("mean_over_combinations")
    labels = [readable_combination(row.get("modalities") or name) for name, row in rows]
    values = [[row[metric][r] for r in REGIONS] + [row[f"mean_{metric}"]] for _, row in rows]
    if mean:
        labels.append(f"mean over {len(rows)}")
        values.append([mean[metric][r] for r in REGIONS] + [mean[f"mean_{metric}"]])
    matrix = np.array(values, dtype=float)
    columns = [*REGIONS, "mean"]
    if metric == "dice":
        cmap, vmin, vmax, digits, unit = "RdYlGn", 0.0, 1.0, 2, "Dice"
    else:
        finite = matrix[np.isfinite(matrix)]
        cmap, vmin, vmax, digits, unit = (
            "RdYlGn_r",
            0.0,
            max(float(finite.max()) if finite.size else 1.0, 1.0),
            1,
            "HD95 (mm)",
        )

    fig = Figure(figsize=(6.0, 1.6 + 0.36 * len(labels)), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    im = ax.imshow(np.ma.masked_invalid(matrix), cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
    ax.set_xticks(range(len(columns)), columns)
    ax.set_yticks(range(len(labels)), labels)
    ax.tick_params(axis="x", top=True, labeltop=True, bottom=False, labelbottom=False)
    for i in range(matrix.shape[0]):
        for j in range(matrix.shape[1]):
            text = _fmt(matrix[i, j], digits)
            weight = "bold" if mean and i == matrix.shape[0] - 1 else "normal"
            # Both ends of the red-yellow-green map are dark: white text there, black in the light middle.
            shade = (matrix[i, j] - vmin) / (vmax - vmin) if np.isfinite(matrix[i, j]) else 0.5
            color = "white" if shade < 0.2 or shade > 0.85 else "black"
            ax.text(j, i, text, ha="center", va="center", fontsize=8, color=color, fontweight=weight)
    if mean:  # separate the summary row from the combinations
        ax.axhline(matrix.shape[0] - 1.5, color="black", linewidth=1.5)
    fig.colorbar(im, ax=ax, label=unit, shrink=0.8)
    ax.set_title(f"{label}: {unit} per sequence combination\n({results.get('num_cases', '?')} test cases)", fontsize=10)
    fig.savefig(path, dpi=120)


def write_reports(results: Mapping[str, Any], out_dir: str, label: str = "model") -> dict[str, str]:
    """Write ``results.json``, ``results.md``, ``heatmap_dice.png`` and ``heatmap_hd95.png`` to ``out_dir``.

    Args:
        results: what :func:`fedbrats.evaluation.evaluate.evaluate_combinations` returned.
        out_dir: output folder (created).
        label: name of the model in titles.

    Returns:
        ``{"json", "markdown", "heatmap_dice", "heatmap_hd95"}`` -> path.
    """
    os.makedirs(out_dir, exist_ok=True)
    paths = {
        "json": os.path.join(out_dir, "results.json"),
        "markdown": os.path.join(out_dir, "results.md"),
        "heatmap_dice": os.path.join(out_dir, "heatmap_dice.png"),
        "heatmap_hd95": os.path.join(out_dir, "heatmap_hd95.png"),
    }
    table = format_table(results)  # validates the results before anything is written
    with open(paths["json"], "w", encoding="utf-8") as f:
        json.dump(_jsonable(results), f, indent=2)
    data = results.get("data") or {}
    lines = [
        f"# {label}: segmentation quality per combination of MRI sequences",
        "",
        f"{results.get('num_cases', '?')} test cases from `{results.get('datalist', '?')}` "
        f"(list `{results.get('key', 'test')}`, labels {results.get('convention', 'brats2018')}); "
        f"sliding window {data.get('roi_size', '?')}, zoom {data.get('zoom', '?')}, "
        f"overlap {results.get('overlap', '?')}.",
        "",
        f"{PRESENT} sequence given to the model, {ABSENT} sequence absent (zero-filled). Dice: higher is better; "
        "HD95 in mm, lower is better (373.13 mm when a region is predicted but absent, or missed).",
        "",
        table,
        "",
        *lesion_wise_section(results),
    ]
    with open(paths["markdown"], "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    _heatmap(results, "dice", label, paths["heatmap_dice"])
    _heatmap(results, "hd95", label, paths["heatmap_hd95"])
    logger.info("reports of %s written to %s", label, out_dir)
    return paths


def _best(values: Sequence[float | None], higher_is_better: bool) -> float | None:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if len(finite) < 2:  # nothing to compare
        return None
    return max(finite) if higher_is_better else min(finite)


def _summary_table(results_by_method: Mapping[str, Mapping[str, Any]], part: str) -> list[str]:
    header = (
        ["Method"] + [f"Dice {r}" for r in REGIONS] + ["Dice mean"] + [f"HD95 {r}" for r in REGIONS] + ["HD95 mean"]
    )
    columns: list[tuple[str, str | None, bool, int]] = [("dice", r, True, 3) for r in REGIONS]
    columns += (
        [("mean_dice", None, True, 3)] + [("hd95", r, False, 1) for r in REGIONS] + [("mean_hd95", None, False, 1)]
    )

    def value(results: Mapping[str, Any], metric: str, region: str | None) -> float | None:
        row = results.get(part)
        if not row:
            return None
        return row[metric][region] if region else row[metric]

    best = [_best([value(res, m, r) for res in results_by_method.values()], higher) for m, r, higher, _ in columns]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "|".join(["--:"] * len(columns)) + "|"]
    for method, results in results_by_method.items():
        cells = [method]
        for (metric, region, _, digits), top in zip(columns, best):
            v = value(results, metric, region)
            text = _fmt(v, digits)
            cells.append(f"**{text}**" if top is not None and v == top else text)
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def compare_table(results_by_method: Mapping[str, Mapping[str, Any]]) -> str:
    """Markdown comparing several methods' evaluations (best value of each column in bold).

    Three tables: the mean over the combinations and the all-four-sequences row (rows = methods, Dice and HD95
    per region), then the mean Dice of every combination (one column per method).

    Args:
        results_by_method: method name -> results of :func:`~fedbrats.evaluation.evaluate.evaluate_combinations`.

    Raises:
        ValueError: no methods, or results without combination rows.
    """
    if not results_by_method:
        raise ValueError("results_by_method is empty; give at least one method's results")
    ordered = {method: dict(_rows_in_order(res)) for method, res in results_by_method.items()}
    names: list[str] = []
    for rows in ordered.values():
        names += [n for n in rows if n not in names]
    canonical = [combination_name(c) for c in modality_combinations()]
    names.sort(key=lambda n: canonical.index(n) if n in canonical else len(canonical))
    n_combos = len(names)
    cases = sorted({int(r.get("num_cases", 0)) for r in results_by_method.values()})
    lines = [
        f"### Mean over the {n_combos} sequence combinations",
        "",
        *_summary_table(results_by_method, "mean_over_combinations"),
        "",
        f"### All four sequences ({readable_combination(MODALITIES)})",
        "",
        *_summary_table(results_by_method, "full_modality"),
        "",
        "### Mean Dice per sequence combination",
        "",
        "| Sequences | " + " | ".join(results_by_method) + " |",
        "|---|" + "|".join(["--:"] * len(results_by_method)) + "|",
    ]
    for name in names:
        values = [rows[name]["mean_dice"] if name in rows else None for rows in ordered.values()]
        top = _best(values, higher_is_better=True)
        cells = [f"**{_fmt(v, 3)}**" if top is not None and v == top else _fmt(v, 3) for v in values]
        lines.append(f"| {readable_combination(name)} | " + " | ".join(cells) + " |")
    means = [(res.get("mean_over_combinations") or {}).get("mean_dice") for res in results_by_method.values()]
    top = _best(means, higher_is_better=True)
    cells = [f"**{_fmt(v, 3)}**" if top is not None and v == top else _fmt(v, 3) for v in means]
    lines.append(f"| mean over {n_combos} | " + " | ".join(cells) + " |")
    lines += ["", f"Test cases per method: {', '.join(str(c) for c in cases)}. Dice higher is better, HD95 (mm) lower."]
    return "\n".join(lines)
