"""`models.nested_unet`: NestedUNet's layers, deep supervision and mixed precision (the checks it shares
with UNet are in test_unet.py)."""

from __future__ import annotations

import pytest
import torch

from models import (
    BCEDiceLoss,
    DeepSupervisionLoss,
    NestedUNet,
)


def test_nested_unet_layer_names():
    names = {name for name, _ in NestedUNet().named_children()}
    nodes = {f"conv{i}_{j}" for i in range(5) for j in range(5 - i)}
    assert nodes | {"pool", "up", "final"} == names
    deep = {name for name, _ in NestedUNet(deep_supervision=True).named_children()}
    assert nodes | {"pool", "up", "final1", "final2", "final3", "final4"} == deep


def test_deep_supervision_returns_four_predictions():
    torch.manual_seed(0)
    model = NestedUNet(num_classes=2, input_channels=3, deep_supervision=True, base_filters=4)
    out = model(torch.randn(2, 3, 32, 16))
    assert isinstance(out, list) and len(out) == 4
    for prediction in out:
        assert prediction.shape == (2, 2, 32, 16)
    # The four heads differ: each reads a different nested decoder.
    assert not torch.allclose(out[0], out[3])


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
