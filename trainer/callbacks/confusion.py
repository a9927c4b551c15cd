"""`ConfusionMatrixCallback`: the confusion matrix of each validation of a label-map segmentation,
as a figure in TensorBoard."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from trainer.batch import last_output
from trainer.callbacks.figures import DPI, FONT_SIZE, WIDTH, log_figure
from trainer.callbacks.palette import class_names
from trainer.callbacks.tensorboard import TensorBoardWriterCallback
from trainer.distributed import all_reduce


def confusion_figure(counts: torch.Tensor, classes: Sequence[str] | None = None) -> Figure:
    """A matplotlib figure of a (K, K) confusion matrix: row = true class, column = predicted
    class, each cell coloured by the share of its row (the fraction of that class's pixels
    predicted as each class) and labelled with that share in percent; the row's pixel count
    beside its name. Built on the Agg canvas, without pyplot.

    Args:
        counts: (K, K) pixel counts.
        classes: the K class names (default ``class 0`` ...).
    """
    counts = counts.detach().cpu().double()
    k = counts.shape[0]
    names = class_names(list(classes) if classes is not None else None, k)
    shares = (counts / counts.sum(1, keepdim=True).clamp(min=1)).numpy()
    side = max(WIDTH, 120 + 60 * k)
    fig = Figure(figsize=(side / DPI, side / DPI), dpi=DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.3, 0.08, 0.66, 0.66))
    ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    small = max(8, FONT_SIZE - 2 * max(0, k - 4))
    if k <= 12:  # beyond that the cells are too small for text
        for (row, column), share in np.ndenumerate(shares):
            ax.text(
                column,
                row,
                f"{100 * share:.0f}",
                ha="center",
                va="center",
                fontsize=small,
                color="white" if share > 0.5 else "black",
            )
    ax.set_xticks(range(k), names, rotation=45, ha="left", fontsize=small)
    ax.xaxis.tick_top()
    ax.set_yticks(range(k), [f"{name} ({int(n)})" for name, n in zip(names, counts.sum(1).tolist())], fontsize=small)
    ax.set_xlabel("predicted class", fontsize=FONT_SIZE)
    ax.set_ylabel("true class (pixels)", fontsize=FONT_SIZE)
    fig.suptitle("% of each true class", fontsize=FONT_SIZE, x=0.63, y=0.99)
    return fig


class ConfusionMatrixCallback(TensorBoardWriterCallback):
    """Log the confusion matrix of every validation of a label-map segmentation as a figure
    (`confusion_figure`), at the global step of that validation.

    The model's logits are (N, K, H, W) and the targets (N, H, W) class indices; the predicted
    class of a pixel is the argmax of its logits, and pixels whose target is `ignore_index` are
    left out. The counts stay on the device during validation and are read once at its end;
    under torchrun every rank counts its share and rank 0 logs their sum.

    Args:
        log_dir: the run directory (shared with the run's other TensorBoard callbacks).
        classes: the K class names, in index order.
        ignore_index: the target value of pixels of no class.
        tag: the tag of the figure.
    """

    rank_zero_only = False  # every rank counts its share of the validation data

    def __init__(
        self, log_dir: str | os.PathLike, classes: Sequence[str], ignore_index: int = 255, tag: str = "confusion matrix"
    ) -> None:
        super().__init__(log_dir)
        if len(classes) < 2:
            raise ValueError(f"a confusion matrix needs at least 2 classes, got {list(classes)}")
        self.classes, self.ignore_index, self.tag = list(classes), int(ignore_index), tag
        self.counts: torch.Tensor | None = None  # (K, K) of the current or last validation

    def on_validation_start(self, trainer) -> None:
        k = len(self.classes)
        self.counts = torch.zeros(k * k, dtype=torch.int64, device=trainer.device)

    def on_validation_batch_end(self, trainer, batch, outputs) -> None:
        logits, targets = last_output(outputs.predictions), outputs.targets
        k = len(self.classes)
        if logits.dim() < 2 or logits.shape[1] != k or logits.shape[:1] + logits.shape[2:] != targets.shape:
            raise ValueError(
                f"ConfusionMatrixCallback expects logits (N, {k}, H, W) and class indices (N, H, W), got "
                f"{tuple(logits.shape)} and {tuple(targets.shape)}"
            )
        counted = targets != self.ignore_index
        cells = targets[counted].long() * k + logits.argmax(1)[counted]
        assert self.counts is not None  # made by on_validation_start
        self.counts.add_(torch.bincount(cells, minlength=k * k)[: k * k])

    def on_validation_end(self, trainer, logs) -> None:
        k = len(self.classes)
        assert self.counts is not None  # made by on_validation_start
        self.counts = all_reduce(self.counts).view(k, k)
        if self.writer is not None:
            log_figure(self.writer, self.tag, confusion_figure(self.counts.cpu(), self.classes), trainer.global_step)
