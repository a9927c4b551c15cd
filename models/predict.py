"""Whole-image prediction with UNet and NestedUNet: any size, at a chosen scale, in blended tiles.

`predict_image` maps one image to per-class probabilities at the image's own size; the parts it
is made of serve a caller that batches many images (the recipe's ``predict`` command):

- `to_model_input`: the image at the scale the model learned: its own resolution, or resized to
  ``image_size x image_size`` by the rule the training reader uses (bilinear, antialiased).
- `predict_batch`: a batch of same-sized inputs of any size. Sides are padded (reflect) to a
  multiple of 16 and the result cropped back. Inputs larger than ``tile`` are cut into
  overlapping ``tile x tile`` windows whose predictions are blended with a smooth weight window,
  so memory stays bounded and no seam shows; see `plan_windows` and `blend_window`.
- `restore_size`: probabilities back at the image's own size.
- `count_outputs`: how many maps (classes) a model predicts, to check the names given for them.

Models here take a (N, C, H, W) float batch and return logits (N, K, H, W), or a list of them
(deep supervision: the last one is used). Nothing here depends on how images are read.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torch import nn
from torchvision.transforms import InterpolationMode

from models.blocks import SIDE_MULTIPLE
from trainer.precision import AUTOCAST_DTYPES, autocast, evaluating

#: Default window side: NestedUNet needs about 0.8 GB (float32) for a 512x512 window on the CPU,
#: UNet about 0.4 GB; a GPU holds many such windows. A 4096x4096 image then peaks at about 2 GiB
#: (``python -m bench.predict``).
DEFAULT_TILE = 512
#: Default minimum overlap of neighbouring windows: at least the U-Nets' receptive-field radius
#: (110 pixels). Of each window's ``overlap / 2`` pixels next to a neighbour, the outer half is
#: dropped and the inner half fades in (`blend_window`); zero padding at a window's edge changes
#: a trained U-Net's probabilities by up to 0.9 within 32 pixels of it and by under 0.04 beyond.
DEFAULT_OVERLAP = 128


def default_overlap(tile: int) -> int:
    """The overlap used when none is given: `DEFAULT_OVERLAP`, or half of a smaller `tile`
    (rounded down to a multiple of 16)."""
    return min(DEFAULT_OVERLAP, tile // 2 // SIDE_MULTIPLE * SIDE_MULTIPLE)


#: How logits become probabilities: per class (binary, multi-label) or across the classes (label maps).
ACTIVATIONS = ("sigmoid", "softmax")


def to_model_input(image: torch.Tensor, image_size: int | None = None) -> torch.Tensor:
    """The float image the model takes: at its own resolution, or resized to a square.

    Args:
        image: (C, H, W) or (N, C, H, W); uint8 (0-255) or float in [0, 1].
        image_size: None keeps the resolution; N resizes to N x N by the training reader's rule
            (bilinear, antialiased; a uint8 image is resized as uint8, as the reader does, then
            scaled to [0, 1]).

    Returns:
        float32 in [0, 1], (C, H, W) or (N, C, H, W) as given, H = W = `image_size` if set.
    """
    if image.dim() not in (3, 4):
        raise ValueError(f"expected an image (C, H, W) or a batch (N, C, H, W), got shape {tuple(image.shape)}")
    if image_size is not None:
        _check_positive("image_size", image_size)
        image = TF.resize(image, [image_size, image_size], InterpolationMode.BILINEAR, antialias=True)
    if image.dtype == torch.uint8:
        return image.float().div_(255)
    if not image.is_floating_point():
        raise ValueError(f"expected a uint8 or floating-point image, got {image.dtype}")
    return image.float()


def restore_size(probabilities: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize probabilities (K, h, w) or (N, K, h, w) to `size` (H, W), bilinearly (antialiased
    when shrinking); unchanged if they have it already.

    Args:
        probabilities: the output of `predict_batch` (or one item of it).
        size: (height, width) of the original image.
    """
    if tuple(probabilities.shape[-2:]) == tuple(size):
        return probabilities
    batch = probabilities if probabilities.dim() == 4 else probabilities[None]
    resized = F.interpolate(batch, size=tuple(size), mode="bilinear", align_corners=False, antialias=True)
    resized.clamp_(0, 1)
    return resized if probabilities.dim() == 4 else resized[0]


def plan_windows(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of the windows covering one padded side of `length` pixels.

    Windows are ``min(tile, length)`` long and start at multiples of 16 (so each window sees the
    pooling grid as the whole image does); neighbours overlap by at least `overlap` pixels and the
    starts are spread evenly, the first at 0 and the last at ``length - tile``.

    Args:
        length: the padded side, a multiple of 16.
        tile: the window side, a multiple of 16.
        overlap: the minimum overlap, 0 <= overlap < tile (rounded up to a multiple of 16).
    """
    if length % SIDE_MULTIPLE or tile % SIDE_MULTIPLE or tile < SIDE_MULTIPLE:
        raise ValueError(f"length and tile must be positive multiples of {SIDE_MULTIPLE}, got {length} and {tile}")
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be >= 0 and smaller than the tile ({tile}), got {overlap}")
    if length <= tile:
        return [0]
    # In units of 16: the largest step that keeps the overlap, then as many windows as needed,
    # spread evenly (integer division keeps every step at or below the largest).
    span, step = (length - tile) // SIDE_MULTIPLE, (tile - overlap) // SIDE_MULTIPLE
    gaps = math.ceil(span / step)
    return [i * span // gaps * SIDE_MULTIPLE for i in range(gaps + 1)]


def count_windows(height: int, width: int, tile: int = DEFAULT_TILE, overlap: int | None = None) -> int:
    """How many windows `predict_batch` predicts for one input of `height` x `width` pixels
    (1 when the input, padded to multiples of 16, fits in one `tile` x `tile` window).

    Args:
        height: the input's height at the model's scale.
        width: the input's width at the model's scale.
        tile: the window side, a multiple of 16.
        overlap: the minimum overlap of neighbouring windows (None: `default_overlap`).
    """
    overlap = default_overlap(tile) if overlap is None else overlap
    padded_h, padded_w = height + -height % SIDE_MULTIPLE, width + -width % SIDE_MULTIPLE
    return len(plan_windows(padded_h, tile, overlap)) * len(plan_windows(padded_w, tile, overlap))


def blend_window(size: int, margin: int, fade_start: bool, fade_end: bool) -> torch.Tensor:
    """1-D weights (float32, `size`) of one window along one side.

    Next to an edge that borders another window the weight is 0 over the first ``margin / 2``
    pixels (where zero padding at the window's edge disturbs the prediction most), then rises
    smoothly (sin^2) to 1 over the next ``margin / 2``; elsewhere it is 1. Edges on the image's
    border (``fade_start``/``fade_end`` False) keep weight 1: nothing else covers those pixels.
    The 2-D weight of a window is the outer product of its two sides'. With `margin` at most half
    the overlap of neighbouring windows, every pixel gets weight 1 from one of them.

    Args:
        size: the window's length.
        margin: pixels from the edge at which the weight reaches 1; 0 gives a flat window.
        fade_start: fade towards the first pixel.
        fade_end: fade towards the last pixel.
    """
    weights = torch.ones(size)
    if margin <= 0:
        return weights
    half = margin / 2
    distance = torch.arange(size, dtype=torch.float32) + 0.5
    ramp = torch.sin(((distance - half) / half).clamp(0, 1) * (math.pi / 2)) ** 2
    if fade_start:
        weights *= ramp
    if fade_end:
        weights *= ramp.flip(0)
    return weights


def side_weights(starts: list[int], size: int, length: int, overlap: int) -> list[torch.Tensor]:
    """The `blend_window` of each window along one side, all fading over half the smallest overlap
    of neighbours (so every pixel has one window at weight 1); flat when `overlap` is 0.

    Args:
        starts: the windows' offsets, from `plan_windows`.
        size: the windows' length.
        length: the side's length.
        overlap: the minimum overlap asked for.
    """
    if len(starts) == 1:
        return [torch.ones(size)]
    largest_step = max(b - a for a, b in zip(starts, starts[1:]))
    margin = (size - largest_step) // 2 if overlap else 0
    return [blend_window(size, margin, start > 0, start + size < length) for start in starts]


def predict_batch(
    model: nn.Module,
    images: torch.Tensor,
    tile: int = DEFAULT_TILE,
    overlap: int | None = None,
    precision: str = "32",
    channels_last: bool = False,
    progress: Callable[[int], None] | None = None,
    activation: str = "sigmoid",
) -> torch.Tensor:
    """Per-class probabilities of a batch of same-sized inputs, at the inputs' size.

    Runs the model in eval mode (its mode is restored afterwards) under ``torch.no_grad``. Each
    side is padded by reflection to a multiple of 16 and the result cropped back, so any size
    works. A padded input larger than `tile` on a side is predicted in overlapping windows
    (`plan_windows`), blended with smooth weights (`blend_window`: the quarter of each overlap
    next to a window's edge is dropped, the next quarter fades in) and normalised by the weights'
    sum, so no seams show and tiled and whole-image predictions agree up to the model's own edge
    effects. Each forward pass takes at most ``tile * tile`` pixels (at least one
    window), whole small images and windows alike, which bounds memory.

    Args:
        model: a segmentation network returning logits (N, K, H, W) or a list of them (the last
            is used), e.g. UNet or NestedUNet. It runs on its own device; the result is on the
            device of `images`.
        images: float (N, C, H, W) in the model's input range, e.g. from `to_model_input`.
        tile: largest window side, a multiple of 16 (default `DEFAULT_TILE`).
        overlap: minimum overlap of neighbouring windows in pixels, 0 <= overlap < tile
            (default: `default_overlap`, 128 for tiles of 256 or more); 0 tiles without blending,
            and seams may show.
        precision: ``"32"``, ``"bf16"`` (bfloat16 autocast) or ``"16-mixed"`` (float16
            autocast), e.g. what the model was trained with.
        channels_last: feed the model channels-last inputs (convert the model too, for speed).
        progress: called after each forward pass with the number of windows it predicted.
        activation: ``"sigmoid"`` (each class on its own: binary or multi-label masks) or
            ``"softmax"`` (exclusive classes: label maps; the K probabilities of a pixel sum to 1).

    Returns:
        float32 probabilities (N, K, H, W) in [0, 1] (the activation of the logits).
    """
    overlap = _check_arguments(images, tile, overlap, precision, activation)
    count, _, height, width = images.shape
    padded = _pad_to_multiple(images)
    rows = plan_windows(padded.shape[-2], tile, overlap)
    cols = plan_windows(padded.shape[-1], tile, overlap)
    window = (min(tile, padded.shape[-2]), min(tile, padded.shape[-1]))
    device = _device_of(model, images.device)
    weights_y = side_weights(rows, window[0], padded.shape[-2], overlap)
    weights_x = side_weights(cols, window[1], padded.shape[-1], overlap)
    windows = [(n, y, x) for n in range(count) for y in range(len(rows)) for x in range(len(cols))]
    per_pass = max(1, (tile * tile) // (window[0] * window[1]))
    result: torch.Tensor | None = None
    with evaluating(model):
        for first in range(0, len(windows), per_pass):
            chunk = windows[first : first + per_pass]
            crops = [padded[n, :, rows[y] : rows[y] + window[0], cols[x] : cols[x] + window[1]] for n, y, x in chunk]
            probabilities = _forward(model, torch.stack(crops), device, precision, channels_last, activation).to(
                images.device
            )
            if result is None:
                result = images.new_zeros((count, probabilities.shape[1], *padded.shape[-2:]), dtype=torch.float32)
            for (n, y, x), probability in zip(chunk, probabilities):
                weight = weights_y[y][:, None] * weights_x[x][None, :]
                target = result[n, :, rows[y] : rows[y] + window[0], cols[x] : cols[x] + window[1]]
                target.addcmul_(probability, weight.to(probability.device))
            if progress is not None:
                progress(len(chunk))
    assert result is not None
    # Weights are outer products over a full grid of windows: their sum factorises per side.
    norm_y, norm_x = _weight_sum(rows, weights_y, padded.shape[-2]), _weight_sum(cols, weights_x, padded.shape[-1])
    result = result[..., :height, :width]
    result /= (norm_y[:height, None] * norm_x[None, :width]).to(result.device)
    return result.clamp_(0, 1)


def _check_arguments(images: torch.Tensor, tile: int, overlap: int | None, precision: str, activation: str) -> int:
    """A ValueError naming the first argument of `predict_batch` out of range; else the overlap to use."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
    if images.dim() != 4 or not images.is_floating_point():
        raise ValueError(f"expected a float batch (N, C, H, W), got {images.dtype} of shape {tuple(images.shape)}")
    _check_positive("tile", tile)
    if tile % SIDE_MULTIPLE:
        raise ValueError(f"tile must be a multiple of {SIDE_MULTIPLE}, got {tile}")
    overlap = default_overlap(tile) if overlap is None else overlap
    if isinstance(overlap, bool) or not isinstance(overlap, int) or not 0 <= overlap < tile:
        raise ValueError(f"overlap must be an integer >= 0 and smaller than the tile ({tile}), got {overlap!r}")
    if precision not in AUTOCAST_DTYPES:
        raise ValueError(f"precision must be one of {', '.join(AUTOCAST_DTYPES)}, got {precision!r}")
    return overlap


def count_outputs(model: nn.Module, input_channels: int = 3) -> int:
    """The number of maps (classes) a segmentation model predicts: its ``num_classes`` where it
    keeps one as an int (UNet and NestedUNet, whose last layer has that many channels), else the
    channels of its output for one 64 x 64 input of zeros (the last output of a list, as
    `predict_batch` uses), computed in eval mode without grad on the model's device.

    Args:
        model: a segmentation network (UNet, NestedUNet or alike; see `predict_batch`).
        input_channels: the channels the model takes.
    """
    kept = getattr(model, "num_classes", None)
    if isinstance(kept, int) and not isinstance(kept, bool):
        return kept
    side = 4 * SIDE_MULTIPLE
    with evaluating(model):
        output = model(torch.zeros(1, input_channels, side, side, device=_device_of(model, torch.device("cpu"))))
    logits = output[-1] if isinstance(output, (list, tuple)) else output
    return int(logits.shape[1])


def predict_image(
    model: nn.Module,
    image: torch.Tensor,
    image_size: int | None = None,
    tile: int = DEFAULT_TILE,
    overlap: int | None = None,
    precision: str = "32",
    channels_last: bool = False,
    activation: str = "sigmoid",
) -> torch.Tensor:
    """Per-class probabilities of one image, at the image's own size.

    The image goes to the model at its own resolution (``image_size=None``: for a model trained
    on images, tiles or crops at their own resolution) or resized to ``image_size x image_size``
    as the training reader resizes (for a model trained on resized images); the probabilities
    are resized back. See `predict_batch` for the padding, tiling and blending.

    Args:
        model: a segmentation network (UNet, NestedUNet or alike; see `predict_batch`).
        image: (C, H, W), uint8 (0-255) or float in [0, 1], with the channels the model takes.
        image_size: None (own resolution) or the square side the model was trained at.
        tile: largest window side the model sees at once, a multiple of 16.
        overlap: minimum overlap of neighbouring windows in pixels, smaller than `tile` (default:
            `default_overlap`).
        precision: ``"32"``, ``"bf16"`` or ``"16-mixed"`` (autocast dtype of the forward pass).
        channels_last: feed the model channels-last inputs.
        activation: ``"sigmoid"`` (binary or multi-label) or ``"softmax"`` (label maps).

    Returns:
        float32 probabilities (K, H, W) in [0, 1], K the model's classes, on the image's device.
    """
    if image.dim() != 3:
        raise ValueError(f"expected one image (C, H, W), got shape {tuple(image.shape)}")
    inputs = to_model_input(image, image_size)[None]
    probabilities = predict_batch(
        model,
        inputs,
        tile=tile,
        overlap=overlap,
        precision=precision,
        channels_last=channels_last,
        activation=activation,
    )[0]
    return restore_size(probabilities, (image.shape[-2], image.shape[-1]))


def _forward(
    model: nn.Module,
    batch: torch.Tensor,
    device: torch.device,
    precision: str,
    channels_last: bool,
    activation: str = "sigmoid",
) -> torch.Tensor:
    batch = batch.to(device, non_blocking=True)
    if channels_last:
        batch = batch.contiguous(memory_format=torch.channels_last)
    with autocast(precision, device.type):
        output = model(batch)
    logits = output[-1] if isinstance(output, (list, tuple)) else output
    if activation == "softmax":
        return logits.float().softmax(dim=1).contiguous()
    return logits.float().sigmoid_().contiguous()


def _pad_to_multiple(images: torch.Tensor) -> torch.Tensor:
    """Pad height and width at the end to multiples of 16: reflected where the side is long
    enough, else repeating the edge."""
    height, width = images.shape[-2:]
    pad_h, pad_w = -height % SIDE_MULTIPLE, -width % SIDE_MULTIPLE
    if not pad_h and not pad_w:
        return images
    mode = "reflect" if pad_h < height and pad_w < width else "replicate"
    return F.pad(images, (0, pad_w, 0, pad_h), mode=mode)


def _weight_sum(starts: list[int], weights: list[torch.Tensor], length: int) -> torch.Tensor:
    total = torch.zeros(length)
    for start, weight in zip(starts, weights):
        total[start : start + len(weight)] += weight
    return total


def _device_of(model: nn.Module, default: torch.device) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    return default


def _check_positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
