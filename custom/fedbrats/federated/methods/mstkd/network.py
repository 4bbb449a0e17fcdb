"""Network of the ``mstkd`` method: a compact 3D U-Net with a small vision transformer at the bottleneck.

After MST-KDNet (Zhu et al., MICCAI 2025; public code Quanato607/MST-KDNet), scaled down for this project.
Teacher and student share this architecture; the distillation losses read the extra outputs:

* ``hidden``: the transformer's token states after the blocks listed in ``kd_layers`` (B, N, D);
* ``attn``: the attention probabilities of the same blocks (B, heads, N, N), rows summing to 1;
* ``style``: the feature maps of the first two encoder levels (full and 1/2 resolution), whose Gram matrices
  and adversarial discriminator carry the "global style matching".

Scaled down from the paper *(ours)*: four encoder levels with ``f, 2f, 4f, 8f`` channels (``f`` =
``init_filters``), one ViT of ``vit_depth`` = 4 blocks (paper: 12), ``vit_heads`` = 2 (paper: 12), embedding
``4f`` (paper: 768), MLP ratio 2, and distillation at blocks 1, 2, 3, 4 (the paper's 3, 6, 9, 12 scaled by
4/12). Positions are encoded by a depthwise 3x3x3 convolution on the token grid (a conditional positional
encoding) instead of a learned table, so the network takes any input size that is a multiple of
:attr:`MSTKDNet.spatial_divisor` (the paper's table is tied to one crop size). The paper draws its style
features at the bottleneck; we take the first two encoder levels, where intensity and texture statistics (the
contrast a missing sequence would have contributed) live, and where a patch discriminator has room to work.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from fedbrats.networks.blocks import conv_block

#: Downsampling factor between the input and the bottleneck (three stride-2 stages).
DOWNSAMPLING: int = 8


class ViTBlock(nn.Module):
    """Pre-norm transformer block that also returns its attention probabilities.

    Written out (rather than ``nn.MultiheadAttention``) so that the per-head attention maps are available to
    the attention distillation without averaging over heads.

    Args:
        embed_dim: token size ``D``; a multiple of ``num_heads``.
        num_heads: attention heads.
        mlp_ratio: hidden size of the MLP as a multiple of ``D``.
    """

    def __init__(self, embed_dim: int, num_heads: int, mlp_ratio: float = 2.0) -> None:
        super().__init__()
        if num_heads < 1 or embed_dim % num_heads != 0:
            raise ValueError(f"num_heads must be >= 1 and divide embed_dim={embed_dim}, got {num_heads}")
        if mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be > 0, got {mlp_ratio}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.mlp_ratio = mlp_ratio
        self.norm1 = nn.LayerNorm(embed_dim)
        self.qkv = nn.Linear(embed_dim, 3 * embed_dim)
        self.proj = nn.Linear(embed_dim, embed_dim)
        self.norm2 = nn.LayerNorm(embed_dim)
        hidden = max(1, int(round(embed_dim * mlp_ratio)))
        self.mlp = nn.Sequential(nn.Linear(embed_dim, hidden), nn.GELU(), nn.Linear(hidden, embed_dim))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Apply the block.

        Args:
            x: tokens of shape (B, N, D).

        Returns:
            ``(tokens, attention)``: the new tokens (B, N, D) and the attention probabilities (B, heads, N, N).
        """
        b, n, d = x.shape
        head_dim = d // self.num_heads
        qkv = self.qkv(self.norm1(x)).reshape(b, n, 3, self.num_heads, head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # each (B, heads, N, head_dim)
        attn = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(head_dim), dim=-1)
        context = (attn @ v).transpose(1, 2).reshape(b, n, d)
        x = x + self.proj(context)
        x = x + self.mlp(self.norm2(x))
        return x, attn


class MSTKDNet(nn.Module):
    """Compact MST-KDNet: 3D U-Net encoder-decoder with a ViT at the 1/8-resolution bottleneck.

    Input: four sequences (t1, t1ce, t2, flair), absent ones zero-filled; output: WT/TC/ET logits (sigmoid,
    multi-label). Every constructor argument is stored under its own name so that
    :func:`fedbrats.networks.model_spec` and NVFlare's persistor can rebuild the network.

    Args:
        in_channels: input sequences (4).
        out_channels: output regions (3: WT, TC, ET).
        init_filters: channels ``f`` of the full-resolution level; levels have ``f, 2f, 4f, 8f``.
        embed_dim: token size of the ViT (``None``: ``4 * init_filters``); stored resolved.
        vit_depth: number of transformer blocks.
        vit_heads: attention heads; must divide ``embed_dim``.
        mlp_ratio: MLP hidden size of the blocks as a multiple of ``embed_dim``.
        kd_layers: 1-based blocks whose hidden states and attention maps are returned for distillation
            (``None``: every block); stored sorted.
        vit_patch_size: bottleneck voxels per token along each axis (1: one token per bottleneck voxel). Raise
            it for large crops: attention memory grows with the square of the token count.

    Raises:
        ValueError: on a non-positive size, heads that do not divide ``embed_dim``, or ``kd_layers`` outside
            ``1..vit_depth``.
    """

    def __init__(
        self,
        in_channels: int = 4,
        out_channels: int = 3,
        init_filters: int = 8,
        embed_dim: int | None = None,
        vit_depth: int = 4,
        vit_heads: int = 2,
        mlp_ratio: float = 2.0,
        kd_layers: Sequence[int] | None = None,
        vit_patch_size: int = 1,
    ) -> None:
        super().__init__()
        for arg, value in (
            ("in_channels", in_channels),
            ("out_channels", out_channels),
            ("init_filters", init_filters),
            ("vit_depth", vit_depth),
            ("vit_patch_size", vit_patch_size),
        ):
            if value < 1:
                raise ValueError(f"{arg} must be >= 1, got {value}")
        embed_dim = 4 * init_filters if embed_dim is None else embed_dim
        if embed_dim < 1:
            raise ValueError(f"embed_dim must be >= 1, got {embed_dim}")
        layers = list(range(1, vit_depth + 1)) if kd_layers is None else sorted({int(i) for i in kd_layers})
        if not layers or layers[0] < 1 or layers[-1] > vit_depth:
            raise ValueError(f"kd_layers must be non-empty and within 1..vit_depth={vit_depth}, got {kd_layers}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.init_filters = init_filters
        self.embed_dim = embed_dim
        self.vit_depth = vit_depth
        self.vit_heads = vit_heads
        self.mlp_ratio = mlp_ratio
        self.kd_layers = layers
        self.vit_patch_size = vit_patch_size

        f = init_filters
        self.enc1 = nn.Sequential(conv_block(in_channels, f), conv_block(f, f))
        self.enc2 = nn.Sequential(conv_block(f, 2 * f, stride=2), conv_block(2 * f, 2 * f))
        self.enc3 = nn.Sequential(conv_block(2 * f, 4 * f, stride=2), conv_block(4 * f, 4 * f))
        self.enc4 = nn.Sequential(conv_block(4 * f, 8 * f, stride=2), conv_block(8 * f, 8 * f))
        p = vit_patch_size
        self.token_embed = nn.Conv3d(8 * f, embed_dim, kernel_size=p, stride=p)
        self.pos_embed = nn.Conv3d(embed_dim, embed_dim, kernel_size=3, padding=1, groups=embed_dim)
        self.blocks = nn.ModuleList([ViTBlock(embed_dim, vit_heads, mlp_ratio) for _ in range(vit_depth)])
        self.token_norm = nn.LayerNorm(embed_dim)
        self.token_out = (
            nn.ConvTranspose3d(embed_dim, 8 * f, kernel_size=p, stride=p) if p > 1 else nn.Conv3d(embed_dim, 8 * f, 1)
        )
        self.bottleneck = conv_block(8 * f, 8 * f)
        widths = [4 * f, 2 * f, f]  # skip channels, deepest first
        in_widths = [8 * f, 4 * f, 2 * f]
        self.up = nn.ModuleList(
            [nn.ConvTranspose3d(cin, cout, kernel_size=2, stride=2, bias=False) for cin, cout in zip(in_widths, widths)]
        )
        self.dec = nn.ModuleList([conv_block(2 * w, w) for w in widths])
        self.head = nn.Conv3d(f, out_channels, kernel_size=1)

    @property
    def spatial_divisor(self) -> int:
        """Input sides must be multiples of this (three halvings, then the token patches)."""
        return DOWNSAMPLING * self.vit_patch_size

    @property
    def style_channels(self) -> tuple[int, ...]:
        """Channels of the ``style`` feature maps, shallowest first."""
        return (self.init_filters, 2 * self.init_filters)

    def forward(self, image: Tensor, modality_mask: Tensor | None = None) -> dict[str, Any]:  # noqa: D417
        """Segment a batch.

        Args:
            image: (B, in_channels, D, H, W), absent sequences zero-filled; sides multiples of
                :attr:`spatial_divisor`.
            modality_mask: accepted for the package's uniform interface and ignored: the input is already
                zero-filled where a sequence is absent, as the student of MST-KDNet sees it.

        Returns:
            ``{"logits": (B, out_channels, D, H, W), "hidden": [(B, N, embed_dim)] * len(kd_layers),
            "attn": [(B, vit_heads, N, N)] * len(kd_layers), "style": [(B, f, D, H, W), (B, 2f, D/2, H/2, W/2)]}``
            with ``N`` the number of tokens.

        Raises:
            ValueError: wrong channel count or sides that are not multiples of :attr:`spatial_divisor`.
        """
        if image.ndim != 5 or image.shape[1] != self.in_channels:
            raise ValueError(f"image must be (B, {self.in_channels}, D, H, W), got {tuple(image.shape)}")
        if any(s % self.spatial_divisor for s in image.shape[2:]):
            raise ValueError(f"image sides must be multiples of {self.spatial_divisor}, got {tuple(image.shape[2:])}")
        s1 = self.enc1(image)
        s2 = self.enc2(s1)
        s3 = self.enc3(s2)
        bottom = self.enc4(s3)

        grid = self.token_embed(bottom)
        grid = grid + self.pos_embed(grid)
        b, d, gd, gh, gw = grid.shape
        tokens = grid.flatten(2).transpose(1, 2)  # (B, N, D)
        hidden: list[Tensor] = []
        attn: list[Tensor] = []
        for depth, block in enumerate(self.blocks, start=1):
            tokens, weights = block(tokens)
            if depth in self.kd_layers:
                hidden.append(tokens)
                attn.append(weights)
        tokens = self.token_norm(tokens).transpose(1, 2).reshape(b, d, gd, gh, gw)
        # Residual around the transformer (as in the paper): the convolutional bottleneck stays usable while the
        # attention learns, and the student's hidden states are not the only path to the decoder.
        x = self.bottleneck(bottom + self.token_out(tokens))

        for up, dec, skip in zip(self.up, self.dec, (s3, s2, s1)):
            x = dec(torch.cat([up(x), skip], dim=1))
        return {"logits": self.head(x), "hidden": hidden, "attn": attn, "style": [s1, s2]}


class StyleDiscriminator(nn.Module):
    """PatchGAN-like 3D discriminator on a style feature map: one real/fake logit per patch.

    ``num_layers`` stride-2 4x4x4 convolutions with LeakyReLU(0.2) (``base_filters`` doubling), then a 3x3x3
    convolution to one channel. Every constructor argument is stored under its own name.

    Args:
        in_channels: channels of the style feature map.
        base_filters: channels of the first convolution.
        num_layers: stride-2 convolutions; the input sides must be at least ``2**num_layers``.

    Raises:
        ValueError: a non-positive size.
    """

    def __init__(self, in_channels: int, base_filters: int = 16, num_layers: int = 2) -> None:
        super().__init__()
        for arg, value in (("in_channels", in_channels), ("base_filters", base_filters), ("num_layers", num_layers)):
            if value < 1:
                raise ValueError(f"{arg} must be >= 1, got {value}")
        self.in_channels = in_channels
        self.base_filters = base_filters
        self.num_layers = num_layers
        layers: list[nn.Module] = []
        channels = in_channels
        for i in range(num_layers):
            out = base_filters * 2**i
            layers += [nn.Conv3d(channels, out, kernel_size=4, stride=2, padding=1), nn.LeakyReLU(0.2)]
            channels = out
        layers.append(nn.Conv3d(channels, 1, kernel_size=3, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, features: Tensor) -> Tensor:
        """Patch logits (B, 1, d, h, w) of ``features`` (B, in_channels, D, H, W); positive means "teacher"."""
        return self.net(features)


__all__ = ["DOWNSAMPLING", "MSTKDNet", "StyleDiscriminator", "ViTBlock"]
