"""`trainer.callback.FitResources`: what the callbacks of one fit share, made once, flushed and closed."""

from __future__ import annotations

import pytest


def test_fit_resources_made_once_flushed_and_closed_newest_first():
    from trainer.callback import FitResources

    events = []

    class Thing:
        def __init__(self, name):
            self.name = name

        def flush(self):
            events.append(f"flush {self.name}")

        def close(self):
            events.append(f"close {self.name}")
            if self.name == "a":
                raise OSError("disk full")

    resources = FitResources()
    a = resources.get("a", lambda: Thing("a"))
    assert resources.get("a", lambda: Thing("other")) is a
    resources.get("b", lambda: Thing("b"))
    resources.flush()
    with pytest.raises(OSError, match="disk full"):
        resources.close()
    assert events == ["flush a", "flush b", "close b", "close a"] and "a" not in resources
