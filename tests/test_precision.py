"""fedbrats.precision: resolving the precision option and the float32 guard for shallow 3D convolutions."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedbrats.precision import autocast, needs_float32_conv3d, resolve_precision

CPU = torch.device("cpu")


def test_resolve_precision_rejects_unknown_values() -> None:
    assert resolve_precision("fp32", CPU) == "fp32" and resolve_precision("bf16", CPU) == "bf16"
    assert resolve_precision("auto", CPU) in ("fp32", "bf16")
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("fp16", CPU)


def test_shallow_conv3d_runs_in_float32_under_cpu_bf16_autocast() -> None:
    shallow, deep = torch.randn(1, 4, 2, 6, 6), torch.randn(1, 4, 6, 6, 6)
    conv, transposed, pointwise = (
        nn.Conv3d(4, 4, 3, padding=1),
        nn.ConvTranspose3d(4, 4, 3, padding=1),
        nn.Conv3d(4, 4, 1),
    )
    assert not needs_float32_conv3d(conv, shallow)  # outside autocast nothing is guarded
    with autocast("bf16", CPU):
        assert needs_float32_conv3d(conv, shallow) and needs_float32_conv3d(transposed, shallow)
        assert not needs_float32_conv3d(conv, deep) and not needs_float32_conv3d(pointwise, shallow)
        assert conv(shallow).dtype == torch.float32
        assert transposed(shallow).dtype == torch.float32
        # autocast is back on for what follows, and untouched elsewhere
        assert torch.is_autocast_enabled("cpu")
        assert pointwise(shallow).dtype == torch.bfloat16 and conv(deep).dtype == torch.bfloat16
    assert not torch.is_autocast_enabled("cpu")
    assert conv(shallow).dtype == torch.float32


def test_shallow_conv3d_weight_gradients_stay_finite_under_bf16() -> None:
    """torch 2.13's oneDNN bf16 kernels gave NaN/Inf weight gradients in 12-18 % of such steps (AVX-512 BF16/AMX CPUs);
    60 steps without the guard fail with probability > 0.8 there."""
    torch.manual_seed(0)
    for _ in range(60):
        conv = nn.Conv3d(32, 32, 3, padding=1, bias=False)
        with autocast("bf16", CPU):
            out = conv(torch.randn(2, 32, 2, 6, 6))
        out.float().sum().backward()
        assert torch.isfinite(conv.weight.grad).all()


def test_guard_survives_a_failing_forward() -> None:
    """A guarded convolution that raises leaves autocast as the enclosing context restores it."""
    conv = nn.Conv3d(4, 4, 3, padding=1)
    with autocast("bf16", CPU):
        with pytest.raises(RuntimeError):
            conv(torch.randn(1, 3, 2, 6, 6))  # wrong channel count
    assert not torch.is_autocast_enabled("cpu")
    with autocast("bf16", CPU):
        assert torch.is_autocast_enabled("cpu") and conv(torch.randn(1, 4, 2, 6, 6)).dtype == torch.float32
