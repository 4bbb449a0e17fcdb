"""Sliding-window inference for any network of the package, with the modality mask passed through."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.inferers import Inferer, sliding_window_inference

from fedbrats.precision import autocast, resolve_precision


def predict_logits(
    model: torch.nn.Module,
    image: torch.Tensor,
    modality_mask: torch.Tensor,
    roi_size: Sequence[int],
    overlap: float = 0.5,
    sw_batch_size: int = 1,
    precision: str = "fp32",
) -> torch.Tensor:
    """Logits (B x 3 x ...) of ``model`` over a whole volume, window by window.

    Args:
        model: a network whose ``forward(x, modality_mask)`` returns logits or a dict with ``"logits"``.
        image: B x 4 x H x W x D, zero where a sequence is absent.
        modality_mask: B x 4 availability (1 = present).
        roi_size: window size; volumes smaller than it are padded by MONAI.
        overlap: window overlap.
        sw_batch_size: windows per forward pass.
        precision: ``fp32``, ``bf16`` or ``auto`` (see :mod:`fedbrats.precision`); the logits are float32 either
            way.
    """
    mask = modality_mask.to(image.device, torch.float32)

    def _predictor(window: torch.Tensor) -> torch.Tensor:
        # All windows of a batch come from the same case here, so the case's mask applies to each.
        out = model(window, mask.expand(window.shape[0], -1) if mask.shape[0] == 1 else mask)
        return out["logits"] if isinstance(out, dict) else out

    resolved = resolve_precision(precision, image.device)
    with autocast(resolved, image.device):
        logits = sliding_window_inference(image, list(roi_size), sw_batch_size, _predictor, overlap=overlap)
    return logits.float()


class MaskedSlidingWindowInferer(Inferer):
    """MONAI inferer of :func:`predict_logits`: ``inferer(image, network, modality_mask)``.

    MONAI's ``SlidingWindowInferer`` hands extra arguments to the network unchanged, so a batch of several windows
    would meet a mask of one case; this one gives every window its case's mask. ``predict`` and an exported
    bundle (with ``PrepareBatchExtraInput(extra_keys="modality_mask")``) both use it.

    Args:
        roi_size: window size (the training crop, see :class:`fedbrats.data.loader.DataConfig`).
        overlap: window overlap.
        sw_batch_size: windows per forward pass.
        precision: ``fp32``, ``bf16`` or ``auto`` (see :mod:`fedbrats.precision`).

    Raises:
        ValueError: ``overlap`` outside [0, 1) or ``sw_batch_size`` < 1.
    """

    def __init__(
        self, roi_size: Sequence[int], overlap: float = 0.5, sw_batch_size: int = 1, precision: str = "fp32"
    ) -> None:
        super().__init__()
        if not 0.0 <= overlap < 1.0:
            raise ValueError(f"overlap must be in [0, 1), got {overlap}")
        if sw_batch_size < 1:
            raise ValueError(f"sw_batch_size must be >= 1, got {sw_batch_size}")
        self.roi_size = [int(s) for s in roi_size]
        self.overlap = overlap
        self.sw_batch_size = sw_batch_size
        self.precision = precision

    def __call__(  # type: ignore[override]
        self, inputs: torch.Tensor, network: torch.nn.Module, modality_mask: torch.Tensor
    ) -> torch.Tensor:
        """Logits (B x 3 x ...) of ``network`` on ``inputs`` (B x 4 x ...) with the cases' masks (B x 4)."""
        return predict_logits(
            network,
            inputs,
            modality_mask,
            self.roi_size,
            overlap=self.overlap,
            sw_batch_size=self.sw_batch_size,
            precision=self.precision,
        )
