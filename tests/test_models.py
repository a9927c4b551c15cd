"""Models, losses and metrics: sizes, shapes, clear errors, mixed precision, tracing, values."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from models import (
    CNN,
    BCEDiceLoss,
    DeepSupervisionLoss,
    FashionCNN,
    NestedUNet,
    UNet,
    VGGBlock,
    accuracy,
    class_iou,
    dice,
    iou,
)


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def logits_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Confident logits whose thresholded sigmoid is exactly `mask`."""
    return torch.where(mask.bool(), 10.0, -10.0)


# --- models -----------------------------------------------------------------------------


def test_fashion_cnn_size_names_and_output():
    torch.manual_seed(0)
    model = FashionCNN()
    assert CNN is FashionCNN
    assert n_params(model) == 44_426
    names = {name for name, _ in model.named_children()}
    assert names == {"conv1", "pool", "conv2", "fc1", "fc2", "fc3"}
    out = model(torch.randn(5, 1, 28, 28))
    assert out.shape == (5, 10)
    channels_last = model(torch.randn(2, 1, 28, 28).to(memory_format=torch.channels_last))
    assert channels_last.shape == (2, 10)


def test_fashion_cnn_rejects_wrong_input_shape():
    with pytest.raises(ValueError, match=r"\(N, 1, 28, 28\).*\(2, 3, 28, 28\)"):
        FashionCNN()(torch.randn(2, 3, 28, 28))


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda: UNet(), 7_852_545),
        (lambda: NestedUNet(), 9_163_329),
        (lambda: NestedUNet(deep_supervision=True), 9_163_428),
        (lambda: UNet(num_classes=1, input_channels=3), 7_852_545),
        (lambda: UNet(base_filters=4), 123_761),
        (lambda: NestedUNet(base_filters=4), 144_473),
    ],
    ids=["unet", "nested", "nested-deep-supervision", "unet-explicit-args", "unet-width-4", "nested-width-4"],
)
def test_segmentation_parameter_counts(make, expected):
    assert n_params(make()) == expected


@pytest.mark.parametrize("model_cls", [UNet, NestedUNet])
def test_base_filters_doubles_the_width_at_each_level(model_cls):
    model = model_cls(num_classes=2, base_filters=6)
    assert [getattr(model, f"conv{level}_0").conv2.out_channels for level in range(5)] == [6, 12, 24, 48, 96]
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 2, 16, 16)
    with pytest.raises(ValueError, match="base_filters must be a positive integer, got 0"):
        model_cls(base_filters=0)


def test_vgg_block_keeps_size_and_has_two_conv_bn_relu():
    block = VGGBlock(3, 8, 5)
    assert [type(m).__name__ for m in block] == ["Conv2d", "BatchNorm2d", "ReLU"] * 2
    assert block(torch.randn(2, 3, 16, 16)).shape == (2, 5, 16, 16)


def test_nested_unet_layer_names():
    names = {name for name, _ in NestedUNet().named_children()}
    nodes = {f"conv{i}_{j}" for i in range(5) for j in range(5 - i)}
    assert nodes | {"pool", "up", "final"} == names
    deep = {name for name, _ in NestedUNet(deep_supervision=True).named_children()}
    assert nodes | {"pool", "up", "final1", "final2", "final3", "final4"} == deep


@pytest.mark.parametrize("model_cls", [UNet, NestedUNet])
def test_output_shape_multi_class(model_cls):
    torch.manual_seed(0)
    model = model_cls(num_classes=3, input_channels=1, base_filters=4)
    out = model(torch.randn(2, 1, 16, 32))
    assert isinstance(out, torch.Tensor)
    assert out.shape == (2, 3, 16, 32)


def test_deep_supervision_returns_four_predictions():
    torch.manual_seed(0)
    model = NestedUNet(num_classes=2, input_channels=3, deep_supervision=True, base_filters=4)
    out = model(torch.randn(2, 3, 32, 16))
    assert isinstance(out, list) and len(out) == 4
    for prediction in out:
        assert prediction.shape == (2, 2, 32, 16)
    # The four heads differ: each reads a different nested decoder.
    assert not torch.allclose(out[0], out[3])


@pytest.mark.parametrize("model_cls", [UNet, NestedUNet])
def test_sides_not_multiple_of_16_give_clear_error(model_cls):
    with pytest.raises(ValueError) as info:
        model_cls()(torch.randn(1, 3, 30, 40))
    message = str(info.value)
    assert "multiples of 16" in message
    assert "30x40" in message and "(1, 3, 30, 40)" in message
    assert "32x48" in message  # nearest valid size


@pytest.mark.parametrize("model_cls", [UNet, NestedUNet])
def test_wrong_channel_count_gives_clear_error(model_cls):
    with pytest.raises(ValueError, match=r"expects 3 input channels, got 1"):
        model_cls(input_channels=3)(torch.randn(1, 1, 16, 16))


def test_non_4d_input_and_bad_constructor_args_give_clear_errors():
    with pytest.raises(ValueError, match=r"4-D input.*\(3, 16, 16\)"):
        UNet()(torch.randn(3, 16, 16))
    with pytest.raises(ValueError, match="num_classes must be a positive integer, got 0"):
        NestedUNet(num_classes=0)
    with pytest.raises(ValueError, match="input_channels must be a positive integer"):
        UNet(input_channels=-1)


@pytest.mark.parametrize("deep_supervision", [False, True])
def test_channels_last_bf16_autocast_forward_and_backward(deep_supervision):
    torch.manual_seed(0)
    model = NestedUNet(deep_supervision=deep_supervision).to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 16, 16).to(memory_format=torch.channels_last)
    targets = (torch.rand(2, 1, 16, 16) > 0.5).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
        loss = DeepSupervisionLoss(BCEDiceLoss())(out, targets)
    predictions = out if deep_supervision else [out]
    for prediction in predictions:
        assert prediction.dtype == torch.bfloat16
        assert prediction.shape == (2, 1, 16, 16)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_unet_channels_last_bf16_autocast_forward():
    model = UNet().to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 16, 16).to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.shape == (2, 1, 16, 16) and out.dtype == torch.bfloat16


@pytest.mark.parametrize(
    "make",
    [lambda: UNet(), lambda: NestedUNet(), lambda: NestedUNet(deep_supervision=True)],
    ids=["unet", "nested", "nested-deep-supervision"],
)
def test_jit_trace_matches_eager(make):
    torch.manual_seed(0)
    model = make().eval()
    x = torch.randn(1, 3, 16, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.trace is deprecated
        traced = torch.jit.trace(model, x, strict=False)
    with torch.no_grad():
        eager, replay = model(x), traced(x)
    if isinstance(eager, list):
        assert len(replay) == 4
        for a, b in zip(eager, replay):
            torch.testing.assert_close(a, b)
    else:
        torch.testing.assert_close(eager, replay)


def test_fashion_cnn_traces():
    model = FashionCNN().eval()
    x = torch.randn(2, 1, 28, 28)
    with warnings.catch_warnings():
        warnings.simplefilter("error", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.trace(model, x)
    torch.testing.assert_close(traced(x), model(x))


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
