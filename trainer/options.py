"""The checks of the `Trainer`'s options, and `resolve_device`."""

from __future__ import annotations

import torch

from trainer.every import positive_int
from trainer.precision import PrecisionChoice, check_channels_last, normalize_precision


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
