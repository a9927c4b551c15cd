"""Checks that stop a run before it writes anything: its saved configuration, checkpoint weights,
metrics.csv, optimizer settings and the data files it trained on (their fingerprint:
`trainer_datasets.fingerprint.data_files`)."""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from recipes.errors import UsageError

__all__ = ["check_metrics_csv", "check_optimizer", "check_recipe_config", "check_same_data", "check_weights"]


def check_recipe_config(config: Any, keys: Iterable[str], source: str | os.PathLike, recipe: str) -> None:
    """Refuse a saved configuration that is not one of recipe `recipe` (a checkpoint of the other
    recipe, or no configuration at all): a `UsageError` naming `source` and the missing options.

    Args:
        config: the configuration saved with the run (a checkpoint's ``"config"``, config.json).
        keys: the options every configuration of the recipe holds.
        source: the file it came from, for the message.
        recipe: the recipe's name (``nested_unet``...).
    """
    if not isinstance(config, Mapping):
        raise UsageError(f"{source} is not a run of recipes.{recipe}: it holds no run configuration")
    missing = [key for key in keys if key not in config]
    if missing:
        shown = ", ".join("--" + key.replace("_", "-") for key in missing[:4]) + (", ..." if len(missing) > 4 else "")
        raise UsageError(
            f"{source} is not a run of recipes.{recipe} (another recipe's?): its configuration has no {shown}"
        )


def check_weights(model: torch.nn.Module, state: Mapping[str, Any], source: str | os.PathLike) -> None:
    """Refuse a checkpoint whose weights do not fit `model`, the network its configuration
    describes (other layers or shapes): a `UsageError` naming `source` and the first differences.

    Args:
        model: the network built from the checkpoint's configuration.
        state: the loaded checkpoint (its ``"model"`` holds the weights).
        source: the checkpoint file, for the message.
    """
    weights = state.get("model")
    if not isinstance(weights, Mapping):
        raise UsageError(f"{source} holds no model weights; use a checkpoint a run saved (last.pt, best.pt)")
    expected = model.state_dict()
    missing = [key for key in expected if key not in weights]
    unexpected = [key for key in weights if key not in expected]
    reshaped = [
        key
        for key in expected
        if key in weights and tuple(getattr(weights[key], "shape", ())) != tuple(expected[key].shape)
    ]
    if not (missing or unexpected or reshaped):
        return
    problems = []
    if reshaped:
        key = reshaped[0]
        problems.append(
            f"{len(reshaped)} tensor(s) of other shapes (e.g. {key}: {list(weights[key].shape)}, the "
            f"network has {list(expected[key].shape)})"
        )
    if missing:
        problems.append(f"{len(missing)} missing (e.g. {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unknown (e.g. {unexpected[0]})")
    raise UsageError(
        f"{source} holds weights of another network than its configuration describes "
        f"({type(model).__name__}): {'; '.join(problems)}; the file was changed or mixed up with "
        "another run's"
    )


def check_metrics_csv(path: str | os.PathLike) -> None:
    """Refuse a run's ``metrics.csv`` that a resumed run could not continue (binary or garbled:
    not UTF-8 text, no ``epoch`` and ``step`` columns, a step that is not a whole number): a
    `UsageError` naming it. A missing file is fine (the resumed run starts a new one).

    Args:
        path: the run's ``metrics.csv``.
    """
    path = Path(path)
    if not path.is_file():
        return
    fix = "move it out of the run folder to resume (the resumed run then starts a new metrics.csv)"
    try:
        with open(path, newline="", encoding="utf-8") as file:
            reader = csv.DictReader(file)
            if not {"epoch", "step"} <= set(reader.fieldnames or ()):
                raise UsageError(
                    f"{path} is not a metrics file of this project (its header has no epoch and step columns); {fix}"
                )
            for row in reader:
                int(row["step"] or "")
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path} is damaged: byte {exc.start} is not text (UTF-8 CSV expected); {fix}") from None
    except (csv.Error, ValueError, TypeError) as exc:
        raise UsageError(f"{path} is damaged (line {reader.line_num}: {exc}); {fix}") from None


def check_optimizer(optimizer: torch.optim.Optimizer) -> None:
    """Refuse optimizer settings that overflow float32 where the optimizer uses them, before any
    file is written: one step of an optimizer of the same kind and settings on a stand-in weight.
    (Adam's first step divides the learning rate by ``1 - beta1``, so ``--lr 1e38`` overflows
    there although it fits in a float32.) Raises `UsageError` naming the settings.

    Args:
        optimizer: the run's optimizer (left untouched).
    """
    settings = {key: value for key, value in optimizer.defaults.items() if key != "fused"}
    weight = torch.nn.Parameter(torch.ones(1))
    weight.grad = torch.ones(1)
    try:
        type(optimizer)([weight], **settings).step()
    except (RuntimeError, OverflowError) as exc:
        numbers = ", ".join(
            f"{key}={value:g}"
            for key, value in settings.items()
            if isinstance(value, float) and not isinstance(value, bool)
        )
        raise UsageError(
            f"{type(optimizer).__name__} cannot train with {numbers}: {exc}; choose smaller values (e.g. a lower --lr)"
        ) from None


def check_same_data(
    saved: Mapping[str, object], current: Mapping[str, object], root: str | os.PathLike, option: str
) -> None:
    """Refuse a resume whose data folder differs from the one the run started on (files added,
    removed or of another size): a `UsageError` naming the changes.

    Args:
        saved: `data_files` as the run recorded it.
        current: `data_files` of the folder now.
        root: the data folder, for the message.
        option: the option that names it (``--data``), for the message.
    """
    if dict(saved) == dict(current):
        return
    changes = []
    for what, names in (
        ("added", [n for n in current if n not in saved]),
        ("removed", [n for n in saved if n not in current]),
        ("changed in size", [n for n in current if n in saved and current[n] != saved[n]]),
    ):
        if names:
            changes.append(f"{len(names)} {what} ({_first(names)})")
    raise UsageError(
        f"{option} {root} changed since the run started: {'; '.join(changes)}; a resumed run must train "
        "on the same data: restore the folder, or start a new run on it"
    )


def _first(names: Sequence[str], count: int = 3) -> str:
    return ", ".join(names[:count]) + (", ..." if len(names) > count else "")
