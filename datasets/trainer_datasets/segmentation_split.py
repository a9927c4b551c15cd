"""`split_segmentation`: the training and validation sets of a segmentation folder, in memory or streamed."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from trainer_datasets.errors import DataNotFoundError, DatasetError
from trainer_datasets.segmentation_folder import SegmentationFolder
from trainer_datasets.segmentation_layout import (
    CLASSES_FILE,
    IGNORE_INDEX,
    read_classes,
    scan_segmentation_folder,
)
from trainer_datasets.segmentation_stream import (
    SegmentationIndex,
    SegmentationStream,
    choose_data_mode,
    segmentation_index,
)

Datasets = tuple[SegmentationFolder | SegmentationStream, SegmentationFolder | SegmentationStream]


@dataclass(frozen=True)
class _Options:
    """The arguments of `split_segmentation` that a split into train/ and val/ and a random split share."""

    seed: int
    image_size: int | None
    augment_train: bool
    num_classes: int | None
    mode: str
    index_dir: str | os.PathLike | None
    mask_mode: str
    ignore_index: int


def split_segmentation(
    root: str | os.PathLike,
    val_fraction: float = 0.2,
    seed: int = 0,
    image_size: int | None = None,
    augment_train: bool = True,
    num_classes: int | None = None,
    mode: str = "auto",
    index_dir: str | os.PathLike | None = None,
    mask_mode: str = "auto",
    ignore_index: int = IGNORE_INDEX,
) -> tuple[SegmentationFolder | SegmentationStream, SegmentationFolder | SegmentationStream]:
    """Training and validation sets from a segmentation folder: ``(train, val)``.

    When ``<root>/train/`` and ``<root>/val/`` exist (each in the segmentation layout) they are
    used as they are and `val_fraction`/`seed` play no part. Otherwise the ids of `root` are split
    at random: a fraction `val_fraction` (at least one sample) goes to validation, and the same
    `seed` always gives the same split. The validation set is never augmented; the training set's
    augmentations are drawn from `seed` too (see `SegmentationFolder`).

    Args:
        root: the folder (see `SegmentationFolder` for its layout).
        val_fraction: the fraction of the ids held out for validation, without train/ and val/.
        seed: seeds the split and the training set's augmentations.
        image_size: resize every image and mask to this square size (see `SegmentationFolder`).
        augment_train: augment the training set (`segmentation_augmentation`).
        num_classes: if given, the number of mask classes the folder must have.
        mode: ``"memory"`` (`SegmentationFolder`: every sample decoded up front), ``"stream"``
            (`SegmentationStream`: checked once, indexed, decoded per item) or ``"auto"``: stream
            when the decoded folder would take more than
            `trainer_datasets.segmentation_stream.STREAM_ABOVE_BYTES` (1 GiB). Both modes give the
            same items, split and errors.
        index_dir: where streaming keeps its index files (default: the project's cache folder).
        mask_mode: ``"auto"``, ``"binary"`` or ``"labels"`` (see `scan_segmentation_folder`); with
            train/ and val/, a ``classes.txt`` in `root` serves both sub-folders that lack their own.
        ignore_index: label maps: the value of pixels of no class.
    """
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 < val_fraction < 1:
        raise DatasetError(f"val_fraction must be a number strictly between 0 and 1, got {val_fraction!r}")
    root = Path(root)
    options = _Options(seed, image_size, augment_train, num_classes, mode, index_dir, mask_mode, ignore_index)
    if (root / "train").is_dir() or (root / "val").is_dir():
        return _given_split(root, options)
    return _random_split(root, val_fraction, options)


def _given_split(root: Path, o: _Options) -> Datasets:
    """The sets of the sub-folders train/ and val/ of `root`, as they are."""
    train_dir, val_dir = root / "train", root / "val"
    missing = val_dir if train_dir.is_dir() else train_dir
    if not missing.is_dir():
        raise DataNotFoundError(
            f"found {train_dir if missing is val_dir else val_dir} but not {missing}; give both "
            f"train/ and val/ sub-folders, or neither to split {root} at random"
        )
    shared = root / CLASSES_FILE

    def shared_classes(folder: Path) -> list[str] | None:
        if o.mask_mode == "binary" or (folder / CLASSES_FILE).is_file() or not shared.is_file():
            return None
        return read_classes(shared)

    layouts = (
        [scan_segmentation_folder(d, o.mask_mode, o.ignore_index, shared_classes(d)) for d in (train_dir, val_dir)]
        if o.mode == "auto"
        else []
    )
    stream = choose_data_mode(o.mode, layouts, o.image_size) == "stream"
    make: Callable[..., SegmentationFolder | SegmentationStream] = (
        partial(SegmentationStream, index_dir=o.index_dir) if stream else SegmentationFolder
    )
    train, val = (
        make(
            folder,
            o.image_size,
            augment,
            o.num_classes,
            seed=o.seed,
            mask_mode=o.mask_mode,
            ignore_index=o.ignore_index,
            label_classes=shared_classes(folder),
        )
        for folder, augment in ((train_dir, o.augment_train), (val_dir, False))
    )
    if train.classes != val.classes:
        raise DatasetError(
            f"{train_dir / 'masks'} has classes {train.classes} but {val_dir / 'masks'} has {val.classes}"
        )
    return train, val


def _random_split(root: Path, val_fraction: float, o: _Options) -> Datasets:
    """The ids of `root` split at random by the seed, a fraction `val_fraction` for validation."""
    layout = scan_segmentation_folder(root, o.mask_mode, o.ignore_index) if o.mode != "stream" else None
    index: SegmentationIndex | None = None
    if choose_data_mode(o.mode, [layout] if layout is not None else [], o.image_size) == "stream":
        index = segmentation_index(root, o.index_dir, o.mask_mode, o.ignore_index)
    ids = index.ids if index is not None else layout.ids if layout is not None else []
    if len(ids) < 2:
        raise DatasetError(f"{root / 'images'} has {len(ids)} image(s); a train/val split needs at least 2")
    num_val = min(max(1, round(len(ids) * val_fraction)), len(ids) - 1)
    order = torch.randperm(len(ids), generator=torch.Generator().manual_seed(o.seed)).tolist()
    val_ids = sorted(ids[i] for i in order[:num_val])
    train_ids = sorted(ids[i] for i in order[num_val:])
    if index is not None:
        return (
            SegmentationStream(
                root, o.image_size, o.augment_train, o.num_classes, ids=train_ids, seed=o.seed, index=index
            ),
            SegmentationStream(root, o.image_size, False, o.num_classes, ids=val_ids, index=index),
        )
    assert layout is not None
    # The classes of the whole folder, so both halves agree (without a classes.txt, the largest
    # value of one half need not be the other's).
    classes = layout.classes if layout.mask_mode == "labels" else None
    common: dict[str, Any] = dict(mask_mode=layout.mask_mode, ignore_index=o.ignore_index, label_classes=classes)
    return (
        SegmentationFolder(root, o.image_size, o.augment_train, o.num_classes, ids=train_ids, seed=o.seed, **common),
        SegmentationFolder(root, o.image_size, False, o.num_classes, ids=val_ids, **common),
    )
