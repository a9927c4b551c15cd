"""Joint image/mask augmentation built on `torchvision.transforms.v2`."""

from __future__ import annotations

from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2


class RandomRot90(v2.Transform):
    """Rotate images and masks together by a random multiple of 90 degrees (exact, no resampling).

    Args:
        square: draw 0, 90, 180 or 270 degrees; with False only 0 or 180 degrees, so
            non-square inputs keep their shape.
    """

    def __init__(self, square: bool = True) -> None:
        super().__init__()
        self.square = square

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        if self.square:
            return {"k": int(torch.randint(4, ()))}
        return {"k": 2 * int(torch.randint(2, ()))}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if params["k"] == 0 or not isinstance(inpt, torch.Tensor):
            return inpt
        rotated = torch.rot90(inpt.as_subclass(torch.Tensor), params["k"], dims=(-2, -1))
        return tv_tensors.wrap(rotated, like=inpt) if isinstance(inpt, tv_tensors.TVTensor) else rotated


def segmentation_augmentation(square: bool = True, jitter: float = 0.1, hue: float = 0.02) -> v2.Compose:
    """Random horizontal/vertical flips, 90-degree rotations and a small colour jitter.

    Call it as ``image, mask = transform(tv_tensors.Image(image), tv_tensors.Mask(mask))``:
    geometric steps move both alike, the colour jitter changes the image only. Randomness comes
    from torch's global generator, so ``torch.manual_seed`` makes it reproducible.

    Args:
        square: the inputs are square, so 90 and 270 degree rotations are drawn too; False
            keeps a non-square input's shape (0 or 180 degrees only).
        jitter: the brightness, contrast and saturation jitter (a fraction).
        hue: the hue jitter (a fraction of the colour circle, at most 0.5).
    """
    return v2.Compose(
        [
            v2.RandomHorizontalFlip(),
            v2.RandomVerticalFlip(),
            RandomRot90(square),
            v2.ColorJitter(brightness=jitter, contrast=jitter, saturation=jitter, hue=hue),
        ]
    )
