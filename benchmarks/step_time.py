"""Training-step time of the networks by width, crop and precision: the speed half of the recipe's trade-off.

``python benchmarks/step_time.py --out-dir benchmarks/results/step_time`` times one optimiser step (forward,
Dice + BCE loss, backward, Adam) of each configuration on random data, one torch thread, batch 2, and writes
``results.json`` and ``report.md``. The quality half comes from training runs (docs/results.md). Run it on an
otherwise idle machine; the report records the CPU and whether it computes bfloat16 natively.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import time
from typing import Any

import torch

from fedbrats.federated.methods import build_method
from fedbrats.logging_setup import configure_logging
from fedbrats.networks import build_network
from fedbrats.precision import autocast, cpu_has_native_bf16

logger = logging.getLogger("fedbrats.benchmarks.step_time")

#: (network, method) pairs timed: the baselines' SegResNet and FedKD's modality-aware network.
NETWORKS = (("segresnet", "fedavg"), ("modality_aware", "fedkd"))


def step_seconds(
    network: str, method: str, filters: int, roi: int, precision: str, steps: int, device: str = "cpu"
) -> float:
    """Median seconds of ``steps`` training steps after two untimed ones (batch 2, all four sequences)."""
    torch.manual_seed(0)
    dev = torch.device(device)
    net = build_network(network, init_filters=filters).to(dev)
    loss_fn = build_method(method)
    loss_fn.setup(net, ("t1", "t1ce", "t2", "flair"), dev)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    batch = {
        "image": torch.randn(2, 4, roi, roi, roi, device=dev),
        "label": (torch.rand(2, 3, roi, roi, roi, device=dev) > 0.9).float(),
        "modality_mask": torch.ones(2, 4, device=dev),
        "case_id": ["a", "b"],
    }
    times = []
    for i in range(steps + 2):
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with autocast(precision, dev):
            loss, _ = loss_fn.training_loss(net, batch, 0)
        loss.backward()
        optimizer.step()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)  # kernels run asynchronously: time until they are done
        if i >= 2:
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--filters", default="8,16", help="init_filters values (comma-separated)")
    parser.add_argument("--rois", default="32,64,96", help="cubic crop sides (comma-separated)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per configuration (median reported)")
    parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA device is available")
    configure_logging("INFO")
    torch.set_num_threads(1)
    rows: list[dict[str, Any]] = []
    for network, method in NETWORKS:
        for filters in (int(x) for x in args.filters.split(",")):
            for roi in (int(x) for x in args.rois.split(",")):
                for precision in ("fp32", "bf16"):
                    seconds = step_seconds(network, method, filters, roi, precision, args.steps, args.device)
                    rows.append(
                        {"network": network, "filters": filters, "roi": roi, "precision": precision, "s": seconds}
                    )
                    logger.info("%s %d filters, %d^3, %s: %.3f s/step", network, filters, roi, precision, seconds)
    machine = {
        "processor": platform.processor() or platform.machine(),
        "native_bf16": cpu_has_native_bf16(),
        "torch": torch.__version__,
        "threads": 1,
        "device": args.device,
        "gpu": torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else None,
    }
    command = "python benchmarks/step_time.py " + " ".join(argv if argv is not None else sys.argv[1:])
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "results.json"), "w", encoding="utf-8") as f:
        json.dump({"command": command, "machine": machine, "rows": rows}, f, indent=2)
    lines = [
        "# Training-step time by network width, crop and precision",
        "",
        f"Command: `{command}`. One torch thread, batch 2, all four sequences, Dice + BCE, Adam; median of "
        f"{args.steps} steps. Device: {machine['gpu'] or 'CPU'}; CPU computes bfloat16 natively: "
        f"{machine['native_bf16']}.",
        "",
        "| network | init_filters | crop | fp32 s/step | bf16 s/step | speed-up |",
        "|---|--:|--:|--:|--:|--:|",
    ]
    seconds_of = {(r["network"], r["filters"], r["roi"], r["precision"]): r["s"] for r in rows}
    for (network, filters, roi, precision), fp32 in seconds_of.items():
        if precision == "fp32":
            bf16 = seconds_of[(network, filters, roi, "bf16")]
            lines.append(f"| {network} | {filters} | {roi}³ | {fp32:.4f} | {bf16:.4f} | {fp32 / bf16:.2f}x |")
    with open(os.path.join(args.out_dir, "report.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
