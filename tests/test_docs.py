"""Every Python code block in the README and the docs runs as written."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

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
    exec(compile(code, "<doc>", "exec"), {"__name__": "__doc_example__"})


def test_readme_starts_with_the_two_commands():
    lines = (ROOT / "README.md").read_text().splitlines()
    block = lines[lines.index("```sh") + 1: lines.index("```sh") + 3]
    assert [line.split("#")[0].strip() for line in block] == ["make run", "make test"]


def test_architecture_shows_what_describe_prints(tmp_path, monkeypatch):
    text = (ROOT / "docs" / "architecture.md").read_text()
    example = re.search(r"^```python\n(.*?trainer\.describe\(\)\n)```\n\nprints\n\n```\n(.*?)```", text, re.S | re.M)
    monkeypatch.chdir(tmp_path)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(example.group(1), "<architecture.md>", "exec"), {"__name__": "__doc_example__"})
    assert out.getvalue() == example.group(2)
