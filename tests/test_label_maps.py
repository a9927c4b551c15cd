"""Label-map segmentation: decoding (palette, 8- and 16-bit grey), the rule that tells label maps
from binary masks, classes.txt, the ignore index in loss and metrics, training through the recipe
with the confusion matrix read back from the event file, and predict writing label maps."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from models import CEDiceLoss, confusion_iou, confusion_matrix, label_class_iou, label_iou
from recipes import nested_unet
from recipes.common import run_cli
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


def test_confusion_iou_per_class():
    matrix = torch.tensor([[8, 2, 0], [1, 4, 0], [0, 0, 0]])
    assert confusion_iou(matrix).tolist() == pytest.approx([8 / 11, 4 / 7, 1.0])  # absent class: 1


def figure_pixels(events, tag):
    image = events.Images(tag)[-1]
    return np.asarray(Image.open(io.BytesIO(image.encoded_image_string)).convert("RGB"))


@pytest.mark.numerics
def test_label_maps_train_end_to_end_and_predict_label_maps(tmp_path):
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
    assert run_cli(nested_unet.main, argv) == 0
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
