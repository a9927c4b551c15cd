"""The `Trainer`: its parts and options, the forward passes, and `fit`, composed of its `TrainingLoop`
(`trainer.loop`: the epochs and their progress), `CallbackList` (`trainer.callback`: the hooks'
dispatch) and `CheckpointState` (`trainer.state`: what a checkpoint saves and restores)."""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterable, Mapping
from typing import IO, TYPE_CHECKING, Any

import torch
from torch import nn

from trainer.batch import Metric, StepOutput, describe_tensors, mover, peek_batch, split_batch
from trainer.callback import Callback, CallbackList, FitResources
from trainer.epoch_loss import EpochLoss
from trainer.loop import TrainingLoop
from trainer.options import check_batch_limit, check_options, precision_options, resolve_device
from trainer.pinning import threads_at_work
from trainer.precision import Precision, PrecisionChoice

if TYPE_CHECKING:  # pragma: no cover
    from trainer.state import CheckpointState

__all__ = ["Metric", "StepOutput", "Trainer", "resolve_device"]


class Trainer:
    """Runs the training loop and fires hooks into callbacks.

    Args:
        model: the network; moved to `device` (and to channels-last with `channels_last`).
        optimizer: a `torch.optim.Optimizer` over the model's parameters.
        loss_fn: ``loss_fn(predictions, targets) -> scalar tensor``. A model that returns a
            list (deep supervision) passes the whole list.
        callbacks: `Callback` objects. They run sorted by their ``order`` (lower first; the
            given order among equals), see `describe`.
        max_epochs: number of epochs `fit` runs.
        device: ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"``... Under
            torchrun, CUDA means this process's GPU (``cuda:LOCAL_RANK``).
        metrics: ``{name: metric(predictions, targets) -> 0-dim tensor}`` evaluated on
            validation batches; each returns its batch mean and is averaged weighted by batch
            size into ``logs["val_<name>"]``. With list outputs, metrics see the last one.
        scheduler: an optional LR scheduler, stepped by one rule (`trainer.scheduling`): at each
            epoch's end, or after each optimizer step with ``scheduler_interval="step"``; a
            `ReduceLROnPlateau` after each validation, fed ``val_loss`` (in a fit without
            validation, at each epoch's end, fed ``loss``).
        scheduler_interval: ``"epoch"`` or ``"step"``: when `scheduler` steps.
        grad_clip_norm: clip the gradients' global 2-norm to this value before each step.
        accumulate_grad_batches: sum gradients over this many batches per optimizer step (a
            shorter last window of an epoch is averaged over its own batches).
        precision: ``"32"``, ``"bf16"`` (autocast on CPU and CUDA), ``"16-mixed"`` (float16
            autocast with a gradient scaler, CUDA only) or ``"auto"``: what this machine computes
            fastest, never slower than float32 (see `trainer.precision_probe.choose_precision`), chosen
            at the start of `fit` from the first training batch and printed once (until then,
            e.g. for `predict` before any `fit`, it computes in float32). A resumed fit
            keeps the choice saved in its checkpoint. A `PrecisionChoice` made earlier (by
            `choose_precision`, or recorded with a run) applies all its settings as they are.
        seed: seeds Python, NumPy and torch at the start of the first `fit`.
        channels_last: use the channels-last memory format for the model and 4-D inputs; ``"auto"``
            decides with the precision (measured on the CPU, on for convolutional models on CUDA).
            Default: off, or the `PrecisionChoice`'s.
        val_every_n_steps: also validate every this many optimizer steps (inside epochs), logged
            at the global step. Callbacks that monitor a validation value (`EarlyStopping`,
            `ModelCheckpoint`) then decide after each validation, and `ReduceLROnPlateau` steps
            after each one (its patience counts validations).
        val_at_epoch_end: validate at the end of each epoch (default); False leaves validation
            to `val_every_n_steps`. A step validation that would fall on the epoch's last batch
            is left to the epoch's end.
        limit_train_batches, limit_val_batches: train (validate) on at most this many batches per
            epoch: an int, or a fraction of the loader's batches; for debug runs.
        max_time: stop after the first training step past this much wall time of the `fit`
            (seconds, a `timedelta` or ``"[D:]HH:MM:SS"``): callbacks get
            ``on_exception(TimeLimitReached)`` (`ModelCheckpoint` saves the position reached there)
            and `on_fit_end`, then `fit` raises `TimeLimitReached`, whose message says where it
            stopped. Under torchrun it is checked at epoch ends.

    What a callback may read (all attributes of the trainer; nothing else is part of the API):

    - the parts: `model` (wrapped in `DistributedDataParallel` under torchrun), `module` (the
      model itself), `optimizer`, `scheduler`, `loss_fn`, `metrics`, `device`, `precision`,
      `channels_last`, `precision_choice`, `callbacks` (sorted; change them with
      `add_callback`/`remove_callback` between fits), `train_loader`, `val_loader`, and the
      options `accumulate_grad_batches`, `val_every_n_steps`, `val_at_epoch_end`;
    - progress: `epoch` (0-based), `max_epochs`, `global_step` (optimizer steps done),
      `start_step` (`global_step` when this `fit` began: above 0 for a resumed run), `batch_idx`
      (the batch's index in its epoch; at `on_epoch_start` the first batch the epoch trains, above
      0 when a run resumes inside it), `num_batches` (batches per epoch after
      `limit_train_batches`; None for loaders without a length), `history` (one logs dict per
      epoch), `epoch_loss` (the epoch's training loss sum on the device; read it with
      `RunningLoss`), `in_step_validation` (True during a validation run by `val_every_n_steps`);
    - shared things: `resources` (`FitResources`: e.g. one TensorBoard writer per run directory).

    What a callback may change: `should_stop = True` stops training after the current batch (or,
    under torchrun, the current epoch); `max_epochs` before `fit`; the gradients in
    `on_after_backward` and `on_before_optimizer_step`; the optimizer's learning rates (as a
    scheduler would). For model outputs outside the loop use `predict` or `eval_mode`, never the
    model's modes directly.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_fn: Callable[[Any, Any], torch.Tensor],
        callbacks: Iterable[Callback] = (),
        max_epochs: int = 1,
        device: str | torch.device = "auto",
        metrics: Mapping[str, Metric] | None = None,
        scheduler: Any = None,
        scheduler_interval: str = "epoch",
        grad_clip_norm: float | None = None,
        accumulate_grad_batches: int = 1,
        precision: str | PrecisionChoice = "32",
        seed: int | None = None,
        channels_last: bool | str | None = None,
        val_every_n_steps: int | None = None,
        val_at_epoch_end: bool = True,
        limit_train_batches: int | float | None = None,
        limit_val_batches: int | float | None = None,
        max_time: float | str | Any = None,
    ) -> None:
        check_options(
            max_epochs, accumulate_grad_batches, val_every_n_steps, val_at_epoch_end, grad_clip_norm, scheduler_interval
        )
        self.limit_train_batches = check_batch_limit("limit_train_batches", limit_train_batches)
        self.limit_val_batches = check_batch_limit("limit_val_batches", limit_val_batches)
        #: Seconds a `fit` may train (None: no limit).
        self.max_time = _seconds(max_time)
        from trainer.distributed import launched_device

        # The process group starts in fit; here only this process's device is worked out.
        self.device = launched_device(resolve_device(device))
        self.grad_clip_norm = grad_clip_norm
        self._init_precision(*precision_options(precision, channels_last))
        self.model: nn.Module = model.to(  # type: ignore[call-overload]  # the stubs lack device with memory_format
            self.device, memory_format=(torch.channels_last if self.channels_last is True else torch.preserve_format)
        )
        self.optimizer, self.loss_fn, self.metrics = optimizer, loss_fn, dict(metrics or {})
        self.scheduler, self.scheduler_interval = scheduler, scheduler_interval
        self.accumulate_grad_batches, self.seed, self.max_epochs = accumulate_grad_batches, seed, max_epochs
        self.val_every_n_steps, self.val_at_epoch_end = val_every_n_steps, val_at_epoch_end
        self._loop = TrainingLoop(self)
        self._callbacks = CallbackList(self, callbacks)

    def _init_precision(self, precision: str, channels_last: bool | str, given: PrecisionChoice | None) -> None:
        #: ``"32"``, ``"bf16"`` or ``"16-mixed"`` (``"auto"`` until `fit` resolves it).
        self.precision: str = precision
        #: Whether the model and 4-D inputs use channels-last (``"auto"`` until `fit` resolves it).
        self.channels_last: bool | str = channels_last
        #: The choice and its reason, once ``"auto"`` was resolved or when one was given (else None).
        self.precision_choice: PrecisionChoice | None = given
        #: Whether CPU convolutions use oneDNN (False where the probe measured PyTorch's own faster).
        self.onednn = given.onednn if given is not None else True
        #: Called with the choice on rank 0 when `fit` resolves ``"auto"`` (None: it prints ``Trainer: <choice>``).
        self.announce_precision: Callable[[PrecisionChoice], None] | None = None
        self._set_precision(None)  # "16-mixed" without CUDA fails here, before the model is moved

    # ----------------------------------------------------------------------------- progress (the loop's)
    @property
    def epoch(self) -> int:
        """The current epoch, 0-based."""
        return self._loop.epoch

    @property
    def global_step(self) -> int:
        """Optimizer steps done."""
        return self._loop.global_step

    @property
    def start_step(self) -> int:
        """`global_step` when this `fit` began: above 0 for a resumed run."""
        return self._loop.start_step

    @property
    def batch_idx(self) -> int:
        """The batch's index in its epoch."""
        return self._loop.batch_idx

    @property
    def num_batches(self) -> int | None:
        """Batches per epoch after `limit_train_batches` (None for a loader without a length)."""
        return self._loop.num_batches

    @property
    def history(self) -> list[dict[str, float]]:
        """One logs dict per epoch done."""
        return self._loop.history

    @property
    def epoch_loss(self) -> EpochLoss:
        """The epoch's training loss sum on the device (read it with `RunningLoss`)."""
        return self._loop.epoch_loss

    @property
    def should_stop(self) -> bool:
        """Set it to True to stop training after the current batch (under torchrun, epoch)."""
        return self._loop.should_stop

    @should_stop.setter
    def should_stop(self, stop: bool) -> None:
        self._loop.should_stop = stop

    @property
    def in_step_validation(self) -> bool:
        """True during a validation run by `val_every_n_steps`."""
        return self._loop.in_step_validation

    @property
    def train_loader(self) -> Iterable | None:
        """The training loader of the current (or last) fit."""
        return self._loop.train_loader

    @property
    def val_loader(self) -> Iterable | None:
        """The validation loader of the current (or last) fit."""
        return self._loop.val_loader

    @property
    def resources(self) -> FitResources:
        """What the callbacks of one fit share, with its lifetime (`FitResources`)."""
        return self._loop.resources

    @property
    def module(self) -> nn.Module:
        """The model itself, unwrapped from `DistributedDataParallel` under torchrun. Use it for
        work done on one rank only (figures, graphs, saving): the wrapper's forward may
        communicate with the other ranks."""
        return self.model.module if isinstance(self.model, nn.parallel.DistributedDataParallel) else self.model

    @property
    def scaler(self) -> torch.amp.GradScaler | None:
        """The grad scaler of ``"16-mixed"`` precision (None otherwise)."""
        return self._amp.scaler

    # ----------------------------------------------------------------------------- callbacks
    @property
    def callbacks(self) -> list[Callback]:
        """The callbacks, sorted by ``order`` (change them with `add_callback`, `remove_callback`)."""
        return list(self._callbacks.callbacks)

    def add_callback(self, callback: Callback) -> None:
        """Add `callback`; it runs from the next `fit` (or `validate`) on, at its place by ``order``.
        A stateful callback needs a `Callback.state_key` no other callback here has."""
        self._callbacks.add(callback)

    def remove_callback(self, callback: Callback) -> None:
        """Remove `callback` (the very object that was added); it no longer runs from the next `fit` on."""
        self._callbacks.remove(callback)

    def describe(self, file: IO[str] | None = None) -> str:
        """Print (to `file`, default stdout) and return, hook by hook in the loop's order, which
        callbacks run there: one look tells what a training run does."""
        return self._callbacks.describe(file)

    def stateful_callbacks(self) -> dict[str, Callback]:
        """Callbacks with `state_dict`/`load_state_dict`, keyed by their `Callback.state_key`."""
        return self._callbacks.stateful()

    # ----------------------------------------------------------------------------- precision
    def _set_precision(self, old: Precision | None) -> None:
        """The `Precision` of the current settings, and the device mover (`old`'s grad scaler carries over)."""
        amp = Precision(
            "32" if self.precision == "auto" else self.precision, self.device, self.onednn, self.grad_clip_norm
        )
        if old is not None and old.scaler is not None and amp.scaler is not None:
            amp.scaler = old.scaler
        self._amp = amp
        self._move = mover(self.device, self.channels_last is True)

    def _resolve_precision(self, loader: Iterable, saved: dict[str, Any] | None) -> None:
        from trainer.precision_probe import resolve_choice

        if saved is not None and saved.get("device", self.device.type) != self.device.type:
            saved = None  # an automatic choice made for another kind of device is made again for this one
        kept = PrecisionChoice.recorded(saved, "saved in the checkpoint") if saved is not None else None
        example = lambda: split_batch(peek_batch(loader))[0]  # noqa: E731
        choice = resolve_choice(
            self.module, self.device, example, self.precision, self.channels_last, kept, self.announce_precision
        )
        self.precision, self.channels_last, self.precision_choice = choice.precision, choice.channels_last, choice
        self.onednn = choice.onednn
        self.module.to(memory_format=torch.channels_last if choice.channels_last else torch.contiguous_format)

    # ----------------------------------------------------------------------------- forward passes
    def autocast(self) -> contextlib.AbstractContextManager:
        """The autocast context of the run's precision (a no-op context for "32", and for "auto"
        before `fit` resolved it)."""
        return self._amp.autocast()

    def to_device(self, batch: Any) -> Any:
        """`batch` (tensors, or nested tuples, lists and dicts of them) on the trainer's device, 4-D
        tensors channels-last when the run uses it: the one way inputs reach the model."""
        return self._move(batch)

    def eval_mode(self) -> contextlib.AbstractContextManager[nn.Module]:
        """Evaluation as the whole framework does it: yields the unwrapped `module` in eval mode,
        under no grad, the run's autocast and convolution kernels; the module's training mode is
        restored afterwards. Validation, figures and PR curves all go through it."""
        return self._amp.evaluating(self.module)

    def predict(self, inputs: Any) -> Any:
        """The model's output for `inputs` (moved to the device by `to_device`), in `eval_mode`;
        left on the device, in the autocast dtype."""
        with self.eval_mode() as model:
            return model(self.to_device(inputs))

    # ----------------------------------------------------------------------------- steps
    def train_step(self, batch: Any) -> StepOutput:
        """Forward pass and loss of one training batch; override for other batch layouts.

        Runs under autocast when mixed precision is on; the trainer does the backward pass.
        """
        return self._forward(self.model, batch)

    def eval_step(self, batch: Any) -> StepOutput:
        """Forward pass and loss of one validation batch (eval mode, no grad); override as needed.

        Uses the unwrapped `module`: under torchrun the `DistributedDataParallel` wrapper would
        communicate with the other ranks, which may hold fewer validation batches.
        """
        return self._forward(self.module, batch)

    def _forward(self, model: nn.Module, batch: Any) -> StepOutput:
        inputs, targets = split_batch(batch)
        predictions = model(inputs)
        try:
            loss = self.loss_fn(predictions, targets)
        except Exception as exc:
            # PyTorch's own message rarely says which call failed or what it was given.
            name = getattr(self.loss_fn, "__name__", type(self.loss_fn).__name__)
            exc.add_note(
                f"raised by the loss function {name}(predictions, targets) with predictions "
                f"{describe_tensors(predictions)} and targets {describe_tensors(targets)}"
            )
            raise
        return StepOutput(loss, predictions, targets)

    # ----------------------------------------------------------------------------- fit
    def fit(
        self,
        train_loader: Iterable,
        val_loader: Iterable | None = None,
        resume_from: str | os.PathLike | None = None,
    ) -> list[dict[str, float]]:
        """Train for `max_epochs` epochs (or until a callback sets `should_stop`).

        With `resume_from` (a checkpoint written by `ModelCheckpoint`), training continues where
        the checkpoint was taken, with the saved weights, optimizer, scheduler, random
        generators, history and callback states: at the epoch after the saved one, or, for a
        checkpoint taken inside an epoch, at that epoch's next batch, without loading the batches
        before it (see `trainer.sampler.batches_from`; a loader that cannot start late resumes at
        the end of the epoch, with one warning). A run that had stopped early stays stopped; a
        `CosineAnnealingLR` over the saved run's epochs, resumed with another `max_epochs`,
        decays from its current rate to its minimum at the new last epoch. Calling `fit` again
        on the same trainer (with a larger `max_epochs`, or after a `TimeLimitReached`) continues
        where the last call ended, without reseeding. Returns `history`: one logs dict per epoch.

        After an exception, every callback gets `on_exception` then `on_fit_end` (also when one
        of them raises: its error becomes a note on the training exception), and the training
        exception propagates. Without one, an error in `on_fit_end` propagates after every
        callback's `on_fit_end` ran.
        """
        state = None
        if resume_from is not None:
            from trainer.checkpoint import load_checkpoint

            state = load_checkpoint(resume_from, resume=True)
        train_loader, val_loader = self._distribute(train_loader, val_loader)
        if "auto" in (self.precision, self.channels_last):
            self._resolve_precision(train_loader, (state or {}).get("precision"))
        from trainer.distributed import wrap_model

        self.model = wrap_model(self.model, self.device)  # after the memory format is settled: DDP's buckets take it
        self._set_precision(self._amp)
        self._amp.warn_unfused(self.optimizer)
        if state is not None:
            self._state.load_state_dict(state)
        else:
            self._loop.continue_in_place()
        self._loop.prepare(train_loader, val_loader, fresh=state is None)
        cpu = threads_at_work(torch.get_num_threads()) if self.device.type == "cpu" else contextlib.nullcontext()
        with self._amp.kernels(), cpu:
            self._loop.run(train_loader, val_loader)
        from trainer.distributed import wait_for_all

        wait_for_all(self.device)  # no rank leaves fit while another still communicates
        return self.history

    def _distribute(self, train_loader: Iterable, val_loader: Iterable | None) -> tuple[Iterable, Iterable | None]:
        """Under torchrun: start the process group and shard the loaders."""
        from trainer.distributed import init_distributed, is_distributed, shard_loader

        self.device = init_distributed(self.device)
        if not is_distributed():
            return train_loader, val_loader
        return (
            shard_loader(train_loader, train=True),
            shard_loader(val_loader, train=False) if val_loader is not None else None,
        )

    def validate(self, loader: Iterable) -> dict[str, float]:
        """Evaluate on `loader` (in `eval_mode`) and return ``val_loss`` and ``val_<metric>``.

        Fires `on_validation_start`, `on_validation_batch_end` and `on_validation_end` of the
        callbacks the trainer has now. Outside a fit, what they share (`resources`, such as a
        TensorBoard writer) lives for this call: closed when it returns, also after an exception,
        and such a writer continues the run's event files at `global_step`, dropping none of the
        points a fit logged before. Called from a callback inside a fit, it uses the fit's. Under
        torchrun it runs on the calling rank alone over all of `loader`, but inside a fit, or on
        the fit's sharded `val_loader`, on every rank together.
        """
        return self._loop.validate(loader)

    # ----------------------------------------------------------------------------- checkpoint state
    @functools.cached_property
    def _state(self) -> CheckpointState:
        """What a checkpoint saves and restores (`trainer.state`), made when first asked: a fit that
        writes and reads no checkpoint never loads it."""
        from trainer.state import CheckpointState

        return CheckpointState(self)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue training exactly (see `CheckpointState.state_dict`)."""
        return self._state.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state from `state_dict` (see `fit(resume_from=...)`). Saved callback states
        that no callback of this trainer takes are left out with a warning."""
        self._state.load_state_dict(state)

    def gather_position(self) -> None:
        """Under torchrun, collect every rank's CUDA generator state and training loss sums of the
        epoch so far for the next `state_dict` (see `CheckpointState.gather_position`); every rank
        calls it at the same point."""
        self._state.gather_position()


def _seconds(max_time: Any) -> float | None:
    """The seconds of a `Trainer`'s ``max_time`` (None: no limit), read by `trainer.durations`."""
    if max_time is None:
        return None
    from trainer.durations import parse_duration

    return parse_duration(max_time)
