"""The project's import names live beside other packages: Hugging Face's `datasets` included."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BOTH = (
    "from datasets import load_dataset; from trainer_datasets import SyntheticNuclei; "
    "print(load_dataset('nuclei'), len(SyntheticNuclei(2, image_size=16)))"
)


@pytest.fixture
def stand_in(tmp_path):
    """A package named `datasets` ahead of site-packages, as an installed Hugging Face `datasets` would be."""
    package = tmp_path / "site" / "datasets"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("def load_dataset(name):\n    return f'stand-in {name}'\n")
    return dict(os.environ, PYTHONPATH=str(package.parent))


@pytest.mark.parametrize("where", ["checkout", "another folder"])
def test_hugging_face_datasets_and_this_projects_datasets_in_one_process(tmp_path, stand_in, where):
    cwd = ROOT if where == "checkout" else tmp_path
    result = subprocess.run(
        [sys.executable, "-c", BOTH], cwd=cwd, env=stand_in, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout == "stand-in nuclei 2\n"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "recipes.nested_unet",
            "--base-filters",
            "4",
            "--train-samples",
            "4",
            "--val-samples",
            "2",
            "--image-size",
            "16",
            "--batch-size",
            "2",
            "--epochs",
            "1",
            "--precision",
            "32",
            "--channels-last",
            "off",
            "--log-dir",
            str(tmp_path / "run"),
        ],
        cwd=cwd,
        env=stand_in,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert (tmp_path / "run" / "last.pt").is_file()
