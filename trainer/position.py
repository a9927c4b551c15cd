"""`LoopPosition`: where the loop stands inside the current epoch, the part of a run that a
checkpoint taken mid-epoch must carry so that a resumed run continues at the next batch."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch


@dataclasses.dataclass
class LoopPosition:
    """The position inside the current epoch; one object, reset between epochs.

    Attributes:
        batches_done: batches of the epoch trained so far; None between epochs.
        pending: batches whose gradients wait for an optimizer step (gradient accumulation).
        validated_at: the global step of the last validation inside the epoch (None: none yet).
        resume: where the next epoch starts when a run resumes inside it: ``{"epoch", "batches",
            "rng"}``, or None.
        epoch_end_rng: the random state a resume inside the epoch starts from once its batches are
            all trained: taken before the epoch-end validation, which a resumed run does again.
        gathered: every rank's (loss sum, samples) of the epoch so far, and the ``(epoch,
            batches_done)`` they were gathered at (see `Trainer.gather_position`).
        cuda_rng: every rank's CUDA generator state, and the ``(global_step, epochs done,
            batches_done)`` they were gathered at (see `Trainer.gather_position`).
    """

    batches_done: int | None = None
    pending: int = 0
    validated_at: int | None = None
    resume: dict[str, Any] | None = None
    epoch_end_rng: dict[str, Any] | None = None
    gathered: tuple[tuple[int, int], list[tuple[torch.Tensor, int]]] | None = None
    cuda_rng: tuple[tuple[int, int, int | None], list[torch.Tensor]] | None = None

    @property
    def inside_epoch(self) -> bool:
        """Whether an epoch is under way (started and not yet ended)."""
        return self.batches_done is not None

    def start_epoch(self, first: int, fresh: bool) -> None:
        """Enter an epoch at batch `first`; a `fresh` epoch (not resumed inside) has no pending
        gradients and no validation yet."""
        if fresh:
            self.pending, self.validated_at = 0, None
        self.batches_done = first

    def end_epoch(self) -> None:
        """Leave the epoch: nothing left to resume inside it."""
        self.batches_done, self.epoch_end_rng = None, None

    def take_resume(self, epoch: int) -> dict[str, Any] | None:
        """The resume point if it is inside `epoch` (then forgotten), else None."""
        resume, self.resume = (self.resume if self.resume and self.resume["epoch"] == epoch else None), None
        return resume
