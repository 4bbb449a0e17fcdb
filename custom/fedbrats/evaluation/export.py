"""Package a trained model for use outside NVFlare, as a MONAI bundle.

An exported folder is a MONAI bundle (https://docs.monai.io/en/latest/mb_specification.html):

- ``models/model.pt``: the weights, a bare state dict (``torch.load(weights_only=True)``);
- ``models/model.ts``: the traced network, ``forward(image, modality_mask) -> logits``, where tracing reproduces it;
- ``configs/metadata.json``: MONAI's bundle metadata (it passes ``python -m monai.bundle verify_metadata``) plus
  the package's own description: which network it is (``model_spec``), the training preprocessing, the
  post-processing chosen on validation, what it was trained on and how well it did;
- ``configs/inference.json``: ``python -m monai.bundle run`` segments a new patient's NIfTI files with it;
- ``docs/README.md``: how to use it.

The preprocessing (crop, zoom, window size, normalisation) is read from the run that trained the model, never
typed again. :func:`fedbrats.evaluation.evaluate.load_model` and the ``predict`` and ``evaluate`` commands read
such a folder directly.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from importlib import metadata as package_metadata
from typing import Any

import torch

import fedbrats
from fedbrats.commands import run_command
from fedbrats.constants import HD95_MISS_VALUE, MODALITIES
from fedbrats.data.conventions import CONVENTIONS
from fedbrats.data.loader import SPATIAL_DIVISOR, DataConfig
from fedbrats.evaluation.bundle import check_config_targets, export_torchscript, inference_config, monai_metadata
from fedbrats.evaluation.evaluate import load_model, recorded_preprocessing, roi_option
from fedbrats.federated.protocol import MODEL_SPEC_KEY
from fedbrats.runs import (
    EXPORTED_POSTPROCESSING_KEY,
    EXPORTED_PREPROCESSING_KEY,
    ModelFolder,
    file_sha256,
    find_model_spec,
    load_state_dict,
    read_json,
    resolve_checkpoint,
    spec_from_json,
)
from fedbrats.scoring.postprocess import read_postprocessing

logger = logging.getLogger(__name__)

DEFAULT_AUTHORS = "the institutions of the federation that trained the model"
DEFAULT_COPYRIGHT = "Copyright (c) the institutions of the federation that trained the model"
#: Packages the bundle needs beyond MONAI (MONAI's schema asks for them and their versions).
REQUIRED_PACKAGES: tuple[str, ...] = ("fedbrats", "nibabel", "scipy", "pytorch-ignite")

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


def training_preprocessing(
    checkpoint: str, roi_size: Sequence[int] | None, zoom: float | None
) -> tuple[DataConfig, str]:
    """The crop size and zoom the model was trained with: recorded beside it (the run's job configuration, or an
    exported model's metadata), or, for a checkpoint without either, the values given.

    Returns:
        ``(options, where they come from)``.

    Raises:
        ValueError: nothing recorded and a value not given, or a value given that contradicts the record.
    """
    recorded = recorded_preprocessing(checkpoint)
    if not recorded:
        if roi_size is None or zoom is None:
            raise ValueError(
                f"checkpoint {checkpoint!r} has no run configuration (app_server/config/config_fed_client.json of its "
                "run folder) or exported metadata that records its preprocessing; pass the --zoom and --roi-size it "
                "was trained with, or export from the run folder"
            )
        return DataConfig(roi_size=roi_size, zoom=zoom), "given by the user"
    for option, given, value in (("--zoom", zoom, recorded["zoom"]), ("--roi-size", roi_size, recorded["roi_size"])):
        if given is None:
            continue
        same = abs(float(given) - value) < 1e-9 if option == "--zoom" else tuple(int(v) for v in given) == value
        if not same:
            raise ValueError(
                f"{option} {given} contradicts the {value} the model was trained with ({recorded['source']}); the "
                "export records the training preprocessing, leave the option out"
            )
    return DataConfig(roi_size=recorded["roi_size"], zoom=recorded["zoom"]), str(recorded["source"])


def _package_versions(names: Sequence[str]) -> dict[str, str]:
    versions = {}
    for name in names:
        try:
            versions[name] = package_metadata.version(name)
        except package_metadata.PackageNotFoundError:
            versions[name] = fedbrats.__version__ if name == "fedbrats" else "not installed"
    return versions


def _write_json(path: str, content: Any) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(content, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def _bundle_readme(name: str, torchscript_skipped: str | None) -> str:
    ts = (
        "`models/model.ts` is the traced network: `torch.jit.load(path)(image, modality_mask)` returns the logits."
        if torchscript_skipped is None
        else f"No TorchScript: {torchscript_skipped.rstrip('.')}."
    )
    return f"""# {name}

A fedbrats model as a MONAI bundle: brain tumour segmentation (WT, TC, ET) from any non-empty subset of T1, T1ce,
T2 and FLAIR. `configs/metadata.json` describes it (inputs, outputs, training preprocessing, training data,
metrics).

Segment a patient, from this folder (any subset of `--t1 --t1ce --t2 --flair`; `--convention brats2023` writes
ET as 3):

```bash
python -m monai.bundle run --config_file configs/inference.json --t1 T1.nii.gz --flair FLAIR.nii.gz --output_dir out
```

It writes `out/<first sequence's name>_seg.nii.gz` on the input's grid; from elsewhere add `--bundle_root <this
folder>`. The same with the package: `fedbrats predict --model <this folder> --t1 T1.nii.gz --flair FLAIR.nii.gz
--out seg.nii.gz`.

{ts}

`python -m monai.bundle run` executes the `_target_` and `$` entries of the config it is given: run only
bundles you trust. `fedbrats predict` reads `configs/metadata.json` only and builds registered classes only.
"""


def export_model(
    checkpoint_or_run_dir: str,
    out_dir: str,
    *,
    spec: dict[str, Any] | str | None = None,
    name: str | None = None,
    description: str = "",
    training_data: dict[str, Any] | None = None,
    roi_size: Sequence[int] | None = None,
    zoom: float | None = None,
    metrics: dict[str, Any] | None = None,
    overwrite: bool = False,
    authors: str = DEFAULT_AUTHORS,
    copyright_: str = DEFAULT_COPYRIGHT,
    torchscript: bool = True,
) -> str:
    """Write a trained model as a MONAI bundle to ``out_dir`` (see the module's description).

    Args:
        checkpoint_or_run_dir: a checkpoint, a federated run folder (its best global model is exported) or an
            exported folder (see :func:`~fedbrats.evaluation.evaluate.resolve_checkpoint`).
        out_dir: the bundle's folder (created).
        spec: the network description; default: the run's ``model_spec.json`` found next to the checkpoint.
        name: model name (default: the name of ``out_dir``).
        description: free text: method, rounds, anything a user should know.
        training_data: what it was trained on, e.g. :func:`training_data_from_sites`.
        roi_size: only for a checkpoint without its run folder: the training crop (the sliding window).
        zoom: only for a checkpoint without its run folder: the training resampling factor.
        metrics: test results; the output of ``evaluate_combinations`` is condensed to its headline numbers.
        overwrite: replace an exported model already in ``out_dir`` (``--overwrite``); without it that is refused.
        authors: the bundle's ``authors``.
        copyright_: the bundle's ``copyright``.
        torchscript: also write ``models/model.ts`` where tracing reproduces the network.

    Returns:
        ``out_dir``.

    Raises:
        ValueError: no model or spec found, weights that do not fit the network, preprocessing neither recorded
            nor given (or given against the record), or an existing export without ``overwrite``.
    """
    folder = ModelFolder(out_dir)
    candidates = (folder.model, folder.metadata, folder.inference_config, *folder.flat_files)
    existing = [os.path.relpath(p, out_dir) for p in candidates if os.path.lexists(p)]
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
    data_options, preprocessing_source = training_preprocessing(checkpoint, roi_size, zoom)
    roi = list(data_options.roi_size)
    # Building and loading proves that weights and spec belong together before anything is written.
    model = load_model(checkpoint, dict(spec))
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    min_component_voxels = read_postprocessing(checkpoint)
    inference = inference_config(spec, zoom=data_options.zoom, roi_size=roi, min_component_voxels=min_component_voxels)
    check_config_targets(inference, "configs/inference.json")

    for sub in (os.path.dirname(folder.model), os.path.dirname(folder.metadata), os.path.dirname(folder.readme)):
        os.makedirs(sub, exist_ok=True)
    tmp = f"{folder.model}.tmp{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, folder.model)  # never leave a half-written model.pt behind
    load_state_dict(folder.model)  # the promise of the format (a bare state dict, weights_only), checked
    if overwrite:
        for stale in (*folder.flat_files, folder.torchscript):  # an earlier export's files would contradict this one
            if os.path.lexists(stale):
                os.remove(stale)

    bundle_name = name or os.path.basename(os.path.normpath(os.path.abspath(out_dir)))
    summary = metrics_from_results(metrics) if metrics else {}
    metadata: dict[str, Any] = monai_metadata(
        version=fedbrats.__version__,
        name=bundle_name,
        description=description or f"fedbrats {spec.get('path', '').rsplit('.', 1)[-1]} exported from {checkpoint}",
        roi_size=roi,
        authors=authors,
        copyright_=copyright_,
        required_packages=_package_versions(REQUIRED_PACKAGES),
        eval_metrics=_eval_metrics(summary),
        references=REFERENCES,
    )
    torchscript_skipped: str | None = "not requested (--no-torchscript)"
    if torchscript:
        torchscript_skipped = export_torchscript(model, folder.torchscript, roi, meta_values=metadata)
    metadata.update(
        {
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "model_file": os.path.relpath(folder.model, out_dir),
            "model_sha256": file_sha256(folder.model),
            "num_parameters": int(sum(v.numel() for v in model.parameters())),
            "source_checkpoint": os.path.abspath(checkpoint),
            MODEL_SPEC_KEY: dict(spec),
            "torchscript": (
                {"file": os.path.relpath(folder.torchscript, out_dir), "forward": "(image, modality_mask) -> logits"}
                if torchscript_skipped is None
                else {"file": None, "why_not": torchscript_skipped}
            ),
            EXPORTED_PREPROCESSING_KEY: {
                "zoom": float(data_options.zoom),
                "roi_size": roi,
                "read_from": preprocessing_source,
                "crop": "bounding box of the non-zero voxels of the given sequences",
                "normalisation": "z-score of the non-zero voxels of each sequence; absent sequences zero-filled",
                "intensity_window": None,
                "padding": f"to a multiple of {SPATIAL_DIVISOR}",
                "steps": "configs/inference.json#preprocessing (the steps of training and `fedbrats predict`)",
            },
            # Chosen on the run's validation cases (postprocessing.json); predict, evaluate and the bundle apply it.
            EXPORTED_POSTPROCESSING_KEY: {
                "min_component_voxels": min_component_voxels,
                "what": "connected components of each region smaller than this (voxels at the model's resolution, "
                "26-connected) are removed; 0 = none",
            },
            "label_conventions": {c.name: {"NCR": 1, "ED": 2, "ET": c.et_label} for c in CONVENTIONS.values()},
            "training_data": training_data or {},
            "metrics": summary,
            "metrics_notes": f"Dice and HD95 (mm) per region; HD95 is {HD95_MISS_VALUE} mm where a region is "
            "missed or predicted but absent",
            "usage": {
                "monai": "python -m monai.bundle run --config_file <bundle>/configs/inference.json --bundle_root "
                "<bundle> --t1 T1.nii.gz --flair FLAIR.nii.gz --output_dir out (any subset of "
                f"{', '.join('--' + m for m in MODALITIES)})",
                "fedbrats": "fedbrats predict --model <bundle> --t1 T1.nii.gz --flair FLAIR.nii.gz --out seg.nii.gz",
            },
        }
    )
    _write_json(folder.inference_config, inference)
    _write_json(folder.metadata, metadata)
    with open(folder.readme, "w", encoding="utf-8") as f:
        f.write(_bundle_readme(bundle_name, torchscript_skipped))
    logger.info(
        "exported %s (%s) as a MONAI bundle to %s (zoom %s and window %s from %s)",
        spec.get("path"),
        checkpoint,
        out_dir,
        data_options.zoom,
        roi,
        preprocessing_source,
    )
    return out_dir


def _eval_metrics(summary: Mapping[str, Any]) -> dict[str, Any]:
    """MONAI's ``eval_metrics``: the headline mean Dice values of the condensed results, if any."""
    out: dict[str, Any] = {}
    for key, label in (("mean_over_combinations", "mean_dice_15_combinations"), ("full_modality", "mean_dice_all4")):
        row = summary.get(key)
        if isinstance(row, Mapping) and row.get("mean_dice") is not None:
            out[label] = row["mean_dice"]
    return out or {k: v for k, v in summary.items() if isinstance(v, (int, float))}


#: What ``fedbrats export`` does (its ``--help``).
EXPORT_DESCRIPTION = (
    "Package a trained model as a MONAI bundle (configs/metadata.json, configs/inference.json, "
    "models/model.pt, models/model.ts)."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``fedbrats export`` options."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run-dir", default=None, help="federated run folder (its best global model is exported)")
    source.add_argument("--checkpoint", default=None, help="a checkpoint file (.pt)")
    parser.add_argument("--out-dir", required=True, help="the bundle's folder")
    parser.add_argument("--spec", default=None, help="model_spec.json (default: found next to the checkpoint)")
    parser.add_argument("--name", default=None, help="model name (default: the output folder's name)")
    parser.add_argument("--description", default="", help="free text describing the model")
    parser.add_argument("--authors", default=DEFAULT_AUTHORS, help="the bundle's authors")
    parser.add_argument("--copyright", default=DEFAULT_COPYRIGHT, help="the bundle's copyright")
    parser.add_argument(
        "--roi-size",
        type=int,
        nargs="+",
        default=None,
        help="only for a checkpoint outside its run folder: the training crop (1 or 3 ints); else read from the run",
    )
    parser.add_argument(
        "--zoom",
        type=float,
        default=None,
        help="only for a checkpoint outside its run folder: the training zoom; otherwise read from the run",
    )
    parser.add_argument("--results", default=None, help="results.json of `evaluate`, stored as the metrics")
    parser.add_argument("--sites", default=None, help="sites.json of the training federation")
    parser.add_argument("--site", action="append", default=None, help="a site that trained the model (repeatable)")
    parser.add_argument("--no-torchscript", action="store_true", help="do not write models/model.ts")
    parser.add_argument("--overwrite", action="store_true", help="replace a model already exported in --out-dir")


def run(args: argparse.Namespace) -> int:
    """Run ``fedbrats export`` with parsed options (errors: :func:`fedbrats.commands.run_command`)."""
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
        roi_size=roi_option(args.roi_size),
        zoom=args.zoom,
        metrics=metrics,
        overwrite=args.overwrite,
        authors=args.authors,
        copyright_=args.copyright,
        torchscript=not args.no_torchscript,
    )
    logger.info("exported model in %s", out)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the ``export`` command.

    Returns:
        0 on success, 1 when the model or the options are wrong (the reason is logged).
    """
    return run_command("export", add_arguments, run, argv, EXPORT_DESCRIPTION)


if __name__ == "__main__":
    sys.exit(main())
