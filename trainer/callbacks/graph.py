"""`GraphCallback`: the model graph in TensorBoard's Graphs tab."""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from typing import Any

import torch
from tensorboard.compat.proto.event_pb2 import Event

from trainer.batch import split_batch
from trainer.callbacks.tensorboard import TensorBoardWriterCallback, take_batch
from trainer.graph_def import first_line, graph_def
from trainer.precision import evaluating


class GraphCallback(TensorBoardWriterCallback):
    """Log the model graph once, at fit start, from one example batch (not again on resume).

    The graph comes from `trainer.graph_def.graph_def`: `torch.export` (or `torch.fx` where
    export fails) in eval mode with no grad, so batch-norm statistics are left untouched, and
    models that take dicts or return lists (deep supervision) work. Only where both fail is
    `SummaryWriter.add_graph` (TorchScript tracing) tried, with its tracer output kept out of the
    user's output. If that fails too, training goes on and one `RuntimeWarning` says why.

    Args:
        log_dir: the run directory (shared with the run's other TensorBoard callbacks).
        example: model input (a tensor, or a dict or sequence of tensors), or an
            ``(inputs, targets)`` batch (a pair, or a dict with "inputs" and "targets"); default:
            the inputs of the first validation (or training) batch, cut to `num_samples`.
        num_samples: how many samples of the default batch the graph is built from.
    """

    def __init__(self, log_dir: str | os.PathLike, example: Any = None, num_samples: int = 2) -> None:
        super().__init__(log_dir)
        self.example, self.num_samples = example, num_samples

    def on_fit_start(self, trainer) -> None:
        if self.resumed:
            return
        example = take_batch(trainer, self.example, self.num_samples)
        if self.example is None:
            example = split_batch(example)[0]
        elif isinstance(example, (tuple, list, dict)):
            with contextlib.suppress(TypeError):  # not an (inputs, targets) batch: the model's own input
                example = split_batch(example)[0]
        model, example = trainer.module, trainer.to_device(example)
        try:
            graph = graph_def(model, example)
        except RuntimeError as exc:
            self._trace_or_warn(model, example, str(exc))
        else:
            # The event TensorBoard's Graphs tab reads, written to the run's one event stream.
            self._rank_zero_writer().file_writer.add_event(  # type: ignore[attr-defined]  # open during a fit
                Event(graph_def=graph.SerializeToString())
            )

    def _trace_or_warn(self, model: torch.nn.Module, example: Any, reasons: str) -> None:
        """The last resort: TorchScript tracing through `add_graph`, where torch.jit still works."""
        try:
            # add_graph prints trace errors itself; they reach the user once, as the warning below.
            with evaluating(model), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore", FutureWarning)
                warnings.simplefilter("ignore", DeprecationWarning)
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                self._rank_zero_writer().add_graph(model, example, use_strict_trace=False)
        except Exception as exc:  # noqa: BLE001 - a graph is a nicety; training must go on
            warnings.warn(
                f"GraphCallback: could not graph {type(model).__name__} ({reasons}; "
                f"torch.jit.trace: {first_line(exc)}); training goes on without the model graph",
                RuntimeWarning,
                stacklevel=3,
            )
