"""Decoding and encoding of image and mask files, with errors that name the file.

PNG, JPEG and TIFF are decoded and PNG is encoded by Pillow. (torchvision 0.29 deprecates its
image codecs in favour of TorchCodec, which reads no TIFF and needs torch 2.11 or later; Pillow
reads all three formats on every platform this project supports.)
"""

from __future__ import annotations

import errno
import io
import os
import stat
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from trainer_datasets.errors import DatasetError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
_FORMATS = ("PNG", "JPEG", "TIFF")  # what Pillow may decode: the formats of IMAGE_EXTENSIONS
_GREY_16 = ("I;16", "I;16L", "I;16B", "I;16N")  # Pillow's 16-bit grey modes


#: Files that file managers and operating systems leave in folders (lower case): never data.
SYSTEM_FILES = frozenset({"thumbs.db", "ehthumbs.db", "desktop.ini", "icon\r"})


def is_image_file(path: Path) -> bool:
    """Whether `path` has one of the supported image extensions (case-insensitive).

    Args:
        path: a file's path; only its name is read."""
    return path.suffix.lower() in IMAGE_EXTENSIONS


def is_system_file(path: Path) -> bool:
    """Whether `path` is a hidden file or folder (its name starts with a dot: ``.DS_Store``,
    ``._0001.png``, ``.ipynb_checkpoints``) or one of `SYSTEM_FILES` (``Thumbs.db``,
    ``desktop.ini``): entries that training and prediction leave out of a data folder.

    Args:
        path: an entry's path; only its name is read."""
    return path.name.startswith(".") or path.name.lower() in SYSTEM_FILES


def not_regular(path: str | os.PathLike) -> str | None:
    """Why `path` cannot be read as a file, without opening it (a FIFO would block): ``"a FIFO"``,
    ``"a dangling symbolic link"``, ``"a symbolic link loop"``, ``"a folder"``...; None for a
    regular file (or a symbolic link to one).

    Args:
        path: the entry to look at.
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "a dangling symbolic link" if os.path.islink(path) else "missing"
    except OSError as exc:
        return "a symbolic link loop" if exc.errno == errno.ELOOP else f"not readable ({exc.strerror or exc})"
    if stat.S_ISREG(mode):
        return None
    for test, kind in (
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a device"),
        (stat.S_ISBLK, "a device"),
    ):
        if test(mode):
            return kind
    return "not a regular file"


#: What a JPEG's lossy compression does to each kind of mask file, and what to save it as instead.
_JPEG_DAMAGE = {
    "mask": (
        "blurs a mask's sharp edges into in-between values that would count as foreground",
        "masks as PNG or TIFF",
    ),
    "label map": ("changes class indices at the edges of regions", "label maps as PNG (grey or palette)"),
}


def read_image_rgb(path: str | os.PathLike) -> torch.Tensor:
    """Decode a PNG, JPEG or TIFF file as a uint8 (3, H, W) tensor.

    Grey images are tiled to 3 channels, an alpha channel is dropped and palette images are
    expanded to their colours. 16-bit images are scaled to 8 bits over the full 16-bit range by
    keeping the high byte (``value // 256``: 65535 becomes 255), which is also how Pillow
    decodes 16-bit colour files. 32-bit TIFF images (Pillow modes I and F) are refused, as their
    range is unknown. An EXIF orientation tag is applied, so the image is upright as viewers show
    it (and as `read_mask` turns its mask). A file that cannot be read or decoded, or that is no
    regular file (a FIFO, a dangling link), raises `DatasetError` naming it.

    Args:
        path: the image file.
    """
    path = Path(path)
    image, _ = _open(path)
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
    """Decode a mask file as a uint8 (H, W) tensor of 0/1: every non-zero value is foreground.

    Background is 0 and any other value is foreground, in 8-bit, 16-bit or 32-bit masks alike,
    so 0/255, 0/1 and 0/65535 masks and instance-label masks (0, 1, 2, ... one id per object)
    all give the same binary mask. Grey, grey + alpha, RGB, RGBA and palette files are read from
    their grey or colour values; an alpha channel is ignored. An EXIF orientation tag is applied,
    as `read_image_rgb` applies it to images. `DatasetError`, naming the file and
    saying what to do, is raised for a mask that would otherwise be misread:

    - a colour-coded mask, whose red, green and blue channels differ somewhere;
    - a mask whose shapes are only in its alpha channel (grey or colour constant, alpha varying);
    - a JPEG, whose lossy compression blurs the edges into values that would count as foreground;
    - 16-bit colour (or 16-bit grey + alpha) files, which Pillow decodes at 8 bits, so
      foreground values below 256 would be read as background;
    - a floating-point mask with NaN values, which are neither background nor foreground;
    - a file that cannot be read or decoded.

    Args:
        path: the mask file.
    """
    path = Path(path)
    image, reduced = _open_mask(path, "mask")
    if reduced:
        raise DatasetError(
            f"mask {path} is a 16-bit colour or grey + alpha file, which Pillow decodes at 8 bits "
            "(foreground values below 256 would become background); save it as a grey image, 8-bit or 16-bit"
        )
    if image.mode not in ("1", "L", "LA", "RGB", "RGBA", "I", "F", *_GREY_16):
        # palette (its colours, and each entry's transparency if it has any), CMYK, YCbCr, ...
        image = image.convert("RGBA" if image.has_transparency_data else "RGB")
    array = np.asarray(image)
    if array.dtype.kind == "f" and np.isnan(array).any():
        y, x = np.argwhere(np.isnan(array))[0][:2]
        raise DatasetError(
            f"mask {path} has NaN values ({int(np.isnan(array).sum())} pixels, e.g. at x={x}, y={y}), which are "
            "neither background nor foreground; save it with 0 for background and non-zero values for foreground"
        )
    return torch.from_numpy((_grey_values(path, array) != 0).astype(np.uint8))


def _grey_values(path: Path, array: np.ndarray) -> np.ndarray:
    """The grey values (H, W) of a decoded mask `array` (H, W) or (H, W, channels): a
    `DatasetError` for a colour-coded mask or one whose shapes are only in its alpha channel."""
    if array.ndim != 3:
        return array
    colour_channels = 1 if array.shape[2] == 2 else 3
    alpha = array[..., colour_channels] if array.shape[2] in (2, 4) else None
    colour = array[..., :colour_channels]
    differs = (colour != colour[..., :1]).any(-1)
    if differs.any():
        y, x = np.argwhere(differs)[0]
        raise DatasetError(
            f"mask {path} is colour-coded: its red, green and blue channels differ (e.g. colour "
            f"{tuple(int(v) for v in colour[y, x])} at x={x}, y={y}); masks are read from grey "
            "values, so save it as a grey image with background 0 and any non-zero foreground "
            "(one mask per class in masks/<class>/); a label map of class indices is read as one "
            "when the folder has a classes.txt or mask_mode='labels' (--mask-mode labels) is given"
        )
    grey = colour[..., 0]
    if alpha is not None and alpha.min() != alpha.max() and grey.min() == grey.max():
        what = "grey" if colour_channels == 1 else "colour"
        raise DatasetError(
            f"mask {path} has its shapes only in the alpha channel: its {what} is the same ({grey.flat[0]}) "
            f"everywhere while alpha varies; masks are read from grey values, not transparency, so save "
            "the alpha channel as a grey image with background 0 (e.g. PIL: image.getchannel('A').save(...))"
        )
    return grey


def read_label_map(path: str | os.PathLike) -> torch.Tensor:
    """Decode a label-map mask, one class index per pixel, as an int64 (H, W) tensor of its values.

    Palette PNGs (as in Pascal VOC) give their palette indices, never their colours; 8-bit and
    16-bit grey files give their grey values; 32-bit integer grey TIFFs their values. The values
    are returned as stored: checking them against the classes is the caller's job (see
    `check_labels`). An EXIF orientation tag is applied, as `read_image_rgb` applies it.
    `DatasetError`, naming the file, is raised for files that hold no class indices: colour
    (RGB) files, files with an alpha channel, floating-point files, JPEGs (lossy compression
    invents indices at the edges) and files that cannot be read or decoded.

    Args:
        path: the mask file.
    """
    path = Path(path)
    image, _ = _open_mask(path, "label map")
    if image.mode not in ("P", "L", "I", *_GREY_16):
        raise DatasetError(
            f"label map {path} is a {image.mode} image; a label map holds one class index per pixel: "
            "save it as a grey (8- or 16-bit) or palette PNG"
        )
    array = np.asarray(image)
    return torch.from_numpy(array.astype(np.int64))


def check_labels(labels: torch.Tensor, path: str | os.PathLike, num_classes: int, ignore_index: int) -> None:
    """Raise `DatasetError` naming `path` if `labels` hold a value that is neither a class index
    (0 to ``num_classes - 1``) nor `ignore_index`.

    Args:
        labels: the decoded label map (`read_label_map`).
        path: the file it was read from, for the message.
        num_classes: the number of classes.
        ignore_index: the value of pixels that count for no class.
    """
    bad = ((labels < 0) | (labels >= num_classes)) & (labels != ignore_index)
    if bad.any():
        y, x = (int(v) for v in bad.nonzero()[0])
        values = sorted(int(v) for v in labels[bad].unique()[:5])
        raise DatasetError(
            f"label map {path} has value(s) {', '.join(map(str, values))} (e.g. {int(labels[y, x])} at x={x}, y={y}) "
            f"outside the classes 0-{num_classes - 1} and not the ignore index {ignore_index}; "
            "fix the file, or list every class in the folder's classes.txt"
        )


def label_palette(count: int = 256) -> list[int]:
    """The Pascal VOC colour palette as a flat ``[r0, g0, b0, r1, ...]`` list of `count` colours:
    class 0 black, 1 dark red, 2 dark green, ... (each index's bits spread over the colour bits).

    Args:
        count: the number of colours (classes); 256 fills a PNG palette.
    """
    palette: list[int] = []
    for index in range(count):
        r = g = b = 0
        value = index
        for shift in range(7, -1, -1):
            r |= (value & 1) << shift
            g |= ((value >> 1) & 1) << shift
            b |= ((value >> 2) & 1) << shift
            value >>= 3
        palette.extend((r, g, b))
    return palette


def write_label_map(labels: torch.Tensor, path: str | os.PathLike, palette: Sequence[int] | None = None) -> None:
    """Write an integer (H, W) label map as a PNG, creating the parent folder: a palette PNG
    (index = class) when every value is below 256, else 16-bit grey. `read_label_map` reads either
    back as the same values.

    Args:
        labels: class indices, 0 to 65535.
        path: the file to write.
        palette: the colours of a palette PNG, a flat ``[r0, g0, b0, r1, ...]`` list of 0-255 values
            (default: `label_palette`, Pascal VOC's).
    """
    if labels.dim() != 2 or labels.is_floating_point() or labels.is_complex():
        raise ValueError(
            f"cannot write {path}: expected an integer (H, W) tensor, got {labels.dtype} of shape {tuple(labels.shape)}"
        )
    array = labels.detach().cpu().numpy()
    if array.size and (array.min() < 0 or array.max() > 65535):
        raise ValueError(f"cannot write {path}: label values must lie in 0-65535, got {array.min()}-{array.max()}")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    if not array.size or array.max() < 256:
        image = Image.frombytes("P", (array.shape[1], array.shape[0]), np.ascontiguousarray(array, np.uint8).tobytes())
        image.putpalette(list(palette) if palette is not None else label_palette())
    else:
        image = Image.fromarray(array.astype(np.uint16))
    image.save(path, format="PNG")


def write_png_file(tensor: torch.Tensor, path: str | os.PathLike) -> None:
    """Write a uint8 (C, H, W) tensor, C = 1 (grey) or 3 (RGB), as a PNG file, creating the parent folder.

    Args:
        tensor: the image.
        path: the file to write.
    """
    if tensor.dtype != torch.uint8 or tensor.dim() != 3 or tensor.shape[0] not in (1, 3):
        raise ValueError(
            f"cannot write {path}: expected a uint8 (C, H, W) tensor with C = 1 or 3, "
            f"got {tensor.dtype} of shape {tuple(tensor.shape)}"
        )
    array = tensor.detach().cpu().permute(1, 2, 0).numpy()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(array[..., 0] if tensor.shape[0] == 1 else array)).save(path, format="PNG")


def _open(path: Path) -> tuple[Image.Image, bool]:
    """Decode `path` with Pillow: the loaded image, turned upright as its EXIF orientation says
    (as image viewers show it), and whether Pillow reduced 16-bit colour to 8 bits."""
    problem = not_regular(path)
    if problem not in (None, "missing"):  # never open a FIFO: reading it would wait forever
        raise DatasetError(f"cannot read {path}: it is {problem}, not an image file")
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
            reduced = image.mode in ("RGB", "RGBA") and any(";16" in _rawmode(tile) for tile in image.tile)
            image.load()
            ImageOps.exif_transpose(image, in_place=True)
    except Warning:  # a warning made an error by the warnings filter (e.g. a deprecation in tests)
        raise
    except Exception as exc:  # noqa: BLE001 - whatever Pillow raises, the file is unusable: name it
        raise _decode_failed(path, exc) from exc
    if image.mode == "La":  # grey + premultiplied alpha (TIFF), which Pillow converts to LA only
        return image.convert("LA"), reduced
    return image, reduced


def _open_mask(path: Path, kind: str) -> tuple[Image.Image, bool]:
    """`_open` for the `kind` of mask file (``"mask"`` or ``"label map"``): a JPEG is a `DatasetError`."""
    image, reduced = _open(path)
    if image.format in ("JPEG", "MPO"):
        damage, save_as = _JPEG_DAMAGE[kind]
        raise DatasetError(f"{kind} {path} is a JPEG file: its lossy compression {damage}; save {save_as}")
    return image, reduced


def _rawmode(tile: tuple) -> str:
    # A tile is (decoder, box, offset, args); args is the raw mode of the stored samples or starts with it.
    args = tile[3]
    raw = args if isinstance(args, str) else args[0] if isinstance(args, tuple) and args else ""
    return raw if isinstance(raw, str) else ""


def _decode_failed(path: Path, exc: Exception) -> DatasetError:
    if isinstance(exc, UnidentifiedImageError):
        reason = "no PNG, JPEG or TIFF header could be read"
    else:
        text = str(exc).strip()
        reason = text.splitlines()[0] if text else type(exc).__name__
    return DatasetError(f"cannot decode {path}: the file is corrupt or not a PNG/JPEG/TIFF image ({reason})")
