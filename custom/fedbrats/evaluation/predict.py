"""Segment a new patient's tumour from whichever MRI sequences are available, in the patient's own image space.

The sequences given are preprocessed as in training (foreground crop, optional resampling, z-score of the
non-zero voxels of each sequence, absent sequences zero-filled and flagged in the modality mask), the network
runs window by window, and the WT/TC/ET prediction is put back onto the original voxel grid and written as a
BraTS label map (1 necrosis / non-enhancing core, 2 edema, 4 or 3 enhancing tumour), so it overlays the input
in any viewer.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from monai.transforms import NormalizeIntensity, Zoom
from monai.transforms.utils import generate_spatial_bounding_box
from monai.utils import convert_to_tensor

from fedbrats.constants import MODALITIES
from fedbrats.data.conventions import CONVENTIONS, get_convention
from fedbrats.data.transforms import LoadBraTSCase
from fedbrats.evaluation.evaluate import (
    check_device,
    load_model,
    metadata_input_defaults,
    read_model_metadata,
    resolve_checkpoint,
)
from fedbrats.evaluation.inference import predict_logits
from fedbrats.evaluation.postprocess import read_postprocessing, remove_small_components
from fedbrats.logging_setup import add_log_level_argument, configure_logging
from fedbrats.precision import PRECISIONS

logger = logging.getLogger(__name__)

DEFAULT_ROI_SIZE: tuple[int, int, int] = (96, 96, 96)
#: Padding multiple of the network input (three halvings in every network of the package).
SPATIAL_DIVISOR = 8


def check_image_paths(image_paths: Mapping[str, str | None]) -> dict[str, str]:
    """The given sequences in canonical order, after checking names and that every file exists.

    Raises:
        ValueError: no sequence, an unknown sequence name, or a file that does not exist (named).
    """
    given = {m: p for m, p in dict(image_paths).items() if p}
    if not given:
        raise ValueError(f"give at least one sequence; any non-empty subset of {list(MODALITIES)} works")
    unknown = sorted(set(given) - set(MODALITIES))
    if unknown:
        raise ValueError(f"unknown sequence(s) {unknown}; sequences are {list(MODALITIES)}")
    for modality, path in given.items():
        if not os.path.isfile(path):
            raise ValueError(f"{modality} file {path!r} does not exist")
    return {m: given[m] for m in MODALITIES if m in given}


#: A volume with at most this many distinct values, all integers, is a label map rather than an MRI sequence.
MAX_LABEL_VALUES = 8


def label_like_values(path: str) -> list[int] | None:
    """The values of a volume that looks like a segmentation (few distinct integers), else ``None``.

    An MRI sequence has thousands of distinct intensities; a BraTS label map has 2 to 4 (0, 1, 2, 4 or 3). Only a
    strided sample is scanned first, so a real sequence is cleared at a glance.
    """
    data = np.asanyarray(nib.load(path).dataobj)
    sample = data.reshape(-1)[:: max(1, data.size // 200_000)]
    if np.unique(sample).size > MAX_LABEL_VALUES:
        return None
    values = np.unique(data)
    if values.size > MAX_LABEL_VALUES or not np.all(np.mod(values, 1) == 0):
        return None
    return [int(v) for v in values]


def check_not_label_maps(image_paths: Mapping[str, str]) -> None:
    """Refuse a segmentation given as a sequence (``--flair x_seg.nii.gz``): it would be segmented without a word.

    Raises:
        ValueError: a given file holds few integer values (it and its values are named).
    """
    for modality, path in image_paths.items():
        values = label_like_values(path)
        if values is not None:
            raise ValueError(
                f"{modality} file {path!r} holds only the values {values}: it looks like a segmentation (label map), "
                f"not an MRI sequence; pass the patient's {modality} image"
            )


def infer_convention(image_paths: Mapping[str, str]) -> str | None:
    """The BraTS convention the file names follow (``-t1n/-t1c/-t2w/-t2f``: 2023+, ``_t1/_t1ce/_t2/_flair``: 2018),
    or ``None`` when the names say nothing or disagree."""
    found = set()
    for modality, path in image_paths.items():
        name = os.path.basename(path).split(".nii")[0].lower()
        for convention in CONVENTIONS.values():
            suffix = convention.suffixes[MODALITIES.index(modality)]
            if name.endswith(convention.separator + suffix):
                found.add(convention.name)
    return found.pop() if len(found) == 1 else None


def check_output_path(out_path: str, image_paths: Mapping[str, str], overwrite: bool = False) -> str:
    """Check the output segmentation's path before any work: never an input, never an existing file by accident.

    Raises:
        ValueError: not a ``.nii``/``.nii.gz`` name, the same file as an input (the input would be replaced by a
            label map), an existing file without ``overwrite``, a folder, or a folder that cannot be written.
    """
    if not out_path.endswith((".nii", ".nii.gz")):
        raise ValueError(f"--out {out_path!r} must end with .nii.gz or .nii")
    real_out = os.path.realpath(out_path)
    for modality, path in image_paths.items():
        if real_out == os.path.realpath(path):
            raise ValueError(
                f"--out {out_path!r} is the {modality} input: writing it would destroy the patient's image"
            )
    if os.path.isdir(out_path):
        raise ValueError(f"--out {out_path!r} is a folder; give a file name ending with .nii.gz")
    if os.path.lexists(out_path) and not overwrite:
        raise ValueError(
            f"--out {out_path!r} already exists (a ground truth?); choose another name or pass --overwrite"
        )
    folder = os.path.dirname(os.path.abspath(out_path))
    existing = folder
    while not os.path.isdir(existing):
        existing = os.path.dirname(existing)
    if not os.access(existing, os.W_OK):
        raise ValueError(f"--out {out_path!r}: folder {existing!r} is not writable")
    return out_path


def regions_to_labels(regions: np.ndarray, convention: str = "brats2018") -> np.ndarray:
    """BraTS label map (uint8) from binary WT/TC/ET masks (3 x ...).

    Nested regions are enforced by painting from the outside in: WT -> 2 (edema), TC -> 1 (necrotic /
    non-enhancing core), ET -> the convention's enhancing label (4 in 2018-2021, 3 in 2023+).
    """
    if regions.ndim < 2 or regions.shape[0] != 3:
        raise ValueError(f"regions must be 3 x spatial (WT, TC, ET), got shape {regions.shape}")
    et_label = get_convention(convention).et_label
    labels = np.zeros(regions.shape[1:], dtype=np.uint8)
    labels[regions[0] > 0] = 2
    labels[regions[1] > 0] = 1
    labels[regions[2] > 0] = et_label
    return labels


@torch.no_grad()
def predict_case(
    model: torch.nn.Module,
    image_paths: Mapping[str, str | None],
    *,
    roi_size: Sequence[int] = DEFAULT_ROI_SIZE,
    overlap: float = 0.5,
    device: str | torch.device = "cpu",
    zoom: float = 1.0,
    convention: str = "brats2018",
    threshold: float = 0.5,
    sw_batch_size: int = 1,
    precision: str = "auto",
    min_component_voxels: int = 0,
) -> tuple[np.ndarray, np.ndarray, nib.Nifti1Header]:
    """Segment one patient from the sequences available.

    Args:
        model: a network of the package (``forward(image, modality_mask)``), e.g. from
            :func:`~fedbrats.evaluation.evaluate.load_model`.
        image_paths: sequence name -> NIfTI path, any non-empty subset of ``t1``, ``t1ce``, ``t2``, ``flair``;
            the volumes must be co-registered (same shape and affine), as BraTS data are.
        roi_size: sliding-window size (three multiples of 8).
        overlap: sliding-window overlap.
        device: where inference runs.
        zoom: the resampling factor the model was trained with (< 1 for downsampled training); the result is
            resampled back to the input grid.
        convention: ``brats2018`` (ET = 4) or ``brats2023`` (ET = 3) label values.
        threshold: sigmoid threshold of each region.
        sw_batch_size: windows per forward pass.
        precision: ``auto`` (bfloat16 where the hardware runs it natively), ``fp32`` or ``bf16``.
        min_component_voxels: remove connected components of each region smaller than this (voxels at the
            model's resolution; the size chosen on validation, see :mod:`fedbrats.evaluation.postprocess`).

    Returns:
        ``(label_map, affine, header)``: a uint8 label map with the shape of the input volumes, their affine and
        the NIfTI header of the first given sequence (for :func:`write_segmentation`).

    Raises:
        ValueError: no sequence, a missing or unreadable file, volumes that differ in shape or affine (the
            files are named), or bad options.
    """
    paths = check_image_paths(image_paths)
    roi = tuple(int(s) for s in roi_size)
    if len(roi) != 3 or any(s < SPATIAL_DIVISOR or s % SPATIAL_DIVISOR for s in roi):
        raise ValueError(f"roi_size must be three multiples of {SPATIAL_DIVISOR}, got {tuple(roi_size)}")
    if not 0.05 <= zoom <= 1.0:
        raise ValueError(f"zoom must be in [0.05, 1], got {zoom}")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    get_convention(convention)  # fail before the work on an unknown convention
    first = next(iter(paths.values()))
    case_id = os.path.basename(first).split(".nii")[0]
    # LoadBraTSCase reads only the given sequences, zero-fills the others and checks shapes and affines.
    loaded = LoadBraTSCase(list(paths), convention=convention)([paths.get(m) for m in MODALITIES], None, case_id)
    image: torch.Tensor = loaded["image"]
    mask: torch.Tensor = loaded["modality_mask"]
    affine: np.ndarray = loaded["affine"]
    header = nib.load(first).header.copy()
    original_shape = tuple(image.shape[1:])
    logger.info("predicting %s from %s, volume %s", case_id, "+".join(paths), original_shape)

    # Same steps as the training pipeline, recorded so that each can be undone on the prediction.
    start, end = generate_spatial_bounding_box(image, allow_smaller=True)
    if any(e <= s for s, e in zip(start, end)):
        logger.warning("%s: the volumes are empty (all zero); the segmentation is empty", case_id)
        return np.zeros(original_shape, dtype=np.uint8), affine, header
    box = tuple(slice(s, e) for s, e in zip(start, end))
    x = image[(slice(None), *box)]
    cropped_shape = tuple(x.shape[1:])
    if zoom < 1.0:
        x = convert_to_tensor(Zoom(zoom=zoom, mode="trilinear", keep_size=False)(x), track_meta=False)
    x = convert_to_tensor(NormalizeIntensity(nonzero=True, channel_wise=True)(x), track_meta=False).float()
    net_shape = tuple(x.shape[1:])
    pad = [(-s) % SPATIAL_DIVISOR for s in net_shape]
    # F.pad lists the last dimension first; padding only at the far end makes undoing it a plain slice.
    x = F.pad(x, [v for p in reversed(pad) for v in (0, p)])

    device = torch.device(device)
    model = model.to(device).eval()
    logits = predict_logits(
        model,
        x[None].to(device),
        mask[None].to(device),
        roi,
        overlap=overlap,
        sw_batch_size=sw_batch_size,
        precision=precision,
    )
    logits = logits[(0, slice(None), *(slice(0, s) for s in net_shape))]
    regions = (torch.sigmoid(logits.float()) > threshold).float().cpu()
    regions = remove_small_components(regions[None], min_component_voxels)[0]
    if zoom < 1.0:
        regions = F.interpolate(regions[None], size=cropped_shape, mode="nearest")[0]
    full = np.zeros((3, *original_shape), dtype=np.uint8)
    full[(slice(None), *box)] = regions.numpy().astype(np.uint8)
    labels = regions_to_labels(full, convention)
    logger.info(
        "%s: %d WT, %d TC, %d ET voxels",
        case_id,
        int(full[0].sum()),
        int(full[1].sum()),
        int(full[2].sum()),
    )
    return labels, affine, header


def write_segmentation(label_map: np.ndarray, affine: np.ndarray, header: Any, out_path: str) -> str:
    """Write a label map as a uint8 NIfTI with the input's affine and header (so it overlays the input).

    Raises:
        ValueError: ``out_path`` is not a ``.nii`` / ``.nii.gz`` file name, or the label map is not 3-D.
    """
    if not out_path.endswith((".nii", ".nii.gz")):
        raise ValueError(f"output {out_path!r} must end with .nii.gz or .nii")
    if label_map.ndim != 3:
        raise ValueError(f"label map must be 3-D, got shape {label_map.shape}")
    hdr = header.copy() if header is not None else None
    img = nib.Nifti1Image(np.asarray(label_map, dtype=np.uint8), np.asarray(affine, dtype=np.float64), header=hdr)
    img.set_data_dtype(np.uint8)
    # The input's intensity scaling must not be applied to labels.
    img.header.set_slope_inter(1.0, 0.0)
    img.header["descrip"] = b"fedbrats segmentation"
    folder = os.path.dirname(os.path.abspath(out_path))
    os.makedirs(folder, exist_ok=True)
    nib.save(img, out_path)
    return out_path


def build_parser() -> argparse.ArgumentParser:
    """The ``predict`` command-line parser."""
    parser = argparse.ArgumentParser(
        prog="fedbrats-predict",
        description="Segment a brain tumour from any non-empty subset of T1, T1ce, T2 and FLAIR.",
    )
    parser.add_argument("--model", required=True, help="exported model folder, federated run folder or checkpoint")
    parser.add_argument("--spec", default=None, help="model_spec.json (default: found next to the model)")
    for modality in MODALITIES:
        parser.add_argument(f"--{modality}", default=None, metavar="PATH", help=f"{modality} NIfTI (optional)")
    parser.add_argument("--out", required=True, help="output segmentation (.nii.gz)")
    parser.add_argument(
        "--convention",
        choices=sorted(CONVENTIONS),
        default=None,
        help="label values: brats2018 (ET=4) or brats2023 (ET=3); default: from the input names, else brats2018",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file (never an input)")
    parser.add_argument("--roi-size", type=int, nargs="+", default=None, help="sliding window (1 or 3 ints)")
    parser.add_argument("--zoom", type=float, default=None, help="resampling factor (default: the model's, or 1)")
    parser.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="auto: bfloat16 where the CPU/GPU runs it natively (about 2-3x faster), else float32",
    )
    parser.add_argument(
        "--min-component-voxels",
        type=int,
        default=None,
        help="remove smaller connected components (default: the size chosen on validation, from the model folder)",
    )
    parser.add_argument(
        "--skip-integrity-check",
        action="store_true",
        help="load an exported model.pt even if it does not match the model_sha256 of its metadata.json",
    )
    add_log_level_argument(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the ``predict`` command.

    Returns:
        0 on success, 1 when the model, the images or the options are wrong (the reason is logged).
    """
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level)
    try:
        image_paths = {m: getattr(args, m) for m in MODALITIES if getattr(args, m)}
        # Check the inputs and the output before the (slower) model loading, so a typo fails at once and nothing
        # is overwritten by accident.
        image_paths = check_image_paths(image_paths)
        check_output_path(args.out, image_paths, overwrite=args.overwrite)
        check_not_label_maps(image_paths)
        check_device(args.device)
        convention = args.convention
        if convention is None:
            inferred = infer_convention(image_paths)
            convention = inferred or "brats2018"
            source = "inferred from the input file names" if inferred else "the default; the names do not tell"
            logger.info(
                "label convention %s (ET=%d), %s; pass --convention to choose",
                convention,
                get_convention(convention).et_label,
                source,
            )
        model = load_model(args.model, args.spec, verify_integrity=not args.skip_integrity_check)
        defaults = metadata_input_defaults(read_model_metadata(resolve_checkpoint(args.model)))
        if args.roi_size:
            if len(args.roi_size) not in (1, 3):
                raise ValueError(f"--roi-size takes one or three integers, got {args.roi_size}")
            roi = tuple(args.roi_size) * 3 if len(args.roi_size) == 1 else tuple(args.roi_size)
        else:
            roi = defaults.get("roi_size", DEFAULT_ROI_SIZE)
        zoom = args.zoom if args.zoom is not None else defaults.get("zoom", 1.0)
        labels, affine, header = predict_case(
            model,
            image_paths,
            roi_size=roi,
            overlap=args.overlap,
            device=args.device,
            zoom=zoom,
            convention=convention,
            precision=args.precision,
            min_component_voxels=read_postprocessing(resolve_checkpoint(args.model), args.min_component_voxels),
        )
        write_segmentation(labels, affine, header, args.out)
        logger.info("wrote %s (labels %s)", args.out, sorted(int(v) for v in np.unique(labels)))
    except ValueError as exc:
        logger.error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
