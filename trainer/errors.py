"""The exceptions the training loop raises for reasons a user can act on."""

from __future__ import annotations


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""


class TrainingInterrupted(Exception):
    """Training stopped before its end for a reason outside the run (a signal, a time limit):
    the run can be resumed. `ModelCheckpoint` saves the position reached (see `on_exception`)."""


class TimeLimitReached(TrainingInterrupted):
    """`Trainer(max_time=...)` passed: raised after the first training step past the limit."""
