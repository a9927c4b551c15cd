"""The Fashion-MNIST recipe end to end on small files in the real IDX gzip format."""

from __future__ import annotations

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from recipes import fashion_mnist
from recipes.cli import run_cli
from trainer_datasets import CLASSES, make_learnable_fashion_like, write_fashion_mnist_idx


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    train_images, train_labels = make_learnable_fashion_like(960, seed=0)
    test_images, test_labels = make_learnable_fashion_like(160, seed=1)
    write_fashion_mnist_idx(folder, train_images, train_labels, train=True)
    write_fashion_mnist_idx(folder, test_images, test_labels, train=False)
    return folder


@pytest.fixture(scope="module")
def finished_run(data_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "fm"
    argv = [
        "--data-dir",
        str(data_dir),
        "--log-dir",
        str(run_dir),
        "--epochs",
        "3",
        "--batch-size",
        "16",
        "--lr",
        "0.02",
        "--log-every",
        "20",
        "--precision",
        "32",  # training quality is tested in float32: the automatic choice differs between CPUs
    ]
    assert run_cli(fashion_mnist.main, argv) == 0
    return run_dir


def test_every_tutorial_tag_is_logged(finished_run):
    acc = EventAccumulator(str(finished_run), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    assert {"four_fashion_mnist_images", "predictions vs. actuals"} <= set(tags["images"])
    assert set(tags["scalars"]) == {
        "Loss/training loss",
        "throughput (samples per second)",
        "Loss/training (epoch mean)",
        "Loss/validation",
        "Validation/accuracy",
        "learning rate",
    }
    assert tags["graph"]
    assert [e.step for e in acc.Scalars("Loss/training loss")] == list(range(20, 181, 20))
    assert [e.step for e in acc.Images("predictions vs. actuals")] == list(range(20, 181, 20))
    assert sorted(acc.PluginTagToContent("pr_curves")) == [f"pr/{i} {name}" for i, name in enumerate(CLASSES)]
    assert (finished_run / "projector_config.pbtxt").is_file()


@pytest.mark.numerics
def test_accuracy_well_above_chance(finished_run):
    acc = EventAccumulator(str(finished_run), size_guidance={"scalars": 0})
    acc.Reload()
    accuracy = acc.Scalars("Validation/accuracy")[-1].value
    print(f"measured: validation accuracy {accuracy:.4f}")
    assert accuracy > 0.7  # chance is 0.1


def test_prints_test_accuracy(data_dir, tmp_path, capsys):
    argv = [
        "--data-dir",
        str(data_dir),
        "--log-dir",
        str(tmp_path / "r"),
        "--epochs",
        "1",
        "--batch-size",
        "32",
        "--workers",
        "1",
    ]
    assert run_cli(fashion_mnist.main, argv) == 0
    out = capsys.readouterr().out
    assert "test accuracy: " in out and "python -m trainer.board" in out


def test_missing_data_names_the_files_and_folder(tmp_path, capsys):
    assert run_cli(fashion_mnist.main, ["--data-dir", str(tmp_path / "nothing"), "--log-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--download" in err
    for name in (
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ):
        assert name in err
    assert str(tmp_path / "nothing" / "FashionMNIST" / "raw") in err
    assert not (tmp_path / "r").exists()


def test_help_lists_every_option():
    text = fashion_mnist.build_parser().format_help()
    for option in (
        "--epochs",
        "--batch-size",
        "--lr",
        "--momentum",
        "--log-every",
        "--data-dir",
        "--log-dir",
        "--download",
        "--device",
        "--seed",
        "--workers",
        "--resume",
    ):
        assert option in text
