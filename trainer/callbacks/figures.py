"""`PredictionFigureCallback`: matplotlib figures of predictions vs. ground truth in TensorBoard.

Figures are built with `matplotlib.figure.Figure` on the Agg canvas, never with pyplot's global
state, and cleared after use.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from trainer.batch import last_output, split_batch
from trainer.callbacks.palette import class_colours, class_names, colour_masks, is_label_batch, label_masks
from trainer.callbacks.tensorboard import TensorBoardWriterCallback, denormalize, stretch_contrast, take_batch
from trainer.every import Every

KINDS = ("classification", "segmentation")


#: Figures are drawn for TensorBoard's cards, which show an image scaled to the card's width
#: (about 340 pixels by default) unless "Show actual image size" is on: a figure is `WIDTH`
#: pixels wide with two panels per row, and its text `FONT_SIZE` pixels high, so that both stay
#: legible at that width (text of at least 10 pixels).
DPI = 72  # one point is one pixel
WIDTH = 480
CARD_WIDTH = 340
FONT_SIZE = 16
LEGEND_FONT_SIZE = 15
COLUMNS = 2
_PANEL, _MARGIN, _ROW_GAP = 216, 16, 10
_TITLE_LINE = round(FONT_SIZE * 1.45)
#: Colours of the one-class overlay: truth alone, prediction alone, both.
OVERLAY_COLOURS = {"truth only": (0.0, 1.0, 0.0), "prediction only": (1.0, 0.0, 0.0), "both": (1.0, 1.0, 0.0)}


def _rows(count: int, columns: int = COLUMNS) -> int:
    return -(-count // columns)


def _height(count: int, title_lines: int, top: int) -> int:
    """Pixel height of a figure of `count` panels with titles of `title_lines` lines under a band
    of `top` pixels (legend)."""
    return top + _rows(count) * (title_lines * _TITLE_LINE + _PANEL + _ROW_GAP) + _MARGIN // 2


def _panel(fig: Figure, index: int, top: int, title_lines: int, image: torch.Tensor, title: str, **style: Any) -> None:
    """Show a (C, H, W) image in [0, 1] titled `title` as panel `index`, left to right and top to
    bottom, `COLUMNS` per row, under a band of `top` pixels.

    On a figure drawn before with the same layout, the panel's image and title are updated in
    place: redrawing costs a fraction of building the figure anew.
    """
    array = image.numpy()
    array = array[0] if array.shape[0] == 1 else np.transpose(array[:3], (1, 2, 0))
    if index < len(fig.axes):
        ax = fig.axes[index]
        ax.images[0].set_data(array)
    else:
        width, height = fig.get_size_inches() * fig.dpi
        row, column = divmod(index, COLUMNS)
        gap = (width - COLUMNS * _PANEL) / (COLUMNS + 1)
        left = gap + column * (_PANEL + gap)
        below_top = top + row * (title_lines * _TITLE_LINE + _PANEL + _ROW_GAP) + title_lines * _TITLE_LINE
        ax = fig.add_axes((left / width, 1 - (below_top + _PANEL) / height, _PANEL / width, _PANEL / height))
        if array.ndim == 2:
            ax.imshow(array, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
        else:
            ax.imshow(array, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
    ax.set_title(title, fontsize=FONT_SIZE, pad=4, **style)


def _new_or_reused(fig: Figure | None, panels: int, height: int) -> tuple[Figure, bool]:
    """`fig` when it already has `panels` panels and that height, else a new `WIDTH` x `height`
    pixel figure on the Agg canvas; and whether it is new (its legend then needs drawing)."""
    size = (WIDTH / DPI, height / DPI)
    if fig is not None and len(fig.axes) == panels and tuple(fig.get_size_inches()) == size:
        return fig, False
    fig = Figure(figsize=size, dpi=DPI)
    FigureCanvasAgg(fig)
    return fig, True


def _legend(fig: Figure, colours: Sequence[Any], names: Sequence[str], columns: int) -> None:
    """A legend of coloured patches across the top of `fig`."""
    handles = [Patch(facecolor=c, edgecolor="0.3", label=n) for c, n in zip(colours, names)]
    fig.legend(
        handles=handles,
        loc="upper center",
        bbox_to_anchor=(0.5, 1.0),
        ncol=columns,
        frameon=False,
        fontsize=LEGEND_FONT_SIZE,
        handlelength=1.0,
        handletextpad=0.4,
        columnspacing=1.0,
        borderaxespad=0.3,
    )


def _legend_height(entries: int, columns: int) -> int:
    return 8 + _rows(entries, columns) * round(LEGEND_FONT_SIZE * 1.6)


def figure_to_array(fig: Figure) -> np.ndarray:
    """Render `fig` on its Agg canvas into an (H, W, 3) uint8 array."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def log_figure(writer: Any, tag: str, figure: Figure, step: int) -> None:
    """Add a matplotlib `figure` to TensorBoard under `tag` at `step`, as
    `SummaryWriter.add_figure` would (an image of the rendered figure), without pyplot.

    Build the figure with ``matplotlib.figure.Figure(...)`` (no pyplot state, nothing to close);
    it is rendered on the Agg canvas. Importing pyplot, which ``add_figure`` does, slowed a
    training loop by about 20% on a 2-core CPU.

    Args:
        writer: a `SummaryWriter`, e.g. ``self.writer`` of a `TensorBoardWriterCallback`.
        tag: the image's tag.
        figure: the figure to log.
        step: the global step to log it at.
    """
    writer.add_image(tag, figure_to_array(figure), step, dataformats="HWC")


def image_with_legend(image: torch.Tensor, names: Sequence[str]) -> torch.Tensor:
    """A (3, H, W) image in [0, 1] with a legend of the class colours (`palette.class_colours`)
    under it, at the image's own pixel size: returns (3, H + legend, max(W, legend width))."""
    height, width = image.shape[-2:]
    total_width = max(width, 360)
    columns = min(len(names), 4)
    legend_px = _legend_height(len(names), columns)
    fig = Figure(figsize=(total_width / DPI, (height + legend_px) / DPI), dpi=DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0, legend_px / (height + legend_px), width / total_width, height / (height + legend_px)))
    ax.imshow(np.transpose(image.numpy(), (1, 2, 0)), interpolation="nearest")
    ax.set_axis_off()
    handles = [Patch(facecolor=c, label=n) for c, n in zip(class_colours(len(names)).tolist(), names)]
    fig.legend(
        handles=handles,
        loc="lower center",
        ncol=columns,
        frameon=False,
        fontsize=LEGEND_FONT_SIZE - 1,
        handlelength=1.0,
        handletextpad=0.4,
        columnspacing=1.0,
        borderaxespad=0.2,
    )
    return torch.from_numpy(figure_to_array(fig)).permute(2, 0, 1)


def classification_figure(
    images: torch.Tensor,
    probabilities: torch.Tensor,
    labels: torch.Tensor,
    classes: Sequence[str] | None = None,
    fig: Figure | None = None,
) -> Figure:
    """The PyTorch TensorBoard tutorial's "predictions vs. actuals": each image titled with its
    predicted class and probability and the true label, green when right and red when wrong;
    two images per row.

    `images` are (N, C, H, W) in [0, 1]; `probabilities` (N, num_classes); `labels` (N,).
    A `fig` returned by an earlier call for as many images is redrawn in place.
    """
    names = (lambda i: classes[i]) if classes else str
    confidence, predicted = probabilities.max(dim=1)
    count = images.shape[0]
    top = _MARGIN // 2
    fig, _ = _new_or_reused(fig, count, _height(count, 2, top))
    for i in range(count):
        right = int(predicted[i]) == int(labels[i])
        title = f"{names(int(predicted[i]))}, {100.0 * float(confidence[i]):.1f}%\n(label: {names(int(labels[i]))})"
        _panel(fig, i, top, 2, images[i], title, color="green" if right else "red")
    return fig


def mask_iou(predicted: torch.Tensor, truth: torch.Tensor) -> float:
    """IoU of two binary masks of one image, (H, W) or (K, H, W): the mean over the K classes of
    each class's IoU, where a class empty in both scores 1."""
    predicted, truth = predicted.bool(), truth.bool()
    if predicted.dim() == 2:
        predicted, truth = predicted[None], truth[None]
    intersection = (predicted & truth).flatten(1).sum(1).float()
    union = (predicted | truth).flatten(1).sum(1).float()
    return torch.where(union > 0, intersection / union.clamp(min=1), 1.0).mean().item()


def segmentation_figure(
    images: torch.Tensor,
    truth: torch.Tensor,
    predicted: torch.Tensor,
    classes: Sequence[str] | None = None,
    fig: Figure | None = None,
) -> Figure:
    """Per sample, one row of two panels, with the sample's IoU (mean over classes) in the
    second panel's title and a colour legend across the top.

    One class: the image, and an overlay on the dimmed image of the truth in green, the
    prediction in red and both in yellow (`OVERLAY_COLOURS`). K >= 2 classes: the image tinted
    with the true classes and with the predicted classes, each class in its fixed colour
    (`palette.class_colours`), named in the legend.

    `images` (N, C, H, W) in [0, 1]; `truth` and `predicted` binary (N, K, H, W) masks;
    `classes` names the K classes. A `fig` returned by an earlier call for as many images is
    redrawn in place.
    """
    count, num_classes = images.shape[0], truth.shape[1]
    if num_classes == 1:
        names, colours, columns = list(OVERLAY_COLOURS), list(OVERLAY_COLOURS.values()), 3
    else:
        names, colours = class_names(classes, num_classes), class_colours(num_classes).tolist()
        columns = min(num_classes, 4)
    top = _legend_height(len(names), columns)
    fig, new = _new_or_reused(fig, 2 * count, _height(2 * count, 1, top))
    for i in range(count):
        iou = mask_iou(predicted[i], truth[i])
        image = images[i] if images.shape[1] >= 3 else images[i].expand(3, -1, -1)
        if num_classes == 1:
            overlay = 0.6 * image.clone()
            overlay[0] = torch.maximum(overlay[0], predicted[i, 0].float())
            overlay[1] = torch.maximum(overlay[1], truth[i, 0].float())
            panels = [(image, f"#{i} image"), (overlay, f"overlay, IoU {iou:.3f}")]
        else:

            def tint(masks: torch.Tensor, image: torch.Tensor = image) -> torch.Tensor:
                return torch.where(
                    masks.any(0, keepdim=True), 0.4 * image + 0.6 * colour_masks(masks[None])[0], 0.8 * image
                )

            panels = [(tint(truth[i]), f"#{i} truth"), (tint(predicted[i]), f"prediction, mean IoU {iou:.3f}")]
        for j, (panel, title) in enumerate(panels):
            _panel(fig, 2 * i + j, top, 1, panel, title)
    if new:
        _legend(fig, colours, names, columns)
    return fig


class PredictionFigureCallback(TensorBoardWriterCallback):
    """Log a figure of the model's predictions on a fixed batch, as `SummaryWriter.add_figure`
    would (an image summary of the rendered figure), without importing pyplot.

    Args:
        log_dir: the run directory (shared with the run's other TensorBoard callbacks).
        kind: ``"classification"`` (the tutorial's "predictions vs. actuals") or
            ``"segmentation"`` (two panels per sample, with its IoU: one class, the image and
            an overlay of truth and prediction; several, the image tinted with the true and with
            the predicted classes; see `segmentation_figure`). For label maps (integer (N, H, W)
            targets) the predicted class of a pixel is the argmax of its logits, and pixels of
            `ignore_index` are left uncoloured and out of the IoU.
        batch: ``(inputs, targets)``; default: the first validation (or training) batch.
        num_images: samples shown.
        every_n_steps: log every N optimizer steps; when None, every `every_n_epochs` epochs.
        every_n_epochs: log at the end of every N-th epoch (when `every_n_steps` is None).
        classes: class names: of the classification titles, or of the segmentation legend.
        mean, std: the inputs' normalisation, undone for display.
        threshold: probability above which a pixel is foreground (segmentation).
        tag: the tag of the figure.
        stretch: stretch each image's contrast (`stretch_contrast`) for display.
        ignore_index: label maps: the value of pixels of no class.
    """

    def __init__(
        self,
        log_dir: str | os.PathLike,
        kind: str = "classification",
        batch: Any = None,
        num_images: int = 4,
        every_n_steps: int | None = None,
        every_n_epochs: int = 1,
        classes: Sequence[str] | None = None,
        mean: Any = None,
        std: Any = None,
        threshold: float = 0.5,
        tag: str = "predictions vs. actuals",
        stretch: bool = False,
        ignore_index: int = 255,
    ) -> None:
        super().__init__(log_dir)
        self.ignore_index = ignore_index
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        self.kind, self.batch, self.num_images = kind, batch, num_images
        self._by_step = Every(every_n_steps, "every_n_steps")
        self._by_epoch = Every(None if every_n_steps is not None else every_n_epochs, "every_n_epochs")
        self.classes, self.mean, self.std, self.threshold, self.tag = classes, mean, std, threshold, tag
        self.stretch = stretch
        self._fixed: tuple[Any, Any] | None = None
        self._figure: Figure | None = None  # drawn once, then redrawn in place

    def on_fit_start(self, trainer) -> None:
        self._fixed = split_batch(take_batch(trainer, self.batch, self.num_images))
        self._by_step.start(trainer.global_step)

    def on_batch_end(self, trainer, batch, outputs) -> None:
        if self._by_step(trainer.global_step):
            self.log_figure(trainer)

    def on_epoch_end(self, trainer, logs) -> None:
        if self._by_epoch(trainer.epoch + 1):
            self.log_figure(trainer)

    def log_figure(self, trainer) -> None:
        """Predict on the fixed batch and add the figure at the current global step."""
        if self._fixed is None:
            raise RuntimeError(f"{type(self).__name__}.log_figure needs the batch that on_fit_start takes")
        inputs, targets = self._fixed
        output = last_output(trainer.predict(inputs)).float().cpu()
        images = denormalize(inputs, self.mean, self.std)
        if self.stretch:
            images = stretch_contrast(images)
        if self.kind == "classification":
            fig = classification_figure(images, output.softmax(dim=1), targets, self.classes, fig=self._figure)
        elif is_label_batch(targets, inputs):
            truth = label_masks(targets.cpu(), output.shape[1], self.ignore_index)
            counted = (targets.cpu() != self.ignore_index).unsqueeze(1)
            predicted = label_masks(output.argmax(1), output.shape[1], self.ignore_index) & counted
            fig = segmentation_figure(images, truth, predicted, self.classes, fig=self._figure)
        else:
            predicted = output.sigmoid() > self.threshold
            fig = segmentation_figure(images, targets > 0.5, predicted, self.classes, fig=self._figure)
        self._figure = fig
        log_figure(self.writer, self.tag, fig, trainer.global_step)
