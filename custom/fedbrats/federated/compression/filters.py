"""SVD-compressed model updates, as NVFlare filters any job can switch on (``compression`` in the job options).

The codec is :mod:`fedbrats.federated.compression.codec`. Where the filters sit (added by
:class:`fedbrats.recipe.FedBratsRecipe` when compression is on, one chain per task):
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

import logging
import threading
import uuid
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
from nvflare.apis.dxo import DXO, DataKind
from nvflare.apis.dxo_filter import DXOFilter
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.app_constant import AppConstants

from fedbrats.federated.compression.codec import (
    DEFAULT_ENERGY_END,
    DEFAULT_ENERGY_START,
    check_bits,
    check_energies,
    compress_params,
    decompress_array,
    decompress_params,
    energy_threshold,
    fingerprint,
    to_numpy,
)
from fedbrats.federated.protocol import CROSS_SITE_MODEL_KEY, SVD_META_KEY, UPDATE_PROBLEM_KEY

logger = logging.getLogger(__name__)


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
            arr = to_numpy(value)
            residual = self._residual.get(name)
            if residual is not None and residual.shape == arr.shape and np.issubdtype(arr.dtype, np.floating):
                arr = (arr + residual).astype(arr.dtype, copy=False)
            out[name] = arr
        return out

    def keep_residual(self, update: Mapping[str, Any], sent: Mapping[str, Any]) -> None:
        """Remember ``update`` minus what ``sent`` rebuilds (float weights only)."""
        self._residual = {
            name: arr - decompress_array(sent[name])
            for name, arr in ((n, to_numpy(v)) for n, v in update.items())
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
        if (dxo.meta or {}).get(CROSS_SITE_MODEL_KEY):
            # A model of the cross-site evaluation goes whole: a score must be the model's, not a lossy view's,
            # and it is not the global model the site's view follows (a site's own model may be another network).
            return None
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
        key = (base, fingerprint(weights))
        if key not in self._sent:
            full = {k: np.array(to_numpy(v), copy=True) for k, v in weights.items()}
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
            try:
                return DXO(dxo.data_kind, data=decompress_params(dxo.data), meta=meta)
            except ValueError as exc:
                # Rejected with its reason by the controller (the round goes on); raising here would only leave the
                # site out without one.
                logger.warning("a compressed update does not decode: %s", exc)
                return DXO(dxo.data_kind, data={}, meta={**meta, UPDATE_PROBLEM_KEY: f"the compressed update: {exc}"})
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


__all__ = ["SVDBroadcastCompressor", "SVDDecompressor", "SVDUpdateCompressor"]
