"""Builders several test modules share: small BraTS cases on disk, a federated run folder, the payload audit."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from deploy.processes import DeploymentError, nvflare_cli
from fedbrats.constants import MODALITIES
from fedbrats.data.conventions import BRATS2018, BraTSConvention
from fedbrats.networks import model_spec

CASE_SHAPE = (16, 16, 16)

#: 13 BraTS-2018-style cases: CBICA 6, TCIA (two sub-centres) 4, 2013 3.
IDS_2018 = (
    [f"Brats18_CBICA_A{c}_1" for c in "ABCDEF"]
    + ["Brats18_TCIA01_101_1", "Brats18_TCIA01_102_1", "Brats18_TCIA10_201_1", "Brats18_TCIA10_202_1"]
    + ["Brats18_2013_1_1", "Brats18_2013_2_1", "Brats18_2013_3_1"]
)
IDS_2023 = [f"BraTS-GLI-{i:05d}-000" for i in range(5)] + [f"BraTS-MEN-{i:05d}-000" for i in range(3)]


def write_case(
    root: Path,
    case_id: str,
    convention: BraTSConvention = BRATS2018,
    missing: Sequence[str] = (),
    label_values: Sequence[int] | None = None,
    seed: int = 0,
) -> Path:
    """Write a small random BraTS case (four sequences and a segmentation, 16^3) under ``root``."""
    rng = np.random.default_rng(seed)
    case_dir = root / case_id
    case_dir.mkdir(parents=True, exist_ok=True)
    for key in (*MODALITIES, "seg"):
        if key in missing:
            continue
        if key == "seg":
            data = rng.choice(np.asarray(label_values or convention.labels), size=CASE_SHAPE).astype(np.uint8)
        else:
            data = rng.normal(100, 20, size=CASE_SHAPE).astype(np.int16)
        nib.save(nib.Nifti1Image(data, np.eye(4)), str(case_dir / convention.filename(case_id, key)))
    return case_dir


def run_dir(root: Path, model: nn.Module, best: bool = True) -> Path:
    """A folder laid out like a federated run: model_spec.json at the top, checkpoints in app_server/."""
    (root / "app_server").mkdir(parents=True)
    (root / "model_spec.json").write_text(json.dumps(model_spec(model)))
    name = "best_FL_global_model.pt" if best else "FL_global_model.pt"
    torch.save({"model": model.state_dict()}, root / "app_server" / name)
    return root


#: What NVFlare itself adds to every result a site sends.
NVFLARE_ITEMS = {"initial_metrics", "CURRENT_ROUND", "TOTAL_ROUNDS", "JOB_ID", "SITE_NAME", "current_round"}


def audit_records(run_ws: str, site: str) -> list[dict]:
    path = os.path.join(run_ws, "sim", site, "simulate_job", "payload_audit.jsonl")
    assert os.path.isfile(path), f"no payload audit at {path}"
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def nvflare_available() -> None:
    """Skip the test where the nvflare command line is not there."""
    try:
        nvflare_cli()
    except DeploymentError as e:
        pytest.skip(f"nvflare CLI unavailable: {e}")


class RecordingNetwork(nn.Module):
    """Wraps a network called as ``net(image, mask)`` and keeps every input it was given (to check which view of a
    batch a teacher or student saw)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.masks: list[torch.Tensor] = []
        self.images: list[torch.Tensor] = []

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> dict:
        self.masks.append(mask.clone())
        self.images.append(image.clone())
        return self.net(image, mask)
