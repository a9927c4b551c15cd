"""`EarlyStopping`: stop training when a monitored value stops improving."""

from __future__ import annotations

from typing import Any

from trainer.callback import Callback
from trainer.callbacks.monitor import check_mode, check_monitor, decides_at_validations, improves, worst


class EarlyStopping(Callback):
    """Stop when `monitor` has not improved by more than `min_delta` for `patience` epochs.

    Args:
        monitor: a key of the epoch logs, e.g. ``"val_loss"`` or ``"val_iou"``.
        mode: ``"min"`` when lower is better, ``"max"`` when higher is better.
        patience: epochs without improvement tolerated before stopping.
        min_delta: the smallest change that counts as an improvement.

    Its state (`state_dict`) travels in checkpoints, so a resumed run keeps counting. It decides
    before the other callbacks (``order = -10``), so loggers and `ModelCheckpoint` see the stop.
    With `Trainer(val_every_n_steps=...)` and a validation value as `monitor`, it decides after
    each validation (`patience` counts validations) and a stop ends the epoch after that batch.
    """

    order = -10

    def __init__(self, monitor: str = "val_loss", mode: str = "min", patience: int = 3, min_delta: float = 0.0) -> None:
        check_mode(mode)
        if not isinstance(patience, int) or patience < 0:
            raise ValueError(f"patience must be a non-negative integer, got {patience!r}")
        if min_delta < 0:
            raise ValueError(f"min_delta must be >= 0, got {min_delta!r}")
        self.monitor, self.mode, self.patience, self.min_delta = monitor, mode, patience, min_delta
        self.best = worst(mode)
        self.best_epoch: int | None = None
        self.wait = 0
        self.stopped_epoch: int | None = None

    def on_validation_end(self, trainer, logs) -> None:
        if trainer.in_step_validation and self.monitor.startswith("val_"):
            self._decide(trainer, check_monitor("EarlyStopping", self.monitor, logs))

    def on_epoch_end(self, trainer, logs) -> None:
        if self.monitor in logs or not decides_at_validations(trainer, self.monitor):
            self._decide(trainer, check_monitor("EarlyStopping", self.monitor, logs))

    def _decide(self, trainer, value: float) -> None:
        if improves(value, self.best, self.mode, self.min_delta):
            self.best, self.best_epoch, self.wait = value, trainer.epoch, 0
            return
        self.wait += 1
        if self.wait >= self.patience:
            self.stopped_epoch = trainer.epoch
            trainer.should_stop = True

    def state_dict(self) -> dict[str, Any]:
        """The counters needed to continue after a resume."""
        return {
            "best": self.best,
            "best_epoch": self.best_epoch,
            "wait": self.wait,
            "stopped_epoch": self.stopped_epoch,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore counters saved by `state_dict`."""
        self.best, self.best_epoch = state["best"], state["best_epoch"]
        self.wait, self.stopped_epoch = state["wait"], state["stopped_epoch"]
