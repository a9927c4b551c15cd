"""`models.metrics`: IoU, Dice, accuracy and the scores of confusion matrices on crafted values."""

from __future__ import annotations

import pytest
import torch

from models import (
    accuracy,
    class_iou,
    confusion_iou,
    dice,
    iou,
    label_class_iou,
    label_iou,
)
from models.metrics import confusion_dice, mean_present


def logits_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Confident logits whose thresholded sigmoid is exactly `mask`."""
    return torch.where(mask.bool(), 10.0, -10.0)


# --- metrics ----------------------------------------------------------------------------


def crafted_batch():
    """Image 0: a 10x10 object predicted perfectly. Image 1: a one-pixel object missed."""
    targets = torch.zeros(2, 1, 16, 16)
    targets[0, 0, 2:12, 2:12] = 1
    targets[1, 0, 7, 7] = 1
    predicted = targets.clone()
    predicted[1] = 0
    return logits_from_mask(predicted), targets


def test_iou_and_dice_average_per_image_not_pooled():
    logits, targets = crafted_batch()
    pred, true = logits > 0, targets > 0.5
    pooled_iou = (pred & true).sum() / (pred | true).sum()
    pooled_dice = 2 * (pred & true).sum() / (pred.sum() + true.sum())
    assert pooled_iou.item() == pytest.approx(100 / 101)
    assert pooled_dice.item() == pytest.approx(200 / 201)

    assert iou(logits, targets).item() == pytest.approx(0.5)
    assert dice(logits, targets).item() == pytest.approx(0.5)


def test_iou_and_dice_hand_values_on_partial_overlap():
    targets = torch.zeros(2, 1, 4, 4)
    predicted = torch.zeros(2, 1, 4, 4)
    targets[0, 0, 0, :3] = 1  # 3 pixels
    predicted[0, 0, 0, 1:4] = 1  # 3 pixels, 2 shared: IoU 2/4, Dice 4/6
    targets[1, 0, :2, :2] = 1  # 4 pixels
    predicted[1, 0, :2, :1] = 1  # 2 pixels inside: IoU 2/4, Dice 4/6
    predicted[1, 0, 3, 3] = 1  # plus one false positive: IoU 2/5, Dice 4/7
    logits = logits_from_mask(predicted)
    assert iou(logits, targets).item() == pytest.approx((2 / 4 + 2 / 5) / 2)
    assert dice(logits, targets).item() == pytest.approx((4 / 6 + 4 / 7) / 2)


def test_metrics_average_the_classes_of_an_image():
    targets = torch.zeros(1, 2, 4, 4)
    targets[0, 0, :2] = 1  # class 0: 8 pixels
    targets[0, 1, 3, 3] = 1  # class 1: 1 pixel
    predicted = torch.zeros_like(targets)
    predicted[0, 0, :2] = 1  # class 0 right, class 1 missed
    logits = logits_from_mask(predicted)
    assert iou(logits, targets).item() == pytest.approx((1 + 0) / 2)  # pooled pixels would give 8/9
    assert dice(logits, targets).item() == pytest.approx((1 + 0) / 2)
    assert class_iou(0)(logits, targets).item() == 1.0 and class_iou(1)(logits, targets).item() == 0.0
    with pytest.raises(ValueError, match="2 class channel"):
        class_iou(2)(logits, targets)


def test_empty_prediction_and_empty_target_score_one():
    targets = torch.zeros(3, 1, 4, 4)
    logits = torch.full((3, 1, 4, 4), -5.0)
    assert iou(logits, targets).item() == 1.0
    assert dice(logits, targets).item() == 1.0
    # Mixed with an image that is completely wrong: (1 + 0) / 2.
    targets[0, 0, 0, 0] = 1
    assert iou(logits[:2], targets[:2]).item() == pytest.approx(0.5)
    assert dice(logits[:2], targets[:2]).item() == pytest.approx(0.5)


def test_threshold_applies_to_sigmoid_probabilities():
    targets = torch.ones(1, 1, 2, 2)
    logits = torch.zeros(1, 1, 2, 2)  # sigmoid = 0.5, not above the default threshold
    assert iou(logits, targets).item() == 0.0
    assert iou(logits, targets, threshold=0.4).item() == 1.0
    assert dice(logits, targets, threshold=0.4).item() == 1.0


def test_metrics_use_last_prediction_of_a_list():
    logits, targets = crafted_batch()
    wrong = -logits
    assert iou([wrong, wrong, logits], targets).item() == pytest.approx(0.5)
    assert dice((wrong, logits), targets).item() == pytest.approx(0.5)
    assert iou([logits, wrong], targets).item() < 0.1


def test_metrics_return_0_dim_tensor_without_syncing(monkeypatch):
    logits, targets = crafted_batch()
    class_logits = torch.tensor([[2.0, 1.0], [0.0, 3.0]])
    labels = torch.tensor([0, 1])

    def forbidden(*args, **kwargs):
        raise AssertionError("metrics must not move values to the host")

    for name in ("item", "cpu", "tolist", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    values = [iou(logits, targets), dice(logits, targets), accuracy(class_logits, labels)]
    monkeypatch.undo()
    for value in values:
        assert isinstance(value, torch.Tensor)
        assert value.dim() == 0 and value.dtype == torch.float32
        assert value.device == logits.device


def test_metrics_reject_shape_mismatch():
    with pytest.raises(ValueError, match=r"iou.*\(2, 1, 4, 4\) and \(2, 4, 4\)"):
        iou(torch.zeros(2, 1, 4, 4), torch.zeros(2, 4, 4))
    with pytest.raises(ValueError, match=r"accuracy.*\(4, 3\).*\(4, 1\)"):
        accuracy(torch.zeros(4, 3), torch.zeros(4, 1, dtype=torch.long))


def test_accuracy_on_crafted_example():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [1.0, 0.0, 5.0], [4.0, 0.0, 0.0]])
    labels = torch.tensor([0, 1, 0, 1])  # argmax is 0, 1, 2, 0: two right
    assert accuracy(logits, labels).item() == pytest.approx(0.5)
    assert accuracy([torch.zeros(4, 3), logits], labels).item() == pytest.approx(0.5)
    assert accuracy(logits, torch.tensor([0, 1, 2, 0])).item() == 1.0


def test_a_label_map_batch_without_labelled_pixels_has_no_score_not_a_perfect_one():
    logits = torch.randn(2, 3, 4, 4)
    unlabelled = torch.full((2, 4, 4), 255)
    assert label_iou(255)(logits, unlabelled).isnan()  # it used to score 1.0
    assert label_class_iou(1, 255)(logits, unlabelled).isnan()
    labelled = unlabelled.clone()
    labelled[0, 0, 0] = logits[0, :, 0, 0].argmax()  # one labelled pixel, predicted right
    assert label_iou(255)(logits, labelled).item() > 0


def test_confusion_scores_of_a_whole_validation():
    matrix = torch.tensor([[6, 2], [0, 2]])  # class 0: 6 of 8 right; class 1: 2 right, 2 more predicted
    assert confusion_iou(matrix).tolist() == pytest.approx([6 / 8, 2 / 4])
    assert confusion_dice(matrix).tolist() == pytest.approx([12 / 14, 4 / 6])
    assert mean_present(torch.tensor([0.5, float("nan"), 1.0])).item() == pytest.approx(0.75)
