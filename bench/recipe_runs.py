"""Child processes of this checkout for the benchmarks: a command's output, a recipe's training and predict.

Standard library only, so that a benchmark whose own process must not load torch can use it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.processes import ROOT, checkout_env

#: ``python -m recipes.nested_unet``, in the interpreter of this process.
NESTED_UNET = [sys.executable, "-m", "recipes.nested_unet"]


def run_checkout(command: list[str], env: dict[str, str] | None = None) -> str:
    """Run `command` from the repository root in `env` (default: `checkout_env`) and return its
    standard output; when it fails, exit with the command and the end of its error output."""
    result = subprocess.run(
        command, cwd=ROOT, env=checkout_env() if env is None else env, capture_output=True, text=True
    )
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
    return result.stdout


def train_nested_unet(data: Path, run_dir: Path, arch: str, epochs: int, *options: str) -> None:
    """Train ``python -m recipes.nested_unet`` on the folder `data` into `run_dir`, with `options`."""
    run_checkout(
        [
            *NESTED_UNET,
            "--data",
            str(data),
            "--arch",
            arch,
            "--epochs",
            str(epochs),
            "--log-dir",
            str(run_dir),
            *options,
        ]
    )


def predict_nested_unet(checkpoint: Path, images: Path, out: Path, *options: str) -> None:
    """Predict the folder `images` into `out` on the CPU with ``python -m recipes.nested_unet
    predict`` and `checkpoint`, with `options`."""
    where = ["--checkpoint", str(checkpoint), "--images", str(images), "--out", str(out)]
    run_checkout([*NESTED_UNET, "predict", *where, "--device", "cpu", *options])
