"""The interface a client method implements."""

from __future__ import annotations

from typing import Any, ClassVar

import torch


class ClientMethod:
    """Per-site logic of a federated method, plugged into :class:`fedbrats.federated.client.trainer.SiteTrainer`.

    The trainer owns the loop, optimiser, data and communication; a method decides the loss of a batch, what
    it does with the server's extras when a global model arrives, and which extras it sends back.

    Attributes:
        name: method name used in configs and logs.
        payload_keys: the meta keys this method adds to a site's update beyond
            :data:`fedbrats.federated.protocol.BASE_META_KEYS`; the server rejects anything undeclared.
    """

    name: ClassVar[str] = "base"
    payload_keys: ClassVar[frozenset[str]] = frozenset()

    def setup(self, model: torch.nn.Module, modalities: tuple[str, ...], device: torch.device) -> None:
        """Called once, after the model is built, with the site's available sequences."""
        self.model = model
        self.modalities = modalities
        self.device = device

    def on_global_model(self, model: torch.nn.Module, global_meta: dict[str, Any], current_round: int) -> None:
        """Called after the global weights are loaded, before local training (e.g. snapshot a teacher)."""

    def training_loss(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor], epoch: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss of one batch and its named terms (floats, for logging)."""
        raise NotImplementedError

    def round_payload(self, model: torch.nn.Module, train_loader: Any) -> dict[str, Any]:
        """Extra items sent with this round's update (numpy arrays, lists or numbers; never tensors)."""
        return {}

    def sends_parameter(self, name: str) -> bool:
        """Whether the weight ``name`` goes into this site's update (default: all of them).

        A method may leave out weights the site never trains (e.g. the encoder of a sequence it lacks), but only
        where the job's aggregation strategy accepts the omission
        (:meth:`fedbrats.federated.server.aggregation.AggregationStrategy.may_omit`); otherwise the server
        rejects the update as incomplete.
        """
        return True


def check_non_negative(values: dict[str, float]) -> None:
    """Raise a ValueError naming the first option (e.g. a loss weight) that is negative."""
    for arg, value in values.items():
        if value < 0:
            raise ValueError(f"{arg} must be >= 0, got {value}")
