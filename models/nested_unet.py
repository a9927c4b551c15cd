"""UNet++ (Zhou et al., 2018): a U-Net with nested, dense skip pathways."""

from __future__ import annotations

import torch
from torch import nn

from models.blocks import BASE_FILTERS, UNetEncoder, VGGBlock, check_input


class NestedUNet(UNetEncoder):
    """UNet++ for segmentation, with optional deep supervision.

    Node X(i, j) (attribute ``conv{i}_{j}``) sits at depth i; for j > 0 it is a VGG block over
    the concatenation of X(i, 0..j-1) and the upsampled X(i+1, j-1). A 1x1 head ``final`` on
    X(0, 4) gives logits (N, num_classes, H, W); with ``deep_supervision`` four heads
    ``final1..final4`` on X(0, 1..4) give a list of four such tensors, the last being the
    full-depth prediction.

    Height and width must be multiples of 16. With 1 class and 3 input channels it has
    9,163,329 parameters (9,163,428 with deep supervision).

    Args:
        num_classes: output channels (one logit map per class).
        input_channels: channels of the input images.
        deep_supervision: return the predictions of all four nested decoders.
        base_filters: channels of the first level, doubled at each of the four levels below
            (32 as in the reference code; 4 gives a network with 64 times fewer parameters).
    """

    def __init__(
        self,
        num_classes: int = 1,
        input_channels: int = 3,
        deep_supervision: bool = False,
        base_filters: int = BASE_FILTERS,
    ) -> None:
        super().__init__(num_classes, input_channels, base_filters)
        self.deep_supervision = bool(deep_supervision)
        f = self.filters

        self.conv0_1 = VGGBlock(f[0] + f[1], f[0], f[0])
        self.conv1_1 = VGGBlock(f[1] + f[2], f[1], f[1])
        self.conv2_1 = VGGBlock(f[2] + f[3], f[2], f[2])
        self.conv3_1 = VGGBlock(f[3] + f[4], f[3], f[3])

        self.conv0_2 = VGGBlock(f[0] * 2 + f[1], f[0], f[0])
        self.conv1_2 = VGGBlock(f[1] * 2 + f[2], f[1], f[1])
        self.conv2_2 = VGGBlock(f[2] * 2 + f[3], f[2], f[2])

        self.conv0_3 = VGGBlock(f[0] * 3 + f[1], f[0], f[0])
        self.conv1_3 = VGGBlock(f[1] * 3 + f[2], f[1], f[1])

        self.conv0_4 = VGGBlock(f[0] * 4 + f[1], f[0], f[0])

        if self.deep_supervision:
            self.final1 = nn.Conv2d(f[0], num_classes, kernel_size=1)
            self.final2 = nn.Conv2d(f[0], num_classes, kernel_size=1)
            self.final3 = nn.Conv2d(f[0], num_classes, kernel_size=1)
            self.final4 = nn.Conv2d(f[0], num_classes, kernel_size=1)
        else:
            self.final = nn.Conv2d(f[0], num_classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """Map a (N, input_channels, H, W) batch to (N, num_classes, H, W) logits, or to a
        list of four of them with deep supervision."""
        check_input(type(self).__name__, x, self.input_channels)
        cat, up = torch.cat, self.up
        x0_0 = self.conv0_0(x)
        x1_0 = self.conv1_0(self.pool(x0_0))
        x0_1 = self.conv0_1(cat([x0_0, up(x1_0)], 1))

        x2_0 = self.conv2_0(self.pool(x1_0))
        x1_1 = self.conv1_1(cat([x1_0, up(x2_0)], 1))
        x0_2 = self.conv0_2(cat([x0_0, x0_1, up(x1_1)], 1))

        x3_0 = self.conv3_0(self.pool(x2_0))
        x2_1 = self.conv2_1(cat([x2_0, up(x3_0)], 1))
        x1_2 = self.conv1_2(cat([x1_0, x1_1, up(x2_1)], 1))
        x0_3 = self.conv0_3(cat([x0_0, x0_1, x0_2, up(x1_2)], 1))

        x4_0 = self.conv4_0(self.pool(x3_0))
        x3_1 = self.conv3_1(cat([x3_0, up(x4_0)], 1))
        x2_2 = self.conv2_2(cat([x2_0, x2_1, up(x3_1)], 1))
        x1_3 = self.conv1_3(cat([x1_0, x1_1, x1_2, up(x2_2)], 1))
        x0_4 = self.conv0_4(cat([x0_0, x0_1, x0_2, x0_3, up(x1_3)], 1))

        if self.deep_supervision:
            return [self.final1(x0_1), self.final2(x0_2), self.final3(x0_3), self.final4(x0_4)]
        return self.final(x0_4)
