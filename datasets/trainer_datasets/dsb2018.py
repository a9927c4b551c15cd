"""Turn the Data Science Bowl 2018 nuclei data into the segmentation folder layout.

    python -m trainer_datasets.dsb2018 --src stage1_train --dst inputs/dsb2018_96 --size 96

reads ``<src>/<id>/images/<id>.png`` and the instance masks ``<src>/<id>/masks/*.png`` (one
file per nucleus) and writes ``<dst>/images/<id>.png`` (RGB) and ``<dst>/masks/0/<id>.png``:
all nuclei of an image merged into one binary 0/255 mask, the class every nucleus belongs to.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
import torchvision.transforms.v2.functional as TF
from torchvision.transforms import InterpolationMode

from trainer.options import positive_int
from trainer_datasets.errors import DataNotFoundError, DatasetError
from trainer_datasets.image_files import read_image_rgb, read_mask, write_png_file

RAW_LAYOUT = "expected <src>/<id>/images/<id>.png and <src>/<id>/masks/*.png (the stage1_train layout)"


def find_dsb2018_samples(src: str | os.PathLike) -> list[tuple[str, Path, list[Path]]]:
    """``(id, image file, mask files)`` for every sample folder of `src`, sorted by id.

    Checks the whole tree before anything is decoded and raises one error naming every sample
    folder that lacks its image, its ``masks/`` folder or any mask in it.
    """
    src = Path(src)
    if not src.is_dir():
        what = "is not a folder" if src.exists() else "does not exist"
        raise DataNotFoundError(f"source folder {src} {what}; {RAW_LAYOUT}")
    samples, problems = [], []
    for folder in sorted(p for p in src.iterdir() if p.is_dir() and not p.name.startswith((".", "__"))):
        image = folder / "images" / f"{folder.name}.png"
        masks = sorted((folder / "masks").glob("*.png")) if (folder / "masks").is_dir() else []
        if not image.is_file():
            problems.append(f"{folder.name}: no images/{folder.name}.png")
        elif not (folder / "masks").is_dir():
            problems.append(f"{folder.name}: no masks/ folder")
        elif not masks:
            problems.append(f"{folder.name}: masks/ has no .png files")
        else:
            samples.append((folder.name, image, masks))
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        hint = " (test-stage folders have no masks: use stage1_train)" if any("masks" in p for p in problems) else ""
        raise DatasetError(f"{len(problems)} sample folder(s) in {src} are incomplete: {shown}{hint}; {RAW_LAYOUT}")
    if not samples:
        raise DataNotFoundError(f"no samples found in {src}; {RAW_LAYOUT}")
    return samples


def merge_instance_masks(mask_files: Sequence[Path], size: tuple[int, int], image_file: Path) -> torch.Tensor:
    """Logical OR of the binary instance masks, as a bool (H, W) tensor of the image's `size`."""
    merged = torch.zeros(size, dtype=torch.bool)
    for mask_file in mask_files:
        mask = read_mask(mask_file)
        if tuple(mask.shape) != tuple(size):
            raise DatasetError(
                f"mask {mask_file} is {mask.shape[1]}x{mask.shape[0]} but its image {image_file} is {size[1]}x{size[0]}"
            )
        merged |= mask.bool()
    return merged


def prepare_dsb2018(src: str | os.PathLike, dst: str | os.PathLike, size: int | None = 96) -> int:
    """Convert the DSB2018 tree at `src` into a segmentation folder at `dst`; return the image count.

    Images become 3-channel (grey tiled, alpha dropped) and are resized to ``size x size`` with
    antialiased bilinear interpolation; merged masks are resized with nearest neighbour so they
    stay 0/255. ``size=None`` keeps the original sizes. Everything is read and checked before the
    first file is written, so bad input leaves `dst` untouched.

    Args:
        src: the unpacked DSB2018 ``stage1_train`` folder (``<id>/images/<id>.png``, ``<id>/masks/*.png``).
        dst: the segmentation folder to write.
        size: the square side images and masks are resized to; None keeps their sizes.
    """
    positive_int("size", size, optional=True)
    results = []
    for sample_id, image_file, mask_files in find_dsb2018_samples(src):
        image = read_image_rgb(image_file)
        mask = merge_instance_masks(mask_files, (image.shape[-2], image.shape[-1]), image_file)
        mask = mask.to(torch.uint8).mul_(255).unsqueeze(0)
        if size is not None:
            image = TF.resize(image, [size, size], InterpolationMode.BILINEAR, antialias=True)
            mask = TF.resize(mask, [size, size], InterpolationMode.NEAREST)
        results.append((sample_id, image, mask))
    dst = Path(dst)
    for sample_id, image, mask in results:
        write_png_file(image, dst / "images" / f"{sample_id}.png")
        write_png_file(mask, dst / "masks" / "0" / f"{sample_id}.png")
    return len(results)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point; returns 0, or exits with status 2 and a one-line error on bad input."""
    parser = argparse.ArgumentParser(
        prog="python -m trainer_datasets.dsb2018",
        description="Convert Data Science Bowl 2018 stage1_train into <dst>/images/<id>.png and "
        "<dst>/masks/0/<id>.png, with each image's nuclei merged into one binary mask.",
    )
    parser.add_argument("--src", required=True, help="the unpacked stage1_train folder")
    parser.add_argument("--dst", required=True, help="output folder, e.g. inputs/dsb2018_96")
    parser.add_argument("--size", type=int, default=96, help="square output size in pixels (default: 96)")
    args = parser.parse_args(argv)
    try:
        count = prepare_dsb2018(args.src, args.dst, args.size)
    except ValueError as exc:  # a DatasetError, or a size that is not a positive integer
        print(f"{parser.prog}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"wrote {count} images and masks to {args.dst}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
