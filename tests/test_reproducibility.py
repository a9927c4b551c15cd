"""Same command, same seed, same machine, same weights: with the default (automatic) precision,
layout and thread count, beside a process that keeps a CPU busy the whole time."""

from __future__ import annotations

import subprocess
import sys

import torch

from tests.processes import ROOT, checkout_env
from trainer.checkpoint import load_checkpoint

TINY = [
    "--base-filters",
    "4",
    "--train-samples",
    "8",
    "--val-samples",
    "4",
    "--image-size",
    "32",
    "--batch-size",
    "4",
    "--epochs",
    "2",
    "--seed",
    "3",
]


def train(run_dir, cache_dir) -> str:
    """Run the default recipe (no --precision, --channels-last or --threads) and return its stdout."""
    done = subprocess.run(
        [sys.executable, "-m", "recipes.nested_unet", *TINY, "--log-dir", str(run_dir)],
        cwd=ROOT,
        env=checkout_env(TRAINER_CACHE_DIR=str(cache_dir)),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_two_default_runs_beside_a_busy_cpu_give_identical_weights(tmp_path):
    burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        first = train(tmp_path / "a", tmp_path / "cache")  # measures the layout under load, keeps the result
        second = train(tmp_path / "b", tmp_path / "cache")
    finally:
        burner.kill()
        burner.wait()
    choice = [line for line in first.splitlines() if line.startswith("precision:")]
    assert choice and "threads:" in choice[0], first
    assert "measured once on this machine" in second and str(tmp_path / "cache") in second
    a = load_checkpoint(tmp_path / "a" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "b" / "last.pt")["model"]
    assert a.keys() == b.keys()
    assert all(torch.equal(a[key], b[key]) for key in a)
