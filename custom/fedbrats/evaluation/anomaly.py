"""Anomaly maps of a new patient, and the scores of an anomaly-segmentation model (jobs/mmccd) on labelled cases.

``fedbrats anomaly --model RUN --image FLAIR.nii.gz --out map.nii.gz`` writes the anomaly map of every axial
slice of a patient's source sequence (FLAIR by default), preprocessed as in training and put back on the input's
voxel grid, so it overlays the input in any viewer.

``fedbrats anomaly-eval --model RUN --datalist test.json --val-datalist central.json`` takes, from every case, the
central axial slice with the largest whole tumour (as the MMCCD paper does, one slice per subject), computes its
anomaly map, and reports, over the pixels inside the brain:

* AUROC and AUPRC (threshold-free);
* Dice at the threshold chosen on the validation cases' slices (the honest number);
* Dice at the best threshold chosen on the test slices themselves, as the public MMCCD code reports it
  (optimistic: marked so in every report), searched on the same grid as the validation threshold (100 quantiles of
  the scores) with the validation threshold among the candidates, so it is never below the honest number;
* the same for the model-free baseline that scores each pixel by the source's own windowed intensity
  (hyperintense FLAIR alone finds much of the whole tumour).

The anomaly map is zero outside each slice's brain mask eroded by a disk of ``--erosion-disk-radius`` pixels
(default 4, as the public code's ``disk(4)``; the error at the brain's edge is not about tissue); the pixels scored
are the whole (uneroded) brain's, for the model and the baseline alike. The test cases are read once, after the
threshold is fixed.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, replace
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.transforms import Compose

from fedbrats.commands import run_command
from fedbrats.constants import MODALITIES
from fedbrats.data.loader import DataConfig, eval_transforms, make_dataset, preprocess_transforms, read_datalist
from fedbrats.evaluation.evaluate import check_device, datalist_convention, load_model
from fedbrats.evaluation.predict import check_volume
from fedbrats.federated.methods.mmccd import (
    EROSION_DISK_RADIUS,
    MAX_EROSION_DISK_RADIUS,
    TRAINING,
    ModalityCycleNet,
    anomaly_scores,
    case_slices,
    check_erosion_disk_radius,
    plane_offsets,
    unfit_in_plane,
)
from fedbrats.precision import PRECISIONS, autocast, resolve_precision
from fedbrats.scoring.detection import auprc, auroc, best_dice_on, choose_threshold, mean_dice_at
from fedbrats.utils import check_output_file, write_atomic

logger = logging.getLogger(__name__)


@dataclass
class SliceScore:
    """One case's scored slice: the anomaly scores, the source's windowed intensity (the model-free baseline)
    and the whole-tumour labels of its brain pixels."""

    case_id: str
    slice_index: int
    scores: np.ndarray
    labels: np.ndarray
    intensity: np.ndarray


def score_slices(
    model: ModalityCycleNet,
    datalist: str,
    key: str,
    *,
    zoom: float = TRAINING["data"]["zoom"],
    brain_fraction: float = 0.6,
    num_masks: int = 32,
    steps: int = 10,
    erosion_disk_radius: int = EROSION_DISK_RADIUS,
    max_cases: int = 0,
    device: str | torch.device = "cpu",
    precision: str = "auto",
) -> list[SliceScore]:
    """The largest-tumour central slice of every case of ``datalist[key]`` that has one, scored by ``model``.

    Args:
        model: the anomaly model (a :class:`ModalityCycleNet`).
        datalist: Decathlon-style datalist with labels.
        key: its list to use (``test``, ``validation``).
        zoom: the resampling factor of training (the job's ``data.zoom``).
        brain_fraction: a central slice has at least this share of its case's largest brain area.
        num_masks: band masks per slice (MMCCD).
        steps: DDIM steps (MMCCD).
        erosion_disk_radius: radius of the disk that erodes each slice's brain mask in the anomaly map (default 4,
            the public code's ``disk(4)``; 0: none). The pixels scored are the whole brain's either way.
        max_cases: only the first N cases (0: all).
        device: where inference runs.
        precision: ``auto``, ``fp32`` or ``bf16``.

    Raises:
        ValueError: a model of another kind, a datalist without labels, or bad options.
    """
    check_erosion_disk_radius(erosion_disk_radius)
    if not isinstance(model, ModalityCycleNet):
        raise ValueError(f"anomaly-eval needs a modality_cycle model (jobs/mmccd), got {type(model).__name__}")
    entries = read_datalist(datalist, key)
    if max_cases:
        entries = entries[:max_cases]
    unlabelled = [e.get("case_id", "?") for e in entries if not e.get("label")]
    if unlabelled:
        raise ValueError(f"{datalist} ({key}): cases without a label cannot be scored: {unlabelled}")
    cfg = DataConfig(zoom=zoom, cache_rate=0.0)
    dataset = make_dataset(
        entries, eval_transforms((model.source,), datalist_convention(datalist), cfg), 0.0, 0.0, f"{datalist} {key}"
    )
    device = torch.device(device)
    model = model.to(device).eval()
    resolved = resolve_precision(precision, device)
    out = []
    for i in range(len(dataset)):
        item = dataset[i]
        case_id = str(entries[i].get("case_id", i))
        cs = case_slices(item["image"], item["label"], model, brain_fraction)
        z = cs.largest_tumour()
        if z is None:
            logger.warning("%s: no central slice holds tumour; skipped", case_id)
            continue
        with autocast(resolved, device):
            scores = anomaly_scores(
                model,
                cs.source[z : z + 1].to(device),
                cs.brain[z : z + 1],
                num_masks,
                steps,
                erosion_disk_radius,
                seed=i,
            ).cpu()
        inside = cs.brain[z : z + 1]
        source = cs.source[z : z + 1][inside].numpy()
        out.append(SliceScore(case_id, z, scores[inside].numpy(), cs.tumour[z : z + 1][inside].numpy(), source))
    if not out:
        raise ValueError(f"{datalist} ({key}): no case has a central slice with tumour to score")
    return out


def summarize_slices(slices: list[SliceScore], threshold: float) -> dict[str, Any]:
    """AUROC and AUPRC over the pooled pixels, Dice at ``threshold`` and at the best threshold on these slices
    (optimistic), and per case."""
    pooled_s = np.concatenate([s.scores for s in slices])
    pooled_y = np.concatenate([s.labels for s in slices])
    pairs = [(s.scores, s.labels) for s in slices]
    return {
        "num_slices": len(slices),
        "auroc": auroc(pooled_s, pooled_y),
        "auprc": auprc(pooled_s, pooled_y),
        "dice": mean_dice_at(pairs, threshold),
        "dice_best_threshold_on_these_slices_optimistic": best_dice_on(pairs, also=(threshold,)),
        "per_case": [
            {
                "case_id": s.case_id,
                "slice": s.slice_index,
                "tumour_pixels": int(s.labels.sum()),
                "auroc": auroc(s.scores, s.labels) if 0 < s.labels.sum() < s.labels.size else None,
                "dice": mean_dice_at([(s.scores, s.labels)], threshold),
            }
            for s in slices
        ],
    }


#: The defaults of :func:`score_slices`' options (recorded in every result beside the options given).
SCORING_DEFAULTS: dict[str, Any] = {
    name: p.default for name, p in inspect.signature(score_slices).parameters.items() if p.kind is p.KEYWORD_ONLY
}


def evaluate_anomaly(
    model: ModalityCycleNet,
    test_datalist: str,
    val_datalist: str,
    *,
    test_key: str = "test",
    val_key: str = "validation",
    **options: Any,
) -> dict[str, Any]:
    """Choose the threshold on the validation slices, then score the test slices once.

    Args:
        model: the anomaly model.
        test_datalist: the test cases (``test_key``).
        val_datalist: the validation cases (``val_key``) on which the Dice threshold is chosen.
        options: keyword arguments of :func:`score_slices`.
    """
    started = time.monotonic()
    val = score_slices(model, val_datalist, val_key, **options)
    threshold, val_dice = choose_threshold([(s.scores, s.labels) for s in val])
    baseline_threshold, _ = choose_threshold([(s.intensity, s.labels) for s in val])
    test = score_slices(model, test_datalist, test_key, **options)
    baseline = [replace(s, scores=s.intensity) for s in test]
    return {
        "model": {"variant": model.variant, "source": model.source, "target": model.target},
        # Every scoring option, the defaults included, so that a report says how it was scored.
        "options": {k: v for k, v in (SCORING_DEFAULTS | options).items() if k != "device"},
        "threshold": threshold,
        "validation": {"num_slices": len(val), "dice_at_threshold": val_dice},
        "test": summarize_slices(test, threshold),
        # The source's own intensity as the anomaly score (no model): hyperintense FLAIR alone finds much of the
        # whole tumour, so a model is worth its cost only where it beats this on the same slices.
        "intensity_baseline": summarize_slices(baseline, baseline_threshold),
        "seconds": round(time.monotonic() - started, 1),
    }


def anomaly_map_case(
    model: ModalityCycleNet,
    image_path: str,
    *,
    zoom: float = TRAINING["data"]["zoom"],
    convention: str = "brats2018",
    num_masks: int = 16,
    steps: int = 5,
    erosion_disk_radius: int = EROSION_DISK_RADIUS,
    batch_slices: int = 4,
    device: str | torch.device = "cpu",
    precision: str = "auto",
) -> tuple[np.ndarray, np.ndarray, Any]:
    """The anomaly map of one patient's source sequence on the input's own voxel grid.

    The volume goes through the training pipeline's deterministic steps (foreground crop, resampling, z-score;
    :func:`fedbrats.data.loader.preprocess_transforms`), every axial slice with brain is scored, and MONAI inverts the
    recorded crop and resampling on the map.

    Args:
        model: the anomaly model; its ``source`` is the sequence ``image_path`` holds.
        image_path: the NIfTI file of that sequence.
        zoom: the job's ``data.zoom``.
        convention: BraTS naming convention of the file (only the image is read).
        num_masks: band masks per slice (MMCCD).
        steps: DDIM steps (MMCCD).
        erosion_disk_radius: radius of the disk that erodes each slice's brain mask (default 4; 0: none).
        batch_slices: slices scored together.
        device: where inference runs.
        precision: ``auto``, ``fp32`` or ``bf16``.

    Returns:
        ``(map, affine, header)``: a float32 map with the input's shape, its affine and NIfTI header.

    Raises:
        ValueError: a model of another kind, or a missing or unreadable file (named).
    """
    check_erosion_disk_radius(erosion_disk_radius)
    if not isinstance(model, ModalityCycleNet):
        raise ValueError(f"anomaly maps need a modality_cycle model (jobs/mmccd), got {type(model).__name__}")
    if not os.path.isfile(image_path):
        raise ValueError(f"--image {image_path!r} does not exist")
    case_id = os.path.basename(image_path).split(".nii")[0]
    pipeline = Compose(preprocess_transforms((model.source,), convention, zoom))
    entry = {"image": [image_path if m == model.source else None for m in MODALITIES], "case_id": case_id}
    image = pipeline(entry)["image"]
    cs = case_slices(image.as_tensor(), None, model, brain_fraction=0.0)
    with_brain = torch.nonzero(cs.brain.flatten(1).any(1)).flatten()
    fitted = torch.zeros_like(cs.source)
    device = torch.device(device)
    model = model.to(device).eval()
    resolved = resolve_precision(precision, device)
    logger.info("%s: scoring %d slice(s) with brain, %d masks x %d steps", case_id, len(with_brain), num_masks, steps)
    for start in range(0, len(with_brain), batch_slices):
        idx = with_brain[start : start + batch_slices]
        with autocast(resolved, device):
            fitted[idx] = anomaly_scores(
                model, cs.source[idx].to(device), cs.brain[idx], num_masks, steps, erosion_disk_radius, seed=start
            ).cpu()
    # Back from (Z, 1, S, S) slices to the preprocessed volume, then to the input grid.
    planes = unfit_in_plane(fitted[:, 0], tuple(image.shape[1:3]), plane_offsets(image.shape[1:3], model.image_size))
    volume = image[:1].clone()
    volume[0] = planes.permute(1, 2, 0)
    restored = pipeline.inverse({"image": volume})["image"][0]
    reference = nib.load(image_path)
    return np.asarray(restored, dtype=np.float32), reference.affine, reference.header.copy()


def add_erosion_argument(p: argparse.ArgumentParser) -> None:
    """``--erosion-disk-radius``: the disk that erodes each slice's brain mask (the public code's ``disk(4)``)."""
    p.add_argument(
        "--erosion-disk-radius",
        type=int,
        default=EROSION_DISK_RADIUS,
        help=f"radius in pixels of the disk that erodes each slice's brain mask in the anomaly map (default "
        f"{EROSION_DISK_RADIUS}, the public MMCCD code's disk(4); 0: no erosion; at most {MAX_EROSION_DISK_RADIUS})",
    )


def check_erosion_option(args: argparse.Namespace) -> None:
    """Refuse an ``--erosion-disk-radius`` outside ``[0, MAX_EROSION_DISK_RADIUS]``, naming the option.

    Raises:
        ValueError: the radius is out of bounds (argparse refuses one that is not an integer).
    """
    check_erosion_disk_radius(args.erosion_disk_radius, "--erosion-disk-radius")


#: What ``fedbrats anomaly-eval`` does (its ``--help``).
ANOMALY_EVAL_DESCRIPTION = "Score an anomaly model (jobs/mmccd) on the largest-tumour slice of each test case."


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``fedbrats anomaly-eval`` options."""
    p.add_argument("--model", required=True, help="checkpoint (.pt) or federated run folder of jobs/mmccd")
    p.add_argument("--datalist", required=True, help="datalist with the test cases")
    p.add_argument("--key", default="test", help="its list of test cases (default: test)")
    p.add_argument("--val-datalist", required=True, help="datalist whose validation cases choose the threshold")
    p.add_argument("--val-key", default="validation", help="its list of validation cases (default: validation)")
    p.add_argument("--zoom", type=float, default=TRAINING["data"]["zoom"], help="the job's data.zoom")
    p.add_argument("--masks", type=int, default=32, help="band masks per slice (the paper: 128)")
    p.add_argument("--steps", type=int, default=10, help="DDIM steps per sample (the paper: 100)")
    p.add_argument("--brain-fraction", type=float, default=0.6, help="central slices: share of the largest brain")
    add_erosion_argument(p)
    p.add_argument("--max-cases", type=int, default=0, help="only the first N cases of each list (0: all)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=PRECISIONS, default="auto")
    p.add_argument("--out", default=None, help="write the results as JSON here (refuses to overwrite a file)")


def run(args: argparse.Namespace) -> int:
    """Run ``fedbrats anomaly-eval`` with parsed options (errors: :func:`fedbrats.commands.run_command`)."""
    check_device(args.device)
    check_erosion_option(args)
    if args.out and os.path.exists(args.out):
        raise ValueError(f"--out {args.out!r} exists; choose another path or remove it")
    model = load_model(args.model)
    results = evaluate_anomaly(
        model,
        args.datalist,
        args.val_datalist,
        test_key=args.key,
        val_key=args.val_key,
        zoom=args.zoom,
        brain_fraction=args.brain_fraction,
        num_masks=args.masks,
        steps=args.steps,
        erosion_disk_radius=args.erosion_disk_radius,
        max_cases=args.max_cases,
        device=args.device,
        precision=args.precision,
    )
    test = results["test"]
    logger.info(
        "%s on %d test slice(s): AUROC %.3f, AUPRC %.3f, Dice %.3f at the validation threshold %.4g "
        "(best threshold on the test slices, optimistic: %.3f)",
        results["model"]["variant"],
        test["num_slices"],
        test["auroc"],
        test["auprc"],
        test["dice"],
        results["threshold"],
        test["dice_best_threshold_on_these_slices_optimistic"],
    )
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run ``fedbrats anomaly-eval``; 0 on success, 1 with the reason logged."""
    return run_command("anomaly-eval", add_arguments, run, argv, ANOMALY_EVAL_DESCRIPTION)


#: What ``fedbrats anomaly`` does (its ``--help``).
ANOMALY_DESCRIPTION = "Write the anomaly map of a new patient's source sequence (FLAIR for the default jobs/mmccd)."


def add_map_arguments(p: argparse.ArgumentParser) -> None:
    """The ``fedbrats anomaly`` options."""
    p.add_argument("--model", required=True, help="checkpoint (.pt) or federated run folder of jobs/mmccd")
    p.add_argument("--image", required=True, help="NIfTI file of the model's source sequence (e.g. the FLAIR)")
    p.add_argument("--out", required=True, help="where the map goes (.nii.gz); never overwritten without --overwrite")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--zoom", type=float, default=TRAINING["data"]["zoom"], help="the job's data.zoom")
    p.add_argument("--convention", default="brats2018", help="BraTS naming convention of the file")
    p.add_argument("--masks", type=int, default=16, help="band masks per slice (the paper: 128)")
    p.add_argument("--steps", type=int, default=5, help="DDIM steps per sample (the paper: 100)")
    add_erosion_argument(p)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=PRECISIONS, default="auto")


def check_map_options(args: argparse.Namespace) -> None:
    """Refuse options of ``fedbrats anomaly`` that cannot work, naming them.

    Raises:
        ValueError: a zoom outside (0, 1] (or not a number), an erosion disk radius outside
            [0, MAX_EROSION_DISK_RADIUS], fewer than one mask or step.
    """
    if not (isinstance(args.zoom, float) and math.isfinite(args.zoom) and 0.05 <= args.zoom <= 1.0):
        raise ValueError(f"--zoom must be a number in [0.05, 1] (the job's data.zoom), got {args.zoom!r}")
    check_erosion_option(args)
    if args.masks < 1 or args.steps < 1:
        raise ValueError(f"--masks and --steps must be >= 1, got {args.masks} and {args.steps}")


def run_map(args: argparse.Namespace) -> int:
    """Run ``fedbrats anomaly`` with parsed options (errors: :func:`fedbrats.commands.run_command`)."""
    check_device(args.device)
    check_map_options(args)
    if not args.out.endswith((".nii", ".nii.gz")):
        raise ValueError(f"--out {args.out!r} must end with .nii.gz or .nii")
    check_output_file(args.out, {"--image": args.image}, overwrite=args.overwrite)
    check_volume(args.image, "--image")
    model = load_model(args.model)
    scores, affine, header = anomaly_map_case(
        model,
        args.image,
        zoom=args.zoom,
        convention=args.convention,
        num_masks=args.masks,
        steps=args.steps,
        erosion_disk_radius=args.erosion_disk_radius,
        device=args.device,
        precision=args.precision,
    )
    header.set_data_dtype(np.float32)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    # A new file under the name (never written through a link onto the input), readable by its owner only.
    suffix = ".nii.gz" if args.out.endswith(".nii.gz") else ".nii"
    image = nib.Nifti1Image(scores, affine, header)
    write_atomic(args.out, lambda tmp: nib.save(image, tmp), suffix=suffix, private=True)
    logger.info("wrote %s (max score %.4g)", args.out, float(scores.max()))
    return 0


def map_main(argv: list[str] | None = None) -> int:
    """Run ``fedbrats anomaly``; 0 on success, 1 with the reason logged."""
    return run_command("anomaly", add_map_arguments, run_map, argv, ANOMALY_DESCRIPTION)


if __name__ == "__main__":
    sys.exit(main())
