"""Privacy for FedKD's region prototypes: a site-side NVFlare filter that clips them and adds Gaussian noise.

It runs on the site, after the trainer and before the payload audit. NVFlare's own privacy filters
(``SVTPrivacy``, ``PercentilePrivacy``, ``ExcludeVars``) act on the weights only, never on the extras in the
model's meta, so the prototypes need a filter of their own.
"""

from __future__ import annotations

import numpy as np
from nvflare.apis.dxo import from_shareable
from nvflare.apis.filter import Filter
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable


def privatize_prototypes(
    prototypes: np.ndarray,
    cases: np.ndarray,
    clip_norm: float,
    noise_multiplier: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """Clip each region prototype to L2 norm ``clip_norm`` and add Gaussian noise.

    The noise standard deviation of region r is ``noise_multiplier * 2 * clip_norm / n_r`` with ``n_r`` its
    number of distinct contributing cases: the Gaussian mechanism for a mean of ``n_r`` bounded contributions
    (replacing one case moves such a mean by at most ``2 C / n_r``). Our interpretation: the prototype is a
    voxel-weighted mean, so this is a calibrated heuristic, not a formal per-patient guarantee.
    """
    if clip_norm <= 0:
        raise ValueError(f"clip_norm must be > 0, got {clip_norm}")
    if noise_multiplier < 0:
        raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
    p = np.asarray(prototypes, dtype=np.float64)
    norms = np.linalg.norm(p, axis=-1, keepdims=True)
    clipped = p * np.minimum(1.0, clip_norm / np.maximum(norms, 1e-12))
    n = np.maximum(np.asarray(cases, dtype=np.float64), 1.0)[:, None]
    noisy = clipped + rng.normal(size=p.shape) * (noise_multiplier * 2.0 * clip_norm / n)
    present = np.asarray(cases) > 0
    return np.where(present[:, None], noisy, 0.0).astype(np.float32)


class PrototypePrivacyFilter(Filter):
    """Clipping plus Gaussian noise on the region prototypes a FedKD site sends (see :func:`privatize_prototypes`).

    Args:
        clip_norm: largest L2 norm of a prototype.
        noise_multiplier: noise scale relative to the sensitivity; 0 clips only.
        seed: seed of the noise (None: fresh randomness).
    """

    def __init__(self, clip_norm: float = 1.0, noise_multiplier: float = 1.0, seed: int | None = None) -> None:
        super().__init__()
        privatize_prototypes(np.zeros((1, 1)), np.zeros(1), clip_norm, noise_multiplier, np.random.default_rng(0))
        self.clip_norm = clip_norm
        self.noise_multiplier = noise_multiplier
        self.seed = seed  # kept under its own name: a job export rebuilds the filter from its attributes
        self.rng = np.random.default_rng(seed)

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        try:
            dxo = from_shareable(shareable)
        except ValueError:
            return shareable
        meta = dxo.meta or {}
        if "prototypes" not in meta:
            return shareable
        meta["prototypes"] = privatize_prototypes(
            meta["prototypes"],
            meta.get("prototype_cases", np.ones(len(meta["prototypes"]))),
            self.clip_norm,
            self.noise_multiplier,
            self.rng,
        )
        return dxo.update_shareable(shareable)


__all__ = ["PrototypePrivacyFilter", "privatize_prototypes"]
