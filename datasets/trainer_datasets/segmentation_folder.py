"""Segmentation data in a folder of images and masks, a train/validation split, and a writer.

Layout (the pytorch-nested-unet layout, or its one-class shorthand)::

    <root>/images/<id>.<png|jpg|jpeg|tif|tiff>
    <root>/masks/<class>/<id>.png      one folder per class, classes sorted by folder name
    <root>/masks/<id>.png              or: a single class, masks directly in masks/
    <root>/masks/<id>.png + <root>/classes.txt   or: label maps, one class index per pixel

Which kind of masks a folder holds (`MASK_MODES`, the ``mask_mode`` argument):

- ``"binary"``: binary masks, 0 background and any non-zero value foreground, one per class
  folder (several classes are independent: multi-label, a sigmoid per class) or directly in
  ``masks/`` (one class, named ``mask``).
- ``"labels"``: label maps, ``masks/<id>.png`` holding one class index per pixel (8- or 16-bit
  grey, or palette PNG whose palette index is the class, as in Pascal VOC); exactly one class
  per pixel (softmax), and `ignore_index` (255 by default) for pixels of no class, which count
  for neither loss nor metrics. Class names come from ``<root>/classes.txt``, one per line, line
  i naming class i; without it the classes are ``"0"`` ... up to the largest value found.
- ``"auto"`` (the default): ``"labels"`` when the folder has a ``classes.txt`` (for train/ and
  val/ sub-folders: in the sub-folder or in the root above them), else ``"binary"``.
"""

from __future__ import annotations

import os
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torchvision.transforms.v2.functional as TF
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode

from trainer_datasets._imageio import (
    IMAGE_EXTENSIONS,
    check_labels,
    is_image_file,
    is_system_file,
    not_regular,
    read_image_rgb,
    read_label_map,
    read_mask,
    write_png_file,
)
from trainer_datasets._seeding import global_stream
from trainer_datasets.errors import DataNotFoundError, DatasetError
from trainer_datasets.transforms import segmentation_augmentation

if TYPE_CHECKING:
    from trainer_datasets.segmentation_stream import SegmentationStream

LAYOUT = (
    "expected <root>/images/<id>.png (or .jpg/.jpeg/.tif/.tiff) and masks in "
    "<root>/masks/<class>/<id>.png (one folder per class) or <root>/masks/<id>.png"
)
#: What a folder's masks may be: see the module docstring.
MASK_MODES = ("auto", "binary", "labels")
#: The file naming a label-map folder's classes, one per line.
CLASSES_FILE = "classes.txt"
#: The label-map value of pixels that belong to no class, by default (as in Pascal VOC).
IGNORE_INDEX = 255


@dataclass
class FolderLayout:
    """The files found in a segmentation folder, paired by id (file name without extension)."""

    root: Path
    images: dict[str, Path]
    masks: dict[str, dict[str, Path]]  # class name -> id -> mask file; label maps: "labels" -> id -> file
    #: ``"binary"`` or ``"labels"`` (see the module docstring).
    mask_mode: str = "binary"
    #: Label maps: the class names, index i naming class i.
    label_classes: list[str] | None = None
    #: Label maps: the value of pixels of no class.
    ignore_index: int = IGNORE_INDEX

    @property
    def classes(self) -> list[str]:
        """Class names: the mask sub-folder names, sorted; ``["mask"]`` for the flat layout;
        for label maps, `label_classes` in index order."""
        if self.mask_mode == "labels":
            return list(self.label_classes or [])
        return list(self.masks)

    @property
    def ids(self) -> list[str]:
        """All sample ids, sorted."""
        return sorted(self.images)

    def files(self) -> list[Path]:
        """Every image and mask file of the folder, sorted."""
        return sorted([*self.images.values(), *(path for masks in self.masks.values() for path in masks.values())])


def scan_segmentation_folder(
    root: str | os.PathLike,
    mask_mode: str = "auto",
    ignore_index: int = IGNORE_INDEX,
    label_classes: Sequence[str] | None = None,
) -> FolderLayout:
    """List and pair the files of a segmentation folder and tell its kind of masks.

    Nothing is decoded, except label maps without a ``classes.txt``: their classes are ``"0"`` up
    to the largest value (but `ignore_index`) that any of them holds, so all are read once.

    Raises `DataNotFoundError` for a missing root, images/ or masks/ folder or an empty one, and
    `DatasetError` listing every unpaired file (images without masks, masks without images),
    unsupported file, entry that is not a regular file (a FIFO, a dangling or looping symbolic
    link: never opened) or duplicate id in one message. Hidden files and the files operating
    systems leave behind (``.DS_Store``, ``Thumbs.db``, ``desktop.ini``) are left out.
    Label maps in class folders, a class folder or a ``classes.txt`` whose names cannot name a
    class (see `read_classes` and `class_name_problem`) and an `ignore_index` that is a class
    index raise `DatasetError`.

    Args:
        root: the folder.
        mask_mode: ``"auto"``, ``"binary"`` or ``"labels"`` (see the module docstring).
        ignore_index: label maps: the value of pixels of no class (0-65535).
        label_classes: label maps: the class names, in index order (default: those of
            ``<root>/classes.txt``, else indices); given, they make ``"auto"`` mean ``"labels"``.
    """
    if mask_mode not in MASK_MODES:
        raise DatasetError(f"mask_mode must be one of {', '.join(MASK_MODES)}, got {mask_mode!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int) or not 0 <= ignore_index <= 65535:
        raise DatasetError(f"ignore_index must be an integer in 0-65535 (a label-map value), got {ignore_index!r}")
    root = Path(root)
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "does not exist"
        raise DataNotFoundError(f"segmentation folder {root} {what}; {LAYOUT}")
    image_dir, mask_dir = root / "images", root / "masks"
    for folder in (image_dir, mask_dir):
        if not folder.is_dir():
            raise DataNotFoundError(f"missing folder {folder}; {LAYOUT}")

    problems: list[str] = []
    images = _index_files(image_dir, root, problems)
    if not images and not problems:
        raise DataNotFoundError(f"no images in {image_dir}; {LAYOUT}")

    entries = _visible(mask_dir)
    class_dirs = sorted(p for p in entries if p.is_dir())
    loose = sorted(p for p in entries if not p.is_dir())
    if class_dirs and loose:
        raise DatasetError(
            f"{mask_dir} mixes class folders ({', '.join(p.name for p in class_dirs)}) with mask files "
            f"({', '.join(p.name for p in loose[:3])}{', ...' if len(loose) > 3 else ''}); use either "
            "masks/<class>/<id>.png or masks/<id>.png"
        )
    bad_names = [f"{d.name!r} {problem}" for d in class_dirs if (problem := class_name_problem(d.name)) is not None]
    if bad_names:
        raise DatasetError(
            f"{mask_dir} holds class folders whose names cannot name a class ({'; '.join(bad_names)}); "
            "class names become folder and file names of predict's outputs: rename them"
        )
    if class_dirs:
        masks = {d.name: _index_files(d, root, problems) for d in class_dirs}
    else:
        masks = {"mask": _index_files(mask_dir, root, problems)}
    if all(not m for m in masks.values()) and not problems:
        raise DataNotFoundError(f"no masks in {mask_dir}; {LAYOUT}")

    unpaired_images = [images[i] for i in sorted(images) if any(i not in m for m in masks.values())]
    unpaired_masks = [m[i] for m in masks.values() for i in sorted(m) if i not in images]
    if unpaired_images:
        problems.append("images without a mask in every class: " + _names(unpaired_images, root))
    if unpaired_masks:
        problems.append("masks without an image: " + _names(unpaired_masks, root))
    if problems:
        raise DatasetError(
            f"segmentation folder {root} is not usable:\n  " + "\n  ".join(problems) + "\n"
            "Each image needs a mask with the same name (any supported extension) in every class folder."
        )
    classes_file = root / CLASSES_FILE
    if mask_mode == "auto":
        mask_mode = "labels" if label_classes is not None or classes_file.is_file() else "binary"
    if mask_mode == "binary":
        return FolderLayout(root, images, masks)
    if class_dirs:
        raise DatasetError(
            f"{mask_dir} holds class folders ({', '.join(p.name for p in class_dirs)}), but label maps "
            f"(mask mode 'labels'{'' if not classes_file.is_file() else ', chosen by ' + str(classes_file)}) are "
            "one file per image, masks/<id>.png; use binary masks for class folders"
        )
    label_masks = {"labels": masks["mask"]}
    if label_classes is not None:
        classes = list(label_classes)
    elif classes_file.is_file():
        classes = read_classes(classes_file)
    else:
        largest = max((_largest_label(path, ignore_index) for path in masks["mask"].values()), default=0)
        classes = [str(index) for index in range(max(largest + 1, 2))]
    if ignore_index < len(classes):
        raise DatasetError(
            f"the ignore index {ignore_index} is the index of class {classes[ignore_index]!r} of {root}; "
            f"choose an ignore index of {len(classes)} or more (255 by default)"
        )
    return FolderLayout(root, images, label_masks, "labels", classes, ignore_index)


def class_name_problem(name: object) -> str | None:
    """Why `name` cannot name a class, or None when it can.

    Class names become folder and file names (``predict`` writes ``<out>/<class>/<id>.png``) and
    TensorBoard tags, so a name must name one entry inside a folder: a non-empty string, not
    ``.`` or ``..``, without a path separator (``/``, or ``\\`` as Windows reads it, which
    also rules out absolute paths), a control character (NUL, tab, newline, DEL, ...), a lone
    surrogate (no file system takes it) or a byte-order mark. `read_classes`, the class folders
    of a segmentation folder and the recipe's ``predict`` (for the names a checkpoint records)
    all apply this rule.

    Args:
        name: the class name to check.
    """
    if not isinstance(name, str):
        return f"is not a string but a {type(name).__name__}"
    if not name:
        return "is empty"
    if name in (".", ".."):
        return f"is {name!r}, which names a folder, not a class"
    for separator in ("/", "\\"):
        if separator in name:
            return f"holds a path separator {separator!r}"
    for char in name:
        kind = unicodedata.category(char)
        if kind in ("Cc", "Cs") or char == "\ufeff":
            what = {"Cc": "control character", "Cs": "lone surrogate"}.get(kind, "byte-order mark")
            return f"holds the {what} {char!r}"
    return None


def read_classes(path: str | os.PathLike) -> list[str]:
    """The class names of a ``classes.txt``: one per line, line i naming class i. The file is
    UTF-8, with or without a byte-order mark (``utf-8-sig``); spaces and tabs around a name and
    trailing blank lines are dropped.

    An empty file, a single class, a blank or repeated name, or a name that `class_name_problem`
    refuses (``.``, ``..``, a path separator, a control character: names become folders, file
    names and TensorBoard tags) is a one-line `DatasetError` naming the file and each line at
    fault.

    Args:
        path: the file.
    """
    path = Path(path)
    try:
        # Universal newlines: \n, \r\n and \r end a line; other control characters stay in the name.
        lines = [line.strip(" \t") for line in path.read_text(encoding="utf-8-sig").split("\n")]
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"cannot read the class names of {path}: {' '.join(str(exc).split())}") from exc
    while lines and not lines[-1]:
        lines.pop()
    problems = []
    if len(lines) < 2:
        problems.append(f"it names {len(lines)} class(es); label maps need at least 2 (e.g. background and object)")
    for i, name in enumerate(lines):
        if not name:
            problems.append(f"line {i + 1} is blank")
        elif (problem := class_name_problem(name)) is not None:
            problems.append(f"line {i + 1} ({name!r}) {problem}")
    problems += [
        f"{name!r} is on lines {lines.index(name) + 1} and {i + 1}"
        for i, name in enumerate(lines)
        if name and lines.index(name) != i
    ]
    if problems:
        raise DatasetError(
            f"{path} is not a usable class list ({'; '.join(problems)}); write one class name per "
            "line, line i naming class index i"
        )
    return lines


def _largest_label(path: Path, ignore_index: int) -> int:
    labels = read_label_map(path)
    labels = labels[labels != ignore_index]
    return int(labels.max()) if labels.numel() else 0


class SegmentationFolder(Dataset):
    """Images and binary masks or label maps from a segmentation folder (see the module docstring
    for the layout and the rule that tells the two kinds of masks apart).

    Every selected image and mask is decoded once, at construction, and kept in memory as uint8
    (``N * (3 + C) * H * W`` bytes after resizing; about 25 MB for the 670 DSB2018 images at 96x96).
    That costs one decode per file up front and makes every problem surface before training:
    unpaired files (all listed in one error), corrupt images, masks that `read_mask` refuses
    (colour-coded, alpha-only or JPEG masks), masks whose size differs from their image's, and
    images of mixed sizes without `image_size`, each named. In binary masks any non-zero value is
    foreground; a label-map value that is neither a class index nor `ignore_index` is an error
    naming the file.

    Args:
        root: the folder holding ``images/`` and ``masks/``.
        image_size: resize images (bilinear, antialiased) and masks (nearest) to this square size;
            required when the images have different sizes.
        augment: random flips, 90-degree rotations (image and mask alike) and a small colour
            jitter (image only), drawn from a stream of ``(seed, epoch, index)`` (see below).
        num_classes: if given, the number of mask classes the folder must have.
        ids: use only these sample ids (file names without extension); default all, sorted.
        seed: with the epoch and the item's index, decides its augmentation.
        mask_mode: ``"auto"``, ``"binary"`` or ``"labels"`` (see the module docstring).
        ignore_index: label maps: the value of pixels of no class, kept as it is in the items.
        label_classes: label maps: the class names (see `scan_segmentation_folder`).

    Items are ``(image, mask)``: float32 (3, H, W) in [0, 1] and, for binary masks, float32
    (C, H, W) in {0, 1}; for label maps, int64 (H, W) class indices (and `ignore_index`).
    ``mask_mode`` is ``"binary"`` or ``"labels"``, whichever the folder holds.

    The augmentation of item ``index`` depends on ``(seed, epoch, index)`` alone, not on the
    process that loads it nor on what that process drew before: a `DataLoader` gives the same
    batches with any ``num_workers``, and a run resumed inside an epoch draws what the
    uninterrupted run drew. The `Trainer` calls `set_epoch` before every epoch (a new draw per
    epoch); workers take their copy of the dataset when a pass starts, so ``persistent_workers=True``
    would keep the epoch of the first pass.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        image_size: int | None = None,
        augment: bool = False,
        num_classes: int | None = None,
        ids: Sequence[str] | None = None,
        seed: int = 0,
        mask_mode: str = "auto",
        ignore_index: int = IGNORE_INDEX,
        label_classes: Sequence[str] | None = None,
    ) -> None:
        _check_image_size(image_size)
        layout = scan_segmentation_folder(root, mask_mode, ignore_index, label_classes)
        ids = select_samples(layout.root, layout.classes, layout.ids, num_classes, ids)
        self.root = layout.root
        self.layout = layout
        self.ids: list[str] = ids
        self.classes: list[str] = layout.classes
        self.num_classes = len(self.classes)
        self.mask_mode = layout.mask_mode
        self.ignore_index = layout.ignore_index
        self.image_size = image_size
        self.images, self.masks = _load_all(layout, ids, image_size)
        check_labelled_pixels(layout, ids, self.masks)
        #: The (height, width) of every item.
        self.size: tuple[int, int] = (int(self.images.shape[-2]), int(self.images.shape[-1]))
        square = self.images.shape[-1] == self.images.shape[-2]
        self.transform = segmentation_augmentation(square=square) if augment else None
        self.seed = seed
        #: The epoch whose augmentations `__getitem__` draws (see `set_epoch`).
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.ids)

    def set_epoch(self, epoch: int) -> None:
        """Draw the augmentations of `epoch` from now on (the `Trainer` calls it before each epoch)."""
        self.epoch = epoch

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return make_item(
            self.images[index],
            self.masks[index],
            self.transform,
            self.seed,
            self.epoch,
            index,
            labels=self.mask_mode == "labels",
        )

    def image_file(self, index: int) -> Path:
        """The image file of item `index`."""
        return self.layout.images[self.ids[index]]


def make_item(
    image: torch.Tensor, mask: torch.Tensor, transform: Any, seed: int, epoch: int, index: int, labels: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """The item a segmentation dataset gives for a decoded sample: float32 image in [0, 1] and
    float32 binary mask (or int64 label map), augmented by `transform` (if any) with the draws of
    ``(seed, epoch, index)``.

    Args:
        image: the uint8 (3, H, W) image, as `load_sample` decodes it.
        mask: the mask as `load_sample` decodes it: uint8 (C, H, W), or int64 (H, W) for label maps.
        transform: a joint image/mask transform (`segmentation_augmentation`), or None.
        seed: the dataset's seed.
        epoch: the epoch whose draws to use.
        index: the item's index in its dataset.
        labels: `mask` is a label map, returned as int64 class indices.
    """
    if transform is not None:
        with global_stream(seed, epoch, index):
            image, mask = transform(tv_tensors.Image(image), tv_tensors.Mask(mask))
        image, mask = image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor)
    return image.float().div_(255), mask.long() if labels else mask.float()


def mixed_sizes_error(
    first_file: Path, first_size: Sequence[int], image_file: Path, size: Sequence[int]
) -> DatasetError:
    """The error for images of different sizes loaded without an image size.

    Args:
        first_file: the first image, of size `first_size` (H, W).
        first_size: its size.
        image_file: an image of another size.
        size: that image's size (H, W).
    """
    return DatasetError(
        f"images have different sizes: {first_file} is {_hw(first_size)} but {image_file} is "
        f"{_hw(size)}; pass an image size (e.g. image_size=96) to resize all images to one square size"
    )


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
        mask_mode: ``"auto"``, ``"binary"`` or ``"labels"`` (see the module docstring); with
            train/ and val/, a ``classes.txt`` in `root` serves both sub-folders that lack their own.
        ignore_index: label maps: the value of pixels of no class.
    """
    from trainer_datasets.segmentation_stream import SegmentationStream, choose_data_mode, segmentation_index

    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 < val_fraction < 1:
        raise DatasetError(f"val_fraction must be a number strictly between 0 and 1, got {val_fraction!r}")
    root = Path(root)
    train_dir, val_dir = root / "train", root / "val"
    if train_dir.is_dir() or val_dir.is_dir():
        missing = val_dir if train_dir.is_dir() else train_dir
        if not missing.is_dir():
            raise DataNotFoundError(
                f"found {train_dir if missing is val_dir else val_dir} but not {missing}; give both "
                f"train/ and val/ sub-folders, or neither to split {root} at random"
            )
        shared = root / CLASSES_FILE

        def shared_classes(folder: Path) -> list[str] | None:
            if mask_mode == "binary" or (folder / CLASSES_FILE).is_file() or not shared.is_file():
                return None
            return read_classes(shared)

        layouts = (
            [scan_segmentation_folder(d, mask_mode, ignore_index, shared_classes(d)) for d in (train_dir, val_dir)]
            if mode == "auto"
            else []
        )
        stream = choose_data_mode(mode, layouts, image_size) == "stream"
        make: Callable[..., SegmentationFolder | SegmentationStream] = (
            partial(SegmentationStream, index_dir=index_dir) if stream else SegmentationFolder
        )
        train, val = (
            make(
                folder,
                image_size,
                augment,
                num_classes,
                seed=seed,
                mask_mode=mask_mode,
                ignore_index=ignore_index,
                label_classes=shared_classes(folder),
            )
            for folder, augment in ((train_dir, augment_train), (val_dir, False))
        )
        if train.classes != val.classes:
            raise DatasetError(
                f"{train_dir / 'masks'} has classes {train.classes} but {val_dir / 'masks'} has {val.classes}"
            )
        return train, val

    layout = scan_segmentation_folder(root, mask_mode, ignore_index) if mode != "stream" else None
    index = (
        segmentation_index(root, index_dir, mask_mode, ignore_index)
        if choose_data_mode(mode, [layout] if layout is not None else [], image_size) == "stream"
        else None
    )
    ids = index.ids if index is not None else layout.ids if layout is not None else []
    if len(ids) < 2:
        raise DatasetError(f"{root / 'images'} has {len(ids)} image(s); a train/val split needs at least 2")
    num_val = min(max(1, round(len(ids) * val_fraction)), len(ids) - 1)
    order = torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed)).tolist()
    val_ids = sorted(ids[i] for i in order[:num_val])
    train_ids = sorted(ids[i] for i in order[num_val:])
    if index is not None:
        return (
            SegmentationStream(root, image_size, augment_train, num_classes, ids=train_ids, seed=seed, index=index),
            SegmentationStream(root, image_size, False, num_classes, ids=val_ids, index=index),
        )
    # The classes of the whole folder, so both halves agree (without a classes.txt, the largest
    # value of one half need not be the other's).
    assert layout is not None
    kind, classes = layout.mask_mode, layout.classes if layout.mask_mode == "labels" else None
    train = SegmentationFolder(
        root,
        image_size,
        augment_train,
        num_classes,
        ids=train_ids,
        seed=seed,
        mask_mode=kind,
        ignore_index=ignore_index,
        label_classes=classes,
    )
    val = SegmentationFolder(
        root,
        image_size,
        False,
        num_classes,
        ids=val_ids,
        mask_mode=kind,
        ignore_index=ignore_index,
        label_classes=classes,
    )
    return train, val


def write_segmentation_folder(
    dataset: Any,
    root: str | os.PathLike,
    class_folders: bool = True,
    exist_ok: bool = False,
) -> Path:
    """Write ``(image, mask)`` items of `dataset` as PNGs in the segmentation folder layout.

    Images (float in [0, 1], (3, H, W)) are written as 8-bit RGB, masks (C, H, W) as 0/255 grey
    PNGs in ``masks/<class index>/`` (or ``masks/`` with ``class_folders=False``, one class only).
    Ids are zero-padded indices (``0000.png``, ...). Refuses a non-empty ``images/`` or ``masks/``
    folder unless ``exist_ok`` (files of the same name are then replaced). Returns `root`.

    Args:
        dataset: ``(image, mask)`` items, e.g. a `SyntheticNuclei`.
        root: the folder to write.
        class_folders: one folder per class under ``masks/``; False writes one class to ``masks/``.
        exist_ok: write into non-empty ``images/`` and ``masks/`` folders.
    """
    root = Path(root)
    for folder in (root / "images", root / "masks"):
        if not exist_ok and folder.is_dir() and any(folder.iterdir()):
            raise DatasetError(f"{folder} is not empty; write to a new folder or pass exist_ok=True")
    width = max(4, len(str(len(dataset) - 1)))
    for index in range(len(dataset)):
        image, mask = dataset[index]
        if mask.dim() == 2:
            mask = mask.unsqueeze(0)
        if not class_folders and mask.shape[0] != 1:
            raise DatasetError(f"class_folders=False needs one mask channel, item {index} has {mask.shape[0]}")
        name = f"{index:0{width}d}.png"
        write_png_file(image.mul(255).round_().clamp_(0, 255).to(torch.uint8), root / "images" / name)
        for c in range(mask.shape[0]):
            folder = root / "masks" / str(c) if class_folders else root / "masks"
            write_png_file((mask[c : c + 1] > 0.5).to(torch.uint8) * 255, folder / name)
    return root


def select_samples(
    root: Path, classes: Sequence[str], all_ids: Sequence[str], num_classes: int | None, ids: Sequence[str] | None
) -> list[str]:
    """The ids a dataset of folder `root` uses: `ids`, or `all_ids` when None. A `num_classes`
    other than the folder's count of `classes`, an unknown id or an empty selection is a
    `DatasetError`.

    Args:
        root: the folder, for the messages.
        classes: the folder's mask classes.
        all_ids: every sample id of the folder.
        num_classes: if given, the number of classes the folder must have.
        ids: the ids asked for, or None for all.
    """
    if num_classes is not None and num_classes != len(classes):
        raise DatasetError(
            f"num_classes={num_classes} but {root / 'masks'} has {len(classes)} class(es): {', '.join(classes)}"
        )
    if ids is None:
        return list(all_ids)
    ids, known = list(ids), set(all_ids)
    unknown = [i for i in ids if i not in known]
    if unknown:
        raise DatasetError(f"ids not found in {root / 'images'}: {', '.join(unknown)}")
    if not ids:
        raise DatasetError(f"ids is empty: select at least one sample of {root / 'images'}")
    return ids


def _check_image_size(image_size: Any) -> None:
    if image_size is None:
        return
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise DatasetError(f"image_size must be a positive int (the side of the square) or None, got {image_size!r}")


def _visible(folder: Path) -> list[Path]:
    """The entries of `folder` but hidden and system files (`is_system_file`), which are left out."""
    return [p for p in folder.iterdir() if not is_system_file(p)]


def _index_files(folder: Path, root: Path, problems: list[str]) -> dict[str, Path]:
    """id -> file for the image files in `folder`; unsupported or duplicate names go to `problems`."""
    found: dict[str, Path] = {}
    unsupported: list[Path] = []
    irregular: list[str] = []
    for path in sorted(_visible(folder)):
        problem = not_regular(path)
        if problem is not None and problem != "a folder":  # never opened: a FIFO would block
            irregular.append(f"{path.relative_to(root)} ({problem})")
        elif path.is_dir():
            unsupported.append(path)
        elif not is_image_file(path):
            unsupported.append(path)
        elif path.stem in found:
            problems.append(f"two files for id {path.stem!r}: {_names([found[path.stem], path], root)}")
        else:
            found[path.stem] = path
    if unsupported:
        problems.append(f"unsupported entries (supported: {', '.join(IMAGE_EXTENSIONS)}): {_names(unsupported, root)}")
    if irregular:
        problems.append("entries that are not regular files: " + ", ".join(irregular))
    return found


def _names(paths: Sequence[Path], root: Path) -> str:
    return ", ".join(str(p.relative_to(root)) for p in paths)


def check_labelled_pixels(layout: FolderLayout, ids: Sequence[str], masks: torch.Tensor) -> int:
    """The number of labelled pixels (of a class, not the ignore index) in the label maps `masks`
    of the samples `ids` of `layout`; a `DatasetError` of one line naming the folder when there is
    none: such a set can neither train (no pixel has a loss) nor validate (no pixel has a score).
    Binary masks are not counted (0).

    Args:
        layout: the folder.
        ids: the samples (of one split).
        masks: their decoded label maps, (N, H, W), as the items give them.
    """
    if layout.mask_mode != "labels":
        return 0
    labelled = int((masks != layout.ignore_index).sum())
    if labelled == 0:
        shown = ", ".join(ids[:3]) + (f" and {len(ids) - 3} more" if len(ids) > 3 else "")
        raise DatasetError(
            f"the label maps of {layout.root} hold no labelled pixel in the {len(ids)} sample(s) of this set "
            f"({shown}): every pixel is the ignore index {layout.ignore_index}; label some of their pixels, or "
            "split the data so that training and validation both have labelled pixels"
        )
    return labelled


def _load_all(layout: FolderLayout, ids: Sequence[str], image_size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    images, masks = [], []
    first: tuple[Path, tuple[int, ...]] | None = None
    for sample_id in ids:
        image, mask = load_sample(layout, sample_id, image_size)
        if image_size is None:
            image_file, size = layout.images[sample_id], tuple(image.shape[-2:])
            if first is None:
                first = (image_file, size)
            elif size != first[1]:
                raise mixed_sizes_error(first[0], first[1], image_file, size)
        images.append(image)
        masks.append(mask)
    return torch.stack(images), torch.stack(masks)


def load_sample(layout: FolderLayout, sample_id: str, image_size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode one sample of `layout`: its uint8 (3, H, W) image and its mask, uint8 (C, H, W) of
    0/1 for binary masks, int64 (H, W) of class indices (and the ignore index) for label maps.

    Both are resized to ``image_size`` squared when it is given (bilinear with antialiasing for
    the image, nearest for the mask). Raises `DatasetError` naming the file for a mask whose size
    differs from its image's, a label-map value that is neither a class nor the ignore index,
    and whatever `read_image_rgb` / `read_mask` / `read_label_map` raise for a bad file.
    """
    image_file = layout.images[sample_id]
    image = read_image_rgb(image_file)
    size = tuple(image.shape[-2:])
    labels = layout.mask_mode == "labels"
    channels = []
    for class_masks in layout.masks.values():
        mask_file = class_masks[sample_id]
        if labels:
            mask = read_label_map(mask_file)
            check_labels(mask, mask_file, len(layout.classes), layout.ignore_index)
        else:
            mask = read_mask(mask_file)
        if tuple(mask.shape) != size:
            raise DatasetError(
                f"mask {mask_file} is {_hw(mask.shape)} but its image {image_file} is {_hw(size)}; "
                "a mask must have its image's size"
            )
        channels.append(mask)
    mask = torch.stack(channels)
    if image_size is not None:
        image = TF.resize(image, [image_size, image_size], InterpolationMode.BILINEAR, antialias=True)
        mask = TF.resize(mask, [image_size, image_size], InterpolationMode.NEAREST)
    return image, mask[0] if labels else mask


def _hw(shape: Sequence[int]) -> str:
    return f"{shape[-1]}x{shape[-2]}"
