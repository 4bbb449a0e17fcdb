"""The SVD codec of compressed model updates: energy-ranked truncated SVD of every weight, optional 4/8-bit
quantisation of the factors, and its inverse (what :mod:`fedbrats.federated.compression.filters` sends).

The codec follows FedKD (Wu et al., Nat. Commun. 2022; the rule of its public code): every weight update with two or
more dimensions (conv kernels reshaped to ``out x (in*k*k*k)``) is factorised by SVD, and only the top singular
triplets whose energy (sum of squared singular values) reaches a fraction ``e`` of the total are sent; ``e`` rises
linearly over the rounds (0.95 to 0.98). 1-D weights (biases, norms) and non-float arrays go whole.

Optionally (``bits=8`` or ``bits=4``, not in FedKD) what goes out is also quantised to integers: each singular
vector of the factors, and each row of a weight that goes whole as a matrix, with one float32 scale (symmetric, its
largest magnitude maps to the largest level: 127 for int8; 7 for 4 bits, two values packed in each uint8 byte).
This divides the bytes of the factors by four (eight); the rounding error of a value is at most half its vector's
scale. 1-D weights stay float.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

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
    arr = to_numpy(array)
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


#: Most values one decoded weight may hold (a payload states its weight's shape: a few bytes must not make the
#: receiver allocate gigabytes). 2^26 float32 values are 256 MiB, far beyond any weight of the package's networks.
MAX_DECODED_ELEMENTS = 2**26
#: Most values all decoded weights of one payload may hold together (1 GiB of float32).
MAX_PAYLOAD_ELEMENTS = 2**28
#: Dtypes of what a payload may carry: float factors and whole arrays, quantised values, their scales.
FLOAT_KINDS = "f"
QUANTIZED_DTYPES = (np.dtype(np.int8), np.dtype(np.uint8))


def _declared_shape(value: Mapping[str, Any]) -> list[int]:
    """The weight shape a compressed item states, checked: a short list of non-negative integers whose product is
    at most :data:`MAX_DECODED_ELEMENTS`."""
    shape = value.get("shape")
    if (
        not isinstance(shape, (list, tuple))
        or not 1 <= len(shape) <= 8
        or not all(isinstance(n, (int, np.integer)) and not isinstance(n, bool) and n >= 0 for n in shape)
    ):
        raise ValueError(f"a compressed weight's shape must be a list of 1 to 8 integers >= 0, got {shape!r}")
    shape = [int(n) for n in shape]
    if math.prod(shape) > MAX_DECODED_ELEMENTS:
        raise ValueError(f"a compressed weight states shape {shape}, over {MAX_DECODED_ELEMENTS} values")
    return shape


def _array(value: Mapping[str, Any], key: str, allowed: str | tuple[np.dtype, ...]) -> np.ndarray:
    """Item ``key`` of a compressed weight as a 1-D or 2-D array of an accepted dtype."""
    arr = to_numpy(value[key])
    ok = arr.dtype.kind in allowed if isinstance(allowed, str) else arr.dtype in allowed
    if not ok or arr.ndim not in (1, 2):
        raise ValueError(f"a compressed weight's {key!r} must be a 1-D or 2-D array of {allowed}, got {arr.dtype}")
    return arr


def decompress_array(value: Any) -> np.ndarray:
    """Inverse of :func:`compress_array` (an uncompressed array comes back as it is; quantised values to within
    their rounding).

    What arrives comes from another party, so it is checked before anything is allocated: the stated shape (at
    most :data:`MAX_DECODED_ELEMENTS` values), the dtypes (float factors; int8 or packed uint8 quantised values;
    float scales) and every part's shape against the stated one.

    Raises:
        ValueError: a malformed item (named), or factors or quantised rows that do not make the stated shape.
    """
    if isinstance(value, Mapping) and not (is_quantized(value) or is_factors(value)):
        raise ValueError(f"a compressed weight holds {sorted(map(str, value))}, not a known layout")
    if is_quantized(value):
        shape = _declared_shape(value)
        q = _array(value, "q", QUANTIZED_DTYPES)
        scale = _array(value, "scale", FLOAT_KINDS)
        rows, cols = (shape[0], math.prod(shape[1:])) if shape else (0, 0)
        width = (cols + 1) // 2 if q.dtype == np.uint8 else cols
        if q.shape != (rows, width):
            raise ValueError(f"quantised rows {q.shape} do not make a weight of shape {shape}")
        if scale.shape != (rows,):
            raise ValueError(f"quantised rows need one scale a row ({rows}), got {scale.shape}")
        return dequantize_rows(q, scale, cols=cols).reshape(shape)
    if not is_factors(value):
        arr = to_numpy(value)
        if arr.dtype == object or arr.size > MAX_DECODED_ELEMENTS:
            raise ValueError(f"an item must be an array of numbers of at most {MAX_DECODED_ELEMENTS} values")
        return arr
    shape = _declared_shape(value)
    if len(shape) < 2:
        raise ValueError(f"factors make a weight of 2 or more dimensions, the item states {shape}")
    quantized = "u_scale" in value
    if not quantized and to_numpy(value["u"]).dtype in QUANTIZED_DTYPES:
        raise ValueError("quantised factors need their scales (u_scale, vt_scale)")
    u = _array(value, "u", QUANTIZED_DTYPES if quantized else FLOAT_KINDS)
    vt = _array(value, "vt", QUANTIZED_DTYPES if quantized else FLOAT_KINDS)
    if u.ndim != 2 or vt.ndim != 2 or (quantized and u.dtype != vt.dtype):
        raise ValueError(
            f"factors must be two 2-D arrays of one kind, got {u.shape} {u.dtype} and {vt.shape} {vt.dtype}"
        )
    rows, cols = shape[0], math.prod(shape[1:])
    if u.dtype == np.uint8:  # packed 4-bit vectors: u holds the k left vectors as rows
        rank = u.shape[0]
        if u.shape != (rank, (rows + 1) // 2) or vt.shape != (rank, (cols + 1) // 2):
            raise ValueError(f"packed factors {u.shape} x {vt.shape} do not make a weight of shape {shape}")
    elif u.shape[0] != rows or vt.shape[-1] != cols or u.shape[1] != vt.shape[0]:
        raise ValueError(f"factors {u.shape} x {vt.shape} do not make a weight of shape {shape}")
    rank = vt.shape[0]
    if rank > min(rows, cols):
        raise ValueError(f"factors of rank {rank} for a weight of shape {shape} (at most {min(rows, cols)})")
    if quantized:
        u_scale, vt_scale = _array(value, "u_scale", FLOAT_KINDS), _array(value, "vt_scale", FLOAT_KINDS)
        if u_scale.shape != (rank,) or vt_scale.shape != (rank,):
            raise ValueError(f"scales {u_scale.shape} and {vt_scale.shape} do not fit {rank} singular vectors")
        if u.dtype == np.uint8:
            u = dequantize_rows(u, u_scale, cols=rows).T
        else:
            u = dequantize_rows(u.T, u_scale).T
        vt = dequantize_rows(vt, vt_scale, cols=cols)
    return (u @ vt).reshape(shape).astype(u.dtype, copy=False)


def _packed_bytes(packed: Any) -> int:
    if isinstance(packed, Mapping):
        return sum(to_numpy(v).nbytes for k, v in packed.items() if k != "shape")
    return to_numpy(packed).nbytes


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
        arr = to_numpy(value)
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
    """:func:`decompress_array` of every item, together at most :data:`MAX_PAYLOAD_ELEMENTS` values.

    Raises:
        ValueError: a malformed item (its name is said), or a payload over the total.
    """
    if not isinstance(params, Mapping):
        raise ValueError(f"a payload must map weight names to items, got {type(params).__name__}")
    out, total = {}, 0
    for name, value in params.items():
        try:
            out[name] = decompress_array(value)
        except (ValueError, TypeError, KeyError) as exc:
            raise ValueError(f"weight {name!r}: {exc}") from None
        total += out[name].size
        if total > MAX_PAYLOAD_ELEMENTS:
            raise ValueError(f"the payload decodes to more than {MAX_PAYLOAD_ELEMENTS} values")
    return out


def to_numpy(value: Any) -> np.ndarray:
    """An array of a torch tensor or anything NumPy takes."""
    if hasattr(value, "detach"):  # a torch tensor
        return value.detach().cpu().numpy()
    return np.asarray(value)


def fingerprint(params: Mapping[str, Any]) -> str:
    """A digest of named arrays (names, dtypes, bytes): which weights a site holds, without sending them."""
    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(params):
        arr = np.ascontiguousarray(to_numpy(params[name]))
        digest.update(name.encode())
        digest.update(str(arr.dtype).encode())
        digest.update(arr.tobytes())
    return digest.hexdigest()


__all__ = [
    "DEFAULT_ENERGY_END",
    "DEFAULT_ENERGY_START",
    "SUPPORTED_BITS",
    "CompressionStats",
    "check_bits",
    "check_energies",
    "compress_array",
    "compress_params",
    "decompress_array",
    "decompress_params",
    "dequantize_rows",
    "energy_rank",
    "energy_threshold",
    "fingerprint",
    "is_factors",
    "is_quantized",
    "pack_nibbles",
    "quantize_rows",
    "to_numpy",
    "unpack_nibbles",
]
