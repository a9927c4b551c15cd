"""`ConfusionMatrixCallback`: the confusion matrix of each validation of a label-map segmentation,
counted over the whole validation, as a figure in TensorBoard and as the scores computed from it
(IoU, Dice) in the validation logs."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from trainer.batch import last_output
from trainer.callbacks.figures import DPI, FONT_SIZE, WIDTH, log_figure
from trainer.callbacks.palette import class_names
from trainer.callbacks.tensorboard import TensorBoardWriterCallback
from trainer.distributed import all_reduce

#: The largest side of the confusion figure, in pixels, whatever the number of classes.
MAX_SIDE = 1600
#: Up to this many classes each cell shows its share in percent; beyond, the cells are too small.
CELL_TEXT_CLASSES = 12
#: At most this many classes are named along each axis (every n-th class beyond).
MAX_TICK_LABELS = 50

#: ``score(counts) -> (K,)``: per-class scores of a (K, K) confusion matrix, NaN for a class with none.
Score = Callable[[torch.Tensor], torch.Tensor]


def confusion_figure(counts: torch.Tensor, classes: Sequence[str] | None = None) -> Figure:
    """A matplotlib figure of a (K, K) confusion matrix: row = true class, column = predicted
    class, each cell coloured by the share of its row (the fraction of that class's pixels
    predicted as each class) and, for up to `CELL_TEXT_CLASSES` classes, labelled with that
    share in percent; the row's pixel count beside its name. Built on the Agg canvas, without
    pyplot.

    Its size is bounded whatever K is: at most `MAX_SIDE` pixels a side (150 or 300 classes, as
    in ADE20K, take the same memory as 25), at most `MAX_TICK_LABELS` class names per axis.

    Args:
        counts: (K, K) pixel counts.
        classes: the K class names (default ``class 0`` ...).
    """
    counts = counts.detach().cpu().double()
    k = counts.shape[0]
    names = class_names(list(classes) if classes is not None else None, k)
    shares = (counts / counts.sum(1, keepdim=True).clamp(min=1)).numpy()
    side = min(MAX_SIDE, max(WIDTH, 120 + 60 * k))
    fig = Figure(figsize=(side / DPI, side / DPI), dpi=DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.3, 0.08, 0.66, 0.66))
    ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    small = max(8, FONT_SIZE - 2 * max(0, k - 4))
    if k <= CELL_TEXT_CLASSES:
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
    every = math.ceil(k / MAX_TICK_LABELS)
    ticks = range(0, k, every)
    rows = counts.sum(1).tolist()
    ax.set_xticks(ticks, [names[i] for i in ticks], rotation=45 if every == 1 else 90, ha="left", fontsize=small)
    ax.xaxis.tick_top()
    ax.set_yticks(ticks, [f"{names[i]} ({int(rows[i])})" for i in ticks], fontsize=small)
    shown = "" if every == 1 else f", every {every}th class named"
    ax.set_xlabel(f"predicted class{shown}", fontsize=FONT_SIZE)
    ax.set_ylabel("true class (pixels)", fontsize=FONT_SIZE)
    fig.suptitle("% of each true class", fontsize=FONT_SIZE, x=0.63, y=0.99)
    return fig


def confusion_cells(logits: torch.Tensor, targets: torch.Tensor, k: int, ignore_index: int) -> torch.Tensor:
    """The confusion-matrix cell of every pixel, flat: ``true * k + predicted`` (the argmax of
    `logits` (N, K, H, W) for `targets` (N, H, W)), and ``k * k`` for a pixel left out (its target
    is `ignore_index` or no class in ``[0, k)``).

    Counted into ``k * k + 1`` cells by ``scatter_add_``, every pixel in one tensor of a size known
    in advance: boolean-mask indexing and ``bincount`` size their output from the data, which on
    CUDA makes the host wait for the device at every batch.
    """
    counted = (targets != ignore_index) & (targets >= 0) & (targets < k)
    return torch.where(counted, targets.long() * k + logits.argmax(1), k * k).flatten()


class ConfusionMatrixCallback(TensorBoardWriterCallback):
    """Count the confusion matrix of every validation of a label-map segmentation over all its
    batches; log it as a figure (`confusion_figure`) at the global step of that validation, and,
    given `metrics`, add the scores computed from it to the validation logs.

    The model's logits are (N, K, H, W) and the targets (N, H, W) class indices; the predicted
    class of a pixel is the argmax of its logits, and pixels whose target is `ignore_index` are
    left out: a batch with no labelled pixels adds nothing. The counts stay on the device during
    validation and are read once at its end; under torchrun every rank counts its share, the
    counts are summed over ranks and every rank logs the same scores (rank 0 draws the figure).

    With ``metrics={"iou": confusion_iou, "dice": confusion_dice}`` (from `models.metrics`) each
    validation's logs get ``val_iou`` and ``val_dice``: the mean over the classes present in the
    validation's truth or prediction; a class absent from both has no score (NaN) and is left
    out of the mean (NaN when no class is present). For the names in `per_class` they also get
    each class's score, ``val_iou_<class>`` (NaN when the class is absent). The callback runs
    before the callbacks that read the logs (``order`` -20: before `EarlyStopping`, the loggers
    and `ModelCheckpoint`), so they see these values. `log_keys` lists the log keys it adds.

    Args:
        log_dir: the run directory (shared with the run's other TensorBoard callbacks).
        classes: the K class names, in index order.
        ignore_index: the target value of pixels of no class.
        tag: the tag of the figure.
        metrics: ``{name: score}``, each ``score(counts) -> (K,)`` per-class scores of the
            (K, K) counts, NaN for a class without one; logged as ``val_<name>``.
        per_class: the names of `metrics` whose per-class scores are logged too.
    """

    rank_zero_only = False  # every rank counts its share of the validation data
    order = -20  # the scores are in the logs before anything reads them

    def __init__(
        self,
        log_dir: str | os.PathLike,
        classes: Sequence[str],
        ignore_index: int = 255,
        tag: str = "confusion matrix",
        metrics: Mapping[str, Score] | None = None,
        per_class: Iterable[str] = (),
    ) -> None:
        super().__init__(log_dir)
        if len(classes) < 2:
            raise ValueError(f"a confusion matrix needs at least 2 classes, got {list(classes)}")
        self.classes, self.ignore_index, self.tag = list(classes), int(ignore_index), tag
        self.metrics = dict(metrics or {})
        self.per_class = list(per_class)
        unknown = [name for name in self.per_class if name not in self.metrics]
        if unknown:
            raise ValueError(f"per_class names {unknown}, which are not among the metrics {list(self.metrics)}")
        self.counts: torch.Tensor | None = None  # (K, K) of the current or last validation

    @property
    def log_keys(self) -> list[str]:
        """The keys this callback adds to each validation's logs: ``val_<metric>``, then
        ``val_<metric>_<class>`` for the metrics in `per_class`."""
        keys = [f"val_{name}" for name in self.metrics]
        return keys + [f"val_{name}_{cls}" for name in self.per_class for cls in self.classes]

    def on_validation_start(self, trainer) -> None:
        k = len(self.classes)
        self.counts = torch.zeros(k * k + 1, dtype=torch.int64, device=trainer.device)  # + the left-out pixels

    def on_validation_batch_end(self, trainer, batch, outputs) -> None:
        logits, targets = last_output(outputs.predictions), outputs.targets
        k = len(self.classes)
        if logits.dim() < 2 or logits.shape[1] != k or logits.shape[:1] + logits.shape[2:] != targets.shape:
            raise ValueError(
                f"ConfusionMatrixCallback expects logits (N, {k}, H, W) and class indices (N, H, W), got "
                f"{tuple(logits.shape)} and {tuple(targets.shape)}"
            )
        assert self.counts is not None  # made by on_validation_start
        cells = confusion_cells(logits, targets, k, self.ignore_index)
        self.counts.scatter_add_(0, cells, torch.ones_like(cells))

    def on_validation_end(self, trainer, logs) -> None:
        k = len(self.classes)
        assert self.counts is not None  # made by on_validation_start
        self.counts = all_reduce(self.counts[: k * k].contiguous()).view(k, k)
        if self.metrics:
            logs.update(self.scores(self.counts))
        if self.writer is not None:
            log_figure(self.writer, self.tag, confusion_figure(self.counts.cpu(), self.classes), trainer.global_step)

    def scores(self, counts: torch.Tensor) -> dict[str, float]:
        """The log values of `counts` (see `log_keys`), read from the device at once.

        Args:
            counts: a (K, K) confusion matrix.
        """
        per_class = {name: score(counts).float() for name, score in self.metrics.items()}
        means = torch.stack([values.nanmean() for values in per_class.values()])
        detail = [per_class[name] for name in self.per_class]
        values = torch.cat([means, *detail]).tolist()  # one transfer
        return dict(zip(self.log_keys, values))
