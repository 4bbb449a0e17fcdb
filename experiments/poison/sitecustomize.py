"""A poisoning site for ``python experiments/compare.py --poison SITE`` (tooling; never part of the package).

Python imports ``sitecustomize`` at start-up from the path, so the simulator's processes load this when the driver
puts its folder on ``PYTHONPATH``. At the site named by ``FEDBRATS_POISON_SITE`` it replaces the update the site
sends with ``global + scale * (trained - global)`` (``FEDBRATS_POISON_SCALE``, default -10: the update reversed
and boosted, a model-poisoning attack), keeping every other item honest, so that the server's checks (types, shapes,
bounds) let it through and only the aggregation rule can limit its harm. Everywhere else it does nothing.
"""

from __future__ import annotations

import os

SITE = os.environ.get("FEDBRATS_POISON_SITE", "")
SCALE = float(os.environ.get("FEDBRATS_POISON_SCALE", "-10"))

if SITE:
    import fedbrats.federated.client.trainer as _trainer

    _load, _update = _trainer.SiteTrainer.load_weights, _trainer.SiteTrainer.update_weights

    def _remember_global(self, params):  # the weights received this round are the attack's anchor
        _load(self, params)
        if self.site.site_name == SITE:
            self._poison_anchor = {k: v.detach().clone() for k, v in self.weights().items()}

    def _poisoned_update(self):
        weights = _update(self)
        anchor = getattr(self, "_poison_anchor", None)
        if self.site.site_name != SITE or anchor is None:
            return weights
        return {k: (anchor[k] + SCALE * (v - anchor[k])).to(v.dtype) for k, v in weights.items()}

    _trainer.SiteTrainer.load_weights = _remember_global
    _trainer.SiteTrainer.update_weights = _poisoned_update
