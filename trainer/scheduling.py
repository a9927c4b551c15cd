"""When the learning-rate scheduler steps: one rule for every kind of scheduler.

- A scheduler steps after each optimizer step (``scheduler_interval="step"``) or at the end of
  each epoch (``"epoch"``, the default).
- `ReduceLROnPlateau` needs a value, so it steps instead after each validation the loop runs
  (at epoch ends, and inside epochs with ``val_every_n_steps``), fed ``val_loss``; in a fit that
  never validates, at the end of each epoch, fed the epoch's training ``loss``.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

#: What torch says at a scheduler's first step when this process's optimizer has not stepped yet.
_NOT_STEPPED = r"Detected call of `lr_scheduler\.step\(\)` before `optimizer\.step\(\)`"


class SchedulerStepping:
    """Applies the module's rule to one fit's scheduler.

    Args:
        scheduler: the LR scheduler, or None (then every method does nothing).
        interval: ``"epoch"`` or ``"step"``.
        validates: whether this fit runs validations (a plateau scheduler then steps after them).
        steps_done: optimizer steps the run took before this fit (in an earlier process, for a
            resumed run). torch's warning that the scheduler steps before the optimizer is then
            false and left out: a run stopped during its first validation resumes with it.
    """

    def __init__(self, scheduler: Any, interval: str, validates: bool, steps_done: int = 0) -> None:
        plateau = isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
        self.scheduler = scheduler
        self.on_step = scheduler is not None and not plateau and interval == "step"
        self.on_epoch = scheduler is not None and not plateau and interval == "epoch"
        self.on_validation = plateau and validates
        self.on_epoch_loss = plateau and not validates
        self._quiet_first_step = steps_done > 0

    def _step(self, *args: float) -> None:
        if not self._quiet_first_step:
            self.scheduler.step(*args)
            return
        self._quiet_first_step = False
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_NOT_STEPPED, category=UserWarning)
            self.scheduler.step(*args)

    def after_optimizer_step(self) -> None:
        """Called after every optimizer step."""
        if self.on_step:
            self._step()

    def after_validation(self, logs: dict[str, float]) -> None:
        """Called after every validation the loop runs, with its `logs`."""
        if self.on_validation:
            self._step(logs["val_loss"])

    def at_epoch_end(self, logs: dict[str, float]) -> None:
        """Called at the end of every epoch, with its `logs`."""
        if self.on_epoch:
            self._step()
        elif self.on_epoch_loss:
            self._step(logs["loss"])
