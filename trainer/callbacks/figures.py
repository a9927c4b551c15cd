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
from trainer.callbacks.palette import class_colours, class_names, colour_masks
from trainer.callbacks.tensorboard import TensorBoardWriterCallback, denormalize, take_batch
from trainer.every import Every

KINDS = ("classification", "segmentation")


def _panel(fig: Figure, rows: int, cols: int, index: int, image: torch.Tensor, title: str, **style: Any) -> None:
    """Show a (C, H, W) image in [0, 1] titled `title` in panel `index` of a rows x cols grid.

    On a figure drawn before with the same layout, the panel's axes, image and title are updated
    in place: redrawing costs a third of building the figure anew.
    """
    array = image.numpy()
    array = array[0] if array.shape[0] == 1 else np.transpose(array[:3], (1, 2, 0))
    if index < len(fig.axes):
        ax = fig.axes[index]
        ax.images[0].set_data(array)
    else:
        ax = fig.add_subplot(rows, cols, index + 1)
        if array.ndim == 2:
            ax.imshow(array, cmap="gray", vmin=0.0, vmax=1.0)
        else:
            ax.imshow(array)
        ax.set_xticks([])
        ax.set_yticks([])
    ax.set_title(title, **style)


def _new_or_reused(fig: Figure | None, panels: int, figsize: tuple[float, float]) -> tuple[Figure, bool]:
    """`fig` when it already has `panels` panels of that size, else a new figure on the Agg
    canvas; and whether it is new (its layout then needs computing)."""
    if fig is not None and len(fig.axes) == panels and tuple(fig.get_size_inches()) == figsize:
        return fig, False
    fig = Figure(figsize=figsize, dpi=72)
    FigureCanvasAgg(fig)
    return fig, True


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
    dpi, legend_px = 72, 28
    fig = Figure(figsize=(max(width, 360) / dpi, (height + legend_px) / dpi), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0, legend_px / (height + legend_px), width / max(width, 360), height / (height + legend_px)))
    ax.imshow(np.transpose(image.numpy(), (1, 2, 0)), interpolation="nearest")
    ax.set_axis_off()
    handles = [Patch(facecolor=c, label=n) for c, n in zip(class_colours(len(names)).tolist(), names)]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(names), 6), frameon=False, fontsize=9,
               handlelength=1.0, columnspacing=1.0, borderaxespad=0.2)
    return torch.from_numpy(figure_to_array(fig)).permute(2, 0, 1)


def classification_figure(
    images: torch.Tensor, probabilities: torch.Tensor, labels: torch.Tensor, classes: Sequence[str] | None = None,
    fig: Figure | None = None,
) -> Figure:
    """The PyTorch TensorBoard tutorial's "predictions vs. actuals": each image titled with its
    predicted class and probability and the true label, green when right and red when wrong.

    `images` are (N, C, H, W) in [0, 1]; `probabilities` (N, num_classes); `labels` (N,).
    A `fig` returned by an earlier call for as many images is redrawn in place.
    """
    names = (lambda i: classes[i]) if classes else str
    confidence, predicted = probabilities.max(dim=1)
    count = images.shape[0]
    fig, new = _new_or_reused(fig, count, (3.0 * count, 3.6))
    for i in range(count):
        right = int(predicted[i]) == int(labels[i])
        title = f"{names(int(predicted[i]))}, {100.0 * float(confidence[i]):.1f}%\n(label: {names(int(labels[i]))})"
        _panel(fig, 1, count, i, images[i], title, color="green" if right else "red")
    if new:
        fig.tight_layout()
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


def segmentation_figure(images: torch.Tensor, truth: torch.Tensor, predicted: torch.Tensor,
                        classes: Sequence[str] | None = None, fig: Figure | None = None) -> Figure:
    """Per sample, one row: image, ground-truth mask, predicted mask and an overlay, with the
    sample's IoU (mean over classes) in the overlay's title.

    One class: masks in white, the overlay shows truth in green, prediction in red, both in
    yellow. K >= 2 classes: each class in its fixed colour (`palette.class_colours`), the
    overlay tints the image with the predicted classes, and a legend names the classes.

    `images` (N, C, H, W) in [0, 1]; `truth` and `predicted` binary (N, K, H, W) masks;
    `classes` names the K classes. A `fig` returned by an earlier call for as many images is
    redrawn in place.
    """
    count, num_classes = images.shape[0], truth.shape[1]
    legend = 0.5 if num_classes > 1 else 0.0
    fig, new = _new_or_reused(fig, 4 * count, (10.0, 2.8 * count + legend))
    for i in range(count):
        iou = mask_iou(predicted[i], truth[i])
        image = images[i] if images.shape[1] >= 3 else images[i].expand(3, -1, -1)
        if num_classes == 1:
            true_panel, pred_panel = truth[i].float(), predicted[i].float()
            overlay = 0.6 * image.clone()
            overlay[0] = torch.maximum(overlay[0], pred_panel[0])
            overlay[1] = torch.maximum(overlay[1], true_panel[0])
        else:
            true_panel, pred_panel = colour_masks(truth[i:i + 1])[0], colour_masks(predicted[i:i + 1])[0]
            tinted = predicted[i].any(0, keepdim=True)
            overlay = torch.where(tinted, 0.4 * image + 0.6 * pred_panel, 0.8 * image)
        name = "IoU" if num_classes == 1 else "mean IoU"
        panels = [(image, "image"), (true_panel, "ground truth"), (pred_panel, "prediction"),
                  (overlay, f"overlay, {name} {iou:.3f}")]
        for j, (panel, title) in enumerate(panels):
            _panel(fig, count, 4, 4 * i + j, panel, f"#{i} {title}" if j == 0 else title, fontsize=10)
    if new:
        if num_classes > 1:
            colours = class_colours(num_classes).tolist()
            handles = [Patch(facecolor=c, label=n) for c, n in zip(colours, class_names(classes, num_classes))]
            fig.legend(handles=handles, loc="lower center", ncol=min(num_classes, 6), frameon=False)
        fig.tight_layout(rect=(0, legend / fig.get_size_inches()[1], 1, 1))
    return fig


class PredictionFigureCallback(TensorBoardWriterCallback):
    """Log a figure of the model's predictions on a fixed batch, as `SummaryWriter.add_figure`
    would (an image summary of the rendered figure), without importing pyplot.

    Args:
        log_dir: the run directory (shared with the run's other TensorBoard callbacks).
        kind: ``"classification"`` (the tutorial's "predictions vs. actuals") or
            ``"segmentation"`` (image, truth, prediction, overlay and IoU per sample).
        batch: ``(inputs, targets)``; default: the first validation (or training) batch.
        num_images: samples shown.
        every_n_steps: log every N optimizer steps; when None, every `every_n_epochs` epochs.
        classes: class names: of the classification titles, or of the segmentation legend.
        mean, std: the inputs' normalisation, undone for display.
        threshold: probability above which a pixel is foreground (segmentation).
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
    ) -> None:
        super().__init__(log_dir)
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        self.kind, self.batch, self.num_images = kind, batch, num_images
        self._by_step = Every(every_n_steps, "every_n_steps")
        self._by_epoch = Every(None if every_n_steps is not None else every_n_epochs, "every_n_epochs")
        self.classes, self.mean, self.std, self.threshold, self.tag = classes, mean, std, threshold, tag
        self._fixed: tuple[Any, Any] | None = None
        self._figure: Figure | None = None  # drawn once, then redrawn in place

    def on_fit_start(self, trainer) -> None:
        self._fixed = split_batch(take_batch(trainer, self.batch, self.num_images))

    def on_batch_end(self, trainer, batch, outputs) -> None:
        if self._by_step(trainer.global_step):
            self.log_figure(trainer)

    def on_epoch_end(self, trainer, logs) -> None:
        if self._by_epoch(trainer.epoch + 1):
            self.log_figure(trainer)

    def log_figure(self, trainer) -> None:
        """Predict on the fixed batch and add the figure at the current global step."""
        inputs, targets = self._fixed
        output = last_output(trainer.predict(inputs)).float().cpu()
        images = denormalize(inputs, self.mean, self.std)
        if self.kind == "classification":
            fig = classification_figure(images, output.softmax(dim=1), targets, self.classes, fig=self._figure)
        else:
            predicted = output.sigmoid() > self.threshold
            fig = segmentation_figure(images, targets > 0.5, predicted, self.classes, fig=self._figure)
        self._figure = fig
        log_figure(self.writer, self.tag, fig, trainer.global_step)
