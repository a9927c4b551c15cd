"""U-Net (Ronneberger et al., 2015) with VGG blocks, as in the pytorch-nested-unet archs."""

from __future__ import annotations

import torch
from torch import nn

from models.blocks import BASE_FILTERS, UNetEncoder, VGGBlock, check_input


class UNet(UNetEncoder):
    """Four-level U-Net for segmentation; returns logits of shape (N, num_classes, H, W).

    Height and width must be multiples of 16. With 1 class and 3 input channels it has
    7,852,545 parameters.

    Args:
        num_classes: output channels (one logit map per class).
        input_channels: channels of the input images.
        base_filters: channels of the first level, doubled at each of the four levels below
            (32 as in the reference code; 4 gives a network with 64 times fewer parameters).
    """

    def __init__(self, num_classes: int = 1, input_channels: int = 3, base_filters: int = BASE_FILTERS) -> None:
        super().__init__(num_classes, input_channels, base_filters)
        f = self.filters
        self.conv3_1 = VGGBlock(f[3] + f[4], f[3], f[3])
        self.conv2_2 = VGGBlock(f[2] + f[3], f[2], f[2])
        self.conv1_3 = VGGBlock(f[1] + f[2], f[1], f[1])
        self.conv0_4 = VGGBlock(f[0] + f[1], f[0], f[0])

        self.final = nn.Conv2d(f[0], num_classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map a (N, input_channels, H, W) batch to (N, num_classes, H, W) logits."""
        check_input(type(self).__name__, x, self.input_channels)
        x0_0 = self.conv0_0(x)
        x1_0 = self.conv1_0(self.pool(x0_0))
        x2_0 = self.conv2_0(self.pool(x1_0))
        x3_0 = self.conv3_0(self.pool(x2_0))
        x4_0 = self.conv4_0(self.pool(x3_0))

        x3_1 = self.conv3_1(torch.cat([x3_0, self.up(x4_0)], 1))
        x2_2 = self.conv2_2(torch.cat([x2_0, self.up(x3_1)], 1))
        x1_3 = self.conv1_3(torch.cat([x1_0, self.up(x2_2)], 1))
        x0_4 = self.conv0_4(torch.cat([x0_0, self.up(x1_3)], 1))
        return self.final(x0_4)
