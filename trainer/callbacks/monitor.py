"""Shared by callbacks that watch one value of the epoch logs."""

from __future__ import annotations

import math

MODES = ("min", "max")


def check_mode(mode: str) -> str:
    """`mode` if valid, else a clear ValueError."""
    if mode not in MODES:
        raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
    return mode


def worst(mode: str) -> float:
    """The starting 'best' value: +inf for ``"min"``, -inf for ``"max"``."""
    return math.inf if mode == "min" else -math.inf


def improves(value: float, best: float, mode: str, min_delta: float = 0.0) -> bool:
    """Whether `value` beats `best` by more than `min_delta` in direction `mode`."""
    return value < best - min_delta if mode == "min" else value > best + min_delta


def check_monitor(owner: str, monitor: str, logs: dict[str, float]) -> float:
    """The monitored value from `logs`, or a clear KeyError naming the keys there are."""
    if monitor not in logs:
        raise KeyError(
            f"{owner} monitors {monitor!r}, but the epoch logs hold {sorted(logs)}; "
            f"pass validation data or monitor one of those"
        )
    return logs[monitor]


def decides_at_validations(trainer, monitor: str) -> bool:
    """Whether a callback watching `monitor` decides after each validation rather than at epoch
    ends: with step validations (``Trainer(val_every_n_steps=...)``) for a validation value. Epoch
    logs then hold validation values only when the epoch-end validation ran."""
    return trainer.val_every_n_steps is not None and monitor.startswith("val_")
