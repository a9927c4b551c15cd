"""What the recipes share: run directories, option types and one-line command-line errors."""

from __future__ import annotations

import argparse
import glob
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path


class UsageError(Exception):
    """Bad input from the command line or the data: reported as one line, exit code 2."""


def positive_int(text: str) -> int:
    """argparse type: an integer > 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def holds_run(path: Path) -> bool:
    """Whether `path` already holds a run (TensorBoard event files or checkpoints)."""
    return bool(glob.glob(str(path / "**" / "events.out.tfevents.*"), recursive=True)
                or glob.glob(str(path / "**" / "*.pt"), recursive=True))


def make_run_dir(log_dir: str | None, default_root: str) -> Path:
    """The directory of a new run, created empty and writable.

    Without `log_dir`, a fresh ``<default_root>/<timestamp>`` that no earlier run used. An
    explicit `log_dir` that already holds a run is refused, so no run is ever overwritten.
    """
    if log_dir is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path, suffix = Path(default_root) / stamp, 1
        while path.exists():
            path, suffix = Path(default_root) / f"{stamp}-{suffix}", suffix + 1
    else:
        path = Path(log_dir)
        if path.exists() and not path.is_dir():
            raise UsageError(f"--log-dir {str(path)!r} is a file, not a directory")
        if path.is_dir() and holds_run(path):
            raise UsageError(f"--log-dir {str(path)!r} already holds a run; choose a new directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create the log directory {str(path)!r}: {exc.strerror or exc}") from None
    if not os.access(path, os.W_OK):
        raise UsageError(f"the log directory {str(path)!r} is not writable")
    return path


def run_cli(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Run a recipe's `main`, turning bad input into one line on stderr and exit code 2."""
    try:
        return main(argv)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
