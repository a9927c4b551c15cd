"""Ctrl-C and SIGTERM during training: finish the current step, save, print how to resume, exit 128 + the signal."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Iterator

from trainer import Callback, Trainer, TrainingInterrupted
from trainer.workers import STOP_SIGNALS


class Interrupted(TrainingInterrupted):
    """Training was stopped by a signal after finishing its current step."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


class _StopOnSignal(Callback):
    """Raises `Interrupted` at the end of the step during which a signal arrived: after every
    other callback's `on_batch_end` (the step is logged, and `ModelCheckpoint` then saves its
    position), or after a validation batch at an epoch's end. A signal during a step validation
    (``--val-every``) stops after that validation, at the end of its batch."""

    order = 1000  # after every callback that logs or saves the step

    def __init__(self) -> None:
        self.signum: int | None = None

    def on_batch_end(self, trainer, batch, outputs) -> None:
        if self.signum is not None:
            raise Interrupted(self.signum)

    def on_validation_batch_end(self, trainer, batch, outputs) -> None:
        if self.signum is not None and not trainer.in_step_validation:
            raise Interrupted(self.signum)


@contextlib.contextmanager
def training_interrupts(trainer: Trainer, resume_command: str) -> Iterator[None]:
    """Handle SIGINT and SIGTERM during `fit`: finish the current step, stop (callbacks get
    `on_exception` and `on_fit_end`, so logs are flushed and closed, and `ModelCheckpoint` saves
    the position reached), print how to resume and exit with 130 (SIGINT) or 143 (SIGTERM). A
    second signal stops at once (the last checkpoint is then the one written before it).

    Only this process acts on them: DataLoader workers forked from it, which inherit the handler
    until their ``worker_init_fn`` (`trainer.ignore_stop_signals`) ignores the signals, do nothing,
    so a signal to the whole process group stops the run once.

    Args:
        trainer: the trainer whose `fit` runs inside the block.
        resume_command: the command printed to resume the run (see `recipes.cli.resume_command`).
    """
    watcher = _StopOnSignal()
    trainer.add_callback(watcher)
    owner = os.getpid()

    def handler(signum, frame):
        if os.getpid() != owner:  # a forked DataLoader worker, before it ignores stop signals
            return
        if watcher.signum is not None:
            raise KeyboardInterrupt
        watcher.signum = signum
        print(
            f"\n{signal.Signals(signum).name}: stopping after the current step (send it again to stop at once)",
            file=sys.stderr,
        )

    previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    try:
        yield
    except Interrupted as exc:
        print(f"stopped; resume with: {resume_command}", file=sys.stderr)
        raise SystemExit(128 + exc.signum) from None
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
        trainer.remove_callback(watcher)
