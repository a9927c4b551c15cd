"""Callbacks: the `Callback` base class (one no-op method per hook the `Trainer` fires), the
`CallbackList` of a trainer (running order, the dispatch table of the hooks they override,
`describe`), and `FitResources`, what the callbacks of one fit share.

A new hook is a method of `Callback` and its name in `HOOKS` (with its depth in `_DEPTH` when it
is not an epoch-level hook), fired by the loop (`trainer.loop`) and described in the hook table of
docs/extending.md."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Hashable, Iterable, Iterator
from typing import IO, TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from trainer.batch import StepOutput
    from trainer.core import Trainer

#: Every hook, in the order a two-epoch run with validation first meets them.
HOOKS: tuple[str, ...] = (
    "on_fit_start",
    "on_epoch_start",
    "on_batch_start",
    "on_after_backward",
    "on_before_optimizer_step",
    "on_batch_end",
    "on_validation_start",
    "on_validation_batch_end",
    "on_validation_end",
    "on_epoch_end",
    "on_exception",
    "on_fit_end",
)


class Callback:
    """Base class of all callbacks: override only the hooks you need.

    Hooks that a subclass does not override are never called, so they cost nothing in the
    training loop. Training state lives on the trainer (``trainer.epoch``,
    ``trainer.global_step``, ``trainer.model``...): read it there. Set
    ``trainer.should_stop = True`` to stop after the current batch or epoch.

    ``logs`` (in ``on_validation_end`` and ``on_epoch_end``) hold Python floats: ``loss``, the
    epoch's mean training loss weighted by batch size; ``val_loss`` and ``val_<metric>`` when
    there is validation data; ``lr``, the optimizer's learning rate after the scheduler's step.

    Under ``torchrun`` a callback runs on every process unless its class sets
    ``rank_zero_only = True`` (logging and progress bars do; `ModelCheckpoint` runs on every
    process, which gather what a checkpoint needs, and writes on rank 0).

    Callbacks run sorted by ``order`` (lower first; equal orders keep the order they were given
    in): `EarlyStopping` decides at -10, loggers and visuals write at 0, `ModelCheckpoint` saves
    at 100, after everything it should carry. ``trainer.describe()`` prints who runs where.
    While a fit runs, ``self.trainer`` is the trainer running this callback.

    A callback with ``state_dict()`` / ``load_state_dict()`` has its state saved in checkpoints
    under its `state_key` (its class name unless set otherwise); two such callbacks of one trainer
    need different keys.
    """

    #: Run only on rank 0 when several processes train together.
    rank_zero_only: bool = False
    #: Where this callback runs among the others at each hook: lower first.
    order: int = 0
    #: The trainer of the current (or last) fit; set by the trainer before ``on_fit_start``.
    trainer: Trainer | None = None

    @property
    def state_key(self) -> str:
        """The key of this callback's state in a checkpoint: the class name, or the value set.
        Set it (``cb.state_key = "val_ckpt"``) to keep two stateful callbacks of one class apart."""
        return getattr(self, "_state_key", None) or type(self).__qualname__

    @state_key.setter
    def state_key(self, key: str) -> None:
        if not isinstance(key, str) or not key:
            raise ValueError(f"state_key must be a non-empty string, got {key!r}")
        self._state_key = key

    def idle_hooks(self, trainer: Trainer) -> frozenset[str]:
        """Hooks this callback overrides but does nothing at under its settings and `trainer`'s
        (e.g. ``on_batch_end`` of a `ModelCheckpoint` without step checkpoints): they are not
        dispatched. Asked when the dispatch table is built (each `fit` and `validate`)."""
        return frozenset()

    def on_fit_start(self, trainer: Trainer) -> None:
        """Called once when `fit` begins, before the first epoch."""

    def on_fit_end(self, trainer: Trainer) -> None:
        """Called once when `fit` ends, also after an exception (after `on_exception`)."""

    def on_epoch_start(self, trainer: Trainer) -> None:
        """Called at the start of each training epoch; `trainer.epoch` is 0-based."""

    def on_epoch_end(self, trainer: Trainer, logs: dict[str, float]) -> None:
        """Called after each epoch's training and validation with that epoch's `logs`."""

    def on_batch_start(self, trainer: Trainer, batch: Any) -> None:
        """Called before each training step, with the batch already on the device."""

    def on_after_backward(self, trainer: Trainer) -> None:
        """Called after each training batch's backward pass; the gradients (scaled with
        ``16-mixed``, summed so far when accumulating) are on the parameters."""

    def on_before_optimizer_step(self, trainer: Trainer, optimizer: torch.optim.Optimizer) -> None:
        """Called before each optimizer step, with the gradients it uses (unscaled, clipped);
        `trainer.global_step` counts the steps done before this one."""

    def on_batch_end(self, trainer: Trainer, batch: Any, outputs: StepOutput) -> None:
        """Called after each training step. `outputs.loss` is detached and still on the device."""

    def on_validation_start(self, trainer: Trainer) -> None:
        """Called before the first validation batch of an epoch (or of `trainer.validate`)."""

    def on_validation_batch_end(self, trainer: Trainer, batch: Any, outputs: StepOutput) -> None:
        """Called after each validation step (eval mode, no grad)."""

    def on_validation_end(self, trainer: Trainer, logs: dict[str, float]) -> None:
        """Called after the last validation batch with ``val_loss`` and ``val_<metric>``."""

    def on_exception(self, trainer: Trainer, exception: BaseException) -> None:
        """Called when `fit` is interrupted by an exception, before `on_fit_end`."""


def overridden_hooks(callbacks: list[Callback], hook: str, trainer: Trainer | None = None) -> list:
    """The bound `hook` methods of those `callbacks` whose class overrides it, in order; given a
    `trainer`, without the callbacks that are idle there (`Callback.idle_hooks`)."""
    base = getattr(Callback, hook)
    return [
        getattr(cb, hook)
        for cb in callbacks
        if getattr(type(cb), hook, base) is not base and (trainer is None or hook not in cb.idle_hooks(trainer))
    ]


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
