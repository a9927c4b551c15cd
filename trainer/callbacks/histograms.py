"""`HistogramCallback`: weights and gradients per layer as TensorBoard histograms."""

from __future__ import annotations

import os

import torch

from trainer.callbacks.tensorboard import TensorBoardWriterCallback
from trainer.options import positive_int


class HistogramCallback(TensorBoardWriterCallback):
    """Every `every_n_epochs` epochs, at the epoch's end, a histogram of each parameter's values
    (``weights/<name>``) and of its gradient at the epoch's last optimizer step
    (``gradients/<name>``), at the global step (Histograms and Distributions tabs).

    The gradients are the ones the optimizer used: at the epoch's last step (at every step of a
    loader without a length) ``on_before_optimizer_step`` keeps a reference to them, unscaled and
    clipped, before they are cleared; no copy, no extra forward or backward pass. Histograms need the values on the CPU,
    so this costs a device sync per parameter at those epoch ends only.

    Args:
        log_dir: the run directory (shared with the run's other TensorBoard callbacks).
        every_n_epochs: how often, in epochs.
    """

    def __init__(self, log_dir: str | os.PathLike, every_n_epochs: int = 1) -> None:
        super().__init__(log_dir)
        self.every_n_epochs = positive_int("every_n_epochs", every_n_epochs)
        self._grads: dict[str, torch.Tensor] = {}

    def _due(self, trainer) -> bool:
        return (trainer.epoch + 1) % self.every_n_epochs == 0

    def on_fit_start(self, trainer) -> None:
        self._grads = {}

    def on_before_optimizer_step(self, trainer, optimizer) -> None:
        last = trainer.num_batches is None or trainer.batch_idx + 1 >= trainer.num_batches
        if last and self._due(trainer):
            self._grads = {name: p.grad for name, p in trainer.module.named_parameters() if p.grad is not None}

    def on_epoch_end(self, trainer, logs) -> None:
        if not self._due(trainer):
            return
        step = trainer.global_step
        for name, param in trainer.module.named_parameters():
            self._rank_zero_writer().add_histogram(f"weights/{name}", param.detach().float().cpu(), step)
            if name in self._grads:
                self._rank_zero_writer().add_histogram(f"gradients/{name}", self._grads[name].float().cpu(), step)
        self._grads = {}

    def on_fit_end(self, trainer) -> None:
        self._grads = {}
