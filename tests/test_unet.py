"""`models.unet`: UNet, and what UNet and NestedUNet share: sizes, shapes, clear errors, mixed precision,
tracing."""

from __future__ import annotations

import warnings

import pytest
import torch

from models import (
    NestedUNet,
    UNet,
)
from tests.helpers import n_params


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


@pytest.mark.parametrize("model_cls", [UNet, NestedUNet])
def test_output_shape_multi_class(model_cls):
    torch.manual_seed(0)
    model = model_cls(num_classes=3, input_channels=1, base_filters=4)
    out = model(torch.randn(2, 1, 16, 32))
    assert isinstance(out, torch.Tensor)
    assert out.shape == (2, 3, 16, 32)


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


def test_unet_channels_last_bf16_autocast_forward():
    model = UNet().to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 16, 16).to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.shape == (2, 1, 16, 16) and out.dtype == torch.bfloat16


@pytest.mark.numerics
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
