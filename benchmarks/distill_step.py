"""What the teacher's view costs: FedKD's training step with one view and with two, per kind of site.

``python benchmarks/distill_step.py --out-dir benchmarks/results/distill-step`` times one optimiser step of
FedKD (the method's loss with every term on and a frozen global teacher, as from round 1; backward; Adam) at a site
with all four sequences, one without T1ce and one with T2 and FLAIR only, each in two ways:

* ``student view only``: the batch the loader gave before the two views (sequence dropout already applied, no
  teacher's view), with self-distillation off: the step every site took before, except at a site whose batch
  happened to keep all four sequences;
* ``two views``: the loader's two views, the student's view drawn with the recipe's sequence dropout (0.5), so that
  the step includes the global teacher on the teacher's view and self-distillation on every step.

Steps alternate between the two ways, so that other load on the machine affects both alike; the report gives the
median seconds per step and their ratio. Random data, one torch thread, batch 2.
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
from pathlib import Path
from typing import Any

import torch

if __name__ == "__main__":  # run as a script: the repository root, not benchmarks/, is where `benchmarks` lives
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from benchmarks.system import cpu_model  # noqa: E402
from fedbrats.constants import MODALITIES  # noqa: E402
from fedbrats.data.transforms import (  # noqa: E402
    AVAILABLE_IMAGE_KEY,
    AVAILABLE_MASK_KEY,
    ModalityDropout,
    apply_modality_mask,
)
from fedbrats.federated.methods import build_method  # noqa: E402
from fedbrats.logging_setup import configure_logging  # noqa: E402
from fedbrats.networks import build_network  # noqa: E402
from fedbrats.precision import autocast, cpu_has_native_bf16, resolve_precision  # noqa: E402

logger = logging.getLogger("fedbrats.benchmarks.distill_step")

#: The kinds of site timed: their sequences.
SITES: dict[str, tuple[str, ...]] = {
    "all four": MODALITIES,
    "no T1ce": ("t1", "t2", "flair"),
    "T2 + FLAIR": ("t2", "flair"),
}


def _batch(sequences: tuple[str, ...], roi: int, two_views: bool, dropout: ModalityDropout) -> dict[str, Any]:
    available = torch.tensor([[1.0 if m in sequences else 0.0 for m in MODALITIES]] * 2)
    image = apply_modality_mask(torch.randn(2, 4, roi, roi, roi), available)
    label = (torch.rand(2, 3, roi, roi, roi) > 0.8).float()
    student = torch.stack([dropout(image[b], available[b])[1] for b in range(2)])
    batch = {
        "image": apply_modality_mask(image, student),
        "modality_mask": student,
        "label": label,
        "case_id": ["a", "b"],
    }
    if two_views:
        batch[AVAILABLE_IMAGE_KEY], batch[AVAILABLE_MASK_KEY] = image, available
    return batch


def time_site(sequences: tuple[str, ...], roi: int, filters: int, steps: int, precision: str) -> dict[str, Any]:
    """Median seconds of one FedKD step with one view and with two at a site with ``sequences``."""
    torch.manual_seed(0)
    model = build_network("modality_aware", init_filters=filters)
    device = torch.device("cpu")
    resolved = resolve_precision(precision, device)
    methods = {
        "student view only": build_method("fedkd", self_distill_weight=0.0),
        "two views": build_method("fedkd"),
    }
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-4)
    dropout = ModalityDropout(prob=0.5)
    dropout.set_random_state(0)
    for method in methods.values():
        method.setup(model, sequences, device)
        method.on_global_model(model, {}, current_round=1)  # a frozen teacher, as from round 1
    times: dict[str, list[float]] = {name: [] for name in methods}
    for step in range(steps + 1):  # the first step of each way warms up and is not counted
        for name, method in methods.items():
            batch = _batch(sequences, roi, name == "two views", dropout)
            started = time.perf_counter()
            optimiser.zero_grad(set_to_none=True)
            with autocast(resolved, device):
                loss, _ = method.training_loss(model, batch, epoch=0)
            loss.backward()
            optimiser.step()
            if step:
                times[name].append(time.perf_counter() - started)
    medians = {name: statistics.median(values) for name, values in times.items()}
    return {
        "sequences": list(sequences),
        "seconds_per_step": {name: round(v, 4) for name, v in medians.items()},
        "ratio": round(medians["two views"] / medians["student view only"], 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/distill_step.py", description=__doc__)
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--roi", type=int, default=64, help="cubic crop side")
    parser.add_argument("--filters", type=int, default=8, help="init_filters of FedKD's network")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per way and site (median reported)")
    parser.add_argument("--precision", default="auto", help="the job's precision option (auto, fp32, bf16)")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.roi < 8 or args.roi % 8:
        raise SystemExit("--steps must be >= 1 and --roi a multiple of 8")
    configure_logging("INFO")
    torch.set_num_threads(1)
    load_before = os.getloadavg()[0]
    results = {
        name: time_site(sequences, args.roi, args.filters, args.steps, args.precision)
        for name, sequences in SITES.items()
    }
    report = {
        "command": "python benchmarks/distill_step.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {
            "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "native_bf16": cpu_has_native_bf16(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            # Other work on the machine slows both ways alike (their steps alternate), but it does slow them.
            "load_average_1min": {"start": round(load_before, 2), "end": round(os.getloadavg()[0], 2)},
        },
        "settings": {"roi": args.roi, "filters": args.filters, "steps": args.steps, "precision": args.precision},
        "sites": results,
    }
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "results.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    lines = [
        "# FedKD step: one view vs two views",
        "",
        f"`{report['command']}`; crop {args.roi}³, {args.filters} filters, batch 2, one thread, precision "
        f"{args.precision}, median of {args.steps} alternating steps. Machine: {report['machine']['cpu']}, "
        f"{report['machine']['cores']} cores, native bfloat16 {report['machine']['native_bf16']}, load average "
        f"{report['machine']['load_average_1min']['start']} at the start and "
        f"{report['machine']['load_average_1min']['end']} at the end (other work slows both ways alike).",
        "",
        "| site | student view only s/step | two views s/step | ratio |",
        "|---|--:|--:|--:|",
    ]
    for name, r in results.items():
        s = r["seconds_per_step"]
        lines.append(f"| {name} | {s['student view only']:.3f} | {s['two views']:.3f} | {r['ratio']:.2f}x |")
    with open(os.path.join(args.out_dir, "report.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    for line in lines[4:]:
        logger.info("%s", line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
