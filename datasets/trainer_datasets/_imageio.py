"""Decoding and encoding of image and mask files, with errors that name the file.

PNG and JPEG are decoded by `torchvision.io`; TIFF, which `torchvision.io` cannot decode, by PIL.
"""

from __future__ import annotations

import contextlib
import os
import re
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from torchvision.io import ImageReadMode, decode_image, read_file, write_png

from trainer_datasets.errors import DatasetError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
_TIFF_EXTENSIONS = (".tif", ".tiff")


def is_image_file(path: Path) -> bool:
    """Whether `path` has one of the supported image extensions (case-insensitive)."""
    return path.suffix.lower() in IMAGE_EXTENSIONS


def read_image_rgb(path: str | os.PathLike) -> torch.Tensor:
    """Decode an image file as a uint8 (3, H, W) tensor.

    Grey images are tiled to 3 channels, an alpha channel is dropped, palette images are
    expanded and 16-bit images are scaled to 8 bits.
    """
    path = Path(path)
    if path.suffix.lower() in _TIFF_EXTENSIONS:
        image = _read_tiff(path, mask=False)
        if image.shape[0] <= 2:  # grey, or grey + alpha
            image = image[:1].expand(3, -1, -1).contiguous()
        image = image[:3]
    else:
        image = _decode(path, ImageReadMode.RGB)
    if image.dtype != torch.uint8:
        image = TF.to_dtype(image, torch.uint8, scale=True)
    return image


def read_mask(path: str | os.PathLike) -> torch.Tensor:
    """Decode a mask file as a uint8 (H, W) tensor of 0/1.

    Any non-zero value is foreground. A mask with more than two distinct values, or with two
    values of which none is 0, is not binary and raises `DatasetError` naming the file.
    Colour masks count a pixel as foreground when any colour channel is non-zero.
    """
    path = Path(path)
    if path.suffix.lower() in _TIFF_EXTENSIONS:
        raw = _read_tiff(path, mask=True)
    else:
        raw = _decode(path, ImageReadMode.UNCHANGED)
    if raw.shape[0] == 2:  # grey + alpha
        raw = raw[:1]
    elif raw.shape[0] >= 3:  # colour (+ alpha): foreground where any colour channel is set
        raw = raw[:3].amax(0, keepdim=True)
    raw = raw[0]
    if raw.dtype == torch.uint8:
        values = torch.bincount(raw.flatten(), minlength=256).nonzero()[:, 0]
    else:
        values = torch.unique(raw)
    if len(values) > 2 or (len(values) == 2 and values.min() != 0):
        shown = ", ".join(str(v) for v in values[:6].tolist()) + (", ..." if len(values) > 6 else "")
        raise DatasetError(
            f"mask {path} is not binary: it has {len(values)} distinct values ({shown}); "
            "expected background 0 and one foreground value (e.g. 0/255 or 0/1). Instance or "
            "multi-class label maps must be split into one binary mask per class folder."
        )
    return (raw != 0).to(torch.uint8)


def write_png_file(tensor: torch.Tensor, path: str | os.PathLike) -> None:
    """Write a uint8 (C, H, W) tensor as a PNG file, creating the parent folder."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with _no_deprecation_warning():
        write_png(tensor.contiguous(), str(path))


@contextlib.contextmanager
def _no_deprecation_warning() -> Iterator[None]:
    # torchvision 0.29 deprecates its image codecs in favour of TorchCodec, which is not among
    # this project's dependencies; the warning would repeat for every file decoded.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The image decoding and encoding", category=DeprecationWarning)
        yield


def _decode(path: Path, mode: ImageReadMode) -> torch.Tensor:
    with _no_deprecation_warning():
        try:
            data = read_file(str(path))
        except (RuntimeError, OSError) as exc:
            raise DatasetError(f"cannot read {path}: {exc}") from exc
        try:
            return decode_image(data, mode=mode)
        except (RuntimeError, ValueError) as exc:
            raise _decode_failed(path, exc) from exc


def _decode_failed(path: Path, exc: Exception) -> DatasetError:
    text = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
    reason = re.sub(r"^.*\.cpp:\d+, ", "", text).split(". ")[0]  # drop torchvision's C++ source location
    return DatasetError(f"cannot decode {path}: the file is corrupt or not a PNG/JPEG/TIFF image ({reason})")


def _read_tiff(path: Path, mask: bool) -> torch.Tensor:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
                array = np.asarray(img).astype(np.uint16)
            elif mask and img.mode in ("I", "F", "L", "P"):
                array = np.asarray(img)  # raw values: the binary check needs them unconverted
            elif img.mode in ("I", "F"):
                raise DatasetError(
                    f"image {path} has unsupported TIFF pixel mode {img.mode!r} (32-bit); "
                    "save it as an 8-bit or 16-bit image"
                )
            elif img.mode in ("L", "LA", "RGB", "RGBA"):
                array = np.asarray(img)
            else:
                array = np.asarray(img.convert("RGB"))
    except DatasetError:
        raise
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
        raise _decode_failed(path, exc) from exc
    tensor = torch.from_numpy(np.array(array, copy=True))  # PIL's arrays are read-only
    return tensor.unsqueeze(0) if tensor.dim() == 2 else tensor.permute(2, 0, 1)
