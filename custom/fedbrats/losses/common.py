"""Helpers every loss of the package shares."""

from __future__ import annotations

import torch
from torch import Tensor


def attached_zero(*tensors: Tensor) -> Tensor:
    """A scalar 0 that is part of the graph of ``tensors``, so that ``backward()`` works on an empty loss.

    Args:
        tensors: at least one tensor; the result has their dtype/device and zero gradient towards them.

    Returns:
        Scalar tensor 0.
    """
    zero = tensors[0].new_zeros(())
    for t in tensors:
        # where(): a plain t.sum() * 0 would turn a NaN in an ignored entry into a NaN loss.
        zero = zero + torch.where(torch.zeros_like(t, dtype=torch.bool), t, torch.zeros_like(t)).sum()
    return zero


__all__ = ["attached_zero"]
