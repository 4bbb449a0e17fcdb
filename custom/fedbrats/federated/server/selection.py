"""Which global model is the best: NVFlare's in-time selection, quiet where a site scored nothing by design."""

from __future__ import annotations

from nvflare.apis.dxo import from_shareable
from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.app_event_type import AppEventType
from nvflare.app_common.widgets.intime_model_selector import IntimeModelSelector


class BestModelSelector(IntimeModelSelector):
    """NVFlare's :class:`IntimeModelSelector` (the best global model by the sites' weighted validation score), which
    leaves out, with a debug line instead of a warning, a site whose metrics lack the key metric.

    In this project that happens by design: sites skip validation in rounds between ``val_every`` (their metrics
    are empty), and a site without labels sends label-free scores only (IsoFed). NVFlare's selector warned on
    every such result, every round, which buries real problems. A result with no metrics at all, or with a key
    metric that is not a finite number, still gets NVFlare's warning.
    """

    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        if event_type == AppEventType.BEFORE_CONTRIBUTION_ACCEPT and self._scored_nothing(fl_ctx):
            return
        super().handle_event(event_type, fl_ctx)

    def _scored_nothing(self, fl_ctx: FLContext) -> bool:
        peer = fl_ctx.get_peer_context()
        if peer is None:
            return False
        try:
            dxo = from_shareable(peer.get_prop(FLContextKey.SHAREABLE))
        except Exception:  # noqa: BLE001 - not a DXO: NVFlare's selector reports it
            return False
        metrics = dxo.get_meta_prop(self.validation_metric_name)
        if isinstance(metrics, dict) and self.key_metric not in metrics:
            self.log_debug(
                fl_ctx,
                f"{peer.get_identity_name(default='?')} sent no {self.key_metric} this round (validation skipped, "
                "or a site without labels); its result does not count towards the best model",
            )
            return True
        return False


__all__ = ["BestModelSelector"]
