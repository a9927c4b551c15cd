"""The project's import names live beside other packages: Hugging Face's `datasets` included."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.helpers import tiny_args
from tests.processes import ROOT

# Both `datasets` packages in one process, then the recipe's command line (its arguments) in it.
BOTH = """
import sys
from datasets import load_dataset
from trainer_datasets import SyntheticNuclei
print(load_dataset("nuclei"), len(SyntheticNuclei(2, image_size=16)), flush=True)
from recipes import nested_unet
from recipes.cli import run_cli
sys.exit(run_cli(nested_unet.main, sys.argv[1:]))
"""


@pytest.fixture
def stand_in(tmp_path):
    """A package named `datasets` ahead of site-packages, as an installed Hugging Face `datasets` would be."""
    package = tmp_path / "site" / "datasets"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("def load_dataset(name):\n    return f'stand-in {name}'\n")
    return dict(os.environ, PYTHONPATH=str(package.parent))


@pytest.mark.parametrize("where", ["checkout", "another folder"])
def test_hugging_face_datasets_and_this_projects_datasets_in_one_process(tmp_path, stand_in, where):
    """Started in the checkout (whose datasets/ folder must not hide the other package) or in
    another folder (the installed project), one process imports Hugging Face's `datasets` and
    this project's `trainer_datasets`, then trains the segmentation recipe."""
    cwd = ROOT if where == "checkout" else tmp_path
    run = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-c", BOTH, *tiny_args(log_dir=run)],
        cwd=cwd,
        env=stand_in,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines()[0] == "stand-in nuclei 2"
    assert (run / "last.pt").is_file()
