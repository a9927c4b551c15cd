"""What a recipe's command line reports as one line: bad input (exit code 2), a run complete already (exit code 0)."""

from __future__ import annotations

__all__ = ["RunComplete", "UsageError"]


class UsageError(Exception):
    """Bad input from the command line or the data: reported as one line, exit code 2."""


class RunComplete(Exception):
    """A resumed run has nothing left to train: reported as one line, exit code 0."""
