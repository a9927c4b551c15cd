"""`CallbackList`: a trainer's callbacks in their running order, the dispatch table of the hooks
they override, and `describe`, which prints that table."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator
from typing import IO, TYPE_CHECKING, Any

from trainer.callback import HOOKS, Callback, overridden_hooks

if TYPE_CHECKING:  # pragma: no cover
    from trainer.core import Trainer

#: How deep each hook sits in the loop, for `CallbackList.describe`.
_DEPTH = {
    "on_fit_start": 0,
    "on_fit_end": 0,
    "on_exception": 0,
    "on_batch_start": 2,
    "on_after_backward": 2,
    "on_before_optimizer_step": 2,
    "on_batch_end": 2,
    "on_validation_batch_end": 2,
}


def is_stateful(callback: Callback) -> bool:
    """Whether `callback` has ``state_dict`` and ``load_state_dict`` (its state goes in checkpoints)."""
    return callable(getattr(callback, "state_dict", None)) and callable(getattr(callback, "load_state_dict", None))


class CallbackList:
    """The callbacks of one trainer, sorted by ``order`` (stable), and for each hook the bound
    methods to call: only the callbacks that override it, are not idle there
    (`Callback.idle_hooks`) and run on this rank (``rank_zero_only``). The table is rebuilt
    whenever a callback is added or removed and by `rebuild` (at each `fit` and `validate`).

    Args:
        trainer: the trainer the callbacks run in (passed to every hook).
        callbacks: the initial callbacks.
    """

    def __init__(self, trainer: Trainer, callbacks: Iterable[Callback] = ()) -> None:
        self.trainer = trainer
        self.callbacks: list[Callback] = []
        self.table: dict[str, list[Any]] = {hook: [] for hook in HOOKS}
        for cb in callbacks:
            self._insert(cb)

    def __iter__(self) -> Iterator[Callback]:
        return iter(self.callbacks)

    def __len__(self) -> int:
        return len(self.callbacks)

    def add(self, callback: Callback) -> None:
        """Add `callback` at its place by ``order``; a TypeError for a non-callback, a ValueError
        for a stateful one whose `Callback.state_key` another callback here already has."""
        self._insert(callback)
        self.rebuild()

    def _insert(self, callback: Callback) -> None:
        if not isinstance(callback, Callback):
            raise TypeError(f"callbacks must be Callback instances, got {type(callback).__name__}")
        if is_stateful(callback):
            key = callback.state_key
            if any(is_stateful(cb) and cb.state_key == key for cb in self.callbacks):
                raise ValueError(
                    f"two callbacks save their state under the key {key!r}; set a distinct "
                    f"state_key on one of them (e.g. callback.state_key = '{key}-2')"
                )
        self.callbacks.append(callback)
        self.callbacks.sort(key=lambda cb: cb.order)

    def remove(self, callback: Callback) -> None:
        """Remove `callback` (the very object that was added); a ValueError if it is not here."""
        for index, cb in enumerate(self.callbacks):
            if cb is callback:
                del self.callbacks[index]
                self.rebuild()
                return
        raise ValueError(f"{type(callback).__name__} is not among this trainer's callbacks")

    def active(self) -> list[Callback]:
        """The callbacks that run in this process (all but ``rank_zero_only`` ones off rank 0)."""
        from trainer.distributed import is_rank_zero

        return [cb for cb in self.callbacks if is_rank_zero() or not cb.rank_zero_only]

    def rebuild(self) -> None:
        """Build the dispatch table from the callbacks and the trainer's settings now."""
        active = self.active()
        for cb in active:
            cb.trainer = self.trainer
        self.table = {hook: overridden_hooks(active, hook, self.trainer) for hook in HOOKS}

    def fire(self, hook: str, *args: Any) -> None:
        """Call `hook` of every callback dispatched there; the first error propagates."""
        for fn in self.table[hook]:
            fn(self.trainer, *args)

    def fire_all(self, hook: str, *args: Any, cause: BaseException | None = None) -> None:
        """Call every dispatched callback's `hook`, even after one raised. Without a `cause`, the
        first error is raised once all ran, with the later ones as notes on it. With a `cause`
        (the exception that stopped training) the errors become notes on the cause."""
        errors: list[tuple[Any, Exception]] = []
        for fn in self.table[hook]:
            try:
                fn(self.trainer, *args)
            except Exception as exc:  # noqa: BLE001 - every callback gets its turn; reported below
                errors.append((fn, exc))
        notes = [f"{type(fn.__self__).__name__}.{hook} also raised {type(exc).__name__}: {exc}" for fn, exc in errors]
        if cause is not None:
            for note in notes:
                cause.add_note(note)
        elif errors:
            first = errors[0][1]
            for note in notes[1:]:
                first.add_note(note)
            raise first

    def stateful(self) -> dict[str, Callback]:
        """The callbacks whose state goes in checkpoints, by `Callback.state_key`."""
        return {cb.state_key: cb for cb in self.callbacks if is_stateful(cb)}

    def state_dict(self) -> dict[str, Any]:
        """Every stateful callback's ``state_dict()``, by its key."""
        return {key: cb.state_dict() for key, cb in self.stateful().items()}  # type: ignore[attr-defined]

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        """Give each stateful callback its state from `saved` (what `state_dict` returned); warn
        about saved states that no callback takes. The default key is the class name, as in the
        checkpoints of earlier versions, which therefore load unchanged."""
        unused = dict(saved)
        for key, cb in self.stateful().items():
            if key in unused:
                cb.load_state_dict(unused.pop(key))  # type: ignore[attr-defined]
        if unused:
            warnings.warn(
                f"the checkpoint holds the state of callbacks this trainer does not have "
                f"({', '.join(sorted(unused))}); it is not restored. Known keys: "
                f"{', '.join(sorted(self.stateful())) or 'none'}",
                RuntimeWarning,
                stacklevel=3,
            )

    def describe(self, file: IO[str] | None = None) -> str:
        """Print (to `file`, default stdout) and return, hook by hook in the loop's order, which
        callbacks run there."""
        self.rebuild()
        lines = []
        for hook in HOOKS:
            names = [type(fn.__self__).__name__ for fn in self.table[hook]]
            indent = "  " * _DEPTH.get(hook, 1)
            lines.append(f"{indent}{hook:<{28 - len(indent)}} {', '.join(names) or '-'}")
        text = "\n".join(lines)
        print(text, file=file)
        return text
