"""Streaming segmentation folders: the same batches as in memory, checked once, indexed, resumed
inside an epoch. (Two processes under torchrun decoding disjoint shards: test_distributed.py.)"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from recipes import nested_unet
from recipes.common import run_cli
from tests.helpers import tiny_args
from tests.test_kill_resume import assert_matches_reference
from trainer import ResumableSampler
from trainer.callbacks import ModelCheckpoint
from trainer.checkpoint import load_checkpoint
from trainer_datasets import (
    DatasetError,
    SegmentationFolder,
    SegmentationStream,
    SyntheticNuclei,
    segmentation_folder,
    split_segmentation,
)
from trainer_datasets.segmentation_stream import index_file


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A segmentation folder of 12 PNG images of 32x32 with their masks."""
    return SyntheticNuclei(12, image_size=32, seed=1).save(tmp_path_factory.mktemp("data") / "nuclei")


def count_decodes(monkeypatch) -> list[str]:
    """Record every image and mask file decoded from now on (the readers `load_sample` calls)."""
    opened: list[str] = []
    for name in ("read_image_rgb", "read_mask"):
        original = getattr(segmentation_folder, name)

        def reader(path, _original=original):
            opened.append(str(path))
            return _original(path)

        monkeypatch.setattr(segmentation_folder, name, reader)
    return opened


def epochs_of_batches(dataset, workers: int, epochs: int = 2) -> list[list[torch.Tensor]]:
    """Every batch of `epochs` shuffled passes, as the Trainer draws them (set_epoch on both)."""
    sampler = ResumableSampler(dataset, seed=5)
    loader = DataLoader(dataset, batch_size=4, sampler=sampler, num_workers=workers)
    batches = []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        batches.extend(loader)
    return batches


@pytest.mark.parametrize("augment", [True, False], ids=["augmented", "plain"])
def test_streaming_and_in_memory_batches_are_equal_for_a_seed(folder, tmp_path, augment):
    """Two epochs of the training set, streamed by 2 workers, equal the in-memory set's batches
    bit for bit (augmentations included), and so do the validation sets of the same split."""
    memory = split_segmentation(folder, seed=3, augment_train=augment, mode="memory")
    stream = split_segmentation(folder, seed=3, augment_train=augment, mode="stream", index_dir=tmp_path)
    assert isinstance(memory[0], SegmentationFolder) and isinstance(stream[0], SegmentationStream)
    assert stream[0].ids == memory[0].ids and stream[1].ids == memory[1].ids
    expected, streamed = epochs_of_batches(memory[0], workers=0), epochs_of_batches(stream[0], workers=2)
    assert len(streamed) == len(expected) == 6
    for got, want in zip(streamed, expected):
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    for index in range(len(memory[1])):
        assert all(torch.equal(a, b) for a, b in zip(stream[1][index], memory[1][index]))


def write_bad_file(data: Path, problem: str) -> str:
    """Spoil one sample of `data`; the file the error must name."""
    if problem == "corrupt image":
        (data / "images" / "0017.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
        return "images/0017.png"
    segmentation_folder.write_png_file(torch.zeros(1, 8, 8, dtype=torch.uint8), data / "masks" / "0" / "0023.png")
    return "masks/0/0023.png"


@pytest.mark.parametrize("problem", ["corrupt image", "mask of another size"])
def test_a_bad_file_among_many_is_named_before_training_as_in_memory(tmp_path, capsys, problem):
    """One bad file among 30: streaming refuses the folder with the in-memory mode's message, and
    the recipe with --data-mode stream prints it as one error line, exit code 2, no run written."""
    data = SyntheticNuclei(30, image_size=16, seed=1).save(tmp_path / "data")
    name = write_bad_file(data, problem)
    with pytest.raises(DatasetError) as in_memory:
        split_segmentation(data, mode="memory")
    with pytest.raises(DatasetError) as streamed:
        split_segmentation(data, mode="stream", index_dir=tmp_path / "index")
    assert str(streamed.value) == str(in_memory.value) and name in str(streamed.value)
    assert not (tmp_path / "index").exists() or not any((tmp_path / "index").iterdir())  # nothing kept

    assert (
        run_cli(
            nested_unet.main,
            ["--data", str(data), "--data-mode", "stream", "--image-size", "16", "--log-dir", str(tmp_path / "run")],
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and name in err
    assert not (tmp_path / "run").exists()


def test_a_second_start_reuses_the_index(folder, tmp_path, monkeypatch):
    """The first start decodes every file once (the check); the second decodes none before
    training, and then only the files of the items asked for."""
    opened = count_decodes(monkeypatch)
    first = SegmentationStream(folder, index_dir=tmp_path)
    assert len(opened) == 24 and len(set(opened)) == 24  # 12 images and 12 masks, each once
    assert json.loads(index_file(folder, tmp_path).read_text())["files"]["images/0000.png"][0] > 0

    opened.clear()
    second = SegmentationStream(folder, index_dir=tmp_path, augment=True)
    assert opened == []
    assert second.ids == first.ids and second.size == (32, 32)
    second[5]
    assert sorted(Path(p).name for p in opened) == ["0005.png", "0005.png"]


@pytest.mark.parametrize("change", ["file added", "file rewritten", "file spoiled"])
def test_a_changed_folder_invalidates_the_index(tmp_path, monkeypatch, change):
    """Adding a sample, rewriting a file (same size, new time) or spoiling one makes the next start
    check the folder again: the new sample is found, the spoiled file refused."""
    data = SyntheticNuclei(6, image_size=16, seed=1).save(tmp_path / "data")
    assert len(SegmentationStream(data, index_dir=tmp_path / "index")) == 6
    opened = count_decodes(monkeypatch)
    image = data / "images" / "0002.png"
    if change == "file added":
        SyntheticNuclei(7, image_size=16, seed=1).save(data, exist_ok=True)
        assert len(SegmentationStream(data, index_dir=tmp_path / "index")) == 7
    elif change == "file rewritten":
        stat = image.stat()
        os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
        assert len(SegmentationStream(data, index_dir=tmp_path / "index")) == 6
        assert len(opened) == 12
    else:
        image.write_bytes(b"\0" * image.stat().st_size)  # same size: only its time tells
        with pytest.raises(DatasetError, match="0002.png"):
            SegmentationStream(data, index_dir=tmp_path / "index")


class Killed(Exception):
    """What `kill_at` raises."""


def kill_at(step: int):
    """A `ModelCheckpoint.on_batch_end` that raises `Killed` once global step `step`'s checkpoint
    work is done: the run ends as a killed process does, its last.pt the last step checkpoint
    (`ModelCheckpoint` saves nothing on an arbitrary error)."""
    original = ModelCheckpoint.on_batch_end

    def on_batch_end(self, trainer, batch, outputs):
        original(self, trainer, batch, outputs)
        if trainer.global_step == step:
            raise Killed(f"at step {step}")

    return on_batch_end


def test_a_streaming_run_killed_mid_epoch_with_workers_resumes_bit_identical(tmp_path, monkeypatch):
    """Killed at step 3 (batch 3 of 4), after the step-2 checkpoint, with 2 workers decoding the
    streamed folder (8 augmented training images in steps of 2): the resumed run starts at batch 3
    and ends bit-identical to an uninterrupted streaming run (checkpoints, curves, metrics.csv);
    config.json records the mode. (A real SIGKILL is test_kill_resume's.)"""
    data = SyntheticNuclei(10, image_size=16, seed=1).save(tmp_path / "data")
    options = tiny_args(
        data=data,
        data_mode="stream",
        workers=2,
        batch_size=2,
        seed=2,
        checkpoint_every=2,
        train_samples=None,
        val_samples=None,
    )
    reference, run_dir = tmp_path / "reference", tmp_path / "run"
    assert run_cli(nested_unet.main, [*options, "--log-dir", str(reference)]) == 0
    with monkeypatch.context() as patch:
        patch.setattr(ModelCheckpoint, "on_batch_end", kill_at(3))
        with pytest.raises(Killed):
            run_cli(nested_unet.main, [*options, "--log-dir", str(run_dir)])
    position = load_checkpoint(run_dir / "last.pt")["position"]
    assert (position["epoch"], position["batches"]) == (0, 2)
    assert json.loads((run_dir / "config.json").read_text())["data_mode"] == "stream"

    assert run_cli(nested_unet.main, ["--resume", str(run_dir)]) == 0
    assert_matches_reference(run_dir, reference)


def test_streamed_label_maps_equal_the_in_memory_ones(tmp_path):
    """A label-map folder (palette PNGs, an ignored band, classes.txt) streams the same int64
    label maps, augmented alike, as it loads in memory; the index keeps its classes and mode."""
    from tests.test_label_maps import CLASSES, write_palette_folder

    write_palette_folder(tmp_path / "data", count=8)
    memory = split_segmentation(tmp_path / "data", seed=3, mode="memory")
    stream = split_segmentation(tmp_path / "data", seed=3, mode="stream", index_dir=tmp_path / "index")
    again = SegmentationStream(tmp_path / "data", index_dir=tmp_path / "index")  # read back from the index
    for dataset in (stream[0], again):
        assert dataset.mask_mode == "labels" and dataset.classes == CLASSES and dataset.ignore_index == 255
    for got, want in zip(epochs_of_batches(stream[0], workers=0), epochs_of_batches(memory[0], workers=0)):
        assert got[1].dtype == torch.int64 and (got[1] == 255).any()
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
