"""The learning-rate schedules of a run: one formula for the trainer's optimiser and any other a method keeps
(e.g. FedMIC's personalised model)."""

from __future__ import annotations

import math

#: Names of the schedules (:attr:`fedbrats.federated.client.trainer.TrainConfig.lr_schedule`).
LR_SCHEDULES = ("poly", "cosine", "constant")


def lr_factor(schedule: str, progress: float) -> float:
    """Multiplier of the initial learning rate at ``progress`` (0 at the start of the run, 1 at its end).

    Raises:
        ValueError: an unknown ``schedule``.
    """
    progress = min(max(progress, 0.0), 1.0)
    if schedule == "poly":
        return (1.0 - progress) ** 0.9
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "constant":
        return 1.0
    raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {schedule!r}")


__all__ = ["LR_SCHEDULES", "lr_factor"]
