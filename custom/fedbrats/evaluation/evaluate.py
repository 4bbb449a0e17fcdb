"""Score a trained model on every one of the 15 non-empty combinations of MRI sequences.

Every test case is loaded once with all four sequences; each combination is then simulated by zero-filling the
channels of the absent sequences and telling the network which ones are present, which is exactly what a site
that lacks those sequences feeds the network (absent channels are zero after the per-channel normalisation of
non-zero voxels). One table therefore shows how much each sequence matters to a model and how gracefully the
model degrades when sequences are missing.

Also here: turning a checkpoint, a federated run folder or an exported model folder into a ready network
(:func:`load_model`), used by the prediction and export commands too.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

import fedbrats.federated.methods  # noqa: F401 - registers the methods' own networks and strategies
from fedbrats.commands import run_command
from fedbrats.constants import MODALITIES, REGIONS, combination_name, modality_combinations, modality_mask
from fedbrats.data.loader import DataConfig, eval_transforms, read_datalist, voxel_spacing
from fedbrats.data.transforms import apply_modality_mask
from fedbrats.networks import build_from_spec
from fedbrats.precision import PRECISIONS
from fedbrats.runs import (
    EXPORTED_PREPROCESSING_KEY,
    ModelFolder,
    RunFolder,
    find_model_spec,
    load_state_dict,
    read_json,
    read_model_metadata,
    resolve_checkpoint,
    spec_from_json,
    verify_exported_model,
)
from fedbrats.scoring import metrics
from fedbrats.scoring.inference import predict_logits
from fedbrats.scoring.metrics import logits_to_regions, region_dice, region_hd95
from fedbrats.scoring.postprocess import read_postprocessing, remove_small_components

logger = logging.getLogger(__name__)

FULL_COMBINATION = combination_name(MODALITIES)


# ---- models -----------------------------------------------------------------------------------------------
def load_model(
    checkpoint: str, spec: dict[str, Any] | str | None = None, *, verify_integrity: bool = True
) -> torch.nn.Module:
    """Build the network a checkpoint belongs to and load its weights (evaluation mode, on the CPU).

    Args:
        checkpoint: a ``.pt`` file, a federated run folder or an exported model folder (see
            :func:`resolve_checkpoint`).
        spec: ``{"path": ..., "args": ...}`` of the network, or a path to ``model_spec.json`` /
            ``metadata.json``; ``None`` looks for one next to the checkpoint (see :func:`find_model_spec`).
        verify_integrity: check an exported ``model.pt`` against its recorded ``model_sha256`` (see
            :func:`verify_exported_model`); ``False`` skips it (``--skip-integrity-check``).

    Raises:
        ValueError: the checkpoint or spec is missing or unreadable, an exported model's checksum does not
            match, or the weights do not fit the network.
    """
    path = resolve_checkpoint(checkpoint)
    if verify_integrity:
        if verify_exported_model(path):
            logger.info("%s matches the model_sha256 of its metadata.json", path)
    else:
        logger.warning("integrity check of %s skipped (--skip-integrity-check)", path)
    if spec is None:
        spec_source = find_model_spec(path)
        spec = spec_from_json(spec_source)
    elif isinstance(spec, str):
        if not os.path.isfile(spec):
            raise ValueError(f"model spec {spec!r} does not exist")
        spec_source = spec
        spec = spec_from_json(spec)
    elif isinstance(spec, Mapping):
        spec_source = "the given spec"
        spec = dict(spec)
    else:
        raise ValueError(f"spec must be a dict, a path or None, got {type(spec).__name__}")
    try:
        model = build_from_spec(spec)
    except (TypeError, ImportError, AttributeError, ValueError) as exc:
        raise ValueError(f"cannot build the network described by {spec_source} ({spec.get('path')!r}): {exc}") from exc
    state = load_state_dict(path)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(
            f"checkpoint {path!r} does not fit the network {spec.get('path')!r} described by {spec_source}: {exc}"
        ) from exc
    model.eval()
    logger.info("loaded %s from %s", spec.get("path"), path)
    return model


def run_data_options(checkpoint: str) -> tuple[DataConfig, str] | None:
    """The data options a federated run trained with, read from the job configuration in its run folder.

    The run folder is looked for from the checkpoint's folder up to two parents (``app_server/*.pt``,
    ``site_models/*.pt``); NVFlare keeps the job's site configuration there (:attr:`RunFolder.client_config`).

    Returns:
        ``(options, path of the configuration)``, or ``None`` when no run configuration is found.

    Raises:
        ValueError: the configuration exists but holds no training options or invalid ones (the file is named).
    """
    folder = os.path.abspath(checkpoint if os.path.isdir(checkpoint) else os.path.dirname(checkpoint))
    for _ in range(3):
        path = RunFolder(folder).client_config
        if os.path.isfile(path):
            break
        folder = os.path.dirname(folder)
    else:
        return None
    config = read_json(path, "job configuration")
    executors = config.get("executors", []) if isinstance(config, dict) else []
    for entry in executors:
        executor = entry.get("executor") if isinstance(entry, dict) else None
        args = executor.get("args") if isinstance(executor, dict) else None
        if isinstance(args, dict) and isinstance(args.get("training"), dict):
            try:
                return DataConfig.from_dict(args["training"].get("data")), path
            except (TypeError, ValueError) as exc:
                raise ValueError(f"job configuration {path!r}: bad data options: {exc}") from None
    raise ValueError(f"job configuration {path!r} holds no executor with 'training' options to read the data options")


def recorded_preprocessing(model: str) -> dict[str, Any]:
    """The preprocessing a model was trained with, as recorded beside it, so that nobody has to type it again.

    Looked for in an exported model's ``metadata.json`` (``preprocessing``; ``inputs.image`` of earlier exports),
    else in the run's job configuration (:func:`run_data_options`).

    Args:
        model: a checkpoint, run folder or exported model folder (resolved with :func:`resolve_checkpoint`).

    Returns:
        ``{"roi_size": (x, y, z), "zoom": z, "source": file}`` (training crop, which is also the sliding window,
        and resampling factor), or ``{}`` when nothing is recorded.
    """
    checkpoint = resolve_checkpoint(model)
    metadata = read_model_metadata(checkpoint)
    source = ModelFolder.metadata_of(checkpoint)
    recorded = metadata.get(EXPORTED_PREPROCESSING_KEY)
    if not isinstance(recorded, Mapping):
        inputs = metadata.get("inputs")
        recorded = inputs.get("image") if isinstance(inputs, Mapping) else None
    if isinstance(recorded, Mapping) and recorded.get("zoom") and recorded.get("roi_size"):
        return {
            "roi_size": tuple(int(s) for s in recorded["roi_size"]),
            "zoom": float(recorded["zoom"]),
            "source": source,
        }
    found = run_data_options(checkpoint)
    if found is None:
        return {}
    options, path = found
    return {"roi_size": tuple(options.roi_size), "zoom": float(options.zoom), "source": path}


def preprocessing_options(
    model: str, roi_size: Sequence[int] | None, zoom: float | None, what: str
) -> tuple[tuple[int, ...], float]:
    """The sliding window and zoom to run ``model`` with: the options given, else the recorded ones.

    An explicit ``zoom`` other than the recorded one is used but warned about (the model would see its cases at
    another scale than in training), and so is a window other than the training crop (group or instance
    normalisation computes its statistics over the window, so a larger window with more background changes what
    every layer sees); without any record the :class:`DataConfig` defaults are used, with a warning.

    Args:
        model: checkpoint, run folder or exported model folder.
        roi_size: ``--roi-size`` (None: the recorded training crop).
        zoom: ``--zoom`` (None: the recorded one).
        what: the command, for the messages (``"predict"``).
    """
    recorded = recorded_preprocessing(model)
    defaults = DataConfig()
    if not recorded:
        logger.warning(
            "%s: no training preprocessing recorded for %s (no exported metadata.json, no run configuration); "
            "using zoom %s and window %s unless --zoom / --roi-size say otherwise",
            what,
            model,
            zoom if zoom is not None else defaults.zoom,
            list(roi_size or defaults.roi_size),
        )
    elif zoom is not None and abs(zoom - recorded["zoom"]) > 1e-9:
        logger.warning(
            "%s: --zoom %s differs from the zoom %s the model was trained with (%s); its cases will be seen at "
            "another scale",
            what,
            zoom,
            recorded["zoom"],
            recorded["source"],
        )
    if recorded and roi_size and tuple(int(s) for s in roi_size) != tuple(recorded["roi_size"]):
        logger.warning(
            "%s: --roi-size %s differs from the crop %s the model was trained on (%s); its normalisation layers "
            "see other statistics in a window of another size, which can lower Dice a lot (a 96^3 window cost a "
            "64^3-trained SegResNet 0.18 validation WT Dice in docs/results.md)",
            what,
            list(roi_size),
            list(recorded["roi_size"]),
            recorded["source"],
        )
    chosen_zoom = zoom if zoom is not None else recorded.get("zoom", defaults.zoom)
    chosen_roi = tuple(roi_size) if roi_size else recorded.get("roi_size", defaults.roi_size)
    checked = DataConfig(roi_size=chosen_roi, zoom=chosen_zoom)  # the same rules as a job's data options
    if recorded:
        logger.info(
            "%s: zoom %s, window %s (recorded in %s)", what, checked.zoom, list(checked.roi_size), recorded["source"]
        )
    return tuple(checked.roi_size), float(checked.zoom)


def check_device(device: str | torch.device) -> torch.device:
    """The torch device named by ``--device``, after checking that this machine has it.

    Raises:
        ValueError: a malformed device name, or a CUDA device on a machine without one (torch would fail later
            with an ``AssertionError`` traceback).
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"--device {device!r} is not a torch device (e.g. cpu, cuda, cuda:1): {exc}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: this machine has no usable CUDA GPU; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: there are only {torch.cuda.device_count()} CUDA device(s)")
    return dev


# ---- evaluation -------------------------------------------------------------------------------------------
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


def _check_combinations(combinations: Sequence[Sequence[str]] | None) -> list[tuple[str, ...]]:
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

    Returns:
        ``{"model", "datalist", "key", "convention", "num_cases", "cases", "data", "overlap", "combinations":
        {name: row}, "mean_over_combinations", "full_modality", "seconds"}``; a row holds ``modalities``,
        ``dice`` and ``hd95`` per region, ``mean_dice``, ``mean_hd95`` and the ``per_case`` values.
        ``full_modality`` is the row of all four sequences (None when it was not scored). With ``lesion_wise``
        every row (and the mean) has a ``lesion_wise`` part with the same layout plus ``lesions`` (matched ``tp``,
        missed ``fn`` and false-positive ``fp`` lesions per region, summed over cases), and the results say the
        parameters under ``lesion_wise``.

    Raises:
        ValueError: bad options, an unreadable datalist, or a case that lacks a sequence (the evaluation needs
            all four of every case).
    """
    cfg = data if isinstance(data, DataConfig) else DataConfig.from_dict(data)
    combos = _check_combinations(combinations)
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
        missing = [m for m, p in zip(MODALITIES, paths) if not p] + list(MODALITIES[len(paths) :])
        if missing:
            raise ValueError(
                f"datalist {datalist!r}: case {entry.get('case_id', '?')} lacks {missing}; scoring all sequence "
                "combinations needs all four sequences of every case"
            )
        if not entry.get("label"):
            raise ValueError(f"datalist {datalist!r}: case {entry.get('case_id', '?')} has no label to score against")
    convention = datalist_convention(datalist)
    divisor = max(8, int(getattr(model, "spatial_divisor", 8)))
    transform = eval_transforms(MODALITIES, convention, cfg, divisor=divisor)
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


# ---- command line -----------------------------------------------------------------------------------------
def default_test_datalist(sites: str | None = None, what: str = "evaluate") -> str:
    """The ``test_datalist`` of a ``sites.json`` (default: ``FEDBRATS_SITE_CONFIG``'s, else the embedded one's).

    Args:
        sites: the ``--sites`` option, if given.
        what: the command, for the log line saying which file it uses.
    """
    from fedbrats.data.site_config import federation_sites_file

    sites = federation_sites_file(sites, what)
    manifest = read_json(sites, "sites file")
    path = manifest.get("test_datalist") if isinstance(manifest, dict) else None
    if not path:
        raise ValueError(f"sites file {sites!r} names no 'test_datalist'; pass --datalist")
    return path if os.path.isabs(path) else os.path.join(os.path.dirname(os.path.abspath(sites)), path)


def roi_option(values: Sequence[int] | None) -> tuple[int, ...] | None:
    """``--roi-size`` as three sizes (one value: a cube), or ``None`` when not given.

    Raises:
        ValueError: neither one nor three values.
    """
    if not values:
        return None
    if len(values) == 1:
        return (values[0],) * 3
    if len(values) != 3:
        raise ValueError(f"--roi-size takes one or three integers, got {list(values)}")
    return tuple(values)


#: What ``fedbrats evaluate`` does (its ``--help``).
EVALUATE_DESCRIPTION = "Score a model on the test cases with each of the 15 combinations of MRI sequences."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``fedbrats evaluate`` options."""
    parser.add_argument("--model", required=True, help="checkpoint (.pt), federated run folder or exported model")
    parser.add_argument("--spec", default=None, help="model_spec.json (default: found next to the model)")
    parser.add_argument("--datalist", default=None, help="datalist with the test cases (default: --sites' test set)")
    parser.add_argument(
        "--sites",
        default=None,
        help="sites.json whose test_datalist to use (default: $FEDBRATS_SITE_CONFIG, else the embedded federation)",
    )
    parser.add_argument("--key", default="test", help="list of the datalist to evaluate (default: test)")
    parser.add_argument("--roi-size", type=int, nargs="+", default=None, help="sliding-window size (1 or 3 ints)")
    parser.add_argument(
        "--zoom", type=float, default=None, help="resampling factor after cropping (default: the model's training one)"
    )
    parser.add_argument("--max-eval-size", type=int, default=0, help="centre-crop volumes to this side (0: never)")
    parser.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    parser.add_argument(
        "--skip-integrity-check",
        action="store_true",
        help="load an exported model.pt even if it does not match the model_sha256 of its metadata.json",
    )
    parser.add_argument(
        "--precision", choices=PRECISIONS, default="fp32", help="inference precision (fp32: the reference)"
    )
    parser.add_argument(
        "--min-component-voxels",
        type=int,
        default=None,
        help="remove smaller connected components (default: the size chosen on validation in the run/model folder)",
    )
    parser.add_argument(
        "--lesion-wise",
        nargs="?",
        const="GLI",
        default=None,
        choices=sorted(metrics.BRATS_LESION_PARAMS),
        help="also report BraTS 2023's lesion-wise Dice/HD95 with the parameters of that challenge (default GLI: "
        "dilation 3, lesions > 50 mm^3)",
    )
    parser.add_argument("--out-dir", default=None, help="where results.json/.md and heatmaps go (default: none)")
    parser.add_argument("--label", default=None, help="name of the model in the report (default: the model path)")
    parser.add_argument("--max-cases", type=int, default=0, help="use only the first N cases (0: all)")


def run(args: argparse.Namespace) -> int:
    """Run ``fedbrats evaluate`` with parsed options (errors: :func:`fedbrats.commands.run_command`)."""
    check_device(args.device)
    model = load_model(args.model, args.spec, verify_integrity=not args.skip_integrity_check)
    # The model's folder (exported metadata or run configuration) records the window and resampling it was
    # trained with; the options override them.
    roi, zoom = preprocessing_options(args.model, roi_option(args.roi_size), args.zoom, "evaluate")
    data: dict[str, Any] = {"max_eval_size": args.max_eval_size, "roi_size": roi, "zoom": zoom}
    datalist = args.datalist or default_test_datalist(args.sites)
    label = args.label or os.path.basename(os.path.normpath(args.model))
    results = evaluate_combinations(
        model,
        datalist,
        key=args.key,
        data=data,
        overlap=args.overlap,
        device=args.device,
        max_cases=args.max_cases,
        model_name=label,
        precision=args.precision,
        min_component_voxels=read_postprocessing(resolve_checkpoint(args.model), args.min_component_voxels),
        lesion_wise=args.lesion_wise,
    )
    from fedbrats.evaluation.report import format_table, write_reports

    logger.info("results of %s on %d case(s):\n%s", label, results["num_cases"], format_table(results))
    if args.lesion_wise:
        logger.info("lesion-wise (BraTS 2023, %s):\n%s", args.lesion_wise, format_table(results, "lesion_wise"))
    if args.out_dir:
        paths = write_reports(results, args.out_dir, label=label)
        logger.info("wrote %s", ", ".join(paths.values()))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the ``evaluate`` command.

    Returns:
        0 on success, 1 when the model, the data or the options are wrong (the reason is logged).
    """
    return run_command("evaluate", add_arguments, run, argv, EVALUATE_DESCRIPTION)


if __name__ == "__main__":
    sys.exit(main())
