"""Trained models from checkpoints: what a checkpoint says about itself, and `load_model`.

A checkpoint `ModelCheckpoint` writes is a dict (read with `trainer.checkpoint.load_checkpoint`):

==================  =====================================================================
key                 what it holds
==================  =====================================================================
``format_version``  `FORMAT_VERSION` (files without it predate self-describing checkpoints)
``model_spec``      how to rebuild the model: ``{"class": "models.unet.UNet", "args": [...],
                    "kwargs": {"num_classes": 1, "input_channels": 3}}`` (`trainer.model_spec`)
``model``           the model's weights (its ``state_dict()``)
``data``            the data's sizing and class names as the run gave them (e.g. ``classes``,
                    ``image_size``, ``input_channels``); ``{}`` when it gave none
``config``          the run's configuration (e.g. a recipe's options); ``{}`` when none
``optimizer``,      the rest of `Trainer.state_dict()`, which `fit(resume_from=...)` needs:
``scheduler``, ...  scheduler, grad scaler, epochs done, global step, history, random
                    generators, callback states, the position inside an epoch
==================  =====================================================================

A weights-only checkpoint (`ModelCheckpoint(best_weights_only=True)`'s ``best.pt``, or
`export_model`'s file) holds the first five keys alone: it rebuilds the model, it cannot resume.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainer.checkpoint import atomic_save, load_checkpoint
from trainer.model_spec import ModelSpecError, rebuild_model

#: The layout of the checkpoints this version writes (the keys in this module's docstring).
FORMAT_VERSION = 2
#: The keys that describe a trained model; a weights-only checkpoint holds these alone.
MODEL_KEYS = ("format_version", "model_spec", "model", "data", "config")


def describe(
    model_spec: dict[str, Any] | None, data: Mapping[str, Any] | None, config: Mapping[str, Any] | None
) -> dict[str, Any]:
    """The keys that make a checkpoint self-describing (all of `MODEL_KEYS` but ``model``).

    Args:
        model_spec: `trainer.model_spec.record_model` of the model (None: not recorded, the
            key is left out).
        data: the data's sizing and class names (None: none given).
        config: the run's configuration (None: none given).
    """
    described = {
        "format_version": FORMAT_VERSION,
        "model_spec": model_spec,
        "data": dict(data or {}),
        "config": dict(config or {}),
    }
    if model_spec is None:
        del described["model_spec"]
    return described


def weights_only(state: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a checkpoint that rebuilds its model (`MODEL_KEYS`), without the training state.

    Args:
        state: a full checkpoint.
    """
    return {key: state[key] for key in MODEL_KEYS if key in state}


def _what(source: str, state: Mapping[str, Any]) -> str:
    """What a checkpoint is, for messages: its path and format version."""
    version = state.get("format_version")
    return f"{source} (checkpoint format {version})" if version is not None else source


def check_model_state(state: Mapping[str, Any], source: str | os.PathLike) -> None:
    """Refuse a checkpoint that cannot rebuild its model: a `ValueError` saying what the file
    is and what it lacks.

    Args:
        state: the loaded checkpoint.
        source: the file, for messages.
    """
    source = str(source)
    if not isinstance(state.get("model"), Mapping):
        keys = ", ".join(sorted(map(str, state))[:8]) or "nothing"
        raise ValueError(
            f"{_what(source, state)} holds no model weights (no 'model' state dict; it holds "
            f"{keys}); use a checkpoint ModelCheckpoint wrote (last.pt, best.pt)"
        )
    if "model_spec" not in state:
        age = (
            "it has no format_version: written before checkpoints recorded their model"
            if "format_version" not in state
            else "the run did not record it"
        )
        raise ValueError(
            f"{_what(source, state)} holds weights but no model_spec (the model's class and "
            f"constructor arguments; {age}); build the model yourself and load its weights with "
            "model.load_state_dict(load_checkpoint(path)['model'])"
        )


def load_model(
    checkpoint: str | os.PathLike | Mapping[str, Any],
    allowed: Iterable[type] = (),
    trusted: bool = False,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """The trained model of a checkpoint: rebuilt from its ``model_spec``, with its weights, on
    `device`, in eval mode.

    Safe for files from elsewhere: the file is read with ``weights_only`` loading (tensors and
    plain values only), and only allowed classes are built: PyTorch's layers, the project's
    models (`models.UNet`, `models.NestedUNet`, `models.FashionCNN`) and those in `allowed`;
    the module a file names is never imported unless `trusted`. Raises `FileNotFoundError` or
    `ValueError` naming the file and what it lacks (no weights, no model_spec), and
    `trainer.model_spec.ModelSpecError` (a `ValueError`) for a class that is not allowed or
    weights that do not fit the rebuilt model.

    Args:
        checkpoint: a checkpoint file (``RUN/best.pt``), or a checkpoint already loaded with
            `trainer.checkpoint.load_checkpoint`.
        allowed: further model classes to rebuild, e.g. ``[MyNet]``.
        trusted: rebuild any class the file names, importing its module (runs that module's
            code: only for files you wrote).
        device: where the model goes (``"cpu"``, ``"cuda"``, ``"cuda:N"`` or a `torch.device`).
    """
    if isinstance(checkpoint, Mapping):
        return model_from_state(checkpoint, "the checkpoint", allowed, trusted, device)
    return model_from_state(load_checkpoint(checkpoint), checkpoint, allowed, trusted, device)


def model_from_state(
    state: Mapping[str, Any],
    source: str | os.PathLike,
    allowed: Iterable[type] = (),
    trusted: bool = False,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """`load_model` of a checkpoint loaded already, with `source` naming it in messages.

    Args:
        state: the loaded checkpoint.
        source: the file it was loaded from.
        allowed: further model classes to rebuild.
        trusted: rebuild any class the file names, importing its module.
        device: where the model goes.
    """
    source = str(source)
    check_model_state(state, source)
    model = rebuild_model(state["model_spec"], allowed=allowed, trusted=trusted, source=_what(source, state))
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise ModelSpecError(
            f"the weights of {_what(source, state)} do not fit {type(model).__name__} built from "
            f"its model_spec: {' '.join(str(exc).split())[:400]}"
        ) from exc
    return model.to(device).eval()


def export_model(checkpoint: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Write the weights-only part of `checkpoint` (`weights_only`) to `path`, atomically: a
    self-describing file that `load_model` reads, without the optimizer state (for NestedUNet
    with Adam, a third of the size).

    Raises what `load_model` raises for a checkpoint that cannot rebuild its model.

    Args:
        checkpoint: a checkpoint file (``RUN/best.pt``).
        path: the file to write.
    """
    state = load_checkpoint(checkpoint)
    check_model_state(state, checkpoint)
    return atomic_save(weights_only(state), path)
