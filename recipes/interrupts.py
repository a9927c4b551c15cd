"""Stop signals in the recipes' commands. During training (`training_interrupts`): Ctrl-C, SIGTERM
and SIGHUP finish the current step, save, print how to resume, exit 128 + the signal. During a
command that writes files (`stop_signals_raise`): SIGINT and SIGTERM raise `Stopped`, so that the
writes in progress remove their temporary files."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

from trainer import Callback, Trainer, TrainingInterrupted
from trainer.workers import STOP_SIGNALS

__all__ = ["Interrupted", "Stopped", "stop_signals_raise", "training_interrupts"]


class Interrupted(TrainingInterrupted):
    """Training was stopped by a signal after finishing its current step.

    Args:
        signum: the signal (``signal.SIGINT``...).
    """

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
def training_interrupts(trainer: Trainer, resume_command: str, checkpoint: Path | None = None) -> Iterator[None]:
    """Handle SIGINT, SIGTERM and SIGHUP during `fit`: finish the current step, stop (callbacks get
    `on_exception` and `on_fit_end`, so logs are flushed and closed, and `ModelCheckpoint` saves
    the position reached), print how to resume and exit with 130 (SIGINT), 143 (SIGTERM) or 129
    (SIGHUP: the terminal closed; what cannot be printed there any more is left out). A
    second signal stops at once (the last checkpoint is then the one written before it). When
    no `checkpoint` exists to resume from (a stop in the first epoch of a loader that cannot
    start inside one, without step checkpoints), it says so instead of printing the command.

    Only this process acts on them: DataLoader workers forked from it, which inherit the handler
    until their ``worker_init_fn`` (`trainer.ignore_stop_signals`) ignores the signals, do nothing,
    so a signal to the whole process group stops the run once.

    Args:
        trainer: the trainer whose `fit` runs inside the block.
        resume_command: the command printed to resume the run (see `recipes.cli.resume_command`).
        checkpoint: the file the command resumes from (``last.pt``), when the run has one.
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
        say(f"\n{signal.Signals(signum).name}: stopping after the current step (send it again to stop at once)")

    previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    try:
        yield
    except Interrupted as exc:
        if checkpoint is None or checkpoint.is_file():
            say(f"stopped; resume with: {resume_command}")
        else:
            say("stopped before the first checkpoint: there is nothing to resume; start the run again")
        raise SystemExit(128 + exc.signum) from None
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
        trainer.remove_callback(watcher)


def say(line: str) -> None:
    """Print `line` on stderr, if there is still a terminal to print it on (after SIGHUP there may
    be none: the write fails, and the run must stop cleanly all the same)."""
    try:
        print(line, file=sys.stderr, flush=True)
    except OSError:
        pass


class Stopped(BaseException):
    """SIGINT or SIGTERM arrived during `stop_signals_raise`; a `BaseException`, as
    `KeyboardInterrupt`, so that no ``except Exception`` holds it up.

    Attributes:
        signum: the signal.
        name: its name (``SIGTERM``).
    """

    def __init__(self, signum: int) -> None:
        self.signum, self.name = signum, signal.Signals(signum).name
        super().__init__(f"stopped by {self.name}")


@contextlib.contextmanager
def stop_signals_raise() -> Iterator[None]:
    """While the block runs, SIGINT and SIGTERM raise `Stopped` in this process (in its main
    thread; elsewhere nothing changes), so that the ``finally`` clauses of the writes in progress
    run and remove their temporary files before the command exits; SIGTERM's default would end
    the process at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise Stopped(signum)

    previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
