"""Same command, same seed, same machine, same weights: with the default (automatic) precision,
layout and thread count, beside a process that keeps a CPU busy the whole time."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from tests.helpers import tiny_args
from tests.processes import ROOT, checkout_env
from trainer.checkpoint import load_checkpoint

# The recipe's quickest run with the default (automatic) precision, layout and thread count: a
# different thread count alone changes its weights (reductions split otherwise).
DEFAULTS = tiny_args(precision=None, channels_last=None, seed=3)


def train(run_dir, cache_dir) -> str:
    """Run the default recipe (no --precision, --channels-last or --threads) and return its stdout."""
    done = subprocess.run(
        [sys.executable, "-m", "recipes.nested_unet", *DEFAULTS, "--log-dir", str(run_dir)],
        cwd=ROOT,
        env=checkout_env(TRAINER_CACHE_DIR=str(cache_dir)),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_two_default_runs_beside_a_busy_cpu_give_identical_weights(tmp_path):
    """Two runs of the same command beside a busy CPU: the first measures the precision and
    layout under load and prints its choice with the thread count, the second reads the choice
    kept, and both end with bit-identical weights."""
    burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        first = train(tmp_path / "a", tmp_path / "cache")  # measures the layout under load, keeps the result
        second = train(tmp_path / "b", tmp_path / "cache")
    finally:
        burner.kill()
        burner.wait()
    choice = [line for line in first.splitlines() if line.startswith("precision:")]
    assert choice and " thread" in choice[0], first
    assert "from cache" in second
    reason = json.loads((tmp_path / "b" / "config.json").read_text())["precision_reason"]
    assert "measured once on this machine" in reason and str(tmp_path / "cache") in reason
    a = load_checkpoint(tmp_path / "a" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "b" / "last.pt")["model"]
    assert a.keys() == b.keys()
    assert all(torch.equal(a[key], b[key]) for key in a)
