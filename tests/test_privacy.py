"""What leaves a site: the payload audit holds only declared items, and the privacy filters do their job."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from fedbrats.federated.filters import describe
from fedbrats.federated.methods.fedkd import FedKDMethod
from fedbrats.federated.methods.fedkd.network import parameter_modality
from fedbrats.federated.methods.fedkd.privacy import privatize_prototypes
from fedbrats.federated.protocol import BASE_META_KEYS, TEST_PREFIX
from tests.helpers import NVFLARE_ITEMS, audit_records

TINY = {"epochs_per_round": 1, "data": {"roi_size": [16, 16, 16], "batch_size": 1}}
#: Items NVFlare's Client API adds to a result on its own (the validation metrics travel as initial_metrics).


def test_clipping_and_noise_of_prototypes() -> None:
    protos = np.array([[3.0, 4.0], [0.3, 0.4], [0.0, 0.0], [6.0, 8.0]])
    cases = np.array([4, 4, 0, 2])
    clipped = privatize_prototypes(protos, cases, clip_norm=1.0, noise_multiplier=0.0, rng=np.random.default_rng(0))
    np.testing.assert_allclose(clipped[0], [0.6, 0.8], atol=1e-6)  # norm 5 clipped to 1
    np.testing.assert_allclose(clipped[1], [0.3, 0.4], atol=1e-6)  # already inside the ball
    assert not clipped[2].any(), "an absent region stays zero"
    draws = np.stack([privatize_prototypes(protos, cases, 1.0, 1.0, np.random.default_rng(s)) for s in range(2000)])
    # std = noise_multiplier * 2 * clip / n_cases: 0.5 with 4 cases, 1.0 with 2 cases
    np.testing.assert_allclose(draws[:, 0].std(0), [0.5, 0.5], rtol=0.1)
    np.testing.assert_allclose(draws[:, 3].std(0), [1.0, 1.0], rtol=0.1)
    with pytest.raises(ValueError, match="clip_norm"):
        privatize_prototypes(protos, cases, 0.0, 1.0, np.random.default_rng(0))


def test_describe_never_includes_array_values() -> None:
    desc = describe({"w": np.ones((2, 3), dtype=np.float32), "n": 3})
    assert desc["items"]["w"] == {"type": "ndarray", "shape": [2, 3], "dtype": "float32"}
    assert desc["items"]["n"] == {"type": "int", "value": 3}


def _sizes(desc: dict) -> list[int]:
    """Element counts of every array inside a described item."""
    if "items" in desc:
        return [n for d in desc["items"].values() for n in _sizes(d)]
    return [int(np.prod(desc["shape"]))] if "shape" in desc else [1]


@pytest.mark.integration
def test_payload_audit_holds_only_declared_items(tiny_federation: str, tmp_path) -> None:
    """Capture everything each FedKD site sends in a round: weights, declared extras, metrics, flags; nothing
    per case or per voxel."""
    from fedbrats.simulate import simulate

    overrides = {**TINY, "method_args": {"min_prototype_cases": 1}}
    privacy = {"prototypes": {"clip_norm": 1.0, "noise_multiplier": 0.5, "seed": 0}}
    result = simulate(
        "fedkd", str(tmp_path), sites_file=tiny_federation, num_rounds=1, training=overrides, privacy=privacy
    )
    with open(os.path.join(result.run_dir, "model_spec.json"), encoding="utf-8") as f:
        spec = json.load(f)
    from fedbrats.networks import build_from_spec

    weight_names = set(build_from_spec(spec).state_dict())
    with open(tiny_federation, encoding="utf-8") as f:
        site_modalities = {name: tuple(entry["modalities"]) for name, entry in json.load(f)["sites"].items()}
    allowed_meta = BASE_META_KEYS | FedKDMethod.payload_keys | NVFLARE_ITEMS | {"site_name"}
    for site in ("site-1", "site-2", "site-3", "site-4"):
        records = audit_records(str(tmp_path), site)
        # The federated evaluation at the end: per model (final, best) aggregate test scores, scalars only.
        scores = [r for r in records if r["kind"] == "METRICS"]
        assert len(scores) == 2 and all(k.startswith(TEST_PREFIX) for r in scores for k in r["data"])
        assert all(d["type"] == "float" for r in scores for d in r["data"].values())
        records = [r for r in records if r not in scores]
        train = [r for r in records if r["round"] == 0 and r["kind"] == "WEIGHTS" and "prototypes" in r["meta"]]
        assert train, f"{site}: no training result audited"
        # Training updates leave out the encoders of sequences the site lacks (partial updates).
        trained = {n for n in weight_names if parameter_modality(n) in (None, *site_modalities[site])}
        assert len(site_modalities[site]) == 4 or trained < weight_names
        for record in records:
            expected = trained if "prototypes" in record["meta"] else weight_names
            assert set(record["data"]) == expected, f"{site} sent other weights than {sorted(expected)[:3]}..."
            unexpected = set(record["meta"]) - allowed_meta
            assert not unexpected, f"{site} sent undeclared items {unexpected}"
            for key, desc in record["meta"].items():
                # Per-region prototypes (4 x 32) are the largest declared extra; a volume would be far larger.
                assert max(_sizes(desc)) <= 4 * 32, f"{site}: {key} is too large to be an aggregate: {desc}"
        metrics = train[0]["meta"]["initial_metrics"]["items"]
        assert all(m["type"] == "float" for m in metrics.values()), "metrics must be aggregate scalars"


@pytest.mark.integration
def test_svt_on_weight_differences(tiny_federation: str, tmp_path) -> None:
    """NVFlare's SVT filter on weight differences: sites send differences, the server rebuilds full weights."""
    from fedbrats.simulate import simulate

    privacy = {"weights": {"path": "nvflare.app_common.filters.svt_privacy.SVTPrivacy", "args": {"fraction": 0.5}}}
    result = simulate("fedavg", str(tmp_path), sites_file=tiny_federation, num_rounds=1, training=TINY, privacy=privacy)
    rounds = [r for r in result.history if not r.get("final_validation")]
    assert len(rounds[0]["sites"]) == 4 and not rounds[0]["rejected"]
    kinds = {r["kind"] for r in audit_records(str(tmp_path), "site-1") if r["round"] == 0}
    assert "WEIGHT_DIFF" in kinds
