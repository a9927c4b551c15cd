"""Every exported class and function documents all its arguments, and docs/reference.md holds them.

docs/reference.md is made from the docstrings; when it drifts, rewrite it with
``python -m tests.test_reference`` (from the repository root) and commit it.
"""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT / "docs" / "reference.md"
PACKAGES = ("trainer", "trainer.callbacks", "models", "trainer_datasets")


def exported() -> list[tuple[str, str, object]]:
    """(package, name, object) of every name each package exports, classes and functions only."""
    found = []
    for package in PACKAGES:
        module = importlib.import_module(package)
        for name in module.__all__:
            obj = getattr(module, name)
            if inspect.isclass(obj) or inspect.isfunction(obj):
                found.append((package, name, obj))
    return found


def parameters(obj: object) -> list[str]:
    """The arguments a user passes: of the function, or of the class's constructor."""
    target = obj.__init__ if inspect.isclass(obj) else obj
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):
        return []
    return [
        p.name
        for p in signature.parameters.values()
        if p.name not in ("self", "cls") and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]


def documentation(obj: object) -> str:
    """The docstrings a reader sees for `obj`: the class's and its constructor's, or the function's."""
    texts = [inspect.getdoc(obj) or ""]
    if inspect.isclass(obj) and "__init__" in vars(obj):
        texts.append(inspect.getdoc(obj.__init__) or "")
    return "\n\n".join(text for text in texts if text)


def described_arguments(text: str) -> dict[str, str]:
    """name -> description of every entry in the ``Args:`` (or ``Attributes:``) sections of a docstring.

    An entry is ``name: description`` (or ``a, b: description`` for arguments described together)
    one level below ``Args:``; deeper-indented lines continue its description.
    """
    described: dict[str, str] = {}
    lines = text.splitlines()
    for start, line in enumerate(lines):
        if line.strip() not in ("Args:", "Arguments:", "Attributes:"):
            continue
        outer, entry_indent, names = len(line) - len(line.lstrip()), None, []
        for line in lines[start + 1 :]:
            if not line.strip():
                continue
            indent = len(line) - len(line.lstrip())
            if indent <= outer:
                break
            entry = re.match(r"\*{0,2}([\w, *]+?)(?: \([^)]*\))?:(?:\s+(.*)|$)", line.strip())
            if entry_indent in (None, indent) and entry:
                entry_indent, names = indent, [n.strip().lstrip("*") for n in entry.group(1).split(",")]
                for name in names:
                    described[name] = (entry.group(2) or "").strip()
            else:
                for name in names:
                    described[name] = f"{described[name]} {line.strip()}".strip()
    return described


def signature_of(obj: object) -> str:
    target = obj.__init__ if inspect.isclass(obj) else obj
    try:
        text = str(inspect.signature(target))
    except (TypeError, ValueError):
        return "(...)"
    return text.replace("(self, ", "(").replace("(self)", "()")


def render() -> str:
    """The text of docs/reference.md."""
    lines = [
        "# Reference",
        "",
        "Every class and function that `trainer`, `trainer.callbacks`, `models` and `trainer_datasets`",
        "export, with all their arguments. Made from the docstrings by `python -m tests.test_reference`;",
        "the test suite checks that it matches them.",
        "",
    ]
    for package in PACKAGES:
        lines += [f"## `{package}`", ""]
        for _, name, obj in (entry for entry in exported() if entry[0] == package):
            lines += [f"### `{name}{signature_of(obj)}`", "", documentation(obj).strip(), ""]
    return "\n".join(lines).rstrip() + "\n"


@pytest.mark.parametrize("package, name, obj", exported(), ids=lambda value: value if isinstance(value, str) else "")
def test_every_argument_is_documented(package, name, obj):
    text = documentation(obj)
    assert text, f"{package}.{name} has no docstring"
    described = described_arguments(text)
    missing = [p for p in parameters(obj) if len(described.get(p, "")) < 3]
    assert not missing, f"{package}.{name}: its docstring's Args: section does not describe {missing}"


def test_an_argument_named_in_prose_is_not_described():
    text = """Train a model.

    The lr is used by the optimizer.

    Args:
        model: the network to train,
            on any device.
        a, b: the two ends.
        lr:
    """
    assert described_arguments(text) == {
        "model": "the network to train, on any device.",
        "a": "the two ends.",
        "b": "the two ends.",
        "lr": "",
    }


def test_reference_matches_the_docstrings():
    assert REFERENCE.read_text() == render(), "docs/reference.md drifted: run python -m tests.test_reference"


if __name__ == "__main__":
    REFERENCE.write_text(render())
    print(f"wrote {REFERENCE.relative_to(ROOT)}")
