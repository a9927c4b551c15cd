"""`WarmupCosineLR`: a linear warm-up, then cosine annealing, stepped after each optimizer step."""

from __future__ import annotations

import math

import torch

from trainer.options import positive_int

__all__ = ["WarmupCosineLR"]


class WarmupCosineLR(torch.optim.lr_scheduler.LRScheduler):
    """Learning rates that rise linearly over the first `warmup_steps` steps, then follow a half
    cosine down to `final_factor` times each group's initial rate at step `total_steps`, and stay
    there. Step it after each optimizer step (``Trainer(scheduler_interval="step")``).

    The warm-up lets Adam's moment estimates settle before the full rate moves the weights, and
    the per-step decay reaches small rates within a short run: both make a run of a few hundred
    steps end where a per-epoch schedule needs more of them.

    A fit resumed with another number of epochs than the checkpoint's calls `stretch`: the decay
    goes on from the current rate to its end at the new last step, and never climbs back up.

    Args:
        optimizer: the optimizer whose groups' rates it sets.
        total_steps: the steps of the whole run (epochs times optimizer steps per epoch).
        warmup_steps: steps of the linear rise: step ``s`` of them trains at ``(s + 1) / warmup_steps``
            of the rate.
        final_factor: the rate at the end as a fraction of the initial one, in [0, 1].
        last_epoch: the index of the last step taken, as for every torch scheduler.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        total_steps: int,
        warmup_steps: int = 0,
        final_factor: float = 0.01,
        last_epoch: int = -1,
    ) -> None:
        positive_int("total_steps", total_steps)
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or not 0 <= warmup_steps < total_steps:
            raise ValueError(f"warmup_steps must be an int in [0, total_steps={total_steps}), got {warmup_steps!r}")
        if not 0.0 <= final_factor <= 1.0:
            raise ValueError(f"final_factor must be in [0, 1], got {final_factor!r}")
        self.total_steps, self.warmup_steps, self.final_factor = total_steps, warmup_steps, float(final_factor)
        # The decay runs from (decay_start, decay_factor) to (total_steps, final_factor); `stretch` moves its start.
        self.decay_start, self.decay_factor = warmup_steps, 1.0
        super().__init__(optimizer, last_epoch)

    def factor(self, step: int) -> float:
        """The fraction of each group's initial rate at `step` (0-based)."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if step >= self.total_steps:
            return self.final_factor
        progress = (step - self.decay_start) / (self.total_steps - self.decay_start)
        return self.final_factor + (self.decay_factor - self.final_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def get_lr(self) -> list[float]:  # type: ignore[override]
        """Each group's rate at the current step."""
        factor = self.factor(self.last_epoch)
        return [float(base) * factor for base in self.base_lrs]

    def stretch(self, scale: float) -> None:
        """Make the run `scale` times as long (`trainer` calls it when a fit resumes with another
        number of epochs): the decay goes on from the current step's rate to `final_factor` at the
        new last step."""
        if not scale > 0:
            raise ValueError(f"scale must be positive, got {scale!r}")
        start = max(self.last_epoch, self.warmup_steps)
        self.decay_factor = self.factor(start)
        self.decay_start = start
        self.total_steps = max(round(self.total_steps * scale), start + 1)
