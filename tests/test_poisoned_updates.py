"""Poisoned or broken updates never enter the global model; the server logs why it rejected them."""

from __future__ import annotations

import json
import os
import textwrap

import numpy as np
import pytest
import torch

from fedbrats.simulate import simulate

pytestmark = pytest.mark.integration

POISON = textwrap.dedent(
    '''
    import math
    import torch
    from fedbrats.federated.methods.supervised import SupervisedMethod


    class PoisonMethod(SupervisedMethod):
        """Trains normally, then corrupts the update of one site in a chosen way."""

        def round_payload(self, model, train_loader):
            if self.modalities == ("t1", "t2", "flair"):  # site-2 sends NaN weights
                with torch.no_grad():
                    next(model.parameters()).fill_(math.nan)
            if self.modalities == ("t2", "flair"):  # site-3 smuggles an undeclared per-case item
                return {"case_volume": [[0.0] * 64]}
            return {}
    '''
)


#: A plug-in registers its method in code (a job may only name registered classes): in the simulator's
#: processes through sitecustomize, which Python imports at start-up from the path.
REGISTER = textwrap.dedent(
    """
    from fedbrats.federated.methods import register_method

    register_method("poison", "poison_method.PoisonMethod")
    """
)


def test_poisoned_updates_are_rejected(tiny_federation: str, tmp_path, monkeypatch) -> None:
    from fedbrats.federated.methods import METHODS

    plugin_dir = tmp_path / "plugin"
    plugin_dir.mkdir()
    (plugin_dir / "poison_method.py").write_text(POISON)
    (plugin_dir / "sitecustomize.py").write_text(REGISTER)
    monkeypatch.setenv("PYTHONPATH", f"{plugin_dir}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    monkeypatch.syspath_prepend(str(plugin_dir))
    monkeypatch.setitem(METHODS._paths, "poison", "poison_method.PoisonMethod")  # this process checks the job too
    overrides = {
        "method": "poison",
        "epochs_per_round": 1,
        "data": {"roi_size": [16, 16, 16], "batch_size": 1},
    }
    result = simulate("fedavg", str(tmp_path / "run"), sites_file=tiny_federation, num_rounds=2, training=overrides)
    for r in [r for r in result.history if not r.get("final_validation")]:
        assert sorted(r["sites"]) == ["site-1", "site-4"]
        assert "NaN or Inf" in r["rejected"]["site-2"]
        assert "undeclared items" in r["rejected"]["site-3"] and "case_volume" in r["rejected"]["site-3"]
    state = torch.load(os.path.join(result.run_dir, "app_server", "FL_global_model.pt"), weights_only=True)
    assert all(np.isfinite(v.numpy()).all() for v in state["model"].values() if v.is_floating_point())
    log = (tmp_path / "run" / "simulator.log").read_text()
    assert "rejected the update of site-2" in log


#: A hostile site-2 (its code modified, as an attacker's would be): each round it sends another malformed update
#: through the same channel an honest site uses. Installed by sitecustomize in every simulator process.
HOSTILE = textwrap.dedent(
    """
    import math

    import numpy as np
    import torch

    import fedbrats.federated.client.trainer as trainer_module
    import fedbrats.federated.protocol as protocol

    ATTACKS = [
        {"num_steps": math.nan},
        {"train_loss": "low"},
        {"num_steps": 10**12},
        {"prototypes": np.zeros((3, 5), np.float32)},
        {"prototype_counts": np.array([1e30, 1e30, 1e30, 1e30], np.float32)},
        "oversized",
    ]
    state = {"round": 0, "attack": None}
    honest_meta = protocol.site_update_meta
    honest_weights = trainer_module.SiteTrainer.update_weights

    def site_update_meta(site_name, modalities, num_train_cases, summary, extras):
        # The training script reports its meta, then its weights: this round's attack is chosen here.
        meta = honest_meta(site_name, modalities, num_train_cases, summary, extras)
        if site_name == "site-2":
            state["attack"] = ATTACKS[state["round"] % len(ATTACKS)]
            state["round"] += 1
            if isinstance(state["attack"], dict):
                meta.update(state["attack"])
        return meta

    def update_weights(self):
        weights = honest_weights(self)
        if self.site.site_name == "site-2":
            attack = state["attack"]
            name = next(iter(weights))
            if attack == "oversized":  # NVFlare's client then fails at its next task: it remembers shapes it sent
                weights[name] = torch.zeros(1000, 1, 1, 1, 1, 1)
        return weights

    protocol.site_update_meta = site_update_meta
    trainer_module.SiteTrainer.update_weights = update_weights
    """
)


def test_one_hostile_site_is_rejected_every_round_and_the_others_go_on(tiny_federation: str, tmp_path, monkeypatch):
    """NaN, huge and string base items, bad prototypes and an oversized weight from one site: every round completes
    with the honest sites aggregated and never blamed, that site rejected with its reason (or, once its own client
    broke on the weights it sent, left out), and a finite global model."""
    plugin_dir = tmp_path / "plugin"
    plugin_dir.mkdir()
    (plugin_dir / "sitecustomize.py").write_text(HOSTILE)
    monkeypatch.setenv("PYTHONPATH", f"{plugin_dir}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    training = {"epochs_per_round": 1, "data": {"roi_size": [16, 16, 16], "batch_size": 1}}
    training["method_args"] = {"min_prototype_cases": 1}
    result = simulate("fedkd", str(tmp_path / "run"), sites_file=tiny_federation, num_rounds=7, training=training)
    rounds = [r for r in result.history if not r.get("final_validation")]
    assert len(rounds) == 7
    reasons = [r["rejected"].get("site-2", "") for r in rounds]
    for r in rounds:
        assert sorted(r["sites"]) == ["site-1", "site-3", "site-4"], r
        assert set(r["rejected"]) | set(r["left_out"]) == {"site-2"}, r
    said = ["num_steps", "train_loss", "num_steps", "prototypes", "prototype_counts", "shape"]
    for reason, expected in zip(reasons, said):
        assert expected in reason, reasons
    state = torch.load(os.path.join(result.run_dir, "app_server", "FL_global_model.pt"), weights_only=True)
    assert all(np.isfinite(v.numpy()).all() for v in state["model"].values() if v.is_floating_point())
    events = [json.loads(line) for line in open(os.path.join(result.run_dir, "round_events.jsonl"), encoding="utf-8")]
    rejected = [e for e in events if e["event"] == "result_received" and not e.get("usable")]
    assert {e["site"] for e in rejected} == {"site-2"} and all(e.get("reason") for e in rejected)
