"""Package a trained model for use outside NVFlare: weights plus a MONAI-bundle-style description.

An exported folder holds ``model.pt`` (a bare state dict, loadable with ``torch.load(weights_only=True)``) and
``metadata.json`` saying which network it is, what it expects (sequences, channel order, modality mask,
preprocessing, window size) and what it produces (WT/TC/ET sigmoid channels and how they map to BraTS labels),
what it was trained on and how well it did. :func:`fedbrats.evaluation.evaluate.load_model` and the ``predict``
command read such a folder directly.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import torch

import fedbrats
from fedbrats.constants import HD95_MISS_VALUE, MODALITIES, REGIONS
from fedbrats.data.conventions import CONVENTIONS
from fedbrats.evaluation.evaluate import (
    file_sha256,
    find_model_spec,
    load_model,
    load_state_dict,
    read_json,
    resolve_checkpoint,
    spec_from_json,
)
from fedbrats.evaluation.postprocess import read_postprocessing
from fedbrats.evaluation.predict import DEFAULT_ROI_SIZE, SPATIAL_DIVISOR
from fedbrats.federated.protocol import (
    EXPORTED_METADATA_FILE,
    EXPORTED_MODEL_FILE,
    EXPORTED_POSTPROCESSING_KEY,
    MODEL_SPEC_KEY,
)
from fedbrats.logging_setup import add_log_level_argument, configure_logging

logger = logging.getLogger(__name__)

REFERENCES: tuple[str, ...] = (
    "Menze et al., The Multimodal Brain Tumor Image Segmentation Benchmark (BRATS), IEEE TMI 34(10), 2015",
    "Bakas et al., Advancing The Cancer Genome Atlas glioma MRI collections with expert segmentation labels and "
    "radiomic features, Scientific Data 4, 2017",
    "Bakas et al., Identifying the Best Machine Learning Algorithms for Brain Tumor Segmentation, Progression "
    "Assessment, and Overall Survival Prediction in the BRATS Challenge, arXiv:1811.02629, 2018",
    "Myronenko, 3D MRI brain tumor segmentation using autoencoder regularization, BrainLes (MICCAI) 2018",
    "McMahan et al., Communication-Efficient Learning of Deep Networks from Decentralized Data, AISTATS 2017",
    "MONAI: https://monai.io; NVIDIA FLARE: https://nvidia.github.io/NVFlare",
)


def training_data_from_sites(sites_file: str, sites: Sequence[str] | None = None) -> dict[str, Any]:
    """Describe the training data of a federation from its ``sites.json``.

    Args:
        sites_file: the federation's ``sites.json``.
        sites: the sites that trained the model (default: all but the pooled ``central`` site, which only the
            centralized baseline uses).

    Raises:
        ValueError: the file is unreadable or a named site is not in it.
    """
    from fedbrats.data.federation import POOLED_SITE

    manifest = read_json(sites_file, "sites file")
    all_sites = manifest.get("sites") if isinstance(manifest, dict) else None
    if not isinstance(all_sites, dict) or not all_sites:
        raise ValueError(f"sites file {sites_file!r} needs a non-empty 'sites' mapping of site to settings")
    chosen = list(sites) if sites else [s for s in all_sites if s != POOLED_SITE]
    unknown = sorted(set(chosen) - set(all_sites))
    if unknown:
        raise ValueError(f"sites file {sites_file!r} has no site(s) {unknown}; it has {sorted(all_sites)}")
    described = {
        name: {
            "modalities": list(all_sites[name].get("modalities", [])),
            "num_training": all_sites[name].get("num_training"),
            "num_validation": all_sites[name].get("num_validation"),
        }
        for name in chosen
    }
    return {
        "sites_file": os.path.abspath(sites_file),
        "convention": manifest.get("convention"),
        "sites": described,
        "num_training_cases": sum(int(s["num_training"] or 0) for s in described.values()),
        "num_validation_cases": sum(int(s["num_validation"] or 0) for s in described.values()),
    }


def metrics_from_results(results: Mapping[str, Any]) -> dict[str, Any]:
    """The headline numbers of a 15-combination evaluation (per-case values left out), for ``metadata.json``."""
    if "combinations" not in results:
        return dict(results)  # some other metrics mapping: keep it as given

    def brief(row: Mapping[str, Any] | None) -> dict[str, Any] | None:
        if not row:
            return None
        return {k: row[k] for k in ("dice", "hd95", "mean_dice", "mean_hd95") if k in row}

    return {
        "test_datalist": results.get("datalist"),
        "num_test_cases": results.get("num_cases"),
        "mean_over_combinations": brief(results.get("mean_over_combinations")),
        "full_modality": brief(results.get("full_modality")),
        "mean_dice_per_combination": {name: row["mean_dice"] for name, row in results["combinations"].items()},
    }


def export_model(
    checkpoint_or_run_dir: str,
    out_dir: str,
    *,
    spec: dict[str, Any] | str | None = None,
    name: str | None = None,
    description: str = "",
    training_data: dict[str, Any] | None = None,
    roi_size: Sequence[int] = DEFAULT_ROI_SIZE,
    zoom: float = 1.0,
    metrics: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> str:
    """Write ``model.pt`` and ``metadata.json`` of a trained model to ``out_dir``.

    Args:
        checkpoint_or_run_dir: a checkpoint, a federated run folder (its best global model is exported) or an
            exported folder (see :func:`~fedbrats.evaluation.evaluate.resolve_checkpoint`).
        out_dir: the folder to write (created).
        spec: the network description; default: the run's ``model_spec.json`` found next to the checkpoint.
        name: model name (default: the name of ``out_dir``).
        description: free text: method, rounds, anything a user should know.
        training_data: what it was trained on, e.g. :func:`training_data_from_sites`.
        roi_size: sliding-window size to use at inference (three multiples of 8).
        zoom: resampling factor the model was trained with (1: native 1 mm grid).
        metrics: test results; the output of ``evaluate_combinations`` is condensed to its headline numbers.
        overwrite: replace an exported model already in ``out_dir`` (``--overwrite``); without it that is refused.

    Returns:
        ``out_dir``.

    Raises:
        ValueError: no model or spec found, weights that do not fit the network, or bad options.
    """
    roi = [int(s) for s in roi_size]
    if len(roi) != 3 or any(s < SPATIAL_DIVISOR or s % SPATIAL_DIVISOR for s in roi):
        raise ValueError(f"roi_size must be three multiples of {SPATIAL_DIVISOR}, got {list(roi_size)}")
    if not 0.05 <= zoom <= 1.0:
        raise ValueError(f"zoom must be in [0.05, 1], got {zoom}")
    existing = [n for n in (EXPORTED_MODEL_FILE, EXPORTED_METADATA_FILE) if os.path.lexists(os.path.join(out_dir, n))]
    if existing and not overwrite:
        raise ValueError(
            f"--out-dir {out_dir!r} already holds an exported model ({', '.join(existing)}); choose another folder, "
            "or pass --overwrite to replace it"
        )
    checkpoint = resolve_checkpoint(checkpoint_or_run_dir)
    if spec is None:
        spec = spec_from_json(find_model_spec(checkpoint))
    elif isinstance(spec, str):
        if not os.path.isfile(spec):
            raise ValueError(f"model spec {spec!r} does not exist")
        spec = spec_from_json(spec)
    # Building and loading proves that weights and spec belong together before anything is written.
    model = load_model(checkpoint, dict(spec))
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}

    os.makedirs(out_dir, exist_ok=True)
    model_path = os.path.join(out_dir, EXPORTED_MODEL_FILE)
    tmp = f"{model_path}.tmp{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, model_path)  # never leave a half-written model.pt behind
    load_state_dict(model_path)  # the promise of the format (a bare state dict, weights_only), checked

    conventions = {c.name: {"NCR": 1, "ED": 2, "ET": c.et_label} for c in CONVENTIONS.values()}
    metadata: dict[str, Any] = {
        "name": name or os.path.basename(os.path.normpath(os.path.abspath(out_dir))),
        "version": fedbrats.__version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "description": description,
        "framework": {"torch": torch.__version__, "monai": _monai_version()},
        "model_file": EXPORTED_MODEL_FILE,
        "model_sha256": file_sha256(model_path),
        "num_parameters": int(sum(v.numel() for v in model.parameters())),
        "source_checkpoint": os.path.abspath(checkpoint),
        MODEL_SPEC_KEY: dict(spec),
        "inputs": {
            "image": {
                "type": "magnetic resonance",
                "format": "NIfTI, the sequences of a case co-registered (same shape and affine), skull-stripped, "
                "1 mm isotropic (BraTS preprocessing)",
                "num_channels": len(MODALITIES),
                "channels": list(MODALITIES),
                "modality_mask": f"float vector of {len(MODALITIES)} in channel order, 1 = sequence present, "
                "0 = absent; passed as forward(image, modality_mask)",
                "preprocessing": "foreground crop, per-channel z-score of non-zero voxels, "
                "zero-filled absent sequences",
                "dtype": "float32",
                "shape": ["B", len(MODALITIES), "H", "W", "D"],
                "spatial": f"multiple of {SPATIAL_DIVISOR}",
                "roi_size": roi,
                "zoom": float(zoom),
            }
        },
        # Chosen on the run's validation cases (postprocessing.json); predict and evaluate apply it.
        EXPORTED_POSTPROCESSING_KEY: {
            "min_component_voxels": read_postprocessing(checkpoint),
            "what": "connected components of each region smaller than this (voxels at the model's resolution, "
            "26-connected) are removed; 0 = none",
        },
        "outputs": {
            "pred": {
                "type": "logits",
                "num_channels": len(REGIONS),
                "channels": list(REGIONS),
                "activation": "sigmoid",
                "threshold": 0.5,
                "regions": {
                    "WT": "whole tumour: NCR + ED + ET",
                    "TC": "tumour core: NCR + ET",
                    "ET": "enhancing tumour",
                },
                "label_conventions": conventions,
            }
        },
        "training_data": training_data or {},
        "metrics": metrics_from_results(metrics) if metrics else {},
        "metrics_notes": f"Dice and HD95 (mm) per region; HD95 is {HD95_MISS_VALUE} mm where a region is missed "
        "or predicted but absent",
        "usage": "python -m fedbrats.evaluation.predict --model <this folder> --t1 T1.nii.gz --flair FLAIR.nii.gz "
        "--out seg.nii.gz (any subset of --t1 --t1ce --t2 --flair)",
        "references": list(REFERENCES),
    }
    meta_path = os.path.join(out_dir, EXPORTED_METADATA_FILE)
    with open(meta_path, "w", encoding="utf-8") as f:
        json.dump(metadata, f, indent=2)
    logger.info("exported %s (%s) to %s", spec.get("path"), checkpoint, out_dir)
    return out_dir


def _monai_version() -> str:
    import monai

    return str(monai.__version__)


def build_parser() -> argparse.ArgumentParser:
    """The ``export`` command-line parser."""
    parser = argparse.ArgumentParser(
        prog="fedbrats-export", description="Package a trained model (weights + metadata.json) for use outside NVFlare."
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run-dir", default=None, help="federated run folder (its best global model is exported)")
    source.add_argument("--checkpoint", default=None, help="a checkpoint file (.pt)")
    parser.add_argument("--out-dir", required=True, help="folder to write model.pt and metadata.json to")
    parser.add_argument("--spec", default=None, help="model_spec.json (default: found next to the checkpoint)")
    parser.add_argument("--name", default=None, help="model name (default: the output folder's name)")
    parser.add_argument("--description", default="", help="free text describing the model")
    parser.add_argument("--roi-size", type=int, nargs="+", default=None, help="inference window (1 or 3 ints)")
    parser.add_argument("--zoom", type=float, default=1.0, help="resampling factor used in training")
    parser.add_argument("--results", default=None, help="results.json of `evaluate`, stored as the metrics")
    parser.add_argument("--sites", default=None, help="sites.json of the training federation")
    parser.add_argument("--site", action="append", default=None, help="a site that trained the model (repeatable)")
    parser.add_argument("--overwrite", action="store_true", help="replace a model already exported in --out-dir")
    add_log_level_argument(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the ``export`` command.

    Returns:
        0 on success, 1 when the model or the options are wrong (the reason is logged).
    """
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level)
    try:
        roi: Sequence[int] = DEFAULT_ROI_SIZE
        if args.roi_size:
            if len(args.roi_size) not in (1, 3):
                raise ValueError(f"--roi-size takes one or three integers, got {args.roi_size}")
            roi = args.roi_size * 3 if len(args.roi_size) == 1 else args.roi_size
        if args.site and not args.sites:
            raise ValueError("--site needs --sites (the sites.json that lists the sites)")
        training = training_data_from_sites(args.sites, args.site) if args.sites else None
        metrics = read_json(args.results, "results file") if args.results else None
        out = export_model(
            args.run_dir or args.checkpoint,
            args.out_dir,
            spec=args.spec,
            name=args.name,
            description=args.description,
            training_data=training,
            roi_size=roi,
            zoom=args.zoom,
            metrics=metrics,
            overwrite=args.overwrite,
        )
        logger.info("exported model in %s", out)
    except ValueError as exc:
        logger.error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
