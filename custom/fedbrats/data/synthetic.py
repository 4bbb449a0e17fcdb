"""Synthetic BraTS-like cases: the project's embedded default data set.

Every job, test and demo runs on these volumes, so nothing has to be downloaded. A case is a skull-stripped
brain (white matter, cortical grey matter, deep grey matter, ventricles and sulcal CSF) holding one or two
glioma-like lesions: a necrotic core, an enhancing rim and an irregular rim of peritumoural edema. About one
case in ten is low-grade-like (no enhancing tumour) so that cases with an empty ET region exist.

The four sequences follow the relative contrasts of real MRI, and they are chosen so that dropping a sequence
really removes information:

* the enhancing rim differs from necrosis only on T1ce (pre-contrast T1, T2 and FLAIR see both as tumour);
* edema is told from CSF mainly by FLAIR (CSF suppressed, edema brightest); on T2 both are bright;
* edema against normal tissue shows on T2 and FLAIR, barely on T1 and T1ce.

Each institution gets a :class:`SiteStyle` (intensity scale, smooth bias field, noise level) that mimics
scanner differences between federated sites.

Case ids encode the institution so that :func:`fedbrats.data.conventions.institution_of` recovers it:
``Synth18_{INST}_{idx:03d}_1`` (brats2018 naming) gives ``INST``, ``BraTS-SYN{INST}-{idx:05d}-000`` (brats2023
naming) gives ``SYN{INST}``. Because ``institution_of`` drops trailing digits, institution names must be
letters and digits that end in a letter (``"INSTA"``, ``"INSTB"``, not ``"INST1"``).

Run ``python -m fedbrats.data.synthetic --out-dir DIR --n-cases 12 --institutions INSTA,INSTB,INSTC``.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import nibabel as nib
import numpy as np

from fedbrats.constants import MODALITIES
from fedbrats.data.conventions import CONVENTIONS, BraTSConvention, get_convention, institution_of

logger = logging.getLogger(__name__)

#: Smallest allowed side of a synthetic volume: below this the cortex, rim and ventricles stop being resolvable.
MIN_SIZE: int = 16

#: Nominal white-matter intensity on T1 at ``intensity_scale == 1`` (roughly the range of raw BraTS volumes).
REFERENCE_INTENSITY: float = 1000.0

#: Tissue classes of the generator, indexed by the values of :attr:`SyntheticVolumes.tissue`. They are finer than
#: the labels: several tissues share label 0 (healthy) and label 1 (necrosis and non-enhancing core).
TISSUE_NAMES: tuple[str, ...] = (
    "background",
    "csf",
    "grey_matter",
    "white_matter",
    "deep_grey_matter",
    "edema",
    "necrosis",
    "enhancing",
    "non_enhancing",
)
_BG, _CSF, _GM, _WM, _DGM, _ED, _NCR, _ET, _NET = range(len(TISSUE_NAMES))

# Mean intensity of each tissue (rows) on t1, t1ce, t2, flair (columns), relative to T1 white matter.
# The enhancing rim is kept close to necrosis everywhere except T1ce, so only that sequence separates them (on
# pre-contrast T1 it is set a little darker than grey matter, as real enhancing tumour is often hypointense there,
# rather than iso to grey matter, which would give T1 alone a rim-vs-necrosis cue). FLAIR suppresses CSF while edema
# stays brightest, so edema vs CSF is clear on FLAIR and only weak on T2, where both are bright.
_TISSUE_MEANS = np.array(
    [
        [0.00, 0.00, 0.00, 0.00],  # background (outside the skull-stripped brain)
        [0.30, 0.32, 1.60, 0.18],  # CSF
        [0.70, 0.72, 0.80, 0.88],  # cortical grey matter
        [1.00, 1.00, 0.52, 0.60],  # white matter
        [0.82, 0.84, 0.66, 0.72],  # deep grey matter (basal ganglia, thalami)
        [0.62, 0.64, 1.30, 1.55],  # peritumoural edema
        [0.42, 0.44, 1.42, 1.05],  # necrosis
        [0.40, 1.90, 1.36, 1.10],  # enhancing tumour
        [0.55, 0.57, 1.35, 1.35],  # non-enhancing tumour core of low-grade-like lesions
    ],
    dtype=np.float64,
)

# Relative amplitude of the multiplicative texture per tissue: tumour tissue is more heterogeneous.
_TEXTURE_AMPLITUDE = np.array([0.0, 0.03, 0.05, 0.04, 0.04, 0.08, 0.12, 0.10, 0.08], dtype=np.float64)

_INSTITUTION_PATTERN = re.compile(r"^[A-Za-z](?:[A-Za-z0-9]*[A-Za-z])?$")


@dataclass(frozen=True)
class SiteStyle:
    """Scanner-like appearance of one site's images.

    Attributes:
        intensity_scale: global gain applied to every sequence (raw MRI intensities are not standardised).
        bias_field_strength: amplitude of the smooth multiplicative bias field, ``1 + strength * p(x)`` with
            ``|p| <= 1``; must stay below 1 so the field is positive.
        noise_std: standard deviation of the Rician noise relative to the white-matter intensity.
    """

    intensity_scale: float = 1.0
    bias_field_strength: float = 0.0
    noise_std: float = 0.02

    def __post_init__(self) -> None:
        if not self.intensity_scale > 0:
            raise ValueError(f"intensity_scale must be > 0, got {self.intensity_scale}")
        if not 0 <= self.bias_field_strength < 1:
            raise ValueError(f"bias_field_strength must be in [0, 1), got {self.bias_field_strength}")
        if not self.noise_std >= 0:
            raise ValueError(f"noise_std must be >= 0, got {self.noise_std}")


# Hand-picked first styles so that small federations (2-4 sites) always differ visibly.
_FIRST_STYLES: tuple[SiteStyle, ...] = (
    SiteStyle(intensity_scale=1.0, bias_field_strength=0.0, noise_std=0.02),
    SiteStyle(intensity_scale=1.6, bias_field_strength=0.25, noise_std=0.05),
    SiteStyle(intensity_scale=0.65, bias_field_strength=0.4, noise_std=0.035),
    SiteStyle(intensity_scale=1.3, bias_field_strength=0.15, noise_std=0.08),
)


def site_style_for(index: int) -> SiteStyle:
    """Deterministic, distinct style of the ``index``-th site.

    Site 0 is clean (unit gain, no bias field, little noise); sites 1-3 are fixed, clearly different styles;
    later sites draw their style from a generator seeded with ``index``.

    Raises:
        ValueError: if ``index`` is negative.
    """
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    if index < len(_FIRST_STYLES):
        return _FIRST_STYLES[index]
    rng = np.random.default_rng([0x517E, index])
    return SiteStyle(
        intensity_scale=round(float(np.exp(rng.uniform(np.log(0.5), np.log(2.0)))), 4),
        bias_field_strength=round(float(rng.uniform(0.05, 0.45)), 4),
        noise_std=round(float(rng.uniform(0.015, 0.09)), 4),
    )


def _check_size(size: int | Sequence[int]) -> tuple[int, int, int]:
    """Normalise ``size`` to three sides, each at least :data:`MIN_SIZE`."""
    sides = (size, size, size) if isinstance(size, (int, np.integer)) else tuple(size)
    if len(sides) != 3 or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) for s in sides):
        raise ValueError(f"size must be an int or three ints, got {size!r}")
    if min(sides) < MIN_SIZE:
        raise ValueError(f"size must be >= {MIN_SIZE} per side, got {size!r}")
    return int(sides[0]), int(sides[1]), int(sides[2])


def _check_case_id(case_id: str) -> None:
    if not case_id or case_id in (".", "..") or "/" in case_id or os.sep in case_id or case_id.startswith("."):
        raise ValueError(f"case_id must be a plain, non-hidden folder name, got {case_id!r}")


def _smooth_fields(rng: np.random.Generator, shape: tuple[int, int, int], sigmas: Sequence[float]) -> np.ndarray:
    """Gaussian-smoothed white noise fields, one per sigma (voxels), each with zero mean and unit std.

    Smoothing is done in the Fourier domain: one batched FFT is far cheaper than spatial convolution and needs
    no scipy. The periodic wrap-around is harmless for random texture.
    """
    white = rng.standard_normal((len(sigmas), *shape))
    spectrum = np.fft.rfftn(white, axes=(1, 2, 3))
    spectrum *= _gaussian_transfer(shape, np.asarray(sigmas, dtype=np.float64))
    fields = np.fft.irfftn(spectrum, s=shape, axes=(1, 2, 3))
    fields -= fields.mean(axis=(1, 2, 3), keepdims=True)
    std = fields.std(axis=(1, 2, 3), keepdims=True)
    return fields / np.where(std > 0, std, 1.0)


def _gaussian_transfer(shape: tuple[int, int, int], sigmas: np.ndarray) -> np.ndarray:
    """Fourier transfer function of Gaussian kernels (one per sigma) on an rfftn grid of ``shape``."""
    fx = np.fft.fftfreq(shape[0])[:, None, None]
    fy = np.fft.fftfreq(shape[1])[None, :, None]
    fz = np.fft.rfftfreq(shape[2])[None, None, :]
    f2 = fx**2 + fy**2 + fz**2
    return np.exp(-2.0 * np.pi**2 * sigmas[:, None, None, None] ** 2 * f2[None])


def _blur(images: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur (voxels) of a stack of volumes along their last three axes."""
    shape = images.shape[1:]
    spectrum = np.fft.rfftn(images, axes=(1, 2, 3)) * _gaussian_transfer(shape, np.array([sigma]))
    return np.fft.irfftn(spectrum, s=shape, axes=(1, 2, 3))


def _ellipsoid(u: np.ndarray, centre: Sequence[float], radii: np.ndarray) -> np.ndarray:
    """Mask of an axis-aligned ellipsoid in normalised coordinates ``u`` (shape ``(3, X, Y, Z)``)."""
    q = sum(((u[i] - centre[i]) / radii[i]) ** 2 for i in range(3))
    return q < 1.0


def _build_anatomy(
    rng: np.random.Generator, shape: tuple[int, int, int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Healthy brain tissue map.

    Returns:
        ``(tissue, brain, grid, semi_axes)``: the tissue class per voxel, the brain mask, voxel coordinates
        (``(3, X, Y, Z)``) and the brain's semi-axes in voxels.
    """
    dims = np.asarray(shape, dtype=np.float64)
    grid = np.stack(np.meshgrid(*(np.arange(n, dtype=np.float64) for n in shape), indexing="ij"))
    centre = (dims - 1) / 2 + rng.uniform(-0.03, 0.03, 3) * dims
    # Left-right narrower than front-back, as in an axial BraTS volume.
    semi_axes = dims * np.array([0.38, 0.44, 0.40]) * (1 + rng.uniform(-0.04, 0.04, 3))
    u = (grid - centre[:, None, None, None]) / semi_axes[:, None, None, None]
    radius_vox = float(np.prod(semi_axes) ** (1 / 3))

    low, gyri, sulci = _smooth_fields(rng, shape, [0.3 * min(shape), max(1.2, 0.08 * min(shape)), 1.0])
    # Normalised radius, deformed by a low-frequency field and an egg-like front-back taper.
    rho = np.sqrt((u**2).sum(axis=0)) * (1 + 0.07 * low) * (1 + 0.05 * u[1])
    brain = rho < 1.0

    tissue = np.full(shape, _BG, dtype=np.int8)
    tissue[brain] = _WM
    # Cortical ribbon of varying thickness: the undulating inner boundary stands in for gyri.
    cortex_depth = np.clip(0.2 + 0.06 * gyri, 0.1, 0.32)
    tissue[brain & (rho >= 1 - cortex_depth)] = _GM
    # Sulcal CSF: thin sheets along the zero level set of a smooth field, only in the cortical ribbon.
    sulcal = brain & (rho >= 1 - 0.85 * cortex_depth) & (np.abs(sulci) < 0.1)
    tissue[sulcal] = _CSF
    # Sub-voxel-thick CSF layer between brain and (removed) skull.
    tissue[brain & (rho >= 1 - 0.5 / radius_vox)] = _CSF

    # Radii never shrink below about a voxel, or small volumes would lose these structures entirely.
    min_radii = 0.9 / semi_axes
    for side in (-1.0, 1.0):
        dgm_radii = np.maximum(np.array([0.16, 0.22, 0.16]) * rng.uniform(0.85, 1.15, 3), min_radii)
        tissue[brain & _ellipsoid(u, (side * 0.24, -0.05, 0.0), dgm_radii)] = _DGM
    ventricle_scale = rng.uniform(0.8, 1.3)  # ventricles widen with age
    for side in (-1.0, 1.0):
        v_radii = np.maximum(np.array([0.07, 0.32, 0.12]) * ventricle_scale * rng.uniform(0.9, 1.1, 3), min_radii)
        tissue[brain & _ellipsoid(u, (side * 0.09, 0.05, 0.1), v_radii)] = _CSF
    return tissue, brain, grid, semi_axes


def _add_lesions(
    rng: np.random.Generator,
    tissue: np.ndarray,
    brain: np.ndarray,
    grid: np.ndarray,
    semi_axes: np.ndarray,
) -> None:
    """Paint one (sometimes two) glioma-like lesions into ``tissue`` in place."""
    shape = tissue.shape
    radius_vox = float(np.prod(semi_axes) ** (1 / 3))
    n_lesions = 2 if rng.random() < 0.15 else 1
    low_grade = rng.random() < 0.10
    centre = (np.asarray(shape, dtype=np.float64) - 1) / 2
    fields = _smooth_fields(rng, shape, [max(1.0, 0.06 * radius_vox), max(1.5, 0.15 * radius_vox)] * n_lesions)

    for lesion in range(n_lesions):
        scale = 1.0 if lesion == 0 else rng.uniform(0.5, 0.8)
        position = _lesion_position(rng, brain, tissue, centre, semi_axes)
        # Anisotropic distance (voxels) from the lesion centre; noise on the boundaries makes the shape irregular.
        anisotropy = rng.uniform(0.8, 1.25, 3)
        distance = np.sqrt((((grid - position[:, None, None, None]) / anisotropy[:, None, None, None]) ** 2).sum(0))
        core_distance = distance * (1 + 0.12 * fields[2 * lesion])
        edema_distance = distance * np.clip(1 + 0.3 * fields[2 * lesion + 1], 0.4, None)

        core_radius = max(1.5, scale * radius_vox * rng.uniform(0.12, 0.22))
        rim = max(1.0, radius_vox * rng.uniform(0.05, 0.09))
        edema_radius = core_radius + rim + max(1.5, scale * radius_vox * rng.uniform(0.1, 0.25))

        free = ~np.isin(tissue, (_NCR, _ET, _NET))  # an earlier lesion's core is never overwritten
        core = (core_distance < core_radius + rim) & brain & free
        # The voxel at the centre is always tumour, so every case has a non-empty whole tumour.
        middle = tuple(np.clip(np.rint(position).astype(int), 0, np.asarray(shape) - 1))
        core[middle] = core[middle] or bool(free[middle])
        # Edema follows parenchyma and does not fill CSF spaces, which keeps edema and CSF adjacent but distinct.
        # Only edema connected to the core is kept: the noisy boundary would otherwise scatter far islands.
        parenchyma = np.isin(tissue, (_WM, _GM, _DGM, _ED)) & brain
        edema = _grow_within(core, core | ((edema_distance < edema_radius) & parenchyma)) & ~core
        tissue[edema] = _ED
        if low_grade:
            tissue[core] = _NET
        else:
            tissue[core & (core_distance < core_radius)] = _NCR
            tissue[core & (core_distance >= core_radius)] = _ET
            if core[middle]:
                tissue[middle] = _NCR


def _grow_within(seed: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` 6-connected to ``seed`` (geodesic reconstruction by repeated one-voxel dilation)."""
    region = seed & mask
    while True:
        grown = region.copy()
        for axis in range(3):
            ahead = [slice(None)] * 3
            behind = [slice(None)] * 3
            ahead[axis], behind[axis] = slice(1, None), slice(None, -1)
            grown[tuple(ahead)] |= region[tuple(behind)]
            grown[tuple(behind)] |= region[tuple(ahead)]
        grown &= mask
        if np.array_equal(grown, region):
            return region
        region = grown


def _lesion_position(
    rng: np.random.Generator,
    brain: np.ndarray,
    tissue: np.ndarray,
    centre: np.ndarray,
    semi_axes: np.ndarray,
) -> np.ndarray:
    """Random lesion centre (voxels) inside the brain parenchyma, away from the brain surface."""
    shape = np.asarray(brain.shape)
    for _ in range(100):
        direction = rng.standard_normal(3)
        direction /= np.linalg.norm(direction)
        position = centre + direction * rng.uniform(0.0, 0.6) * semi_axes
        voxel = tuple(np.clip(np.rint(position).astype(int), 0, shape - 1))
        if brain[voxel] and tissue[voxel] in (_WM, _DGM, _ED):
            return position
    return centre


def _bias_field(rng: np.random.Generator, grid: np.ndarray, strength: float) -> np.ndarray:
    """Smooth multiplicative field ``1 + strength * p`` with ``p`` a random quadratic scaled to ``max|p| = 1``."""
    v = np.stack([2 * grid[i] / max(grid[i].max(), 1.0) - 1 for i in range(3)])
    basis = [v[0], v[1], v[2], v[0] * v[1], v[0] * v[2], v[1] * v[2], v[0] ** 2 - 1 / 3, v[1] ** 2 - 1 / 3]
    poly = sum(c * b for c, b in zip(rng.standard_normal(len(basis)), basis))
    peak = float(np.abs(poly).max())
    return 1.0 + strength * poly / (peak if peak > 0 else 1.0)


def _render(
    rng: np.random.Generator,
    tissue: np.ndarray,
    brain: np.ndarray,
    grid: np.ndarray,
    style: SiteStyle,
) -> np.ndarray:
    """The four sequences (``(4, X, Y, Z)`` float32, :data:`MODALITIES` order) of a tissue map."""
    shape = tissue.shape
    # Tissue contrasts vary a little between patients, never enough to reorder the tissues.
    means = _TISSUE_MEANS * (1 + np.clip(0.03 * rng.standard_normal(_TISSUE_MEANS.shape), -0.08, 0.08))
    shared_texture, *own_textures = _smooth_fields(rng, shape, [1.0] * (1 + len(MODALITIES)))
    amplitude = _TEXTURE_AMPLITUDE[tissue]
    images = np.empty((len(MODALITIES), *shape), dtype=np.float64)
    for s in range(len(MODALITIES)):
        texture = 0.7 * shared_texture + 0.3 * own_textures[s]
        images[s] = means[tissue, s] * (1 + amplitude * texture)
        # Background takes the CSF value before blurring, so the partial-volume blur does not darken the edge.
        images[s][~brain] = means[_CSF, s]
    images = _blur(images, 0.4)

    gain = REFERENCE_INTENSITY * style.intensity_scale
    noise_sigma = style.noise_std * gain  # relative to white matter, whose T1 intensity is about ``gain``
    for s in range(len(MODALITIES)):
        images[s] *= _bias_field(rng, grid, style.bias_field_strength) * gain * rng.uniform(0.95, 1.05)
        if noise_sigma > 0:
            # Rician noise: magnitude of a complex signal with Gaussian noise in both channels.
            real = images[s] + noise_sigma * rng.standard_normal(shape)
            imag = noise_sigma * rng.standard_normal(shape)
            images[s] = np.sqrt(real**2 + imag**2)
    images[:, ~brain] = 0.0  # skull-stripped, like BraTS
    return images.astype(np.float32)


@dataclass(frozen=True)
class SyntheticVolumes:
    """One synthetic case in memory.

    Attributes:
        images: float32 volume per canonical modality (:data:`~fedbrats.constants.MODALITIES`).
        seg: uint8 label volume with the convention's values (0, 1 necrosis/core, 2 edema, ET label).
        tissue: int8 tissue class per voxel, indexing :data:`TISSUE_NAMES` (the ground truth behind the labels,
            e.g. to measure contrasts between healthy tissues).
    """

    images: dict[str, np.ndarray]
    seg: np.ndarray
    tissue: np.ndarray


def synthesize(
    size: int | tuple[int, int, int] = 32,
    *,
    seed: int = 0,
    style: SiteStyle | None = None,
    convention: str = "brats2018",
) -> SyntheticVolumes:
    """Generate one synthetic case in memory, exactly as :func:`generate_case` would write it.

    Args:
        size: side of the cubic volume, or three sides; each at least :data:`MIN_SIZE`.
        seed: seed of the case's own random generator.
        style: site appearance; :func:`site_style_for` ``(0)`` when omitted.
        convention: decides the ET label value only.

    Raises:
        ValueError: if ``size`` or ``convention`` is invalid.
    """
    return _synthesize(_check_size(size), seed, style or site_style_for(0), get_convention(convention))


def _synthesize(
    shape: tuple[int, int, int], seed: int, style: SiteStyle, convention: BraTSConvention
) -> SyntheticVolumes:
    rng = np.random.default_rng(seed)
    tissue, brain, grid, semi_axes = _build_anatomy(rng, shape)
    _add_lesions(rng, tissue, brain, grid, semi_axes)
    images = _render(rng, tissue, brain, grid, style)
    return SyntheticVolumes(
        images={m: images[s] for s, m in enumerate(MODALITIES)}, seg=_labels(tissue, convention), tissue=tissue
    )


def _labels(tissue: np.ndarray, convention: BraTSConvention) -> np.ndarray:
    seg = np.zeros(tissue.shape, dtype=np.uint8)
    seg[tissue == _ED] = 2
    seg[np.isin(tissue, (_NCR, _NET))] = 1
    seg[tissue == _ET] = convention.et_label
    return seg


def _is_complete(case_dir: str, case_id: str, convention: BraTSConvention) -> bool:
    """Whether ``case_dir`` holds all four sequences and the label file of the convention."""
    return all(os.path.isfile(os.path.join(case_dir, convention.filename(case_id, k))) for k in (*MODALITIES, "seg"))


def _write_case(
    out_dir: str,
    case_id: str,
    convention: BraTSConvention,
    shape: tuple[int, int, int],
    seed: int,
    style: SiteStyle,
    replace_existing: bool,
) -> str:
    """Generate a case into a temporary folder of ``out_dir`` and move it into place atomically."""
    volumes = _synthesize(shape, seed, style, convention)
    os.makedirs(out_dir, exist_ok=True)
    final = os.path.join(out_dir, case_id)
    # Hidden temporary name: folder scanners skip it, and the rename below is atomic on one file system.
    tmp = tempfile.mkdtemp(prefix=f".tmp-{case_id}-", dir=out_dir)
    try:
        affine = np.eye(4)  # 1 mm isotropic, whatever the shape
        for modality in MODALITIES:
            image = nib.Nifti1Image(volumes.images[modality], affine)
            image.set_data_dtype(np.float32)
            image.header.set_xyzt_units("mm")
            nib.save(image, os.path.join(tmp, convention.filename(case_id, modality)))
        label = nib.Nifti1Image(volumes.seg, affine)
        label.set_data_dtype(np.uint8)
        label.header.set_xyzt_units("mm")
        nib.save(label, os.path.join(tmp, convention.filename(case_id, "seg")))
        _publish(tmp, final, replace_existing=replace_existing or not _is_complete(final, case_id, convention))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _publish(tmp: str, final: str, *, replace_existing: bool) -> None:
    """Move the finished folder ``tmp`` to ``final``; an existing ``final`` is kept unless ``replace_existing``.

    ``os.replace`` cannot overwrite a non-empty folder, so an existing one is first renamed aside; readers may
    then briefly find no folder, but never a half-written one.
    """
    try:
        os.replace(tmp, final)
        return
    except OSError:
        if not os.path.isdir(final):
            raise
    if not replace_existing:
        return  # another process finished the same (deterministic) case meanwhile
    aside = tempfile.mkdtemp(prefix=".old-", dir=os.path.dirname(final))
    try:
        try:
            os.replace(final, os.path.join(aside, "case"))
        except FileNotFoundError:
            pass  # someone else moved it aside first
        try:
            os.replace(tmp, final)
        except OSError:
            if not os.path.isdir(final):
                raise
    finally:
        shutil.rmtree(aside, ignore_errors=True)


def generate_case(
    out_dir: str,
    case_id: str,
    *,
    convention: str = "brats2018",
    size: int | tuple[int, int, int] = 32,
    seed: int = 0,
    style: SiteStyle | None = None,
) -> str:
    """Write one synthetic case as ``out_dir/case_id/`` with the four sequences and the segmentation.

    Files are named by the convention (e.g. ``CASE_t1ce.nii.gz`` or ``CASE-t1c.nii.gz``); images are float32,
    the label uint8 with the convention's values, all with a 1 mm diagonal affine. The case is written to a
    temporary folder and renamed into place, replacing any existing folder of that name.

    Args:
        out_dir: parent folder, created if missing.
        case_id: case id, also the folder name and file prefix.
        convention: ``"brats2018"`` or ``"brats2023"``; only names and the ET label differ, the images are the
            same for a given seed.
        size: side of the cubic volume, or three sides; each at least :data:`MIN_SIZE`.
        seed: seed of the case's own random generator; equal seeds give identical cases.
        style: site appearance; :func:`site_style_for` ``(0)`` when omitted.

    Returns:
        The case folder path.

    Raises:
        ValueError: if ``convention``, ``size`` or ``case_id`` is invalid.
    """
    conv = get_convention(convention)
    shape = _check_size(size)
    _check_case_id(case_id)
    return _write_case(out_dir, case_id, conv, shape, seed, style or site_style_for(0), replace_existing=True)


def synthetic_case_id(institution: str, index: int, convention: str = "brats2018") -> str:
    """Id of the ``index``-th synthetic case of ``institution`` under ``convention``.

    ``Synth18_{INST}_{index:03d}_1`` for brats2018, ``BraTS-SYN{INST}-{index:05d}-000`` for brats2023.

    Raises:
        ValueError: if ``convention`` is unknown or ``institution`` would not be read back by
            :func:`~fedbrats.data.conventions.institution_of`.
    """
    conv = get_convention(convention)
    _check_institution(institution)
    if conv.name == "brats2018":
        return f"Synth18_{institution}_{index:03d}_1"
    return f"BraTS-SYN{institution}-{index:05d}-000"


def _check_institution(institution: str) -> None:
    if not isinstance(institution, str) or not _INSTITUTION_PATTERN.match(institution):
        raise ValueError(
            f"institutions must be letters and digits ending in a letter (institution_of drops trailing "
            f"digits), e.g. 'INSTA'; got {institution!r}"
        )


def generate_dataset(
    out_dir: str,
    n_cases: int,
    *,
    institutions: Sequence[str] = ("INSTA",),
    convention: str = "brats2018",
    size: int | tuple[int, int, int] = 32,
    seed: int = 0,
    styles: Mapping[str, SiteStyle] | None = None,
    first_index: int = 0,
) -> list[str]:
    """Write ``n_cases`` synthetic cases spread round-robin over ``institutions``.

    Case ``idx`` (counting from ``first_index``) belongs to ``institutions[idx % len(institutions)]`` and is
    seeded from ``(seed, idx)`` only, so a case is the same whatever ``n_cases`` is. Each institution has its
    own :class:`SiteStyle`, taken from ``styles`` or else :func:`site_style_for` of its position. Cases whose
    folder already holds all five files are kept as they are, so a cache can be reused; new cases are written
    atomically, so concurrent generators never expose half a case.

    Args:
        out_dir: parent folder of the case folders, created if missing.
        n_cases: number of cases, at least 1.
        institutions: site names; letters and digits ending in a letter, so that
            :func:`~fedbrats.data.conventions.institution_of` reads them back from the ids.
        convention: ``"brats2018"`` or ``"brats2023"``.
        size: side of the cubic volumes, or three sides; each at least :data:`MIN_SIZE`.
        seed: data set seed.
        styles: style per institution name; institutions missing from it get the default of their position.
        first_index: index of the first case, to extend a data set without renumbering it.

    Returns:
        The case folder paths, in index order.

    Raises:
        ValueError: naming the offending argument, before anything is written.
    """
    if isinstance(n_cases, bool) or not isinstance(n_cases, (int, np.integer)) or n_cases < 1:
        raise ValueError(f"n_cases must be an int >= 1, got {n_cases!r}")
    if isinstance(first_index, bool) or not isinstance(first_index, (int, np.integer)) or first_index < 0:
        raise ValueError(f"first_index must be an int >= 0, got {first_index!r}")
    conv = get_convention(convention)
    shape = _check_size(size)
    if isinstance(institutions, str) or len(institutions) == 0:
        raise ValueError(f"institutions must be a non-empty sequence of names, got {institutions!r}")
    for name in institutions:
        _check_institution(name)
    if len(set(institutions)) != len(institutions):
        raise ValueError(f"institutions must be distinct, got {list(institutions)}")
    styles = dict(styles or {})
    unknown = sorted(set(styles) - set(institutions))
    if unknown:
        raise ValueError(f"styles names institutions {unknown} that are not among institutions {list(institutions)}")
    site_styles = {name: styles.get(name, site_style_for(i)) for i, name in enumerate(institutions)}

    paths: list[str] = []
    written = 0
    for idx in range(first_index, first_index + n_cases):
        institution = institutions[idx % len(institutions)]
        case_id = synthetic_case_id(institution, idx, conv.name)
        assert institution_of(case_id) in (institution, f"SYN{institution}")  # guaranteed by _check_institution
        case_dir = os.path.join(out_dir, case_id)
        if not _is_complete(case_dir, case_id, conv):
            case_seed = int(np.random.SeedSequence([seed, idx]).generate_state(1)[0])
            _write_case(out_dir, case_id, conv, shape, case_seed, site_styles[institution], replace_existing=False)
            written += 1
            logger.debug("wrote synthetic case %s", case_dir)
        paths.append(case_dir)
    logger.info(
        "synthetic data in %s: %d cases written, %d reused (%s, size %s, institutions %s)",
        out_dir,
        written,
        n_cases - written,
        conv.name,
        "x".join(map(str, shape)),
        ",".join(institutions),
    )
    return paths


def _parse_size(text: str) -> int | tuple[int, int, int]:
    try:
        parts = [int(p) for p in text.split(",")]
    except ValueError:
        raise ValueError(f"--size must be an int or three comma-separated ints, got {text!r}") from None
    if len(parts) == 1:
        return parts[0]
    if len(parts) == 3:
        return parts[0], parts[1], parts[2]
    raise ValueError(f"--size must be an int or three comma-separated ints, got {text!r}")


#: What ``fedbrats synth`` does (its ``--help``).
SYNTH_DESCRIPTION = "Write a synthetic BraTS-like data set."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``fedbrats synth`` options."""
    parser.add_argument("--out-dir", required=True, help="parent folder of the case folders")
    parser.add_argument("--n-cases", type=int, default=12, help="number of cases (>= 1)")
    parser.add_argument("--size", default="32", help=f"volume side, or three comma-separated sides (>= {MIN_SIZE})")
    parser.add_argument("--seed", type=int, default=0, help="data set seed")
    parser.add_argument("--convention", default="brats2018", help=f"one of {sorted(CONVENTIONS)}")
    parser.add_argument("--institutions", default="INSTA", help="comma-separated site names, e.g. INSTA,INSTB")
    parser.add_argument("--first-index", type=int, default=0, help="index of the first case")


def run(args: argparse.Namespace) -> int:
    """Write a synthetic data set (``fedbrats synth``).

    Raises:
        ValueError: naming the offending argument, before anything is written.
    """
    size = _parse_size(args.size)
    institutions = [name.strip() for name in args.institutions.split(",") if name.strip()]
    if not institutions:
        raise ValueError(f"--institutions must name at least one institution, got {args.institutions!r}")
    generate_dataset(
        args.out_dir,
        args.n_cases,
        institutions=institutions,
        convention=args.convention,
        size=size,
        seed=args.seed,
        first_index=args.first_index,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """``fedbrats synth`` (also ``python -m fedbrats.data.synthetic``): 0 on success, 1 on a bad option."""
    from fedbrats.commands import run_command

    return run_command("synth", add_arguments, run, argv, SYNTH_DESCRIPTION)


if __name__ == "__main__":
    raise SystemExit(main())
