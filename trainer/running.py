"""`RunningLoss`: the mean training loss between a callback's log points, read from the trainer's
`trainer.epoch_loss.EpochLoss` (loaded by the callbacks that log it, not by a fit)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from trainer.distributed import is_distributed
from trainer.epoch_loss import non_finite_loss

if TYPE_CHECKING:  # pragma: no cover
    from trainer.core import Trainer


class RunningLoss:
    """Mean training loss since the previous `pop`, from the trainer's `EpochLoss`.

    A callback that logs every N steps calls `pop` only at its log points: the single device
    sync happens there, and nothing is done per batch. In one process a NaN or infinite loss is
    caught there too (`NonFiniteLossError`), without any extra sync. Under torchrun, where only
    rank 0 has log points, `pop` returns it (logged as it is) and every rank raises it together
    at the next point where all ranks meet: a step checkpoint, a validation or the epoch's end;
    rank 0 raising alone would leave the others waiting in their next all-reduce until the
    process group's timeout, reporting that instead of the loss. Each epoch starts a new mean. Its
    state (`state_dict`) travels in checkpoints with its callback's, so that a run resumed inside
    an epoch logs the same means as an uninterrupted one.
    """

    def __init__(self) -> None:
        self._epoch: int | None = None
        self._sum = 0.0
        self._samples = 0

    def pop(self, trainer: Trainer) -> float | None:
        """Mean loss over the samples seen since the last call (None when there were none)."""
        if trainer.epoch != self._epoch:
            self._epoch, self._sum, self._samples = trainer.epoch, 0.0, 0
        total, samples = trainer.epoch_loss.total.item(), trainer.epoch_loss.samples
        if samples <= self._samples:
            return None
        mean = (total - self._sum) / (samples - self._samples)
        self._sum, self._samples = total, samples
        if not math.isfinite(mean) and not is_distributed():  # torchrun: every rank raises it together later
            raise non_finite_loss(
                mean, f"at global step {trainer.global_step} (epoch {trainer.epoch + 1}/{trainer.max_epochs})"
            )
        return mean

    def state_dict(self) -> dict[str, Any]:
        """The epoch and the loss sum and samples at the last `pop`."""
        return {"epoch": self._epoch, "sum": self._sum, "samples": self._samples}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""
        self._epoch, self._sum, self._samples = state["epoch"], state["sum"], state["samples"]
