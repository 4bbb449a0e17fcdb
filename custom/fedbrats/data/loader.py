"""Datasets and data loaders for training, validation and evaluation of one site, and the preprocessing they share
with inference (:func:`preprocessing_steps`, :func:`inference_steps`): ``predict`` and an exported MONAI bundle
build their pipelines from the same steps as training."""

from __future__ import annotations

import copy
import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from monai.data import DataLoader, Dataset
from monai.transforms import (
    CenterSpatialCropd,
    Compose,
    CopyItemsd,
    CropForegroundd,
    DeleteItemsd,
    DivisiblePadd,
    EnsureTyped,
    FgBgToIndicesd,
    Lambda,
    NormalizeIntensityd,
    RandAffined,
    RandCropByPosNegLabeld,
    RandFlipd,
    Randomizable,
    RandScaleIntensityd,
    RandShiftIntensityd,
    RandSpatialCropd,
    SpatialPadd,
    Zoomd,
    apply_transform,
)

from fedbrats.constants import MODALITIES
from fedbrats.data.transforms import (
    AVAILABLE_IMAGE_KEY,
    AVAILABLE_MASK_KEY,
    MASK_KEY,
    ConvertBraTSLabelsd,
    LoadBraTSCased,
    ModalityDropoutd,
    TransformStep,
    apply_modality_mask,
)
from fedbrats.data.validation import CaseValidationError, permission_problem

logger = logging.getLogger(__name__)

#: Volumes the networks see are padded to a multiple of this (three halvings in every network of the package); the
#: crop size must be one too.
SPATIAL_DIVISOR = 8


#: Largest random rotation (radians, about each axis) and relative scaling of ``DataConfig.spatial_augment``.
SPATIAL_AUGMENT_ROTATION = math.radians(15.0)
SPATIAL_AUGMENT_SCALE = 0.15


@dataclass
class DataConfig:
    """How a site turns its cases into tensors. The same for every site of a job (it lives in the job config).

    Attributes:
        roi_size: training crop and sliding-window size (voxels per side); a multiple of 8.
        tumour_crop_fraction: share of training crops centred on a tumour voxel (any region); the rest are
            centred on a random brain or background voxel. Most random crops of a large volume hold no
            tumour; nnU-Net samples a third of its patches on foreground, we default to two thirds because a
            federated site sees few steps. 0 gives uniform random crops.
        zoom: resampling factor applied after foreground cropping (0.5 halves each side; lets a CPU train on
            real 240 x 240 x 155 volumes). 1.0 keeps the native 1 mm grid.
        max_eval_size: validation volumes are centre-cropped to at most this many voxels per side (0: never).
        batch_size: training batch size.
        cache_rate: fraction of cases whose deterministic preprocessing is cached in memory.
        modality_dropout: probability of hiding some of a training case's present sequences.
        augment: random flips and intensity scale/shift during training.
        spatial_augment: probability that a training crop is also rotated (up to 15 degrees about each axis) and
            scaled (by up to 15 %), image bilinear, label nearest, zeros (background) outside; 0: never. Flips alone
            leave a model of a few cases with few shapes to learn from; nnU-Net rotates and scales.
        num_workers: data-loading worker processes (0 keeps one process per simulated site).
        max_invalid_fraction: unreadable cases are skipped with a warning up to this share of a list; beyond
            it the site reports an error instead of training on almost nothing.
    """

    # The training recipe's values (docs/results.md, "Training recipe", has the runs behind each choice): every job
    # lists them from here (fedbrats.jobgen), so a default lives in one place.
    roi_size: Sequence[int] = (32, 32, 32)
    tumour_crop_fraction: float = 0.67
    zoom: float = 1.0
    max_eval_size: int = 0
    batch_size: int = 2
    cache_rate: float = 1.0
    # Every site hides sequences at random, so that each model is trained for the subsets of its sequences it will
    # be asked about (the pooled centralized site thus sees all 15 combinations).
    modality_dropout: float = 0.5
    augment: bool = True
    spatial_augment: float = 0.0
    num_workers: int = 0
    max_invalid_fraction: float = 0.5

    def __post_init__(self) -> None:
        self.roi_size = tuple(int(s) for s in self.roi_size)
        if len(self.roi_size) != 3 or any(s < SPATIAL_DIVISOR or s % SPATIAL_DIVISOR for s in self.roi_size):
            raise ValueError(f"roi_size must be three multiples of {SPATIAL_DIVISOR} (>= 8), got {self.roi_size}")
        if not 0.0 <= self.tumour_crop_fraction <= 1.0:
            raise ValueError(f"tumour_crop_fraction must be in [0, 1], got {self.tumour_crop_fraction}")
        if not 0.05 <= self.zoom <= 1.0:
            raise ValueError(f"zoom must be in [0.05, 1], got {self.zoom}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not 0.0 <= self.cache_rate <= 1.0:
            raise ValueError(f"cache_rate must be in [0, 1], got {self.cache_rate}")
        if not 0.0 <= self.spatial_augment <= 1.0:
            raise ValueError(f"spatial_augment must be in [0, 1], got {self.spatial_augment}")

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> DataConfig:
        """Build from a config mapping, rejecting unknown keys by name."""
        values = dict(values or {})
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown data option(s) {unknown}; known: {sorted(known)}")
        return cls(**values)


def preprocessing_steps(
    modalities: Sequence[str] | None, convention: str, zoom: float, labelled: bool = True
) -> list[TransformStep]:
    """The deterministic preprocessing of a case, the one definition that training, validation, ``predict`` and an
    exported bundle use: read the sequences (absent ones zero-filled), crop to the head, resample by ``zoom``, and
    z-score each sequence over its non-zero voxels. There is no intensity window: z-scoring makes scanners'
    scales comparable and leaves the zero-filled channels of absent sequences at exactly zero.

    Args:
        modalities: the sequences to read; ``None``: those whose path is given (a new patient).
        convention: the label convention (checks and converts the label).
        zoom: resampling factor after cropping (``DataConfig.zoom``).
        labelled: also read and convert ``label`` (it may still be missing from an entry); False: images only.
    """
    keys = ["image", "label"] if labelled else ["image"]
    load_args: dict[str, Any] = {"keys": keys, "modalities": None if modalities is None else list(modalities)}
    if labelled:
        load_args["convention"] = convention
    steps = [TransformStep(LoadBraTSCased, load_args)]
    if labelled:
        steps.append(TransformStep(ConvertBraTSLabelsd, {"keys": "label", "convention": convention}))
    # Skull-stripped volumes are mostly background: cropping to the head first saves most of the compute.
    steps.append(
        TransformStep(
            CropForegroundd, {"keys": keys, "source_key": "image", "allow_missing_keys": True, "allow_smaller": True}
        )
    )
    if zoom < 1.0:
        mode = ["trilinear", "nearest"] if labelled else "trilinear"
        steps.append(
            TransformStep(
                Zoomd, {"keys": keys, "zoom": zoom, "mode": mode, "keep_size": False, "allow_missing_keys": True}
            )
        )
    # Normalising only non-zero voxels per channel keeps zero-filled (absent) channels at exactly zero.
    steps.append(TransformStep(NormalizeIntensityd, {"keys": "image", "nonzero": True, "channel_wise": True}))
    return steps


def inference_steps(zoom: float, divisor: int = SPATIAL_DIVISOR) -> list[TransformStep]:
    """Preprocessing of a new patient's sequences (any non-empty subset, given as paths): the steps of
    :func:`preprocessing_steps` and the padding of :func:`eval_transforms`, each invertible step recorded on the
    image so that a prediction can be mapped back onto the patient's grid (MONAI's ``Invertd``)."""
    steps = preprocessing_steps(None, "brats2018", zoom, labelled=False)
    steps.append(TransformStep(DivisiblePadd, {"keys": "image", "k": divisor}))
    return steps


def preprocess_transforms(modalities: Sequence[str], convention: str, zoom: float) -> list:
    """The built transforms of :func:`preprocessing_steps` (training, validation and anomaly maps share them)."""
    return [step.build() for step in preprocessing_steps(modalities, convention, zoom)]


#: Keys under which :class:`FgBgToIndicesd` stores a case's tumour / non-tumour voxel indices.
FG_INDICES_KEY = "label_fg_indices"
BG_INDICES_KEY = "label_bg_indices"


def voxel_spacing(affine: Any, zoom: float = 1.0) -> tuple[float, float, float]:
    """Voxel size in millimetres of a case after the pipeline's zoom, from its affine.

    Args:
        affine: the case's 4 x 4 affine as loaded (a batch of affines uses the first).
        zoom: the pipeline's resampling factor (``data.zoom``).
    """
    matrix = np.asarray(affine, dtype=np.float64)
    if matrix.ndim == 3:
        matrix = matrix[0]
    if matrix.shape != (4, 4):
        raise ValueError(f"affine must be 4 x 4, got shape {matrix.shape}")
    sizes = np.linalg.norm(matrix[:3, :3], axis=0) / zoom
    return (float(sizes[0]), float(sizes[1]), float(sizes[2]))


def _zero_absent_channels(data: dict[str, Any]) -> dict[str, Any]:
    d = dict(data)
    d["image"] = apply_modality_mask(d["image"], d[MASK_KEY])
    return d


def train_transforms(
    modalities: Sequence[str], convention: str, cfg: DataConfig, labelled: bool = True, teacher_view: bool = False
) -> Compose:
    """Training pipeline: load available sequences, crop, normalise, random crop/augment, modality dropout.

    Args:
        modalities: the site's sequences.
        convention: its label convention.
        cfg: data options.
        labelled: False for a site without labels: images only, uniform random crops (no tumour-centred ones).
        teacher_view: also give the sample as it was before sequence dropout (the same crop and augmentation, every
            sequence the site has) under :data:`AVAILABLE_IMAGE_KEY` and :data:`AVAILABLE_MASK_KEY`: the teacher's
            view of a distilling method, while ``image`` and ``modality_mask`` are the student's (dropout shapes the
            student's view only).
    """
    keys = ["image", "label"] if labelled else ["image"]
    steps = preprocess_transforms(modalities, convention, cfg.zoom)
    steps.append(SpatialPadd(keys, spatial_size=cfg.roi_size))
    if labelled and cfg.tumour_crop_fraction > 0:
        # Voxel indices of tumour and non-tumour are found once per case (deterministic: cached with the case).
        steps += [
            FgBgToIndicesd("label"),  # writes FG_INDICES_KEY and BG_INDICES_KEY
            RandCropByPosNegLabeld(
                keys,
                label_key="label",
                spatial_size=cfg.roi_size,
                pos=cfg.tumour_crop_fraction,
                neg=1.0 - cfg.tumour_crop_fraction,
                num_samples=1,
                fg_indices_key=FG_INDICES_KEY,
                bg_indices_key=BG_INDICES_KEY,
                allow_smaller=True,
            ),
            DeleteItemsd([FG_INDICES_KEY, BG_INDICES_KEY]),
        ]
    else:
        steps.append(RandSpatialCropd(keys, roi_size=cfg.roi_size, random_size=False))
    if cfg.spatial_augment > 0:
        steps.append(
            RandAffined(
                keys,
                prob=cfg.spatial_augment,
                rotate_range=(SPATIAL_AUGMENT_ROTATION,) * 3,
                scale_range=(SPATIAL_AUGMENT_SCALE,) * 3,
                mode=("bilinear", "nearest")[: len(keys)],
                padding_mode="zeros",
            )
        )
    if cfg.augment:
        steps += [
            RandFlipd(keys, prob=0.5, spatial_axis=0),
            RandFlipd(keys, prob=0.5, spatial_axis=1),
            RandFlipd(keys, prob=0.5, spatial_axis=2),
            RandScaleIntensityd("image", factors=0.1, prob=0.5),
            RandShiftIntensityd("image", offsets=0.1, prob=0.5),
            # The shift adds its offset to every channel: put absent sequences back to exactly zero.
            Lambda(_zero_absent_channels),
        ]
    typed = [*keys, MASK_KEY]
    if teacher_view:
        steps.append(CopyItemsd(["image", MASK_KEY], names=[AVAILABLE_IMAGE_KEY, AVAILABLE_MASK_KEY]))
        typed += [AVAILABLE_IMAGE_KEY, AVAILABLE_MASK_KEY]
    if cfg.modality_dropout > 0:
        steps.append(ModalityDropoutd("image", prob=cfg.modality_dropout))
    steps.append(EnsureTyped(typed, dtype=torch.float32, track_meta=False))
    return Compose(steps)


def eval_transforms(
    modalities: Sequence[str], convention: str, cfg: DataConfig, divisor: int = SPATIAL_DIVISOR
) -> Compose:
    """Validation / evaluation pipeline: whole (cropped, resampled) volumes, padded to a multiple of ``divisor``."""
    keys = ["image", "label"]
    steps = preprocess_transforms(modalities, convention, cfg.zoom)
    if cfg.max_eval_size:
        steps.append(CenterSpatialCropd(keys, roi_size=[cfg.max_eval_size] * 3, allow_missing_keys=True))
    steps += [
        DivisiblePadd(keys, k=divisor, allow_missing_keys=True),
        EnsureTyped(["image", "label", MASK_KEY], dtype=torch.float32, track_meta=False, allow_missing_keys=True),
    ]
    return Compose(steps)


def read_datalist(path: str, key: str) -> list[dict[str, Any]]:
    """Entries under ``key`` (``training``, ``validation`` or ``test``) of a Decathlon-style datalist.

    Raises:
        ValueError: the file is missing, not JSON, lacks ``key`` or the list is empty.
    """
    if not os.path.isfile(path):
        raise ValueError(f"datalist {path!r} does not exist; run `fedbrats prepare` or fix the site config")
    try:
        with open(path, encoding="utf-8") as f:
            content = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"datalist {path!r} is not valid JSON: {e}") from e
    except PermissionError as e:
        raise ValueError(f"datalist {path!r}: {permission_problem(e)}") from e
    entries = content.get(key)
    if entries is None:
        raise ValueError(f"datalist {path!r} has no {key!r} list (keys: {sorted(content)})")
    if not entries:
        raise ValueError(f"datalist {path!r}: the {key!r} list is empty; this site has no cases to use")
    base = os.path.dirname(os.path.abspath(path))
    out = []
    for entry in entries:
        e = dict(entry)
        # Relative paths in a datalist are relative to the datalist, as in MONAI's load_decathlon_datalist.
        e["image"] = [os.path.join(base, p) if p and not os.path.isabs(p) else p for p in e["image"]]
        if e.get("label") and not os.path.isabs(e["label"]):
            e["label"] = os.path.join(base, e["label"])
        if not e.get("case_id"):
            # A plain Decathlon list names no case: its first image file is the patient's stable identity, so that a
            # case seen in several epochs counts once towards a method's privacy floor (FedKD's prototypes).
            first = next((p for p in e["image"] if p), None)
            if first is None:
                raise ValueError(f"datalist {path!r}: an entry of {key!r} names no image: {entry!r}")
            e["case_id"] = os.path.normpath(first)
        out.append(e)
    return out


class _PreprocessedDataset(Dataset):
    """Cases already through the deterministic steps; each access works on a copy, as random steps may modify
    their input in place."""

    def _transform(self, index: int) -> Any:
        item = self.data[index]
        # The cached voxel indices are only read by the crop: sharing them saves copying a volume's worth of
        # integers per sample.
        copied = {k: v if k in (FG_INDICES_KEY, BG_INDICES_KEY) else copy.deepcopy(v) for k, v in item.items()}
        return apply_transform(self.transform, copied)


def _validation_error(exc: BaseException) -> CaseValidationError | None:
    # MONAI wraps a transform's exception in RuntimeError; the cause chain keeps ours.
    while exc is not None:
        if isinstance(exc, CaseValidationError):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def make_dataset(
    entries: list[dict[str, Any]],
    transform: Compose,
    cache_rate: float = 1.0,
    max_invalid_fraction: float = 0.5,
    what: str = "site",
) -> Dataset:
    """Dataset whose deterministic preprocessing is done once, here, skipping unreadable cases.

    Every case goes through the deterministic steps (reading, label conversion, cropping, normalisation) before
    training starts. A case that fails (corrupt or truncated file, missing sequence, mismatched shapes, bad
    labels) is skipped with a warning naming the file, unless more than ``max_invalid_fraction`` of the cases
    fail: then a ValueError lists them all, rather than training on almost nothing.

    Args:
        entries: datalist entries.
        transform: the whole pipeline; its steps up to the first random one are applied here.
        cache_rate: 1 keeps the preprocessed cases in memory; 0 keeps only the validated entries and redoes the
            preprocessing every epoch (for data that does not fit in memory).
        max_invalid_fraction: the share of unreadable cases tolerated.
        what: names the data in messages (e.g. ``"site-2 training"``).

    Raises:
        ValueError: no entries, or too many invalid cases.
    """
    if not entries:
        raise ValueError(f"{what}: no cases to load")
    steps = list(transform.transforms)
    first_random = next((i for i, t in enumerate(steps) if isinstance(t, Randomizable)), len(steps))
    deterministic, random_part = Compose(steps[:first_random]), Compose(steps[first_random:])
    kept: list[Any] = []
    problems: list[str] = []
    for entry in entries:
        try:
            item = deterministic(entry)
        except Exception as e:
            err = _validation_error(e)
            if err is None:
                raise
            problems.append(str(err))
            logger.warning("%s: skipping case %s: %s", what, entry.get("case_id", "?"), err)
            continue
        kept.append(item if cache_rate > 0 else entry)
    if problems and len(problems) > max_invalid_fraction * len(entries):
        listing = "\n  ".join(problems)
        raise ValueError(
            f"{what}: {len(problems)} of {len(entries)} cases are unreadable, more than the tolerated "
            f"{max_invalid_fraction:.0%}; refusing to train on almost nothing. Fix or remove them:\n  {listing}"
        )
    if cache_rate > 0:
        return _PreprocessedDataset(kept, transform=random_part)
    return Dataset(kept, transform=transform)


def without_labels(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Datalist entries with their ``label`` path removed: what an unlabelled site loads (it never opens one)."""
    return [{k: v for k, v in entry.items() if k != "label"} for entry in entries]


def make_loaders(
    datalist: str,
    modalities: Sequence[str],
    convention: str,
    cfg: DataConfig,
    divisor: int = SPATIAL_DIVISOR,
    labelled: bool = True,
    teacher_view: bool = False,
) -> tuple[DataLoader, DataLoader]:
    """Training and validation loaders of one site.

    Args:
        datalist: the site's Decathlon-style datalist (``training`` and ``validation`` lists).
        modalities: the sequences the site has; others are zero-filled and never read.
        convention: the site's BraTS label convention.
        cfg: data options.
        divisor: validation volumes are padded to a multiple of this (the network's down-sampling).
        labelled: False for a site without labels: the label paths of its datalist are dropped before anything is
            read, so its batches hold images and sequence masks only.
        teacher_view: training batches also hold the view before sequence dropout (see :func:`train_transforms`).
    """
    unknown = sorted(set(modalities) - set(MODALITIES))
    if unknown:
        raise ValueError(f"modalities {unknown} are not among {list(MODALITIES)}")
    train_entries = read_datalist(datalist, "training")
    val_entries = read_datalist(datalist, "validation")
    if not labelled:
        train_entries, val_entries = without_labels(train_entries), without_labels(val_entries)
    train_ds = make_dataset(
        train_entries,
        train_transforms(modalities, convention, cfg, labelled, teacher_view),
        cfg.cache_rate,
        cfg.max_invalid_fraction,
        f"{datalist} training",
    )
    val_ds = make_dataset(
        val_entries,
        eval_transforms(modalities, convention, cfg, divisor),
        cfg.cache_rate,
        cfg.max_invalid_fraction,
        f"{datalist} validation",
    )
    train_loader = DataLoader(train_ds, batch_size=cfg.batch_size, shuffle=True, num_workers=cfg.num_workers)
    val_loader = DataLoader(val_ds, batch_size=1, shuffle=False, num_workers=cfg.num_workers)
    logger.info(
        "data: %d training / %d validation cases%s, sequences %s, roi %s, zoom %.2f",
        len(train_ds),
        len(val_ds),
        "" if labelled else " (unlabelled: no label file is read)",
        ",".join(modalities),
        cfg.roi_size,
        cfg.zoom,
    )
    return train_loader, val_loader
