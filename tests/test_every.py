"""`trainer.every`: "every N steps or epochs", at multiples of the global count."""

from __future__ import annotations

import pytest


def test_every_fires_at_multiples_once_each():
    from trainer.every import Every

    every = Every(3, "log_every")
    assert [n for n in (1, 2, 3, 3, 3, 4, 6, 6, 9) if every(n)] == [3, 6, 9]
    every.reset()
    assert every(3)
    assert not any(Every(None)(n) for n in range(1, 10))
    with pytest.raises(ValueError, match="log_every must be a positive integer or None, got 0"):
        Every(0, "log_every")
