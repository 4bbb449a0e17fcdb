"""MMCCD: unsupervised anomaly segmentation by modality cycles with masked conditional diffusion, federated.

After Liang, Anthony, Wagner, Kamnitsas, "Modality Cycles with Masked Conditional Diffusion for Unsupervised Anomaly
Segmentation in MRI" (MMMI workshop, MICCAI 2023; arXiv 2308.16150; public code ZiyunLiang/MMCCD, MIT). Our own
code; what follows the public code and what is our interpretation or CPU scaling is marked in docs/mmccd.md.

* **Training data**: 2-D axial slices without tumour. At a site they come from its labelled cases: every slice of
  a case whose whole-tumour label is empty and whose brain area is at least ``brain_fraction`` of the case's
  largest (the paper uses the tumour-free slices 70-89 of BraTS 2021; a fraction of the largest brain area picks
  the same central band on volumes cropped to the head and resampled). Intensities: the brain's
  ``[window[0], window[1]]`` quantiles of the case's volume map to [-3, 3]; background is -3.
* **Forward translation f** (source -> target, default FLAIR -> T2): a conditional diffusion model (MONAI's
  ``DiffusionModelUNet``, DDPM with a linear schedule) that predicts x0 from the noisy target and the source with
  one ``band``-pixel band (horizontal or vertical, at a random even offset) replaced by Gaussian noise.
  **Backward g** (target -> source): a plain UNet regressor trained on real target slices.
* **Anomaly map**: for a set of band masks covering the slice, sample ``x̂2 = f(masked x1)`` with DDIM, map it back
  ``x̄1 = g(x̂2)``; the squared cycle error ``(x1 - x̄1)²`` counted inside each band, averaged over the masks
  covering a pixel, times the brain mask eroded by a disk of radius 4 (the public code's). Tissue f never saw
  (tumour) is translated wrongly, so its error is high.
* **Baselines** (the ``variant`` of the network): ``cyclic_unet``, f a UNet regressor without masks or diffusion,
  the anomaly map the plain cycle error; ``autoencoder``, a reconstruction autoencoder of the source, the map its
  reconstruction error.
* **Federated**: every site trains f and g on its own healthy slices; the server averages both (FedAvg weighted
  by steps). A site without the source or the target sequence cannot train the pair: it says so and trains no
  step, so its update weighs nothing. The sites score the global model by the anomaly AUROC on their validation
  cases (the slice with the largest tumour of each), which selects the best global model.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.nets import AutoEncoder, BasicUNet, DiffusionModelUNet
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler
from scipy import ndimage

from fedbrats.constants import MODALITIES
from fedbrats.federated.methods.base import ClientMethod, Job, Method
from fedbrats.federated.protocol import METRIC_PREFIX
from fedbrats.precision import autocast, resolve_precision
from fedbrats.scoring.detection import auprc, auroc

logger = logging.getLogger(__name__)

#: The network's variants: MMCCD and its two baselines.
VARIANTS = ("mmccd", "cyclic_unet", "autoencoder")
#: Intensity of background pixels after the window (the window's lower end maps to -3).
BACKGROUND = -3.0
#: Validation score that selects the best global model.
KEY_METRIC = f"{METRIC_PREFIX}auroc"
#: Radius of the disk that erodes the brain mask of every slice in the anomaly map: the public code's ``disk(4)``.
EROSION_DISK_RADIUS = 4
#: Largest radius accepted: a disk this wide leaves nothing of a 2 mm head slice (the networks' slices are 128²).
MAX_EROSION_DISK_RADIUS = 32


def check_erosion_disk_radius(radius: Any, name: str = "erosion_disk_radius") -> int:
    """``radius`` as an int after refusing what is not a whole number in ``[0, MAX_EROSION_DISK_RADIUS]``.

    Raises:
        ValueError: naming ``name`` (the option as its caller spells it).
    """
    if isinstance(radius, bool) or not isinstance(radius, (int, np.integer)):
        raise ValueError(f"{name} must be a whole number of pixels, got {radius!r}")
    if not 0 <= radius <= MAX_EROSION_DISK_RADIUS:
        raise ValueError(f"{name} must be 0 to {MAX_EROSION_DISK_RADIUS} pixels, got {radius}")
    return int(radius)


def disk(radius: int) -> np.ndarray:
    """The ``(2r+1) x (2r+1)`` boolean footprint of the points with ``x² + y² <= r²`` (as scikit-image's
    ``morphology.disk``, which the public code erodes the brain mask with; r=4 holds 49 points).

    Raises:
        ValueError: a radius that is not a whole number in ``[0, MAX_EROSION_DISK_RADIUS]``.
    """
    r = check_erosion_disk_radius(radius)
    offsets = np.arange(-r, r + 1)
    return offsets[:, None] ** 2 + offsets[None, :] ** 2 <= r * r


def erode_brain(brain: np.ndarray, radius: int = EROSION_DISK_RADIUS) -> np.ndarray:
    """Each 2-D plane (the last two axes) of the boolean ``brain`` eroded by :func:`disk` of ``radius``; 0 leaves
    it as it is. Outside the plane counts as background (scipy's default), as before."""
    footprint = disk(radius)
    brain = np.asarray(brain, dtype=bool)
    if radius == 0:
        return brain
    planes = brain.reshape(-1, *brain.shape[-2:])
    return np.stack([ndimage.binary_erosion(b, structure=footprint) for b in planes]).reshape(brain.shape)


# ---- the network ---------------------------------------------------------------------------------------------
class ModalityCycleNet(torch.nn.Module):
    """The two translators of a modality cycle (or the autoencoder baseline) for 2-D axial slices.

    Args:
        variant: ``mmccd`` (f a conditional diffusion model), ``cyclic_unet`` (f a UNet regressor) or
            ``autoencoder`` (one autoencoder of the source, no g).
        source: the sequence the anomaly map is computed from (x1).
        target: the sequence it is translated into (x2).
        init_filters: channels of the first level (the deeper levels double it).
        image_size: side of the square slices the networks see (slices are centre-padded or cropped to it).
        band: width in pixels of the masked band.
        num_train_timesteps: diffusion steps of the DDPM schedule (linear betas).
        window: lower and upper quantiles of the brain's intensities mapped to -3 and 3.
        attention: self-attention at the diffusion model's coarsest level.

    Raises:
        ValueError: an unknown variant or sequence, the same sequence twice, or sizes that do not fit.
    """

    #: Validation volumes are padded to a multiple of this (by the site's data loader).
    spatial_divisor = 8

    def __init__(
        self,
        variant: str = "mmccd",
        source: str = "flair",
        target: str = "t2",
        init_filters: int = 16,
        image_size: int = 128,
        band: int = 16,
        num_train_timesteps: int = 1000,
        window: Sequence[float] = (0.02, 0.9),
        attention: bool = True,
    ) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        for arg, value in (("source", source), ("target", target)):
            if value not in MODALITIES:
                raise ValueError(f"{arg} must be one of {MODALITIES}, got {value!r}")
        if source == target:
            raise ValueError(f"source and target must differ, got {source!r} twice")
        if init_filters < 8 or init_filters % 8:
            raise ValueError(f"init_filters must be a multiple of 8, got {init_filters}")
        if image_size < 32 or image_size % 16:
            raise ValueError(f"image_size must be a multiple of 16 (>= 32), got {image_size}")
        if not 1 <= band <= image_size:
            raise ValueError(f"band must be in [1, image_size={image_size}], got {band}")
        if num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be >= 2, got {num_train_timesteps}")
        window = [float(w) for w in window]
        if len(window) != 2 or not 0.0 <= window[0] < window[1] <= 1.0:
            raise ValueError(f"window must be two quantiles 0 <= lower < upper <= 1, got {window}")
        self.variant, self.source, self.target = variant, source, target
        self.init_filters, self.image_size, self.band = init_filters, image_size, band
        self.num_train_timesteps, self.window, self.attention = num_train_timesteps, window, attention
        f = init_filters
        if variant == "mmccd":
            # Input: the noisy target and the masked source; output: the predicted clean target (x0).
            self.translator: torch.nn.Module = DiffusionModelUNet(
                spatial_dims=2,
                in_channels=2,
                out_channels=1,
                channels=(f, 2 * f, 2 * f),
                attention_levels=(False, False, attention),
                num_res_blocks=1,
                norm_num_groups=8,
                num_head_channels=f,
            )
        elif variant == "cyclic_unet":
            self.translator = _unet(f)
        else:
            # No normalisation layers, for the same reason as _unet (with instance norm: MSE 4.2 vs 1.1 after 40 steps).
            self.translator = AutoEncoder(
                spatial_dims=2, in_channels=1, out_channels=1, channels=(f, 2 * f, 4 * f), strides=(2, 2, 2), norm=None
            )
        self.back: torch.nn.Module | None = _unet(f) if variant != "autoencoder" else None

    @property
    def source_index(self) -> int:
        return MODALITIES.index(self.source)

    @property
    def target_index(self) -> int:
        return MODALITIES.index(self.target)

    def noise_scheduler(self) -> DDPMScheduler:
        """The training schedule (predicting x0, linear betas, no clipping: intensities span about [-3, 3])."""
        return DDPMScheduler(
            num_train_timesteps=self.num_train_timesteps,
            schedule="linear_beta",
            prediction_type="sample",
            clip_sample=False,
        )

    def forward(self, source: torch.Tensor) -> torch.Tensor:
        """The cycle of a baseline (``g(f(x1))``, or the autoencoder's reconstruction); MMCCD samples instead
        (:func:`anomaly_scores`)."""
        if self.variant == "mmccd":
            raise RuntimeError("the MMCCD translator is a diffusion model: use anomaly_scores() to run the cycle")
        out = self.translator(source)
        return self.back(out) if self.back is not None else out


def _unet(f: int) -> BasicUNet:
    # MONAI's UNet barely learned on these slices, mostly constant background (MSE 8.2 after 40 steps where
    # BasicUNet reached 2.5; docs/mmccd.md). Four poolings: image_size is a multiple of 16, at least 32.
    return BasicUNet(spatial_dims=2, in_channels=1, out_channels=1, features=(f // 2, f, 2 * f, 4 * f, 4 * f, f // 2))


# ---- slices ---------------------------------------------------------------------------------------------------
@dataclass
class CaseSlices:
    """The axial slices of one case, windowed and fitted to the network's size.

    Attributes:
        source: ``(Z, 1, S, S)`` source slices.
        target: ``(Z, 1, S, S)`` target slices, or None where the case lacks the target.
        brain: ``(Z, 1, S, S)`` brain mask (non-zero source).
        tumour: ``(Z, 1, S, S)`` whole-tumour label, or None without a label.
        central: ``(Z,)`` slices whose brain area is at least ``brain_fraction`` of the largest.
    """

    source: torch.Tensor
    target: torch.Tensor | None
    brain: torch.Tensor
    tumour: torch.Tensor | None
    central: torch.Tensor

    def healthy(self) -> torch.Tensor:
        """Indices of central slices without tumour (all central slices without a label)."""
        ok = self.central.clone()
        if self.tumour is not None:
            ok &= self.tumour.flatten(1).sum(1) == 0
        return torch.nonzero(ok).flatten()

    def largest_tumour(self) -> int | None:
        """Index of the central slice with the largest tumour area (None: no central slice has tumour)."""
        if self.tumour is None:
            return None
        area = self.tumour.flatten(1).sum(1) * self.central
        return int(area.argmax()) if float(area.max()) > 0 else None


def window_intensities(volume: torch.Tensor, brain: torch.Tensor, window: Sequence[float]) -> torch.Tensor:
    """Map the brain's ``window`` quantiles of ``volume`` to [-3, 3] (linearly, not clipped); background -3.

    Args:
        volume: a volume (any shape).
        brain: its brain mask (same shape).
        window: the lower and upper quantiles.
    """
    values = volume[brain].float()
    if values.numel() == 0:
        return torch.full_like(volume, BACKGROUND)
    lo, hi = torch.quantile(values[:: max(1, values.numel() // 2_000_000)], torch.tensor(window, dtype=torch.float32))
    scale = float(hi - lo) if float(hi - lo) > 0 else 1.0
    out = (volume - (lo + hi) / 2) / scale * 6.0
    return torch.where(brain, out, torch.full_like(out, BACKGROUND))


def plane_offsets(shape: Sequence[int], size: int) -> tuple[int, int, int, int]:
    """``(pad_x, crop_x, pad_y, crop_y)`` that centre an in-plane ``shape`` in a ``size`` x ``size`` slice (before
    padding, at most one of each pair is non-zero)."""
    out: list[int] = []
    for n in shape:
        out += [max(size - int(n), 0) // 2, max(int(n) - size, 0) // 2]
    return out[0], out[1], out[2], out[3]


def fit_in_plane(x: torch.Tensor, size: int, value: float = 0.0) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """Centre-pad (with ``value``) or centre-crop the last two axes of ``x`` to ``size``; also return
    :func:`plane_offsets` for :func:`unfit_in_plane`."""
    offsets = plane_offsets(x.shape[-2:], size)
    for axis, (pad_before, crop) in zip((-2, -1), (offsets[:2], offsets[2:])):
        pad = max(size - x.shape[axis], 0)
        if pad:
            widths = [0, 0, 0, 0]
            widths[0 if axis == -1 else 2] = pad_before
            widths[1 if axis == -1 else 3] = pad - pad_before
            x = F.pad(x, widths, value=value)
        x = x.narrow(axis, crop, size)
    return x, offsets


def unfit_in_plane(x: torch.Tensor, shape: tuple[int, int], offsets: tuple[int, int, int, int]) -> torch.Tensor:
    """Undo :func:`fit_in_plane`: back to the in-plane ``shape`` (cropped-away pixels get 0)."""
    out = x.new_zeros((*x.shape[:-2], *shape))
    pad_x, crop_x, pad_y, crop_y = offsets
    size_x, size_y = x.shape[-2], x.shape[-1]
    n_x = min(shape[0] - crop_x, size_x - pad_x)
    n_y = min(shape[1] - crop_y, size_y - pad_y)
    out[..., crop_x : crop_x + n_x, crop_y : crop_y + n_y] = x[..., pad_x : pad_x + n_x, pad_y : pad_y + n_y]
    return out


def case_slices(
    image: torch.Tensor, label: torch.Tensor | None, net: ModalityCycleNet, brain_fraction: float
) -> CaseSlices:
    """The axial (last-axis) slices of one case.

    Args:
        image: ``(4, X, Y, Z)`` sequences in :data:`fedbrats.constants.MODALITIES` order (absent ones zero).
        label: ``(3, X, Y, Z)`` WT/TC/ET regions, or None.
        net: gives the sequences, the window and the slice size.
        brain_fraction: a central slice has at least this share of the largest slice's brain area.
    """
    src = image[net.source_index]
    brain = src != 0
    has_target = bool((image[net.target_index] != 0).any())
    source = window_intensities(src, brain, net.window)
    target = window_intensities(image[net.target_index], brain, net.window) if has_target else None

    def slices(volume: torch.Tensor, value: float) -> torch.Tensor:
        return fit_in_plane(volume.permute(2, 0, 1).unsqueeze(1), net.image_size, value)[0]

    area = brain.flatten(0, 1).sum(0).float()
    central = area >= brain_fraction * float(area.max()) if float(area.max()) > 0 else torch.zeros_like(area) > 0
    return CaseSlices(
        source=slices(source, BACKGROUND),
        target=slices(target, BACKGROUND) if target is not None else None,
        brain=slices(brain.float(), 0.0) > 0.5,
        tumour=slices((label[0] > 0.5).float(), 0.0) > 0.5 if label is not None else None,
        central=central,
    )


# ---- masks and sampling ---------------------------------------------------------------------------------------
def random_band_masks(n: int, size: int, band: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``(n, 1, size, size)`` masks, each one band of ``band`` pixels (1 inside), horizontal or vertical at random,
    at a random even offset in ``[0, size - band]``."""
    masks = torch.zeros(n, 1, size, size)
    offsets = torch.randint(0, (size - band) // 2 + 1, (n,), generator=generator) * 2
    vertical = torch.randint(0, 2, (n,), generator=generator).bool()
    for i in range(n):
        o = int(offsets[i])
        if vertical[i]:
            masks[i, :, :, o : o + band] = 1
        else:
            masks[i, :, o : o + band, :] = 1
    return masks


def band_masks(num_masks: int, size: int, band: int, cover: bool = True) -> torch.Tensor:
    """The inference masks: ``num_masks / 2`` horizontal and as many vertical bands, their offsets spread evenly
    over ``[0, size - band]``; with ``cover``, enough of them that every pixel lies in at least one band of each
    orientation.

    Raises:
        ValueError: an odd ``num_masks``, or (with ``cover``) too few to cover the slice (``2 * ceil(size / band)``).
    """
    per_axis = num_masks // 2
    need = -(-size // band) if cover else 1
    if num_masks % 2 or per_axis < need:
        raise ValueError(
            f"num_masks must be even and >= {2 * need} (bands of {band} px covering {size} px), got {num_masks}"
        )
    offsets = np.rint(np.linspace(0, size - band, per_axis)).astype(int)
    masks = torch.zeros(2 * per_axis, 1, size, size)
    for i, o in enumerate(offsets):
        masks[i, :, o : o + band, :] = 1
        masks[per_axis + i, :, :, o : o + band] = 1
    return masks


def mask_source(source: torch.Tensor, masks: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """The source with the masked band replaced by standard Gaussian noise."""
    noise = torch.randn(source.shape, generator=generator, dtype=source.dtype).to(source.device)
    return source * (1 - masks) + noise * masks


@torch.no_grad()
def sample_translation(
    net: ModalityCycleNet, condition: torch.Tensor, steps: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """DDIM sampling (deterministic, eta 0) of the target from the masked source, in ``steps`` steps."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    scheduler = DDIMScheduler(
        num_train_timesteps=net.num_train_timesteps,
        schedule="linear_beta",
        prediction_type="sample",
        clip_sample=False,
    )
    scheduler.set_timesteps(min(steps, net.num_train_timesteps))
    x = torch.randn(condition.shape, generator=generator, dtype=condition.dtype).to(condition.device)
    for t in scheduler.timesteps:
        timesteps = torch.full((x.shape[0],), int(t), device=x.device, dtype=torch.long)
        x0 = net.translator(torch.cat([x, condition], dim=1), timesteps=timesteps)
        x, _ = scheduler.step(x0, int(t), x)
    return x


@torch.no_grad()
def anomaly_scores(
    net: ModalityCycleNet,
    source: torch.Tensor,
    brain: torch.Tensor,
    num_masks: int = 16,
    steps: int = 10,
    erosion_disk_radius: int = EROSION_DISK_RADIUS,
    seed: int = 0,
    chunk: int = 32,
) -> torch.Tensor:
    """Anomaly map of ``(N, 1, S, S)`` source slices: the masked cycle error (MMCCD) or the plain cycle /
    reconstruction error (baselines), times the brain mask of each slice eroded by a disk of
    ``erosion_disk_radius`` pixels (:func:`erode_brain`).

    Args:
        net: the trained networks (evaluation mode is set here).
        source: windowed source slices.
        brain: their brain masks (bool).
        num_masks: band masks per slice (MMCCD only; see :func:`band_masks`).
        steps: DDIM steps per sample (MMCCD only).
        erosion_disk_radius: radius of the disk that erodes the brain mask (the error at the brain's edge is not
            about tissue); default 4, the public code's ``disk(4)``; 0: no erosion.
        seed: seed of the sampling noise (the same seed gives the same map).
        chunk: slices x masks per forward pass.
    """
    check_erosion_disk_radius(erosion_disk_radius)
    net.eval()
    generator = torch.Generator().manual_seed(seed)
    if net.variant == "mmccd":
        masks = band_masks(num_masks, net.image_size, net.band).to(source.device)
        total = torch.zeros_like(source)
        count = torch.zeros_like(source)
        pairs = [(i, j) for i in range(source.shape[0]) for j in range(masks.shape[0])]
        for start in range(0, len(pairs), chunk):
            idx = pairs[start : start + chunk]
            x1 = torch.stack([source[i] for i, _ in idx])
            m = torch.stack([masks[j] for _, j in idx])
            x2 = sample_translation(net, mask_source(x1, m, generator), steps, generator)
            error = (x1 - net.back(x2)) ** 2
            for k, (i, _) in enumerate(idx):
                total[i] += error[k] * m[k]
                count[i] += m[k]
        scores = total / count.clamp(min=1)
    else:
        scores = torch.cat([(x1 - net(x1)) ** 2 for x1 in source.split(chunk)])
    brain_np = erode_brain(brain.cpu().numpy(), erosion_disk_radius)
    return scores.float() * torch.from_numpy(brain_np).to(scores.device)


@torch.no_grad()
def impute_target(
    net: ModalityCycleNet,
    source: torch.Tensor,
    num_masks: int = 2,
    steps: int = 5,
    seed: int = 0,
    chunk: int = 32,
) -> torch.Tensor:
    """The target sequence synthesised from ``(N, 1, S, S)`` windowed source slices (imputation of a sequence a
    site lacks): ``f(x1)`` for the cyclic UNet; for MMCCD, the mean over ``num_masks`` band masks (half
    horizontal, half vertical) of ``f(masked x1)``, each pixel averaged over the samples whose band did not hide
    it *(ours: f only ever saw masked inputs)*.

    Raises:
        ValueError: the autoencoder (it has no translator), or an odd ``num_masks``.
    """
    if net.variant == "autoencoder":
        raise ValueError("the autoencoder baseline cannot synthesise another sequence")
    net.eval()
    if net.variant == "cyclic_unet":
        return torch.cat([net.translator(x1) for x1 in source.split(chunk)])
    if num_masks < 2 or num_masks % 2:
        raise ValueError(f"num_masks must be even and >= 2, got {num_masks}")
    masks = band_masks(num_masks, net.image_size, net.band, cover=False).to(source.device)
    generator = torch.Generator().manual_seed(seed)
    total, weight = torch.zeros_like(source), torch.zeros_like(source)
    for m in masks:
        for start in range(0, source.shape[0], chunk):
            x1 = source[start : start + chunk]
            mask = m.expand_as(x1)
            x2 = sample_translation(net, mask_source(x1, mask, generator), steps, generator).float()
            total[start : start + chunk] += x2 * (1 - mask)
            weight[start : start + chunk] += 1 - mask
    return torch.where(weight > 0, total / weight.clamp(min=1e-6), BACKGROUND)


def translation_terms(
    net: ModalityCycleNet, source: torch.Tensor, target: torch.Tensor | None
) -> dict[str, torch.Tensor]:
    """The training losses of one batch of healthy slices: ``translate`` (f) and ``back`` (g), or
    ``reconstruct`` for the autoencoder. MSE on the whole slice, as the public code does."""
    if net.variant == "autoencoder":
        return {"reconstruct": F.mse_loss(net.translator(source), source)}
    assert target is not None and net.back is not None
    if net.variant == "mmccd":
        n = source.shape[0]
        masks = random_band_masks(n, net.image_size, net.band).to(source.device)
        condition = mask_source(source, masks)
        noise = torch.randn_like(target)
        t = torch.randint(0, net.num_train_timesteps, (n,), device=source.device)
        noisy = net.noise_scheduler().add_noise(target, noise, t)
        predicted = net.translator(torch.cat([noisy, condition], dim=1), timesteps=t)
    else:
        predicted = net.translator(source)
    return {"translate": F.mse_loss(predicted, target), "back": F.mse_loss(net.back(target), source)}


# ---- the client method ----------------------------------------------------------------------------------------
class MMCCDMethod(ClientMethod):
    """The site's side: trains the cycle on healthy slices of its labelled cases; scores the anomaly map.

    Args:
        slices_per_volume: healthy slices drawn from each training case per step.
        brain_fraction: a central slice has at least this share of its case's largest brain area.
        val_masks: band masks per validation slice (the validation is a cheap version of the evaluation).
        val_steps: DDIM steps per validation sample.
        erosion_disk_radius: radius of the disk that erodes the brain mask in the anomaly map (default 4, the
            public code's ``disk(4)``; 0: none).

    Raises:
        ValueError: a non-positive count, a fraction outside (0, 1], or a bad erosion radius (named).
    """

    name: ClassVar[str] = "mmccd"

    def __init__(
        self,
        slices_per_volume: int = 8,
        brain_fraction: float = 0.6,
        val_masks: int = 16,
        val_steps: int = 3,
        erosion_disk_radius: int = EROSION_DISK_RADIUS,
    ) -> None:
        for arg, value in (("slices_per_volume", slices_per_volume), ("val_steps", val_steps)):
            if value < 1:
                raise ValueError(f"{arg} must be >= 1, got {value}")
        if not 0.0 < brain_fraction <= 1.0:
            raise ValueError(f"brain_fraction must be in (0, 1], got {brain_fraction}")
        check_erosion_disk_radius(erosion_disk_radius)
        self.slices_per_volume = slices_per_volume
        self.brain_fraction = brain_fraction
        self.val_masks = val_masks
        self.val_steps = val_steps
        self.erosion_disk_radius = erosion_disk_radius
        self.missing: list[str] = []

    def setup(self, model: torch.nn.Module, modalities: tuple[str, ...], device: torch.device) -> None:
        super().setup(model, modalities, device)
        if not isinstance(model, ModalityCycleNet):
            raise ValueError(f"method mmccd needs the network modality_cycle, got {type(model).__name__}")
        needed = [model.source] if model.variant == "autoencoder" else [model.source, model.target]
        self.missing = [m for m in needed if m not in modalities]
        if self.missing:
            logger.warning(
                "mmccd: this site has no %s (it has %s): it cannot train the %s -> %s cycle and is left out (it "
                "trains no step, so its update weighs nothing)",
                " or ".join(self.missing),
                ",".join(modalities),
                model.source,
                model.target,
            )
        if not self.labelled:
            raise ValueError(
                "mmccd finds healthy slices through the site's labels; this site has none (leave it out of the job)"
            )

    def training_loss(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor], epoch: int
    ) -> tuple[torch.Tensor | None, dict[str, float]]:
        if self.missing:
            return None, {}
        sources, targets = [], []
        for b in range(batch["image"].shape[0]):
            cs = case_slices(batch["image"][b], batch["label"][b], model, self.brain_fraction)
            healthy = cs.healthy()
            if healthy.numel() == 0:
                continue
            pick = healthy[torch.randperm(healthy.numel())[: self.slices_per_volume]]
            sources.append(cs.source[pick])
            if cs.target is not None:
                targets.append(cs.target[pick])
        if not sources:
            return None, {}
        terms = translation_terms(model, torch.cat(sources), torch.cat(targets) if targets else None)
        loss = sum(terms.values())
        return loss, {k: float(v.detach()) for k, v in terms.items()}

    @torch.no_grad()
    def validate(self, model: torch.nn.Module, val_loader: Any) -> dict[str, float] | None:
        """AUROC and AUPRC of the anomaly map on the slice with the largest tumour of each validation case
        (pixels inside the brain), and the mean score of healthy brain pixels there."""
        if self.missing:
            return {}
        scores, labels = [], []
        precision = resolve_precision("auto", self.device)
        for i, batch in enumerate(val_loader):
            cs = case_slices(batch["image"][0], batch["label"][0], model, self.brain_fraction)
            z = cs.largest_tumour()
            if z is None:
                continue
            with autocast(precision, self.device):
                s = anomaly_scores(
                    model,
                    cs.source[z : z + 1].to(self.device),
                    cs.brain[z : z + 1],
                    self.val_masks,
                    self.val_steps,
                    self.erosion_disk_radius,
                    seed=i,
                ).cpu()
            inside = cs.brain[z : z + 1]
            scores.append(s[inside].numpy())
            labels.append(cs.tumour[z : z + 1][inside].numpy())
        if not scores:
            return {}
        s, y = np.concatenate(scores), np.concatenate(labels)
        if y.all() or not y.any():
            return {}
        return {
            KEY_METRIC: auroc(s, y),
            f"{METRIC_PREFIX}auprc": auprc(s, y),
            f"{METRIC_PREFIX}healthy_score": float(s[~y].mean()),
        }


#: Training options of the job: whole volumes at 2 mm (the head fits in 128 x 128 x 80), no tumour-centred crops,
#: no augmentation (intensity shifts would move the background off zero, which marks the brain), no sequence
#: dropout, no post-processing choice.
TRAINING = {
    "method": "mmccd",
    "epochs_per_round": 2,
    "lr": 5e-4,
    "postprocess_candidates": [],
    "data": {
        "roi_size": [128, 128, 80],
        "zoom": 0.5,
        "batch_size": 1,
        "tumour_crop_fraction": 0.0,
        "modality_dropout": 0.0,
        "augment": False,
    },
}

METHOD = Method(
    clients={"mmccd": MMCCDMethod},
    networks={"modality_cycle": ModalityCycleNet},
    jobs=(
        Job(
            "mmccd",
            "MMCCD: unsupervised anomaly segmentation (FLAIR -> T2 masked conditional diffusion, T2 -> FLAIR UNet, "
            "cycle error) trained on healthy slices, FedAvg.",
            aggregation="fedbrats.federated.server.aggregation.WeightedAverage",
            network={"name": "modality_cycle", "args": {"variant": "mmccd", "init_filters": 16}},
            training=TRAINING,
            key_metric=KEY_METRIC,
            cross_site_eval=False,  # not a segmenter: its evaluation is the anomaly maps' (experiments/mmccd_*)
        ),
    ),
)
# Its comparison is experiments/mmccd_compare.py (anomaly scores, not the 15-combination segmentation).
