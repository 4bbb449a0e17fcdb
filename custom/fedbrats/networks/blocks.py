"""Building blocks shared by the package's networks."""

from __future__ import annotations

from torch import nn


def conv_block(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    """3x3x3 convolution, instance norm, leaky ReLU; ``stride=2`` halves each side."""
    # No conv bias: InstanceNorm subtracts the per-channel mean right after, so a bias would be dead weight.
    return nn.Sequential(
        nn.Conv3d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False),
        nn.InstanceNorm3d(out_channels, affine=True),
        nn.LeakyReLU(0.01, inplace=True),
    )
