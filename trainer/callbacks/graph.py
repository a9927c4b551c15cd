"""`GraphCallback`: the model graph in TensorBoard's Graphs tab."""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from typing import Any

import torch

from trainer.batch import move_to_device, split_batch
from trainer.callbacks.tensorboard import TensorBoardWriterCallback, take_batch


class GraphCallback(TensorBoardWriterCallback):
    """Log the model graph (`SummaryWriter.add_graph`) once, at fit start, from one example batch.

    The model is traced in eval mode (so batch-norm statistics are left untouched) with a
    non-strict trace, so models that return a list (deep supervision) work. If tracing fails,
    training goes on and one warning says why. The tracer's deprecation and tracer warnings
    are kept out of the user's output.

    Args:
        log_dir: the run directory (shared with the run's other TensorBoard callbacks).
        example: model input (or an ``(inputs, targets)`` batch); default: the inputs of the
            first validation (or training) batch, cut to `num_samples`.
    """

    def __init__(self, log_dir: str | os.PathLike, example: Any = None, num_samples: int = 2) -> None:
        super().__init__(log_dir)
        self.example, self.num_samples = example, num_samples

    def on_fit_start(self, trainer) -> None:
        super().on_fit_start(trainer)
        if self.resumed:
            return
        example = take_batch(trainer, self.example, self.num_samples)
        if self.example is None or isinstance(example, (tuple, list, dict)):
            example = split_batch(example)[0]
        model = trainer.module
        example = move_to_device(example, trainer.device, trainer.channels_last)
        was_training = model.training
        model.eval()
        try:
            # add_graph prints trace errors itself; they reach the user once, as the warning below.
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore", FutureWarning)
                warnings.simplefilter("ignore", DeprecationWarning)
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                self.writer.add_graph(model, example, use_strict_trace=False)
        except Exception as exc:  # noqa: BLE001 - a graph is a nicety; training must go on
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            warnings.warn(
                f"GraphCallback: could not trace {type(model).__name__} ({type(exc).__name__}: "
                f"{message}); training goes on without the model graph",
                RuntimeWarning,
                stacklevel=2,
            )
        finally:
            model.train(was_training)
