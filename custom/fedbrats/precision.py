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
import threading

import torch
from torch import nn

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
    """The autocast context of a resolved ``precision`` (``fp32``: no autocast).

    On the CPU, bfloat16 also installs :func:`guard_shallow_cpu_conv3d` (once per process).
    """
    if precision == "bf16":
        if device.type == "cpu":
            guard_shallow_cpu_conv3d()
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


_GUARD_LOCK = threading.Lock()
_guard_installed = False
_guard_state = threading.local()  # the guarded convolutions in progress in this thread (a stack)


def needs_float32_conv3d(module: nn.Module, image: torch.Tensor) -> bool:
    """Whether a 3D (transposed) convolution on ``image`` must run in float32 under CPU bfloat16 autocast.

    torch 2.13's oneDNN bfloat16 kernels return NaN or Inf, now and then, in the *weight gradient* of a 3D convolution
    whose input is shallower than its kernel along the first spatial axis (e.g. a 3x3x3 convolution on a 2-voxel-deep
    feature map, as a 16^3 crop reaches after three down-samplings), while the forward pass and the input gradient
    are finite. Measured (``benchmarks/bf16_conv3d.py``, 100 random trials per shape, AVX-512 BF16/AMX CPU): 12-18 %
    of such steps had non-finite weight gradients; none with depth >= kernel depth or with this guard. One such
    step puts NaN into the weights; the site's update is then rejected.
    """
    if not isinstance(module, (nn.Conv3d, nn.ConvTranspose3d)) or image.dim() != 5:
        return False
    return image.device.type == "cpu" and torch.is_autocast_enabled("cpu") and image.shape[2] < module.kernel_size[0]


def _float32_pre_hook(module: nn.Module, args: tuple) -> tuple | None:
    if not args or not isinstance(args[0], torch.Tensor) or not needs_float32_conv3d(module, args[0]):
        return None
    stack = getattr(_guard_state, "stack", None)
    if stack is None:
        stack = _guard_state.stack = []
    stack.append(module)
    torch.set_autocast_enabled("cpu", False)
    return (args[0].float(), *args[1:])


def _float32_post_hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
    stack = getattr(_guard_state, "stack", None)
    if stack and stack[-1] is module:
        stack.pop()
        torch.set_autocast_enabled("cpu", True)


def guard_shallow_cpu_conv3d() -> None:
    """Run the 3D convolutions that :func:`needs_float32_conv3d` names in float32, for every module of this process
    (global forward hooks, installed once; other modules and all other convolutions are untouched, and outside CPU
    bfloat16 autocast the hooks do nothing). Such feature maps are tiny, so the cost is negligible."""
    global _guard_installed
    with _GUARD_LOCK:
        if _guard_installed:
            return
        nn.modules.module.register_module_forward_pre_hook(_float32_pre_hook)
        nn.modules.module.register_module_forward_hook(_float32_post_hook)
        _guard_installed = True


__all__ = [
    "PRECISIONS",
    "autocast",
    "cpu_has_native_bf16",
    "guard_shallow_cpu_conv3d",
    "needs_float32_conv3d",
    "resolve_precision",
]
