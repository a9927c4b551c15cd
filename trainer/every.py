"""`Every`: fire at every N-th step or epoch, the one "every N" rule the callbacks share."""

from __future__ import annotations

from trainer.options import positive_int


class Every:
    """An event filter in the spirit of PyTorch-Ignite's ``every=N``: true at each multiple of
    `n` of a counter (the global step, or the number of epochs done), once per value.

    Multiples of a global counter, rather than "N since the last time", put the points of a
    resumed run where an uninterrupted run has them. ``Every(None)`` never fires.

    Args:
        n: the period, a positive integer, or None for never.
        name: the option's name, for the error message of a bad `n`.
    """

    def __init__(self, n: int | None, name: str = "every") -> None:
        self.n = positive_int(name, n, optional=True)
        self._last: int | None = None

    def __call__(self, count: int) -> bool:
        """Whether `count` is a new multiple of `n` (a step seen again, e.g. during gradient
        accumulation, fires once)."""
        if self.n is None or count < 1 or count % self.n or count == self._last:
            return False
        self._last = count
        return True

    def start(self, count: int) -> None:
        """Take `count` as seen: a fit resumed at a checkpoint's global step logged that step
        before the checkpoint, and its batches may not step the optimizer at once (gradient
        accumulation)."""
        self._last = count

    def reset(self) -> None:
        """Forget the last value seen, for a counter that starts again (e.g. batches of an epoch)."""
        self._last = None
