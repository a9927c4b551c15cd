"""The epoch's training loss, accumulated on the device, and `RunningLoss`, which reads it between log points."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # pragma: no cover
    from trainer.core import Trainer
    from trainer.errors import NonFiniteLossError


class EpochLoss:
    """The training loss of the epoch so far: the sum of ``loss x batch size`` in a tensor on the
    device, and the number of samples. The trainer adds every batch (no device sync) and reads
    the mean at the epoch's end; `RunningLoss` reads it at log points. `added` counts every
    sample added since the object was made (never reset): throughput is its change over time.

    Args:
        device: where the sum lives.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.total = torch.zeros((), device=device)
        self.samples = 0
        self.added = 0

    def reset(self) -> None:
        """Start a new epoch."""
        self.total = torch.zeros((), device=self.device)
        self.samples = 0

    def add(self, loss: torch.Tensor, samples: int) -> None:
        """Add one batch: its mean `loss` (a detached 0-dim tensor) over `samples` samples."""
        self.total.add_(loss, alpha=samples)
        self.samples += samples
        self.added += samples

    def mean(self, single: bool, where: str) -> float:
        """The epoch's mean loss: one device sync, and with several processes (not `single`) one
        all-reduce over every rank's sums, which all ranks make together. A NaN or infinite mean
        raises `non_finite_loss` found `where` (on every rank alike, the sums being every rank's);
        an epoch that added nothing, a ValueError."""
        if self.samples == 0:
            raise ValueError("the training loader yielded no batches")
        if single:
            total, samples = self.total.item(), self.samples
        else:
            from trainer.distributed import all_reduce

            count = torch.tensor(float(self.samples), device=self.device)
            total, samples = all_reduce(torch.stack([self.total, count])).tolist()
        mean = total / samples
        if not math.isfinite(mean):
            raise non_finite_loss(mean, where)
        return mean


def non_finite_loss(value: float, where: str) -> NonFiniteLossError:
    """The error of a training loss `value` that is NaN or infinite, found `where` (e.g. ``at
    global step 12 (epoch 2/5)``)."""
    from trainer.errors import NonFiniteLossError

    return NonFiniteLossError(
        f"training loss is {value} {where}; lower the learning rate, clip gradients or check the data"
    )


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
        if not math.isfinite(mean):
            from trainer.distributed import is_distributed

            if is_distributed():
                return mean
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
