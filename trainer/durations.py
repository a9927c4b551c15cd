"""Durations, as ``Trainer(max_time=...)`` and the recipes' ``--max-time`` take them: `parse_duration`
reads one, `format_duration` writes it back for messages."""

from __future__ import annotations

import math
from datetime import timedelta
from typing import Any


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
