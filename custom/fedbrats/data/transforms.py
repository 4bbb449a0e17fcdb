"""BraTS-specific transforms, as MONAI-style array / dictionary (``...d``) pairs.

The order of the pipeline matters for missing sequences: an absent sequence is never read, its channel is
zero-filled at load time, and a ``modality_mask`` (1 = present) travels with the sample through every later
transform, so models, losses and the server know what each case really had.

:class:`TransformStep` describes a pipeline step as data (class and arguments), so that one definition builds the
Python pipelines and is written into an exported MONAI bundle's config (see :mod:`fedbrats.data.loader`).
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Randomizable, Transform

from fedbrats.constants import MODALITIES, modality_mask
from fedbrats.data.conventions import BraTSConvention, get_convention
from fedbrats.data.validation import CaseValidationError, check_label_values, load_nifti_checked

logger = logging.getLogger(__name__)

MASK_KEY = "modality_mask"
#: The teacher's view of a training sample: every sequence the site has, before sequence dropout (see
#: :func:`fedbrats.data.loader.train_transforms` with ``teacher_view``); ``image``/``modality_mask`` are the student's.
AVAILABLE_IMAGE_KEY = "available_image"
AVAILABLE_MASK_KEY = "available_modality_mask"

#: Public MONAI modules a bundle config names MONAI's classes by (``monai.transforms.CropForegroundd``): a bare
#: name would be looked up across all of MONAI, where some names exist twice.
_MONAI_PUBLIC_MODULES = ("monai.transforms", "monai.inferers", "monai.handlers", "monai.engines", "monai.data")


@dataclass(frozen=True)
class Ref:
    """Another item of a pipeline's context: ``@name`` in a bundle config, ``refs[name]`` when built in Python.

    Args:
        name: the item's id (e.g. ``"preprocessing"`` for the pipeline an ``Invertd`` undoes).
    """

    name: str


def config_target(cls: type) -> str:
    """The ``_target_`` that names ``cls`` in a MONAI bundle config: MONAI's public path
    (``monai.transforms.Zoomd``), else the class's own module path."""
    import importlib

    if cls.__module__.startswith("monai."):
        for module in _MONAI_PUBLIC_MODULES:
            if getattr(importlib.import_module(module), cls.__name__, None) is cls:
                return f"{module}.{cls.__name__}"
    return f"{cls.__module__}.{cls.__qualname__}"


def _config_value(value: Any) -> Any:
    if isinstance(value, Ref):
        return f"@{value.name}"
    if isinstance(value, (list, tuple)):
        return [_config_value(v) for v in value]
    return value


@dataclass(frozen=True)
class TransformStep:
    """One step of a pipeline as data: its class and keyword arguments (JSON values or :class:`Ref`).

    The same steps build the Python pipeline (:meth:`build`) and are written into an exported MONAI bundle's
    config (:meth:`to_config`), so training, ``predict`` and the bundle cannot drift apart.

    Args:
        cls: the transform (or inferer) class.
        args: its keyword arguments.
    """

    cls: type
    args: Mapping[str, Any] = field(default_factory=dict)

    def build(self, refs: Mapping[str, Any] | None = None) -> Any:
        """The step's object, each :class:`Ref` replaced by ``refs[name]``.

        Raises:
            ValueError: a :class:`Ref` that ``refs`` does not hold.
        """
        refs = refs or {}

        def resolve(value: Any) -> Any:
            if isinstance(value, Ref):
                if value.name not in refs:
                    raise ValueError(f"{self.cls.__name__}: no value given for the reference @{value.name}")
                return refs[value.name]
            return value

        return self.cls(**{k: resolve(v) for k, v in self.args.items()})

    def to_config(self) -> dict[str, Any]:
        """``{"_target_": ..., **args}`` for a MONAI bundle config (a :class:`Ref` becomes ``"@name"``)."""
        return {"_target_": config_target(self.cls), **{k: _config_value(v) for k, v in self.args.items()}}


class LoadBraTSCase(Transform):
    """Read the available sequences of one case into a zero-filled 4-channel volume.

    The volume is a MONAI ``MetaTensor`` carrying the case's affine and its first sequence's file name, so that
    MONAI's invertible transforms can map a prediction back onto the patient's grid and ``SaveImage`` can write it.

    Args:
        modalities: sequences this site has; the others are never opened, even when a path is given. ``None``:
            the sequences whose path is given (a new patient at inference).
        convention: label convention used to check the label values (name or object).
        affine_tolerance: largest absolute difference allowed between the sequences' affines.
    """

    def __init__(
        self,
        modalities: Sequence[str] | None = MODALITIES,
        convention: str | BraTSConvention = "brats2018",
        affine_tolerance: float = 1e-3,
    ) -> None:
        self.mask = None if modalities is None else modality_mask(list(modalities))
        self.convention = get_convention(convention) if isinstance(convention, str) else convention
        self.affine_tolerance = affine_tolerance

    def __call__(
        self, image_paths: Sequence[str | None], label_path: str | None = None, case_id: str = "?"
    ) -> dict[str, Any]:
        """Load one case.

        Args:
            image_paths: one path (or None) per canonical sequence, in :data:`MODALITIES` order.
            label_path: segmentation file, or None (inference).
            case_id: used in error messages.

        Returns:
            dict with ``image`` (float32 ``MetaTensor``, 4 x H x W x D), ``modality_mask`` (float32, 4),
            ``affine`` (float64 4 x 4 numpy) and, when ``label_path`` is given, ``label`` (uint8 tensor,
            1 x H x W x D).

        Raises:
            CaseValidationError: a present sequence is missing or unreadable, shapes or affines differ, or the
                label holds values outside the convention.
            ValueError: ``image_paths`` does not have one entry per sequence, or (``modalities`` None) names none.
        """
        if len(image_paths) != len(MODALITIES):
            raise ValueError(
                f"case {case_id}: 'image' must list {len(MODALITIES)} paths in the order {list(MODALITIES)} "
                f"(null for a sequence the site lacks), got {len(image_paths)}"
            )
        mask = self.mask if self.mask is not None else [bool(p) for p in image_paths]
        if not any(mask):
            raise ValueError(f"case {case_id}: no sequence given; any non-empty subset of {list(MODALITIES)} works")
        volumes: list[np.ndarray | None] = []
        ref_shape: tuple[int, ...] | None = None
        ref_affine: np.ndarray | None = None
        ref_path = ""
        for name, present, path in zip(MODALITIES, mask, image_paths):
            if not present:
                volumes.append(None)
                continue
            if not path:
                raise CaseValidationError(
                    case_id,
                    f"<{name}>",
                    f"the site's modalities include {name} but the datalist has no file for it; "
                    "fix the datalist or remove the sequence from the site's 'modalities'",
                )
            data, affine = load_nifti_checked(path, case_id)
            if ref_shape is None:
                ref_shape, ref_affine, ref_path = data.shape, affine, path
            elif data.shape != ref_shape:
                raise CaseValidationError(
                    case_id,
                    path,
                    f"shape {data.shape} differs from {ref_shape} of {ref_path}; sequences must be co-registered",
                )
            elif not np.allclose(affine, ref_affine, atol=self.affine_tolerance):
                raise CaseValidationError(
                    case_id, path, f"affine differs from that of {ref_path}; sequences must be co-registered"
                )
            volumes.append(data.astype(np.float32, copy=False))
        assert ref_shape is not None and ref_affine is not None  # the mask has at least one sequence
        image = np.zeros((len(MODALITIES), *ref_shape), dtype=np.float32)
        for channel, volume in enumerate(volumes):
            if volume is not None:
                image[channel] = volume
        out: dict[str, Any] = {
            "image": MetaTensor(
                torch.from_numpy(image),
                affine=torch.as_tensor(ref_affine, dtype=torch.float64),
                meta={"filename_or_obj": ref_path},
            ),
            MASK_KEY: torch.tensor(mask, dtype=torch.float32),
            "affine": ref_affine,
        }
        if label_path:
            label, label_affine = load_nifti_checked(label_path, case_id)
            if label.shape != ref_shape:
                raise CaseValidationError(
                    case_id, label_path, f"label shape {label.shape} differs from image {ref_shape}"
                )
            label = np.rint(label).astype(np.int16)
            check_label_values(np.unique(label), self.convention, case_id, label_path)
            out["label"] = torch.from_numpy(label.astype(np.uint8))[None]
        return out


class LoadBraTSCased(MapTransform):
    """Dictionary version of :class:`LoadBraTSCase`: reads ``image`` (4 paths) and ``label`` of a datalist entry.

    Args:
        keys: the image key and, optionally, the label key (default ``("image", "label")``).
        modalities: sequences this site has; ``None``: the sequences whose path is given.
        convention: label convention.
        allow_missing_keys: tolerate an entry without label (inference).
    """

    def __init__(
        self,
        keys: KeysCollection = ("image", "label"),
        modalities: Sequence[str] | None = MODALITIES,
        convention: str | BraTSConvention = "brats2018",
        allow_missing_keys: bool = True,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.loader = LoadBraTSCase(modalities, convention)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        image_key = self.keys[0]
        label_key = self.keys[1] if len(self.keys) > 1 else None
        loaded = self.loader(d[image_key], d.get(label_key) if label_key else None, str(d.get("case_id", "?")))
        d[image_key] = loaded["image"]
        d[MASK_KEY] = loaded[MASK_KEY]
        d["affine"] = loaded["affine"]
        d["spatial_shape"] = np.asarray(loaded["image"].shape[1:])
        if label_key and "label" in loaded:
            d[label_key] = loaded["label"]
        return d


def convert_brats_labels(label: torch.Tensor | np.ndarray, et_label: int) -> torch.Tensor:
    """Turn a BraTS label map (1 x H x W x D or H x W x D) into WT/TC/ET binary channels (float32).

    WT = {1, 2, ET}, TC = {1, ET}, ET = {ET}; ``et_label`` is 4 in BraTS 2018-2021 and 3 in 2023+.
    """
    lab = torch.as_tensor(label)
    if lab.ndim == 4:
        if lab.shape[0] != 1:
            raise ValueError(f"label must have one channel, got shape {tuple(lab.shape)}")
        lab = lab[0]
    wt = (lab == 1) | (lab == 2) | (lab == et_label)
    tc = (lab == 1) | (lab == et_label)
    et = lab == et_label
    return torch.stack([wt, tc, et]).float()


class ConvertBraTSLabels(Transform):
    """Array version: BraTS label map to WT/TC/ET channels, see :func:`convert_brats_labels`."""

    def __init__(self, convention: str | BraTSConvention = "brats2018") -> None:
        conv = get_convention(convention) if isinstance(convention, str) else convention
        self.et_label = conv.et_label

    def __call__(self, label: torch.Tensor | np.ndarray) -> torch.Tensor:
        return convert_brats_labels(label, self.et_label)


class ConvertBraTSLabelsd(MapTransform):
    """Dictionary version of :class:`ConvertBraTSLabels`."""

    def __init__(
        self,
        keys: KeysCollection = "label",
        convention: str | BraTSConvention = "brats2018",
        allow_missing_keys: bool = True,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.converter = ConvertBraTSLabels(convention)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.converter(d[key])
        return d


def teacher_view(batch: Mapping[Hashable, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """A training batch's teacher view ``(image, modality_mask)``: every sequence the site has, before sequence
    dropout; the student's view when the loader gave none (no ``teacher_view`` requested)."""
    if AVAILABLE_IMAGE_KEY in batch:
        return batch[AVAILABLE_IMAGE_KEY], batch[AVAILABLE_MASK_KEY]
    return batch["image"], batch[MASK_KEY]


def hidden_cases(student_mask: torch.Tensor, available_mask: torch.Tensor) -> torch.Tensor:
    """Per case (B,), whether the student's view hides at least one sequence of the teacher's view.

    Raises:
        ValueError: the masks' shapes differ.
    """
    if tuple(student_mask.shape) != tuple(available_mask.shape):
        raise ValueError(
            f"student_mask {tuple(student_mask.shape)} and available_mask {tuple(available_mask.shape)} differ in shape"
        )
    return ((available_mask > 0) & ~(student_mask > 0)).any(dim=-1)


def apply_modality_mask(image: torch.Tensor, mask: torch.Tensor | Sequence[float]) -> torch.Tensor:
    """Zero the channels of absent sequences.

    Args:
        image: one volume (C x H x W x D) or a batch (B x C x H x W x D); the rank decides, never the sizes.
        mask: C availability flags (for every case) or B x C (one row per case).
    """
    m = torch.as_tensor(mask, dtype=image.dtype, device=image.device)
    if image.ndim not in (4, 5):
        raise ValueError(f"image must be C x H x W x D or B x C x H x W x D, got shape {tuple(image.shape)}")
    batched = image.ndim == 5
    if m.ndim == 1 and batched:
        m = m[None]
    if m.ndim == 2 and not batched:
        raise ValueError(
            f"a B x C mask needs a batched image, got image {tuple(image.shape)} and mask {tuple(m.shape)}"
        )
    return image * m.reshape(*m.shape, 1, 1, 1)


class ModalityDropout(Randomizable, Transform):
    """Randomly hide present sequences, keeping at least one, to train for inputs with fewer sequences.

    Args:
        prob: probability that a sample has any sequence dropped at all.
        drop_rate: given a drop happens, the probability of hiding each present sequence.
    """

    def __init__(self, prob: float = 0.5, drop_rate: float = 0.5) -> None:
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"prob must be in [0, 1], got {prob}")
        if not 0.0 <= drop_rate <= 1.0:
            raise ValueError(f"drop_rate must be in [0, 1], got {drop_rate}")
        self.prob = prob
        self.drop_rate = drop_rate
        self._keep: np.ndarray | None = None

    def randomize(self, mask: np.ndarray) -> None:
        present = np.flatnonzero(mask > 0)
        keep = mask > 0
        if present.size > 1 and self.R.rand() < self.prob:
            drop = self.R.rand(present.size) < self.drop_rate
            if drop.all():  # at least one sequence must stay
                drop[self.R.randint(present.size)] = False
            keep = keep.copy()
            keep[present[drop]] = False
        self._keep = keep

    def __call__(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.randomize(np.asarray(torch.as_tensor(mask).cpu()))
        new_mask = torch.as_tensor(self._keep, dtype=torch.float32)
        return apply_modality_mask(image, new_mask), new_mask


class ModalityDropoutd(Randomizable, MapTransform):
    """Dictionary version of :class:`ModalityDropout`; updates ``image`` and ``modality_mask`` together."""

    def __init__(self, keys: KeysCollection = "image", prob: float = 0.5, drop_rate: float = 0.5) -> None:
        super().__init__(keys)
        self.dropper = ModalityDropout(prob, drop_rate)

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None) -> ModalityDropoutd:
        super().set_random_state(seed, state)
        self.dropper.set_random_state(seed, state)
        return self

    def randomize(self, data: Any = None) -> None:  # the array transform draws its own numbers
        pass

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key], d[MASK_KEY] = self.dropper(d[key], d[MASK_KEY])
        return d
