"""FedMIC: the SVD codec and its NVFlare filter pair, the mutual-distillation terms, the site method, and the job."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.fl_constant import ReservedKey
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.app_constant import AppConstants

from fedbrats.federated.compression import SVDBroadcastCompressor, SVDDecompressor, SVDUpdateCompressor
from fedbrats.federated.compression.codec import (
    compress_array,
    compress_params,
    decompress_array,
    dequantize_rows,
    energy_rank,
    energy_threshold,
    is_factors,
    is_quantized,
    pack_nibbles,
    quantize_rows,
    unpack_nibbles,
)
from fedbrats.federated.methods.fedmic import (
    PERSONAL_BEST_FILE,
    PERSONAL_KEY_METRIC,
    PERSONAL_METRIC_PREFIX,
    PERSONAL_STATE_FILE,
    FedMICMethod,
    logits_and_features,
)
from fedbrats.federated.protocol import (
    BASE_META_KEYS,
    CROSS_SITE_PARAM_PREFIX,
    MODEL_SPEC_KEY,
    SVD_META_KEY,
    TEST_PREFIX,
)
from fedbrats.losses.distillation import logit_kd_loss
from fedbrats.losses.mutual import FeatureProjection, adaptive_kd_scale, feature_mse
from fedbrats.lr_schedule import lr_factor
from fedbrats.networks.segresnet import BraTSSegResNet

SINGULAR = np.array([4.0, 2.0, 1.0, 0.5])  # squared: 16, 4, 1, 0.25 (total 21.25)


def _with_singular_values(rows: int, cols: int, singular: np.ndarray, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.normal(size=(rows, len(singular))))
    v, _ = np.linalg.qr(rng.normal(size=(cols, len(singular))))
    return (u * singular) @ v.T


# ---- the codec ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("energy", "rank"),
    [(0.5, 1), (16 / 21.25, 1), (0.76, 2), (20 / 21.25, 2), (0.95, 3), (0.99, 4), (1.0, 4), (1.5, 4)],
)
def test_energy_rank_on_known_singular_values(energy: float, rank: int) -> None:
    assert energy_rank(SINGULAR, energy) == rank


def test_energy_rank_edge_cases() -> None:
    assert energy_rank(np.zeros(3), 0.95) == 0, "an all-zero update needs no triplet"
    assert energy_rank(np.array([3.0]), 0.95) == 1, "rank-1: the one triplet"
    with pytest.raises(ValueError, match="energy"):
        energy_rank(SINGULAR, 0.0)


@pytest.mark.parametrize("energy", [0.5, 0.9, 0.95, 0.98])
def test_round_trip_error_is_the_dropped_energy(energy: float) -> None:
    matrix = _with_singular_values(16, 12, SINGULAR).astype(np.float64)
    packed = compress_array(matrix, energy)
    k = energy_rank(SINGULAR, energy)
    assert is_factors(packed) and packed["u"].shape == (16, k) and packed["vt"].shape == (k, 12)
    error = float(np.sum((decompress_array(packed) - matrix) ** 2))
    np.testing.assert_allclose(error, float(np.sum(SINGULAR[k:] ** 2)), atol=1e-9)
    assert error <= (1 - energy) * float(np.sum(SINGULAR**2)) + 1e-9


def test_conv_kernels_are_reshaped_out_by_in_times_kernel() -> None:
    kernel = _with_singular_values(8, 4 * 27, np.array([5.0, 0.01]), seed=1).reshape(8, 4, 3, 3, 3)
    packed = compress_array(kernel.astype(np.float32), 0.95)
    assert packed["u"].shape == (8, 1) and packed["vt"].shape == (1, 108) and packed["shape"] == [8, 4, 3, 3, 3]
    restored = decompress_array(packed)
    assert restored.shape == kernel.shape and restored.dtype == np.float32
    assert np.abs(restored - kernel).max() < 0.02


def test_what_goes_whole() -> None:
    matrix = _with_singular_values(16, 12, SINGULAR).astype(np.float32)
    for value, why in (
        (np.arange(5, dtype=np.float32), "1-D"),
        (matrix, "energy >= 1"),
        (np.ones((4, 4), dtype=np.int64), "not floating point"),
        (np.eye(2, dtype=np.float32), "factors not smaller (rank 2 of 2x2)"),
    ):
        energy = 1.0 if why == "energy >= 1" else 0.95
        out = compress_array(value, energy)
        assert not is_factors(out), why
        np.testing.assert_array_equal(out, value)
    zero = compress_array(np.zeros((6, 5), dtype=np.float32), 0.95)
    assert zero["u"].shape == (6, 0), "an all-zero update sends no triplet"
    np.testing.assert_array_equal(decompress_array(zero), np.zeros((6, 5)))
    with pytest.raises(ValueError, match="energy"):
        compress_array(matrix, -1.0)
    with pytest.raises(ValueError, match="do not make"):
        decompress_array({"u": np.ones((3, 1)), "vt": np.ones((1, 4)), "shape": [3, 5]})


def test_a_failing_svd_falls_back_and_never_loses_the_update(monkeypatch: pytest.MonkeyPatch) -> None:
    matrix = _with_singular_values(16, 12, SINGULAR).astype(np.float32)

    def not_converged(*args, **kwargs):
        raise np.linalg.LinAlgError("SVD did not converge")

    monkeypatch.setattr(np.linalg, "svd", not_converged)
    packed = compress_array(matrix, 0.95)  # the QR-based LAPACK driver instead
    assert is_factors(packed) and packed["u"].shape == (16, 3)
    import scipy.linalg

    monkeypatch.setattr(scipy.linalg, "svd", not_converged)
    np.testing.assert_array_equal(compress_array(matrix, 0.95), matrix)  # both fail: sent whole
    assert is_quantized(compress_array(matrix, 0.95, bits=8))
    bad = matrix.copy()
    bad[0, 0] = np.nan
    assert compress_array(bad, 0.95) is not None and np.isnan(compress_array(bad, 0.95)[0, 0]), "sent as it is"


def test_energy_schedule_rises_linearly() -> None:
    assert energy_threshold(0, 4) == pytest.approx(0.95)
    assert energy_threshold(1, 4) == pytest.approx(0.96)
    assert energy_threshold(3, 4) == pytest.approx(0.98)
    assert energy_threshold(4, 4) == pytest.approx(0.98), "the final validation keeps the last threshold"
    assert energy_threshold(0, 1) == pytest.approx(0.98)
    for kwargs, arg in (
        ({"num_rounds": 0}, "num_rounds"),
        ({"start": 1.2}, "energy_start"),
        ({"start": 0.98, "end": 0.9}, "energy_end"),
    ):
        with pytest.raises(ValueError, match=arg):
            energy_threshold(0, **{"num_rounds": 4, **kwargs})


# ---- the filter pair on a real payload ---------------------------------------------------------------------
def _ctx(site: str | None = None) -> FLContext:
    ctx = FLContext()
    if site is not None:
        peer = FLContext()
        peer.set_prop(ReservedKey.IDENTITY_NAME, site, private=False, sticky=False)
        ctx.set_peer_context(peer)
    return ctx


def _shareable(kind: str, data: dict, current_round: int):
    shareable = DXO(kind, data=data, meta={}).to_shareable()
    shareable.set_header(AppConstants.CURRENT_ROUND, current_round)
    return shareable


def _nbytes(data: dict) -> int:
    return sum(v["u"].nbytes + v["vt"].nbytes if is_factors(v) else np.asarray(v).nbytes for v in data.values())


def test_filter_pair_on_a_segresnet_payload() -> None:
    """Round 0 goes whole; a site's update travels as factors; the next broadcast is relative to what the site
    holds; what it leaves out goes with the one after (error feedback)."""
    torch.manual_seed(0)
    global0 = {k: v.numpy().copy() for k, v in BraTSSegResNet(init_filters=8).state_dict().items()}
    server_out, server_in = SVDBroadcastCompressor(num_rounds=3), SVDDecompressor()
    site_in, site_out = SVDDecompressor(), SVDUpdateCompressor(num_rounds=3)

    # Round 0: first contact, the full model.
    sent = server_out.process(_shareable(DataKind.WEIGHTS, global0, 0), _ctx("site-1"))
    assert from_shareable(sent).data_kind == DataKind.WEIGHTS
    received = from_shareable(site_in.process(sent, _ctx()))
    assert received.data_kind == DataKind.WEIGHTS and SVD_META_KEY not in received.meta
    for k in global0:
        np.testing.assert_array_equal(received.data[k], global0[k])

    # The site's update (low rank plus noise on the conv kernels) as a weight difference.
    rng = np.random.default_rng(0)
    update = {}
    for k, v in global0.items():
        if v.ndim >= 2:
            m = v.reshape(v.shape[0], -1)
            low = np.outer(rng.normal(size=m.shape[0]), rng.normal(size=m.shape[1]))
            update[k] = (0.01 * low + 1e-5 * rng.normal(size=m.shape)).reshape(v.shape).astype(np.float32)
        else:
            update[k] = (0.01 * rng.normal(size=v.shape)).astype(np.float32)
    with pytest.raises(ValueError, match="DIFF"):
        site_out.process(_shareable(DataKind.WEIGHTS, update, 0), _ctx())
    up = site_out.process(_shareable(DataKind.WEIGHT_DIFF, update, 0), _ctx())
    up_data = from_shareable(up).data
    assert _nbytes(up_data) < 0.2 * _nbytes(update), "a near rank-1 update must shrink"
    assert from_shareable(up).meta[SVD_META_KEY] == {"energy": pytest.approx(0.95)}
    assert SVD_META_KEY in BASE_META_KEYS, "the site's filter adds a declared item"
    rebuilt = from_shareable(server_in.process(up, _ctx("site-1")))
    assert rebuilt.data_kind == DataKind.WEIGHT_DIFF and SVD_META_KEY not in rebuilt.meta
    for k, v in update.items():
        assert np.sum((rebuilt.data[k] - v) ** 2) <= (1 - 0.95) * np.sum(v.astype(np.float64) ** 2) + 1e-9

    # Round 1: the server's exact new global model goes out relative to what site-1 holds.
    global1 = {k: global0[k] + rebuilt.data[k] for k in global0}
    down = server_out.process(_shareable(DataKind.WEIGHTS, global1, 1), _ctx("site-1"))
    down_dxo = from_shareable(down)
    assert down_dxo.data_kind == DataKind.WEIGHT_DIFF and _nbytes(down_dxo.data) < 0.2 * _nbytes(global1)
    held1 = from_shareable(site_in.process(down, _ctx())).data
    diff_energy = sum(np.sum((global1[k] - global0[k]).astype(np.float64) ** 2) for k in global0)
    residual = sum(np.sum((global1[k] - held1[k]).astype(np.float64) ** 2) for k in global0)
    assert residual <= (1 - 0.96) * diff_energy + 1e-9

    # Round 2 with the same global model: only what round 1 left out travels, and the site then holds it exactly
    # (up to float32 rounding).
    again = server_out.process(_shareable(DataKind.WEIGHTS, global1, 2), _ctx("site-1"))
    held2 = from_shareable(site_in.process(again, _ctx())).data
    residual2 = sum(np.sum((global1[k] - held2[k]).astype(np.float64) ** 2) for k in global0)
    assert residual2 < 0.05 * residual + 1e-12

    # A site holding other weights than the broadcast assumes stops instead of training on wrong weights.
    late = server_out.process(_shareable(DataKind.WEIGHTS, global1, 2), _ctx("site-1"))
    with pytest.raises(RuntimeError, match="holds"):
        SVDDecompressor().process(late, _ctx())


def test_update_error_feedback_sends_what_earlier_rounds_left_out() -> None:
    """With error feedback, what the server rebuilt over the rounds plus the site's residual is exactly the sum of
    the updates, and the total error is far below that of the same updates compressed without it."""
    rng = np.random.default_rng(1)
    updates = [{"w": rng.normal(size=(16, 40)).astype(np.float32), "b": rng.normal(size=4).astype(np.float32)}]
    updates += [{k: v.copy() for k, v in updates[0].items()} for _ in range(5)]  # the same direction each round
    totals = {}
    for feedback in (False, True):
        site, server = SVDUpdateCompressor(0.5, 0.5, num_rounds=6, error_feedback=feedback), SVDDecompressor()
        rebuilt = {k: np.zeros_like(v, dtype=np.float64) for k, v in updates[0].items()}
        for r, update in enumerate(updates):
            up = site.process(_shareable(DataKind.WEIGHT_DIFF, update, r), _ctx())
            assert is_factors(from_shareable(up).data["w"]), "energy 0.5 sends factors"
            for k, v in from_shareable(server.process(up, _ctx("site-1"))).data.items():
                rebuilt[k] += v
        wanted = {k: sum(u[k].astype(np.float64) for u in updates) for k in updates[0]}
        totals[feedback] = np.sum((rebuilt["w"] - wanted["w"]) ** 2)
        np.testing.assert_allclose(rebuilt["b"], wanted["b"], rtol=1e-5), "1-D weights go whole either way"
        if feedback:
            np.testing.assert_allclose(rebuilt["w"] + site._residual["w"], wanted["w"], rtol=1e-4, atol=1e-4)
    assert totals[True] < 0.2 * totals[False]
    assert not SVDUpdateCompressor().error_feedback, "off by default (FedKD's codec)"


def test_broadcast_is_computed_once_for_sites_holding_the_same_weights() -> None:
    weights = {"w": _with_singular_values(16, 12, SINGULAR).astype(np.float32), "b": np.ones(3, dtype=np.float32)}
    server = SVDBroadcastCompressor(num_rounds=2)
    first = {s: from_shareable(server.process(_shareable(DataKind.WEIGHTS, weights, 0), _ctx(s))) for s in "ab"}
    assert first["a"].meta[SVD_META_KEY]["version"] == first["b"].meta[SVD_META_KEY]["version"]
    moved = {"w": weights["w"] * 1.5, "b": weights["b"]}
    second = [from_shareable(server.process(_shareable(DataKind.WEIGHTS, moved, 1), _ctx(s))) for s in "ab"]
    assert second[0].meta[SVD_META_KEY] == second[1].meta[SVD_META_KEY]
    assert second[0].data["w"] is second[1].data["w"]
    with pytest.raises(ValueError, match="receiving site"):
        server.process(_shareable(DataKind.WEIGHTS, weights, 0), _ctx())


def test_compression_stats() -> None:
    matrix = _with_singular_values(16, 12, SINGULAR).astype(np.float32)
    _, stats = compress_params({"w": matrix, "b": np.ones(4, dtype=np.float32)}, 0.9)
    assert (stats.compressed, stats.whole) == (1, 1)
    assert stats.dense_bytes == matrix.nbytes + 16 and stats.sent_bytes == 2 * (16 + 12) * 4 + 16


def _assert_rounding_adds_at_most(quantised: dict, plain: dict, matrix: np.ndarray, share: float) -> None:
    """The quantised factors rebuild a float32 matrix whose error exceeds the float factors' truncation error by
    less than ``share`` of the matrix's energy."""
    restored = decompress_array(quantised)
    assert restored.dtype == np.float32 and restored.shape == matrix.shape
    truncation = float(np.sum((decompress_array(plain) - matrix) ** 2))
    assert float(np.sum((restored - matrix) ** 2)) < truncation + share * float(np.sum(SINGULAR**2))


# ---- 8-bit factors (bits=8) ---------------------------------------------------------------------------------
def test_quantize_rows_error_is_at_most_half_a_step() -> None:
    rng = np.random.default_rng(2)
    matrix = rng.normal(size=(5, 33)) * np.array([1e-4, 1.0, 10.0, 0.0, 3.0])[:, None]
    q, scale = quantize_rows(matrix)
    assert q.dtype == np.int8 and scale.dtype == np.float32 and scale.shape == (5,)
    assert np.abs(q).max() == 127, "each non-zero row's largest magnitude maps to 127"
    assert scale[3] == 0 and not q[3].any(), "an all-zero row stays zero"
    restored = q * scale[:, None].astype(np.float64)
    assert np.all(np.abs(restored - matrix) <= 0.5 * scale[:, None] * (1 + 1e-6) + 1e-12)


def test_quantised_factors_are_a_quarter_of_the_bytes_and_close() -> None:
    matrix = _with_singular_values(64, 96, SINGULAR).astype(np.float32)
    plain, quant = compress_array(matrix, 0.95), compress_array(matrix, 0.95, bits=8)
    assert is_factors(quant) and quant["u"].dtype == np.int8 and quant["vt"].dtype == np.int8
    assert quant["u"].shape == plain["u"].shape and quant["vt"].shape == plain["vt"].shape
    _, plain_stats = compress_params({"w": matrix}, 0.95)
    _, quant_stats = compress_params({"w": matrix}, 0.95, bits=8)
    k = plain["u"].shape[1]
    assert quant_stats.sent_bytes == k * (64 + 96) + 2 * k * 4, "int8 factors plus a float32 scale per vector"
    assert quant_stats.sent_bytes < 0.3 * plain_stats.sent_bytes
    _assert_rounding_adds_at_most(quant, plain, matrix, 0.01)  # little: < 1 % of the matrix's energy
    with pytest.raises(ValueError, match="singular vectors"):
        decompress_array({**quant, "u_scale": quant["u_scale"][:-1]})


def test_quantised_whole_weights_and_what_stays_float() -> None:
    kernel = np.random.default_rng(3).normal(size=(4, 2, 3, 3, 3)).astype(np.float32)
    whole = compress_array(kernel, 1.0, bits=8)
    assert is_quantized(whole) and whole["q"].shape == (4, 54) and whole["shape"] == [4, 2, 3, 3, 3]
    restored = decompress_array(whole)
    assert restored.shape == kernel.shape
    assert np.abs(restored - kernel).max() <= 0.5 * whole["scale"].max() + 1e-7
    bias = np.arange(5, dtype=np.float32)
    np.testing.assert_array_equal(compress_array(bias, 0.5, bits=8), bias)  # 1-D: float, whole
    with pytest.raises(ValueError, match="do not make"):
        decompress_array({"q": np.zeros((3, 4), np.int8), "scale": np.ones(3, np.float32), "shape": [3, 5]})


# ---- 4-bit factors (bits=4) ---------------------------------------------------------------------------------
def test_nibbles_round_trip_with_odd_widths() -> None:
    values = np.random.default_rng(4).integers(-8, 8, size=(3, 7)).astype(np.int8)
    packed = pack_nibbles(values)
    assert packed.dtype == np.uint8 and packed.shape == (3, 4)
    np.testing.assert_array_equal(unpack_nibbles(packed, 7), values)
    with pytest.raises(ValueError, match="does not hold"):
        unpack_nibbles(packed, 9)


def test_4bit_rows_error_is_at_most_half_a_step() -> None:
    rng = np.random.default_rng(5)
    matrix = rng.normal(size=(4, 21)) * np.array([1e-3, 1.0, 0.0, 5.0])[:, None]
    q, scale = quantize_rows(matrix, bits=4)
    assert q.dtype == np.uint8 and q.shape == (4, 11)
    levels = unpack_nibbles(q, 21)
    assert np.abs(levels).max() == 7 and not levels[2].any(), "peaks map to 7, a zero row stays zero"
    restored = dequantize_rows(q, scale, dtype=np.float64, cols=21)
    assert np.all(np.abs(restored - matrix) <= 0.5 * scale[:, None] * (1 + 1e-6) + 1e-12)
    with pytest.raises(ValueError, match="cols"):
        dequantize_rows(q, scale)


def test_4bit_factors_are_half_the_bytes_of_8bit_and_close() -> None:
    matrix = _with_singular_values(64, 95, SINGULAR).astype(np.float32)
    plain, q4 = compress_array(matrix, 0.95), compress_array(matrix, 0.95, bits=4)
    k = plain["u"].shape[1]
    assert is_factors(q4) and q4["u"].shape == (k, 32) and q4["vt"].shape == (k, 48)
    _, stats8 = compress_params({"w": matrix}, 0.95, bits=8)
    _, stats4 = compress_params({"w": matrix}, 0.95, bits=4)
    assert stats4.sent_bytes == k * (32 + 48) + 2 * k * 4, "two values a byte plus a float32 scale per vector"
    assert stats4.sent_bytes < 0.6 * stats8.sent_bytes
    _assert_rounding_adds_at_most(q4, plain, matrix, 0.05)  # more than 8 bits, still a few per cent
    with pytest.raises(ValueError, match="packed factors"):
        decompress_array({**q4, "vt": q4["vt"][:, :-1]})
    with pytest.raises(ValueError, match="scales"):
        decompress_array({"u": q4["u"], "vt": q4["vt"], "shape": q4["shape"]})


def test_4bit_whole_weights() -> None:
    kernel = np.random.default_rng(6).normal(size=(4, 1, 3, 3, 3)).astype(np.float32)  # 27 columns: odd
    whole = compress_array(kernel, 1.0, bits=4)
    assert is_quantized(whole) and whole["q"].dtype == np.uint8 and whole["q"].shape == (4, 14)
    restored = decompress_array(whole)
    assert restored.shape == kernel.shape
    assert np.abs(restored - kernel).max() <= 0.5 * whole["scale"].max() + 1e-6
    with pytest.raises(ValueError, match="do not make"):
        decompress_array({**whole, "q": whole["q"][:, :-1]})


@pytest.mark.parametrize(("bits", "dtype", "tolerance"), [(8, np.int8, 0.02), (4, np.uint8, 0.06)])
def test_bits_option_is_checked_and_reaches_both_filters(bits: int, dtype: type, tolerance: float) -> None:
    from fedbrats.jobgen import compression_args

    for bad in (16, 2, True, "8"):
        with pytest.raises(ValueError, match="bits"):
            SVDUpdateCompressor(bits=bad)
        with pytest.raises(ValueError, match="bits"):
            compression_args(None, {"bits": bad}, 3)
    assert compression_args(None, True, 3) == {
        "energy_start": 0.95,
        "energy_end": 0.98,
        "error_feedback": False,
        "num_rounds": 3,
    }, "a job names bits only when it quantises"
    assert compression_args(None, {"bits": 8}, 3)["bits"] == 8
    assert compression_args(None, {"bits": 4}, 3)["bits"] == 4
    # The pair on a payload: the update travels as quantised factors and comes back within the rounding.
    weights = {"w": _with_singular_values(32, 40, SINGULAR).astype(np.float32), "b": np.ones(3, np.float32)}
    site, server = SVDUpdateCompressor(0.99, 0.99, bits=bits), SVDDecompressor()
    up = from_shareable(site.process(_shareable(DataKind.WEIGHT_DIFF, weights, 0), _ctx()))
    assert up.data["w"]["u"].dtype == dtype and up.data["b"].dtype == np.float32
    rebuilt = from_shareable(server.process(up.to_shareable(), _ctx("site-1"))).data
    np.testing.assert_array_equal(rebuilt["b"], weights["b"])
    assert float(np.sum((rebuilt["w"] - weights["w"]) ** 2)) < tolerance * float(np.sum(SINGULAR**2))
    # The downlink: the site rebuilds exactly the view the server keeps for it (the server's error feedback then
    # also carries the rounding), and the second broadcast travels as quantised factors.
    broadcast, site_in = SVDBroadcastCompressor(bits=bits, num_rounds=2), SVDDecompressor()
    site_in.process(broadcast.process(_shareable(DataKind.WEIGHTS, weights, 0), _ctx("site-1")), _ctx())
    moved = {
        "w": weights["w"] + _with_singular_values(32, 40, SINGULAR[:2], seed=4).astype(np.float32),
        "b": weights["b"],
    }
    down = broadcast.process(_shareable(DataKind.WEIGHTS, moved, 1), _ctx("site-1"))
    assert from_shareable(down).data["w"]["vt"].dtype == dtype
    held = from_shareable(site_in.process(down, _ctx())).data
    view = broadcast._views[broadcast._site_view["site-1"]]
    np.testing.assert_array_equal(held["w"], view["w"])
    assert float(np.sum((held["w"] - moved["w"]) ** 2)) < tolerance * float(np.sum(SINGULAR[:2] ** 2))


def test_every_compression_option_reaches_the_exported_job() -> None:
    """NVFlare's Job API exports a component's arguments from its attributes: an option the filter does not keep
    under its own name is silently dropped from the job (it once dropped ``bits``)."""
    from fedbrats.recipe import job_files

    asked = {"energy_start": 0.8, "energy_end": 0.9, "error_feedback": True, "bits": 8}
    files = job_files("fedavg", num_rounds=3, compression=asked)
    client = json.loads(files["app/config/config_fed_client.json"])
    server = json.loads(files["app/config/config_fed_server.json"])

    def filter_args(config: dict, chains: str, cls: str) -> list[dict]:
        return [f["args"] for chain in config[chains] for f in chain["filters"] if f["path"].endswith(cls)]

    uplink = filter_args(client, "task_result_filters", "SVDUpdateCompressor")
    downlink = filter_args(server, "task_data_filters", "SVDBroadcastCompressor")
    assert uplink and downlink
    for args in uplink:
        assert args == {**asked, "num_rounds": 3}
    for args in downlink:
        assert args == {k: v for k, v in {**asked, "num_rounds": 3}.items() if k != "error_feedback"}


# ---- the distillation terms ----------------------------------------------------------------------------------
def test_adaptive_scale_is_the_inverse_task_loss_sum_and_detached() -> None:
    a = torch.tensor(2.0, requires_grad=True)
    scale = adaptive_kd_scale(a, torch.tensor(3.0))
    assert float(scale) == pytest.approx(0.2) and not scale.requires_grad
    assert float(adaptive_kd_scale(torch.tensor(0.0), torch.tensor(0.0))) == pytest.approx(1e6)
    with pytest.raises(ValueError, match="task_loss_a"):
        adaptive_kd_scale(torch.ones(2), torch.tensor(1.0))


def test_decision_kd_known_values() -> None:
    same = torch.randn(1, 3, 2, 2, 2)
    assert float(logit_kd_loss(same, same.clone(), 2.0)) == pytest.approx(0.0, abs=1e-6)
    # Student at 0 (p = 0.5), teacher logit 2 at T = 2 (q = sigmoid(1)): T^2 * KL(q || 0.5).
    q = 1 / (1 + math.exp(-1))
    expected = 4 * (q * math.log(q / 0.5) + (1 - q) * math.log((1 - q) / 0.5))
    value = logit_kd_loss(torch.zeros(1, 1, 2, 2, 2), torch.full((1, 1, 2, 2, 2), 2.0), 2.0)
    assert float(value) == pytest.approx(expected, rel=1e-5)


def test_representation_kd_known_values_and_projection() -> None:
    assert float(feature_mse(torch.ones(1, 2, 2, 2, 2), torch.zeros(1, 2, 2, 2, 2))) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="same shape"):
        feature_mse(torch.ones(1, 2, 2, 2, 2), torch.ones(1, 3, 2, 2, 2))
    same = FeatureProjection(4, 4)
    x = torch.randn(1, 4, 2, 2, 2)
    assert same(x) is x and not list(same.parameters()), "equal widths: the identity, nothing to learn"
    proj = FeatureProjection(1, 2)
    with torch.no_grad():
        proj.conv.weight.copy_(torch.tensor([1.0, 2.0]).view(2, 1, 1, 1, 1))
        proj.conv.bias.zero_()
    x = torch.ones(1, 1, 2, 2, 2, requires_grad=True)
    # Projected [1, 2] per voxel against a target of zeros: MSE = (1 + 4) / 2.
    loss = feature_mse(proj(x, frozen=True), torch.zeros(1, 2, 2, 2, 2))
    assert float(loss) == pytest.approx(2.5)
    loss.backward()
    assert proj.conv.weight.grad is None and x.grad is not None, "frozen: the features learn, the projection not"
    feature_mse(proj(x), torch.zeros(1, 2, 2, 2, 2)).backward()
    assert proj.conv.weight.grad is not None
    with pytest.raises(ValueError, match="in_channels"):
        FeatureProjection(0, 2)


# ---- the site method -------------------------------------------------------------------------------------------
def _batch() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    label = (torch.rand(1, 3, 16, 16, 16) > 0.7).float()
    return {"image": torch.randn(1, 4, 16, 16, 16), "label": label, "modality_mask": torch.ones(1, 4)}


def test_method_steps_personal_model_and_returns_the_shared_loss(tmp_path) -> None:
    torch.manual_seed(0)
    shared = BraTSSegResNet(init_filters=8)
    method = FedMICMethod(personal_network={"name": "segresnet", "args": {"init_filters": 16}})
    method.setup(shared, ("t1", "t1ce", "t2", "flair"), torch.device("cpu"))
    assert method.projection.conv.in_channels == 64 and method.projection.conv.out_channels == 128
    assert set(method.personal.state_dict()).isdisjoint({f"personal.{k}" for k in shared.state_dict()})
    before = {k: v.clone() for k, v in method.personal.state_dict().items()}
    loss, terms = method.training_loss(shared, _batch(), epoch=0)
    assert torch.isfinite(loss) and loss.requires_grad
    changed = [k for k, v in method.personal.state_dict().items() if not torch.equal(v, before[k])]
    assert changed, "the personalised model steps inside training_loss"
    assert all(p.grad is None for p in method.personal.parameters())
    expected_scale = min(1.0, 1 / (terms["dice"] + terms["bce"] + terms["personal_dice"] + terms["personal_bce"]))
    assert terms["kd_scale"] == pytest.approx(expected_scale, rel=1e-4)
    loss.backward()
    assert all(p.grad is not None for p in shared.parameters() if p.requires_grad)
    assert method.projection.conv.weight.grad is None, "the shared loss leaves the projection alone"

    method.use_site_folder(str(tmp_path))
    method.on_round_end(shared, 0)
    assert os.path.isfile(tmp_path / PERSONAL_STATE_FILE)
    resumed = FedMICMethod()
    resumed.setup(shared, ("t1",), torch.device("cpu"))
    resumed.use_site_folder(str(tmp_path))
    for k, v in method.personal.state_dict().items():
        assert torch.equal(resumed.personal.state_dict()[k], v)


SMALL_PERSONAL = {"name": "segresnet", "args": {"init_filters": 8, "blocks_down": [1, 1, 1], "blocks_up": [1, 1]}}


def _small_method(**kwargs: object) -> FedMICMethod:
    shared = BraTSSegResNet(init_filters=8, blocks_down=(1, 1, 1), blocks_up=(1, 1))
    method = FedMICMethod(personal_network=SMALL_PERSONAL, **kwargs)
    method.setup(shared, ("t1", "t1ce", "t2", "flair"), torch.device("cpu"))
    return method


@pytest.mark.parametrize(
    ("schedule", "factors"),
    [("poly", [1.0, 0.5**0.9, 0.0]), ("constant", [1.0, 1.0, 1.0])],
)
def test_personal_lr_follows_its_schedule_over_the_run(schedule: str, factors: list[float]) -> None:
    method = _small_method(personal_lr=1e-2, personal_lr_schedule=schedule)
    assert method.optimizer.param_groups[0]["lr"] == pytest.approx(1e-2)
    for progress, factor in zip((0.0, 0.5, 1.0), factors, strict=True):
        method.on_train_step(progress * 10, progress)
        assert all(g["lr"] == pytest.approx(1e-2 * factor, abs=1e-12) for g in method.optimizer.param_groups)
        assert method.current_personal_lr == pytest.approx(1e-2 * factor, abs=1e-12)
    method.on_train_step(3.0, None)  # the run's length unknown: the rate stays (as the trainer's)
    assert method.optimizer.param_groups[0]["lr"] == pytest.approx(1e-2 * factors[-1], abs=1e-12)


def test_personal_lr_defaults_to_the_jobs() -> None:
    method = FedMICMethod(personal_network=SMALL_PERSONAL)
    assert method.personal_lr_schedule == "poly"
    method.job_lr = 5e-4  # the trainer sets it before setup
    method.setup(BraTSSegResNet(init_filters=8, blocks_down=(1, 1, 1), blocks_up=(1, 1)), ("t1",), torch.device("cpu"))
    assert method.optimizer.param_groups[0]["lr"] == pytest.approx(5e-4)
    method.on_train_step(5.0, 0.5)
    assert method.optimizer.param_groups[0]["lr"] == pytest.approx(5e-4 * 0.5**0.9)


def test_best_personal_model_is_written_only_when_validation_improves(tmp_path) -> None:
    method = _small_method()
    method.use_site_folder(str(tmp_path))
    best = tmp_path / PERSONAL_BEST_FILE
    seen: list[str] = []

    def score(dice: float):
        def fake(model: torch.nn.Module, prefix: str) -> dict[str, float]:
            assert model is method.personal
            seen.append(prefix)
            return {f"{prefix}mean_dice": dice, f"{prefix}dice_WT": dice, f"{prefix}mean_hd95": math.nan}

        return fake

    for current_round, dice, written in ((1, 0.3, True), (2, 0.2, False), (3, 0.3, False), (4, 0.5, True)):
        method.on_global_model(method.model, {}, current_round)
        with torch.no_grad():  # a different personalised model each round
            next(method.personal.parameters()).add_(1.0)
        metrics = method.site_model_metrics(score(dice))
        assert metrics == {PERSONAL_KEY_METRIC: dice, "val_personal_dice_WT": dice}, "non-finite scores left out"
        saved = torch.load(best, weights_only=True)
        assert (saved["round"] == current_round) is written
        if written:
            assert saved[PERSONAL_KEY_METRIC] == dice and set(saved) == {
                "round",
                "network",
                "model",
                PERSONAL_KEY_METRIC,
            }
            for k, v in method.personal.state_dict().items():
                assert torch.equal(saved["model"][k], v)
    assert seen == [PERSONAL_METRIC_PREFIX] * 4 and PERSONAL_METRIC_PREFIX == "val_personal_"
    assert os.stat(best).st_mode & 0o777 == 0o600, "a site-only model: private"
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())
    resumed = _small_method()
    resumed.use_site_folder(str(tmp_path))
    assert resumed.best_dice == 0.5, "a restarted site keeps the best so far"


def test_personal_metrics_pass_the_servers_update_checks() -> None:
    from fedbrats.federated.server.update_checks import metrics_problem

    metrics = {"val_mean_dice": 0.4, PERSONAL_KEY_METRIC: 0.5, "val_personal_dice_WT": 0.6, "val_personal_hd95_WT": 9.0}
    assert metrics_problem(metrics) is None


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("adaptive", lambda r, raw: raw),
        ("adaptive_clipped", lambda r, raw: min(raw, 0.8)),
        ("fixed", lambda r, raw: 0.8),
        ("ramp", lambda r, raw: 0.8 * min(1.0, r / 4)),
    ],
)
def test_kd_scale_modes_across_rounds(mode: str, expected) -> None:
    method = FedMICMethod(kd_scale=mode, kd_scale_max=0.8, kd_ramp_rounds=4)
    for task in (3.0, 0.5, 0.05):  # task losses high (s ~ 0.17) to near zero (s = 10)
        raw = 1 / (2 * task)
        for rounds_done in (0.0, 1.0, 2.5, 4.0, 9.0):
            method.on_train_step(rounds_done, None)
            value = float(method.kd_scale_value(torch.tensor(task), torch.tensor(task)))
            assert value == pytest.approx(expected(rounds_done, raw), rel=1e-5)
            if mode != "adaptive":
                assert value <= 0.8 + 1e-7, "bounded"


def test_kd_scale_default_is_clipped_at_one_and_logged() -> None:
    method = FedMICMethod()
    assert (method.kd_scale, method.kd_scale_max, method.kd_ramp_rounds) == ("adaptive_clipped", 1.0, 5)
    assert float(method.kd_scale_value(torch.tensor(0.01), torch.tensor(0.02))) == pytest.approx(1.0)
    assert float(method.kd_scale_value(torch.tensor(2.0), torch.tensor(2.0))) == pytest.approx(0.25)
    method = _small_method(kd_scale="ramp", kd_ramp_rounds=2)
    method.on_train_step(1.0, 0.25)
    _, terms = method.training_loss(method.model, _batch(), epoch=0)
    assert terms["kd_scale"] == pytest.approx(0.5) and terms["personal_lr"] == pytest.approx(3e-3 * 0.75**0.9)


def test_the_trainer_drives_the_personal_schedule_and_scores_the_personal_model(tiny_federation: str, tmp_path) -> None:
    """The trainer's progress reaches the personalised optimiser each step, and its segmentation validation scores
    the personalised model beside the site's (the same code path, ``val_personal_*``)."""
    from fedbrats.data.site_config import load_site_config
    from fedbrats.federated.client.trainer import SiteTrainer, TrainConfig

    shared = BraTSSegResNet(init_filters=8)
    training = {
        "method": "fedmic",
        "method_args": {},  # the default personalised network (a job cannot pass a dict option, see registry)
        "epochs_per_round": 1,
        "max_steps_per_epoch": 2,
        "lr": 2e-3,
        "data": {"roi_size": [16, 16, 16], "batch_size": 1},
        "device": "cpu",
        "precision": "fp32",
    }
    trainer = SiteTrainer(load_site_config(tiny_federation, "site-1"), TrainConfig.from_dict(training), shared)
    trainer.method.use_site_folder(str(tmp_path))
    steps = trainer.train_round(2, total_rounds=4)["num_steps"]
    rounds_done = 2 + (steps - 1) / steps  # at the last step of one epoch
    assert trainer.method.current_personal_lr == pytest.approx(2e-3 * lr_factor("poly", rounds_done / 4))
    assert trainer.method.current_personal_lr < 2e-3 * 0.99
    assert trainer.method.rounds_done == pytest.approx(rounds_done)
    metrics = trainer.validate()
    assert {"val_mean_dice", PERSONAL_KEY_METRIC, "val_personal_hd95_WT"} <= set(metrics)
    assert not any(k.startswith("val_personal_mean_dice_min") for k in metrics)
    assert os.path.isfile(tmp_path / PERSONAL_BEST_FILE)
    assert set(trainer.validate(model=trainer.method.personal)) == {
        k for k in metrics if not k.startswith("val_personal")
    }, "scoring another model adds no personal metrics"


def test_method_options_are_checked_by_name() -> None:
    for kwargs, arg in (
        ({"decision_kd_weight": -1.0}, "decision_kd_weight"),
        ({"kd_temperature": 0.0}, "kd_temperature"),
        ({"personal_lr": 0.0}, "personal_lr"),
        ({"personal_network": {"args": {}}}, "personal_network"),
        ({"kd_scale": "clipped"}, "kd_scale"),
        ({"kd_scale": None}, "kd_scale"),
        ({"kd_scale_max": 0.0}, "kd_scale_max"),
        ({"kd_scale_max": math.inf}, "kd_scale_max"),
        ({"kd_scale_max": "1"}, "kd_scale_max"),
        ({"kd_ramp_rounds": 0}, "kd_ramp_rounds"),
        ({"kd_ramp_rounds": 2.5}, "kd_ramp_rounds"),
        ({"personal_lr_schedule": "step"}, "personal_lr_schedule"),
    ):
        with pytest.raises(ValueError, match=arg):
            FedMICMethod(**kwargs)

    class LogitsOnly(torch.nn.Module):
        def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return x[:, :3]

    with pytest.raises(ValueError, match="intermediate features"):
        logits_and_features(LogitsOnly(), torch.zeros(1, 4, 8, 8, 8), torch.ones(1, 4))


def test_job_turns_compression_on_and_any_job_can() -> None:
    from fedbrats.recipe import FILTERED_TASKS, job_files

    def configs(name: str, **options) -> dict[str, dict]:
        files = job_files(name, **options)
        return {side: json.loads(files[f"app/config/config_fed_{side}.json"]) for side in ("server", "client")}

    def filters(cfg: dict, side: str, kind: str) -> dict[str, list[str]]:
        """Per task (NVFlare 2.9 looks chains up by exact task name), the filters' class names."""
        chains = cfg[side].get(kind, [])
        assert all(len(chain["tasks"]) == 1 for chain in chains), "one chain per task"
        return {chain["tasks"][0]: [f["path"].rsplit(".", 1)[-1] for f in chain["filters"]] for chain in chains}

    def every_task(names: list[str]) -> dict[str, list[str]]:
        # train and validate; a site's own model for the cross-site evaluation (submit_model) goes whole, audited
        return {task: names for task in FILTERED_TASKS}

    fedmic = configs("fedmic")
    assert filters(fedmic, "server", "task_data_filters") == every_task(["SVDBroadcastCompressor"])
    assert filters(fedmic, "server", "task_result_filters") == every_task(["SVDDecompressor"])
    assert filters(fedmic, "client", "task_data_filters") == every_task(["PayloadAuditFilter", "SVDDecompressor"])
    assert filters(fedmic, "client", "task_result_filters") == {
        **every_task(["SVDUpdateCompressor", "PayloadAuditFilter"]),
        "submit_model": ["PayloadAuditFilter"],
    }
    audit_in = fedmic["client"]["task_data_filters"][0]["filters"][0]["args"]
    assert audit_in == {"file_name": "payload_audit_in.jsonl"}
    assert fedmic["client"]["executors"][0]["executor"]["args"]["params_transfer_type"] == "DIFF"
    off = configs("fedmic", compression=False)
    assert not filters(off, "server", "task_data_filters") and not filters(off, "client", "task_data_filters")
    assert "params_transfer_type" not in off["client"]["executors"][0]["executor"]["args"], "FULL, the default"
    for job in ("fedavg", "fedkd", "mstkd"):
        assert not filters(configs(job), "server", "task_data_filters")
        on = configs(job, num_rounds=3, compression={"energy_end": 0.99})
        for side, kind in (("server", "task_data_filters"), ("client", "task_result_filters")):
            compressors = [f for chain in on[side][kind] for f in chain["filters"] if ".SVD" in f["path"]]
            assert len(compressors) == len(FILTERED_TASKS)
            assert all(f["args"] == {"energy_end": 0.99, "num_rounds": 3} for f in compressors), "defaults left out"
        assert on["client"]["executors"][0]["executor"]["args"]["params_transfer_type"] == "DIFF"
    with pytest.raises(ValueError, match="energy_start"):
        job_files("fedavg", compression={"energy_start": 0.0})
    with pytest.raises(ValueError, match="compression takes"):
        job_files("fedavg", compression={"rank": 3})
    with pytest.raises(ValueError, match="error_feedback"):
        job_files("fedavg", compression={"error_feedback": "yes"})
    feedback = configs("fedavg", num_rounds=3, compression={"error_feedback": True})
    site_chain = [f for chain in feedback["client"]["task_result_filters"] for f in chain["filters"]]
    assert all(f["args"].get("error_feedback") is True for f in site_chain if f["path"].endswith("UpdateCompressor"))
    server_chain = [f for chain in feedback["server"]["task_data_filters"] for f in chain["filters"]]
    assert all("error_feedback" not in f["args"] for f in server_chain), "the downlink always feeds back"


def test_compression_options_of_the_entry_points() -> None:
    """`fedbrats simulate` and `python -m fedbrats.job` share --compression and --svd (fedbrats.job's options)."""
    from fedbrats.commands import command_parser
    from fedbrats.job import add_simulate_arguments, job_options

    parser = command_parser("simulate")
    add_simulate_arguments(parser)

    def compression(*argv: str):
        return job_options(parser.parse_args(["fedavg", "--workspace", "w", *argv])).compression

    assert compression() is None, "the job's default"
    assert compression("--compression", "on") is True and compression("--compression", "off") is False
    assert compression("--svd", "energy_end=0.99", "--svd", "energy_start=0.9") == {
        "energy_end": 0.99,
        "energy_start": 0.9,
    }
    with pytest.raises(ValueError, match="--compression off"):
        compression("--compression", "off", "--svd", "energy_end=0.99")


# ---- the job in the simulator ------------------------------------------------------------------------------------
TINY = {"epochs_per_round": 1, "data": {"roi_size": [16, 16, 16], "batch_size": 1}}


@pytest.mark.integration
def test_fedmic_two_rounds_and_payload_audit(tiny_federation: str, tmp_path) -> None:
    """jobs/fedmic runs 2 rounds; what crosses the wire in training is the shared model only (compressed from round 1
    on), never the personalised model, which stays in each site's run folder until the federated evaluation at the
    end: then each site submits it once, whole, and sends aggregate test scores of every model."""
    from fedbrats.networks import build_from_spec
    from fedbrats.runs import PAYLOAD_AUDIT_FILE, PAYLOAD_AUDIT_IN_FILE
    from fedbrats.simulate import simulate, simulator_workspace

    result = simulate("fedmic", str(tmp_path), sites_file=tiny_federation, num_rounds=2, training=TINY)
    rounds = [r for r in result.history if not r.get("final_validation")]
    assert [r["round"] for r in rounds] == [0, 1]
    for r in rounds:
        assert sorted(r["sites"]) == ["site-1", "site-2", "site-3", "site-4"] and not r["rejected"]
        terms = r["sites"]["site-2"]["loss_terms"]
        assert {"decision_kd", "representation_kd", "personal_dice", "kd_scale"} <= set(terms)
        assert all(math.isfinite(v) for v in terms.values())
    final = result.history[-1]
    assert final.get("final_validation") and math.isfinite(final["aggregated"]["val_mean_dice"])

    with open(os.path.join(result.run_dir, "model_spec.json"), encoding="utf-8") as f:
        shared_shapes = {k: list(v.shape) for k, v in build_from_spec(json.load(f)).state_dict().items()}
    allowed_meta = BASE_META_KEYS | FedMICMethod.payload_keys
    allowed_meta |= {"initial_metrics", "CURRENT_ROUND", "TOTAL_ROUNDS", "JOB_ID", "SITE_NAME", "current_round"}
    for site in ("site-1", "site-2", "site-3", "site-4"):
        run_dir = os.path.join(simulator_workspace(str(tmp_path)), site, "simulate_job")
        personal = torch.load(os.path.join(run_dir, PERSONAL_STATE_FILE), weights_only=True)
        assert personal["round"] == 1
        personal_shapes = {k: list(v.shape) for k, v in personal["model"].items()}
        with open(os.path.join(run_dir, PAYLOAD_AUDIT_FILE), encoding="utf-8") as f:
            everything = [json.loads(line) for line in f]
        # The federated evaluation: aggregate test scores of each of the 6 models (2 global, 4 personalised) ...
        scores = [r for r in everything if r["kind"] == "METRICS"]
        assert len(scores) == 6 and all(k.startswith(TEST_PREFIX) for r in scores for k in r["data"])
        assert all(d["type"] == "float" for r in scores for d in r["data"].values())
        # ... and the site's best personalised model, submitted once, whole, with its network spec
        submitted = [r for r in everything if MODEL_SPEC_KEY in r["meta"]]
        assert len(submitted) == 1 and set(submitted[0]["meta"]) - allowed_meta <= {MODEL_SPEC_KEY}
        assert {k: d["shape"] for k, d in submitted[0]["data"].items()} == personal_shapes
        sent = [r for r in everything if r not in scores and r not in submitted]
        train = [r for r in sent if "num_steps" in r["meta"]]
        assert [r["round"] for r in train] == [0, 1] and all(r["kind"] == "WEIGHT_DIFF" for r in train)
        for record in sent:
            assert set(record["data"]) == set(shared_shapes), f"{site} sent other weights than the shared model's"
            assert not set(record["meta"]) - allowed_meta, f"{site} sent undeclared items"
            for name, desc in record["data"].items():
                if "items" in desc:  # factors: u (out x k) and vt (k x in*k*k*k) of the shared weight's shape
                    assert desc["items"]["shape"]["shape"] == [len(shared_shapes[name])]
                    assert desc["items"]["u"]["shape"][0] == shared_shapes[name][0]
                else:
                    assert desc["shape"] == shared_shapes[name], f"{site}: {name} is not the shared weight"
        # The personalised model (twice the filters) has no weight of the shared shapes under its names.
        assert any(personal_shapes[k] != shared_shapes.get(k) for k in personal_shapes)
        with open(os.path.join(run_dir, PAYLOAD_AUDIT_IN_FILE), encoding="utf-8") as f:
            arrived = [json.loads(line) for line in f]
        # The models of the federated evaluation arrive whole (never as factors), under their own names.
        evaluated = [r for r in arrived if any(k.startswith(CROSS_SITE_PARAM_PREFIX) for k in r["data"])]
        assert len(evaluated) == 6 and all(r["kind"] == "WEIGHTS" for r in evaluated)
        assert not any("items" in d for r in evaluated for d in r["data"].values())
        arrived = [r for r in arrived if r not in evaluated and r["kind"] != "METRICS"]
        # The training rounds share one filter pair (the "train" chain): full weights first, then differences. The
        # final validation is another task, whose pair has no view of the site yet: it gets the full model.
        training, final = arrived[:-1], arrived[-1]
        assert [r["round"] for r in training] == [0, 1]
        assert training[0]["kind"] == "WEIGHTS" and all(r["kind"] == "WEIGHT_DIFF" for r in training[1:])
        assert any("items" in d for r in training[1:] for d in r["data"].values()), "later broadcasts are factors"
        assert final["kind"] == "WEIGHTS"
