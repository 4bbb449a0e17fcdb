"""Segment a new patient's tumour from whichever MRI sequences are available, in the patient's own image space.

The sequences given are preprocessed as in training (foreground crop, optional resampling, z-score of the
non-zero voxels of each sequence, absent sequences zero-filled and flagged in the modality mask), the network
runs window by window, and the WT/TC/ET prediction is put back onto the original voxel grid and written as a
BraTS label map (1 necrosis / non-enhancing core, 2 edema, 4 or 3 enhancing tumour), so it overlays the input
in any viewer.

The pipeline is data: :func:`fedbrats.data.loader.inference_steps` (the training preprocessing),
:func:`inferer_step` and :func:`postprocessing_steps` (MONAI's ``Invertd`` undoes the preprocessing on the
prediction). ``predict`` builds them in Python; an exported bundle's ``configs/inference.json`` holds the same
steps for ``python -m monai.bundle run``.
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
from monai.config import KeysCollection
from monai.transforms import Activationsd, AsDiscreted, Compose, Invertd, MapTransform
from monai.utils import convert_to_dst_type

from fedbrats.commands import run_command
from fedbrats.constants import MODALITIES
from fedbrats.data.conventions import CONVENTIONS, get_convention
from fedbrats.data.loader import DataConfig, inference_steps
from fedbrats.data.transforms import MASK_KEY, Ref, TransformStep
from fedbrats.evaluation.evaluate import check_device, load_model, preprocessing_options, roi_option
from fedbrats.precision import PRECISIONS
from fedbrats.runs import resolve_checkpoint
from fedbrats.scoring.inference import MaskedSlidingWindowInferer
from fedbrats.scoring.postprocess import RemoveSmallComponentsd, read_postprocessing
from fedbrats.utils import check_output_file, write_atomic

logger = logging.getLogger(__name__)

#: The id of the preprocessing pipeline that ``Invertd`` undoes (a :class:`Ref` in Python, ``@preprocessing`` in a
#: bundle config).
PREPROCESSING_REF = "preprocessing"


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


def check_volume(path: str, what: str) -> None:
    """Refuse, naming the file, what cannot be an MRI sequence of one patient: not a readable NIfTI volume, not
    3-D, not plain numbers (RGB), an affine that is not finite, an empty or non-finite volume, or a label map.

    Raises:
        ValueError: the file and what is wrong with it.
    """
    try:
        image = nib.load(path)
        data = np.asanyarray(image.dataobj)
    except Exception as exc:  # nibabel raises many types for files that are not NIfTI
        raise ValueError(f"{what} file {path!r} is not a readable NIfTI volume ({type(exc).__name__}: {exc})") from None
    if data.dtype.names is not None or data.dtype.kind not in "biuf":
        raise ValueError(f"{what} file {path!r} holds {data.dtype} values (RGB?), not the intensities of a sequence")
    shape = data.shape[:3] if data.ndim == 4 and data.shape[3] == 1 else data.shape
    if len(shape) != 3:
        raise ValueError(f"{what} file {path!r} has shape {data.shape}; a sequence is one 3-D volume")
    if data.size == 0:
        raise ValueError(f"{what} file {path!r} is empty (shape {data.shape})")
    if not np.isfinite(np.asarray(image.affine, dtype=np.float64)).all():
        raise ValueError(f"{what} file {path!r} has an affine that is not finite: its voxel grid is undefined")
    if data.dtype.kind == "f" and not np.isfinite(data).all():
        raise ValueError(f"{what} file {path!r} holds NaN or Inf intensities")
    if not np.any(data):
        raise ValueError(f"{what} file {path!r} holds only zeros")
    values = label_like_values(path)
    if values is not None:
        raise ValueError(
            f"{what} file {path!r} holds only the values {values}: it looks like a segmentation (label map), "
            f"not an MRI sequence; pass the patient's {what} image"
        )


def check_volumes(image_paths: Mapping[str, str]) -> None:
    """:func:`check_volume` of every given sequence (a segmentation given as a sequence, ``--flair x_seg.nii.gz``,
    would otherwise be segmented without a word).

    Raises:
        ValueError: the first file that is not a usable sequence, and why.
    """
    for modality, path in image_paths.items():
        check_volume(path, modality)


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
    check_output_file(out_path, image_paths, overwrite)
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


class RegionsToLabelsd(MapTransform):
    """Dictionary transform of :func:`regions_to_labels`: binary WT/TC/ET (3 x ...) to a BraTS label map
    (1 x ..., uint8), keeping a MetaTensor's affine, so ``SaveImage`` writes it where the input lies.

    Args:
        keys: the region maps (e.g. ``"pred"``).
        convention: ``brats2018`` (ET = 4) or ``brats2023`` (ET = 3).
        allow_missing_keys: tolerate an entry without the key.

    Raises:
        ValueError: an unknown convention.
    """

    def __init__(
        self, keys: KeysCollection = "pred", convention: str = "brats2018", allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        get_convention(convention)  # fail on a typo when the pipeline is built
        self.convention = convention

    def __call__(self, data: Mapping[Any, Any]) -> dict[Any, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            regions = np.asarray(torch.as_tensor(d[key]).detach().cpu())
            labels = torch.from_numpy(regions_to_labels(regions > 0.5, self.convention))[None]
            d[key] = convert_to_dst_type(labels, d[key], dtype=torch.uint8)[0]
        return d


def inferer_step(
    roi_size: Sequence[int], overlap: float = 0.5, sw_batch_size: int = 1, precision: str = "fp32"
) -> TransformStep:
    """The sliding-window inferer of ``predict`` and of an exported bundle (see :class:`MaskedSlidingWindowInferer`)."""
    args = {"roi_size": [int(s) for s in roi_size], "overlap": overlap, "sw_batch_size": sw_batch_size}
    return TransformStep(MaskedSlidingWindowInferer, {**args, "precision": precision})


def postprocessing_steps(
    convention: str | Ref, min_component_voxels: int | Ref, threshold: float = 0.5
) -> list[TransformStep]:
    """From the network's logits (``pred``) to a label map on the patient's grid: sigmoid, threshold, small
    components removed (at the model's resolution, where their size was chosen), the preprocessing undone
    (``Invertd`` on ``@preprocessing``, nearest neighbour) and the regions painted as BraTS labels.

    Args:
        convention: the label values (a :class:`Ref` lets a bundle user choose at run time).
        min_component_voxels: the minimum component size (see :mod:`fedbrats.scoring.postprocess`).
        threshold: sigmoid threshold of each region.
    """
    return [
        TransformStep(Activationsd, {"keys": "pred", "sigmoid": True}),
        TransformStep(AsDiscreted, {"keys": "pred", "threshold": threshold}),
        TransformStep(RemoveSmallComponentsd, {"keys": "pred", "min_voxels": min_component_voxels}),
        TransformStep(
            Invertd,
            {
                "keys": "pred",
                "transform": Ref(PREPROCESSING_REF),
                "orig_keys": "image",
                "nearest_interp": True,
                "to_tensor": True,
            },
        ),
        TransformStep(RegionsToLabelsd, {"keys": "pred", "convention": convention}),
    ]


@torch.no_grad()
def predict_case(
    model: torch.nn.Module,
    image_paths: Mapping[str, str | None],
    *,
    roi_size: Sequence[int] = DataConfig.roi_size,
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
        roi_size: sliding-window size (three multiples of 8; the model's training crop, see
            :func:`~fedbrats.evaluation.evaluate.recorded_preprocessing`).
        overlap: sliding-window overlap.
        device: where inference runs.
        zoom: the resampling factor the model was trained with (< 1 for downsampled training); the result is
            resampled back to the input grid.
        convention: ``brats2018`` (ET = 4) or ``brats2023`` (ET = 3) label values.
        threshold: sigmoid threshold of each region.
        sw_batch_size: windows per forward pass.
        precision: ``auto`` (bfloat16 where the hardware runs it natively), ``fp32`` or ``bf16``.
        min_component_voxels: remove connected components of each region smaller than this (voxels at the
            model's resolution; the size chosen on validation, see :mod:`fedbrats.scoring.postprocess`).

    Returns:
        ``(label_map, affine, header)``: a uint8 label map with the shape of the input volumes, their affine and
        the NIfTI header of the first given sequence (for :func:`write_segmentation`).

    Raises:
        ValueError: no sequence, a missing or unreadable file, volumes that differ in shape or affine (the
            files are named), or bad options.
    """
    paths = check_image_paths(image_paths)
    data_cfg = DataConfig(roi_size=roi_size, zoom=zoom)  # the rules of a job's data options
    inferer = inferer_step(data_cfg.roi_size, overlap, sw_batch_size, precision).build()
    get_convention(convention)  # fail before the work on an unknown convention
    first = next(iter(paths.values()))
    case_id = os.path.basename(first).split(".nii")[0]
    header = nib.load(first).header.copy()

    preprocessing = [step.build() for step in inference_steps(data_cfg.zoom)]
    # The loading step runs on its own: its errors (CaseValidationError, a ValueError naming the file) reach the
    # caller unwrapped, and an all-zero case stops before the crop, which cannot crop an empty volume.
    loaded = preprocessing[0]({"image": [paths.get(m) for m in MODALITIES], "case_id": case_id})
    affine: np.ndarray = loaded["affine"]
    original_shape = tuple(loaded["image"].shape[1:])
    logger.info("predicting %s from %s, volume %s", case_id, "+".join(paths), original_shape)
    if not bool(torch.as_tensor(loaded["image"]).any()):
        logger.warning("%s: the volumes are empty (all zero); the segmentation is empty", case_id)
        return np.zeros(original_shape, dtype=np.uint8), affine, header
    data = Compose(preprocessing[1:])(loaded)

    device = torch.device(device)
    model = model.to(device).eval()
    logits = inferer(data["image"][None].to(device), model, data[MASK_KEY][None].to(device))
    steps = postprocessing_steps(convention, min_component_voxels, threshold)
    post = Compose([step.build({PREPROCESSING_REF: Compose(preprocessing)}) for step in steps])
    result = post({"image": data["image"], "pred": logits[0].cpu()})
    labels = np.asarray(result["pred"][0].cpu(), dtype=np.uint8)
    if labels.shape != original_shape:  # Invertd restores the input grid exactly; anything else is a bug
        raise RuntimeError(f"{case_id}: segmentation shape {labels.shape} differs from the input {original_shape}")
    et_label = get_convention(convention).et_label
    logger.info(
        "%s: %d WT, %d TC, %d ET voxels",
        case_id,
        int((labels > 0).sum()),
        int(((labels == 1) | (labels == et_label)).sum()),
        int((labels == et_label).sum()),
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
    # A new file under the name (never written through a link onto another file), readable by its owner only.
    suffix = ".nii.gz" if out_path.endswith(".nii.gz") else ".nii"
    write_atomic(out_path, lambda tmp: nib.save(img, tmp), suffix=suffix, private=True)
    return out_path


#: What ``fedbrats predict`` does (its ``--help``).
PREDICT_DESCRIPTION = "Segment a brain tumour from any non-empty subset of T1, T1ce, T2 and FLAIR."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``fedbrats predict`` options."""
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
    parser.add_argument(
        "--roi-size", type=int, nargs="+", default=None, help="sliding window, 1 or 3 ints (default: the training crop)"
    )
    parser.add_argument(
        "--zoom", type=float, default=None, help="resampling factor (default: the one the model was trained with)"
    )
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


def run(args: argparse.Namespace) -> int:
    """Run ``fedbrats predict`` with parsed options (errors: :func:`fedbrats.commands.run_command`)."""
    image_paths = {m: getattr(args, m) for m in MODALITIES if getattr(args, m)}
    # Check the inputs and the output before the (slower) model loading, so a typo fails at once and nothing
    # is overwritten by accident.
    image_paths = check_image_paths(image_paths)
    check_output_path(args.out, image_paths, overwrite=args.overwrite)
    check_volumes(image_paths)
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
    # The window and resampling the model was trained with, from its folder; the options override them.
    roi, zoom = preprocessing_options(args.model, roi_option(args.roi_size), args.zoom, "predict")
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
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the ``predict`` command.

    Returns:
        0 on success, 1 when the model, the images or the options are wrong (the reason is logged).
    """
    return run_command("predict", add_arguments, run, argv, PREDICT_DESCRIPTION)


if __name__ == "__main__":
    sys.exit(main())
