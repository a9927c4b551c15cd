"""Option checks of the debug limits and the time limit: batch counts, fractions, durations."""

from __future__ import annotations

import math
from datetime import timedelta
from typing import Any


def check_batch_limit(name: str, value: Any) -> int | float | None:
    """`value` if it is None, a positive int (a number of batches) or a float in (0, 1] (a
    fraction of the loader's batches), else a ValueError naming `name`."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number of batches (int >= 1) or a fraction in (0, 1], got {value!r}")
    if isinstance(value, int) and value < 1 or isinstance(value, float) and not 0.0 < value <= 1.0:
        raise ValueError(f"{name} must be a number of batches (int >= 1) or a fraction in (0, 1], got {value!r}")
    return value


def loader_length(loader: Any) -> int | None:
    """``len(loader)``, or None for a loader without a length (an iterable dataset, a generator)."""
    try:
        return len(loader)
    except TypeError:
        return None


def limited(name: str, limit: int | float | None, count: int | None) -> int | None:
    """How many of `count` batches (None: unknown) a pass takes under `limit` (see
    `check_batch_limit`); None for all of an unknown number. A fraction keeps at least one batch."""
    if limit is None:
        return count
    if isinstance(limit, int):
        return limit if count is None else min(limit, count)
    if count is None:
        raise ValueError(f"{name}={limit} is a fraction, but the loader has no length; give a number of batches")
    return max(1, int(count * limit))


def parse_duration(value: Any, name: str = "max_time") -> float:
    """Seconds of `value`: a positive number of seconds, a `timedelta` or a ``"[D:]HH:MM:SS"``
    string; else a ValueError naming `name`."""
    seconds: float | None = None
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str):
        parts = value.strip().split(":")
        if len(parts) in (3, 4) and all(part.isdigit() for part in parts):
            *days, hours, minutes, secs = (int(part) for part in parts)
            if minutes < 60 and secs < 60:
                seconds = timedelta(
                    days=days[0] if days else 0, hours=hours, minutes=minutes, seconds=secs
                ).total_seconds()
    if seconds is None or not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(
            f"{name} must be a positive number of seconds, a timedelta or 'HH:MM:SS' (or 'D:HH:MM:SS'), got {value!r}"
        )
    return seconds


def format_duration(seconds: float) -> str:
    """``H:MM:SS`` (with days in front past 24 hours), as `parse_duration` reads it back; a
    duration that is not whole seconds as ``<seconds> s``."""
    if seconds != int(seconds):
        return f"{seconds:g} s"
    return str(timedelta(seconds=int(seconds))).replace(" days, ", ":").replace(" day, ", ":")
