"""Tests of the server's aggregation strategies and of the checks an update must pass before aggregation."""

from __future__ import annotations

import numpy as np
import pytest

from fedbrats.constants import MODALITIES
from fedbrats.federated.methods.fedkd.network import ModalityAwareSegNet, parameter_modality
from fedbrats.federated.methods.fedkd.strategy import ModalityAwareAggregation
from fedbrats.federated.server.aggregation import (
    AggregationStrategy,
    LocalOnly,
    SiteUpdate,
    WeightedAverage,
    weighted_average,
)
from fedbrats.federated.server.update_checks import update_problem

KEYS = ("encoders.0.w", "encoders.1.w", "encoders.2.w", "encoders.3.w", "decoder.w")
ALL = ("t1", "t1ce", "t2", "flair")


def _params(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.normal(size=(2, 3)).astype(np.float32) for k in KEYS}


def _updates(weights: tuple[float, float, float] = (1.0, 2.0, 5.0)) -> list[SiteUpdate]:
    """Three sites: all four sequences, (t1, t2, flair) and t1 only, with distinct weights and values."""
    mods = [ALL, ("t1", "t2", "flair"), ("t1",)]
    return [
        SiteUpdate(f"site-{i + 1}", _params(i + 1), meta={"modalities": list(m)}, weight=w)
        for i, (m, w) in enumerate(zip(mods, weights))
    ]


def _by_hand(values: list[np.ndarray], weights: list[float]) -> np.ndarray:
    total = sum(weights)
    return sum(w / total * v.astype(np.float64) for v, w in zip(values, weights))


# --------------------------------------------------------------------------------------------- weighted mean


def test_weighted_average_by_hand() -> None:
    """(1*a + 3*b) / 4, computed in float64 and returned in the input dtype."""
    a = np.array([1.0, 2.0, 4.0], dtype=np.float32)
    b = np.array([5.0, -2.0, 0.0], dtype=np.float32)
    out = weighted_average([a, b], [1.0, 3.0])
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [4.0, -1.0, 1.0], rtol=0, atol=1e-6)
    np.testing.assert_array_equal(weighted_average([a], [0.3]), a)


def test_weighted_average_errors() -> None:
    """No arrays, a length mismatch and weights that do not sum to a positive number are refused."""
    with pytest.raises(ValueError, match="at least one"):
        weighted_average([], [])
    with pytest.raises(ValueError, match="2 arrays but 1 weights"):
        weighted_average([np.zeros(1), np.zeros(1)], [1.0])
    with pytest.raises(ValueError, match="positive"):
        weighted_average([np.zeros(1)], [0.0])


def test_fedavg_weighted_by_steps_and_equal() -> None:
    """WeightedAverage weights by training steps, or equally with weight_by_steps=False, for every parameter."""
    updates = _updates()
    global_params = _params(0)
    by_steps = WeightedAverage().aggregate(global_params, updates, 1)
    equal = WeightedAverage(weight_by_steps=False).aggregate(global_params, updates, 1)
    assert set(by_steps) == set(KEYS) == set(equal)
    for key in KEYS:
        values = [u.params[key] for u in updates]
        np.testing.assert_allclose(by_steps[key], _by_hand(values, [1, 2, 5]), atol=1e-6)
        np.testing.assert_allclose(equal[key], _by_hand(values, [1, 1, 1]), atol=1e-6)
    assert not np.allclose(by_steps["decoder.w"], equal["decoder.w"])
    assert WeightedAverage.keep_local_weights is False


def test_fedavg_site_with_zero_steps_counts_almost_nothing() -> None:
    """A site that reported 0 steps does not break the mean (tiny weight) and barely moves it."""
    updates = _updates((0.0, 1.0, 1.0))
    out = WeightedAverage().aggregate(_params(0), updates, 1)
    expected = _by_hand([updates[1].params["decoder.w"], updates[2].params["decoder.w"]], [1, 1])
    np.testing.assert_allclose(out["decoder.w"], expected, atol=1e-6)


# ------------------------------------------------------------------------------------- modality-aware encoders


def test_modality_aware_aggregation_by_hand() -> None:
    """Each encoder is averaged over the sites having its sequence; shared weights over all sites."""
    updates = _updates()
    a, b, c = (u.params for u in updates)
    out = ModalityAwareAggregation().aggregate(_params(0), updates, 1)
    # t1: every site has it.
    np.testing.assert_allclose(out["encoders.0.w"], _by_hand([a[KEYS[0]], b[KEYS[0]], c[KEYS[0]]], [1, 2, 5]), 1e-6)
    # t1ce: only site-1.
    np.testing.assert_array_equal(out["encoders.1.w"], a["encoders.1.w"])
    # t2 and flair: site-1 and site-2.
    for key in ("encoders.2.w", "encoders.3.w"):
        np.testing.assert_allclose(out[key], _by_hand([a[key], b[key]], [1, 2]), atol=1e-6)
    # Shared decoder: all.
    expected = _by_hand([a["decoder.w"], b["decoder.w"], c["decoder.w"]], [1, 2, 5])
    np.testing.assert_allclose(out["decoder.w"], expected, atol=1e-6)
    assert all(out[k].dtype == np.float32 for k in KEYS)


def test_modality_aware_off_is_plain_fedavg() -> None:
    """modality_aware=False (ablation) averages every parameter over all sites, encoders included."""
    updates = _updates()
    out = ModalityAwareAggregation(modality_aware=False).aggregate(_params(0), updates, 1)
    fedavg = WeightedAverage().aggregate(_params(0), updates, 1)
    for key in KEYS:
        np.testing.assert_array_equal(out[key], fedavg[key])
    assert not np.allclose(out["encoders.1.w"], updates[0].params["encoders.1.w"])


def test_sequence_no_site_has_keeps_global() -> None:
    """When no site of the round has t1ce, the t1ce encoder keeps its global weights."""
    updates = _updates()[1:]  # (t1, t2, flair) and (t1,)
    global_params = _params(0)
    out = ModalityAwareAggregation().aggregate(global_params, updates, 1)
    np.testing.assert_array_equal(out["encoders.1.w"], global_params["encoders.1.w"])
    # t2 from site-2 alone, t1 from both (weights 2 and 5).
    np.testing.assert_array_equal(out["encoders.2.w"], updates[0].params["encoders.2.w"])
    expected = _by_hand([u.params["encoders.0.w"] for u in updates], [2, 5])
    np.testing.assert_allclose(out["encoders.0.w"], expected, atol=1e-6)


def test_real_network_parameter_names() -> None:
    """The naming the aggregation relies on: encoders.<i>.* belong to MODALITIES[i], the rest is shared."""
    net = ModalityAwareSegNet(init_filters=4, fusion="attention")
    keys = list(net.state_dict())
    encoder_keys = [k for k in keys if k.startswith("encoders.")]
    assert {k.split(".")[1] for k in encoder_keys} == {"0", "1", "2", "3"}
    for key in keys:
        if key.startswith("encoders."):
            assert parameter_modality(key) == MODALITIES[int(key.split(".")[1])], key
        else:
            assert parameter_modality(key) is None, key
    assert any(k.startswith("decoder.") for k in keys)
    assert any(k.startswith("content_head.") for k in keys)
    assert any(k.startswith("attention.") for k in keys)
    assert any(k.startswith("encoders.2.style_head.") for k in keys)


def test_modality_aware_on_real_state_dicts() -> None:
    """On real state dicts: t1ce/t2/flair encoders come from the only site having them, decoder is averaged."""
    full = {k: v.numpy() for k, v in ModalityAwareSegNet(init_filters=4).state_dict().items()}
    t1_only = {k: v.numpy() + 1.0 for k, v in ModalityAwareSegNet(init_filters=4).state_dict().items()}
    updates = [
        SiteUpdate("a", full, meta={"modalities": list(ALL)}, weight=3.0),
        SiteUpdate("b", t1_only, meta={"modalities": ["t1"]}, weight=1.0),
    ]
    out = ModalityAwareAggregation().aggregate(full, updates, 1)
    for key, value in out.items():
        modality = parameter_modality(key)
        if modality in ("t1ce", "t2", "flair"):
            np.testing.assert_array_equal(value, full[key])
        else:
            np.testing.assert_allclose(value, 0.75 * full[key] + 0.25 * t1_only[key], atol=1e-5)


# ------------------------------------------------------------------------------------------------ prototypes


def _proto_update(
    name: str, modalities: tuple[str, ...], protos: np.ndarray, counts: list[float], weight: float = 1.0
) -> SiteUpdate:
    meta = {
        "modalities": list(modalities),
        "prototypes": protos.astype(np.float32),
        "prototype_counts": np.asarray(counts, dtype=np.float32),
    }
    return SiteUpdate(name, _params(0), meta=meta, weight=weight)


def _proto_updates() -> list[SiteUpdate]:
    rng = np.random.default_rng(42)
    return [
        _proto_update("s1", ALL, rng.normal(size=(4, 3)), [10.0, 5.0, 0.0, 2.0]),
        _proto_update("s2", ("t1", "t2", "flair"), rng.normal(size=(4, 3)), [4.0, 0.0, 0.0, 3.0]),
        _proto_update("s3", ("t1",), rng.normal(size=(4, 3)), [1.0, 2.0, 0.0, 0.0]),
    ]


def _expected_prototypes(updates: list[SiteUpdate], power: float) -> tuple[np.ndarray, np.ndarray]:
    """P_r = sum_s w_sr p_sr / sum_s w_sr with w_sr = n_sr * (|M_s| / 4) ** power; invalid where sum is 0."""
    protos = np.zeros((4, 3))
    valid = np.zeros(4, dtype=bool)
    for r in range(4):
        num, den = np.zeros(3), 0.0
        for u in updates:
            w = float(u.meta["prototype_counts"][r]) * (len(u.modalities) / 4) ** power
            num += w * u.meta["prototypes"][r].astype(np.float64)
            den += w
        if den > 0:
            protos[r], valid[r] = num / den, True
    return protos, valid


@pytest.mark.parametrize("power", [0.0, 1.0, 2.0])
def test_prototype_aggregation_by_hand(power: float) -> None:
    """Global prototypes are the count- and completeness-weighted means; region 2 (no counts) is invalid."""
    updates = _proto_updates()
    strategy = ModalityAwareAggregation(completeness_power=power)
    assert strategy.global_meta() == {}
    strategy.aggregate(_params(0), updates, 1)
    meta = strategy.global_meta()
    expected, valid = _expected_prototypes(updates, power)
    assert meta["global_prototypes"].dtype == np.float32 and meta["global_prototypes"].shape == (4, 3)
    np.testing.assert_allclose(meta["global_prototypes"], expected, atol=1e-5)
    np.testing.assert_array_equal(meta["global_prototype_valid"], [True, True, False, True])
    np.testing.assert_array_equal(meta["global_prototype_valid"], valid)
    np.testing.assert_array_equal(meta["global_prototypes"][2], 0.0)


def test_completeness_power_changes_the_mean() -> None:
    """With power 1 the t1-only site counts a quarter as much per voxel as the complete site."""
    updates = _proto_updates()
    p0 = ModalityAwareAggregation(completeness_power=0.0)
    p1 = ModalityAwareAggregation(completeness_power=1.0)
    p0.aggregate(_params(0), updates, 1)
    p1.aggregate(_params(0), updates, 1)
    assert not np.allclose(p0.prototypes[1], p1.prototypes[1])
    # Region 1 has counts only at s1 (5, complete) and s3 (2, t1 only): weights 5 and 2 * 0.25.
    expected = (5.0 * updates[0].meta["prototypes"][1] + 0.5 * updates[2].meta["prototypes"][1]) / 5.5
    np.testing.assert_allclose(p1.prototypes[1], expected, atol=1e-5)


def test_no_prototypes_sent_leaves_state_empty() -> None:
    """Updates without prototypes (e.g. from a fedavg client) leave the global prototypes unset."""
    strategy = ModalityAwareAggregation()
    strategy.aggregate(_params(0), _updates(), 1)
    assert strategy.prototypes is None and strategy.global_meta() == {} and strategy.state() == {}


def test_prototype_momentum() -> None:
    """Momentum mixes with last round where both are valid, keeps the old where only it is valid."""
    rng = np.random.default_rng(0)
    strategy = ModalityAwareAggregation(prototype_momentum=0.25)
    first = rng.normal(size=(4, 3))
    strategy.aggregate(_params(0), [_proto_update("a", ALL, first, [1.0, 1.0, 0.0, 0.0])], 1)
    np.testing.assert_allclose(strategy.prototypes, np.where([[1], [1], [0], [0]], first, 0.0), atol=1e-6)

    second = rng.normal(size=(4, 3))
    strategy.aggregate(_params(0), [_proto_update("a", ALL, second, [1.0, 0.0, 0.0, 3.0])], 2)
    protos, valid = strategy.prototypes, strategy.prototype_valid
    np.testing.assert_allclose(protos[0], 0.25 * first[0] + 0.75 * second[0], atol=1e-6)  # both valid
    np.testing.assert_allclose(protos[1], first[1], atol=1e-6)  # only last round: kept
    np.testing.assert_array_equal(protos[2], 0.0)  # never valid
    np.testing.assert_allclose(protos[3], second[3], atol=1e-6)  # new this round
    np.testing.assert_array_equal(valid, [True, True, False, True])

    with pytest.raises(ValueError, match="prototype_momentum"):
        ModalityAwareAggregation(prototype_momentum=1.0)


def test_prototype_state_round_trip() -> None:
    """state() / load_state() restore the prototypes, and a resumed server continues exactly the same."""
    updates = _proto_updates()
    original = ModalityAwareAggregation(prototype_momentum=0.5)
    original.aggregate(_params(0), updates, 1)
    resumed = ModalityAwareAggregation(prototype_momentum=0.5)
    resumed.load_state(original.state())
    np.testing.assert_array_equal(resumed.prototypes, original.prototypes)
    np.testing.assert_array_equal(resumed.prototype_valid, original.prototype_valid)
    assert resumed.prototype_valid.dtype == bool

    later = [_proto_update("s1", ALL, np.ones((4, 3)), [1.0, 1.0, 1.0, 1.0])]
    original.aggregate(_params(0), later, 2)
    resumed.aggregate(_params(0), later, 2)
    np.testing.assert_array_equal(resumed.prototypes, original.prototypes)
    np.testing.assert_array_equal(resumed.prototype_valid, [True, True, True, True])
    fresh = ModalityAwareAggregation()
    fresh.load_state({})
    assert fresh.prototypes is None


# ------------------------------------------------------------------------------------------------ local only


def test_local_only_keeps_global_and_local_weights() -> None:
    """LocalOnly never changes the global model and tells sites to keep their own weights."""
    global_params = _params(0)
    out = LocalOnly().aggregate(global_params, _updates(), 3)
    assert out is not global_params
    for key in KEYS:
        np.testing.assert_array_equal(out[key], global_params[key])
    assert LocalOnly.keep_local_weights is True and LocalOnly().global_meta() == {}
    assert ModalityAwareAggregation.accepted_meta_keys == {"prototypes", "prototype_counts", "prototype_cases"}
    with pytest.raises(NotImplementedError):
        AggregationStrategy().aggregate(global_params, _updates(), 1)


# --------------------------------------------------------------------------------------------- update checks

GLOBAL = {"a": np.zeros((2, 3), np.float32), "b": np.zeros(4, np.float32)}
DECLARED = {"prototypes", "prototype_counts"}


def _good() -> dict[str, np.ndarray]:
    return {"a": np.ones((2, 3), np.float32), "b": np.ones(4, np.float32)}


def test_update_problem_allows_only_the_omissions_the_strategy_allows() -> None:
    """A site may leave out a weight only where ``may_omit`` says so; anything else missing is rejected."""
    partial = {"a": np.ones((2, 3), np.float32)}
    assert update_problem(GLOBAL, partial, {}, set(), may_omit=lambda name: name == "b") is None
    assert "missing, e.g. ['b']" in update_problem(GLOBAL, partial, {}, set(), may_omit=lambda name: name == "a")


def test_modality_aware_strategy_lets_sites_omit_absent_encoders_only() -> None:
    """The encoders of sequences a site lacks may be omitted (and the aggregate is unchanged without them);
    shared weights and present encoders may not; plain strategies allow no omission."""
    strategy = ModalityAwareAggregation()
    assert strategy.may_omit("encoders.1.w", ("t1", "t2"))
    assert not strategy.may_omit("encoders.0.w", ("t1", "t2"))
    assert not strategy.may_omit("decoder.w", ("t1",))
    assert not ModalityAwareAggregation(modality_aware=False).may_omit("encoders.1.w", ("t1",))
    assert not WeightedAverage().may_omit("encoders.1.w", ("t1",))
    full = _updates()
    partial = [
        SiteUpdate(
            u.site_name,
            {k: v for k, v in u.params.items() if not strategy.may_omit(k, u.modalities)},
            u.meta,
            weight=u.weight,
        )
        for u in full
    ]
    assert len(partial[2].params) == 2  # t1 only: its encoder and the decoder
    expected = ModalityAwareAggregation().aggregate(_params(0), full, 1)
    got = strategy.aggregate(_params(0), partial, 1)
    for key in KEYS:
        np.testing.assert_array_equal(got[key], expected[key])


def test_update_problem_accepts_good_update() -> None:
    """A complete, finite update with base and declared meta is accepted."""
    meta = {"site_name": "s", "modalities": ["t1"], "num_steps": 3, "prototypes": np.ones((4, 2))}
    assert update_problem(GLOBAL, _good(), meta, DECLARED) is None
    assert update_problem(GLOBAL, _good(), {}, set()) is None


@pytest.mark.parametrize(
    ("params", "meta", "expected"),
    [
        ({}, {}, "holds no weights"),
        (None, {}, "holds no weights"),
        ({"a": np.ones((2, 3))}, {}, "missing, e.g. ['b']"),
        ({**_good(), "c": np.ones(1)}, {}, "unexpected weight(s), e.g. ['c']"),
        ({**_good(), "b": np.ones(5)}, {}, "weight 'b' has shape (5,), expected (4,)"),
        ({**_good(), "a": np.full((2, 3), np.nan)}, {}, "weight 'a' holds NaN or Inf"),
        ({**_good(), "b": np.array([0.0, np.inf, 0.0, 0.0])}, {}, "weight 'b' holds NaN or Inf"),
        (_good(), {"site_name": "s", "patient_scan": [1.0]}, "undeclared items in the update: ['patient_scan']"),
        (_good(), {"prototypes": [[1.0, np.nan]]}, "item 'prototypes' is not a finite numeric array"),
        (_good(), {"prototype_counts": [np.inf]}, "item 'prototype_counts' is not a finite numeric array"),
        (_good(), {"prototypes": "abc"}, "item 'prototypes' is not a finite numeric array"),
    ],
)
def test_update_problem_messages(params: dict | None, meta: dict, expected: str) -> None:
    """Each kind of bad update is rejected with a message saying what is wrong."""
    problem = update_problem(GLOBAL, params, meta, DECLARED)
    assert problem is not None and expected in problem
