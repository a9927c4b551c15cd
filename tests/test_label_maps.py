"""Label-map segmentation: decoding (palette, 8- and 16-bit grey), the rule that tells label maps
from binary masks, classes.txt, the ignore index in loss and metrics, training through the recipe
with the confusion matrix read back from the event file, and predict writing label maps."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from models import CEDiceLoss, confusion_iou, confusion_matrix, label_class_iou, label_iou
from models.metrics import confusion_dice, mean_present
from recipes import nested_unet
from recipes.cli import run_cli
from tests.helpers import HostSyncGuard
from trainer import Callback, Trainer
from trainer.callbacks import ConfusionMatrixCallback
from trainer.callbacks.confusion import CELL_TEXT_CLASSES, MAX_SIDE, confusion_figure
from trainer.checkpoint import load_checkpoint
from trainer_datasets import (
    DatasetError,
    SegmentationFolder,
    read_label_map,
    split_segmentation,
    write_label_map,
    write_png_file,
)

CLASSES = ["background", "interior", "rim"]


def disc_labels(size: int, seed: int) -> torch.Tensor:
    """A label map of one disc: background 0, interior 1, a rim 2 around it, and a band of
    ignored pixels (255) along the top."""
    generator = torch.Generator().manual_seed(seed)
    cy, cx = (torch.randint(size // 3, 2 * size // 3, (2,), generator=generator)).tolist()
    radius = size / 4
    y, x = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    distance = ((y - cy) ** 2 + (x - cx) ** 2).float().sqrt()
    labels = torch.zeros(size, size, dtype=torch.long)
    labels[distance < radius] = 2
    labels[distance < radius - 3] = 1
    labels[:3] = 255
    return labels


def image_of(labels: torch.Tensor) -> torch.Tensor:
    """An RGB image whose grey level tells the classes apart (the ignored band is noise)."""
    grey = torch.tensor([40, 200, 120])[labels.clamp(max=2)]
    grey[labels == 255] = torch.randint(0, 255, grey[labels == 255].shape)
    return grey.to(torch.uint8).expand(3, -1, -1).contiguous()


def write_palette_folder(root, count: int = 10, size: int = 32, classes: list[str] | None = CLASSES) -> None:
    """A label-map folder of palette PNGs (as in Pascal VOC) with an ignored band, and a classes.txt."""
    for index in range(count):
        labels = disc_labels(size, index)
        write_png_file(image_of(labels), root / "images" / f"{index:02d}.png")
        write_label_map(labels, root / "masks" / f"{index:02d}.png")
    if classes is not None:
        (root / "classes.txt").write_text("\n".join(classes) + "\n")


def test_palette_png_gives_indices_not_colours(tmp_path):
    labels = disc_labels(32, 0)
    write_label_map(labels, tmp_path / "m.png")
    with Image.open(tmp_path / "m.png") as image:
        assert image.mode == "P"  # a palette PNG: its colours differ per class
        assert image.convert("RGB").getpixel((16, 16)) != image.convert("RGB").getpixel((0, 31))
    assert torch.equal(read_label_map(tmp_path / "m.png"), labels)


@pytest.mark.parametrize("dtype, mode", [(np.uint8, "L"), (np.uint16, "I;16")])
def test_grey_label_maps_8_and_16_bit(tmp_path, dtype, mode):
    array = np.zeros((32, 32), dtype=dtype)
    array[8:16] = 1
    array[16:24] = 2
    array[:2] = 255
    Image.fromarray(array).save(tmp_path / "m.png")
    with Image.open(tmp_path / "m.png") as image:
        assert image.mode == mode
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    write_png_file(torch.zeros(3, 32, 32, dtype=torch.uint8), tmp_path / "images" / "a.png")
    (tmp_path / "m.png").rename(tmp_path / "masks" / "a.png")
    data = SegmentationFolder(tmp_path, mask_mode="labels")
    assert data.mask_mode == "labels" and data.classes == ["0", "1", "2"]  # no classes.txt: indices
    image, mask = data[0]
    assert image.dtype == torch.float32 and image.shape == (3, 32, 32)
    assert mask.dtype == torch.int64 and mask.shape == (32, 32)
    assert torch.equal(mask, torch.from_numpy(array.astype(np.int64)))  # the ignore value is kept


def test_classes_txt_names_classes_and_makes_auto_mode_labels(tmp_path):
    write_palette_folder(tmp_path, count=4)
    train, val = split_segmentation(tmp_path, val_fraction=0.25, image_size=16)
    assert train.mask_mode == val.mask_mode == "labels" and train.classes == val.classes == CLASSES
    image, mask = train[0]  # augmented (flips, rotations) and resized, nearest: still indices
    assert image.shape == (3, 16, 16) and mask.shape == (16, 16) and mask.dtype == torch.int64
    assert set(mask.unique().tolist()) <= {0, 1, 2, 255}


def test_binary_folders_keep_their_mode(tmp_path):
    for index in range(2):
        write_png_file(torch.zeros(3, 16, 16, dtype=torch.uint8), tmp_path / "images" / f"{index}.png")
        mask = torch.zeros(1, 16, 16, dtype=torch.uint8)
        mask[:, 4:8] = 255
        write_png_file(mask, tmp_path / "masks" / f"{index}.png")
    data = SegmentationFolder(tmp_path)
    assert data.mask_mode == "binary" and data.classes == ["mask"]
    assert data[0][1].dtype == torch.float32 and data[0][1].shape == (1, 16, 16)


def test_a_value_outside_the_classes_is_named(tmp_path):
    write_palette_folder(tmp_path, count=3)
    labels = disc_labels(32, 1)
    labels[5, 7] = 4  # classes are 0-2, ignore 255
    write_label_map(labels, tmp_path / "masks" / "01.png")
    with pytest.raises(DatasetError, match=r"masks/01\.png has value\(s\) 4 .*x=7, y=5.*classes 0-2.*ignore index 255"):
        SegmentationFolder(tmp_path)


def test_colour_mask_without_classes_txt_says_how_to_read_label_maps(tmp_path):
    write_palette_folder(tmp_path, count=2, classes=None)
    with pytest.raises(DatasetError, match=r"colour-coded.*classes\.txt.*--mask-mode labels"):
        SegmentationFolder(tmp_path)


def test_ignored_pixels_change_neither_loss_nor_metrics():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 16, 16)
    targets = torch.randint(0, 3, (2, 16, 16))
    targets[:, :4] = 255
    other_logits, other_targets = logits.clone(), targets.clone()
    other_logits[:, :, :4] = torch.randn(2, 3, 4, 16) * 10  # other predictions where the target is ignored
    other_targets[0, :4, :4] = 254  # and another value there that is no class either... ignored as well below
    other_targets[0, :4, :4] = 255
    loss = CEDiceLoss(ignore_index=255)
    assert loss(other_logits, other_targets) == pytest.approx(loss(logits, targets).item())
    for metric in (label_iou(255), label_class_iou(0, 255), label_class_iou(2, 255)):
        assert metric(other_logits, other_targets) == pytest.approx(metric(logits, targets).item())
    assert torch.equal(confusion_matrix(other_logits, other_targets), confusion_matrix(logits, targets))
    assert confusion_matrix(logits, targets).sum() == 2 * 12 * 16  # the ignored rows are not counted
    # A changed prediction outside the ignored band does change them.
    changed = logits.clone()
    changed[:, :, 8:] = -changed[:, :, 8:]
    assert loss(changed, targets) != pytest.approx(loss(logits, targets).item())
    assert not torch.equal(confusion_matrix(changed, targets), confusion_matrix(logits, targets))


def test_a_class_absent_from_truth_and_prediction_has_no_score_and_is_left_out_of_the_mean():
    matrix = torch.tensor([[8, 2, 0], [1, 4, 0], [0, 0, 0]])
    ious, dices = confusion_iou(matrix), confusion_dice(matrix)
    assert ious[:2].tolist() == pytest.approx([8 / 11, 4 / 7]) and dices[:2].tolist() == pytest.approx(
        [16 / 19, 8 / 11]
    )
    assert ious[2].isnan() and dices[2].isnan()  # absent: no score, never a perfect 1
    assert mean_present(ious).item() == pytest.approx((8 / 11 + 4 / 7) / 2)
    assert mean_present(confusion_iou(torch.zeros(3, 3, dtype=torch.long))).isnan()  # nothing counted: no score
    predicted_only = torch.tensor([[8, 0, 2], [0, 4, 0], [0, 0, 0]])  # class 2 predicted, never true: IoU 0
    assert confusion_iou(predicted_only)[2].item() == 0.0


def figure_pixels(events, tag):
    image = events.Images(tag)[-1]
    return np.asarray(Image.open(io.BytesIO(image.encoded_image_string)).convert("RGB"))


@pytest.mark.numerics
def test_label_maps_train_end_to_end_and_predict_label_maps(tmp_path, capsys):
    data = tmp_path / "data"
    write_palette_folder(data, count=10)
    run_dir = tmp_path / "run"
    argv = [
        "--data",
        str(data),
        "--arch",
        "UNet",
        "--precision",
        "32",
        "--channels-last",
        "off",
        "--epochs",
        "2",
        "--batch-size",
        "4",
        "--val-fraction",
        "0.2",
        "--lr",
        "0.01",
        "--log-dir",
        str(run_dir),
    ]
    assert run_cli(nested_unet.main, argv) == 0

    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"Validation/IoU", *(f"Validation/IoU/{name}" for name in CLASSES)} <= scalars
    history = load_checkpoint(run_dir / "last.pt")["history"]
    per_class = [history[-1][f"val_iou_{name}"] for name in CLASSES]
    assert history[-1]["val_iou"] == pytest.approx(sum(per_class) / 3, abs=1e-5)  # one validation batch
    assert [e.value for e in events.Scalars("Validation/IoU/rim")] == pytest.approx([h["val_iou_rim"] for h in history])
    images = set(events.Tags()["images"])
    assert {"confusion matrix", "masks", "predictions vs. actuals"} <= images
    assert len(events.Images("confusion matrix")) == 2  # one per validation
    assert figure_pixels(events, "confusion matrix").shape[1] >= 480
    config = load_checkpoint(run_dir / "best.pt")["config"]
    assert config["mask_type"] == "labels" and config["classes"] == CLASSES and config["ignore_index"] == 255

    out = tmp_path / "predicted"
    argv = [
        "predict",
        "--checkpoint",
        str(run_dir / "best.pt"),
        "--images",
        str(data / "images"),
        "--out",
        str(out),
        "--probabilities",
    ]
    capsys.readouterr()
    assert run_cli(nested_unet.main, argv) == 0
    assert f"wrote 10 label maps and 30 probability maps to {out}\n" in capsys.readouterr().out
    with Image.open(out / "03.png") as label_map:
        assert label_map.mode == "P" and label_map.size == (32, 32)
    predicted = read_label_map(out / "03.png")
    assert set(predicted.unique().tolist()) <= {0, 1, 2}
    probabilities = [np.asarray(Image.open(out / name / "03_prob.png"), dtype=np.float64) for name in CLASSES]
    off_by = np.abs(sum(probabilities) - 255).max()
    # Pixels whose label is not the most probable class of the rounded probability maps: ties only.
    differ = (predicted != torch.from_numpy(np.argmax(np.stack(probabilities), 0))).float().mean().item()
    print(f"measured: probabilities sum to 255 within {off_by:.0f}; labels unlike the argmax: {differ:.2%}")
    assert off_by <= 3  # softmax: the classes share each pixel
    assert differ < 0.01


class Logits(nn.Module):
    """A "model" whose inputs are its logits (times a weight of 1, for the optimizer)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return x * self.weight


def validate_scores(tmp_path, batches, classes=("a", "b", "c")):
    """The logs of one `Trainer.validate` over `batches` of (logits, targets), scored by a
    ConfusionMatrixCallback as the recipe wires it."""
    model = Logits()
    callback = ConfusionMatrixCallback(
        tmp_path / "run",
        list(classes),
        metrics={"iou": confusion_iou, "dice": confusion_dice},
        per_class=["iou"],
    )
    trainer = Trainer(
        model, torch.optim.SGD(model.parameters(), lr=0.1), CEDiceLoss(), callbacks=[callback], device="cpu"
    )
    return trainer.validate(batches)


def test_validation_scores_count_the_pixels_of_the_whole_validation(tmp_path):
    truth = torch.tensor([[[0, 0], [1, 1]], [[0, 1], [255, 255]]])  # image 1 half ignored
    predicted = torch.tensor([[[0, 1], [1, 1]], [[0, 0], [2, 2]]])
    logits = nn.functional.one_hot(predicted, 3).permute(0, 3, 1, 2).float() * 10
    logs = validate_scores(tmp_path, [(logits[:1], truth[:1]), (logits[1:], truth[1:])])
    # Counted over both batches (true rows, predicted columns): class 0 [2, 1, 0], class 1 [1, 2, 0], class 2
    # predicted only where the truth is ignored, so not counted: absent, no score. Batch by batch, class 1 would
    # score 2/3 and 0, class 2 a perfect 1 twice.
    assert logs["val_iou_a"] == pytest.approx(2 / 4) and logs["val_iou_b"] == pytest.approx(2 / 4)
    assert math.isnan(logs["val_iou_c"])
    assert logs["val_iou"] == pytest.approx(0.5)  # the mean of the present classes
    assert logs["val_dice"] == pytest.approx(4 / 6)


def test_a_validation_batch_without_labelled_pixels_changes_no_score(tmp_path):
    torch.manual_seed(0)
    logits = torch.randn(4, 3, 8, 8)
    truth = torch.randint(0, 3, (4, 8, 8))
    truth[:, :6] = 255  # sparsely labelled tiles
    batches = [(logits[:2], truth[:2]), (logits[2:], truth[2:])]
    unlabelled = (torch.randn(2, 3, 8, 8), torch.full((2, 8, 8), 255))
    without = validate_scores(tmp_path / "without", batches)
    with_it = validate_scores(tmp_path / "with", [batches[0], unlabelled, batches[1]])
    scores = [key for key in without if key != "val_loss"]
    assert scores == ["val_iou", "val_dice", "val_iou_a", "val_iou_b", "val_iou_c"]
    assert [with_it[key] for key in scores] == [without[key] for key in scores]
    assert with_it["val_iou"] < 0.5  # far from the 1.0 an unlabelled batch used to score


def write_discs(folder, names, labelled: bool = True, size: int = 32) -> None:
    """An image and a disc label map (`disc_labels`) named after each of `names` in `folder`; with
    `labelled` False, label maps whose every pixel is ignored."""
    for index, name in enumerate(names):
        labels = disc_labels(size, index)
        write_png_file(image_of(labels), folder / "images" / f"{name}.png")
        write_label_map(labels if labelled else torch.full_like(labels, 255), folder / "masks" / f"{name}.png")


def split_folder(root, val_unlabelled: int = 0, val_labelled: int = 1, train_labelled: bool = True):
    """train/ (4 disc label maps) and val/ (`val_labelled` of them, then `val_unlabelled` whose every
    pixel is ignored) under `root`, with one classes.txt; the same images for the same arguments."""
    torch.manual_seed(0)  # the noise of `image_of`
    write_discs(root / "train", ["a", "b", "c", "d"], labelled=train_labelled)
    write_discs(root / "val", [f"labelled{i}" for i in range(val_labelled)])
    write_discs(root / "val", [f"unlabelled{i}" for i in range(val_unlabelled)], labelled=False)
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    return root


def recipe_run(data, run_dir, *extra: str) -> int:
    argv = [
        *["--data", str(data), "--arch", "UNet", "--base-filters", "4", "--epochs", "1", "--batch-size", "1"],
        *["--precision", "32", "--channels-last", "off", "--log-dir", str(run_dir), *extra],
    ]
    return run_cli(nested_unet.main, argv)


@pytest.mark.numerics
def test_an_unlabelled_validation_image_does_not_lift_the_recipes_iou(tmp_path):
    """The recipe validates one image per batch: an image with no labelled pixel adds nothing."""
    runs = {}
    for name, unlabelled in (("plain", 0), ("with-unlabelled", 1)):
        assert recipe_run(split_folder(tmp_path / name, val_unlabelled=unlabelled), tmp_path / f"run-{name}") == 0
        runs[name] = load_checkpoint(tmp_path / f"run-{name}" / "last.pt")["history"][-1]
    keys = ["val_iou", "val_dice", *(f"val_iou_{name}" for name in CLASSES)]
    print("measured:", {key: round(runs["plain"][key], 4) for key in keys})
    assert [runs["with-unlabelled"][key] for key in keys] == [runs["plain"][key] for key in keys]
    assert runs["plain"]["val_iou"] < 0.9  # one epoch: far from perfect, so a 1.0 averaged in would show


@pytest.mark.parametrize("side", ["train", "val"])
def test_a_split_with_no_labelled_pixel_is_refused_before_training(tmp_path, capsys, side):
    data = split_folder(
        tmp_path / "data",
        val_labelled=0 if side == "val" else 1,
        val_unlabelled=2 if side == "val" else 0,
        train_labelled=side != "train",
    )
    assert recipe_run(data, tmp_path / "run") == 2
    err = capsys.readouterr().err
    assert f"the label maps of {data / side} hold no labelled pixel" in err and "ignore index 255" in err
    assert err.count("\n") == 1
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("classes", [150, 300])
def test_confusion_figure_of_many_classes_is_bounded(classes):
    counts = torch.randint(0, 50, (classes, classes))
    figure = confusion_figure(counts, [f"class {k}" for k in range(classes)])
    width, height = figure.canvas.get_width_height()
    assert width <= MAX_SIDE and height <= MAX_SIDE
    assert classes > CELL_TEXT_CLASSES and not figure.axes[0].texts  # no text in 22500 or 90000 cells
    assert len(figure.axes[0].get_xticklabels()) <= 50


@pytest.mark.parametrize("classes", [150, 300])
def test_a_run_of_many_classes_validates_with_a_bounded_figure(tmp_path, classes):
    root = tmp_path / "data"
    ignore = 255 if classes < 255 else 65535
    generator = torch.Generator().manual_seed(0)
    for index in range(4):
        labels = torch.randint(0, classes, (16, 16), generator=generator)
        labels[:2] = ignore
        write_png_file((labels % 251).to(torch.uint8).expand(3, -1, -1).contiguous(), root / "images" / f"{index}.png")
        write_label_map(labels, root / "masks" / f"{index}.png")
    (root / "classes.txt").write_text("".join(f"class{k}\n" for k in range(classes)))
    assert recipe_run(root, tmp_path / "run", "--batch-size", "2", "--ignore-index", str(ignore)) == 0
    history = load_checkpoint(tmp_path / "run" / "last.pt")["history"]
    assert 0 <= history[-1]["val_iou"] < 1
    events = EventAccumulator(str(tmp_path / "run"), size_guidance={"images": 0})
    events.Reload()
    height, width, _ = figure_pixels(events, "confusion matrix").shape
    assert width <= MAX_SIDE and height <= MAX_SIDE


def test_a_predicted_label_map_shows_each_class_in_the_colour_of_the_grids_and_figures(tmp_path):
    """The label-map PNG that ``predict`` writes is a palette PNG whose colour for class k is the one
    the image grids and prediction figures give class k (`palette.class_colours`): one palette for
    every picture of the classes. Its indices are still the classes."""
    from recipes.prediction import write_label_prediction
    from trainer.callbacks.palette import class_colours, colour_masks, label_masks, png_palette

    labels = torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0]])
    probabilities = nn.functional.one_hot(labels, 4).permute(2, 0, 1).float()
    write_label_prediction(probabilities, tmp_path, "a", ["w", "x", "y", "z"])
    [written] = list(tmp_path.glob("*.png"))
    image = Image.open(written)
    assert image.mode == "P" and np.array_equal(np.asarray(image), labels.numpy())
    grid = colour_masks(label_masks(labels[None], 4))[0].permute(1, 2, 0).mul(255).round().to(torch.uint8)
    assert np.array_equal(np.asarray(image.convert("RGB")), grid.numpy())
    assert png_palette()[: 3 * 20] == class_colours(20).mul(255).round().to(torch.uint8).flatten().tolist()
    assert png_palette()[3 * 255 :] == [0, 0, 0]  # the ignore index: no class, as grids show it


class GuardValidationBatches(Callback):
    """Runs a validation's batches (forward, loss, metrics, the callbacks before this one) under
    a `HostSyncGuard`: from on_validation_start until the end of the last of `batches` batches."""

    order = 50  # after ConfusionMatrixCallback's batch hook

    def __init__(self, batches: int) -> None:
        self.guard, self.batches, self.seen = HostSyncGuard(), batches, 0

    def on_validation_start(self, trainer) -> None:
        self.seen = 0
        self.guard.start()

    def on_validation_batch_end(self, trainer, batch, outputs) -> None:
        self.seen += 1
        if self.seen == self.batches:
            self.guard.stop()

    def on_validation_end(self, trainer, logs) -> None:
        self.guard.stop()


def test_label_map_scores_wait_on_the_device_once_per_validation(tmp_path):
    """ConfusionMatrixCallback and the label-map metrics count each batch without a host sync
    (no boolean-mask indexing, no bincount): the validation's batches run under a guard that fails
    on any, and the scores equal those counted outside it."""
    torch.manual_seed(0)
    logits = torch.randn(4, 3, 8, 8)
    truth = torch.randint(0, 3, (4, 8, 8))
    truth[:, :3] = 255
    batches = [(logits[:2], truth[:2]), (logits[2:], truth[2:])]
    guard = GuardValidationBatches(len(batches))
    callback = ConfusionMatrixCallback(tmp_path / "run", ["a", "b", "c"], metrics={"iou": confusion_iou})
    model = Logits()
    trainer = Trainer(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        nn.CrossEntropyLoss(ignore_index=255),
        callbacks=[callback, guard],
        device="cpu",
        metrics={"iou_batch": label_iou(), "iou_b": label_class_iou(1)},
    )
    logs = trainer.validate(batches)
    assert not guard.guard.active and guard.seen == 2
    expected = mean_present(confusion_iou(confusion_matrix(logits, truth)))
    assert logs["val_iou"] == pytest.approx(expected.item())
    per_batch = [label_iou()(*batch) for batch in batches]
    assert logs["val_iou_batch"] == pytest.approx(sum(per_batch).item() / 2)


def test_confusion_matrix_leaves_out_ignored_pixels_and_labels_outside_the_classes():
    """Counted on a fixed-size index with a bucket for the left-out pixels: the ignore index, and
    target values that are no class, change no count."""
    logits = nn.functional.one_hot(torch.tensor([[0, 1, 1, 2]]), 3).permute(0, 2, 1).float()
    truth = torch.tensor([[0, 255, 7, 2]])
    assert confusion_matrix(logits, truth).tolist() == [[1, 0, 0], [0, 0, 0], [0, 0, 1]]
