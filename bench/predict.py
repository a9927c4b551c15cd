"""Peak memory and time of `predict` on one large image, through the recipe's command line.

    python -m bench.predict                  # a 4096x4096 PNG, UNet and NestedUNet
    python -m bench.predict --side 2048 --arch UNet --tile 1024

For each architecture a tiny run (one epoch on eight 32x32 images, so the weights are real) gives
a checkpoint; then ``python -m recipes.nested_unet predict`` runs on the large image in a child
process, whose peak resident memory (``ru_maxrss``: the model, the image, the tiles and the
outputs together, including Python and torch themselves) and wall time are printed.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import torch

from bench.recipe_runs import predict_nested_unet, train_nested_unet
from recipes.nested_unet_options import ARCHITECTURES
from trainer.callbacks.checkpoint import CHECKPOINT_BEST
from trainer.native import cpu_features, describe_cpu
from trainer_datasets import SyntheticNuclei, write_png_file


def large_image(side: int) -> torch.Tensor:
    """A uint8 (3, side, side) mosaic of synthetic nuclei fields of 256x256."""
    cells = -(-side // 256)
    fields = SyntheticNuclei(cells * cells, image_size=256, seed=0).images
    mosaic = fields.view(cells, cells, 3, 256, 256).permute(2, 0, 3, 1, 4).reshape(3, cells * 256, cells * 256)
    return mosaic[:, :side, :side].contiguous()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--side", type=int, default=4096, help="image side in pixels (default: %(default)s)")
    parser.add_argument(
        "--arch", choices=ARCHITECTURES, action="append", help="architecture (repeatable; default: both)"
    )
    parser.add_argument("--tile", type=int, default=None, help="predict's --tile (default: its own)")
    args = parser.parse_args(argv)
    features = cpu_features()
    print(
        f"CPU: {describe_cpu(features)} ({', '.join(k for k, v in features.items() if v) or 'none'}); "
        f"{torch.get_num_threads()} threads"
    )
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        write_png_file(large_image(args.side), work / "images" / "large.png")
        SyntheticNuclei(8, image_size=32, seed=1).save(work / "tiles")
        for arch in args.arch or ARCHITECTURES:
            run_dir = work / f"run-{arch}"
            train_nested_unet(work / "tiles", run_dir, arch, 1, "--precision", "32")
            tile = [] if args.tile is None else ["--tile", str(args.tile)]
            start = time.perf_counter()
            predict_nested_unet(run_dir / CHECKPOINT_BEST, work / "images", work / f"out-{arch}", *tile)
            seconds = time.perf_counter() - start
            # Children are run one at a time, so the largest peak so far is this one's (ru_maxrss in KiB on Linux).
            peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
            print(
                f"{arch:>10}: {args.side}x{args.side} image predicted in {seconds:.1f} s, "
                f"peak resident memory {peak:.2f} GiB"
            )


if __name__ == "__main__":
    main()
