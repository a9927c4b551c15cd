"""Every exported class and function documents all its arguments, and docs/reference.md holds them
(made by ``python -m docs.make_reference``)."""

from __future__ import annotations

import pytest

from docs.make_reference import REFERENCE, described_arguments, documentation, exported, parameters, render


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
