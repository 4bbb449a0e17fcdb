"""How often a 3D convolution's weight gradient comes out NaN/Inf under CPU bfloat16 autocast, by input shape.

The measurement behind :func:`fedbrats.precision.needs_float32_conv3d` (docs/results.md): each trial builds a
fresh convolution, runs one forward pass under ``torch.autocast("cpu", dtype=torch.bfloat16)`` with the float32
guard off or on, and checks the weight gradient. The guard is process-wide once installed, so ``--guard`` runs
measure it only.

Usage::

    python benchmarks/bf16_conv3d.py --trials 100 --out OUT/bf16_conv3d.json
    python benchmarks/bf16_conv3d.py --trials 100 --guard --out OUT/bf16_conv3d_guarded.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

logger = logging.getLogger("benchmarks.bf16_conv3d")

#: (name, module factory, input shape without batch): shallow inputs (depth below the kernel's) and deeper controls.
CASES: tuple[tuple[str, Any, tuple[int, ...]], ...] = (
    ("conv3 depth2 2x2", lambda: nn.Conv3d(64, 64, 3, padding=1, bias=False), (64, 2, 2, 2)),
    ("conv3 depth2 8x8", lambda: nn.Conv3d(16, 16, 3, padding=1, bias=False), (16, 2, 8, 8)),
    ("conv5 depth3", lambda: nn.Conv3d(32, 32, 5, padding=2, bias=False), (32, 3, 6, 6)),
    ("convT3 depth2", lambda: nn.ConvTranspose3d(32, 32, 3, padding=1), (32, 2, 4, 4)),
    ("conv3 depth3 (control)", lambda: nn.Conv3d(32, 32, 3, padding=1, bias=False), (32, 3, 7, 5)),
    ("conv3 depth4 (control)", lambda: nn.Conv3d(64, 64, 3, padding=1, bias=False), (64, 4, 4, 4)),
)


def nonfinite_rate(factory: Any, shape: Sequence[int], trials: int, batch: int = 2) -> float:
    """Fraction of ``trials`` whose weight gradient holds NaN or Inf."""
    bad = 0
    for _ in range(trials):
        conv = factory()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = conv(torch.randn(batch, *shape))
        out.float().sum().backward()
        bad += int(not torch.isfinite(conv.weight.grad).all())
    return bad / trials


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=100, help="trials per shape")
    p.add_argument("--guard", action="store_true", help="install fedbrats' float32 guard first")
    p.add_argument("--out", required=True, help="JSON file to write (refused if it exists)")
    a = p.parse_args(argv)
    if a.trials < 1:
        p.error(f"--trials must be >= 1, got {a.trials}")
    if os.path.exists(a.out):
        p.error(f"--out {a.out} exists; choose another file")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    if a.guard:
        from fedbrats.precision import guard_shallow_cpu_conv3d

        guard_shallow_cpu_conv3d()
    rates = {}
    for name, factory, shape in CASES:
        rates[name] = nonfinite_rate(factory, shape, a.trials)
        logger.info("%s %s: %.0f %% of %d trials non-finite", name, list(shape), 100 * rates[name], a.trials)
    result = {"torch": torch.__version__, "trials": a.trials, "guard": a.guard, "nonfinite_rate": rates}
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sys.exit(main())
