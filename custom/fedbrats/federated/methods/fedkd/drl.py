"""Disentangled representation learning (DRL) losses of the ``fedkd`` method.

The network gives, per case and per available sequence, a spatial *content* code (meant to describe the
anatomy and the tumour, whatever the sequence) and a *style* vector (meant to describe the sequence's
contrast). The paper names DRL without publishing its losses; this project uses three:

* :func:`content_consistency_loss`: the content codes of the sequences of one case should agree;
* :func:`content_style_independence_loss`: content should carry no information that style carries
  (squared cross-correlation between pooled content and style, see its docstring for the choice);
* :func:`style_separation_loss`: style vectors of different sequences should differ (hinge on cosine).

Every loss takes a (B, M) modality mask and ignores absent sequences completely (their entries may hold
anything, even NaN).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedbrats.losses.common import attached_zero


def _bool_mask(mask: Tensor, batch: int, n_mod: int, arg: str = "mask") -> Tensor:
    """Check a (B, M) modality mask and return it as bool."""
    if mask.ndim != 2 or tuple(mask.shape) != (batch, n_mod):
        raise ValueError(f"{arg} must have shape ({batch}, {n_mod}), got {tuple(mask.shape)}")
    return mask if mask.dtype == torch.bool else mask > 0.5


def content_consistency_loss(content: Tensor, mask: Tensor, eps: float = 1e-6) -> Tensor:
    """Agreement between the content codes of a case's available sequences.

    Each available sequence's content is L2-normalised along channels at every voxel; the case's reference is
    the mean of those normalised codes over its available sequences. The loss of a case is the mean over its
    available sequences of the squared Euclidean distance to the reference, averaged over voxels. The batch
    loss is the mean over cases with at least two available sequences (a case with one sequence agrees with
    itself trivially and is left out).

    Example: one voxel, contents ``(1, 0)`` and ``(0, 1)``: the reference is ``(0.5, 0.5)``, both distances
    are ``0.5``, so the loss is ``0.5``.

    Args:
        content: (B, M, C, d, h, w) per-sequence content codes (any number of trailing spatial dims >= 0).
        mask: (B, M) bool or 0/1 float, ``True`` where the sequence is available.
        eps: guard of the L2 normalisation.

    Returns:
        Scalar loss; 0 (attached to the graph) when no case has two available sequences.

    Raises:
        ValueError: if ``content`` has fewer than 3 dims or ``mask`` does not match its first two.
    """
    if content.ndim < 3:
        raise ValueError(f"content must have shape (B, M, C, ...), got {tuple(content.shape)}")
    batch, n_mod = content.shape[:2]
    avail = _bool_mask(mask, batch, n_mod)
    spatial_ones = (1,) * (content.ndim - 2)
    avail_b = avail.view(batch, n_mod, *spatial_ones)
    # Zero absent entries before any arithmetic, so that NaN there reaches neither the loss nor the gradient.
    z = F.normalize(torch.where(avail_b, content, torch.zeros_like(content)), dim=2, eps=eps)
    count = avail.sum(dim=1)  # (B,)
    reference = z.sum(dim=1, keepdim=True) / count.clamp(min=1).view(batch, 1, *spatial_ones).to(z.dtype)
    dist = ((z - reference) ** 2).sum(dim=2)  # (B, M, spatial...) squared distance per voxel
    dist = dist.flatten(2).mean(dim=2) if dist.ndim > 2 else dist  # (B, M) mean over voxels
    dist = torch.where(avail, dist, torch.zeros_like(dist))
    valid = count >= 2
    if not bool(valid.any()):
        return attached_zero(content)
    per_case = dist.sum(dim=1) / count.clamp(min=1).to(dist.dtype)
    return per_case[valid].mean()


def _pool(content: Tensor) -> Tensor:
    """Global average pooling of (B, M, C, ...) content to (B, M, C)."""
    return content.flatten(3).mean(dim=3) if content.ndim > 3 else content


def content_style_independence_loss(
    content: Tensor,
    style: Tensor,
    mask: Tensor,
    eps: float = 1e-5,
    memory: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """Penalty on any linear dependence between (pooled) content and style.

    Choice: the squared cross-correlation. The globally pooled content vectors ``c`` (C dims) and the style
    vectors ``s`` (S dims) of all available (case, sequence) pairs of the batch form N samples; each dimension
    is standardised over those samples (mean 0, variance 1), and the loss is the mean over the C x S entries
    of the squared correlation matrix ``c_std.T @ s_std / N``. Correlation rather than covariance, so the
    network cannot satisfy the loss by shrinking the features; its values lie in [0, 1]. It is 0 when content
    and style are uncorrelated, 1 when every content dimension is a linear function of every style dimension.

    A batch alone holds few samples (at most cases x sequences): with two, every standardised dimension is +-1 and
    the loss is 1 whatever the features, with no gradient; for independent features it sits near 1/(N-1). With
    ``memory`` (pooled content and style of earlier batches, constants), the statistics are taken over the batch
    and the memory together, so the term has a gradient at every batch size and estimates the dependence over
    many samples; the gradient reaches the batch's features only.

    Args:
        content: (B, M, C, ...) per-sequence content (pooled over the trailing spatial dims if present).
        style: (B, M, S) per-sequence style vectors.
        mask: (B, M), ``True`` where the sequence is available.
        eps: added to the variances (a constant dimension then has correlation 0, not NaN).
        memory: optional ``(content (K, C), style (K, S))`` samples of earlier batches, pooled, detached.

    Returns:
        Scalar loss; 0 (attached to the graph) with fewer than two samples (batch and memory together).

    Raises:
        ValueError: on mismatched shapes.
    """
    if content.ndim < 3:
        raise ValueError(f"content must have shape (B, M, C, ...), got {tuple(content.shape)}")
    if style.ndim != 3 or tuple(style.shape[:2]) != tuple(content.shape[:2]):
        raise ValueError(
            f"style must have shape ({content.shape[0]}, {content.shape[1]}, S) to match content, "
            f"got {tuple(style.shape)}"
        )
    avail = _bool_mask(mask, content.shape[0], content.shape[1])
    c = _pool(content)[avail]  # (N, C)
    s = style[avail]  # (N, S)
    if memory is not None and memory[0].shape[0]:
        past_c, past_s = memory
        if past_c.shape[1:] != c.shape[1:] or past_s.shape[1:] != s.shape[1:] or len(past_c) != len(past_s):
            raise ValueError(
                f"memory must hold (K, {c.shape[1]}) content and (K, {s.shape[1]}) style samples, got "
                f"{tuple(past_c.shape)} and {tuple(past_s.shape)}"
            )
        c = torch.cat([c, past_c.to(c)], dim=0)
        s = torch.cat([s, past_s.to(s)], dim=0)
    if c.shape[0] < 2 or not bool(avail.any()):
        return attached_zero(content, style)
    c = (c - c.mean(dim=0)) / torch.sqrt(c.var(dim=0, unbiased=False) + eps)
    s = (s - s.mean(dim=0)) / torch.sqrt(s.var(dim=0, unbiased=False) + eps)
    corr = c.t() @ s / c.shape[0]
    return (corr**2).mean()


def style_separation_loss(style: Tensor, mask: Tensor, margin: float = 0.0, eps: float = 1e-8) -> Tensor:
    """Style vectors of different sequences should point in different directions.

    Over every pair of available entries ``(b, m)`` and ``(b', n)`` of the batch with ``m != n`` (same case
    or not), the loss is the mean of ``relu(cos(s_bm, s_b'n) - margin)``. Cheaper than a modality classifier
    and with nothing to train; with ``margin = 0`` it pushes styles of different sequences to be orthogonal
    or opposed.

    Args:
        style: (B, M, S) per-sequence style vectors.
        mask: (B, M), ``True`` where the sequence is available.
        margin: cosine similarity tolerated between different sequences, in [-1, 1].
        eps: guard of the normalisation.

    Returns:
        Scalar loss; 0 (attached to the graph) when the batch holds only one sequence.

    Raises:
        ValueError: on a wrong ``style`` or ``mask`` shape.
    """
    if style.ndim != 3:
        raise ValueError(f"style must have shape (B, M, S), got {tuple(style.shape)}")
    batch, n_mod = style.shape[:2]
    avail = _bool_mask(mask, batch, n_mod)
    modality = torch.arange(n_mod, device=style.device).expand(batch, n_mod)[avail]  # (N,)
    vectors = F.normalize(style[avail], dim=1, eps=eps)  # (N, S)
    different = modality.unsqueeze(0) != modality.unsqueeze(1)  # symmetric, False on the diagonal
    if not bool(different.any()):
        return attached_zero(style)
    cos = vectors @ vectors.t()
    return F.relu(cos[different] - margin).mean()


class DRLLoss(nn.Module):
    """Weighted sum of the DRL losses.

    ``total = w_consistency * consistency + w_independence * independence + w_style * style``; a term whose
    weight is 0 is not computed.

    Args:
        w_consistency: weight of :func:`content_consistency_loss`.
        w_independence: weight of :func:`content_style_independence_loss`.
        w_style: weight of :func:`style_separation_loss`.
        style_margin: ``margin`` of :func:`style_separation_loss`.
        memory_size: pooled (content, style) samples of earlier batches kept for the independence term's
            statistics (0: the batch alone); see :func:`content_style_independence_loss`.

    Raises:
        ValueError: on a negative weight or memory size.
    """

    def __init__(
        self,
        w_consistency: float = 1.0,
        w_independence: float = 0.1,
        w_style: float = 0.1,
        style_margin: float = 0.0,
        memory_size: int = 64,
    ) -> None:
        super().__init__()
        for name, value in (
            ("w_consistency", w_consistency),
            ("w_independence", w_independence),
            ("w_style", w_style),
            ("memory_size", memory_size),
        ):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        self.w_consistency = w_consistency
        self.w_independence = w_independence
        self.w_style = w_style
        self.style_margin = style_margin
        self.memory_size = int(memory_size)
        self.reset_memory()

    def reset_memory(self) -> None:
        """Forget the samples of earlier batches (e.g. when new global weights arrive)."""
        self._memory: tuple[Tensor, Tensor] | None = None

    def _remember(self, content: Tensor, style: Tensor, mask: Tensor) -> None:
        if self.memory_size == 0:
            return
        avail = _bool_mask(mask, content.shape[0], content.shape[1])
        c, s = _pool(content)[avail].detach().float(), style[avail].detach().float()
        if self._memory is not None:
            c, s = torch.cat([c, self._memory[0]]), torch.cat([s, self._memory[1]])
        self._memory = (c[: self.memory_size], s[: self.memory_size])

    def terms(self, content: Tensor, style: Tensor, mask: Tensor) -> dict[str, Tensor]:
        """Each weighted term and their sum.

        Args:
            content: (B, M, C, ...) per-sequence content (``outputs["content"]`` of the network).
            style: (B, M, S) per-sequence style (``outputs["style"]``).
            mask: (B, M) modality mask.

        Returns:
            Dict with the unweighted ``"consistency"``, ``"independence"``, ``"style"`` and the weighted
            ``"total"``; terms with weight 0 are reported as 0.
        """
        zero = attached_zero(content, style)
        consistency = content_consistency_loss(content, mask) if self.w_consistency > 0 else zero
        independence = zero
        if self.w_independence > 0:
            independence = content_style_independence_loss(content, style, mask, memory=self._memory)
            self._remember(content, style, mask)
        separation = style_separation_loss(style, mask, margin=self.style_margin) if self.w_style > 0 else zero
        total = self.w_consistency * consistency + self.w_independence * independence + self.w_style * separation
        return {"consistency": consistency, "independence": independence, "style": separation, "total": total}

    def forward(self, content: Tensor, style: Tensor, mask: Tensor) -> Tensor:
        """Weighted DRL loss (see :meth:`terms`)."""
        return self.terms(content, style, mask)["total"]
