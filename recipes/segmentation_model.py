"""The trained network of a segmentation checkpoint, and what predicting needs to know of its run:
`load_trained_model`, which every segmentation recipe's ``predict`` uses."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from models.losses import MASK_TYPES
from models.predict import count_outputs
from recipes.errors import UsageError
from recipes.prediction_files import check_class_names
from trainer.checkpoint import load_checkpoint
from trainer.model_spec import short_repr
from trainer.options import resolve_device
from trainer.trained_model import model_from_state

__all__ = ["RebuildModel", "TrainedSegmentation", "load_trained_model"]

#: ``rebuild(state, config, checkpoint)``: the network of a checkpoint that does not describe its
#: model (a recipe's files from before checkpoints recorded it), weights loaded, or None when the
#: file is none of the recipe's; it may complete ``config`` (a dict of the run's options) in place.
RebuildModel = Callable[[dict[str, Any], dict[str, Any], "str | os.PathLike"], "nn.Module | None"]


@dataclass
class TrainedSegmentation:
    """A segmentation checkpoint's network and what predicting needs to know of its run.

    Args:
        model: the network, with the checkpoint's weights, on its device in eval mode
            (channels-last if the run trained so).
        classes: a name per output map.
        image_size: the square side the run's images were resized to (None: each image at its
            own size).
        mask_type: how the outputs are read: ``labels`` (a softmax, one label map) or ``binary``
            (a sigmoid and a mask per class).
        channels_last: the run trained channels-last.
        config: the run's options as its checkpoint saved them (e.g. ``precision``).
    """

    model: nn.Module
    classes: list[str]
    image_size: int | None
    mask_type: str
    channels_last: bool
    config: dict[str, Any]


def load_trained_model(
    checkpoint: str | os.PathLike,
    device: str | torch.device = "cpu",
    allowed: Iterable[type] = (),
    rebuild: RebuildModel | None = None,
) -> TrainedSegmentation:
    """The trained network of a segmentation checkpoint (of any recipe that records its model,
    see `trainer.load_model`) and what predicting needs to know of the run (`TrainedSegmentation`):
    ``classes``, ``image_size`` and ``mask_type`` are read from the checkpoint's ``data``, else
    from the run's options.

    Nothing is guessed. A missing or unreadable file, one that does not rebuild its model, or one
    that records no class names or no ``mask_type`` (or one outside `models.losses.MASK_TYPES`)
    is a `UsageError` saying what the file is and what it lacks or what to add; so are class names
    that cannot name output files (`recipes.prediction_files.check_class_names`: ``..``, ``a/b``, a
    control character...) and a count of names other than the maps the model predicts
    (`models.predict.count_outputs`).

    Args:
        checkpoint: ``RUN/best.pt`` or ``RUN/last.pt`` of a segmentation run, or an export.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"auto"`` or a `torch.device`.
        allowed: model classes to rebuild besides PyTorch's layers and the project's models.
        rebuild: for a file without a model description (no ``model_spec``), the recipe's own way
            to rebuild it (see `RebuildModel`); None: such a file is refused.
    """
    try:
        state = load_checkpoint(checkpoint)
        device = resolve_device(device)
    except (OSError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    config = dict(state.get("config") or {})
    data = state.get("data") or {}
    model = rebuild(state, config, checkpoint) if rebuild is not None and "model_spec" not in state else None
    if model is None:
        try:
            model = model_from_state(state, checkpoint, allowed=allowed)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    config.update({key: data[key] for key in ("classes", "image_size", "mask_type") if key in data})
    what = f"{checkpoint} (a checkpoint of {type(model).__name__})"
    channels = data.get("input_channels", getattr(model, "input_channels", 3))
    _check_recorded(config, channels, what)
    model.to(device).eval()
    _check_outputs(model, channels, config["classes"], what)
    channels_last = config.get("channels_last") is True
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return TrainedSegmentation(
        model, config["classes"], config.get("image_size"), config["mask_type"], channels_last, config
    )


def _check_recorded(config: dict[str, Any], channels: int, what: str) -> None:
    """Refuse a run that records no usable class names, other inputs than RGB, or no ``mask_type``
    `predict` reads; the class names are stored back checked."""
    if not config.get("classes"):
        raise UsageError(
            f"{what} records no class names (no 'classes' in its data or config); predict names "
            "its outputs after them: train with ModelCheckpoint(data={'classes': [...]}) or a recipe "
            "whose RecipeParts.data gives them"
        )
    if channels != 3:  # first: such a file is no segmentation model at all, whatever its class names
        raise UsageError(f"{what} takes {channels}-channel inputs; predict feeds RGB images (3 channels)")
    config["classes"] = check_class_names(config["classes"], what)
    mask_type = config.get("mask_type")
    if mask_type is None or mask_type not in MASK_TYPES:
        recorded = (
            "does not record how its outputs are read (no 'mask_type' in its data)"
            if mask_type is None
            else f"records mask_type {short_repr(2, 4, 40).repr(mask_type)}, which predict does not read"
        )
        raise UsageError(
            f"{what} {recorded}; record data['mask_type'] (RecipeParts.data, ModelCheckpoint(data=...)) as "
            "'labels' for a softmax over the classes (one label map per image, e.g. trained with cross-entropy) "
            "or 'binary' for a sigmoid per class (a mask per class, e.g. trained with BCE); nothing written"
        )


def _check_outputs(model: nn.Module, channels: int, classes: list[str], what: str) -> None:
    """Refuse a model that does not run on an RGB image or predicts another number of maps than `classes`."""
    try:
        outputs = count_outputs(model, channels)
    except RuntimeError as exc:
        raise UsageError(f"{what} does not run on a 64x64 RGB input: {' '.join(str(exc).split())[:300]}") from None
    if outputs != len(classes):
        raise UsageError(
            f"{what} records {len(classes)} class name{'' if len(classes) == 1 else 's'} ({', '.join(classes)}) "
            f"for a model that predicts {outputs} map{'' if outputs == 1 else 's'}: each map needs one name; "
            "nothing written"
        )
