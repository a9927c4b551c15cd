"""`models.losses`: BCEDiceLoss and DeepSupervisionLoss, and how a loss says its model's outputs are read."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from models import BCEDiceLoss, CEDiceLoss, DeepSupervisionLoss
from models.losses import mask_type_of_loss

# --- losses -----------------------------------------------------------------------------


def test_bce_dice_loss_matches_hand_computation():
    logits = torch.tensor([[[[2.0, -1.0], [0.5, -3.0]]], [[[-0.5, 1.5], [0.0, 4.0]]]])
    targets = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]]], [[[0.0, 1.0], [1.0, 1.0]]]])

    x, t = logits.double().flatten().tolist(), targets.flatten().tolist()
    sig = [1 / (1 + math.exp(-v)) for v in x]
    bce = -sum(ti * math.log(s) + (1 - ti) * math.log(1 - s) for s, ti in zip(sig, t)) / len(x)
    dices = []
    for image in range(2):
        s, ti = sig[4 * image : 4 * image + 4], t[4 * image : 4 * image + 4]
        inter = sum(a * b for a, b in zip(s, ti))
        dices.append((2 * inter + 1.0) / (sum(s) + sum(ti) + 1.0))
    expected = 0.5 * bce + 1 - sum(dices) / 2

    loss = BCEDiceLoss()(logits, targets)
    assert loss.dim() == 0
    assert loss.item() == pytest.approx(expected, rel=1e-6)

    # bce_weight and smooth are honoured.
    only_dice = BCEDiceLoss(bce_weight=0.0, smooth=0.0)(logits, targets)
    s0, s1 = sig[:4], sig[4:]
    d0 = 2 * sum(a * b for a, b in zip(s0, t[:4])) / (sum(s0) + sum(t[:4]))
    d1 = 2 * sum(a * b for a, b in zip(s1, t[4:])) / (sum(s1) + sum(t[4:]))
    assert only_dice.item() == pytest.approx(1 - (d0 + d1) / 2, rel=1e-6)


def test_bce_dice_loss_gradient_is_finite():
    logits = torch.tensor([[[[30.0, -30.0], [0.0, 5.0]]]], requires_grad=True)
    targets = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    BCEDiceLoss()(logits, targets).backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    assert logits.grad.abs().sum() > 0


@pytest.mark.numerics
def test_bce_dice_loss_computes_in_float32_for_bf16_logits():
    torch.manual_seed(0)
    logits = torch.randn(2, 1, 8, 8).bfloat16()
    targets = (torch.rand(2, 1, 8, 8) > 0.5).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = BCEDiceLoss()(logits, targets)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, BCEDiceLoss()(logits.float(), targets))


def test_bce_dice_loss_rejects_shape_mismatch():
    with pytest.raises(ValueError, match=r"\(2, 1, 4, 4\) and \(2, 4, 4\)"):
        BCEDiceLoss()(torch.zeros(2, 1, 4, 4), torch.zeros(2, 4, 4))


def test_deep_supervision_loss_averages_list_and_passes_tensor_through():
    def l1(p, t):
        return (p - t).abs().mean()

    wrapped = DeepSupervisionLoss(l1)
    targets = torch.zeros(1, 1, 2, 2)
    predictions = [torch.full((1, 1, 2, 2), v) for v in (1.0, 2.0, 3.0, 6.0)]
    assert wrapped(predictions, targets).item() == pytest.approx(3.0)
    assert wrapped(tuple(predictions[:2]), targets).item() == pytest.approx(1.5)
    assert wrapped(predictions[3], targets).item() == pytest.approx(6.0)


def test_deep_supervision_loss_calls_inner_loss_once_per_head(mocker):
    inner = mocker.Mock(side_effect=lambda p, t: p.sum())
    targets = torch.zeros(1)
    predictions = [torch.ones(1), 2 * torch.ones(1)]
    assert DeepSupervisionLoss(inner)(predictions, targets).item() == pytest.approx(1.5)
    assert inner.call_count == 2
    assert all(call.args[1] is targets for call in inner.call_args_list)


# --- how the outputs are read ----------------------------------------------------------------


class FocalLoss(nn.Module):
    """A loss of one's own that says how its model's outputs are read."""

    mask_type = "labels"

    def forward(self, logits, targets):
        return nn.functional.cross_entropy(logits, targets)


@pytest.mark.parametrize(
    "loss, expected",
    [
        (CEDiceLoss(), "labels"),
        (DeepSupervisionLoss(DeepSupervisionLoss(nn.CrossEntropyLoss())), "labels"),
        (BCEDiceLoss(), "binary"),
        (DeepSupervisionLoss(nn.BCEWithLogitsLoss()), "binary"),
        (FocalLoss(), "labels"),
        (DeepSupervisionLoss(FocalLoss()), "labels"),
        (nn.BCELoss(), None),  # the model applies its own sigmoid: predict would apply a second one
        (nn.MSELoss(), None),
        (lambda logits, targets: logits.mean(), None),
    ],
    ids=["ce-dice", "cross-entropy", "bce-dice", "bce-with-logits", "own", "own-wrapped", "bce", "mse", "function"],
)
def test_a_loss_says_how_the_outputs_are_read_or_nothing(loss, expected):
    assert mask_type_of_loss(loss) == expected


def test_a_mask_type_attribute_outside_the_known_values_says_nothing():
    loss = FocalLoss()
    loss.mask_type = "multilabel"
    assert mask_type_of_loss(loss) is None
