"""Fashion-MNIST: load the IDX files through torchvision, write IDX files, make look-alike data."""

from __future__ import annotations

import functools
import gzip
import math
import os
import shutil
import zlib
from pathlib import Path
from typing import IO, NoReturn

import torch
import torch.nn.functional as F
from torchvision.datasets import FashionMNIST
from torchvision.datasets.mnist import read_image_file, read_label_file

from trainer.atomic import atomic_path, atomic_write
from trainer_datasets._seeding import generator
from trainer_datasets.errors import DataNotFoundError, DatasetError

CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")

FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def raw_folder(data_dir: str | os.PathLike) -> Path:
    """Where torchvision looks for the files: ``<data_dir>/FashionMNIST/raw``."""
    return Path(data_dir) / "FashionMNIST" / "raw"


def load_fashion_mnist(
    data_dir: str | os.PathLike = "./data", train: bool = True, download: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """The training (or test) split as ``(images uint8 (N, 28, 28), labels int64 (N,))``.

    Reads the IDX files in ``<data_dir>/FashionMNIST/raw/`` with `torchvision.datasets.FashionMNIST`
    (its ``.data``/``.targets``, decoded once). torchvision reads only uncompressed files; ``.gz``
    files without an uncompressed copy are decompressed next to themselves first (as torchvision's
    own download does). torchvision wants all four files; when only the requested split's two are
    there they are read with the same torchvision readers.

    Raises `DataNotFoundError` naming the missing files and the folder when they are absent and
    `download` is false, or when the download fails.

    Args:
        data_dir: the folder holding ``FashionMNIST/raw/``.
        train: the training split (60,000 images); False: the test split (10,000).
        download: fetch the files with torchvision when they are missing.
    """
    raw = raw_folder(data_dir)
    for name in FILES:
        _gunzip_if_needed(raw / name)
    split = FILES[:2] if train else FILES[2:]
    missing = [name for name in FILES if not (raw / name).is_file()]
    if download and missing:
        try:
            FashionMNIST(root=str(data_dir), train=train, download=True)
        except (RuntimeError, OSError, ValueError) as exc:
            reason = " ".join(str(exc).split())[:200]
            message = _missing_message(raw, missing, data_dir) + f" (the download failed: {reason})"
            raise DataNotFoundError(message) from exc
        missing = []
    if any(name in missing for name in split):
        raise DataNotFoundError(_missing_message(raw, missing, data_dir))
    for name in FILES:
        if (raw / name).is_file():
            check_idx_file(raw / name)
    try:
        if not missing:
            dataset = FashionMNIST(root=str(data_dir), train=train, download=False)
            images, labels = dataset.data, dataset.targets
        else:
            # torchvision's FashionMNIST insists on all four files; read this split with its readers.
            images, labels = read_image_file(str(raw / split[0])), read_label_file(str(raw / split[1]))
    except (AssertionError, TypeError, ValueError, IndexError, KeyError) as exc:
        reason = str(exc) or type(exc).__name__
        raise DatasetError(f"Fashion-MNIST files in {raw} are not valid IDX files ({reason})") from exc
    if len(images) != len(labels):
        raise DatasetError(f"{raw / split[0]} has {len(images)} images but {raw / split[1]} has {len(labels)} labels")
    wrong = (labels >= len(CLASSES)).nonzero()
    if len(wrong):
        index = int(wrong[0])
        raise DatasetError(
            f"{raw / split[1]} has label {int(labels[index])} at item {index} ({len(wrong)} of its "
            f"{len(labels)} labels are out of range); Fashion-MNIST labels are 0 to {len(CLASSES) - 1}"
        )
    return images, labels


#: What each IDX file of `FILES` holds: (magic number, shape of one item, what one item is).
IDX_FORMATS = {"images": (2051, (28, 28), "image of 28x28 unsigned bytes"), "labels": (2049, (), "label byte")}
_IDX_TYPES = {0x08: "unsigned byte", 0x09: "signed byte", 0x0B: "short", 0x0C: "int", 0x0D: "float", 0x0E: "double"}


def check_idx_file(path: str | os.PathLike) -> None:
    """Check an uncompressed Fashion-MNIST IDX file's structure without reading its data: the
    magic number (unsigned bytes, 3 dimensions for images, 1 for labels), 28x28 images, and a
    size that matches the item count of its header. Raises `DatasetError` naming the file and
    what is wrong.

    Args:
        path: ``*-images-idx3-ubyte`` or ``*-labels-idx1-ubyte``.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as file:
        header = file.read(_header_size(path))
    expected = _expected_size(path, header, size)
    if size != expected:
        _wrong_size(path, header, size, expected)


def _kind(path: Path) -> str:
    return "images" if "-images-" in path.name else "labels"


def _header_size(path: Path) -> int:
    return 4 * (2 + len(IDX_FORMATS[_kind(path)][1]))


_FIX = "replace it with a good copy (or remove it and pass --download)"


def _expected_size(path: Path, header: bytes, size: int | None) -> int:
    """The size in bytes the IDX file `path` must have by its `header` (the file's first bytes);
    a `DatasetError` naming `path` for a header that is not a Fashion-MNIST IDX file's (`size`:
    the file's, for the message; None when not known)."""
    kind = _kind(path)
    magic, item_shape, _ = IDX_FORMATS[kind]
    header_size = _header_size(path)
    if len(header) < header_size:
        size = len(header) if size is None else size
        raise DatasetError(
            f"{path} is not a valid IDX {kind} file: {size} bytes, shorter than the {header_size}-byte header; {_FIX}"
        )
    found = int.from_bytes(header[:4], "big")
    if found != magic:
        dtype, ndim = header[2], header[3]
        if header[:2] != b"\0\0" or dtype not in _IDX_TYPES:
            what = f"magic number 0x{found:08x}, not an IDX file's"
        elif dtype != 0x08:
            what = f"data type {_IDX_TYPES[dtype]} (0x{dtype:02x})"
        else:
            what = f"{ndim} dimension(s)"
        raise DatasetError(
            f"{path} is not a valid IDX {kind} file: it has {what}; Fashion-MNIST {kind} are "
            f"unsigned bytes in {1 + len(item_shape)} dimension(s) (magic number 0x{magic:08x}); "
            f"{_FIX}"
        )
    count, *shape = (int.from_bytes(header[i : i + 4], "big") for i in range(4, header_size, 4))
    if tuple(shape) != item_shape:
        raise DatasetError(
            f"{path} is not a valid IDX {kind} file for Fashion-MNIST: its images are "
            f"{'x'.join(map(str, shape))}, Fashion-MNIST's are 28x28 (the CNN needs that size)"
        )
    return header_size + count * math.prod(item_shape)


def _wrong_size(path: Path, header: bytes, size: int, expected: int) -> NoReturn:
    """Raise the `DatasetError` of an IDX file of `size` bytes whose header asks for `expected`."""
    kind = _kind(path)
    item_shape = IDX_FORMATS[kind][1]
    header_size = _header_size(path)
    count = int.from_bytes(header[4:8], "big")
    held = (size - header_size) // max(1, math.prod(item_shape))
    how = f"holds only {held}" if size < expected else f"has {size - expected} bytes more than"
    raise DatasetError(
        f"{path} is not a valid IDX {kind} file: its header claims {count} items but the file "
        f"{how} ({size} bytes, {expected} expected); it is truncated or damaged: {_FIX}"
    )


def write_fashion_mnist_idx(
    folder: str | os.PathLike,
    images_uint8: torch.Tensor,
    labels: torch.Tensor,
    train: bool = True,
) -> list[Path]:
    """Write one split as gzip-compressed IDX files, the format Fashion-MNIST is distributed in.

    Files go to ``<folder>/FashionMNIST/raw/{train|t10k}-{images-idx3|labels-idx1}-ubyte.gz``
    (magic numbers 2051 and 2049, big-endian sizes, then the raw bytes); an uncompressed copy of
    the same split left from before is removed so it cannot shadow the new data. torchvision's
    `FashionMNIST` needs both splits: write the test split too (it may be small). Returns the paths.

    Args:
        folder: the data folder (what `load_fashion_mnist` takes as ``data_dir``).
        images_uint8: the images, uint8 (N, H, W).
        labels: the class indices (N,), 0-255.
        train: write the training split's files; False: the test split's.
    """
    if images_uint8.dtype != torch.uint8 or images_uint8.dim() != 3:
        raise DatasetError(f"images must be uint8 (N, H, W), got {images_uint8.dtype} {tuple(images_uint8.shape)}")
    if labels.dim() != 1 or len(labels) != len(images_uint8):
        raise DatasetError(f"labels must be 1-D with {len(images_uint8)} entries, got shape {tuple(labels.shape)}")
    if len(labels) and (labels.min() < 0 or labels.max() > 255):
        raise DatasetError("labels must be in 0..255 to fit the IDX uint8 label format")
    raw = raw_folder(folder)
    raw.mkdir(parents=True, exist_ok=True)
    prefix = "train" if train else "t10k"
    n, rows, cols = images_uint8.shape
    parts = {
        f"{prefix}-images-idx3-ubyte": _idx_header(2051, n, rows, cols) + images_uint8.contiguous().numpy().tobytes(),
        f"{prefix}-labels-idx1-ubyte": _idx_header(2049, n) + labels.to(torch.uint8).numpy().tobytes(),
    }
    written = []
    for name, data in parts.items():
        path = raw / f"{name}.gz"
        atomic_write(path, functools.partial(_gzip, data))
        (raw / name).unlink(missing_ok=True)
        written.append(path)
    return written


def make_learnable_fashion_like(num_samples: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST look-alikes: ``(images uint8 (N, 28, 28), labels int64 (N,))``.

    Each class has its own silhouette (shirt, trousers, shoe, bag...), randomly shifted, dimmed
    and noised, so a small CNN learns them in an epoch or two. Vectorised: 60,000 images take
    a second or two on one CPU core.

    Args:
        num_samples: how many images.
        seed: seeds the images and labels.
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 0:
        raise DatasetError(f"num_samples must be an int >= 0, got {num_samples!r}")
    g = generator(seed, 0)
    labels = torch.randint(len(CLASSES), (num_samples,), generator=g)
    pad = 3
    # Every template at every shift of up to `pad` pixels: (10 * 7 * 7, 28, 28), then one lookup.
    shifted = F.pad(_templates(), (pad, pad, pad, pad)).unfold(1, 28, 1).unfold(2, 28, 1).reshape(-1, 28, 28)
    shift = torch.randint(0, (2 * pad + 1) ** 2, (num_samples,), generator=g)
    images = shifted[labels * (2 * pad + 1) ** 2 + shift]
    brightness = 0.55 + 0.45 * torch.rand(num_samples, 1, 1, generator=g)
    images = images * brightness + 0.12 * torch.randn(images.shape, generator=g) * (images > 0.05)
    return images.clamp_(0, 1).mul_(255).round_().to(torch.uint8), labels


def _templates() -> torch.Tensor:
    """(10, 28, 28) float silhouettes in [0, 1], one per class of `CLASSES`."""
    y, x = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")

    def box(x0: float, y0: float, x1: float, y1: float) -> torch.Tensor:
        return ((x >= x0) & (x <= x1) & (y >= y0) & (y <= y1)).float()

    torso = box(8, 4, 19, 25)
    short_sleeves = box(3, 4, 24, 10)
    long_sleeves = box(2, 4, 25, 8) + box(2, 4, 6, 24) + box(21, 4, 25, 24)
    t_shirt = (torso + short_sleeves).clamp(max=1)
    trouser = box(7, 2, 20, 7) + box(7, 7, 12, 26) + box(15, 7, 20, 26)
    pullover = (torso + long_sleeves).clamp(max=1) * 0.8
    dress = ((x - 13.5).abs() <= 3 + 0.35 * (y - 2)).float() * box(0, 2, 27, 26)
    coat = (torso + long_sleeves).clamp(max=1) * (1 - 0.8 * box(13, 6, 14, 25))
    sandal = box(2, 20, 25, 22) + box(4, 14, 7, 20) * 0.8 + box(12, 12, 15, 20) * 0.8 + box(19, 15, 22, 20) * 0.8
    shirt = (torso + long_sleeves).clamp(max=1) * (1 - 0.6 * box(11, 4, 16, 9))
    shirt = shirt * (1 - 0.7 * (((x - 13.5) ** 2 < 1) & (y.remainder(4) < 1) & (y > 9)).float())
    sneaker = box(2, 17, 26, 23) + box(2, 12, 13, 17)
    bag = box(4, 10, 23, 24) + (((x - 13.5) ** 2 + (y - 10) ** 2 - 36).abs() <= 6).float() * (y < 10).float()
    boot = box(9, 3, 19, 23) + box(9, 16, 26, 23)
    stacked = torch.stack([t_shirt, trouser, pullover, dress, coat, sandal, shirt, sneaker, bag, boot])
    return stacked.clamp(0, 1)


def _gzip(data: bytes, file: IO[bytes]) -> None:
    """Write `data` gzipped into `file`; level 1: the set is rewritten by benchmarks, smaller files
    are not worth the time."""
    with gzip.GzipFile(fileobj=file, mode="wb", compresslevel=1, mtime=0) as gz:
        gz.write(data)


def _idx_header(magic: int, *dims: int) -> bytes:
    return b"".join(v.to_bytes(4, "big") for v in (magic, *dims))


def _gunzip_if_needed(path: Path) -> None:
    """Decompress ``path.gz`` to `path` when only the former is there: its IDX header is checked
    first, and no more than the size that header declares is ever written (a damaged or hostile
    file cannot fill the disk), after checking that the disk has room for it."""
    packed = path.with_name(path.name + ".gz")
    if path.is_file() or not packed.is_file():
        return
    with atomic_path(path) as tmp:  # another process never sees a half-written file
        try:
            with gzip.open(packed, "rb") as src, open(tmp, "wb") as dst:
                _decompress(packed, path, src, dst)
        except (OSError, EOFError, zlib.error) as exc:
            reason = f"its deflate stream is corrupt ({exc})" if isinstance(exc, zlib.error) else str(exc)
            raise DatasetError(f"cannot decompress {packed}: {reason}; replace it with a good copy") from exc


def _decompress(packed: Path, path: Path, src: gzip.GzipFile, dst: IO[bytes]) -> None:
    """Copy the IDX file `path` from `src` (`packed` opened by gzip) to `dst`: its header checked
    first, no more than the size that header declares, after checking that the disk has room."""
    header = src.read(_header_size(path))
    expected = _expected_size(packed, header, None)
    free = shutil.disk_usage(path.parent).free
    if expected > free:
        raise DatasetError(
            f"cannot decompress {packed}: its header asks for {expected / 1e9:.1f} GB and {path.parent} "
            f"has {free / 1e9:.1f} GB free; {_FIX}"
        )
    dst.write(header)
    written = len(header)
    while written < expected and (chunk := src.read(min(1 << 20, expected - written))):
        dst.write(chunk)
        written += len(chunk)
    longer = bool(src.read(1))
    if written != expected or longer:
        count = int.from_bytes(header[4:8], "big")
        what = f"more than the {expected} bytes" if longer else f"only {written} of the {expected} bytes"
        raise DatasetError(
            f"cannot decompress {packed}: it holds {what} its header declares ({count} items); it is damaged: {_FIX}"
        )


def _missing_message(raw: Path, missing: list[str], data_dir: str | os.PathLike) -> str:
    absent = "" if len(missing) == len(FILES) else f" (missing: {', '.join(missing)})"
    message = (
        f"Fashion-MNIST not found: put the four files {', '.join(FILES)} (each may be .gz) in {raw}"
        f"{absent}, or pass --download (download=True) to fetch them"
    )
    for place in (Path(data_dir), Path(data_dir) / "FashionMNIST", Path(data_dir) / "raw"):
        if place != raw and any((place / n).is_file() or (place / f"{n}.gz").is_file() for n in FILES):
            message += f"; some are in {place}: move them to {raw}"
            break
    return message
