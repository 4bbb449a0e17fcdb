"""MONAI SegResNet wrapped so NVFlare can rebuild it from its stored constructor arguments."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.nets import SegResNet


class BraTSSegResNet(SegResNet):
    """SegResNet with four input sequences (zero-filled when absent) and WT/TC/ET sigmoid outputs.

    NVFlare's job export and persistor rebuild a model from the attributes named like its ``__init__``
    arguments; MONAI's SegResNet does not keep all of them, so this subclass stores every argument.

    Args:
        in_channels: input sequences (4: t1, t1ce, t2, flair).
        out_channels: output regions (3: WT, TC, ET).
        init_filters: filters of the first block; a multiple of 8 (group norm).
        blocks_down: residual blocks per encoder level.
        blocks_up: residual blocks per decoder level.
        dropout_prob: dropout before the first block (None: none; MONAI reads this attribute).
    """

    def __init__(
        self,
        in_channels: int = 4,
        out_channels: int = 3,
        init_filters: int = 8,
        blocks_down: Sequence[int] = (1, 2, 2, 4),
        blocks_up: Sequence[int] = (1, 1, 1),
        dropout_prob: float | None = None,
    ) -> None:
        if init_filters % 8 != 0:
            raise ValueError(f"init_filters must be a multiple of 8 (group norm), got {init_filters}")
        super().__init__(
            spatial_dims=3,
            in_channels=in_channels,
            out_channels=out_channels,
            init_filters=init_filters,
            blocks_down=tuple(blocks_down),
            blocks_up=tuple(blocks_up),
            dropout_prob=dropout_prob,
        )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.init_filters = init_filters
        self.blocks_down = list(blocks_down)
        self.blocks_up = list(blocks_up)
        self.dropout_prob = dropout_prob

    @property
    def spatial_divisor(self) -> int:
        """Input sides must be multiples of this (one halving per encoder level but the first)."""
        return 2 ** (len(self.blocks_down) - 1)

    def forward(self, x: torch.Tensor, modality_mask: torch.Tensor | None = None) -> torch.Tensor:  # noqa: D417
        """Logits for WT/TC/ET; ``modality_mask`` is accepted for a uniform interface and ignored (inputs are
        already zero-filled where a sequence is absent)."""
        return super().forward(x)

    def forward_with_features(
        self, x: torch.Tensor, modality_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (as :meth:`forward`) and the bottleneck features: the deepest encoder output,
        ``init_filters * 2 ** (len(blocks_down) - 1)`` channels at ``1 / spatial_divisor`` of the input size."""
        features, skips = self.encode(x)
        skips.reverse()
        return self.decode(features, skips), features
