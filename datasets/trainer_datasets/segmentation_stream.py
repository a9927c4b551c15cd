"""Segmentation folders larger than memory: checked once, indexed, decoded item by item.

`SegmentationStream` gives the same items as `SegmentationFolder` (bit for bit, augmentations
included) but keeps no pixels: each item is decoded by `load_sample` when it is asked for, so in
the `DataLoader`'s workers, and its memory does not grow with the number of images.

Every file is checked once, with `SegmentationFolder`'s checks and messages (pairing, names,
formats, corrupt files, masks of another size than their image), and what the check found (the
ids, their files and image sizes) is kept in an index file: ``<cache>/segmentation-index/<hash of
the folder's path>.json``, where ``<cache>`` is `cache_folder`. The index holds the folder's
fingerprint (`data_files` with times: every file's size, modification and status change times); a
later start lists the folder, and reuses the index when the fingerprint is the same, decoding
nothing. A file added, removed or rewritten makes it check the folder again. During a run, each
item's files are compared with the fingerprint before they are decoded: a file removed or changed
since the check is a `DatasetError` naming it, never another sample than the one checked.

Under ``torchrun`` (an initialised process group of several processes) only rank 0 lists, checks
and indexes the folder; the others receive its index (or its error) through the process group, so
no process decodes a file that is not in its shard, and processes on other machines need no
shared cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from trainer.atomic import atomic_write_text
from trainer.cache_folder import cache_folder
from trainer.options import positive_int
from trainer_datasets.errors import DatasetError
from trainer_datasets.fingerprint import data_files
from trainer_datasets.image_files import is_system_file
from trainer_datasets.segmentation_folder import SegmentationItems, load_sample, mixed_sizes_error
from trainer_datasets.segmentation_layout import IGNORE_INDEX, FolderLayout, scan_segmentation_folder, select_samples

#: The version of the index files' layout; an index of another version is rebuilt.
INDEX_VERSION = 3
#: ``mode="auto"`` streams a folder whose decoded images and masks would take more bytes than this
#: (1 GiB: about 4,000 RGB images of 256x256 with one mask class).
STREAM_ABOVE_BYTES = 1 << 30
DATA_MODES = ("auto", "memory", "stream")


@dataclass
class SegmentationIndex:
    """What checking a segmentation folder found: its classes and, per sample id, its files
    (relative to `root`) and its image's size.

    Attributes:
        root: the folder.
        classes: the mask classes, in order (``["mask"]`` for masks directly in masks/).
        samples: ``{id: (image file, [mask file per mask folder], height, width)}``, ids sorted.
        mask_folders: the keys of `FolderLayout.masks`: the class folders, ``["mask"]`` for masks
            directly in masks/, ``["labels"]`` for label maps.
        mask_mode: ``"binary"`` or ``"labels"`` (see `scan_segmentation_folder`).
        ignore_index: label maps: the value of pixels of no class.
        files: the folder's fingerprint when it was checked (``{relative path: [size, modification
            time, status change time]}``, see `data_files`); empty when not known.
    """

    root: Path
    classes: list[str]
    samples: dict[str, tuple[str, list[str], int, int]]
    mask_folders: list[str]
    mask_mode: str = "binary"
    ignore_index: int = IGNORE_INDEX
    files: dict[str, list[int]] = field(default_factory=dict)

    def check_unchanged(self, sample_id: str) -> None:
        """Raise `DatasetError` naming the first file of `sample_id` that was removed or changed
        since the folder was checked (nothing when the fingerprint is not known)."""
        if not self.files:
            return
        image, masks, _, _ = self.samples[sample_id]
        for name in (image, *masks):
            path = self.root / name
            try:
                info = os.stat(path)
            except FileNotFoundError:
                raise DatasetError(
                    f"{path} was removed after the folder was checked at the start of the run; put it back "
                    "to go on, or start a new run, which checks the folder again"
                ) from None
            now = [info.st_size, info.st_mtime_ns, info.st_ctime_ns]
            if now != self.files.get(Path(name).as_posix()):
                raise DatasetError(
                    f"{path} changed after the folder was checked at the start of the run; a run trains on the "
                    "files it checked: put the file back to go on, or start a new run, which checks the folder again"
                )

    @property
    def ids(self) -> list[str]:
        """All sample ids, sorted."""
        return list(self.samples)

    def layout(self, ids: Sequence[str] | None = None) -> FolderLayout:
        """The `FolderLayout` of the samples `ids` (default: all of them).

        Args:
            ids: the sample ids to include.
        """
        ids = self.ids if ids is None else ids
        images = {i: self.root / self.samples[i][0] for i in ids}
        masks = {name: {i: self.root / self.samples[i][1][c] for i in ids} for c, name in enumerate(self.mask_folders)}
        labels = self.mask_mode == "labels"
        return FolderLayout(
            self.root, images, masks, self.mask_mode, list(self.classes) if labels else None, self.ignore_index
        )


def segmentation_index(
    root: str | os.PathLike,
    index_dir: str | os.PathLike | None = None,
    mask_mode: str = "auto",
    ignore_index: int = IGNORE_INDEX,
    label_classes: Sequence[str] | None = None,
) -> SegmentationIndex:
    """The index of the segmentation folder `root`: read from its index file when the folder's
    fingerprint is unchanged, else built by checking (decoding) every sample and written there.

    Raises what `scan_segmentation_folder` and `load_sample` raise for a bad folder or file (no
    index is then written). Under torchrun only rank 0 reads the folder (see the module docstring).

    Args:
        root: the folder (``images/`` and ``masks/``).
        index_dir: the folder of index files (default: ``segmentation-index/`` in `cache_folder`).
        mask_mode: ``"auto"``, ``"binary"`` or ``"labels"`` (see `scan_segmentation_folder`).
        ignore_index: label maps: the value of pixels of no class.
        label_classes: label maps: the class names (see `scan_segmentation_folder`).
    """
    masks = _mask_options(mask_mode, ignore_index, label_classes)
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return _load_or_build(Path(root), index_dir, masks)
    result: Any = None
    if dist.get_rank() == 0:
        try:
            result = _load_or_build(Path(root), index_dir, masks)
        except (DatasetError, OSError) as exc:  # every rank raises it, none waits forever
            result = exc
    holder = [result]
    dist.broadcast_object_list(holder, src=0)
    if isinstance(holder[0], BaseException):
        raise holder[0]
    return holder[0]


def index_file(
    root: str | os.PathLike, index_dir: str | os.PathLike | None = None, masks: dict[str, Any] | None = None
) -> Path:
    """Where the index of folder `root` is kept (one file per folder and way of reading its masks,
    found by the folder's absolute path).

    Args:
        root: the segmentation folder.
        index_dir: the folder of index files (default: ``segmentation-index/`` in `cache_folder`).
        masks: the mask options the folder is read with (``mask_mode``, ``ignore_index``,
            ``label_classes``); None for the defaults.
    """
    folder = Path(index_dir) if index_dir is not None else cache_folder() / "segmentation-index"
    options = json.dumps(masks if masks is not None else _mask_options(), sort_keys=True)
    key = hashlib.sha256(os.fsencode(os.path.abspath(root)) + b"\0" + options.encode()).hexdigest()[:24]
    return folder / f"{key}.json"


def _mask_options(
    mask_mode: str = "auto", ignore_index: int = IGNORE_INDEX, label_classes: Sequence[str] | None = None
) -> dict[str, Any]:
    """How a folder's masks are read (`scan_segmentation_folder`'s arguments): part of the index's key."""
    return {
        "mask_mode": mask_mode,
        "ignore_index": ignore_index,
        "label_classes": list(label_classes) if label_classes is not None else None,
    }


def _load_or_build(root: Path, index_dir: str | os.PathLike | None, masks: dict[str, Any]) -> SegmentationIndex:
    path = index_file(root, index_dir, masks)
    fingerprint = _fingerprint(root)
    if fingerprint is not None:
        try:
            saved = json.loads(path.read_text())
            if isinstance(saved, dict) and saved.get("version") == INDEX_VERSION and saved.get("files") == fingerprint:
                samples = {i: (image, list(masks), h, w) for i, image, masks, h, w in saved["samples"]}
                return SegmentationIndex(
                    root,
                    list(saved["classes"]),
                    samples,
                    list(saved["mask_folders"]),
                    saved["mask_mode"],
                    int(saved["ignore_index"]),
                    fingerprint,
                )
        except (OSError, ValueError, KeyError, TypeError):
            pass  # no index yet, or an unreadable or foreign one: checked and written anew
    index = _build(root, masks)
    index.files = _fingerprint(root) or {}
    _write(
        path,
        {
            "version": INDEX_VERSION,
            "root": os.path.abspath(root),
            "files": index.files,
            "classes": index.classes,
            "mask_folders": index.mask_folders,
            "mask_mode": index.mask_mode,
            "ignore_index": index.ignore_index,
            "samples": [[i, image, masks, h, w] for i, (image, masks, h, w) in index.samples.items()],
        },
    )
    return index


def _fingerprint(root: Path) -> dict[str, list[int]] | None:
    """`data_files` (with times) of the visible files under images/ and masks/ (one level of class
    folders); None when the folder cannot be listed (the full check then names the problem)."""
    files: list[str] = []
    try:
        for top in ("images", "masks"):
            with os.scandir(root / top) as entries:
                for entry in entries:
                    if is_system_file(Path(entry.name)):
                        continue
                    if top == "masks" and entry.is_dir():
                        with os.scandir(entry.path) as inner:
                            files.extend(e.path for e in inner if not is_system_file(Path(e.name)))
                    else:
                        files.append(entry.path)
        return data_files(root, files, times=True)  # type: ignore[return-value]
    except OSError:
        return None


def _build(root: Path, masks: dict[str, Any]) -> SegmentationIndex:
    """Check every sample of `root` as `SegmentationFolder` does, keeping no pixels."""
    layout = scan_segmentation_folder(root, **masks)
    samples: dict[str, tuple[str, list[str], int, int]] = {}
    for sample_id in layout.ids:
        image, _ = load_sample(layout, sample_id, None)
        image_file = layout.images[sample_id]
        files = [str(m[sample_id].relative_to(root)) for m in layout.masks.values()]
        samples[sample_id] = (str(image_file.relative_to(root)), files, int(image.shape[-2]), int(image.shape[-1]))
    return SegmentationIndex(root, layout.classes, samples, list(layout.masks), layout.mask_mode, layout.ignore_index)


def _write(path: Path, content: dict[str, Any]) -> None:
    """Write `content` as JSON atomically; a cache folder that cannot be written only costs the
    next start a new check."""
    with contextlib.suppress(OSError):
        atomic_write_text(json.dumps(content), path)


class SegmentationStream(SegmentationItems):
    """Images and binary masks or label maps from a segmentation folder, decoded when an item is asked for.

    The same items as `SegmentationFolder` with the same arguments, bit for bit (augmentations
    included, drawn from ``(seed, epoch, index)``), and the same errors, raised at construction:
    every file is checked once and the result kept in an index file (see the module docstring),
    so a second start on an unchanged folder decodes nothing before training. Memory holds the
    index only (names and sizes, about 200 bytes per sample), not pixels; a `DataLoader`'s workers
    each decode the items they load.

    Args:
        root: the folder holding ``images/`` and ``masks/``.
        image_size: resize images (bilinear, antialiased) and masks (nearest) to this square size;
            required when the images have different sizes.
        augment: random flips, 90-degree rotations and a small colour jitter (see `SegmentationFolder`).
        num_classes: if given, the number of mask classes the folder must have.
        ids: use only these sample ids; default all, sorted.
        seed: with the epoch and the item's index, decides its augmentation.
        index: the folder's `SegmentationIndex` when the caller has it (`split_segmentation`
            shares one between its two sets); default: `segmentation_index` of `root`.
        index_dir: the folder of index files (default: ``segmentation-index/`` in `cache_folder`).
        mask_mode: ``"auto"``, ``"binary"`` or ``"labels"`` (see `SegmentationFolder`).
        ignore_index: label maps: the value of pixels of no class, kept as it is in the items.
        label_classes: label maps: the class names (see `scan_segmentation_folder`).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        image_size: int | None = None,
        augment: bool = False,
        num_classes: int | None = None,
        ids: Sequence[str] | None = None,
        seed: int = 0,
        index: SegmentationIndex | None = None,
        index_dir: str | os.PathLike | None = None,
        mask_mode: str = "auto",
        ignore_index: int = IGNORE_INDEX,
        label_classes: Sequence[str] | None = None,
    ) -> None:
        positive_int("image_size", image_size, optional=True)
        if index is None:
            index = segmentation_index(root, index_dir, mask_mode, ignore_index, label_classes)
        ids = select_samples(index.root, index.classes, index.ids, num_classes, ids)
        if image_size is None:
            first = index.samples[ids[0]]
            for sample_id in ids:
                size = index.samples[sample_id][2:]
                if size != first[2:]:
                    raise mixed_sizes_error(
                        index.root / first[0], first[2:], index.root / index.samples[sample_id][0], size
                    )
            height, width = first[2:]
        else:
            height = width = image_size
        self.index = index
        self._describe(
            index.root,
            ids,
            index.classes,
            index.mask_mode,
            index.ignore_index,
            image_size,
            (height, width),
            augment,
            seed,
        )

    @property
    def layout(self) -> FolderLayout:
        """The `FolderLayout` of the whole folder (as `SegmentationFolder.layout`), built when asked for."""
        return self.index.layout()

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        sample_id = self.ids[index]
        self.index.check_unchanged(sample_id)
        image, mask = load_sample(self.index.layout([sample_id]), sample_id, self.image_size)
        return self._item(image, mask, index)

    def image_file(self, index: int) -> Path:
        """The image file of item `index`."""
        return self.root / self.index.samples[self.ids[index]][0]


def choose_data_mode(mode: str, layouts: Sequence[FolderLayout], image_size: int | None) -> str:
    """``"memory"`` or ``"stream"`` for `mode` (``auto``, ``memory`` or ``stream``): ``auto``
    streams when the folders' decoded images and masks would take more than `STREAM_ABOVE_BYTES`,
    estimated from the first sample's size (one sample decoded) when `image_size` is None.

    Args:
        mode: the mode asked for.
        layouts: the `FolderLayout` of each folder to load.
        image_size: the side images are resized to, or None.
    """
    if mode not in DATA_MODES:
        raise DatasetError(f"mode must be one of {', '.join(DATA_MODES)}, got {mode!r}")
    if mode != "auto":
        return mode
    total = 0
    for layout in layouts:
        if image_size is None:
            image, _ = load_sample(layout, layout.ids[0], None)
            pixels = image.shape[-2] * image.shape[-1]
        else:
            pixels = image_size * image_size
        mask_bytes = 8 if layout.mask_mode == "labels" else 1  # label maps are kept as int64
        total += len(layout.ids) * (3 + len(layout.masks) * mask_bytes) * pixels
    return "stream" if total > STREAM_ABOVE_BYTES else "memory"
