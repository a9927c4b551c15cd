"""`EpochLoss`: the epoch's training loss, accumulated on the device; and the error of a loss that is
NaN or infinite (`non_finite_loss`). `trainer.running.RunningLoss` reads it between log points."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # pragma: no cover
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
