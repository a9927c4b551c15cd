"""Every Python code block in the README and the docs runs as written."""

from __future__ import annotations

import contextlib
import io
import re
import runpy
import shlex
import signal
import sys
from pathlib import Path

import pytest
import torch

from tests.processes import RecipeProcess
from trainer.checkpoint import load_checkpoint
from trainer_datasets import read_label_map, write_png_file

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "recipes").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


# The blocks that assert a bound on a number training produced: the loss below 0.05 before epoch 49.
NUMERICS_BLOCKS = {"docs/extending.md#0"}


def python_blocks():
    for doc in DOCS:
        for index, match in enumerate(BLOCK.finditer(doc.read_text())):
            name = f"{doc.relative_to(ROOT)}#{index}"
            yield pytest.param(match.group(1), id=name, marks=[pytest.mark.numerics] if name in NUMERICS_BLOCKS else [])


@pytest.mark.parametrize("code", list(python_blocks()))
def test_code_block_runs(code, tmp_path, monkeypatch):
    """The block runs as written, in an empty folder, its own asserts included."""
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "<doc>", "exec", dont_inherit=True), {"__name__": "__doc_example__"})


def test_readme_starts_with_the_two_commands():
    """The README opens with the commands that train and test."""
    lines = (ROOT / "README.md").read_text().splitlines()
    block = lines[lines.index("```sh") + 1 : lines.index("```sh") + 3]
    assert [line.split("#")[0].strip() for line in block] == ["make run", "make test"]


def extending_block(marker: str) -> str:
    """The code block of docs/extending.md that holds `marker`."""
    text = (ROOT / "docs" / "extending.md").read_text()
    return next(block for block in BLOCK.findall(text) if marker in block)


def resume_line(output: str) -> str:
    """The command after "resume with: " in `output` (exactly one such line)."""
    lines = [line.split("resume with: ", 1)[1] for line in output.splitlines() if "resume with: " in line]
    assert len(lines) == 1, output
    return lines[0]


def run_script(command: list[str], monkeypatch) -> int | str | None:
    """``python FILE ARGS`` (`command`, without ``python``) in this process, as the interpreter runs a
    script: FILE as ``__main__``, ``sys.argv`` the command; the code it exits with (None if it returns)."""
    monkeypatch.setattr(sys, "argv", command)
    try:
        runpy.run_path(command[0], run_name="__main__")
    except SystemExit as exc:
        return exc.code
    return None


#: blobs.py's arguments: 600 steps (3 epochs of 200). With --checkpoint-every a stop saves the position
#: reached, which its shuffled loader alone could not resume from inside an epoch.
BLOBS_RUN = "--epochs 3 --samples 8000 --checkpoint-every 40 --precision 32 --channels-last off --threads 1".split()


@pytest.fixture
def torch_threads():
    """Restores torch's thread count, which a recipe run in this process sets (`--threads`)."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.numerics
# blobs.py's shuffled DataLoader cannot start an epoch at a given batch: the resume warns that it goes on
# at the end of the epoch its step checkpoint is in.
@pytest.mark.filterwarnings("ignore:.*DataLoader cannot start an epoch at a given batch:RuntimeWarning")
def test_a_recipe_file_outside_the_package_resumes_with_the_printed_command_and_its_model_loads(
    tmp_path, monkeypatch, capsys, torch_threads
):
    """The recipe file of docs/extending.md, run as a script (``python blobs.py``) and stopped by SIGTERM
    as its first epoch starts, saves its position and prints the command that resumes it: the same file
    with ``--resume``. That command finishes the run (its accuracy well above chance) and the docs'
    predict_blobs.py rebuilds the trained model from best.pt alone. The stop needs a real process; the
    printed command and the prediction run here, each file as ``__main__`` with its command line."""
    script, run_dir = tmp_path / "blobs.py", tmp_path / "run"
    script.write_text(extending_block("class Blobs(Recipe"))
    first = RecipeProcess([*BLOBS_RUN, "--log-dir", str(run_dir)], script=script, timeout=120)
    assert first.poll_until(lambda: "epoch 1/3" in first.stderr), first.stderr  # training, SIGTERM handled
    assert first.stop(signal.SIGTERM) == 128 + signal.SIGTERM, first.stderr
    command = resume_line(first.stderr)
    assert command == shlex.join(["python", str(script), "--resume", str(run_dir)])

    program, *script_command = shlex.split(command)
    assert program == "python"
    assert run_script(script_command, monkeypatch) == 0, capsys.readouterr().err[-3000:]
    state = load_checkpoint(run_dir / "last.pt")
    assert state["epochs_done"] == 3 and state["config"]["samples"] == 8000
    assert state["history"][-1]["val_acc"] > 0.9
    assert (run_dir / "best.pt").is_file()

    # The generic loader rebuilds the trained model from its checkpoint, outside the recipe.
    predictor = tmp_path / "predict_blobs.py"
    predictor.write_text(extending_block("load_model(sys.argv[1])"))
    capsys.readouterr()
    assert run_script([str(predictor), str(run_dir / "best.pt")], monkeypatch) is None
    assert capsys.readouterr().out == "[0, 1, 2, 3]\n"


#: shapes.py's arguments: 6 epochs of 16 steps, float32 (a bound on what it learns follows).
SHAPES_RUN = "--precision 32 --channels-last off --threads 1".split()


@pytest.mark.numerics
def test_a_segmentation_recipe_file_records_label_maps_resumes_and_predicts_them(
    tmp_path, monkeypatch, capsys, torch_threads, fake_clock
):
    """The segmentation recipe of docs/extending.md, run as a script (``python shapes.py``) and
    stopped by ``--max-time``, prints the command that resumes it, which finishes the run. Its
    checkpoints record the data's classes and the mask_type its loss trains ('labels'), which the
    recipe never gave. Its own ``export`` writes ``best.pt``'s weights and description, and its own
    ``predict`` (a `SegmentationRecipe`'s) writes from that file alone one label map per image (no
    mask per class) that finds the squares and discs of new images."""
    script, run_dir = tmp_path / "shapes.py", tmp_path / "run"
    script.write_text(extending_block("class Shapes(SegmentationRecipe"))
    fake_clock.tick = 0.4  # the limit of 1 s passes within a few of the 96 steps
    assert run_script([str(script), *SHAPES_RUN, "--max-time", "00:00:01", "--log-dir", str(run_dir)], monkeypatch) == 0
    command = resume_line(capsys.readouterr().out)
    assert command == shlex.join(["python", str(script), "--resume", str(run_dir)])
    assert load_checkpoint(run_dir / "last.pt")["global_step"] < 16
    fake_clock.tick = 0.0

    program, *script_command = shlex.split(command)
    assert run_script(script_command, monkeypatch) == 0, capsys.readouterr().err[-3000:]
    state = load_checkpoint(run_dir / "best.pt")
    assert state["data"] == {
        "classes": ["background", "square", "disc"],
        "image_size": None,
        "input_channels": 3,
        "mask_type": "labels",
    }
    assert load_checkpoint(run_dir / "last.pt")["epochs_done"] == 6

    shapes = runpy.run_path(str(script))["shapes"]  # the example's own data, new images
    images, labels = shapes(4, side=32, seed=99)
    for index, image in enumerate(images):
        write_png_file(image.mul(255).round().to(torch.uint8), tmp_path / "pictures" / f"{index}.png")
    exported, out = tmp_path / "shapes.pt", tmp_path / "label_maps"
    assert (
        run_script(
            [str(script), "export", "--checkpoint", str(run_dir / "best.pt"), "--out", str(exported)], monkeypatch
        )
        == 0
    )
    assert "optimizer" not in load_checkpoint(exported)
    predict = ["predict", "--checkpoint", str(exported), "--images", str(tmp_path / "pictures"), "--out", str(out)]
    assert run_script([str(script), *predict], monkeypatch) == 0
    assert sorted(path.name for path in out.iterdir()) == [f"{index}.png" for index in range(4)]
    predicted = torch.stack([read_label_map(out / f"{index}.png") for index in range(4)])
    ious = [
        ((predicted == c) & (labels == c)).sum().item() / ((predicted == c) | (labels == c)).sum().item()
        for c in (1, 2)
    ]
    print(f"measured: IoU of the squares {ious[0]:.4f}, of the discs {ious[1]:.4f}")
    assert min(ious) > 0.8


def test_architecture_shows_what_describe_prints(tmp_path, monkeypatch):
    """docs/architecture.md shows exactly what its `describe()` example prints."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    example = re.search(r"^```python\n(.*?trainer\.describe\(\)\n)```\n\nprints\n\n```\n(.*?)```", text, re.S | re.M)
    monkeypatch.chdir(tmp_path)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(example.group(1), "<architecture.md>", "exec"), {"__name__": "__doc_example__"})
    assert out.getvalue() == example.group(2)
