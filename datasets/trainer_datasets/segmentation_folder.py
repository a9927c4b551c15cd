"""`SegmentationFolder`: a segmentation folder decoded into memory, how one sample decodes, and a writer.

The layout of the folder and the kinds of masks it may hold are described in
`trainer_datasets.segmentation_layout`; `load_sample` decodes a sample and `SegmentationItems`
makes it an item, for both this dataset and `SegmentationStream`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torchvision.transforms.v2.functional as TF
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode

from trainer.options import positive_int
from trainer_datasets._seeding import global_stream
from trainer_datasets.errors import DatasetError
from trainer_datasets.image_files import check_labels, read_image_rgb, read_label_map, read_mask, write_png_file
from trainer_datasets.segmentation_layout import IGNORE_INDEX, FolderLayout, scan_segmentation_folder, select_samples
from trainer_datasets.transforms import segmentation_augmentation


class SegmentationItems(Dataset):
    """What `SegmentationFolder` and `SegmentationStream` share: what their items are (root, ids,
    classes, kind of masks, size), the epoch whose augmentations they draw, and how a decoded
    sample becomes an item."""

    def _describe(
        self,
        root: Path,
        ids: list[str],
        classes: Sequence[str],
        mask_mode: str,
        ignore_index: int,
        image_size: int | None,
        size: tuple[int, int],
        augment: bool,
        seed: int,
    ) -> None:
        self.root = root
        self.ids: list[str] = ids
        self.classes: list[str] = list(classes)
        self.num_classes = len(self.classes)
        self.mask_mode = mask_mode
        self.ignore_index = ignore_index
        self.image_size = image_size
        #: The (height, width) of every item.
        self.size: tuple[int, int] = size
        self.transform = segmentation_augmentation(square=size[0] == size[1]) if augment else None
        self.seed = seed
        #: The epoch whose augmentations `__getitem__` draws (see `set_epoch`).
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.ids)

    def set_epoch(self, epoch: int) -> None:
        """Draw the augmentations of `epoch` from now on (the `Trainer` calls it before each epoch)."""
        self.epoch = epoch

    def _item(self, image: torch.Tensor, mask: torch.Tensor, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Item `index` of a decoded sample (uint8 image (3, H, W) and mask as `load_sample` decodes
        it): float32 image in [0, 1] and float32 binary mask (or int64 label map), augmented (if at
        all) with the draws of ``(seed, epoch, index)``."""
        if self.transform is not None:
            with global_stream(self.seed, self.epoch, index):
                image, mask = self.transform(tv_tensors.Image(image), tv_tensors.Mask(mask))
            image, mask = image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor)
        return image.float().div_(255), mask.long() if self.mask_mode == "labels" else mask.float()


class SegmentationFolder(SegmentationItems):
    """Images and binary masks or label maps from a segmentation folder (its layout and the rule
    that tells the two kinds of masks apart: `scan_segmentation_folder`).

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
        mask_mode: ``"auto"``, ``"binary"`` or ``"labels"`` (see `scan_segmentation_folder`).
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
        positive_int("image_size", image_size, optional=True)
        layout = scan_segmentation_folder(root, mask_mode, ignore_index, label_classes)
        ids = select_samples(layout.root, layout.classes, layout.ids, num_classes, ids)
        self.layout = layout
        self.images, self.masks = _load_all(layout, ids, image_size)
        check_labelled_pixels(layout, ids, self.masks)
        size = (int(self.images.shape[-2]), int(self.images.shape[-1]))
        self._describe(
            layout.root, ids, layout.classes, layout.mask_mode, layout.ignore_index, image_size, size, augment, seed
        )

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._item(self.images[index], self.masks[index], index)

    def image_file(self, index: int) -> Path:
        """The image file of item `index`."""
        return self.layout.images[self.ids[index]]


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
