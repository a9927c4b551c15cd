"""Option types of the recipes' command lines (``parser.add_argument(..., type=positive_int)``):
each turns the text into a value or refuses it with a one-line `argparse.ArgumentTypeError`
naming what is valid: numbers finite and within float32, seeds 0 to 2**63-1, a device that is
present, a duration above zero."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import Any

import torch

from trainer.durations import parse_duration
from trainer.openmp import affinity_cpus
from trainer.options import positive_int as check_positive_int

__all__ = [
    "FLOAT32_MAX",
    "MAX_SEED",
    "device_option",
    "duration",
    "fraction",
    "layout_option",
    "non_negative_float",
    "non_negative_int",
    "positive_float",
    "positive_int",
    "seed_int",
    "thread_count",
]


def _bounded(
    convert: Callable[[str], float],
    minimum: float,
    inclusive: bool,
    wanted: str,
    below: float = math.inf,
    maximum: float = math.inf,
) -> Callable[[str], Any]:
    """An argparse type: `convert`, then a finite value above (or, if `inclusive`, at) `minimum`,
    strictly below `below` and at most `maximum`."""

    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}") from None
        if (
            not math.isfinite(value)
            or value < minimum
            or (value == minimum and not inclusive)
            or value >= below
            or value > maximum
        ):
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}")
        return value

    parse.__name__ = wanted
    parse.__doc__ = f"""argparse type: {wanted}, else a one-line error naming it.

    Args:
        text: the option's value as given on the command line.
    """
    return parse


#: The largest float32: model weights and optimizer values are float32, so no option may be larger.
FLOAT32_MAX = float(torch.finfo(torch.float32).max)
#: Seeds torch's generators take, and that stay in range with an epoch or offset added.
MAX_SEED = 2**63 - 1


def positive_int(text: str) -> int:
    """argparse type of a count: a positive integer, by the rule of `trainer.every.positive_int`.

    Args:
        text: the option's value as given on the command line.
    """
    try:
        value = check_positive_int("value", int(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    assert value is not None
    return value


positive_int.__name__ = "a positive integer"


def thread_count(text: str) -> int:
    """argparse type of ``--threads``: from 1 to the CPUs this process may use (more threads than
    CPUs only wait for each other).

    Args:
        text: the option's value as given on the command line.
    """
    cpus = affinity_cpus()
    value = positive_int(text)
    if value > cpus:
        raise argparse.ArgumentTypeError(
            f"expected 1 to {cpus}, the CPUs this process may use, got {text!r}; more threads than CPUs slow training"
        )
    return value


non_negative_int = _bounded(int, 0, True, "an integer >= 0")
positive_float = _bounded(
    float, 0.0, False, f"a positive number up to {FLOAT32_MAX:.4g} (the float32 limit)", maximum=FLOAT32_MAX
)
non_negative_float = _bounded(
    float, 0.0, True, f"a number from 0 to {FLOAT32_MAX:.4g} (the float32 limit)", maximum=FLOAT32_MAX
)
fraction = _bounded(float, 0.0, False, "a number between 0 and 1", below=1.0)
seed_int = _bounded(int, 0, True, f"an integer from 0 to {MAX_SEED}", maximum=MAX_SEED)


def duration(text: str) -> float:
    """argparse type of ``--max-time``: ``HH:MM:SS`` (or ``D:HH:MM:SS``) in seconds, above zero.

    Args:
        text: the option's value as given on the command line.
    """
    try:
        return parse_duration(text, "--max-time")
    except ValueError:
        parts = text.strip().split(":")
        if len(parts) in (3, 4) and all(part.isdigit() and int(part) == 0 for part in parts):
            raise argparse.ArgumentTypeError(
                f"must be above zero, got {text!r} (e.g. 00:30:00 for half an hour)"
            ) from None
        raise argparse.ArgumentTypeError(f"expected HH:MM:SS (or D:HH:MM:SS), got {text!r}") from None


duration.__name__ = "HH:MM:SS"


def device_option(text: str) -> str:
    """argparse type of ``--device``: ``auto``, ``cpu``, or ``cuda``/``cuda:N`` with that GPU
    present; anything else (``mps``, ``meta``, ``cuda:7`` on a 1-GPU machine) is refused at once.

    Args:
        text: the option's value as given on the command line.
    """
    wanted = "auto, cpu, cuda or cuda:N"
    if text == "auto":
        return text
    try:
        device = torch.device(text)
    except (RuntimeError, TypeError):
        raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r} (the recipes train on the CPU or CUDA only)")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise argparse.ArgumentTypeError(f"{text!r} was asked for but no CUDA GPU is available; use cpu or auto")
        if device.index is not None and device.index >= count:
            raise argparse.ArgumentTypeError(
                f"{text!r} was asked for but this machine has {count} CUDA GPU(s): cuda:0 to cuda:{count - 1}"
            )
    return text


device_option.__name__ = "device"


def layout_option(text: str) -> bool | str:
    """argparse type of ``--channels-last``: ``on`` -> True, ``off`` -> False, ``auto``.

    Args:
        text: the option's value as given on the command line.
    """
    values: dict[str, bool | str] = {"on": True, "off": False, "auto": "auto"}
    if text not in values:
        raise argparse.ArgumentTypeError(f"expected auto, on or off, got {text!r}")
    return values[text]
