"""Label-map segmentation of a real image: scikit-image's coins, background / coin interior / coin rim.

    python -m bench.coins                   # needs the bench extra: pip install -e .[bench]
    python -m bench.coins --epochs 30 --arch NestedUNet

The labels come from the image itself: coins are the pixels above Otsu's threshold, with holes
filled and specks removed; a coin's rim is the coin minus the coin eroded by `--rim` pixels, its
interior what the erosion leaves. Random crops of the image (and their label maps, palette PNGs
with a classes.txt) make a training folder; ``python -m recipes.nested_unet`` trains on it with
softmax and cross-entropy + Dice, ``predict`` writes the label map of the whole image, and the
per-class IoU of that label map against the labels is printed. The whole image includes the
crops trained on: the figures say how well the recipe fits a real label map, not how it generalises.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import add_arch_option
from bench.recipe_runs import predict_nested_unet, train_nested_unet
from models import confusion_iou
from trainer.callbacks.checkpoint import CHECKPOINT_BEST
from trainer.native import cpu_features, describe_cpu
from trainer_datasets import read_label_map, write_label_map, write_png_file

CLASSES = ["background", "interior", "rim"]


def coin_labels(image: np.ndarray, rim: int) -> np.ndarray:
    """(H, W) uint8 class indices of the coins image: 0 background, 1 coin interior, 2 coin rim."""
    from scipy import ndimage
    from skimage import filters, morphology

    coins = image > filters.threshold_otsu(image)
    coins = ndimage.binary_fill_holes(ndimage.binary_opening(coins, structure=morphology.disk(2)))
    regions, count = ndimage.label(coins)
    sizes = ndimage.sum(coins, regions, range(1, count + 1))
    coins = np.isin(regions, 1 + np.flatnonzero(sizes >= 100))  # specks of under 100 pixels are no coins
    interior = ndimage.binary_erosion(coins, structure=morphology.disk(rim))
    labels = np.zeros(image.shape, dtype=np.uint8)
    labels[coins] = 2
    labels[interior] = 1
    return labels


def write_crops(image: np.ndarray, labels: np.ndarray, root: Path, count: int, side: int, seed: int) -> None:
    """`count` random `side` x `side` crops of `image` and `labels` as a label-map folder."""
    rng = np.random.default_rng(seed)
    height, width = image.shape
    for index in range(count):
        y, x = int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1))
        crop = torch.from_numpy(image[y : y + side, x : x + side].copy())
        write_png_file(crop.expand(3, -1, -1).contiguous(), root / "images" / f"{index:03d}.png")
        write_label_map(
            torch.from_numpy(labels[y : y + side, x : x + side].astype(np.int64)), root / "masks" / f"{index:03d}.png"
        )
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")


def main(argv: list[str] | None = None) -> None:
    """Build the coins label maps, train, predict the whole image and print the per-class IoU."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arch_option(parser)
    parser.add_argument("--epochs", type=int, default=12, help="training epochs (default: %(default)s)")
    parser.add_argument("--crops", type=int, default=40, help="training crops (default: %(default)s)")
    parser.add_argument("--side", type=int, default=96, help="crop side, a multiple of 16 (default: %(default)s)")
    parser.add_argument("--rim", type=int, default=4, help="rim width in pixels (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="crops and training seed (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        from skimage import data
    except ImportError:
        raise SystemExit("error: bench.coins needs scikit-image: pip install -e .[bench]") from None
    features = cpu_features()
    print(
        f"CPU: {describe_cpu(features)} ({', '.join(k for k, v in features.items() if v) or 'none'}); "
        f"{torch.get_num_threads()} threads"
    )
    image = data.coins()
    labels = coin_labels(image, args.rim)
    shares = np.bincount(labels.ravel(), minlength=3) / labels.size
    print(
        f"coins image {image.shape[1]}x{image.shape[0]}: "
        + ", ".join(f"{name} {100 * share:.1f}%" for name, share in zip(CLASSES, shares))
    )
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        write_crops(image, labels, work / "data", args.crops, args.side, args.seed)
        write_png_file(torch.from_numpy(image).expand(3, -1, -1).contiguous(), work / "whole" / "coins.png")
        start = time.perf_counter()
        options = ["--batch-size", "4", "--lr", "0.003", "--seed", str(args.seed)]
        train_nested_unet(work / "data", work / "run", args.arch, args.epochs, *options)
        trained = time.perf_counter() - start
        predict_nested_unet(work / "run" / CHECKPOINT_BEST, work / "whole", work / "out")
        predicted = read_label_map(work / "out" / "coins.png")
    truth = torch.from_numpy(labels.astype(np.int64))
    matrix = torch.bincount(truth.flatten() * 3 + predicted.flatten(), minlength=9).view(3, 3)
    ious = confusion_iou(matrix)
    print(
        f"{args.arch}, {args.epochs} epochs on {args.crops} crops of {args.side}x{args.side}, trained in "
        f"{trained:.0f} s; whole-image IoU: "
        + ", ".join(f"{name} {value:.3f}" for name, value in zip(CLASSES, ious.tolist()))
        + f"; mean {ious.mean():.3f}"
    )


if __name__ == "__main__":
    main()
