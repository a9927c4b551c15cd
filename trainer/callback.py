"""The `Callback` base class: one no-op method per hook the `Trainer` fires."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

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
