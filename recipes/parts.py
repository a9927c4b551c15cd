"""What a recipe builds from its configuration (`RecipeParts`) and what its checkpoints record of
the data (`recorded_data`), which ``predict`` reads."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from models.losses import MASK_TYPES, mask_type_of_loss
from recipes.errors import UsageError

__all__ = ["RecipeParts", "recorded_data"]


@dataclass(kw_only=True)
class RecipeParts:
    """What a recipe builds from its configuration, for `Recipe.train` to train. A recipe whose
    callbacks need more from `Recipe.build` (fixed batches for visuals, decoded images...)
    returns a subclass with those as typed fields (a ``@dataclass(kw_only=True)``).

    Attributes:
        model: the network (on the CPU; the trainer moves it).
        loss_fn: ``loss_fn(predictions, targets) -> scalar tensor``.
        optimizer: an optimizer over the model's parameters.
        train_loader: training batches.
        val_loader: validation batches (or None).
        metrics: validation metrics, as for `Trainer`.
        scheduler: a learning-rate scheduler (or None).
        scheduler_interval: when it steps: ``"epoch"`` (at each epoch's end) or ``"step"``
            (after each optimizer step, as `trainer.WarmupCosineLR` wants).
        data: what the checkpoints record of the data, which ``predict`` reads (see
            docs/extending.md): ``classes`` (a name per output map), ``image_size`` (the square
            side images were resized to; None: each image's own size), ``input_channels``,
            ``mask_type`` (how the outputs are read, one of `MASK_TYPES`; left out, `Recipe.train`
            records what the run trains, see `recorded_data`) and ``ignore_index`` (label maps:
            the value of pixels of no class). Plain values only.
    """

    model: torch.nn.Module
    loss_fn: Callable[[Any, Any], torch.Tensor]
    optimizer: torch.optim.Optimizer
    train_loader: Any
    val_loader: Any
    metrics: dict[str, Callable[[Any, Any], torch.Tensor]] = field(default_factory=dict)
    scheduler: Any = None
    scheduler_interval: str = "epoch"
    data: dict[str, Any] = field(default_factory=dict)


#: Wrappers deeper than this around a training set are not looked into for its ``mask_mode``.
_MAX_WRAPPERS = 8


def _trained_mask_type(parts: RecipeParts) -> tuple[str, str] | None:
    """``(mask_type, where it was read)`` of what `parts` trains (see `recorded_data`), or None."""
    dataset = getattr(parts.train_loader, "dataset", None)
    for _ in range(_MAX_WRAPPERS):  # a Subset (or another wrapper) keeps its data set in .dataset
        mode = getattr(dataset, "mask_mode", None)
        if isinstance(mode, str) and mode in MASK_TYPES:
            return mode, f"its training data ({type(dataset).__name__} with mask_mode {mode!r})"
        dataset = getattr(dataset, "dataset", None)
        if dataset is None:
            break
    kind = mask_type_of_loss(parts.loss_fn)
    if kind is not None:
        return kind, f"its loss ({type(parts.loss_fn).__name__})"
    return None


def recorded_data(parts: RecipeParts) -> dict[str, Any]:
    """``parts.data`` as the run's checkpoints record it: with ``mask_type``, how the model's outputs
    are read (one of `MASK_TYPES`), added where the recipe leaves it out and the run tells it.

    The run tells it by what it trains on: the training set's ``mask_mode`` (a
    `trainer_datasets.SegmentationFolder` or `SegmentationStream`, also inside a ``Subset``: the
    loader's ``dataset``), else its loss (`models.losses.mask_type_of_loss`: ``CEDiceLoss`` and
    ``nn.CrossEntropyLoss`` are ``"labels"``, ``BCEDiceLoss`` and ``nn.BCEWithLogitsLoss``
    ``"binary"``). A run that tells neither records none, and ``predict`` refuses its checkpoints
    until the recipe gives it. A ``mask_type`` the recipe gives outside `MASK_TYPES`, or other
    than what the run trains, is a `UsageError`, before anything is written.

    Args:
        parts: what the recipe's `Recipe.build` returned.
    """
    data = dict(parts.data)
    given = data.get("mask_type")
    if given is not None and given not in MASK_TYPES:
        raise UsageError(
            f"RecipeParts.data gives mask_type {given!r}; it is 'binary' (a sigmoid per class: a mask each, "
            "which may overlap) or 'labels' (a softmax over the classes: one label map), or left out to be "
            "read from the training data or the loss"
        )
    trained = _trained_mask_type(parts)
    if trained is not None:
        kind, source = trained
        if given is not None and given != kind:
            raise UsageError(
                f"RecipeParts.data gives mask_type {given!r}, but the run trains for {kind!r} by {source}; "
                f"give {kind!r} or leave mask_type out"
            )
        data["mask_type"] = kind
    return data
