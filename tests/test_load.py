"""Load: FedKD with 16 simulated sites on tiny data runs 50 rounds with no error, and no process's memory keeps
growing.

One simulator run serves every assertion; it is the slowest test of the suite (about 3.5 minutes on 2 cores) and
also stands as FedKD's multi-round simulator test (all loss terms, prototypes, partial updates, saved models).
Memory is read from outside, every 0.5 s, by the benchmark's process sampler; "flat" compares each process's
typical per-round peak in rounds 10-19 with that in rounds 40-49, so start-up and warm-up are left out and one
noisy reading cannot decide the outcome.
"""

from __future__ import annotations

import json
import os
import re
import statistics

import numpy as np
import pytest
import torch

from benchmarks.federated import make_federation, run_simulated

SITES = 16
ROUNDS = 50
# One training case per tiny site: lower the prototype privacy floor (2 distinct cases) so prototypes flow.
TINY = {
    "epochs_per_round": 1,
    "data": {"roi_size": [16, 16, 16], "batch_size": 2},
    "method_args": {"min_prototype_cases": 1},
}
#: Largest accepted growth of the per-round peak RSS between rounds 10-19 and 40-49: for the server, for the
#: median site and for any site. Measured on 2 cores (FedAvg, same federation): without the per-round memory
#: release (fedbrats.federated.memory) the server grew 57% and the sites 4-9%; with it, at most 3-4% everywhere.
MAX_SERVER_GROWTH = 0.10
MAX_MEDIAN_SITE_GROWTH = 0.04
MAX_SITE_GROWTH = 0.08


def _typical_peak(per_round: dict[int, int], first: int, last: int) -> float:
    values = [v for r, v in per_round.items() if first <= r <= last]
    assert len(values) >= (last - first + 1) // 2, f"memory sampled in too few of rounds {first}-{last}"
    return statistics.median(values)


def _growth(memory: dict, label: str) -> float:
    per_round = {int(r): v for r, v in memory[label]["per_round_peak_bytes"].items()}
    return _typical_peak(per_round, 40, 49) / _typical_peak(per_round, 10, 19) - 1


@pytest.mark.integration
def test_fedkd_sixteen_sites_fifty_rounds_no_errors_flat_memory(tmp_path) -> None:
    sites_file = make_federation(str(tmp_path / "data"), SITES, cases_per_site=3, size=16)
    run = run_simulated("fedkd", str(tmp_path / "run"), sites_file, ROUNDS, overrides=TINY)
    run_dir = run["run_dir"]

    # No errors: every site's update in every round accepted, nothing logged as an error.
    with open(os.path.join(run_dir, "metrics.json"), encoding="utf-8") as f:
        history = json.load(f)
    rounds = [r for r in history if not r.get("final_validation")]
    assert [r["round"] for r in rounds] == list(range(ROUNDS))
    for record in rounds:
        assert len(record["sites"]) == SITES, f"round {record['round']}: only {sorted(record['sites'])}"
        assert not record["left_out"] and not record["rejected"], record
    assert history[-1].get("final_validation") and len(history[-1]["sites"]) == SITES
    with open(run["log_file"], encoding="utf-8") as f:
        problems = [line for line in f if re.search(r" - (ERROR|CRITICAL) - |Traceback", line)]
    assert not problems, "".join(problems[:10])

    # FedKD did its work: every loss term from round 1 (self-distillation at every site with two or more sequences,
    # on every step, the global teacher on every step everywhere), prototypes aggregated and saved, models saved and
    # finite.
    terms = rounds[1]["sites"]
    assert {"dice", "drl", "rcl", "kd", "proto_kd", "self_distill"} <= set(terms["site-1"]["loss_terms"])
    for site in ("site-1", "site-2", "site-3"):
        assert terms[site]["loss_terms"]["acted_self_distill"] == pytest.approx(1.0), site
    for site in terms:
        assert terms[site]["loss_terms"]["acted_kd"] == pytest.approx(1.0), site
    assert terms["site-4"]["modalities"] == ["t1"] and "self_distill" not in terms["site-4"]["loss_terms"]
    with np.load(os.path.join(run_dir, "server_state.npz")) as state:
        assert state["global_prototypes"].shape[0] == 4 and np.isfinite(state["global_prototypes"]).all()
        assert state["global_prototype_valid"].any()
    for name in ("FL_global_model.pt", "best_FL_global_model.pt"):
        weights = torch.load(os.path.join(run_dir, "app_server", name), weights_only=True)["model"]
        assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point()), name
    # Partial updates: a T1-only site sent only its own encoder of the four.
    sent = run["communication"]["sites"]["site-4"]
    assert sent["absent_sequence_weights_per_round"] == 0 and sent["sent_x_model"] < 0.9

    # Flat memory after warm-up.
    memory = run["memory"]
    sites = [k for k in memory if k.startswith("client:")]
    assert len(sites) == SITES and "server" in memory
    server = _growth(memory, "server")
    site_growth = {k: round(_growth(memory, k), 3) for k in sites}
    summary = f"server {server:.3f}, sites {site_growth}"
    assert server < MAX_SERVER_GROWTH, f"server memory kept growing (rounds 10-19 -> 40-49): {summary}"
    assert statistics.median(site_growth.values()) < MAX_MEDIAN_SITE_GROWTH, f"site memory kept growing: {summary}"
    assert max(site_growth.values()) < MAX_SITE_GROWTH, f"a site's memory kept growing: {summary}"
