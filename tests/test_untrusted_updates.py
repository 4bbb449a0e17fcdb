"""What one site sends is checked before any arithmetic: typed, finite, bounded, of the exact shape; a violation
rejects that update with a reason and never raises inside the server (issue "One site cannot break the federation").
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType

from fedbrats.federated.compression.codec import (
    MAX_DECODED_ELEMENTS,
    compress_array,
    decompress_array,
    decompress_params,
    quantize_rows,
)
from fedbrats.federated.methods.fedkd.strategy import ModalityAwareAggregation
from fedbrats.federated.methods.isofed import IsoFedAggregation
from fedbrats.federated.protocol import site_update_meta
from fedbrats.federated.server.aggregation import SiteUpdate, WeightedAverage, clip_updates, combine
from fedbrats.federated.server.controller import FedBratsController, _full_params
from fedbrats.federated.server.update_checks import UpdateBounds, base_items_problem, metrics_problem, update_problem

GLOBAL = {"conv.weight": np.zeros((4, 2, 3, 3, 3), np.float32), "conv.bias": np.zeros(4, np.float32)}
BOUNDS = UpdateBounds(epochs_per_round=10, batch_size=2, voxels_per_item=32**3)


def honest_meta(**changes) -> dict:
    meta = {
        "site_name": "site-1",
        "modalities": ["t1", "t2"],
        "num_train_cases": 6,
        "num_steps": 30,  # 10 epochs x 3 batches of 2
        "train_loss": 0.4,
        "loss_terms": {"dice": 0.3, "bce": 0.1},
        "lr": 0.002,
        "NUM_STEPS_CURRENT_ROUND": 30,
    }
    meta.update(changes)
    return {k: v for k, v in meta.items() if v is not ...}


def test_an_honest_update_passes() -> None:
    params = {k: v + 0.1 for k, v in GLOBAL.items()}
    assert update_problem(GLOBAL, params, honest_meta(), set()) is None
    assert BOUNDS.max_steps(6) == 30 and UpdateBounds(batch_size=2, max_steps_per_epoch=2).max_steps(6) == 20


@pytest.mark.parametrize(
    ("changes", "said"),
    [
        ({"num_steps": math.nan}, "num_steps"),
        ({"num_steps": math.inf}, "num_steps"),
        ({"num_steps": 1e12}, "num_steps"),
        ({"num_steps": 31}, "at most 30"),
        ({"num_steps": -1}, "num_steps"),
        ({"num_steps": True}, "num_steps"),
        ({"num_steps": "30"}, "num_steps"),
        ({"num_steps": ...}, "num_steps"),
        ({"NUM_STEPS_CURRENT_ROUND": 1000}, "NUM_STEPS_CURRENT_ROUND"),
        ({"num_train_cases": 1e9}, "num_train_cases"),
        ({"num_train_cases": 2.5}, "num_train_cases"),
        ({"train_loss": "0.4"}, "train_loss"),
        ({"train_loss": math.nan}, "train_loss"),
        ({"lr": -1.0}, "lr"),
        ({"loss_terms": {"dice": math.inf}}, "loss_terms"),
        ({"loss_terms": [0.1]}, "loss_terms"),
        ({"modalities": [0, 1]}, "modalities"),
        ({"modalities": ["t1", "t1"]}, "modalities"),
        ({"modalities": ["pet"]}, "modalities"),
        ({"modalities": []}, "modalities"),
        ({"site_name": 42}, "site_name"),
    ],
)
def test_base_items_are_typed_finite_and_bounded(changes: dict, said: str) -> None:
    problem = base_items_problem(honest_meta(**changes), BOUNDS)
    assert problem and said in problem


def test_weights_of_another_shape_dtype_or_value_are_rejected() -> None:
    good = {k: v.copy() for k, v in GLOBAL.items()}
    assert "shape" in update_problem(GLOBAL, {**good, "conv.bias": np.zeros(5, np.float32)}, honest_meta(), set())
    assert "floating" in update_problem(GLOBAL, {**good, "conv.bias": np.zeros(4, np.complex64)}, honest_meta(), set())
    assert "floating" in update_problem(GLOBAL, {**good, "conv.bias": np.zeros(4, bool)}, honest_meta(), set())
    assert "NaN" in update_problem(GLOBAL, {**good, "conv.bias": np.full(4, np.nan, np.float32)}, honest_meta(), set())


def test_metrics_must_be_possible() -> None:
    assert metrics_problem({"val_mean_dice": 0.7, "val_hd95_WT": 12.0}) is None
    assert "Dice" in metrics_problem({"val_mean_dice": 1.5})
    assert metrics_problem({"val_mean_dice": math.nan})
    assert metrics_problem({"val_hd95_WT": -3.0})
    assert metrics_problem({"val_im": -0.02}) is None  # a method's own score may be negative
    assert metrics_problem({"val_mean_dice": "0.7"})


def test_a_weight_difference_of_another_shape_is_refused_before_it_is_added() -> None:
    """A (N,1,1,1,1,1) difference would broadcast against a 5-D weight into an array N times its size."""
    result = FLModel(params={"conv.weight": np.zeros((1000, 1, 1, 1, 1, 1), np.float32)}, params_type=ParamsType.DIFF)
    params, problem = _full_params(result, GLOBAL)
    assert problem and "shape" in problem
    fine = FLModel(params={k: np.ones_like(v) for k, v in GLOBAL.items()}, params_type=ParamsType.DIFF)
    params, problem = _full_params(fine, GLOBAL)
    assert problem is None and params["conv.bias"].tolist() == [1.0] * 4


def test_the_controller_rejects_a_malformed_result_without_raising() -> None:
    controller = FedBratsController(num_rounds=1, update_bounds={"epochs_per_round": 10, "batch_size": 2})
    controller.strategy = WeightedAverage()
    weird = FLModel(params={k: v for k, v in GLOBAL.items()}, meta={"client_name": "site-9", **honest_meta()})
    weird.metrics = {"val_mean_dice": object()}  # nothing any check names: still a rejection, not an exception
    checked = controller._check(weird, GLOBAL)
    assert checked.name == "site-9" and checked.problem
    honest = FLModel(params={k: v + 1 for k, v in GLOBAL.items()}, meta={"client_name": "site-1", **honest_meta()})
    assert controller._check(honest, GLOBAL).problem is None
    bad_steps = FLModel(params=dict(GLOBAL), meta={"client_name": "site-2", **honest_meta(num_steps=math.nan)})
    assert "num_steps" in controller._check(bad_steps, GLOBAL).problem


def test_fedkd_prototypes_are_checked_by_its_strategy() -> None:
    strategy = ModalityAwareAggregation()
    protos = {
        "prototypes": np.zeros((4, 16), np.float32),
        "prototype_counts": np.array([100.0, 10.0, 5.0, 1.0], np.float32),
        "prototype_cases": np.array([6.0, 3.0, 2.0, 1.0], np.float32),
    }
    meta = honest_meta(**protos)
    assert strategy.extras_problem(meta, BOUNDS) is None
    for changes, said in (
        ({"prototypes": np.zeros((3, 16), np.float32)}, "prototypes must be"),
        ({"prototype_counts": np.array([-0.999999, 1, 1, 1], np.float32)}, "voxel counts"),
        ({"prototype_counts": np.array([1e30, 1, 1, 1], np.float32)}, "voxel counts"),
        ({"prototype_cases": np.array([7.0, 0, 0, 0], np.float32)}, "case counts"),
        ({"prototype_counts": np.zeros(3, np.float32)}, "must be (4,)"),
    ):
        problem = strategy.extras_problem({**meta, **changes}, BOUNDS)
        assert problem and said in problem, (changes, problem)
    without_counts = {k: v for k, v in meta.items() if k != "prototype_counts"}
    assert "come with" in strategy.extras_problem(without_counts, BOUNDS)


def test_isofed_labelled_must_be_one_boolean() -> None:
    strategy = IsoFedAggregation()
    assert strategy.extras_problem(honest_meta(labelled=True), BOUNDS) is None
    assert "true or false" in strategy.extras_problem(honest_meta(labelled=np.array([1.0, 0.0])), BOUNDS)


def test_a_method_cannot_shadow_the_base_items_at_the_site() -> None:
    summary = {"num_steps": 3, "train_loss": 0.5, "loss_terms": {}, "lr": 0.001}
    with pytest.raises(ValueError, match="num_steps"):
        site_update_meta("site-1", ["t1"], 2, summary, {"num_steps": 10**9})
    assert site_update_meta("site-1", ["t1"], 2, summary, {"prototypes": [1.0]})["num_steps"] == 3


# ---- compressed payloads --------------------------------------------------------------------------------------
def test_a_decoder_checks_what_arrives_before_allocating() -> None:
    weight = np.random.default_rng(0).normal(size=(8, 4, 3, 3, 3)).astype(np.float32)
    for bits in (32, 8, 4):
        packed = compress_array(weight, 0.9, bits)
        assert decompress_array(packed).shape == weight.shape
    huge = {"u": np.zeros((2, 1), np.float32), "vt": np.zeros((1, 2), np.float32), "shape": [2, 2**40]}
    with pytest.raises(ValueError, match="values|shape"):
        decompress_array(huge)
    rank1 = compress_array(weight, 0.5, 4)
    with pytest.raises(ValueError):
        decompress_array({**rank1, "shape": [2**20, 2**10]})  # 60 KB of factors stating a 4 GiB weight
    q, scale = quantize_rows(weight.reshape(8, -1), 8)
    whole = {"q": q, "scale": scale, "shape": list(weight.shape)}
    assert decompress_array(whole).shape == weight.shape
    with pytest.raises(ValueError, match="scale"):
        decompress_array({**whole, "scale": np.ones((8, 10_000), np.float32)})
    for bad in (
        {**whole, "q": q.astype(np.complex64)},
        {**whole, "q": q.astype(bool)},
        {**whole, "q": q.astype(np.float32)},
        {**whole, "shape": [-8, 4, 3, 3, 3]},
        {**whole, "shape": "8x108"},
        {"u": 1, "vt": 2},
    ):
        with pytest.raises(ValueError):
            decompress_array(bad)
    with pytest.raises(ValueError, match="'w'"):
        decompress_params({"w": {**whole, "shape": [-1]}})
    assert MAX_DECODED_ELEMENTS < 2**30


# ---- robust aggregation ----------------------------------------------------------------------------------------
def _updates(values: list[float]) -> list[SiteUpdate]:
    return [SiteUpdate(f"s{i}", {"w": np.full(3, v, np.float32)}, weight=1.0) for i, v in enumerate(values)]


def test_robust_rules_bound_one_site() -> None:
    arrays = [np.full(3, v, np.float32) for v in (1.0, 1.1, 0.9, 100.0)]
    assert combine(arrays, [1, 1, 1, 1], "mean")[0] == pytest.approx(25.75)
    assert combine(arrays, [1, 1, 1, 1], "median")[0] == pytest.approx(1.05)
    assert combine(arrays, [1, 1, 1, 1], "trimmed_mean", 0.25)[0] == pytest.approx(1.05)
    with pytest.raises(ValueError, match="rule"):
        WeightedAverage(rule="max")
    global_params = {"w": np.zeros(3, np.float32)}
    clipped = clip_updates(global_params, _updates([1.0, 1.0, 1.0, 100.0]), factor=2.0)
    assert clipped[3].params["w"][0] == pytest.approx(2.0) and clipped[0].params["w"][0] == 1.0
    out = WeightedAverage(rule="median").aggregate(global_params, _updates([1.0, 1.0, 1.0, 100.0]), 0)
    assert out["w"][0] == pytest.approx(1.0)
    fedkd = ModalityAwareAggregation(rule="median", clip_factor=2.0)
    assert fedkd.aggregate(global_params, _updates([1.0, 2.0, 3.0, 1e6]), 0)["w"][0] == pytest.approx(2.5)
