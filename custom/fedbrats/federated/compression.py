"""SVD-compressed model updates, as NVFlare filters any job can switch on (``compression`` in the job options).

The codec follows FedKD (Wu et al., Nat. Commun. 2022; the rule of its public code): every weight update with two or
more dimensions (conv kernels reshaped to ``out x (in*k*k*k)``) is factorised by SVD, and only the top singular
triplets whose energy (sum of squared singular values) reaches a fraction ``e`` of the total are sent; ``e`` rises
linearly over the rounds (0.95 to 0.98). 1-D weights (biases, norms) and non-float arrays go whole.

Optionally (``bits=8`` or ``bits=4``, not in FedKD) what goes out is also quantised to integers: each singular
vector of the factors, and each row of a weight that goes whole as a matrix, with one float32 scale (symmetric, its
largest magnitude maps to the largest level: 127 for int8; 7 for 4 bits, two values packed in each uint8 byte).
This divides the bytes of the factors by four (eight); the rounding error of a value is at most half its vector's
scale. 1-D weights stay float.

Where the filters sit (added by :class:`fedbrats.recipe.FedBratsRecipe` when compression is on, one chain per task):

==========================  ============================  ==============================================
filter                      where                         what
==========================  ============================  ==============================================
:class:`SVDUpdateCompressor`    site, task results (out)      the site's update (``WEIGHT_DIFF``) -> factors
:class:`SVDDecompressor`        server, task results (in)     factors -> the update (still ``WEIGHT_DIFF``)
:class:`SVDBroadcastCompressor` server, task data (out)       global weights -> factors of (global - what
                                                              the site holds)
:class:`SVDDecompressor`        site, task data (in)          factors + what the site holds -> ``WEIGHTS``
==========================  ============================  ==============================================

Our choices (docs/fedmic.md):

* Sites send differences (``params_transfer_type`` DIFF): the update is the trained weights minus the weights
  the site received, computed by NVFlare's Client API, so the site-side filter needs no state (unless its
  optional uplink error feedback is on: then it keeps what the last factors left out, at the site). The server rebuilds
  the difference and the controller adds it to its own global model.
* Downlink with error feedback: the server keeps, per site, the weights that site holds (its *view*), and sends
  the compressed ``global - view``; the view then moves by exactly what was sent. What compression leaves out of
  one broadcast stays in ``global - view`` and goes out with the next one, so the sites track the server's exact
  global model (the one saved and selected) to within one round's compression error. A site that has no view yet
  (first contact, a restarted server) gets the full weights.
* Each broadcast names the view it is relative to (a token); a site holding another view (it restarted, or a
  task was lost on the way) stops with an error instead of training on wrong weights.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from nvflare.apis.dxo import DXO, DataKind
from nvflare.apis.dxo_filter import DXOFilter
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.app_constant import AppConstants

from fedbrats.federated.protocol import SVD_META_KEY

logger = logging.getLogger(__name__)

#: Default energy thresholds at the first and the last round (FedKD's code).
DEFAULT_ENERGY_START = 0.95
DEFAULT_ENERGY_END = 0.98
#: Keys of a compressed weight: ``u`` (left vectors scaled by the singular values), ``vt`` (right vectors) and the
#: weight's ``shape``.
FACTOR_KEYS = frozenset({"u", "vt", "shape"})
#: Keys of quantised factors (``bits`` 8 or 4): ``u`` and ``vt`` as integers with one scale per singular vector.
QUANTIZED_FACTOR_KEYS = frozenset({"u", "vt", "u_scale", "vt_scale", "shape"})
#: Keys of a quantised whole weight (``bits`` 8 or 4): integer rows ``q`` of the weight as a matrix, one scale per
#: row.
QUANTIZED_KEYS = frozenset({"q", "scale", "shape"})
#: The largest integer level of each quantised width (symmetric: levels ``-top .. top``).
_TOP_LEVEL = {8: 127, 4: 7}
#: What the ``bits`` option takes: 32 (float factors, FedKD's codec), 8 (int8) or 4 (two 4-bit values a byte).
SUPPORTED_BITS = (32, *_TOP_LEVEL)


def energy_threshold(
    current_round: int,
    num_rounds: int,
    start: float = DEFAULT_ENERGY_START,
    end: float = DEFAULT_ENERGY_END,
) -> float:
    """The energy kept at ``current_round``: ``start`` at round 0, rising linearly to ``end`` at the last round.

    Rounds past the last (the final validation) keep ``end``.

    Raises:
        ValueError: ``num_rounds`` < 1, a negative ``current_round``, or thresholds outside (0, 1] or decreasing.
    """
    if num_rounds < 1:
        raise ValueError(f"num_rounds must be >= 1, got {num_rounds}")
    if current_round < 0:
        raise ValueError(f"current_round must be >= 0, got {current_round}")
    check_energies(start, end)
    if num_rounds == 1:
        return end
    return start + (end - start) * min(current_round, num_rounds - 1) / (num_rounds - 1)


def check_energies(start: float, end: float) -> None:
    """Raise a ValueError naming ``energy_start`` or ``energy_end`` when outside (0, 1] or decreasing."""
    for arg, value in (("energy_start", start), ("energy_end", end)):
        if not 0.0 < value <= 1.0:
            raise ValueError(f"{arg} must be in (0, 1], got {value}")
    if end < start:
        raise ValueError(f"energy_end must be >= energy_start, got {end} < {start}")


def energy_rank(singular_values: np.ndarray, energy: float) -> int:
    """The smallest ``k`` whose first ``k`` squared singular values hold at least ``energy`` of their sum.

    Args:
        singular_values: in decreasing order (as ``np.linalg.svd`` returns them).
        energy: the fraction to keep; >= 1 keeps every singular value.

    Returns:
        ``k`` in ``[0, len(singular_values)]``: 0 for an all-zero matrix, ``len`` when ``energy >= 1``, otherwise at
        least 1.

    Raises:
        ValueError: ``energy`` <= 0.
    """
    if energy <= 0:
        raise ValueError(f"energy must be > 0, got {energy}")
    s2 = np.square(np.asarray(singular_values, dtype=np.float64))
    total = float(s2.sum())
    if total == 0.0:
        return 0
    if energy >= 1.0:
        return len(s2)
    cumulative = np.cumsum(s2)
    # The smallest k with cumulative[k-1] >= energy * total; rounding can leave the full sum a hair below it.
    return int(min(np.searchsorted(cumulative, energy * total, side="left") + 1, len(s2)))


def is_factors(value: Any) -> bool:
    """Whether a payload item is a compressed weight (a dict of :data:`FACTOR_KEYS` or
    :data:`QUANTIZED_FACTOR_KEYS`)."""
    return isinstance(value, Mapping) and set(value) in (FACTOR_KEYS, QUANTIZED_FACTOR_KEYS)


def is_quantized(value: Any) -> bool:
    """Whether a payload item is a quantised whole weight (a dict of :data:`QUANTIZED_KEYS`)."""
    return isinstance(value, Mapping) and set(value) == QUANTIZED_KEYS


def check_bits(bits: int) -> None:
    """Raise a ValueError naming ``bits`` when it is not one of :data:`SUPPORTED_BITS`."""
    if isinstance(bits, bool) or bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {list(SUPPORTED_BITS)}, got {bits!r}")


def quantize_rows(matrix: np.ndarray, bits: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric quantisation of each row: ``q = round(row / scale)``, ``scale = max|row| / top`` (``top`` 127 for
    8 bits, 7 for 4 bits).

    Args:
        matrix: a 2-D float array.
        bits: 8 (int8 values) or 4 (values ``-7 .. 7``, two a byte: see :func:`pack_nibbles`).

    Returns:
        ``(q, scale)``: int8 of the matrix's shape (8 bits) or uint8 of ``(rows, ceil(cols / 2))`` (4 bits), and
        float32 of the matrix's number of rows (0 for an all-zero row).

    Raises:
        ValueError: ``bits`` not 8 or 4.
    """
    if bits not in _TOP_LEVEL:
        raise ValueError(f"bits must be one of {sorted(_TOP_LEVEL)} to quantise, got {bits!r}")
    top = _TOP_LEVEL[bits]
    m = np.asarray(matrix, dtype=np.float64)
    peak = np.abs(m).max(axis=1) if m.shape[1] else np.zeros(m.shape[0])
    scale = peak / top
    safe = np.where(scale > 0, scale, 1.0)
    q = np.clip(np.rint(m / safe[:, None]), -top, top).astype(np.int8)
    return (pack_nibbles(q) if bits == 4 else q), scale.astype(np.float32)


def dequantize_rows(q: np.ndarray, scale: np.ndarray, dtype: Any = np.float32, cols: int | None = None) -> np.ndarray:
    """Inverse of :func:`quantize_rows` (to within half a scale step per value).

    Args:
        q: int8 rows, or uint8 rows of packed 4-bit values.
        scale: one scale per row.
        dtype: the result's dtype.
        cols: the number of values per row of packed rows (required for uint8 ``q``).

    Raises:
        ValueError: packed rows without ``cols``, or whose width does not fit ``cols``.
    """
    q = np.asarray(q)
    if q.dtype == np.uint8:
        if cols is None:
            raise ValueError("packed 4-bit rows need their number of columns (cols)")
        q = unpack_nibbles(q, cols)
    return (np.asarray(q, dtype=np.float64) * np.asarray(scale, dtype=np.float64)[:, None]).astype(dtype)


def pack_nibbles(values: np.ndarray) -> np.ndarray:
    """Pack integers in ``-8 .. 7`` two to a byte along the last axis (low nibble first, offset by 8; an odd
    width is padded with a zero).

    Returns:
        uint8 of shape ``(..., ceil(n / 2))``.
    """
    v = np.asarray(values, dtype=np.int16) + 8
    if v.shape[-1] % 2:
        v = np.concatenate([v, np.full((*v.shape[:-1], 1), 8, dtype=v.dtype)], axis=-1)
    return (v[..., 0::2] | (v[..., 1::2] << 4)).astype(np.uint8)


def unpack_nibbles(packed: np.ndarray, cols: int) -> np.ndarray:
    """Inverse of :func:`pack_nibbles`: int8 of shape ``(..., cols)``.

    Raises:
        ValueError: ``packed``'s width is not ``ceil(cols / 2)``.
    """
    packed = np.asarray(packed, dtype=np.uint8)
    if packed.shape[-1] != (cols + 1) // 2:
        raise ValueError(f"packed width {packed.shape[-1]} does not hold {cols} 4-bit values")
    out = np.empty((*packed.shape[:-1], 2 * packed.shape[-1]), dtype=np.int8)
    out[..., 0::2] = (packed & 0x0F).astype(np.int8) - 8
    out[..., 1::2] = (packed >> 4).astype(np.int8) - 8
    return out[..., :cols]


def _whole(arr: np.ndarray, bits: int) -> np.ndarray | dict[str, Any]:
    if bits == 32:
        return arr
    q, scale = quantize_rows(arr.reshape(arr.shape[0], -1), bits)
    return {"q": q, "scale": scale, "shape": list(arr.shape)}


def _svd(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Thin SVD of a finite matrix, or None where LAPACK fails.

    NumPy's driver (divide and conquer, ``gesdd``) can report "SVD did not converge" on ill-conditioned matrices;
    the QR-based ``gesvd`` is slower and more robust. Where both fail the caller sends the weight whole: an
    update is never lost to the codec. (Non-finite updates never get here: they go as they are.)
    """
    try:
        return np.linalg.svd(matrix, full_matrices=False)
    except np.linalg.LinAlgError:
        import scipy.linalg

        try:
            return scipy.linalg.svd(matrix, full_matrices=False, lapack_driver="gesvd")
        except (np.linalg.LinAlgError, ValueError):
            logger.warning("SVD failed on a %s update; it is sent whole", matrix.shape)
            return None


def compress_array(array: Any, energy: float, bits: int = 32) -> np.ndarray | dict[str, Any]:
    """A weight update as its top singular factors, or whole where that is not smaller.

    A float array with two or more dimensions is reshaped to ``shape[0] x prod(shape[1:])`` and factorised; the
    rank is :func:`energy_rank`. It goes whole when ``energy >= 1``, when it is 1-D or not floating point, or when
    the factors would not be smaller than the matrix.

    Args:
        array: the weight (update).
        energy: the fraction of the squared singular values to keep.
        bits: 32 sends the factors (or the whole matrix) as they are; 8 or 4 quantises them with a float32 scale
            per singular vector (per row) (see :func:`quantize_rows`); 1-D and non-float arrays stay as they are.

    Returns:
        the array itself; ``{"u": (m, k), "vt": (k, n), "shape": [...]}`` in the array's dtype, with ``u`` the left
        singular vectors scaled by the singular values; with 8 bits, the same ``u`` and ``vt`` as int8 plus
        ``u_scale`` and ``vt_scale`` (``k`` each), or a whole matrix as ``{"q": int8 (m, n), "scale": (m,),
        "shape"}``; with 4 bits, ``u`` as packed uint8 rows of the left vectors, ``(k, ceil(m / 2))``, ``vt`` as
        ``(k, ceil(n / 2))``, and a whole matrix's ``q`` as ``(m, ceil(n / 2))``.

    Raises:
        ValueError: ``energy`` <= 0, or ``bits`` not 32, 8 or 4.
    """
    check_bits(bits)
    if energy <= 0:
        raise ValueError(f"energy must be > 0, got {energy}")
    arr = _to_numpy(array)
    if arr.ndim < 2 or not np.issubdtype(arr.dtype, np.floating) or arr.size == 0:
        return arr
    if energy >= 1.0:
        return _whole(arr, bits)
    rows = arr.shape[0]
    matrix = arr.reshape(rows, -1).astype(np.float64)
    if not np.isfinite(matrix).all():
        return arr  # whole and as it is: the receiver's update checks reject it and say why
    cols = matrix.shape[1]
    factors = _svd(matrix)
    if factors is None:
        return _whole(arr, bits)
    u, s, vt = factors
    k = energy_rank(s, energy)
    if k * (rows + cols) >= rows * cols:
        return _whole(arr, bits)
    left, right = u[:, :k] * s[:k], vt[:k]
    if bits == 32:
        return {"u": left.astype(arr.dtype), "vt": right.astype(arr.dtype), "shape": list(arr.shape)}
    q_left, left_scale = quantize_rows(left.T, bits)
    q_right, right_scale = quantize_rows(right, bits)
    return {
        # int8 left vectors go as columns (m x k), like the float factors; packed ones as rows (k x ceil(m / 2)).
        "u": q_left.T.copy() if bits == 8 else q_left,
        "vt": q_right,
        "u_scale": left_scale,
        "vt_scale": right_scale,
        "shape": list(arr.shape),
    }


def decompress_array(value: Any) -> np.ndarray:
    """Inverse of :func:`compress_array` (an uncompressed array comes back as it is; quantised values to within
    their rounding).

    Raises:
        ValueError: factors or quantised rows whose shapes do not fit each other or the weight's shape.
    """
    if is_quantized(value):
        q, shape = _to_numpy(value["q"]), [int(n) for n in value["shape"]]
        rows, cols = shape[0], int(np.prod(shape[1:]))
        width = (cols + 1) // 2 if q.dtype == np.uint8 else cols
        if q.shape != (rows, width):
            raise ValueError(f"quantised rows {q.shape} do not make a weight of shape {shape}")
        return dequantize_rows(q, _to_numpy(value["scale"]), cols=cols).reshape(shape)
    if not is_factors(value):
        return _to_numpy(value)
    u, vt, shape = _to_numpy(value["u"]), _to_numpy(value["vt"]), [int(n) for n in value["shape"]]
    rows, cols = shape[0], int(np.prod(shape[1:]))
    if u.dtype == np.uint8:  # packed 4-bit vectors: u holds the k left vectors as rows
        rank = u.shape[0]
        if u.shape != (rank, (rows + 1) // 2) or vt.shape != (rank, (cols + 1) // 2):
            raise ValueError(f"packed factors {u.shape} x {vt.shape} do not make a weight of shape {shape}")
    elif u.shape[0] != rows or vt.shape[-1] != cols or u.shape[1] != vt.shape[0]:
        raise ValueError(f"factors {u.shape} x {vt.shape} do not make a weight of shape {shape}")
    if "u_scale" in value:
        rank = vt.shape[0]
        u_scale, vt_scale = _to_numpy(value["u_scale"]), _to_numpy(value["vt_scale"])
        if u_scale.shape != (rank,) or vt_scale.shape != (rank,):
            raise ValueError(f"scales {u_scale.shape} and {vt_scale.shape} do not fit {rank} singular vectors")
        if u.dtype == np.uint8:
            u = dequantize_rows(u, u_scale, cols=rows).T
        else:
            u = dequantize_rows(u.T, u_scale).T
        vt = dequantize_rows(vt, vt_scale, cols=cols)
    elif u.dtype == np.uint8:
        raise ValueError("packed 4-bit factors need their scales (u_scale, vt_scale)")
    return (u @ vt).reshape(shape).astype(u.dtype, copy=False)


def _packed_bytes(packed: Any) -> int:
    if isinstance(packed, Mapping):
        return sum(_to_numpy(v).nbytes for k, v in packed.items() if k != "shape")
    return _to_numpy(packed).nbytes


@dataclass
class CompressionStats:
    """Sizes of one compressed payload.

    Attributes:
        energy: the threshold used.
        dense_bytes: bytes of the arrays before compression.
        sent_bytes: bytes of what is sent (factors and whole arrays).
        compressed: weights sent as factors.
        whole: weights sent whole.
    """

    energy: float
    dense_bytes: int = 0
    sent_bytes: int = 0
    compressed: int = 0
    whole: int = 0

    @property
    def ratio(self) -> float:
        """Sent over dense bytes."""
        return self.sent_bytes / max(self.dense_bytes, 1)


def compress_params(
    params: Mapping[str, Any], energy: float, bits: int = 32
) -> tuple[dict[str, Any], CompressionStats]:
    """:func:`compress_array` of every weight, with the sizes before and after."""
    stats = CompressionStats(energy)
    out: dict[str, Any] = {}
    for name, value in params.items():
        arr = _to_numpy(value)
        packed = compress_array(arr, energy, bits)
        stats.dense_bytes += arr.nbytes
        if is_factors(packed):
            stats.compressed += 1
        else:
            stats.whole += 1
        stats.sent_bytes += _packed_bytes(packed)
        out[name] = packed
    return out, stats


def decompress_params(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """:func:`decompress_array` of every item."""
    return {name: decompress_array(value) for name, value in params.items()}


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor
        return value.detach().cpu().numpy()
    return np.asarray(value)


def _fingerprint(params: Mapping[str, Any]) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(params):
        arr = np.ascontiguousarray(_to_numpy(params[name]))
        digest.update(name.encode())
        digest.update(str(arr.dtype).encode())
        digest.update(arr.tobytes())
    return digest.hexdigest()


class _ScheduledCompressor(DXOFilter):
    """A compressing filter with the energy schedule of :func:`energy_threshold` (the common part of both).

    Args:
        energy_start: energy kept at round 0.
        energy_end: energy kept at the last round (and in the final validation); 1.0 everywhere sends every
            weight whole.
        num_rounds: the job's rounds (the schedule's length).
        bits: 32 sends float factors (FedKD's codec); 8 (4) sends them, and matrices that go whole, as 8-bit
            (4-bit) integers with a float32 scale per vector (see the module docstring).

    Raises:
        ValueError: thresholds outside (0, 1] or decreasing, ``num_rounds`` < 1, or ``bits`` not 32, 8 or 4.
    """

    #: The DXO kinds the filter handles.
    handled_kinds: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        energy_start: float = DEFAULT_ENERGY_START,
        energy_end: float = DEFAULT_ENERGY_END,
        num_rounds: int = 1,
        bits: int = 32,
    ) -> None:
        kinds = list(self.handled_kinds)
        super().__init__(supported_data_kinds=kinds, data_kinds_to_filter=kinds)
        check_energies(energy_start, energy_end)
        check_bits(bits)
        if num_rounds < 1:
            raise ValueError(f"num_rounds must be >= 1, got {num_rounds}")
        # NVFlare's Job API exports a component's arguments from its attributes of the same names: keep each one.
        self.bits = bits
        self.energy_start = energy_start
        self.energy_end = energy_end
        self.num_rounds = num_rounds
        self._init_state()

    def _init_state(self) -> None:
        """Set up the filter's own state (none by default)."""

    def energy(self, shareable: Shareable) -> float:
        """The threshold of the round in ``shareable``'s header."""
        current_round = max(int(shareable.get_header(AppConstants.CURRENT_ROUND, 0) or 0), 0)
        return energy_threshold(current_round, self.num_rounds, self.energy_start, self.energy_end)


class SVDUpdateCompressor(_ScheduledCompressor):
    """Site task-result filter: the site's update (a ``WEIGHT_DIFF``) as SVD factors (see the module docstring).

    Args:
        energy_start: as :class:`_ScheduledCompressor`.
        energy_end: as :class:`_ScheduledCompressor`.
        num_rounds: as :class:`_ScheduledCompressor`.
        bits: as :class:`_ScheduledCompressor`.
        error_feedback: keep what the factors left out of each update (update minus its reconstruction) at the
            site and add it to the next update before compressing (error feedback, as the downlink's views do;
            not in FedKD's code). Low energies then delay the small directions of an update instead of dropping
            them. The residual never leaves the site.
    """

    handled_kinds = (DataKind.WEIGHTS, DataKind.WEIGHT_DIFF)

    def __init__(
        self,
        energy_start: float = DEFAULT_ENERGY_START,
        energy_end: float = DEFAULT_ENERGY_END,
        num_rounds: int = 1,
        bits: int = 32,
        error_feedback: bool = False,
    ) -> None:
        super().__init__(energy_start, energy_end, num_rounds, bits)
        self.error_feedback = bool(error_feedback)
        self._residual: dict[str, np.ndarray] = {}

    def with_residual(self, update: Mapping[str, Any]) -> dict[str, Any]:
        """``update`` plus the residual kept from the last compression (weights of another shape: none added)."""
        out: dict[str, Any] = {}
        for name, value in update.items():
            arr = _to_numpy(value)
            residual = self._residual.get(name)
            if residual is not None and residual.shape == arr.shape and np.issubdtype(arr.dtype, np.floating):
                arr = (arr + residual).astype(arr.dtype, copy=False)
            out[name] = arr
        return out

    def keep_residual(self, update: Mapping[str, Any], sent: Mapping[str, Any]) -> None:
        """Remember ``update`` minus what ``sent`` rebuilds (float weights only)."""
        self._residual = {
            name: arr - decompress_array(sent[name])
            for name, arr in ((n, _to_numpy(v)) for n, v in update.items())
            if np.issubdtype(arr.dtype, np.floating)
        }

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> DXO | None:
        """Compress a ``WEIGHT_DIFF``.

        Raises:
            ValueError: full weights (the update needs the received weights: set ``params_transfer_type`` DIFF).
        """
        if dxo.data_kind != DataKind.WEIGHT_DIFF:
            raise ValueError(
                "SVDUpdateCompressor compresses weight differences; set the executor's params_transfer_type to DIFF"
            )
        energy = self.energy(shareable)
        update = self.with_residual(dxo.data) if self.error_feedback else dxo.data
        data, stats = compress_params(update, energy, self.bits)
        if self.error_feedback:
            self.keep_residual(update, data)
        meta = dict(dxo.meta or {})
        meta[SVD_META_KEY] = {"energy": energy}
        self.log_info(
            fl_ctx,
            f"SVD update: energy {energy:.3f}, {stats.compressed} weights as factors, {stats.whole} whole, "
            f"{stats.sent_bytes} of {stats.dense_bytes} bytes ({stats.ratio:.1%})",
        )
        return DXO(DataKind.WEIGHT_DIFF, data=data, meta=meta)


class SVDBroadcastCompressor(_ScheduledCompressor):
    """Server task-data filter: per site, the global weights as SVD factors of (global - the site's view).

    The view of a site is what it holds after the previous broadcast (its reconstruction, not the exact global
    model), so what one broadcast leaves out goes with the next (error feedback). Sites that hold the same view get
    the same factors, computed once.

    Args: as :class:`_ScheduledCompressor` (``energy_start``, ``energy_end``, ``num_rounds``, ``bits``).
    """

    handled_kinds = (DataKind.WEIGHTS,)

    def _init_state(self) -> None:
        self._lock = threading.Lock()
        self._site_view: dict[str, str] = {}  # site -> token of the weights it holds
        self._views: dict[str, dict[str, np.ndarray]] = {}  # token -> weights
        self._sent: dict[tuple[str | None, str], tuple[str, dict[str, Any]]] = {}  # (base, global) -> (token, data)

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> DXO | None:
        peer = fl_ctx.get_peer_context()
        site = peer.get_identity_name() if peer is not None else None
        if not site:
            raise ValueError("SVDBroadcastCompressor runs on the server's task data (it needs the receiving site)")
        energy = self.energy(shareable)
        with self._lock:
            data, info = self.encode(site, dxo.data, energy)
        meta = dict(dxo.meta or {})
        meta[SVD_META_KEY] = info
        kind = DataKind.WEIGHTS if info["base"] is None else DataKind.WEIGHT_DIFF
        return DXO(kind, data=data, meta=meta)

    def encode(self, site: str, weights: Mapping[str, Any], energy: float) -> tuple[dict[str, Any], dict[str, Any]]:
        """What ``site`` is sent for ``weights`` (and its view moves to what it will hold). Not thread-safe: the
        filter calls it under its lock.

        Returns:
            ``(data, info)``: the full weights (first contact) or the factors of the difference, and the
            :data:`SVD_META_KEY` item (``base``: the token of the view the difference applies to, None for full
            weights; ``version``: the token of the resulting view; ``energy``).
        """
        base = self._site_view.get(site)
        key = (base, _fingerprint(weights))
        if key not in self._sent:
            full = {k: np.array(_to_numpy(v), copy=True) for k, v in weights.items()}
            if base is None:
                data: dict[str, Any] = full
                view = full
            else:
                held = self._views[base]
                diff = {k: v - held[k] for k, v in full.items()}
                data, stats = compress_params(diff, energy, self.bits)
                view = {k: held[k] + decompress_array(data[k]) for k in full}
                logger.info(
                    "SVD broadcast: energy %.3f, %d weights as factors, %d whole, %d of %d bytes (%.1f%%)",
                    energy,
                    stats.compressed,
                    stats.whole,
                    stats.sent_bytes,
                    stats.dense_bytes,
                    100 * stats.ratio,
                )
            token = uuid.uuid4().hex
            self._views[token] = view
            self._sent[key] = (token, data)
        token, data = self._sent[key]
        self._site_view[site] = token
        self._forget_unused()
        return data, {"base": base, "version": token, "energy": energy}

    def _forget_unused(self) -> None:
        held = set(self._site_view.values())
        for token in [t for t in self._views if t not in held]:
            del self._views[token]
        for key in [k for k, (token, _) in self._sent.items() if token not in held]:
            del self._sent[key]


class SVDDecompressor(DXOFilter):
    """Rebuild what :class:`SVDUpdateCompressor` (on the server's task results) or
    :class:`SVDBroadcastCompressor` (on a site's task data) compressed; anything uncompressed passes unchanged.

    On a site it keeps the weights it holds (the base of the next broadcast) and hands the executor full
    ``WEIGHTS``; on the server it hands the controller the rebuilt ``WEIGHT_DIFF``.
    """

    def __init__(self) -> None:
        kinds = [DataKind.WEIGHTS, DataKind.WEIGHT_DIFF]
        super().__init__(supported_data_kinds=kinds, data_kinds_to_filter=kinds)
        self._held: tuple[str, dict[str, np.ndarray]] | None = None

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> DXO | None:
        meta = dict(dxo.meta or {})
        info = meta.pop(SVD_META_KEY, None)
        if info is None:
            return None
        if "version" not in info:  # a site's update: the controller adds it to the global model
            return DXO(dxo.data_kind, data=decompress_params(dxo.data), meta=meta)
        return DXO(DataKind.WEIGHTS, data=self.receive(dxo.data, info), meta=meta)

    def receive(self, data: Mapping[str, Any], info: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """A broadcast's full weights, from the weights this site holds; they become what it holds.

        Raises:
            RuntimeError: the broadcast is relative to weights this site does not hold.
        """
        base = info.get("base")
        if base is None:
            full = {k: np.array(v, copy=True) for k, v in decompress_params(data).items()}
        else:
            if self._held is None or self._held[0] != base:
                held = "no weights" if self._held is None else f"view {self._held[0][:8]}"
                raise RuntimeError(
                    f"the compressed global model is relative to view {str(base)[:8]}, but this site holds {held} "
                    "(it restarted or missed a task); restart the job, or run it without compression"
                )
            weights = self._held[1]
            full = {k: weights[k] + decompress_array(v) for k, v in data.items()}
        self._held = (str(info["version"]), full)
        return {k: v.copy() for k, v in full.items()}


__all__ = [
    "DEFAULT_ENERGY_END",
    "DEFAULT_ENERGY_START",
    "SUPPORTED_BITS",
    "CompressionStats",
    "SVDBroadcastCompressor",
    "SVDDecompressor",
    "SVDUpdateCompressor",
    "compress_array",
    "compress_params",
    "decompress_array",
    "decompress_params",
    "energy_rank",
    "energy_threshold",
    "is_factors",
    "is_quantized",
]
