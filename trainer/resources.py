"""`FitResources`: what the callbacks of one `fit` share, with the lifetime of that fit."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any, TypeVar

T = TypeVar("T")


class FitResources:
    """Objects shared by callbacks for the length of one `fit`, such as the one TensorBoard
    writer per run directory that every TensorBoard callback writes through.

    `get` makes an object on its first request. The trainer flushes every object that has a
    ``flush()`` at each epoch end (a `ModelCheckpoint` also does before it saves, so a checkpoint
    never gets ahead of the logs), and closes every object that has a ``close()`` when `fit`
    ends, also after an exception; the next `fit` starts empty.
    """

    def __init__(self) -> None:
        self._items: dict[Hashable, Any] = {}

    def get(self, key: Hashable, create: Callable[[], T]) -> T:
        """The object under `key`, made by ``create()`` on first request in this fit."""
        if key not in self._items:
            self._items[key] = create()
        return self._items[key]

    def __contains__(self, key: Hashable) -> bool:
        return key in self._items

    def flush(self) -> None:
        """Flush every object that can be flushed."""
        for item in self._items.values():
            if callable(getattr(item, "flush", None)):
                item.flush()

    def close(self, cause: BaseException | None = None) -> None:
        """Close every object that can be closed, newest first, and forget them all; the first
        error is raised once all were closed, or, given the `cause` that stopped training, added
        to it as a note (never hiding it).

        Args:
            cause: the exception that ended the fit, or None.
        """
        items, self._items = list(self._items.values()), {}
        error: Exception | None = None
        for item in reversed(items):
            try:
                if callable(getattr(item, "close", None)):
                    item.close()
            except Exception as exc:  # noqa: BLE001 - close the others first
                error = error or exc
        if error is not None and cause is not None:
            cause.add_note(f"closing the fit's resources also raised {type(error).__name__}: {error}")
        elif error is not None:
            raise error
