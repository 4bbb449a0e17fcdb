"""Modality-aware segmentation network of the ``fedkd`` method: one encoder per MRI sequence, fused content.

The network follows the DRL (disentangled representation learning) idea of the method: each sequence has its
own light 3D encoder whose bottleneck is split into a *content* code (meant to be shared by all sequences, the
tumour structure) and a *style* vector (specific to the sequence, its contrast). Only content is fused, over
the sequences that are actually available for each case, and a shared decoder turns the fused content plus the
fused skip features into WT/TC/ET logits.

Missing sequences are skipped, not zero-filled: a sequence's encoder only ever sees the cases that have it, so
whatever lies in an absent channel (zeros, noise, NaN) cannot change the output, and an encoder gets no
gradient from cases that lack its sequence. This is what lets the server average each sequence's encoder over
the sites that have that sequence only (see :func:`modality_parameter_prefixes`).

Parameter names:

* modality-specific: ``encoders.<i>.`` with ``i`` the index of the sequence in
  :data:`fedbrats.constants.MODALITIES` (the per-sequence style head lives inside the encoder, as
  ``encoders.<i>.style_head.``);
* shared: ``content_head.`` (projects every sequence's bottleneck into the common content space),
  ``attention.`` (only with ``fusion="attention"``), ``decoder.``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from fedbrats.constants import MODALITIES
from fedbrats.networks.blocks import conv_block

#: Downsampling factor between the input and the bottleneck (three stride-2 stages).
DOWNSAMPLING: int = 8

#: Accepted values of ``ModalityAwareSegNet(fusion=...)``.
FUSIONS: tuple[str, ...] = ("mean", "attention")


def modality_parameter_prefixes(modalities: Sequence[str] = MODALITIES) -> dict[str, str]:
    """Parameter-name prefix of each sequence's private (modality-specific) weights.

    The server uses this to aggregate ``encoders.<i>.*`` only over the sites that have sequence ``i``; every
    parameter that matches no prefix is shared and aggregated over all sites.

    Args:
        modalities: sequence names in channel order (the canonical order by default).

    Returns:
        Mapping such as ``{"t1": "encoders.0.", "t1ce": "encoders.1.", ...}``.
    """
    return {name: f"encoders.{i}." for i, name in enumerate(modalities)}


def parameter_modality(name: str, modalities: Sequence[str] = MODALITIES) -> str | None:
    """Sequence that owns a parameter (state-dict key), or ``None`` for a shared parameter.

    Args:
        name: a parameter or buffer name of :class:`ModalityAwareSegNet`, e.g. ``"encoders.2.stages.0.0.weight"``.
        modalities: sequence names in channel order.

    Returns:
        The sequence name, e.g. ``"t2"``, or ``None`` when the parameter is shared.
    """
    for modality, prefix in modality_parameter_prefixes(modalities).items():
        if name.startswith(prefix):
            return modality
    return None


class SequenceEncoder(nn.Module):
    """Light 3D encoder of one MRI sequence: four levels, total downsampling 8, plus its style head.

    Levels have ``f, 2f, 4f, 4f`` channels (``f = init_filters``); the first three are returned as skips, the
    last is the bottleneck. The style head (1x1x1 conv then global average pooling) gives the sequence's style
    vector.

    Args:
        init_filters: channels of the full-resolution level.
        style_channels: size of the style vector.
    """

    def __init__(self, init_filters: int, style_channels: int) -> None:
        super().__init__()
        f = init_filters
        self.stages = nn.ModuleList(
            [
                nn.Sequential(conv_block(1, f), conv_block(f, f)),
                nn.Sequential(conv_block(f, 2 * f, stride=2), conv_block(2 * f, 2 * f)),
                nn.Sequential(conv_block(2 * f, 4 * f, stride=2), conv_block(4 * f, 4 * f)),
                nn.Sequential(conv_block(4 * f, 4 * f, stride=2), conv_block(4 * f, 4 * f)),
            ]
        )
        self.style_head = nn.Conv3d(4 * f, style_channels, kernel_size=1)

    @property
    def bottleneck_channels(self) -> int:
        """Channels of the bottleneck feature."""
        return self.stages[-1][-1][0].out_channels

    def forward(self, x: Tensor) -> tuple[list[Tensor], Tensor, Tensor]:
        """Encode one sequence.

        Args:
            x: images of shape (N, 1, D, H, W).

        Returns:
            ``(skips, bottleneck, style)``: the skips at full, 1/2 and 1/4 resolution, the bottleneck at 1/8
            resolution, and the style vectors of shape (N, style_channels).
        """
        skips: list[Tensor] = []
        for stage in self.stages[:-1]:
            x = stage(x)
            skips.append(x)
        bottleneck = self.stages[-1](x)
        style = self.style_head(bottleneck).mean(dim=(2, 3, 4))
        return skips, bottleneck, style


class SharedDecoder(nn.Module):
    """U-Net style decoder: three transposed-conv upsamplings, each followed by a block on ``[up, skip]``.

    Args:
        content_channels: channels of the fused bottleneck content.
        init_filters: ``f`` of the encoders (skips have ``f, 2f, 4f`` channels).
        out_channels: number of output logits.
    """

    def __init__(self, content_channels: int, init_filters: int, out_channels: int) -> None:
        super().__init__()
        f = init_filters
        widths = [4 * f, 2 * f, f]  # channels of the skips, deepest first
        in_widths = [content_channels, 4 * f, 2 * f]
        self.up = nn.ModuleList(
            [nn.ConvTranspose3d(cin, cout, kernel_size=2, stride=2, bias=False) for cin, cout in zip(in_widths, widths)]
        )
        self.blocks = nn.ModuleList([conv_block(2 * w, w) for w in widths])
        self.head = nn.Conv3d(f, out_channels, kernel_size=1)

    def forward(self, content: Tensor, skips: list[Tensor]) -> Tensor:
        """Decode fused content with fused skips (full, 1/2, 1/4 resolution) into logits at full resolution."""
        x = content
        for up, block, skip in zip(self.up, self.blocks, reversed(skips)):
            x = block(torch.cat([up(x), skip], dim=1))
        return self.head(x)


class ModalityAwareSegNet(nn.Module):
    """Per-sequence encoders, DRL content/style heads, masked fusion over available sequences, shared decoder.

    Modality-specific parameters are those whose names start with ``encoders.<i>.`` (``i`` = index of the
    sequence in :data:`fedbrats.constants.MODALITIES`; this includes the per-sequence style head
    ``encoders.<i>.style_head.``). Shared parameters start with ``content_head.``, ``attention.`` (attention
    fusion only) or ``decoder.``. :func:`modality_parameter_prefixes` gives the per-sequence prefixes.

    A sequence that no case of the batch has is not encoded at all; a sequence that some cases lack is encoded
    only for the cases that have it. Absent sequences therefore never influence the output and their encoder
    receives no gradient from those cases. Style vectors are returned for the DRL losses but never reach the
    decoder: only content is fused.

    Every constructor argument is stored as an attribute of the same name (NVFlare rebuilds the model from
    them); ``content_channels`` and ``style_channels`` are stored resolved to their defaults.

    Args:
        in_modalities: number of input sequences (channels), one encoder each.
        out_channels: number of output logits (WT, TC, ET: multi-label, use a sigmoid).
        init_filters: channels of the full-resolution level; levels have ``f, 2f, 4f, 4f`` channels.
        content_channels: channels of the content code; ``None`` means ``4 * init_filters``.
        style_channels: size of each style vector; ``None`` means ``init_filters``.
        fusion: ``"mean"`` (masked mean over available sequences) or ``"attention"`` (masked voxel-wise softmax
            attention over available sequences) for the bottleneck content; skips always use the masked mean.
        dropout_prob: 3D channel dropout on the fused content before decoding.

    Raises:
        ValueError: on a non-positive size, an unknown ``fusion`` or a dropout probability outside [0, 1).
    """

    def __init__(
        self,
        in_modalities: int = 4,
        out_channels: int = 3,
        init_filters: int = 8,
        content_channels: int | None = None,
        style_channels: int | None = None,
        fusion: str = "mean",
        dropout_prob: float = 0.0,
    ) -> None:
        super().__init__()
        content_channels = 4 * init_filters if content_channels is None else content_channels
        style_channels = init_filters if style_channels is None else style_channels
        for arg, value in (
            ("in_modalities", in_modalities),
            ("out_channels", out_channels),
            ("init_filters", init_filters),
            ("content_channels", content_channels),
            ("style_channels", style_channels),
        ):
            if value < 1:
                raise ValueError(f"{arg} must be a positive integer, got {value}")
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {list(FUSIONS)}, got {fusion!r}")
        if not 0.0 <= dropout_prob < 1.0:
            raise ValueError(f"dropout_prob must be in [0, 1), got {dropout_prob}")
        self.in_modalities = in_modalities
        self.out_channels = out_channels
        self.init_filters = init_filters
        self.content_channels = content_channels
        self.style_channels = style_channels
        self.fusion = fusion
        self.dropout_prob = dropout_prob

        self.encoders = nn.ModuleList([SequenceEncoder(init_filters, style_channels) for _ in range(in_modalities)])
        bottleneck_channels = self.encoders[0].bottleneck_channels
        # Shared across sequences: every sequence's bottleneck is projected into the same content space, which
        # is what the consistency loss compares and what the fusion averages.
        self.content_head = nn.Conv3d(bottleneck_channels, content_channels, kernel_size=1)
        if fusion == "attention":
            hidden = max(content_channels // 2, 1)
            self.attention = nn.Sequential(
                nn.Conv3d(content_channels, hidden, kernel_size=1),
                nn.LeakyReLU(0.01, inplace=True),
                nn.Conv3d(hidden, 1, kernel_size=1),
            )
        self.dropout = nn.Dropout3d(dropout_prob) if dropout_prob > 0 else nn.Identity()
        self.decoder = SharedDecoder(content_channels, init_filters, out_channels)

    def _check_inputs(self, image: Tensor, modality_mask: Tensor | None) -> Tensor:
        """Validate the inputs and return the modality mask as a (B, M) bool tensor."""
        if image.ndim != 5 or image.shape[1] != self.in_modalities:
            raise ValueError(f"image must have shape (B, {self.in_modalities}, D, H, W), got {tuple(image.shape)}")
        spatial = tuple(image.shape[2:])
        if any(s % DOWNSAMPLING != 0 for s in spatial):
            raise ValueError(f"image spatial size must be divisible by {DOWNSAMPLING}, got shape {tuple(image.shape)}")
        if all(s == DOWNSAMPLING for s in spatial):
            # InstanceNorm cannot normalise a single bottleneck voxel.
            raise ValueError(f"image spatial size must exceed {DOWNSAMPLING}^3, got shape {tuple(image.shape)}")
        batch = image.shape[0]
        if modality_mask is None:
            return torch.ones(batch, self.in_modalities, dtype=torch.bool, device=image.device)
        mask = modality_mask.to(image.device)
        if mask.ndim == 1:
            mask = mask.unsqueeze(0)
        if mask.ndim != 2 or mask.shape[1] != self.in_modalities or mask.shape[0] not in (1, batch):
            raise ValueError(
                f"modality_mask must have shape ({batch}, {self.in_modalities}) (or (1, {self.in_modalities}) "
                f"to broadcast), got {tuple(modality_mask.shape)}"
            )
        mask = mask if mask.dtype == torch.bool else mask > 0.5
        mask = mask.expand(batch, -1)
        empty = (~mask.any(dim=1)).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"modality_mask rows {empty} have no available sequence")
        return mask

    def forward(self, image: Tensor, modality_mask: Tensor | None = None) -> dict[str, Tensor]:
        """Segment a batch, encoding only the available sequences of each case.

        Args:
            image: (B, M, D, H, W) with channels in :data:`MODALITIES` order; D, H, W divisible by 8. Values in
                absent channels are ignored.
            modality_mask: (B, M) bool or 0/1 float, ``True`` where the sequence is available; (M,) or (1, M)
                is broadcast over the batch; ``None`` means every sequence is available.

        Returns:
            A dict with ``"logits"`` (B, out_channels, D, H, W); ``"content"`` (B, M, Cc, D/8, H/8, W/8) per
            sequence, zeros where absent; ``"style"`` (B, M, Cs), zeros where absent; ``"fused"``
            (B, Cc, D/8, H/8, W/8), the fused content before dropout; ``"modality_mask"`` (B, M) float.

        Raises:
            ValueError: on a wrong image or mask shape, a spatial size not divisible by 8, or a case with no
                available sequence.
        """
        mask = self._check_inputs(image, modality_mask)
        batch = image.shape[0]
        skip_sums: list[Tensor | None] = [None, None, None]
        contents: list[Tensor] = []
        styles: list[Tensor] = []
        bottleneck_shape = tuple(s // DOWNSAMPLING for s in image.shape[2:])
        for i, encoder in enumerate(self.encoders):
            idx = mask[:, i].nonzero().flatten()
            if idx.numel() == 0:
                # Nobody has this sequence: do not run its encoder (no compute, no gradient).
                contents.append(image.new_zeros(batch, self.content_channels, *bottleneck_shape))
                styles.append(image.new_zeros(batch, self.style_channels))
                continue
            # Encode only the cases that have the sequence, then scatter back: absent cases get exact zeros,
            # never a function of whatever lies in their channel.
            skips, bottleneck, style = encoder(image[idx, i : i + 1])
            content = self.content_head(bottleneck)
            contents.append(content.new_zeros(batch, *content.shape[1:]).index_copy(0, idx, content))
            styles.append(style.new_zeros(batch, *style.shape[1:]).index_copy(0, idx, style))
            for level, skip in enumerate(skips):
                total = skip_sums[level]
                if total is None:
                    total = skip.new_zeros(batch, *skip.shape[1:])
                skip_sums[level] = total.index_add(0, idx, skip)

        content_all = torch.stack(contents, dim=1)  # (B, M, Cc, d, h, w)
        style_all = torch.stack(styles, dim=1)  # (B, M, Cs)
        count = mask.sum(dim=1).to(content_all.dtype)  # >= 1, checked
        fused_skips = [s / count.view(batch, 1, 1, 1, 1) for s in skip_sums if s is not None]
        fused = self._fuse_content(content_all, mask, count)
        logits = self.decoder(self.dropout(fused), fused_skips)
        return {
            "logits": logits,
            "content": content_all,
            "style": style_all,
            "fused": fused,
            "modality_mask": mask.to(image.dtype if image.is_floating_point() else torch.float32),
        }

    def _fuse_content(self, content: Tensor, mask: Tensor, count: Tensor) -> Tensor:
        """Fuse (B, M, Cc, d, h, w) content over the available sequences into (B, Cc, d, h, w)."""
        batch, n_mod = mask.shape
        if self.fusion == "mean":
            # Absent entries are exact zeros, so the sum only holds available sequences.
            return content.sum(dim=1) / count.view(batch, 1, 1, 1, 1)
        scores = self.attention(content.flatten(0, 1)).view(batch, n_mod, 1, *content.shape[3:])
        # -inf gives an absent sequence a weight of exactly 0; every row has one finite score (checked).
        scores = scores.masked_fill(~mask.view(batch, n_mod, 1, 1, 1, 1), float("-inf"))
        weights = torch.softmax(scores, dim=1)
        return (weights * content).sum(dim=1)

    def predict(self, image: Tensor, modality_mask: Tensor | None = None) -> Tensor:
        """Logits only, for callers that need a function returning a tensor (e.g. sliding-window inference).

        Args:
            image: (B, M, D, H, W) input.
            modality_mask: as in :meth:`forward`; a (M,) or (1, M) mask is broadcast over the window batch.

        Returns:
            Logits of shape (B, out_channels, D, H, W).
        """
        return self.forward(image, modality_mask)["logits"]


__all__ = [
    "DOWNSAMPLING",
    "FUSIONS",
    "ModalityAwareSegNet",
    "SequenceEncoder",
    "SharedDecoder",
    "modality_parameter_prefixes",
    "parameter_modality",
]
