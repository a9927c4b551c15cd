"""Every Python code block in the README and the docs runs as written."""

from __future__ import annotations

import contextlib
import io
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.processes import RecipeProcess, checkout_env
from trainer.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "recipes").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def python_blocks():
    for doc in DOCS:
        for index, match in enumerate(BLOCK.finditer(doc.read_text())):
            yield pytest.param(match.group(1), id=f"{doc.relative_to(ROOT)}#{index}")


@pytest.mark.parametrize("code", list(python_blocks()))
def test_code_block_runs(code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "<doc>", "exec", dont_inherit=True), {"__name__": "__doc_example__"})


def test_readme_starts_with_the_two_commands():
    lines = (ROOT / "README.md").read_text().splitlines()
    block = lines[lines.index("```sh") + 1 : lines.index("```sh") + 3]
    assert [line.split("#")[0].strip() for line in block] == ["make run", "make test"]


def recipe_file_of_the_docs() -> str:
    """The recipe file docs/extending.md shows (the block that defines ``class Blobs``)."""
    text = (ROOT / "docs" / "extending.md").read_text()
    return next(block for block in BLOCK.findall(text) if "class Blobs(Recipe" in block)


def resume_line(output: str) -> str:
    """The command after "resume with: " in `output` (exactly one such line)."""
    lines = [line.split("resume with: ", 1)[1] for line in output.splitlines() if "resume with: " in line]
    assert len(lines) == 1, output
    return lines[0]


def run_printed(command: str, **kwargs) -> RecipeProcess:
    """Run `command` as printed, ``python`` being this interpreter."""
    program, script, *args = shlex.split(command)
    assert program == "python"
    return RecipeProcess(args, script=script, timeout=120, **kwargs)


def test_a_recipe_file_outside_the_package_resumes_with_the_printed_command_and_its_model_loads(tmp_path):
    script, run_dir = tmp_path / "blobs.py", tmp_path / "run"
    script.write_text(recipe_file_of_the_docs())
    last = run_dir / "last.pt"
    args = [
        "--epochs",
        "3",
        "--samples",
        "8000",
        "--checkpoint-every",
        "40",
        "--precision",
        "32",
        "--channels-last",
        "off",
        "--threads",
        "1",
        "--log-dir",
        str(run_dir),
    ]
    first = RecipeProcess(args, script=script, timeout=120)
    assert first.poll_until(last.is_file), first.stderr
    assert first.stop(signal.SIGTERM) == 128 + signal.SIGTERM, first.stderr
    command = resume_line(first.stderr)
    assert command == shlex.join(["python", str(script), "--resume", str(run_dir)])

    second = run_printed(command)
    step = load_checkpoint(last)["global_step"]
    assert second.poll_until(lambda: load_checkpoint(last)["global_step"] > step), second.stderr
    assert second.stop(signal.SIGKILL) == -signal.SIGKILL

    third = run_printed(command)
    assert third.finish() == 0, third.stderr
    state = load_checkpoint(last)
    assert state["epochs_done"] == 3 and state["config"]["samples"] == 8000
    assert state["history"][-1]["val_acc"] > 0.9
    assert (run_dir / "best.pt").is_file()

    # The generic loader rebuilds the trained model from its checkpoint, outside the recipe.
    text = (ROOT / "docs" / "extending.md").read_text()
    predictor = tmp_path / "predict_blobs.py"
    predictor.write_text(next(block for block in BLOCK.findall(text) if "load_model(sys.argv[1])" in block))
    done = subprocess.run(
        [sys.executable, str(predictor), str(run_dir / "best.pt")],
        capture_output=True,
        text=True,
        env=checkout_env(),
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "[0, 1, 2, 3]\n"


def test_architecture_shows_what_describe_prints(tmp_path, monkeypatch):
    text = (ROOT / "docs" / "architecture.md").read_text()
    example = re.search(r"^```python\n(.*?trainer\.describe\(\)\n)```\n\nprints\n\n```\n(.*?)```", text, re.S | re.M)
    monkeypatch.chdir(tmp_path)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(example.group(1), "<architecture.md>", "exec"), {"__name__": "__doc_example__"})
    assert out.getvalue() == example.group(2)
