"""Score a network on a datalist with chosen combinations of MRI sequences: the scoring loop of every evaluation.

Every case is loaded once with the sequences it has; each combination is then simulated by zero-filling the
channels of the absent sequences and telling the network which ones are present, which is exactly what a site
that lacks those sequences feeds the network (absent channels are zero after the per-channel normalisation of
non-zero voxels). ``fedbrats evaluate`` runs it on complete test cases over all 15 combinations; a site runs it on
its own test cases with its own sequences in the federated (cross-site) evaluation
(:mod:`fedbrats.federated.client.site_evaluation`). It lives here, below both, so that a site needs nothing of the
evaluation commands.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from fedbrats.constants import MODALITIES, REGIONS, combination_name, modality_combinations, modality_mask
from fedbrats.data.loader import DataConfig, eval_transforms, read_datalist, voxel_spacing
from fedbrats.data.transforms import apply_modality_mask
from fedbrats.runs import read_json
from fedbrats.scoring import metrics
from fedbrats.scoring.inference import predict_logits
from fedbrats.scoring.metrics import logits_to_regions, region_dice, region_hd95
from fedbrats.scoring.postprocess import remove_small_components

logger = logging.getLogger(__name__)

#: The name of the combination of all four sequences.
FULL_COMBINATION = combination_name(MODALITIES)


def datalist_convention(datalist: str) -> str:
    """The label convention a datalist declares in its ``convention`` field (default ``brats2018``)."""
    content = read_json(datalist, "datalist") if os.path.isfile(datalist) else {}
    return str(content.get("convention") or "brats2018") if isinstance(content, dict) else "brats2018"


def table_row(
    dice: torch.Tensor,
    hd95: torch.Tensor,
    modalities: Sequence[str] | None = None,
    lesions: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """One table row from per-case values (N x 3); ``lesions`` (the per-case :func:`lesion_wise` values) adds the
    lesion-wise scores as the row's ``lesion_wise`` part, itself a row with lesion counts per region."""
    dice_mean = dice.double().mean(0)
    hd_mean = hd95.double().mean(0)
    row: dict[str, Any] = {
        "dice": {r: float(dice_mean[i]) for i, r in enumerate(REGIONS)},
        "hd95": {r: float(hd_mean[i]) for i, r in enumerate(REGIONS)},
        "mean_dice": float(dice_mean.mean()),
        "mean_hd95": float(hd_mean.mean()),
        # Per-case values allow paired tests between methods on the same cases.
        "per_case": {"dice": dice.tolist(), "hd95": hd95.tolist()},
    }
    if modalities is not None:
        row = {"modalities": list(modalities), **row}
    if lesions is not None:
        row["lesion_wise"] = table_row(lesions["dice"], lesions["hd95"])
        row["lesion_wise"]["lesions"] = {
            key: {r: int(lesions[key][:, i].sum()) for i, r in enumerate(REGIONS)} for key in ("tp", "fp", "fn")
        }
    return row


def mean_over_rows(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Unweighted mean of table rows (each combination counts once), lesion-wise part included where rows have it."""
    if not rows:
        raise ValueError("no rows to average")
    dice = {r: float(np.mean([row["dice"][r] for row in rows])) for r in REGIONS}
    hd95 = {r: float(np.mean([row["hd95"][r] for row in rows])) for r in REGIONS}
    mean: dict[str, Any] = {
        "dice": dice,
        "hd95": hd95,
        "mean_dice": float(np.mean(list(dice.values()))),
        "mean_hd95": float(np.mean(list(hd95.values()))),
    }
    if all("lesion_wise" in row for row in rows):
        mean["lesion_wise"] = mean_over_rows([row["lesion_wise"] for row in rows])
    return mean


def check_combinations(combinations: Sequence[Sequence[str]] | None) -> list[tuple[str, ...]]:
    if combinations is None:
        return modality_combinations()
    out: list[tuple[str, ...]] = []
    for combo in combinations:
        if isinstance(combo, str):  # "t1+flair" or a single sequence name
            combo = combo.split("+")
        modality_mask(list(combo))  # raises ValueError naming unknown or empty combinations
        canonical = tuple(m for m in MODALITIES if m in set(combo))
        if canonical not in out:
            out.append(canonical)
    if not out:
        raise ValueError("combinations must name at least one non-empty set of sequences")
    return out


@torch.no_grad()
def evaluate_combinations(
    model: torch.nn.Module,
    datalist: str,
    *,
    key: str = "test",
    data: DataConfig | dict[str, Any] | None = None,
    combinations: Sequence[Sequence[str]] | None = None,
    overlap: float = 0.5,
    device: str | torch.device = "cpu",
    max_cases: int = 0,
    model_name: str | None = None,
    precision: str = "fp32",
    min_component_voxels: int = 0,
    lesion_wise: metrics.LesionWiseParams | str | None = None,
    available: Sequence[str] = MODALITIES,
) -> dict[str, Any]:
    """Dice and HD95 per region of ``model`` for every combination of sequences, on complete test cases.

    Args:
        model: a network of the package (``forward(image, modality_mask)``).
        datalist: Decathlon-style datalist; its ``convention`` field (default ``brats2018``) gives the labels.
        key: the list of cases to use (``test``, ``validation``...).
        data: preprocessing options (``roi_size`` is the sliding-window size, ``zoom``, ``max_eval_size``).
        combinations: subsets of sequences to score (tuples or names like ``"t1+flair"``); default all 15.
        overlap: sliding-window overlap.
        device: where inference runs.
        max_cases: use only the first N cases (0: all).
        model_name: how the model is named in the results (default: its class name).
        precision: inference precision (``fp32``, the reference, ``bf16`` or ``auto``).
        min_component_voxels: post-processing chosen on validation data (0: none), see
            :mod:`fedbrats.scoring.postprocess`.
        lesion_wise: also score BraTS 2023's lesion-wise Dice and HD95 (see
            :func:`~fedbrats.scoring.metrics.lesion_wise`) with these parameters, or those of a BraTS challenge
            by name (``"GLI"``, ``"MET"``...); ``None``: not.
        available: the sequences every case has (default all four): a site's own test cases hold its sequences
            only, and every combination must be a subset of them.

    Returns:
        ``{"model", "datalist", "key", "convention", "num_cases", "cases", "data", "overlap", "combinations":
        {name: row}, "mean_over_combinations", "full_modality", "seconds"}``; a row holds ``modalities``,
        ``dice`` and ``hd95`` per region, ``mean_dice``, ``mean_hd95`` and the ``per_case`` values.
        ``full_modality`` is the row of all four sequences (None when it was not scored). With ``lesion_wise``
        every row (and the mean) has a ``lesion_wise`` part with the same layout plus ``lesions`` (matched ``tp``,
        missed ``fn`` and false-positive ``fp`` lesions per region, summed over cases), and the results say the
        parameters under ``lesion_wise``.

    Raises:
        ValueError: bad options, an unreadable datalist, a combination with a sequence outside ``available``, or a
            case that lacks one of ``available``.
    """
    cfg = data if isinstance(data, DataConfig) else DataConfig.from_dict(data)
    have = check_combinations([available])[0]
    combos = (
        check_combinations(combinations)
        if combinations is not None
        else [c for c in modality_combinations() if set(c) <= set(have)]
    )
    beyond = [combination_name(c) for c in combos if not set(c) <= set(have)]
    if beyond:
        raise ValueError(f"combinations {beyond} use sequences outside the available ones {list(have)}")
    lesion_params = lesion_wise_params(lesion_wise)
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if max_cases < 0:
        raise ValueError(f"max_cases must be >= 0, got {max_cases}")
    entries = read_datalist(datalist, key)
    if max_cases:
        entries = entries[:max_cases]
    for entry in entries:
        paths = entry.get("image") or []
        given = {m for m, p in zip(MODALITIES, paths) if p}
        missing = [m for m in have if m not in given]
        if missing:
            raise ValueError(
                f"datalist {datalist!r}: case {entry.get('case_id', '?')} lacks {missing}; scoring these sequence "
                f"combinations needs {list(have)} of every case"
            )
        if not entry.get("label"):
            raise ValueError(f"datalist {datalist!r}: case {entry.get('case_id', '?')} has no label to score against")
    convention = datalist_convention(datalist)
    divisor = max(8, int(getattr(model, "spatial_divisor", 8)))
    transform = eval_transforms(have, convention, cfg, divisor=divisor)
    device = torch.device(device)
    model = model.to(device).eval()
    masks = {combo: torch.tensor(modality_mask(list(combo)), dtype=torch.float32) for combo in combos}
    dices: dict[tuple[str, ...], list[torch.Tensor]] = {combo: [] for combo in combos}
    hds: dict[tuple[str, ...], list[torch.Tensor]] = {combo: [] for combo in combos}
    lesions: dict[tuple[str, ...], list[dict[str, torch.Tensor]]] = {combo: [] for combo in combos}
    case_ids: list[str] = []
    # The site a test case comes from, where the datalist says (``fedbrats prepare`` writes it): lets a report score
    # every site on its own sequences.
    case_sites = [entry.get("site") for entry in entries]
    started = time.monotonic()
    logger.info(
        "evaluating %d case(s) of %s on %d combination(s), roi %s, zoom %.2f",
        len(entries),
        datalist,
        len(combos),
        cfg.roi_size,
        cfg.zoom,
    )
    for index, entry in enumerate(entries):
        case_started = time.monotonic()
        case_id = str(entry.get("case_id") or os.path.basename(os.path.dirname(entry["label"])))
        sample = transform(entry)
        image = torch.as_tensor(sample["image"])[None].to(device)
        label = torch.as_tensor(sample["label"])[None]
        spacing = voxel_spacing(sample["affine"], cfg.zoom)
        for combo in combos:
            mask = masks[combo]
            # Zero-filling after normalisation equals never loading the sequence (absent channels load as 0
            # and stay 0 because only non-zero voxels are normalised).
            masked = apply_modality_mask(image, mask.to(device))
            logits = predict_logits(
                model, masked, mask[None].to(device), cfg.roi_size, overlap=overlap, precision=precision
            )
            pred = remove_small_components(logits_to_regions(logits).cpu(), min_component_voxels)
            dices[combo].append(region_dice(pred, label))
            hds[combo].append(region_hd95(pred, label, spacing=spacing))
            if lesion_params is not None:
                lesions[combo].append(metrics.lesion_wise(pred, label, spacing, lesion_params))
        case_ids.append(case_id)
        full = dices[combos[-1]][-1].mean().item()
        logger.info(
            "case %d/%d %s: mean Dice %.3f with %s (%.1fs)",
            index + 1,
            len(entries),
            case_id,
            full,
            combination_name(combos[-1]),
            time.monotonic() - case_started,
        )
    rows = {
        combination_name(c): table_row(
            torch.cat(dices[c]),
            torch.cat(hds[c]),
            c,
            {k: torch.cat([case[k] for case in lesions[c]]) for k in lesions[c][0]} if lesion_params else None,
        )
        for c in combos
    }
    results: dict[str, Any] = {
        "model": model_name or type(model).__name__,
        "datalist": os.path.abspath(datalist),
        "key": key,
        "convention": convention,
        "num_cases": len(case_ids),
        "cases": case_ids,
        **({"case_sites": case_sites} if any(case_sites) else {}),
        "data": {"roi_size": list(cfg.roi_size), "zoom": cfg.zoom, "max_eval_size": cfg.max_eval_size},
        "overlap": overlap,
        "precision": precision,
        "postprocessing": {"min_component_voxels": min_component_voxels},
        "regions": list(REGIONS),
        "combinations": rows,
        "mean_over_combinations": mean_over_rows(list(rows.values())),
        "full_modality": rows.get(FULL_COMBINATION),
        "seconds": round(time.monotonic() - started, 2),
    }
    if lesion_params is not None:
        results["lesion_wise"] = {
            "dilation": lesion_params.dilation,
            "min_volume_mm3": lesion_params.min_volume_mm3,
            "hd95_miss_value": metrics.LESION_HD95_MISS_VALUE,
        }
    summary = results["mean_over_combinations"]
    logger.info(
        "done in %.1fs: mean over %d combinations Dice %.3f, HD95 %.1f mm",
        results["seconds"],
        len(rows),
        summary["mean_dice"],
        summary["mean_hd95"],
    )
    return results


def lesion_wise_params(spec: metrics.LesionWiseParams | str | None) -> metrics.LesionWiseParams | None:
    """The lesion-wise parameters of ``spec``: given, a BraTS challenge's by name (``"GLI"``, ``"BraTS-MET"``), or
    ``None`` (no lesion-wise scores).

    Raises:
        ValueError: an unknown challenge name (the known ones are listed).
    """
    if spec is None or isinstance(spec, metrics.LesionWiseParams):
        return spec
    name = str(spec).upper().removeprefix("BRATS-")
    if name not in metrics.BRATS_LESION_PARAMS:
        raise ValueError(
            f"lesion_wise must be one of {sorted(metrics.BRATS_LESION_PARAMS)} (BraTS challenges), got {spec!r}"
        )
    return metrics.BRATS_LESION_PARAMS[name]
