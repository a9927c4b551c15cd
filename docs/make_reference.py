"""Make docs/reference.md from the docstrings of everything the packages export.

Run ``python -m docs.make_reference`` from the repository root after changing a docstring or a
signature of an exported name, and commit the result (tests/test_reference.py fails on drift).
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT / "docs" / "reference.md"
#: The recipes' modules, each with its own ``__all__`` (the ``recipes`` package exports none of them).
RECIPE_MODULES = tuple(
    f"recipes.{info.name}" for info in pkgutil.iter_modules([str(ROOT / "recipes")]) if not info.ispkg
)
PACKAGES = ("trainer", "trainer.callbacks", "trainer.board", "models", "trainer_datasets", *sorted(RECIPE_MODULES))


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


#: Docstrings that every class inherits from `object` (``__init__``: "Initialize self. See
#: help(type(self))..."): they say nothing about the class, so the reference leaves them out.
INHERITED = {inspect.getdoc(getattr(object, name)) for name in ("__init__", "__new__")}
#: The words with which a docstring points to its module's docstring.
MODULE_DOCSTRING = "the module docstring"
#: Section headings whose entries (``name: description``) become a list.
ENTRY_SECTIONS = ("Args:", "Arguments:", "Attributes:")


def documentation(obj: object) -> str:
    """The docstrings a reader sees for `obj`: the class's and its constructor's (unless
    inherited from `object`), or the function's."""
    texts = [inspect.getdoc(obj) or ""]
    if inspect.isclass(obj) and "__init__" in vars(obj):
        texts.append(inspect.getdoc(obj.__init__) or "")
    return "\n\n".join(text for text in texts if text and text not in INHERITED)


def markdown(text: str) -> str:
    """A docstring as Markdown whose indentation never turns prose into a code block: the entries
    of an ``Args:`` / ``Attributes:`` section become a list (``- `name`: description``, deeper
    lines joined to their entry), a paragraph ending in ``::`` is followed by its indented block
    as a fenced code block, and every other line loses its indentation."""
    lines, out, index = text.splitlines(), [], 0
    while index < len(lines):
        line = lines[index]
        stripped, indent = line.strip(), len(line) - len(line.lstrip())
        index += 1
        if stripped.endswith("::"):
            out.append(stripped[:-1])
            block = []
            while index < len(lines) and (not lines[index].strip() or _indent(lines[index]) > indent):
                block.append(lines[index])
                index += 1
            while block and not block[-1].strip():
                block.pop()
            out += ["", "```text", *textwrap.dedent("\n".join(block)).strip("\n").splitlines(), "```", ""]
        elif stripped in ENTRY_SECTIONS:
            out += [stripped, ""]
            entry_indent = None
            while index < len(lines) and (not lines[index].strip() or _indent(lines[index]) > indent):
                entry, index = lines[index], index + 1
                if not entry.strip():
                    continue
                if entry_indent is None or _indent(entry) <= entry_indent:
                    entry_indent = _indent(entry)
                    name, colon, rest = entry.strip().partition(":")
                    out.append(f"- `{name}`:{rest}" if colon else f"- {entry.strip()}")
                else:
                    out[-1] += " " + entry.strip()
            out.append("")
        else:
            out.append(stripped)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip()


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def pointed_modules(package: str) -> list[str]:
    """The modules whose docstring an exported name of `package` points to ("see the module
    docstring"), in the order of the names: the reference renders them, since the names' own
    text does not hold what they point to."""
    modules = []
    for _, _, obj in (entry for entry in exported() if entry[0] == package):
        module = getattr(obj, "__module__", "")
        if MODULE_DOCSTRING in documentation(obj) and module not in modules:
            modules.append(module)
    return modules


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
        "Every class and function that `trainer`, `trainer.callbacks`, `trainer.board`, `models`, `trainer_datasets`",
        "and the modules of `recipes` export, with all their arguments. Made from the docstrings by",
        "`python -m docs.make_reference`; the test suite checks that it matches them.",
        "",
    ]
    for package in PACKAGES:
        lines += [f"## `{package}`", ""]
        for module in pointed_modules(package):
            doc = inspect.getdoc(importlib.import_module(module)) or ""
            lines += [f"### Module `{module}`", "", markdown(doc), ""]
        for _, name, obj in (entry for entry in exported() if entry[0] == package):
            text = documentation(obj).replace(MODULE_DOCSTRING, f"{MODULE_DOCSTRING} of `{obj.__module__}` above")
            lines += [f"### `{name}{signature_of(obj)}`", "", markdown(text), ""]
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    REFERENCE.write_text(render())
    print(f"wrote {REFERENCE.relative_to(ROOT)}")
