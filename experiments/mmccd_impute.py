"""Imputation: a site without T2 synthesises it from FLAIR with MMCCD's translator and feeds it to a segmentation
model. Segmentation Dice on the test cases with the synthesised T2, with T2 zero-filled (and flagged absent, as a
site without T2 runs the model), and with the real T2.

``python experiments/mmccd_impute.py --translator MMCCD_RUN --segmenter SEG_RUN --datalist DATA/test.json
--out-dir OUT`` scores every case once for each sequence combination given (default: T1 + T1ce + FLAIR, and FLAIR
alone). The synthesised T2 is z-scored over the brain like a real one. It imports the package; the package never
imports it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
from typing import Any

import numpy as np
import torch

from fedbrats.constants import MODALITIES, REGIONS
from fedbrats.data.loader import DataConfig, eval_transforms, make_dataset, read_datalist
from fedbrats.evaluation.evaluate import datalist_convention, load_model, preprocessing_options
from fedbrats.federated.methods.mmccd import ModalityCycleNet, case_slices, impute_target, plane_offsets, unfit_in_plane
from fedbrats.logging_setup import configure_logging
from fedbrats.precision import autocast, resolve_precision
from fedbrats.scoring.inference import predict_logits
from fedbrats.scoring.metrics import logits_to_regions, region_dice

logger = logging.getLogger(f"fedbrats.{__name__}")
PROG = "python experiments/mmccd_impute.py"
CONDITIONS = ("zero-filled", "synthesised", "real")


def synthesise_volume(net: ModalityCycleNet, image: torch.Tensor, num_masks: int, steps: int) -> torch.Tensor:
    """The target sequence of one preprocessed case (``(4, X, Y, Z)``) synthesised from its source, z-scored over
    the brain (the source's non-zero voxels), zero outside."""
    cs = case_slices(image, None, net, brain_fraction=0.0)
    with_brain = torch.nonzero(cs.brain.flatten(1).any(1)).flatten()
    fitted = torch.full_like(cs.source, 0.0)
    with autocast(resolve_precision("auto", torch.device("cpu")), torch.device("cpu")):
        fitted[with_brain] = impute_target(net, cs.source[with_brain], num_masks, steps).float()
    planes = unfit_in_plane(fitted[:, 0], tuple(image.shape[1:3]), plane_offsets(image.shape[1:3], net.image_size))
    volume = planes.permute(1, 2, 0)
    brain = image[net.source_index] != 0
    values = volume[brain]
    out = torch.zeros_like(volume)
    out[brain] = (values - values.mean()) / values.std().clamp(min=1e-6)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--translator", required=True, help="run folder or checkpoint of jobs/mmccd (mmccd/cyclic_unet)")
    p.add_argument("--segmenter", required=True, help="run folder or checkpoint of a segmentation job")
    p.add_argument("--datalist", required=True)
    p.add_argument("--key", default="test")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--combinations", nargs="+", default=["t1+t1ce+flair", "flair"])
    p.add_argument("--zoom", type=float, default=None, help="resampling factor (default: the segmenter's training one)")
    p.add_argument(
        "--roi", type=int, default=None, help="sliding-window side of the segmenter (default: its training crop)"
    )
    p.add_argument("--masks", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--max-cases", type=int, default=0)
    a = p.parse_args(argv)
    configure_logging("INFO")
    translator = load_model(a.translator)
    if not isinstance(translator, ModalityCycleNet):
        raise ValueError(f"--translator must be a jobs/mmccd model, got {type(translator).__name__}")
    segmenter = load_model(a.segmenter).eval()
    # The segmenter normalises over the window: its own training crop (and zoom) unless told otherwise.
    roi, zoom = preprocessing_options(a.segmenter, [a.roi] * 3 if a.roi else None, a.zoom, "mmccd_impute")
    target = MODALITIES.index(translator.target)
    entries = read_datalist(a.datalist, a.key)[: a.max_cases or None]
    dataset = make_dataset(
        entries,
        eval_transforms(MODALITIES, datalist_convention(a.datalist), DataConfig(zoom=zoom, cache_rate=0.0)),
        0.0,
        0.0,
        a.datalist,
    )
    combos = [tuple(c.split("+")) for c in a.combinations]
    for combo in combos:
        if translator.source not in combo or translator.target in combo:
            raise ValueError(f"combination {'+'.join(combo)} must hold {translator.source} and not {translator.target}")
    dice: dict[str, dict[str, list[list[float]]]] = {"+".join(c): {k: [] for k in CONDITIONS} for c in combos}
    for i in range(len(dataset)):
        item = dataset[i]
        image, label = item["image"], item["label"]
        synthetic = synthesise_volume(translator, image, a.masks, a.steps)
        for combo in combos:
            present = torch.tensor([m in combo for m in MODALITIES], dtype=torch.float32)
            for condition in CONDITIONS:
                x = image * present.view(-1, 1, 1, 1)
                mask = present.clone()
                if condition != "zero-filled":
                    x[target] = synthetic if condition == "synthesised" else image[target]
                    mask[target] = 1.0
                logits = predict_logits(segmenter, x[None], mask[None], roi, overlap=0.5, precision="auto")
                d = region_dice(logits_to_regions(logits.float()), label[None])[0]
                dice["+".join(combo)][condition].append([float(v) for v in d])
        logger.info("case %d/%d done", i + 1, len(dataset))
    os.makedirs(a.out_dir, exist_ok=True)
    command = " ".join([PROG, *(shlex.quote(x) for x in (argv if argv is not None else sys.argv[1:]))])
    lines = [f"Produced by `{command}`", "", f"Test cases: {len(dataset)}. Dice mean ± sd over the cases.", ""]
    lines += [
        "| Sequences | T2 | " + " | ".join(f"Dice {r}" for r in REGIONS) + " | Dice mean |",
        "|---|---|--:|--:|--:|--:|",
    ]
    summary: dict[str, Any] = {}
    for combo, by_condition in dice.items():
        for condition, rows in by_condition.items():
            arr = np.asarray(rows)
            cells = [f"{arr[:, j].mean():.3f} ± {arr[:, j].std(ddof=1) if len(arr) > 1 else 0:.3f}" for j in range(3)]
            mean = arr.mean(axis=1)
            cells.append(f"{mean.mean():.3f} ± {mean.std(ddof=1) if len(arr) > 1 else 0:.3f}")
            lines.append(f"| {combo} | {condition} | " + " | ".join(cells) + " |")
            summary.setdefault(combo, {})[condition] = {"per_case": rows, "mean_dice": float(mean.mean())}
    with open(os.path.join(a.out_dir, "imputation.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(a.out_dir, "imputation.json"), "w", encoding="utf-8") as f:
        json.dump({"command": command, "results": summary}, f, indent=2)
    logger.info("\n%s", "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
