"""Decoding and encoding of image and mask files, with errors that name the file.

PNG, JPEG and TIFF are decoded and PNG is encoded by Pillow. (torchvision 0.29 deprecates its
image codecs in favour of TorchCodec, which reads no TIFF and needs torch 2.11 or later; Pillow
reads all three formats on every platform this project supports.)
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from datasets.errors import DatasetError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
_FORMATS = ("PNG", "JPEG", "TIFF")  # what Pillow may decode: the formats of IMAGE_EXTENSIONS
_GREY_16 = ("I;16", "I;16L", "I;16B", "I;16N")  # Pillow's 16-bit grey modes


def is_image_file(path: Path) -> bool:
    """Whether `path` has one of the supported image extensions (case-insensitive)."""
    return path.suffix.lower() in IMAGE_EXTENSIONS


def read_image_rgb(path: str | os.PathLike) -> torch.Tensor:
    """Decode a PNG, JPEG or TIFF file as a uint8 (3, H, W) tensor.

    Grey images are tiled to 3 channels, an alpha channel is dropped and palette images are
    expanded to their colours. 16-bit images are scaled to 8 bits over the full 16-bit range by
    keeping the high byte (``value // 256``: 65535 becomes 255), which is also how Pillow
    decodes 16-bit colour files. 32-bit TIFF images (Pillow modes I and F) are refused, as their
    range is unknown. A file that cannot be read or decoded raises `DatasetError` naming it.
    """
    path = Path(path)
    image = _open(path)
    if image.mode in _GREY_16:
        grey = torch.from_numpy((np.asarray(image).astype(np.uint16) >> 8).astype(np.uint8))
        return grey.unsqueeze(0).expand(3, -1, -1).contiguous()
    if image.mode in ("I", "F"):
        raise DatasetError(
            f"image {path} has 32-bit pixels (Pillow mode {image.mode!r}) of no fixed range; "
            "save it as an 8-bit or 16-bit image"
        )
    if image.mode in ("1", "L", "LA"):
        grey = torch.from_numpy(np.array(image.convert("L")))
        return grey.unsqueeze(0).expand(3, -1, -1).contiguous()
    if image.mode not in ("RGB", "RGBA"):  # palette, CMYK, YCbCr, ...: their colours (and alpha, dropped below)
        image = image.convert("RGBA" if image.has_transparency_data else "RGB")
    return torch.from_numpy(np.array(image)[..., :3]).permute(2, 0, 1).contiguous()


def read_mask(path: str | os.PathLike) -> torch.Tensor:
    """Decode a mask file as a uint8 (H, W) tensor of 0/1.

    Any non-zero value is foreground. A mask with more than two distinct values, or with two
    values of which none is 0, is not binary and raises `DatasetError` naming the file.
    Colour masks count a pixel as foreground when any colour channel is non-zero.
    """
    path = Path(path)
    image = _open(path)
    if image.mode not in ("1", "L", "LA", "RGB", "RGBA", "I", "F", *_GREY_16):
        # palette (its colours), CMYK, YCbCr, ...
        image = image.convert("RGBA" if image.has_transparency_data else "RGB")
    array = np.asarray(image)
    if array.ndim == 3:  # grey + alpha: the grey; colour (+ alpha): foreground where any colour channel is set
        array = array[..., 0] if array.shape[2] == 2 else array[..., :3].max(-1)
    values = np.unique(array)
    if len(values) > 2 or (len(values) == 2 and values[0] != 0):
        shown = ", ".join(str(v) for v in values[:6].tolist()) + (", ..." if len(values) > 6 else "")
        raise DatasetError(
            f"mask {path} is not binary: it has {len(values)} distinct values ({shown}); "
            "expected background 0 and one foreground value (e.g. 0/255 or 0/1). Instance or "
            "multi-class label maps must be split into one binary mask per class folder."
        )
    return torch.from_numpy((array != 0).astype(np.uint8))


def write_png_file(tensor: torch.Tensor, path: str | os.PathLike) -> None:
    """Write a uint8 (C, H, W) tensor, C = 1 (grey) or 3 (RGB), as a PNG file, creating the parent folder."""
    if tensor.dtype != torch.uint8 or tensor.dim() != 3 or tensor.shape[0] not in (1, 3):
        raise ValueError(
            f"cannot write {path}: expected a uint8 (C, H, W) tensor with C = 1 or 3, "
            f"got {tensor.dtype} of shape {tuple(tensor.shape)}"
        )
    array = tensor.detach().cpu().permute(1, 2, 0).numpy()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(array[..., 0] if tensor.shape[0] == 1 else array)).save(path, format="PNG")


def _open(path: Path) -> Image.Image:
    """Decode `path` with Pillow: the loaded image, or `DatasetError` naming the file."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DatasetError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        with warnings.catch_warnings():
            # Pillow warns about the damaged parts of a file (corrupt TIFF tags, a failed format
            # guess) on its way to an exception, which becomes the one-line error below, or
            # while it skips metadata that the pixels do not depend on.
            warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
            image = Image.open(io.BytesIO(data), formats=_FORMATS)
            image.load()
    except Warning:  # a warning made an error by the warnings filter (e.g. a deprecation in tests)
        raise
    except Exception as exc:  # noqa: BLE001 - whatever Pillow raises, the file is unusable: name it
        raise _decode_failed(path, exc) from exc
    if image.mode == "La":  # grey + premultiplied alpha (TIFF), which Pillow converts to LA only
        image = image.convert("LA")
    return image


def _decode_failed(path: Path, exc: Exception) -> DatasetError:
    if isinstance(exc, UnidentifiedImageError):
        reason = "no PNG, JPEG or TIFF header could be read"
    else:
        text = str(exc).strip()
        reason = text.splitlines()[0] if text else type(exc).__name__
    return DatasetError(f"cannot decode {path}: the file is corrupt or not a PNG/JPEG/TIFF image ({reason})")
