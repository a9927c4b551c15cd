"""`TrainingLoop`, the part of the `Trainer` that runs epochs: each epoch's start, one training
batch, the epoch's end, and the validations inside and after it.

Everything the loop uses per batch (the device mover, the autocast context, the dispatch table,
the scheduler rule) is built once per `fit` by `trainer.core.Trainer.fit`.
"""

from __future__ import annotations

import itertools
import math
import time
import types
import warnings
from collections.abc import Callable, Generator, Iterable, Iterator
from typing import Any

import torch

from trainer.attributes import TrainerAttributes
from trainer.batch import batch_size, detach, last_output
from trainer.distributed import all_reduce, broadcast_buffers, is_distributed
from trainer.errors import BatchLoadError, NonFiniteLossError, TimeLimitReached
from trainer.options import format_duration
from trainer.sampler import RESUMABLE_LOADERS, batches_from, start_epoch
from trainer.state import rng_state, set_rng_state
from trainer.steps import StepOutput


class TrainingLoop(TrainerAttributes):
    """The epochs of a fit, as methods of the `Trainer` (which holds the state they read)."""

    def _run_epochs(self, train_loader: Iterable, val_loader: Iterable | None) -> None:
        for epoch in range(len(self.history), self.max_epochs):  # continue after done epochs
            resume = self._pos.take_resume(epoch)
            if self.should_stop and resume is None:  # a resumed run that had stopped early
                break
            batches = loaded(self._start_epoch(epoch, train_loader, resume), training_batch(epoch), self.batch_idx)
            try:
                for batch_idx, batch in enumerate(batches, start=self.batch_idx):
                    if self._train_batch(batch_idx, batch, val_loader):
                        break
            finally:
                batches.close()  # the loader's iterator, and its worker processes, end here on every path
            self._end_epoch(val_loader)
            if self._stop_after_epoch(epoch):
                break

    # ----------------------------------------------------------------------------- epoch start
    def _start_epoch(self, epoch: int, loader: Iterable, resume: dict[str, Any] | None) -> Iterator[Any]:
        """Fire ``on_epoch_start`` and return the epoch's batches (from the resume point, if any)."""
        self.epoch = epoch
        first = resume["batches"] if resume else 0
        self.batch_idx = first
        self._callbacks.fire("on_epoch_start")
        self.model.train()
        start_epoch(loader, epoch)  # seeded orders and augmentations: fresh and reproducible per epoch
        if resume is None:
            self.epoch_loss.reset()
            self.optimizer.zero_grad(set_to_none=True)
        self._pos.start_epoch(first, fresh=resume is None)
        iterator = iter(self._epoch_batches(loader, first))
        if resume is not None and "rng" in resume:
            # Again after iter(): a DataLoader draws its workers' base seed from the generator.
            set_rng_state(resume["rng"])
        return iterator

    def _epoch_batches(self, loader: Iterable, first: int) -> Iterable:
        """The batches left in this epoch after `first`: none when it is done or stopped, or when
        `loader` cannot start late (with a warning)."""
        last = self.num_batches
        if self.should_stop or (last is not None and first >= last):
            return ()
        batches = batches_from(loader, first)  # started late only now, for this very pass
        if batches is None:
            warnings.warn(
                f"{type(loader).__name__} cannot start an epoch at a given batch, so this run resumes at the end "
                f"of epoch {self.epoch + 1}: the batches after batch {first} of it are skipped. {RESUMABLE_LOADERS}",
                RuntimeWarning,
                stacklevel=5,
            )
            return ()
        if self.limit_train_batches is not None and last is not None:  # a limit always gives a count
            return itertools.islice(batches, last - first)
        return batches

    # ----------------------------------------------------------------------------- one batch
    def _train_batch(self, batch_idx: int, batch: Any, val_loader: Iterable | None) -> bool:
        """Train on one batch; True when training stops after it (`should_stop`, one process)."""
        self.batch_idx = batch_idx
        hooks, pos, accumulate = self._callbacks.table, self._pos, self.accumulate_grad_batches
        batch = self._move(batch)
        for fn in hooks["on_batch_start"]:
            fn(self, batch)
        with self._amp.loop_autocast:
            out = self.train_step(batch)
        self._amp.backward(out.loss / accumulate if accumulate > 1 else out.loss)
        for fn in hooks["on_after_backward"]:
            fn(self)
        pos.pending += 1
        stepped = pos.pending == accumulate
        if stepped:
            self._optimizer_step()
        detached = out.loss.detach()
        self.epoch_loss.add(detached, batch_size(out.predictions if out.targets is None else out.targets))
        pos.batches_done = batch_idx + 1
        if stepped and self.val_every_n_steps is not None:
            self._maybe_validate_at_step(val_loader, last_batch=batch_idx + 1 == self.num_batches)
        if hooks["on_batch_end"]:
            outputs = StepOutput(detached, detach(out.predictions), out.targets)
            for fn in hooks["on_batch_end"]:
                fn(self, batch, outputs)
        single = not is_distributed()  # under torchrun: time limit and stop at the epoch's end
        if single and self._deadline is not None and time.monotonic() >= self._deadline:
            raise self._time_limit_reached()
        return self.should_stop and single

    def _optimizer_step(self) -> None:
        self._amp.step(self.optimizer, self.model.parameters, self._before_optimizer_step)
        self._pos.pending = 0
        self.global_step += 1
        self._scheduling.after_optimizer_step()

    def _before_optimizer_step(self) -> None:
        for fn in self._callbacks.table["on_before_optimizer_step"]:
            fn(self, self.optimizer)

    # ----------------------------------------------------------------------------- epoch end
    def _end_epoch(self, val_loader: Iterable | None) -> dict[str, float]:
        """Step on a last, shorter accumulation window, validate, step the scheduler, record the
        epoch's logs and fire ``on_epoch_end``."""
        pos = self._pos
        if pos.pending:
            if pos.pending != self.accumulate_grad_batches:  # a shorter last window: its own mean
                for param in self.model.parameters():
                    if param.grad is not None:
                        param.grad.mul_(self.accumulate_grad_batches / pos.pending)
            self._optimizer_step()
            if self.val_every_n_steps is not None:
                self._maybe_validate_at_step(val_loader, last_batch=True)
        logs = {"loss": self._epoch_mean_loss()}
        if val_loader is not None and self.val_at_epoch_end and pos.validated_at != self.global_step:
            pos.epoch_end_rng = rng_state()  # a stop during the validation saves this one
            logs.update(self._validate(val_loader))
            self._scheduling.after_validation(logs)
        pos.epoch_end_rng = None
        self._scheduling.at_epoch_end(logs)
        logs["lr"] = self.optimizer.param_groups[0]["lr"]
        self.history.append(logs)
        pos.end_epoch()
        self._callbacks.fire("on_epoch_end", logs)
        self.resources.flush()
        return logs

    def _epoch_mean_loss(self) -> float:
        epoch_loss = self.epoch_loss
        if epoch_loss.samples == 0:
            raise ValueError("the training loader yielded no batches")
        if is_distributed():
            count = torch.tensor(float(epoch_loss.samples), device=self.device)
            loss_total, samples = all_reduce(torch.stack([epoch_loss.total, count])).tolist()
        else:
            loss_total, samples = epoch_loss.total.item(), epoch_loss.samples
        mean_loss = loss_total / samples
        if not math.isfinite(mean_loss):
            raise NonFiniteLossError(
                f"training loss is {mean_loss} in epoch {self.epoch + 1}/{self.max_epochs} (by global step "
                f"{self.global_step}); lower the learning rate, clip gradients or check the data"
            )
        return mean_loss

    def _stop_after_epoch(self, epoch: int) -> bool:
        """Whether training stops after `epoch`; under torchrun every rank agrees (a time limit
        passed on any rank raises `TimeLimitReached` on all)."""
        over = self._deadline is not None and time.monotonic() >= self._deadline
        if is_distributed():
            flags = torch.tensor([float(self.should_stop), float(over)], device=self.device)
            stop, over = (bool(flag) for flag in all_reduce(flags, "max").tolist())
            self.should_stop = stop
            if over and not stop and epoch + 1 < self.max_epochs:
                raise self._time_limit_reached()
        return self.should_stop

    def _time_limit_reached(self) -> TimeLimitReached:
        where = f"batch {self.batch_idx + 1}" + (f" of {self.num_batches}" if self.num_batches else "")
        assert self.max_time is not None  # only a fit with a time limit has a deadline
        return TimeLimitReached(
            f"time limit {format_duration(self.max_time)} reached after global step "
            f"{self.global_step} (epoch {self.epoch + 1}, {where})"
        )

    # ----------------------------------------------------------------------------- validation
    def _maybe_validate_at_step(self, val_loader: Iterable | None, last_batch: bool) -> None:
        """After an optimizer step: validate if the global step is a multiple of
        `val_every_n_steps`, unless the epoch-end validation follows at once (`last_batch`)."""
        every = self.val_every_n_steps
        if (
            val_loader is not None
            and every is not None
            and self.global_step % every == 0
            and not (last_batch and self.val_at_epoch_end)
        ):
            self.in_step_validation = True
            try:
                logs = self._validate(val_loader)
            finally:
                self.in_step_validation = False
            self._pos.validated_at = self.global_step
            self._scheduling.after_validation(logs)

    def _validate(self, loader: Iterable) -> dict[str, float]:
        # The unwrapped model: evaluation needs no communication, so ranks may hold uneven shards.
        broadcast_buffers(self.module)
        self._callbacks.fire("on_validation_start")
        batches = loaded(self._validation_batches(loader), lambda index: f"validation batch {index + 1}")
        try:
            sums = self._validation_sums(batches)
        finally:
            batches.close()
        # One device sync (and under torchrun one reduction) for all values of the validation.
        *values, samples = all_reduce(sums).tolist()
        if samples == 0:
            raise ValueError("the validation loader yielded no batches")
        logs = {"val_loss": values[0] / samples}
        logs.update({f"val_{name}": v / samples for name, v in zip(self.metrics, values[1:])})
        self._callbacks.fire("on_validation_end", logs)
        return logs

    def _validation_batches(self, loader: Iterable) -> Iterable:
        if self.limit_val_batches is None:
            return loader
        return itertools.islice(loader, batches_taken(loader, self.limit_val_batches, "limit_val_batches"))

    def _validation_sums(self, loader: Iterable) -> torch.Tensor:
        """The loss and metric sums (weighted by batch size) over `loader`, and the samples, in one tensor."""
        sums = torch.zeros(len(self.metrics) + 2, device=self.device)
        batch_end = self._callbacks.table["on_validation_batch_end"]
        samples = 0
        with self.eval_mode():
            for batch in loader:
                batch = self._move(batch)
                out = self.eval_step(batch)
                n = batch_size(out.predictions if out.targets is None else out.targets)
                sums[0].add_(out.loss.detach().float(), alpha=n)
                if self.metrics:
                    if out.targets is None:
                        raise ValueError("metrics need targets, but eval_step returned StepOutput.targets=None")
                    final = last_output(out.predictions)
                    for index, fn in enumerate(self.metrics.values(), start=1):
                        sums[index].add_(fn(final, out.targets).detach().float(), alpha=n)
                samples += n
                for fn in batch_end:
                    fn(self, batch, out)
        sums[-1] = samples
        return sums


def training_batch(epoch: int) -> Callable[[int], str]:
    """Names the training batches of `epoch` (0-based) for `loaded`."""
    return lambda index: f"training batch {index + 1} of epoch {epoch + 1}"


def loaded(batches: Iterable, describe: Callable[[int], str], first: int = 0) -> Generator[Any]:
    """`batches`, with an error of the loader raised as `BatchLoadError` naming the batch
    (``describe(index)``, counted from `first`).

    Nothing else holds the loader's iterator: closing this generator (as the loop does on every
    path) or an error of the loader ends it, and with it a DataLoader's worker processes. Left to
    a traceback, they would outlive the error, and at the exit of the process Python would wait
    forever for workers that ignore its SIGTERM (`trainer.ignore_stop_signals`).
    """
    iterator = iter(batches)
    del batches
    index = first
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except Exception as exc:
            del iterator
            _release_loader_frames(exc.__traceback__)
            raise BatchLoadError(describe(index), exc) from exc
        yield batch
        index += 1


def _release_loader_frames(traceback: types.TracebackType | None) -> None:
    """Clear the local variables of `torch.utils.data`'s finished frames in `traceback`: they hold
    the DataLoader's iterator. The frames of the user's own code keep theirs."""
    while traceback is not None:
        frame = traceback.tb_frame
        if str(frame.f_globals.get("__name__", "")).startswith("torch.utils.data"):
            frame.clear()
        traceback = traceback.tb_next


def batches_taken(loader: Iterable, limit: int | float | None, name: str) -> int | None:
    """How many batches of `loader` a pass takes under `limit` (see
    `trainer.options.check_batch_limit`; `name` is the option's): all of them (None for a loader
    without a length) when there is no limit; a fraction keeps at least one batch."""
    try:
        count: int | None = len(loader)  # type: ignore[arg-type]
    except TypeError:
        count = None  # an iterable dataset, a generator
    if limit is None:
        return count
    if isinstance(limit, int):
        return limit if count is None else min(limit, count)
    if count is None:
        raise ValueError(f"{name}={limit} is a fraction, but the loader has no length; give a number of batches")
    return max(1, int(count * limit))
