"""The checks of options (positive integers, batch limits, renamed options), those of the `Trainer`,
`batches_taken` (what a batch limit takes of a loader) and `resolve_device`. Durations (``max_time``)
are read in `trainer.durations`."""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

import torch

from trainer.precision import PrecisionChoice, check_channels_last, normalize_precision


def positive_int(name: str, value: Any, optional: bool = False) -> int | None:
    """`value` if it is a positive integer (or None when `optional`), else a ValueError naming it."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        wanted = "a positive integer or None" if optional else "a positive integer"
        raise ValueError(f"{name} must be {wanted}, got {value!r}")
    return value


def renamed_option(owner: str, old: str, old_value: Any, new: str, value: Any) -> Any:
    """`value`, or `old_value` given under the option's former name `old` (with a
    DeprecationWarning that names `new`, the option to use instead).

    Args:
        owner: the class the option belongs to, for the message.
        old: the former name.
        old_value: what was passed under it (None: nothing).
        new: the current name.
        value: what was passed under the current name.
    """
    if old_value is None:
        return value
    warnings.warn(
        f"{owner}({old}=...) is deprecated: pass {new}={old_value!r} (counted in optimizer steps)",
        DeprecationWarning,
        stacklevel=3,
    )
    return old_value


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


def batches_taken(loader: Iterable, limit: int | float | None, name: str) -> int | None:
    """How many batches of `loader` a pass takes under `limit` (see
    `check_batch_limit`; `name` is the option's): all of them (None for a loader
    without a length) when there is no limit; a fraction keeps at least one batch."""
    try:
        count: int | None = len(loader)  # type: ignore[arg-type]
    except TypeError:
        count = None  # an iterable dataset, a generator
    if limit is None:
        return count
    if isinstance(limit, int):
        return limit if count is None else min(limit, count)
    if count is None:
        raise ValueError(f"{name}={limit} is a fraction, but the loader has no length; give a number of batches")
    return max(1, int(count * limit))


def resolve_device(device: str | torch.device) -> torch.device:
    """The `torch.device` for `device`: ``"auto"`` is CUDA when available, else the CPU; a CUDA
    device asked for on a machine without one is a ValueError.

    Args:
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or a `torch.device`.
    """
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"unknown device {device!r}; use 'auto', 'cpu' or 'cuda[:N]'") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} was asked for but no CUDA GPU is available; use 'cpu' or 'auto'")
    return resolved


def check_options(
    max_epochs: int,
    accumulate_grad_batches: int,
    val_every_n_steps: int | None,
    val_at_epoch_end: bool,
    grad_clip_norm: float | None,
    scheduler_interval: str,
) -> None:
    """A ValueError naming the first of the Trainer's plain options that is out of range.

    Args:
        max_epochs, accumulate_grad_batches, val_every_n_steps, val_at_epoch_end, grad_clip_norm,
            scheduler_interval: the `Trainer` arguments of those names.
    """
    positive_int("max_epochs", max_epochs)
    positive_int("accumulate_grad_batches", accumulate_grad_batches)
    positive_int("val_every_n_steps", val_every_n_steps, optional=True)
    if not isinstance(val_at_epoch_end, bool):
        raise ValueError(f"val_at_epoch_end must be True or False, got {val_at_epoch_end!r}")
    if grad_clip_norm is not None and not grad_clip_norm > 0:
        raise ValueError(f"grad_clip_norm must be positive, got {grad_clip_norm!r}")
    if scheduler_interval not in ("epoch", "step"):
        raise ValueError(f"scheduler_interval must be 'epoch' or 'step', got {scheduler_interval!r}")


def precision_options(
    precision: str | PrecisionChoice, channels_last: bool | str | None
) -> tuple[str, bool | str, PrecisionChoice | None]:
    """The precision (canonical name or ``"auto"``), the memory format and the `PrecisionChoice`
    given as `precision` (or None), checked.

    Args:
        precision: the `Trainer`'s ``precision`` argument.
        channels_last: the `Trainer`'s ``channels_last`` argument.
    """
    given = None
    if isinstance(precision, PrecisionChoice):
        given = precision
        if channels_last is not None and channels_last != given.channels_last:
            raise ValueError(
                f"channels_last={channels_last!r} contradicts the PrecisionChoice given as "
                f"precision (channels_last={given.channels_last}); pass one or the other"
            )
        precision, channels_last = given.precision, given.channels_last
    return (
        normalize_precision(precision),
        check_channels_last(False if channels_last is None else channels_last),
        given,
    )
