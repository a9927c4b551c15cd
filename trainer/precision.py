"""How a run computes: the precisions and their autocast dtypes, the `PrecisionChoice` a run trains
with, and `Precision` (autocast, backward pass and optimizer step of one fit, and evaluation). What
``"auto"`` resolves to is decided in `trainer.precision_probe`, loaded only when it is asked.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch import nn

#: Accepted spellings of each precision.
PRECISIONS = {
    "32": "32",
    "32-true": "32",
    "fp32": "32",
    "bf16": "bf16",
    "bf16-mixed": "bf16",
    "16-mixed": "16-mixed",
    "16": "16-mixed",
    "fp16": "16-mixed",
}
#: The autocast dtype of each precision (None: float32, no autocast).
AUTOCAST_DTYPES = {"32": None, "bf16": torch.bfloat16, "16-mixed": torch.float16}


@dataclass(frozen=True)
class PrecisionChoice:
    """The settings a run trains with and why.

    Attributes:
        precision: ``"32"``, ``"bf16"`` or ``"16-mixed"``.
        channels_last: whether 4-D inputs and the model take the channels-last memory format.
        reason: why these settings were chosen, in full: the CPU's features, each setting's
            measured time, the cache file.
        onednn: False: CPU convolutions use PyTorch's own kernels instead of oneDNN's (see
            `convolution_kernels`).
        summary: why, in a few words (``"no native bf16, from cache"``), for the line printed at
            the start of a fit; empty: `reason` is printed instead."""

    precision: str
    channels_last: bool
    reason: str
    onednn: bool = True
    summary: str = ""

    def __str__(self) -> str:
        """What was chosen and why in a few words: ``precision: 32, contiguous (no native bf16, measured)``."""
        layout = "channels-last" if self.channels_last else "contiguous"
        kernels = "" if self.onednn else ", native conv"
        return f"precision: {self.precision}, {layout}{kernels} ({self.summary or self.reason})"

    @classmethod
    def recorded(cls, entry: dict[str, Any], reason: str) -> PrecisionChoice:
        """The choice a checkpoint's ``"precision"`` entry records, with the `reason` it was kept for."""
        return cls(entry["precision"], entry["channels_last"], reason, entry.get("onednn", True))

    def as_dict(self) -> dict[str, Any]:
        """The choice as plain values, e.g. for a run's configuration file."""
        return asdict(self)


def normalize_precision(precision: str) -> str:
    """``"auto"`` or the canonical name of `precision`; a clear ValueError for anything else."""
    if str(precision) == "auto":
        return "auto"
    if str(precision) not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; use 'auto', '32', 'bf16' or '16-mixed'")
    return PRECISIONS[str(precision)]


def check_channels_last(channels_last: Any) -> bool | Literal["auto"]:
    """`channels_last` if it is True, False or ``"auto"``; a clear ValueError otherwise."""
    if channels_last is True or channels_last is False or channels_last == "auto":
        return channels_last
    raise ValueError(f"channels_last must be True, False or 'auto', got {channels_last!r}")


def check_device(precision: str, device: torch.device) -> None:
    """A ValueError when `device` cannot train in `precision` (float16 with a grad scaler needs CUDA).

    Args:
        precision: ``"32"``, ``"bf16"`` or ``"16-mixed"``.
        device: where the model trains.
    """
    if precision == "16-mixed" and device.type != "cuda":
        raise ValueError("precision '16-mixed' needs a CUDA device; use 'bf16' or '32' on the CPU")


def autocast(precision: str, device_type: str) -> contextlib.AbstractContextManager:
    """A new autocast context of `precision` on devices of `device_type` (``"cpu"``, ``"cuda"``):
    a no-op context for ``"32"``."""
    dtype = AUTOCAST_DTYPES[precision]
    return contextlib.nullcontext() if dtype is None else torch.autocast(device_type, dtype=dtype)


@contextlib.contextmanager
def convolution_kernels(onednn: bool = True) -> Iterator[None]:
    """Run CPU convolutions with oneDNN's kernels (`onednn`, PyTorch's default) or with PyTorch's
    own; the previous setting is restored on exit. A no-op where oneDNN is not built in."""
    if not torch.backends.mkldnn.is_available() or torch.backends.mkldnn.enabled == onednn:
        yield
        return
    previous = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = onednn  # type: ignore[assignment]  # a module property the stubs type as its descriptor
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = previous


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


class Precision:
    """One resolved precision on one device, built once per fit (and for `predict` or
    `validate` before any fit, from the precision given, ``"auto"`` counting as ``"32"``).

    Args:
        precision: ``"32"``, ``"bf16"`` or ``"16-mixed"``.
        device: where the model runs; checked by `check_device`.
        onednn: whether CPU convolutions use oneDNN (see `convolution_kernels`).
        grad_clip_norm: clip the gradients' global 2-norm to this value before each step (None: no clipping).
    """

    def __init__(
        self, precision: str, device: torch.device, onednn: bool = True, grad_clip_norm: float | None = None
    ) -> None:
        check_device(precision, device)
        self.precision, self.device, self.onednn, self.grad_clip_norm = precision, device, onednn, grad_clip_norm
        #: The grad scaler of ``16-mixed`` (None otherwise).
        self.scaler = torch.amp.GradScaler("cuda") if precision == "16-mixed" else None
        # One context object for the loop, entered once per batch (never nested); `autocast` makes new ones.
        self.loop_autocast = self.autocast()

    def autocast(self) -> contextlib.AbstractContextManager:
        """A new autocast context of this precision (a no-op context for ``"32"``)."""
        return autocast(self.precision, self.device.type)

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

    def warn_unfused(self, optimizer: torch.optim.Optimizer) -> None:
        """Warn when the grad scaler of ``16-mixed`` would wait on the GPU at every step of `optimizer`."""
        if self.scaler is not None and not getattr(optimizer, "_step_supports_amp_scaling", False):
            warnings.warn(
                f"precision '16-mixed' with a {type(optimizer).__name__} that is not fused: the grad scaler "
                f"waits on the GPU at every step to check for infinite gradients; create the optimizer with "
                f"fused=True to keep the loop free of host syncs",
                RuntimeWarning,
                stacklevel=3,
            )

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
