"""Validation metrics following the trainer's protocol, and the scores of a confusion matrix.

A metric is ``metric(predictions, targets) -> 0-dim tensor``: the batch mean, left on the
predictions' device (no ``.item()``), so the Trainer can accumulate it without waiting on the
device. `predictions` are the model's raw logits; for a deep-supervision list the last
(full-depth) prediction is used.

Label maps are scored from the confusion matrix of the whole validation, not as a mean of batch
scores: `trainer.callbacks.ConfusionMatrixCallback` counts it over every validation batch and logs
`confusion_iou` and `confusion_dice` of it. Pixels of no class (the ignore index) are never
counted, so a batch without labelled pixels adds nothing. A class that is absent from both truth
and prediction over everything counted has no score: NaN, left out of the mean over classes
(`mean_present`); it never scores a perfect 1.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Predictions = torch.Tensor | list[torch.Tensor] | tuple[torch.Tensor, ...]
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
        return _per_class_iou(pred[:, index : index + 1], true[:, index : index + 1]).mean()

    metric.__name__ = f"class_iou_{index}"
    return metric


def confusion_matrix(
    predictions: Predictions, targets: torch.Tensor, num_classes: int | None = None, ignore_index: int = 255
) -> torch.Tensor:
    """Pixel counts (K, K) of a label-map batch: row = true class, column = predicted class.

    The predicted class is the argmax of the logits; pixels whose target is `ignore_index`, or a
    value that is no class (outside ``[0, K)``), are left out, so they change no count. Counted
    without a host sync (see `trainer.callbacks.confusion.confusion_cells`). Counts are int64 on
    the predictions' device.

    Args:
        predictions: logits (N, K, H, W), or a list of them (the last is scored).
        targets: class indices (N, H, W), with `ignore_index` for pixels of no class.
        num_classes: K (default: the logits' channels).
        ignore_index: the target value of pixels of no class.
    """
    logits = _final(predictions)
    if logits.dim() < 2 or logits.shape[:1] + logits.shape[2:] != targets.shape:
        raise ValueError(
            f"confusion_matrix: expected logits (N, K, H, W) and class indices (N, H, W), got "
            f"{tuple(logits.shape)} and {tuple(targets.shape)}"
        )
    k = logits.shape[1] if num_classes is None else num_classes
    # Every pixel into one of k * k + 1 cells, the last for those left out (the ignore index, a value
    # of no class): boolean-mask indexing and bincount would make the host wait on CUDA per batch.
    counted = (targets != ignore_index) & (targets >= 0) & (targets < k)
    cells = torch.where(counted, targets.long() * k + logits.argmax(1), k * k).flatten()
    counts = torch.zeros(k * k + 1, dtype=torch.int64, device=logits.device)
    counts.scatter_add_(0, cells, torch.ones_like(cells))
    return counts[: k * k].view(k, k)


def confusion_iou(matrix: torch.Tensor) -> torch.Tensor:
    """Per-class IoU (K,) of a confusion matrix (`confusion_matrix`): true positives over
    true + predicted - true positives. A class absent from both truth and prediction has no IoU:
    NaN (`mean_present` leaves it out of the mean).

    Args:
        matrix: (K, K) counts, row = true class, column = predicted class.
    """
    matrix = matrix.double()
    hits = matrix.diagonal()
    union = matrix.sum(0) + matrix.sum(1) - hits
    return torch.where(union > 0, hits / union.clamp(min=1), torch.nan).float()


def confusion_dice(matrix: torch.Tensor) -> torch.Tensor:
    """Per-class Dice (K,) of a confusion matrix (`confusion_matrix`): twice the true positives
    over true + predicted pixels of the class. A class absent from both truth and prediction has
    no Dice: NaN (`mean_present` leaves it out of the mean).

    Args:
        matrix: (K, K) counts, row = true class, column = predicted class.
    """
    matrix = matrix.double()
    total = matrix.sum(0) + matrix.sum(1)
    return torch.where(total > 0, 2 * matrix.diagonal() / total.clamp(min=1), torch.nan).float()


def mean_present(scores: torch.Tensor) -> torch.Tensor:
    """The mean of per-class `scores` over the classes that have one (not NaN): NaN when none has.

    Args:
        scores: (K,) per-class scores, NaN for absent classes (`confusion_iou`, `confusion_dice`).
    """
    return scores.nanmean()


def label_iou(ignore_index: int = 255) -> Metric:
    """A metric for label maps scoring one batch: the mean over the classes present in the batch
    (in truth or prediction) of each class's IoU, from the batch's confusion matrix
    (`confusion_matrix`, `confusion_iou`), ignored pixels left out; NaN for a batch with no
    labelled pixel and no prediction. To score a whole validation use the confusion matrix of all
    its batches (`trainer.callbacks.ConfusionMatrixCallback` with ``metrics=``): a mean of batch
    scores weighs a sparsely labelled batch like a full one.

    Args:
        ignore_index: the target value of pixels of no class.
    """

    def metric(predictions: Predictions, targets: torch.Tensor) -> torch.Tensor:
        return mean_present(confusion_iou(confusion_matrix(predictions, targets, ignore_index=ignore_index)))

    metric.__name__ = "label_iou"
    return metric


def label_class_iou(index: int, ignore_index: int = 255) -> Metric:
    """A metric for label maps scoring one batch: the IoU of class `index` alone, from the
    batch's confusion matrix, ignored pixels left out; NaN when the class is neither in the
    batch's truth nor predicted (see `label_iou` for whole validations).

    Args:
        index: the class.
        ignore_index: the target value of pixels of no class.
    """
    if not isinstance(index, int) or index < 0:
        raise ValueError(f"class index must be an integer >= 0, got {index!r}")

    def metric(predictions: Predictions, targets: torch.Tensor) -> torch.Tensor:
        matrix = confusion_matrix(predictions, targets, ignore_index=ignore_index)
        if index >= matrix.shape[0]:
            raise ValueError(f"label_class_iou({index}): the predictions have {matrix.shape[0]} class channel(s)")
        return confusion_iou(matrix)[index]

    metric.__name__ = f"label_class_iou_{index}"
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
            f"accuracy expects logits (N, C) and labels (N,), got {tuple(logits.shape)} and {tuple(targets.shape)}"
        )
    return (logits.argmax(1) == targets).float().mean()
