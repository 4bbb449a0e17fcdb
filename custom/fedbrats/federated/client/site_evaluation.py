"""A site's part of the federated (cross-site) evaluation: score a model on the site's own test cases.

The cases are the ``test`` list of the site's datalist (``fedbrats prepare`` writes it: the site's share of the test
cases, with the site's own sequences). The model is scored with the sequences the site has and, at a site that has
all four, with each of the 15 combinations too (the missing-modality literature's table), by the same scoring loop
as ``fedbrats evaluate`` (:func:`fedbrats.scoring.combinations.evaluate_combinations`).

Only aggregates over the site's test cases leave it: Dice and HD95 per region, their means and the number of cases
(:mod:`fedbrats.federated.protocol`'s ``test_`` keys). No per-case value, prediction or case name is returned.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import torch

from fedbrats.constants import MODALITIES, REGIONS, combination_name
from fedbrats.data.loader import DataConfig
from fedbrats.data.site_config import SiteConfig
from fedbrats.federated.client.trainer import TrainConfig, as_state_dict
from fedbrats.federated.protocol import (
    TEST_METRICS,
    TEST_NUM_CASES_KEY,
    cross_site_combination_key,
    cross_site_metric_key,
)
from fedbrats.networks import build_from_spec
from fedbrats.precision import resolve_precision
from fedbrats.scoring.combinations import evaluate_combinations

logger = logging.getLogger(__name__)

#: The list of a site's datalist that holds its test cases.
TEST_LIST_KEY = "test"


def site_test_cases(site: SiteConfig) -> int:
    """How many labelled test cases ``site`` has (0 for an unlabelled site or a datalist without a ``test`` list).

    Raises:
        ValueError: the datalist cannot be read, or its ``test`` entry is not a list.
    """
    if not site.labelled:
        return 0
    try:
        with open(site.datalist, encoding="utf-8") as f:
            content = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"site {site.site_name}: datalist {site.datalist!r} cannot be read: {exc}") from None
    cases = content.get(TEST_LIST_KEY, []) if isinstance(content, dict) else []
    if not isinstance(cases, list):
        raise ValueError(f"site {site.site_name}: {TEST_LIST_KEY!r} of {site.datalist!r} must be a list of cases")
    return sum(1 for case in cases if isinstance(case, dict) and case.get("label"))


def _row_metrics(row: dict[str, Any], all15: bool) -> dict[str, float]:
    out: dict[str, float] = {}
    for metric in TEST_METRICS:
        out.update({cross_site_metric_key(metric, r, all15): float(row[metric][r]) for r in REGIONS})
        out[cross_site_metric_key(metric, None, all15)] = float(row[f"mean_{metric}"])
    return out


def site_test_metrics(
    model: torch.nn.Module,
    site: SiteConfig,
    data: DataConfig,
    *,
    overlap: float = 0.5,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    min_cases: int = 2,
) -> dict[str, float]:
    """Aggregate test metrics of ``model`` on ``site``'s own test cases (see the module docstring).

    Args:
        model: the network to score (its weights are not changed).
        site: the site (its datalist's ``test`` list and its sequences).
        data: preprocessing options (the job's: zoom, sliding-window size).
        overlap: sliding-window overlap.
        device: where inference runs.
        precision: inference precision.
        min_cases: below this many test cases only the count is returned (nothing is scored): a score over one
            case is that patient's.

    Returns:
        ``{"test_num_cases": n}`` alone when the site has fewer than ``min_cases`` labelled test cases (n may be 0);
        otherwise ``test_num_cases``, Dice and
        HD95 per region and their means with the site's sequences (``test_dice_WT``, ..., ``test_mean_hd95``) and,
        at a site with all four sequences, the mean over the 15 combinations (``test_all15_*``) and each
        combination's mean Dice (:func:`~fedbrats.federated.protocol.cross_site_combination_key`).

    Raises:
        ValueError: an unreadable datalist or a test case without one of the site's sequences (named).
    """
    num_cases = site_test_cases(site)
    if num_cases < max(min_cases, 1):
        return {TEST_NUM_CASES_KEY: float(num_cases)}
    own = combination_name(list(site.modalities))
    complete = set(site.modalities) == set(MODALITIES)
    results = evaluate_combinations(
        model,
        site.datalist,
        key=TEST_LIST_KEY,
        data=data,
        combinations=None if complete else [site.modalities],
        overlap=overlap,
        device=device,
        precision=precision,
        available=site.modalities,
    )
    metrics = {TEST_NUM_CASES_KEY: float(results["num_cases"])}
    metrics.update(_row_metrics(results["combinations"][own], all15=False))
    if complete:
        metrics.update(_row_metrics(results["mean_over_combinations"], all15=True))
        for name, row in results["combinations"].items():
            metrics[cross_site_combination_key(name)] = float(row["mean_dice"])
    return metrics


def score_received_model(spec: Any, params: dict[str, Any], site: SiteConfig, config: TrainConfig) -> dict[str, float]:
    """:func:`site_test_metrics` of a model the server sent for the cross-site evaluation.

    The network is built anew from ``spec`` (only registered classes, see :func:`fedbrats.networks.build_from_spec`)
    with ``params`` loaded strictly: the site's own training state is never touched, so a site scores other sites'
    models between its own tasks.

    Raises:
        ValueError: the spec or the weights do not make a network of the package (named), or the site's test cases
            cannot be scored.
    """
    model = build_from_spec(spec)
    try:
        model.load_state_dict(as_state_dict(params), strict=True)
    except RuntimeError as exc:
        raise ValueError(f"the weights sent do not fit the network {spec.get('path')!r}: {exc}") from None
    device = config.torch_device()
    torch.set_num_threads(config.num_threads)
    return site_test_metrics(
        model,
        site,
        config.data,
        overlap=config.val_overlap,
        device=device,
        precision=resolve_precision(config.precision, device),
        min_cases=config.min_test_cases,
    )
