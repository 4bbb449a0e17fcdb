"""Poisoned or broken updates never enter the global model; the server logs why it rejected them."""

from __future__ import annotations

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
