"""Validation metrics following the trainer's protocol.

A metric is ``metric(predictions, targets) -> 0-dim tensor``: the batch mean, left on the
predictions' device (no ``.item()``), so the Trainer can accumulate it without waiting on the
device. `predictions` are the model's raw logits; for a deep-supervision list the last
(full-depth) prediction is used.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

Predictions = torch.Tensor | Sequence[torch.Tensor]


def _final(predictions: Predictions) -> torch.Tensor:
    if isinstance(predictions, (list, tuple)):
        if not predictions:
            raise ValueError("metric got an empty list of predictions")
        return predictions[-1]
    return predictions


def _binarize(
    name: str, predictions: Predictions, targets: torch.Tensor, threshold: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image flattened boolean masks (N, pixels) for prediction and target."""
    logits = _final(predictions)
    if logits.shape != targets.shape:
        raise ValueError(
            f"{name}: predictions and targets must have the same shape, got "
            f"{tuple(logits.shape)} and {tuple(targets.shape)}"
        )
    if logits.dim() < 2:
        raise ValueError(f"{name}: expected a batch of images (N, ...), got shape {tuple(logits.shape)}")
    pred = torch.sigmoid(logits.float()).flatten(1) > threshold
    true = targets.flatten(1) > 0.5
    return pred, true


def iou(predictions: Predictions, targets: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Mean over the batch of each image's intersection over union.

    The prediction mask is ``sigmoid(logits) > threshold``; IoU is taken per image over all its
    pixels and classes. An image whose prediction and target are both empty scores 1.
    """
    pred, true = _binarize("iou", predictions, targets, threshold)
    intersection = (pred & true).sum(1)
    union = (pred | true).sum(1)
    per_image = torch.where(union > 0, intersection / union.clamp(min=1), 1.0)
    return per_image.mean()


def dice(predictions: Predictions, targets: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Mean over the batch of each image's Dice coefficient ``2|P∩T| / (|P| + |T|)``.

    Thresholded like `iou`; an image whose prediction and target are both empty scores 1.
    """
    pred, true = _binarize("dice", predictions, targets, threshold)
    intersection = (pred & true).sum(1)
    total = pred.sum(1) + true.sum(1)
    per_image = torch.where(total > 0, 2 * intersection / total.clamp(min=1), 1.0)
    return per_image.mean()


def accuracy(predictions: Predictions, targets: torch.Tensor) -> torch.Tensor:
    """Fraction of samples whose argmax over the class logits (N, C) equals the label (N,)."""
    logits = _final(predictions)
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(
            f"accuracy expects logits (N, C) and labels (N,), got {tuple(logits.shape)} "
            f"and {tuple(targets.shape)}"
        )
    return (logits.argmax(1) == targets).float().mean()
