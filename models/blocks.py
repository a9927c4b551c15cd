"""Building blocks and input checks shared by UNet and NestedUNet."""

from __future__ import annotations

import torch
from torch import nn

from trainer.options import positive_int

#: The width of the first level, as in the reference code; each deeper level doubles it.
BASE_FILTERS = 32
# Four 2x poolings: both spatial sides must divide by 2**4.
SIDE_MULTIPLE = 16


class VGGBlock(nn.Sequential):
    """Two (3x3 convolution, padding 1) -> BatchNorm -> ReLU stages; keeps height and width.

    Args:
        in_channels: channels of the input.
        middle_channels: channels after the first stage.
        out_channels: channels of the output.
    """

    def __init__(self, in_channels: int, middle_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, middle_channels, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(middle_channels)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(middle_channels, out_channels, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu2 = nn.ReLU(inplace=True)


class UNetEncoder(nn.Module):
    """What UNet and NestedUNet share: the size checks, max-pool down, bilinear x2 up and the
    five encoder blocks ``conv0_0`` .. ``conv4_0`` (layer names as in the reference code, so
    state dicts match). ``self.filters`` holds the five levels' widths: ``base_filters`` doubled
    at each level (32, 64, 128, 256, 512 by default, as in the reference code)."""

    def __init__(self, num_classes: int, input_channels: int, base_filters: int = BASE_FILTERS) -> None:
        super().__init__()
        positive_int("num_classes", num_classes)
        positive_int("input_channels", input_channels)
        positive_int("base_filters", base_filters)
        self.num_classes = num_classes
        self.input_channels = input_channels
        self.base_filters = base_filters
        self.filters = f = tuple(base_filters * 2**level for level in range(5))
        self.pool = nn.MaxPool2d(2, 2)
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
        self.conv0_0 = VGGBlock(input_channels, f[0], f[0])
        self.conv1_0 = VGGBlock(f[0], f[1], f[1])
        self.conv2_0 = VGGBlock(f[1], f[2], f[2])
        self.conv3_0 = VGGBlock(f[2], f[3], f[3])
        self.conv4_0 = VGGBlock(f[3], f[4], f[4])


def nearest_multiple(side: int) -> int:
    """The multiple of `SIDE_MULTIPLE` nearest to `side` (at least one): a size the U-Nets take.

    Args:
        side: an image's height or width, in pixels.
    """
    return max(SIDE_MULTIPLE, (side + SIDE_MULTIPLE // 2) // SIDE_MULTIPLE * SIDE_MULTIPLE)


def check_input(model_name: str, x: torch.Tensor, input_channels: int) -> None:
    """Raise a clear ValueError for inputs the encoder-decoder cannot take.

    Only compares shape values, so it never waits on the device. Skipped while tracing: there
    sizes are traced tensors, and comparing them would warn and bake constants into the graph.
    """
    if torch.jit.is_tracing():
        return
    if x.dim() != 4:
        raise ValueError(f"{model_name} expects a 4-D input (N, C, H, W), got shape {tuple(x.shape)}")
    channels, height, width = x.shape[1], x.shape[2], x.shape[3]
    if channels != input_channels:
        raise ValueError(
            f"{model_name} expects {input_channels} input channels, got {channels} "
            f"(input shape {tuple(x.shape)}); build it with input_channels={channels} "
            f"or convert the images"
        )
    if height % SIDE_MULTIPLE or width % SIDE_MULTIPLE:
        raise ValueError(
            f"{model_name} needs input height and width that are multiples of {SIDE_MULTIPLE}, "
            f"got {height}x{width} (input shape {tuple(x.shape)}); resize, crop or pad to e.g. "
            f"{nearest_multiple(height)}x{nearest_multiple(width)}"
        )
