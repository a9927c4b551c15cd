"""`Precision`: how one fit computes: autocast, the backward pass, the optimizer step (grad scaler,
gradient clipping) and the check that the device can run the precision asked for."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

from trainer.batch import peek_batch, split_batch
from trainer.distributed import broadcast_object, is_rank_zero
from trainer.precision import PrecisionChoice, choose_precision, convolution_kernels

#: The autocast dtype of each precision that uses one.
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "16-mixed": torch.float16}


def check_device(precision: str, device: torch.device) -> None:
    """A ValueError when `device` cannot train in `precision` (float16 with a grad scaler needs CUDA).

    Args:
        precision: ``"32"``, ``"bf16"`` or ``"16-mixed"``.
        device: where the model trains.
    """
    if precision == "16-mixed" and device.type != "cuda":
        raise ValueError("precision '16-mixed' needs a CUDA device; use 'bf16' or '32' on the CPU")


class Precision:
    """One resolved precision on one device, built once per fit (and for `predict` or
    `validate` before any fit, from the precision given, ``"auto"`` counting as ``"32"``).

    Args:
        precision: ``"32"``, ``"bf16"`` or ``"16-mixed"``.
        device: where the model runs; checked by `check_device`.
        onednn: whether CPU convolutions use oneDNN (see `trainer.precision.convolution_kernels`).
        grad_clip_norm: clip the gradients' global 2-norm to this value before each step (None: no clipping).
    """

    def __init__(
        self, precision: str, device: torch.device, onednn: bool = True, grad_clip_norm: float | None = None
    ) -> None:
        check_device(precision, device)
        self.precision, self.device, self.onednn, self.grad_clip_norm = precision, device, onednn, grad_clip_norm
        self.dtype = AUTOCAST_DTYPES.get(precision)
        #: The grad scaler of ``16-mixed`` (None otherwise).
        self.scaler = torch.amp.GradScaler("cuda") if precision == "16-mixed" else None
        # One context object for the loop, entered once per batch (never nested); `autocast` makes new ones.
        self.loop_autocast = self.autocast()

    def autocast(self) -> contextlib.AbstractContextManager:
        """A new autocast context of this precision (a no-op context for ``"32"``)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def kernels(self) -> contextlib.AbstractContextManager:
        """The convolution kernels of this precision's choice (see `convolution_kernels`)."""
        return convolution_kernels(self.onednn)

    @contextlib.contextmanager
    def evaluating(self, model: nn.Module) -> Iterator[nn.Module]:
        """`model` in eval mode under no grad, this autocast and these kernels; its training mode
        is restored afterwards. Everything that runs the model outside the loop goes through it.

        Args:
            model: the (unwrapped) model.
        """
        with evaluating(model), self.autocast(), self.kernels():
            yield model

    def backward(self, loss: torch.Tensor) -> None:
        """The backward pass of `loss` (scaled by the grad scaler with ``16-mixed``).

        Args:
            loss: the (accumulation-scaled) batch loss.
        """
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(
        self,
        optimizer: torch.optim.Optimizer,
        parameters: Callable[[], Iterator[nn.Parameter]],
        before: Callable[[], None],
    ) -> None:
        """One optimizer step: unscale the gradients (``16-mixed``), clip them to
        `grad_clip_norm` over `parameters()`, call `before` (the ``on_before_optimizer_step``
        hooks, which see the gradients the optimizer uses), step (through the scaler, which skips
        steps with infinite gradients) and zero the gradients.

        Args:
            optimizer: the optimizer to step.
            parameters: returns the parameters whose gradients are clipped.
            before: called just before the step.
        """
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)
        if self.grad_clip_norm is not None:
            nn.utils.clip_grad_norm_(parameters(), self.grad_clip_norm)
        before()
        if self.scaler is not None:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """`model` in eval mode under no grad; its training mode is restored afterwards. The one eval
    path of the trainer package (with `Precision.evaluating` adding autocast and kernels).

    Args:
        model: the model to run.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)


def resolve_choice(
    module: nn.Module,
    device: torch.device,
    loader: Iterable,
    precision: str,
    channels_last: bool | str,
    saved: dict[str, Any] | None,
) -> PrecisionChoice:
    """The choice ``"auto"`` precision or memory format resolve to at the start of a fit: the
    one a resumed checkpoint saved, else the machine's (`choose_precision` on rank 0, on the
    first batch of `loader`; every rank applies the same), printed once. Explicit values win.

    Args:
        module: the model (unwrapped).
        device: where it trains.
        loader: the training loader (its first batch is the probe's example).
        precision: ``"auto"`` or an explicit precision.
        channels_last: ``"auto"``, True or False.
        saved: the ``"precision"`` entry of the checkpoint resumed from, or None.
    """
    if saved is not None:
        choice = PrecisionChoice(
            saved["precision"], saved["channels_last"], "saved in the checkpoint", saved.get("onednn", True)
        )
    elif is_rank_zero():
        choice = choose_precision(module, device, split_batch(peek_batch(loader))[0], precision, channels_last)
    else:
        choice = None
    choice = broadcast_object(choice)
    if precision != "auto" and choice.precision != precision:
        choice = dataclasses.replace(choice, precision=precision)
    if channels_last != "auto" and choice.channels_last != channels_last:
        choice = dataclasses.replace(choice, channels_last=channels_last)
    check_device(choice.precision, device)
    if is_rank_zero():
        print(f"Trainer: {choice}")
    return choice
