"""`models.blocks`: VGGBlock."""

from __future__ import annotations

import torch

from models.blocks import VGGBlock


def test_vgg_block_keeps_size_and_has_two_conv_bn_relu():
    block = VGGBlock(3, 8, 5)
    assert [type(m).__name__ for m in block] == ["Conv2d", "BatchNorm2d", "ReLU"] * 2
    assert block(torch.randn(2, 3, 16, 16)).shape == (2, 5, 16, 16)
