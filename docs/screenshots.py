"""Make the TensorBoard screenshots of docs/tensorboard.md for both recipes with headless Chromium.

For each recipe this trains a fresh short run in a temporary directory, serves it with
``python -m trainer.board``, and captures five TensorBoard tabs with headless Chromium:

* ``nested_unet``: ``python -m recipes.nested_unet`` on 64 training and 16 validation images of the
  built-in synthetic nuclei, 3 epochs (NestedUNet, batch size 4);
* ``fashion_mnist``: ``python -m recipes.fashion_mnist`` for 2 epochs on small Fashion-MNIST-like
  IDX files (960 training, 160 test images) written with ``trainer_datasets``.

The tabs are Time Series (``#timeseries``), Custom Scalars (``#custom_scalars``), Images
(``#images``), Graphs (``#graphs``) and HParams (``#hparams``), the plugin names TensorBoard 2.x
uses in its URL fragment. The PNGs go to ``docs/images/<recipe>-<tab>.png``, e.g.
``docs/images/nested_unet-timeseries.png``, and their paths are printed at the end.

What the captures show is what a user sees first on TensorBoard's default settings: a fresh
Chromium profile, no stored settings, no pinned cards, no filter, a 1400 x 1000 window; where a
click is needed to see more (a collapsed group, an expanded graph node), docs/tensorboard.md says so. Two
things make the pages finish within Chromium's virtual time budget without changing what they
show: charts are drawn as SVG (TensorBoard's ``?forceSVG=true``) rather than by a WebGL worker,
and a run is captured only once the server lists it and its scalar tags have stopped changing.

Needs: the project's virtual environment (PyTorch, TensorBoard, Pillow) and the Debian
``chromium`` package (``/usr/bin/chromium``); nothing is installed, and without Chromium the
script prints one line saying so and exits with status 2. No network access is needed.

Run it from the repository root (``docs`` imports as a namespace package)::

    .venv/bin/python -m docs.screenshots                     # both recipes: about 1.5 min on 2 idle CPU cores
    .venv/bin/python -m docs.screenshots --recipes fashion_mnist
    .venv/bin/python -m docs.screenshots --work-dir /tmp/shots   # keep the runs; rerun reuses them

``python docs/screenshots.py`` works as well. Most of the time goes to training NestedUNet
(48 steps, half a minute on an idle machine); the ten captures take about half a minute.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "docs" / "images"
CHROMIUM_PATHS = ("/usr/bin/chromium", "chromium")
RECIPES = ("nested_unet", "fashion_mnist")

#: TensorBoard tab (its URL fragment) -> (window width, window height).
TABS: dict[str, tuple[int, int]] = {
    "timeseries": (1400, 1000),
    "custom_scalars": (1400, 1000),
    "images": (1400, 1000),
    "graphs": (1400, 1000),
    "hparams": (1400, 1000),
}

#: The largest PNG written as full colour; larger ones are reduced to a 256-colour palette.
MAX_PNG_BYTES = 250_000

#: The line ``python -m trainer.board`` prints once it serves: ``TensorBoard on PATH: URL``.
URL_LINE = re.compile(r"^TensorBoard on .*: (http://\S+)\s*$")


class ScreenshotError(RuntimeError):
    """A step (training, serving or capturing) failed; the message says which and why."""


def find_chromium() -> str | None:
    """The Chromium executable: ``/usr/bin/chromium`` or ``chromium`` on PATH; None if neither."""
    for name in CHROMIUM_PATHS:
        found = shutil.which(name)
        if found:
            return found
    return None


def headless_chromium(chromium: str, profile: Path, width: int, height: int, *flags: str) -> list[str]:
    """The command line of headless `chromium` (`find_chromium`) with the profile folder `profile`,
    in a `width` x `height` window, without scroll bars, then `flags`."""
    return [
        chromium,
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        f"--window-size={width},{height}",
        *flags,
    ]


def child_env() -> dict[str, str]:
    """The environment for the recipe and board subprocesses: PYTHONPATH holds the repo and datasets/."""
    env = dict(os.environ)
    paths = [str(ROOT), str(ROOT / "datasets")]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_recipe(args: list[str], log: Path) -> None:
    """Run ``python ARGS`` from the repo root with its output in `log`; raise `ScreenshotError` if it fails."""
    print("$ python " + " ".join(args), flush=True)
    start = time.monotonic()
    with open(log, "w") as out:
        code = subprocess.call([sys.executable, *args], cwd=ROOT, env=child_env(), stdout=out, stderr=subprocess.STDOUT)
    if code != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-5:]
        raise ScreenshotError(f"`python {' '.join(args)}` exited with {code}:\n" + "\n".join(tail))
    print(f"  done in {time.monotonic() - start:.0f} s", flush=True)


def train_nested_unet(work: Path) -> Path:
    """A short NestedUNet run on the built-in synthetic nuclei in ``work/nested_unet``; returns its directory.

    An existing run there (one with ``metrics.csv``) is reused.
    """
    run_dir = work / "nested_unet"
    if not reuse(run_dir):
        run_recipe(
            [
                "-m",
                "recipes.nested_unet",
                "--train-samples",
                "64",
                "--val-samples",
                "16",
                "--epochs",
                "3",
                "--batch-size",
                "4",
                "--log-dir",
                str(run_dir),
            ],
            work / "nested_unet.log",
        )
    return run_dir


def reuse(run_dir: Path) -> bool:
    """Whether `run_dir` holds a finished run (one with ``metrics.csv``) to reuse; if not, it is
    cleared for a new one."""
    if (run_dir / "metrics.csv").is_file():
        print(f"reusing {run_dir}")
        return True
    shutil.rmtree(run_dir, ignore_errors=True)
    return False


def write_fashion_idx(data_dir: Path) -> None:
    """Small learnable Fashion-MNIST-like IDX files (960 training, 160 test images) under `data_dir`."""
    for folder in (ROOT, ROOT / "datasets"):
        if str(folder) not in sys.path:
            sys.path.insert(0, str(folder))
    from trainer_datasets import make_learnable_fashion_like, write_fashion_mnist_idx

    train_images, train_labels = make_learnable_fashion_like(960, seed=0)
    test_images, test_labels = make_learnable_fashion_like(160, seed=1)
    write_fashion_mnist_idx(data_dir, train_images, train_labels, train=True)
    write_fashion_mnist_idx(data_dir, test_images, test_labels, train=False)


def train_fashion_mnist(work: Path) -> Path:
    """A short tutorial-recipe run on small IDX files in ``work/fashion_mnist``; returns its directory.

    Batch size 8 and learning rate 0.02 (instead of the tutorial's 4 and 0.001) make the two
    epochs reach a high accuracy, so the charts and prediction figures show learning. An
    existing run there (one with ``metrics.csv``) is reused.
    """
    run_dir = work / "fashion_mnist"
    if reuse(run_dir):
        return run_dir
    data_dir = work / "idx"
    write_fashion_idx(data_dir)
    run_recipe(
        [
            "-m",
            "recipes.fashion_mnist",
            "--data-dir",
            str(data_dir),
            "--log-dir",
            str(run_dir),
            "--epochs",
            "2",
            "--log-every",
            "20",
            "--batch-size",
            "8",
            "--lr",
            "0.02",
        ],
        work / "fashion_mnist.log",
    )
    return run_dir


TRAINERS = {"nested_unet": train_nested_unet, "fashion_mnist": train_fashion_mnist}


class Board:
    """``python -m trainer.board RUN_DIR`` as a subprocess; `url` once it serves, `stop()` ends it."""

    def __init__(self, run_dir: Path, timeout: float = 120.0) -> None:
        self.run_dir = run_dir
        self.process = subprocess.Popen(
            [sys.executable, "-m", "trainer.board", str(run_dir)],
            cwd=ROOT,
            env=child_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.output: list[str] = []
        found = threading.Event()
        self.url = ""

        def read() -> None:
            assert self.process.stdout is not None
            for line in self.process.stdout:
                self.output.append(line)
                match = URL_LINE.match(line)
                if match and not self.url:
                    self.url = match.group(1).rstrip("/") + "/"
                    found.set()
            found.set()

        threading.Thread(target=read, daemon=True).start()
        if not found.wait(timeout) or not self.url:
            self.stop()
            raise ScreenshotError(f"`python -m trainer.board {run_dir}` printed no URL:\n" + "".join(self.output))

    def stop(self) -> None:
        """End the server as Ctrl-C does (so it removes its temporary link folder), then SIGTERM, SIGKILL."""
        for end in (lambda: self.process.send_signal(signal.SIGINT), self.process.terminate, self.process.kill):
            if self.process.poll() is not None:
                return
            end()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                pass


def get_json(url: str, timeout: float = 10.0) -> Any:
    """The JSON that `url` answers with."""
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.load(response)


def wait_until_loaded(url: str, run: str, timeout: float = 120.0) -> None:
    """Wait until TensorBoard at `url` lists `run` in ``/data/runs`` and its scalar tags stop changing."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            runs = get_json(url + "data/runs")
            tags = get_json(url + "data/plugin/scalars/tags") if run in runs else None
        except (OSError, ValueError):
            tags = None
        if tags and tags.get(run) and tags == last:
            return
        last = tags
        time.sleep(1.0)
    raise ScreenshotError(f"TensorBoard at {url} did not list the run {run!r} within {timeout:.0f} s")


def capture(chromium: str, url: str, out: Path, width: int, height: int, budget_ms: int, profile: Path) -> None:
    """Screenshot `url` with headless Chromium into `out` (PNG), in a `width` x `height` window.

    `budget_ms` is Chromium's virtual time budget: how long the page may load and run scripts
    before the capture. `profile` is a fresh Chromium profile folder. Tries twice.
    """
    command = headless_chromium(
        chromium, profile, width, height, f"--virtual-time-budget={budget_ms}", f"--screenshot={out}", url
    )
    error = ""
    for _ in range(2):
        out.unlink(missing_ok=True)
        shutil.rmtree(profile, ignore_errors=True)
        try:
            result = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=180)
        except subprocess.TimeoutExpired:
            error = "timed out after 180 s"
            continue
        if out.is_file() and out.stat().st_size > 0:
            return
        error = result.stdout.strip()[-2000:]
    raise ScreenshotError(f"chromium made no screenshot of {url}: {error}")


def trim_bottom(image: Any, margin: int = 24, min_height: int = 360) -> Any:
    """`image` without the rows at its bottom that repeat its last row, keeping `margin` of them."""
    rgb = image.convert("RGB")
    width, height = rgb.size
    last = rgb.crop((0, height - 1, width, height)).tobytes()
    bottom = height
    while bottom > min_height and rgb.crop((0, bottom - 1, width, bottom)).tobytes() == last:
        bottom -= 1
    return rgb.crop((0, 0, width, min(height, bottom + margin)))


def save_png(image: Any, path: Path) -> None:
    """Save `image` as an optimised PNG; as a 256-colour palette one if larger than `MAX_PNG_BYTES`."""
    image.save(path, optimize=True)
    if path.stat().st_size > MAX_PNG_BYTES:
        image.quantize(colors=256, dither=0).save(path, optimize=True)


def shoot_run(recipe: str, run_dir: Path, chromium: str, out_dir: Path, budget_ms: int, work: Path) -> list[Path]:
    """Serve `run_dir` and capture every tab in `TABS` to ``out_dir/<recipe>-<tab>.png``; returns the paths."""
    from PIL import Image

    board = Board(run_dir)
    written: list[Path] = []
    try:
        wait_until_loaded(board.url, run_dir.name)
        base = f"{board.url}?forceSVG=true"
        print(f"TensorBoard for {recipe}: {board.url}", flush=True)
        for tab, (width, height) in TABS.items():
            raw = work / f"{recipe}-{tab}.raw.png"
            capture(chromium, f"{base}#{tab}", raw, width, height, budget_ms, work / "chromium-profile")
            path = out_dir / f"{recipe}-{tab}.png"
            with Image.open(raw) as image:
                save_png(trim_bottom(image), path)
            written.append(path)
    finally:
        board.stop()
    return written


def build_parser() -> argparse.ArgumentParser:
    """The command-line options."""
    parser = argparse.ArgumentParser(
        prog="python -m docs.screenshots",
        description="Make the TensorBoard screenshots of docs/tensorboard.md with headless Chromium.",
    )
    parser.add_argument(
        "--recipes",
        nargs="+",
        choices=RECIPES,
        default=list(RECIPES),
        help="recipes to train and capture (default: both)",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for the PNGs (default: docs/images)")
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=None,
        help="train into this folder and keep it; runs already there are reused "
        "(default: a temporary folder, removed at the end)",
    )
    parser.add_argument(
        "--budget-ms",
        type=int,
        default=15000,
        help="Chromium's virtual time budget per page in ms (default: %(default)s)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Train, serve and capture; print the PNGs written. Returns the exit code (2: no Chromium)."""
    args = build_parser().parse_args(argv)
    chromium = find_chromium()
    if chromium is None:
        print(
            "error: headless screenshots need Chromium at /usr/bin/chromium: install the Debian `chromium` package",
            file=sys.stderr,
        )
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    temporary = None
    if args.work_dir is None:
        temporary = tempfile.mkdtemp(prefix="docs-screenshots-")
        work = Path(temporary)
    else:
        work = args.work_dir.resolve()
        work.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    try:
        for recipe in args.recipes:
            run_dir = TRAINERS[recipe](work)
            written += shoot_run(recipe, run_dir, chromium, args.out, args.budget_ms, work)
    except ScreenshotError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)
    for path in written:
        shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
        print(f"{shown}  ({path.stat().st_size // 1024} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
