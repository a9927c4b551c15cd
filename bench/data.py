"""Segmentation folders in memory and streamed: time to the first step, peak memory, throughput.

    python -m bench.data [--images 20000] [--size 256] [--folder PATH] [--modes memory,stream]
                         [--workers 0,1,2] [--steps 40] [--batch-size 8]

Builds a generated folder of `--images` RGB PNG images of `--size` squared with one mask class
(kept in `--folder` when given and reused by later runs with the same numbers; a temporary folder
otherwise). Each measurement runs in a fresh Python process, so that its peak memory (the
resident set's high-water mark, ``getrusage``) is its own:

- start: the seconds from `split_segmentation` (augmented, as the recipe does; imports not
  counted) to the end of one training step of a one-convolution model, in each mode; streaming
  twice, first with an empty index folder (every file checked) then with the index that start wrote
  (nothing decoded before the step);
- throughput: training samples per second of the same model over `--steps` steps after 3 warm-up
  steps, with each `--workers` count. The model is deliberately tiny, so that the figure is what
  the data side can deliver, not the network's speed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from tests.processes import ROOT, checkout_env

# Runs in a fresh process: argv[1] is a JSON dict of the settings; prints one JSON line of results.
CHILD = """
import json, resource, sys, time
import torch
from torch.utils.data import DataLoader
from trainer import ResumableSampler
from trainer_datasets import split_segmentation
settings = json.loads(sys.argv[1])
torch.set_num_threads(1)
started = time.perf_counter()
train, _ = split_segmentation(settings["folder"], seed=0, mode=settings["mode"], index_dir=settings["index_dir"])
loader = DataLoader(train, batch_size=settings["batch_size"], sampler=ResumableSampler(train, seed=0),
                    num_workers=settings["workers"], drop_last=True)
model = torch.nn.Conv2d(3, train.num_classes, 3, padding=1)
optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
loss_fn = torch.nn.BCEWithLogitsLoss()
result = {"dataset": type(train).__name__}
steps, epoch = 0, 0
def batches():
    global epoch
    while True:  # as many epochs as the steps need
        loader.sampler.set_epoch(epoch)
        train.set_epoch(epoch)
        yield from loader
        epoch += 1
for image, mask in batches():
    optimizer.zero_grad()
    loss_fn(model(image), mask).backward()
    optimizer.step()
    steps += 1
    if steps == 1:
        result["first_step_s"] = time.perf_counter() - started
        if not settings["steps"]:
            break
    if steps == 3:
        timed = time.perf_counter()
    if steps == 3 + settings["steps"]:
        result["samples_per_s"] = settings["steps"] * settings["batch_size"] / (time.perf_counter() - timed)
        break
result["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps(result))
"""


def generate_folder(root: Path, images: int, size: int) -> Path:
    """A segmentation folder of `images` RGB PNGs of `size` squared with one mask class: a few
    flat-coloured disks on a smooth background (small files, as real microscopy PNGs are); kept
    when `root` already holds exactly that many images of that size."""
    done = root / f"{images}x{size}.done"
    if done.is_file():
        return root
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    ys, xs = np.mgrid[0:size, 0:size]
    width = max(5, len(str(images - 1)))
    for index in range(images):
        mask = np.zeros((size, size), dtype=bool)
        for _ in range(int(rng.integers(3, 9))):
            cy, cx, r = rng.integers(0, size, 2).tolist() + [int(rng.integers(size // 20 + 1, size // 8 + 2))]
            mask |= (ys - cy) ** 2 + (xs - cx) ** 2 <= r * r
        background = (xs * 40 // size + rng.integers(10, 60)).astype(np.uint8)
        image = np.stack([np.where(mask, int(rng.integers(120, 255)), background) for _ in range(3)], -1)
        name = f"{index:0{width}d}.png"
        Image.fromarray(image.astype(np.uint8)).save(root / "images" / name, compress_level=1)
        Image.fromarray(mask.astype(np.uint8) * 255).save(root / "masks" / name, compress_level=1)
    done.touch()
    return root


def measure(settings: dict) -> dict:
    """Run `CHILD` with `settings` in a fresh process; its results."""
    result = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(settings)],
        cwd=ROOT,
        env=checkout_env(OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise SystemExit(f"error: the {settings['mode']} measurement failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the benchmark and print its tables; returns the measurements."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=20000, help="images in the generated folder")
    parser.add_argument("--size", type=int, default=256, help="side of the square images")
    parser.add_argument("--folder", help="keep the generated folder here and reuse it (default: a temporary one)")
    parser.add_argument("--modes", default="memory,stream", help="comma-separated: memory, stream")
    parser.add_argument("--workers", default="0,1,2", help="comma-separated worker counts for the throughput")
    parser.add_argument("--steps", type=int, default=40, help="timed training steps per throughput figure")
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    if not set(modes) <= {"memory", "stream"} or args.images < 2 or args.size < 16:
        parser.error("--modes takes memory and/or stream; --images at least 2; --size at least 16")
    workers = [int(w) for w in args.workers.split(",") if w]

    with tempfile.TemporaryDirectory(prefix="bench-data-") as scratch:
        folder = generate_folder(Path(args.folder or Path(scratch) / "folder"), args.images, args.size)
        index_dir = str(Path(scratch) / "index")
        common = {"folder": str(folder), "index_dir": index_dir, "batch_size": args.batch_size}
        rows = []
        print(f"{args.images} images of {args.size}x{args.size}, one mask class, in {folder}")
        print(f"{'start':<28}{'time to first step':>20}{'peak memory':>14}")
        starts = [
            (mode, label)
            for mode in modes
            for label in (("memory",) if mode == "memory" else ("stream, first start", "stream, index reused"))
        ]
        for mode, label in starts:
            found = measure({**common, "mode": mode, "workers": 0, "steps": 0})
            rows.append({"what": label, **found})
            print(f"{label:<28}{found['first_step_s']:>18.1f} s{found['peak_mb']:>11.0f} MB", flush=True)
        print(f"{'throughput':<28}{'samples/s':>20}")
        for mode in modes:
            for count in workers:
                found = measure({**common, "mode": mode, "workers": count, "steps": args.steps})
                rows.append({"what": f"{mode}, {count} workers", **found})
                print(f"{mode + f', {count} workers':<28}{found['samples_per_s']:>20.1f}", flush=True)
    return rows


if __name__ == "__main__":
    main()
