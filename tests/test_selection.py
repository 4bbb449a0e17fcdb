"""The best-model selector: a site that scored nothing by design is left out quietly; real scores still count."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from nvflare.apis.dxo import DXO, DataKind, MetaKey
from nvflare.apis.fl_constant import FLContextKey, ReservedKey
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.app_event_type import AppEventType

from fedbrats.federated.protocol import KEY_METRIC
from fedbrats.federated.server.selection import BestModelSelector


def _contribution(site: str, metrics: dict | None) -> FLContext:
    meta = {} if metrics is None else {MetaKey.INITIAL_METRICS: metrics}
    shareable = DXO(DataKind.WEIGHT_DIFF, data={"w": np.zeros(2, np.float32)}, meta=meta).to_shareable()
    shareable.add_cookie(AppConstants.CONTRIBUTION_ROUND, 1)
    peer = FLContext()
    peer.set_prop(ReservedKey.IDENTITY_NAME, site, private=False, sticky=False)
    peer.set_prop(FLContextKey.SHAREABLE, shareable, private=True, sticky=False)
    ctx = FLContext()
    ctx.set_prop(AppConstants.CURRENT_ROUND, 1, private=True, sticky=False)
    ctx.set_peer_context(peer)
    return ctx


@pytest.mark.parametrize(
    ("metrics", "counted", "warned"),
    [
        ({KEY_METRIC: 0.6, "val_dice_WT": 0.7}, True, False),
        ({}, False, False),  # validation skipped this round (val_every)
        ({"val_entropy": 0.2, "val_im": -0.1}, False, False),  # a site without labels (IsoFed)
        (None, False, True),  # no metrics at all: NVFlare's warning stays
        ({KEY_METRIC: float("nan")}, False, True),  # not a finite number: NVFlare's warning stays
    ],
)
def test_selector_counts_real_scores_and_skips_sites_that_scored_nothing_quietly(
    metrics: dict | None, counted: bool, warned: bool, caplog: pytest.LogCaptureFixture
) -> None:
    selector = BestModelSelector(key_metric=KEY_METRIC)
    with caplog.at_level(logging.DEBUG):
        selector.handle_event(AppEventType.BEFORE_CONTRIBUTION_ACCEPT, _contribution("site-1", metrics))
    assert (selector.validation_metric_sum_of_weights > 0) is counted
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert bool(warnings) is warned, [r.getMessage() for r in warnings]
    if counted:
        assert selector.validation_metric_weighted_sum == pytest.approx(0.6)
