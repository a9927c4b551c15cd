"""Validation metrics following the trainer's protocol.

A metric is ``metric(predictions, targets) -> 0-dim tensor``: the batch mean, left on the
predictions' device (no ``.item()``), so the Trainer can accumulate it without waiting on the
device. `predictions` are the model's raw logits; for a deep-supervision list the last
(full-depth) prediction is used.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

Predictions = torch.Tensor | Sequence[torch.Tensor]
Metric = Callable[[Predictions, torch.Tensor], torch.Tensor]


def _final(predictions: Predictions) -> torch.Tensor:
    if isinstance(predictions, (list, tuple)):
        if not predictions:
            raise ValueError("metric got an empty list of predictions")
        return predictions[-1]
    return predictions


def _binarize(
    name: str, predictions: Predictions, targets: torch.Tensor, threshold: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean masks (N, K, pixels) for prediction and target, K the number of classes."""
    logits = _final(predictions)
    if logits.shape != targets.shape:
        raise ValueError(
            f"{name}: predictions and targets must have the same shape, got "
            f"{tuple(logits.shape)} and {tuple(targets.shape)}"
        )
    if logits.dim() < 2:
        raise ValueError(f"{name}: expected a batch of images (N, ...), got shape {tuple(logits.shape)}")
    shape = (logits.shape[0], logits.shape[1] if logits.dim() > 2 else 1, -1)
    pred = (torch.sigmoid(logits.float()) > threshold).reshape(shape)
    true = (targets > 0.5).reshape(shape)
    return pred, true


def _per_class_iou(pred: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """(N, K) IoU of each image and class; a class empty in both prediction and target scores 1."""
    intersection = (pred & true).sum(2)
    union = (pred | true).sum(2)
    return torch.where(union > 0, intersection / union.clamp(min=1), 1.0)


def _per_class_dice(pred: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    intersection = (pred & true).sum(2)
    total = pred.sum(2) + true.sum(2)
    return torch.where(total > 0, 2 * intersection / total.clamp(min=1), 1.0)


def iou(predictions: Predictions, targets: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Mean over the batch and the classes of each image's per-class intersection over union.

    The prediction mask is ``sigmoid(logits) > threshold``; for (N, K, H, W) logits each of the
    K classes is scored on its own channel (classes may overlap) and the K scores are averaged.
    A class whose prediction and target are both empty in an image scores 1.

    Args:
        predictions: logits (N, K, H, W), or a list of them (deep supervision: the last is scored).
        targets: masks (N, K, H, W) of 0 and 1.
        threshold: probability above which a pixel is predicted foreground.
    """
    return _per_class_iou(*_binarize("iou", predictions, targets, threshold)).mean()


def dice(predictions: Predictions, targets: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Mean over the batch and the classes of each image's per-class Dice ``2|P∩T| / (|P| + |T|)``.

    Thresholded and averaged like `iou`; a class empty in both prediction and target scores 1.

    Args:
        predictions: logits (N, K, H, W), or a list of them (the last is scored).
        targets: masks (N, K, H, W) of 0 and 1.
        threshold: probability above which a pixel is predicted foreground.
    """
    return _per_class_dice(*_binarize("dice", predictions, targets, threshold)).mean()


def class_iou(index: int, threshold: float = 0.5) -> Metric:
    """A metric: the IoU of class `index` alone (channel `index` of the logits), batch mean.

    For a per-class scalar beside the mean, e.g. ``metrics={"iou": iou, "iou_nucleus": class_iou(0)}``.

    Args:
        index: the class's channel.
        threshold: probability above which a pixel is predicted foreground.
    """
    if not isinstance(index, int) or index < 0:
        raise ValueError(f"class index must be an integer >= 0, got {index!r}")

    def metric(predictions: Predictions, targets: torch.Tensor) -> torch.Tensor:
        pred, true = _binarize("class_iou", predictions, targets, threshold)
        if index >= pred.shape[1]:
            raise ValueError(f"class_iou({index}): the predictions have {pred.shape[1]} class channel(s)")
        return _per_class_iou(pred[:, index:index + 1], true[:, index:index + 1]).mean()

    metric.__name__ = f"class_iou_{index}"
    return metric


def accuracy(predictions: Predictions, targets: torch.Tensor) -> torch.Tensor:
    """Fraction of samples whose argmax over the class logits equals the label.

    Args:
        predictions: class logits (N, C).
        targets: class indices (N,).
    """
    logits = _final(predictions)
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(
            f"accuracy expects logits (N, C) and labels (N,), got {tuple(logits.shape)} "
            f"and {tuple(targets.shape)}"
        )
    return (logits.argmax(1) == targets).float().mean()
