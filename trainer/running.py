"""`RunningLoss`: the mean training loss between two log points, read without per-batch syncs."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from trainer.core import Trainer


class RunningLoss:
    """Mean training loss since the previous `pop`, from the trainer's on-device epoch sum.

    The trainer accumulates ``loss x batch size`` in a device tensor. A callback that logs every
    N steps calls `pop` only at its log points: the single device sync happens there, and
    nothing is done per batch. A NaN or infinite loss is caught there too
    (`NonFiniteLossError`), without any extra sync.
    """

    def __init__(self) -> None:
        self._epoch: int | None = None
        self._sum = 0.0
        self._samples = 0

    def pop(self, trainer: Trainer) -> float | None:
        """Mean loss over the samples seen since the last call (None when there were none)."""
        if trainer.epoch != self._epoch:
            self._epoch, self._sum, self._samples = trainer.epoch, 0.0, 0
        total, samples = trainer.train_loss_sum.item(), trainer.train_samples
        if samples <= self._samples:
            return None
        mean = (total - self._sum) / (samples - self._samples)
        self._sum, self._samples = total, samples
        if not math.isfinite(mean):
            from trainer.core import NonFiniteLossError

            raise NonFiniteLossError(
                f"training loss is {mean} at global step {trainer.global_step} (epoch {trainer.epoch}); "
                f"lower the learning rate, clip gradients or check the data"
            )
        return mean
