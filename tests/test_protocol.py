"""The round protocol module: the run-folder layout and the helpers that build the messages' meta."""

from __future__ import annotations

import os

import pytest

from fedbrats.federated.protocol import (
    BASE_META_KEYS,
    KEEP_LOCAL_WEIGHTS_KEY,
    MODEL_SPEC_KEY,
    SITE_ERROR_KEY,
    SITE_ERROR_MAX_CHARS,
    global_task_meta,
    site_error_meta,
    site_update_meta,
    undeclared_meta_keys,
    update_weight,
)
from fedbrats.runs import GLOBAL_MODEL_FILE, RunFolder


def test_run_folder_places_every_file(tmp_path) -> None:
    run = RunFolder(str(tmp_path))
    assert run.metrics == os.path.join(tmp_path, "metrics.json")
    assert run.model_spec == os.path.join(tmp_path, "model_spec.json")
    assert run.server_state == os.path.join(tmp_path, "server_state.npz")
    assert run.postprocessing == os.path.join(tmp_path, "postprocessing.json")
    assert run.round_events == os.path.join(tmp_path, "round_events.jsonl")
    assert run.global_model == os.path.join(tmp_path, "app_server", GLOBAL_MODEL_FILE)
    assert run.checkpoints == (run.best_global_model, run.global_model)
    assert run.site_model("site-1") == os.path.join(tmp_path, "site_models", "site-1.pt")
    assert run.tb_events == os.path.join(tmp_path, "tb_events")
    assert os.path.join("app_server", GLOBAL_MODEL_FILE) in RunFolder.RESUME_FILES


@pytest.mark.parametrize("site", ["", "../x", "a/b"])
def test_run_folder_refuses_a_site_that_is_not_a_name(tmp_path, site: str) -> None:
    with pytest.raises(ValueError, match="site"):
        RunFolder(str(tmp_path)).site_model(site)


def test_run_folder_needs_a_path() -> None:
    with pytest.raises(ValueError, match="path"):
        RunFolder("")


def test_meta_helpers_use_only_declared_keys() -> None:
    meta = site_update_meta("site-1", ("t1", "t2"), 3, {"num_steps": 4, "train_loss": 0.5}, {"prototypes": 1})
    assert meta["modalities"] == ["t1", "t2"] and meta["num_train_cases"] == 3
    assert undeclared_meta_keys(meta, {"prototypes"}) == []
    assert update_weight(meta) == 4.0
    assert update_weight({}) == 1.0
    failed = site_error_meta("site-2", ValueError("x" * 1000))
    assert failed[SITE_ERROR_KEY].startswith("ValueError: x") and len(failed[SITE_ERROR_KEY]) == SITE_ERROR_MAX_CHARS
    assert set(failed) <= BASE_META_KEYS
    task = global_task_meta({"path": "p", "args": {}}, True, {"global_prototypes": [1.0]})
    assert task[MODEL_SPEC_KEY] == {"path": "p", "args": {}} and task[KEEP_LOCAL_WEIGHTS_KEY] is True
    assert task["global_prototypes"] == [1.0]
