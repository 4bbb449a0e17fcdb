"""Mixed precision for training and inference: bfloat16 autocast where the hardware runs it natively.

bfloat16 keeps float32's exponent range, so unlike float16 it needs no loss scaling; weights, optimiser state
and the losses stay float32 (autocast only lowers the matmuls and convolutions). On CPUs with AVX-512 BF16 or
AMX one SegResNet step runs about three times faster (measured in docs/results.md); on CPUs without them
bfloat16 is emulated and slower, so ``auto`` keeps float32 there.
"""

from __future__ import annotations

import contextlib
import functools
import logging

import torch

logger = logging.getLogger(__name__)

#: Values of the ``precision`` option.
PRECISIONS = ("auto", "fp32", "bf16")


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX-512 BF16 or AMX-BF16 in ``/proc/cpuinfo``)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """``fp32`` or ``bf16`` for ``precision`` on ``device``.

    ``auto`` means bfloat16 where it is native (CUDA devices that support it, CPUs with AVX-512 BF16/AMX) and
    float32 elsewhere. An explicit ``bf16`` is honoured everywhere (emulated where not native).

    Raises:
        ValueError: ``precision`` is not one of :data:`PRECISIONS`.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The autocast context of a resolved ``precision`` (``fp32``: no autocast)."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


__all__ = ["PRECISIONS", "autocast", "cpu_has_native_bf16", "resolve_precision"]
