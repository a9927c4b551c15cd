"""Every exported class and function documents all its arguments, and docs/reference.md holds them
(made by ``python -m docs.make_reference``)."""

from __future__ import annotations

import dataclasses

import pytest

from docs.make_reference import (
    REFERENCE,
    described_arguments,
    documentation,
    exported,
    markdown,
    parameters,
    render,
)


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
    assert REFERENCE.read_text() == render(), "docs/reference.md drifted: run python -m docs.make_reference"


def test_a_constructor_without_a_docstring_of_its_own_adds_nothing():
    """A dataclass's generated ``__init__`` inherits object's "Initialize self..." docstring; the
    reference leaves it out, and keeps a constructor docstring of the class's own."""

    @dataclasses.dataclass
    class Point:
        """A point.

        Args:
            x: across.
        """

        x: int

    class Documented:
        """A thing."""

        def __init__(self, x: int) -> None:
            """Make it.

            Args:
                x: its size.
            """

    assert documentation(Point) == "A point.\n\nArgs:\n    x: across."
    assert documentation(Documented) == "A thing.\n\nMake it.\n\nArgs:\n    x: its size."
    assert "Initialize self" not in REFERENCE.read_text()


def test_indentation_never_makes_a_code_block_but_a_literal_block_is_fenced():
    text = """Read a folder.

        Indented prose after a blank line (four spaces: a code block in Markdown).

    Layout::

        <root>/images/<id>.png
            nested

    Args:
        root: the folder,
            read once.
        a, b: the two ends.
    Returns:
        the items.
    """
    assert markdown(text.replace("\n    ", "\n")) == "\n".join(
        [
            "Read a folder.",
            "",
            "Indented prose after a blank line (four spaces: a code block in Markdown).",
            "",
            "Layout:",
            "",
            "```text",
            "<root>/images/<id>.png",
            "    nested",
            "```",
            "",
            "Args:",
            "",
            "- `root`: the folder, read once.",
            "- `a, b`: the two ends.",
            "",
            "Returns:",
            "the items.",
        ]
    )


def test_the_reference_holds_what_a_docstring_points_to():
    """`scan_segmentation_folder` points to its module's docstring for the folder layout: the
    reference renders that docstring, the layout in a code block."""
    text = REFERENCE.read_text()
    module = text.index("### Module `trainer_datasets.segmentation_layout`")
    layout = text.index("```text\n<root>/images/<id>.<png|jpg|jpeg|tif|tiff>\n<root>/masks/<class>/<id>.png", module)
    scan = text.index("### `scan_segmentation_folder(")
    assert module < layout < scan
    assert "see the module docstring of `trainer_datasets.segmentation_layout` above" in text[scan:]
