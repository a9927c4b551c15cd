"""`ModelCheckpoint`: the last and the best training state, written atomically."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from trainer.callback import Callback
from trainer.callbacks.monitor import check_mode, check_monitor, improves, worst
from trainer.checkpoint import atomic_save
from trainer.core import NonFiniteLossError


class ModelCheckpoint(Callback):
    """Save the whole training state every epoch (``last.pt``) and whenever `monitor` improves
    (``best.pt``), atomically, so a crash never leaves a broken file.

    A checkpoint holds `Trainer.state_dict()` (model, optimizer, scheduler, grad scaler, epochs
    done, global step, history, random generators, callback states) and `config`, e.g. the
    recipe's options. Continue a run with ``trainer.fit(..., resume_from=checkpoint.last_path)``.
    It runs after the other callbacks (``order = 100``), so the state it saves includes what they
    did at that epoch's end (an early stop, the logs, their own states), and it flushes the
    run's shared resources (the TensorBoard writer) before saving: a checkpoint is never ahead of
    the logs.
    """

    rank_zero_only = True
    order = 100

    def __init__(
        self,
        dirpath: str | os.PathLike,
        monitor: str | None = "val_loss",
        mode: str = "min",
        save_last: bool = True,
        config: dict[str, Any] | None = None,
    ) -> None:
        self.dirpath = Path(dirpath)
        self.monitor, self.mode = monitor, check_mode(mode)
        self.save_last, self.config = save_last, dict(config or {})
        self.best = worst(mode)
        self.best_epoch: int | None = None

    @property
    def last_path(self) -> Path:
        """Where the state of the latest epoch is written."""
        return self.dirpath / "last.pt"

    @property
    def best_path(self) -> Path:
        """Where the state of the best epoch by `monitor` is written."""
        return self.dirpath / "best.pt"

    def on_epoch_end(self, trainer, logs) -> None:
        improved = False
        if self.monitor is not None:
            value = check_monitor("ModelCheckpoint", self.monitor, logs)
            if improves(value, self.best, self.mode):
                self.best, self.best_epoch, improved = value, trainer.epoch, True
        if not (improved or self.save_last):
            return
        trainer.resources.flush()
        state = trainer.state_dict()
        state["config"] = self.config
        # best.pt before last.pt: a crash between the two then resumes from the previous last.pt,
        # redoes this epoch and rewrites best.pt, instead of continuing with a best.pt that misses it.
        if improved:
            atomic_save(state, self.best_path)
        if self.save_last:
            atomic_save(state, self.last_path)

    def on_exception(self, trainer, exception) -> None:
        if isinstance(exception, NonFiniteLossError):
            saved = self.last_path if self.last_path.is_file() else None
            exception.add_note(f"last good checkpoint: {saved}" if saved else "no checkpoint was written yet")

    def state_dict(self) -> dict[str, Any]:
        """The best value so far and its epoch."""
        return {"best": self.best, "best_epoch": self.best_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""
        self.best, self.best_epoch = state["best"], state["best_epoch"]
