"""The exceptions the training loop raises for reasons a user can act on. The loop imports them
where it raises them: a fit that fails on none of them never loads this module."""

from __future__ import annotations


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""


class TrainingInterrupted(Exception):
    """Training stopped before its end for a reason outside the run (a signal, a time limit):
    the run can be resumed. `ModelCheckpoint` saves the position reached (see `on_exception`)."""


class TimeLimitReached(TrainingInterrupted):
    """`Trainer(max_time=...)` passed: raised after the first training step past the limit."""


class BatchLoadError(TrainingInterrupted):
    """Loading a training or validation batch failed: a file removed or changed on disk, an error
    in a DataLoader worker. It is raised between steps, from the loader's error (its ``__cause__``),
    so `ModelCheckpoint` saves the position before that batch, as for any interruption; once the
    data is fixed, the run resumes at that batch.

    Args:
        where: the batch, e.g. ``"training batch 7 of epoch 2"``.
        error: the loader's error.

    Attributes:
        reason: the loader's error in one line, ``Type: message`` (for an error re-raised from a
            DataLoader worker, the worker's own error rather than its traceback).
    """

    def __init__(self, where: str, error: BaseException) -> None:
        self.reason = one_line_error(error)
        super().__init__(f"loading {where} failed: {self.reason}")


def one_line_error(error: BaseException) -> str:
    """`error` in one line, ``Type: message``; for an error a DataLoader worker raised (whose
    message holds the worker's traceback), the type and message of the worker's own error."""
    text = str(error).strip()
    name = type(error).__name__
    if "Original Traceback" in text:  # the last line is "package.module.Type: message"
        last = text.splitlines()[-1].strip()
        qualified, _, text = last.partition(": ")
        name = qualified.rsplit(".", 1)[-1]
    message = " ".join(line.strip() for line in text.splitlines() if line.strip())
    return f"{name}: {message}" if message else name
