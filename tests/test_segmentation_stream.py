"""Streaming segmentation folders: the same batches as in memory, checked once, indexed, resumed
inside an epoch. (Two processes under torchrun decoding disjoint shards: test_distributed.py.)"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from recipes import nested_unet
from recipes.cli import run_cli
from tests.helpers import tiny_args
from tests.processes import RecipeProcess
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
    assert [p.name for p in tmp_path.iterdir()] == [index_file(folder, tmp_path).name]  # no temporary file left

    opened.clear()
    second = SegmentationStream(folder, index_dir=tmp_path, augment=True)
    assert opened == []
    assert second.ids == first.ids and second.size == (32, 32)
    second[5]
    assert sorted(Path(p).name for p in opened) == ["0005.png", "0005.png"]


def test_an_index_folder_that_cannot_be_written_only_costs_a_new_check(folder, tmp_path, monkeypatch):
    """The index is a cache: where its folder cannot be made (here a file stands at its path) the
    stream still gives every item, and the next start checks the folder again."""
    blocked = tmp_path / "index"
    blocked.write_text("not a folder")
    opened = count_decodes(monkeypatch)
    stream = SegmentationStream(folder, index_dir=blocked)
    assert len(stream) == 12 and len(opened) == 24 and stream[3][0].shape == (3, 32, 32)
    opened.clear()
    SegmentationStream(folder, index_dir=blocked)
    assert len(opened) == 24 and blocked.read_text() == "not a folder"


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


@pytest.mark.parametrize("change", ["removed", "rewritten, its times set back", "spoiled"])
def test_a_file_changed_during_a_run_is_named_not_read(tmp_path, change):
    """After the check, an item's file that is removed, rewritten with its size and modification
    time kept (as `cp --preserve` or a restore tool leaves it), or spoiled is a DatasetError naming
    it when the item is asked for: a run never trains on a file other than the one it checked."""
    data = SyntheticNuclei(4, image_size=16, seed=1).save(tmp_path / "data")
    stream = SegmentationStream(data, index_dir=tmp_path / "index")
    stream[1]
    mask, other = (data / stream.index.samples[stream.ids[i]][1][0] for i in (1, 2))
    if change == "removed":
        mask.unlink()
    else:
        stat, other = mask.stat(), other.read_bytes()
        mask.write_bytes(other if change == "spoiled" else mask.read_bytes()[::-1])  # or the same size
        if change != "spoiled":
            os.utime(mask, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(DatasetError, match=f"^{mask} (was removed|changed) after the folder was checked"):
        stream[1]
    stream[2]  # the others are still read


def test_an_index_file_of_valid_json_that_is_no_index_is_checked_anew(folder, tmp_path):
    path = index_file(folder, tmp_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("[1, 2, 3]")
    assert len(SegmentationStream(folder, index_dir=tmp_path)) == 12
    assert json.loads(path.read_text())["samples"]


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


# The recipe's command line, removing every image of the folder (the first argument) once global
# step 2 is done: from inside the run, so that the run cannot end first.
REMOVE_IMAGES_AT_STEP_2 = """
import os, runpy, sys
from trainer.callbacks import ModelCheckpoint
images = sys.argv.pop(1)
def on_batch_end(self, trainer, batch, outputs, original=ModelCheckpoint.on_batch_end):
    original(self, trainer, batch, outputs)
    if trainer.global_step == 2:
        for name in os.listdir(images):
            os.remove(os.path.join(images, name))
ModelCheckpoint.on_batch_end = on_batch_end
ModelCheckpoint.idle_hooks = lambda self, trainer: frozenset()
runpy.run_module("recipes.nested_unet", run_name="__main__", alter_sys=True)
"""


@pytest.mark.skipif(sys.platform == "win32", reason="needs POSIX signals")
def test_files_removed_during_a_run_with_workers_stop_it_in_one_line_and_the_process_exits(tmp_path):
    """A real process streaming with 2 workers (which ignore SIGTERM, for a signal to the process
    group): the images vanish during epoch 1. The run stops at the first batch it cannot load, in
    one line naming the file and how to go on, exit code 2, its position saved and its lock
    released, and the process ends (it used to hang at exit, waiting for its workers). Once the
    files are back, the printed command resumes it to the end."""
    data = SyntheticNuclei(32, image_size=16, seed=1).save(tmp_path / "data")
    run_dir = tmp_path / "run"
    options = tiny_args(
        data=data, data_mode="stream", workers=2, batch_size=2, train_samples=None, val_samples=None, log_dir=run_dir
    )
    run = RecipeProcess([str(data / "images"), *options], code=REMOVE_IMAGES_AT_STEP_2, timeout=120)
    assert run.finish() == 2, run.stderr[-3000:]  # a hang would end in the timeout's SIGKILL instead
    line = run.stderr.strip().splitlines()[-1]
    command = f"python -m recipes.nested_unet --resume {run_dir}"
    assert re.fullmatch(
        rf"error: loading training batch (\d+) of epoch 1 failed: DatasetError: {re.escape(str(data))}/images/\S+ "
        rf"was removed after the folder was checked at the start of the run.*; the run stopped and can resume from "
        rf"{re.escape(str(run_dir / 'last.pt'))} once the data is fixed: {re.escape(command)}",
        line,
    ), line
    failed_batch = int(re.search(r"training batch (\d+)", line).group(1))
    assert load_checkpoint(run_dir / "last.pt")["position"]["batches"] == failed_batch - 1
    assert not (run_dir / ".lock").exists() and not list(run_dir.glob(".*.tmp"))

    SyntheticNuclei(32, image_size=16, seed=1).save(data, exist_ok=True)  # the same files again
    assert run_cli(nested_unet.main, ["--resume", str(run_dir)]) == 0
    assert load_checkpoint(run_dir / "last.pt")["epochs_done"] == 1
