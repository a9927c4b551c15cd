"""Segmentation losses: BCE + soft Dice (binary or multi-label masks), cross-entropy + soft Dice
(label maps of exclusive classes), a wrapper for deep-supervision outputs, and what a loss says of
how its model's outputs are read (`mask_type_of_loss`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn


def _check_same_shape(name: str, predictions: torch.Tensor, targets: torch.Tensor) -> None:
    if predictions.shape != targets.shape:
        raise ValueError(
            f"{name}: predictions and targets must have the same shape, got "
            f"{tuple(predictions.shape)} and {tuple(targets.shape)}"
        )


def _check_non_negative(**values: float) -> None:
    """A ValueError naming the first of `values` (a loss's weights) that is negative."""
    for name, value in values.items():
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value!r}")


class BCEDiceLoss(nn.Module):
    """``bce_weight * BCE-with-logits + (1 - soft Dice)`` for binary or multi-label masks.

    The soft Dice is computed per image over all its pixels and classes on sigmoid
    probabilities, ``(2 * sum(p * t) + smooth) / (sum(p) + sum(t) + smooth)``, then averaged
    over the batch. Everything is computed in float32, also for bfloat16/float16 logits
    produced under autocast.

    Args:
        bce_weight: weight of the binary cross-entropy term.
        smooth: added to the Dice numerator and denominator; keeps empty masks finite.
    """

    #: How the outputs of a model trained with it are read (see `mask_type_of_loss`).
    mask_type: ClassVar[str] = "binary"

    def __init__(self, bce_weight: float = 0.5, smooth: float = 1.0) -> None:
        super().__init__()
        _check_non_negative(bce_weight=bce_weight, smooth=smooth)
        self.bce_weight = float(bce_weight)
        self.smooth = float(smooth)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Return the loss of (N, ...) `logits` against same-shaped 0/1 `targets` (0-dim)."""
        _check_same_shape(type(self).__name__, logits, targets)
        logits = logits.float()
        targets = targets.float()
        bce = F.binary_cross_entropy_with_logits(logits, targets)
        probs = torch.sigmoid(logits).flatten(1)
        flat_targets = targets.flatten(1)
        intersection = (probs * flat_targets).sum(1)
        dice = (2.0 * intersection + self.smooth) / (probs.sum(1) + flat_targets.sum(1) + self.smooth)
        return self.bce_weight * bce + (1.0 - dice.mean())


class CEDiceLoss(nn.Module):
    """``ce_weight * cross-entropy + (1 - soft Dice)`` for label maps: exactly one class per pixel.

    Logits are (N, K, H, W) and targets (N, H, W) class indices; pixels whose target is
    `ignore_index` count for neither term (a batch of ignored pixels only gives 0). The soft Dice
    is computed per image and class on the softmax probabilities of the counted pixels,
    ``(2 * sum(p * t) + smooth) / (sum(p) + sum(t) + smooth)``, then averaged over the batch and
    the classes. Everything is computed in float32, also for bfloat16/float16 logits.

    Args:
        ignore_index: the target value of pixels of no class.
        ce_weight: weight of the cross-entropy term.
        smooth: added to the Dice numerator and denominator; keeps absent classes finite.
    """

    #: How the outputs of a model trained with it are read (see `mask_type_of_loss`).
    mask_type: ClassVar[str] = "labels"

    def __init__(self, ignore_index: int = 255, ce_weight: float = 0.5, smooth: float = 1.0) -> None:
        super().__init__()
        _check_non_negative(ce_weight=ce_weight, smooth=smooth)
        self.ignore_index = int(ignore_index)
        self.ce_weight = float(ce_weight)
        self.smooth = float(smooth)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Return the loss of (N, K, ...) `logits` against (N, ...) integer `targets` (0-dim)."""
        if logits.dim() < 2 or logits.shape[:1] + logits.shape[2:] != targets.shape:
            raise ValueError(
                f"{type(self).__name__}: expected logits (N, K, H, W) and class indices (N, H, W), got "
                f"{tuple(logits.shape)} and {tuple(targets.shape)}"
            )
        if targets.is_floating_point():
            raise ValueError(f"{type(self).__name__}: targets must be integer class indices, got {targets.dtype}")
        logits = logits.float()
        counted = targets != self.ignore_index
        # Ignored pixels leave the mean's numerator and denominator alike; none counted gives 0, not NaN.
        ce = F.cross_entropy(logits, targets, ignore_index=self.ignore_index, reduction="sum") / counted.sum().clamp(
            min=1
        )
        num_classes = logits.shape[1]
        probs = torch.softmax(logits, dim=1).flatten(2) * counted.flatten(1).unsqueeze(1)
        one_hot = F.one_hot(torch.where(counted, targets, 0).flatten(1), num_classes).transpose(1, 2)
        one_hot = one_hot * counted.flatten(1).unsqueeze(1)
        intersection = (probs * one_hot).sum(2)
        dice = (2.0 * intersection + self.smooth) / (probs.sum(2) + one_hot.sum(2) + self.smooth)
        return self.ce_weight * ce + (1.0 - dice.mean())


class DeepSupervisionLoss(nn.Module):
    """Apply `loss` to each prediction of a deep-supervision list and average the results.

    A single tensor prediction is passed to `loss` unchanged, so one loss object serves
    models with and without deep supervision.

    Args:
        loss: ``loss(prediction, target)`` of one head, e.g. `BCEDiceLoss`.
    """

    def __init__(self, loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.loss = loss

    def forward(
        self, predictions: torch.Tensor | list[torch.Tensor] | tuple[torch.Tensor, ...], targets: torch.Tensor
    ) -> torch.Tensor:
        """Return the (mean) loss of `predictions` against `targets`."""
        if isinstance(predictions, (list, tuple)):
            if not predictions:
                raise ValueError("DeepSupervisionLoss got an empty list of predictions")
            return torch.stack([self.loss(p, targets) for p in predictions]).mean()
        return self.loss(predictions, targets)


#: The ways a segmentation model's outputs are read, as checkpoints record them (``data["mask_type"]``):
#: ``"binary"``, a sigmoid per output map, each thresholded into a mask of its own (one class: a binary
#: mask; several: multi-label masks, which may overlap); ``"labels"``, a softmax over the maps, whose
#: most probable class per pixel makes one label map.
MASK_TYPES = ("binary", "labels")


def mask_type_of_loss(loss: Any) -> str | None:
    """How the outputs of a model trained with `loss` are read (one of `MASK_TYPES`), or None when
    the loss does not tell.

    A loss that has a ``mask_type`` attribute of `MASK_TYPES` says it (`BCEDiceLoss`: ``"binary"``,
    `CEDiceLoss`: ``"labels"``; give a loss of your own one to say it too); PyTorch's
    ``nn.BCEWithLogitsLoss`` is ``"binary"`` and ``nn.CrossEntropyLoss`` ``"labels"``;
    `DeepSupervisionLoss` is what the loss it wraps is. Any other (a plain function, ``nn.BCELoss``
    of a model that applies its own sigmoid) gives None.

    Args:
        loss: the training loss (``Trainer(loss_fn=...)``, ``RecipeParts.loss_fn``).
    """
    while isinstance(loss, DeepSupervisionLoss):
        loss = loss.loss
    declared = getattr(loss, "mask_type", None)
    if isinstance(declared, str) and declared in MASK_TYPES:
        return declared
    if isinstance(loss, nn.BCEWithLogitsLoss):
        return "binary"
    if isinstance(loss, nn.CrossEntropyLoss):
        return "labels"
    return None
