"""FedKD: feature-representation-aware knowledge distillation for incomplete local information (MICCAI 2025), as
this project interprets it (docs/fedkd.md). One folder: the site side (:mod:`.client`), the modality-aware network
(:mod:`.network`), its DRL (:mod:`.drl`), RCL (:mod:`.rcl`) and distillation terms (:mod:`.distillation`), the
server's modality-aware aggregation (:mod:`.strategy`) and the privacy filter of its prototypes (:mod:`.privacy`).
"""

from __future__ import annotations

from fedbrats.federated.methods.base import Job, Method
from fedbrats.federated.methods.fedkd.client import FedKDMethod
from fedbrats.federated.methods.fedkd.network import ModalityAwareSegNet
from fedbrats.federated.methods.fedkd.strategy import ModalityAwareAggregation

#: FedKD: the modality-aware network, its client losses and the modality-aware aggregation; and its ablations.
METHOD = Method(
    networks={"modality_aware": ModalityAwareSegNet},
    strategies={"modality_aware": ModalityAwareAggregation},
    clients={"fedkd": FedKDMethod},
    jobs=(
        Job(
            "fedkd",
            "FedKD: modality-aware network with DRL and RCL, distillation from the global model and "
            "global region prototypes, modality-aware aggregation.",
            aggregation="fedbrats.federated.methods.fedkd.strategy.ModalityAwareAggregation",
            network={"name": "modality_aware", "args": {"init_filters": 8}},
            training={"method": "fedkd"},
        ),
    ),
    experiments={
        "fedkd": ("fedkd", {}, {}),
        "fedkd_no_drl": ("fedkd", {"method_args": {"drl_weight": 0.0}}, {}),
        "fedkd_no_rcl": ("fedkd", {"method_args": {"rcl_weight": 0.0}}, {}),
        "fedkd_no_kd": (
            "fedkd",
            {"method_args": {"kd_weight": 0.0, "proto_kd_weight": 0.0, "self_distill_weight": 0.0}},
            {},
        ),
        # The modality-aware network and aggregation with the supervised loss alone: what FedKD's losses add.
        "fedkd_net_only": (
            "fedkd",
            {
                "method_args": {
                    "drl_weight": 0.0,
                    "rcl_weight": 0.0,
                    "kd_weight": 0.0,
                    "proto_kd_weight": 0.0,
                    "self_distill_weight": 0.0,
                }
            },
            {},
        ),
        # Plain FedAvg needs every weight from every site, so sites send the encoders of absent sequences too.
        "fedkd_no_modality_aware_agg": (
            "fedkd",
            {"method_args": {"partial_updates": False}},
            {"modality_aware": False},
        ),
    },
)

__all__ = ["METHOD", "FedKDMethod", "ModalityAwareAggregation", "ModalityAwareSegNet"]
