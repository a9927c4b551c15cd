"""The error every recipe reports as one line on the command line."""

from __future__ import annotations


class UsageError(Exception):
    """Bad input from the command line or the data: reported as one line, exit code 2."""
