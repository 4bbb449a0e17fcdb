"""MST-KD: MST-KDNet-style distillation (Zhu et al., MICCAI 2025) in the federation (docs/mstkd.md). One folder:
the site side (:mod:`.client`), the student/teacher network and style discriminator (:mod:`.network`) and the
distillation losses (:mod:`.losses`).
"""

from __future__ import annotations

from fedbrats.federated.methods.base import Job, Method
from fedbrats.federated.methods.mstkd.client import SUBSET_MASKS, MSTKDMethod, random_subset_masks, random_subsets_of
from fedbrats.federated.methods.mstkd.network import MSTKDNet

#: MST-KD: the MST-KDNet student/teacher network, its distillation losses, FedAvg of the student; its ablations.
METHOD = Method(
    networks={"mstkd": MSTKDNet},
    clients={"mstkd": MSTKDMethod},
    jobs=(
        Job(
            "mstkd",
            "MST-KDNet distillation: a site-local teacher on the site's sequences distils into the federated "
            "student (transformer, logit and style KD); FedAvg of the student only.",
            aggregation="fedbrats.federated.server.aggregation.WeightedAverage",
            network={"name": "mstkd", "args": {"init_filters": 8}},
            training={"method": "mstkd"},
        ),
    ),
    experiments={
        "mstkd": ("mstkd", {}, {}),
        "mstkd_no_transformer_kd": ("mstkd", {"method_args": {"hidden_kd_weight": 0.0, "attn_kd_weight": 0.0}}, {}),
        "mstkd_no_logit_kd": ("mstkd", {"method_args": {"logit_kd_weight": 0.0, "consistency_weight": 0.0}}, {}),
        "mstkd_no_style": ("mstkd", {"method_args": {"gram_weight": 0.0, "adv_weight": 0.0}}, {}),
        # The same network and student views without any distillation (no teacher): what MST-KD's KD adds.
        "mstkd_net_only": (
            "mstkd",
            {
                "method_args": {
                    "hidden_kd_weight": 0.0,
                    "attn_kd_weight": 0.0,
                    "logit_kd_weight": 0.0,
                    "consistency_weight": 0.0,
                    "gram_weight": 0.0,
                    "adv_weight": 0.0,
                }
            },
            {},
        ),
    },
)

__all__ = ["METHOD", "SUBSET_MASKS", "MSTKDMethod", "MSTKDNet", "random_subset_masks", "random_subsets_of"]
