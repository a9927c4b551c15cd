"""`trainer.callbacks.figures`: PredictionFigureCallback and the figures it draws (Agg, no pyplot state)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import matplotlib.text
import pytest
import torch

from tests.helpers import fit_segmentation_visuals, fit_visuals, read_logged
from trainer.callbacks import PredictionFigureCallback


def test_classification_figures_at_requested_steps(tmp_path):
    callback = PredictionFigureCallback(tmp_path, every_n_steps=4, classes=["a", "b", "c"])
    fit_visuals([callback])
    figures = read_logged(tmp_path).Images("predictions vs. actuals")
    assert [e.step for e in figures] == [4, 8, 12]
    assert plt.get_fignums() == []  # no pyplot state


def test_segmentation_figures_every_epoch(tmp_path):
    callback = PredictionFigureCallback(tmp_path, kind="segmentation", num_images=3)
    fit_segmentation_visuals([callback])
    figures = read_logged(tmp_path).Images("predictions vs. actuals")
    assert [e.step for e in figures] == [2, 4]
    assert (figures[0].width, figures[0].height) == (480, 32 + 3 * 249 + 8)  # legend, one row per sample


def visible_texts(fig):
    return [text for text in fig.findobj(matplotlib.text.Text) if text.get_visible() and text.get_text()]


@pytest.mark.parametrize(
    "kind, count, classes", [("classification", 4, 10), ("segmentation", 4, 1), ("segmentation", 3, 5)]
)
def test_figures_are_legible_at_tensorboards_card_width(kind, count, classes):
    """TensorBoard scales an image to its card's width (about 340 px): the figure is 480 px wide,
    two panels per row, and every text at least 10 px high on the card."""
    from trainer.callbacks.figures import CARD_WIDTH, classification_figure, figure_to_array, segmentation_figure

    g = torch.Generator().manual_seed(0)
    if kind == "classification":
        probs = torch.rand(count, classes, generator=g).softmax(1)
        fig = classification_figure(
            torch.rand(count, 1, 28, 28, generator=g),
            probs,
            torch.arange(count) % classes,
            [f"class {i}" for i in range(classes)],
        )
        expected_height = 8 + 2 * (2 * 23 + 216 + 10) + 8  # margin, two rows (two-line titles, panel, gap), margin
    else:
        truth = torch.rand(count, classes, 64, 64, generator=g) > 0.5
        fig = segmentation_figure(
            torch.rand(count, 3, 64, 64, generator=g), truth, ~truth, [f"class {i}" for i in range(classes)]
        )
        legend = 8 + (1 if classes == 1 else 2) * 24  # one line: 3 overlay colours; two: 5 classes, 4 a line
        expected_height = legend + count * (23 + 216 + 10) + 8  # rows: a title, the panels, a gap
    pixels = figure_to_array(fig)
    assert pixels.shape == (expected_height, 480, 3)
    rows = {round(ax.get_position().y0, 4) for ax in fig.axes}
    assert len(fig.axes) == (count if kind == "classification" else 2 * count) and len(rows) == len(fig.axes) // 2
    texts = visible_texts(fig)
    assert texts and all(t.get_fontsize() * fig.dpi / 72 * CARD_WIDTH / pixels.shape[1] >= 10 for t in texts)
    renderer = fig.canvas.get_renderer()
    for text in texts:  # nothing drawn outside the figure (the tutorial's title used to touch its top)
        box = text.get_window_extent(renderer)
        assert box.x0 >= 0 and box.x1 <= pixels.shape[1] and box.y0 >= 0 and box.y1 <= pixels.shape[0] - 2


def test_segmentation_overlay_has_a_colour_legend():
    from trainer.callbacks.figures import OVERLAY_COLOURS, segmentation_figure

    truth = torch.zeros(1, 1, 8, 8, dtype=torch.bool)
    fig = segmentation_figure(torch.rand(1, 3, 8, 8), truth, truth)
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == ["truth only", "prediction only", "both"]
    colours = [tuple(patch.get_facecolor()[:3]) for patch in legend.get_patches()]
    assert colours == list(OVERLAY_COLOURS.values()) == [(0.0, 1.0, 0.0), (1.0, 0.0, 0.0), (1.0, 1.0, 0.0)]


def test_segmentation_figure_titles_hold_iou():
    from trainer.callbacks.figures import mask_iou, segmentation_figure

    truth = torch.zeros(1, 1, 8, 8, dtype=torch.bool)
    truth[..., :4, :] = True
    predicted = torch.zeros_like(truth)
    predicted[..., :2, :] = True
    fig = segmentation_figure(torch.rand(1, 3, 8, 8), truth, predicted)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[-1] == "overlay, IoU 0.500" and mask_iou(predicted, truth) == 0.5


def test_classification_figure_colours():
    from trainer.callbacks.figures import classification_figure

    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8]])
    fig = classification_figure(torch.rand(2, 1, 8, 8), probs, torch.tensor([0, 0]), ["cat", "dog"])
    first, second = fig.axes
    assert first.get_title() == "cat, 90.0%\n(label: cat)" and first.title.get_color() == "green"
    assert second.get_title() == "dog, 80.0%\n(label: cat)" and second.title.get_color() == "red"


def test_a_figure_redrawn_in_place_equals_a_fresh_one():
    from trainer.callbacks.figures import classification_figure, figure_to_array, segmentation_figure

    g = torch.Generator().manual_seed(0)
    images, other = torch.rand(2, 2, 1, 8, 8, generator=g)
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8]])
    first = classification_figure(images, probs, torch.tensor([0, 0]), ["cat", "dog"])
    redrawn = classification_figure(other, probs.flip(1), torch.tensor([1, 0]), ["cat", "dog"], fig=first)
    fresh = classification_figure(other, probs.flip(1), torch.tensor([1, 0]), ["cat", "dog"])
    assert redrawn is first and len(redrawn.axes) == 2
    assert (figure_to_array(redrawn) == figure_to_array(fresh)).all()

    truth = torch.rand(2, 1, 8, 8, generator=g) > 0.5
    seg = segmentation_figure(images.expand(-1, 3, -1, -1), truth, ~truth)
    again = segmentation_figure(other.expand(-1, 3, -1, -1), ~truth, truth, fig=seg)
    new = segmentation_figure(other.expand(-1, 3, -1, -1), ~truth, truth)
    assert again is seg and (figure_to_array(again) == figure_to_array(new)).all()
    assert segmentation_figure(images[:1].expand(-1, 3, -1, -1), truth[:1], truth[:1], fig=seg) is not seg
