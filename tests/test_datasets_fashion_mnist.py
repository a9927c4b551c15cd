"""`trainer_datasets.fashion_mnist`: Fashion-MNIST files read through torchvision, look-alike data."""

from __future__ import annotations

import gzip
import re

import pytest
import torch

from recipes import fashion_mnist
from recipes.cli import run_cli
from trainer_datasets import (
    CLASSES,
    DataNotFoundError,
    DatasetError,
    load_fashion_mnist,
    make_learnable_fashion_like,
    write_fashion_mnist_idx,
)
from trainer_datasets.fashion_mnist import FILES, raw_folder


@pytest.fixture
def fashion_dir(tmp_path):
    """A data folder with a 50-image training split and a 20-image test split, as .gz IDX files."""
    train = make_learnable_fashion_like(50, seed=0)
    test = make_learnable_fashion_like(20, seed=1)
    write_fashion_mnist_idx(tmp_path, *train, train=True)
    write_fashion_mnist_idx(tmp_path, *test, train=False)
    return tmp_path, train, test


def test_classes_are_the_tutorial_names():
    assert CLASSES == (
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    )


def test_written_files_are_real_gzip_idx(fashion_dir):
    root, (images, labels), _ = fashion_dir
    raw = raw_folder(root)
    with gzip.open(raw / "train-images-idx3-ubyte.gz", "rb") as f:
        data = f.read()
    assert int.from_bytes(data[:4], "big") == 2051
    assert [int.from_bytes(data[i : i + 4], "big") for i in (4, 8, 12)] == [50, 28, 28]
    assert data[16:] == images.numpy().tobytes()
    with gzip.open(raw / "train-labels-idx1-ubyte.gz", "rb") as f:
        data = f.read()
    assert int.from_bytes(data[:4], "big") == 2049 and int.from_bytes(data[4:8], "big") == 50
    assert sorted(p.name for p in raw.iterdir()) == sorted(f"{name}.gz" for name in FILES)  # no temporary file


def test_load_reads_back_through_torchvision(fashion_dir, mocker):
    root, (images, labels), (test_images, test_labels) = fashion_dir
    import trainer_datasets.fashion_mnist as module

    spy = mocker.spy(module, "FashionMNIST")
    got_images, got_labels = load_fashion_mnist(root, train=True)
    assert spy.call_count == 1 and spy.call_args.kwargs["train"] is True
    assert got_images.dtype == torch.uint8 and got_images.shape == (50, 28, 28)
    assert got_labels.dtype == torch.int64
    assert torch.equal(got_images, images) and torch.equal(got_labels, labels)
    got_test = load_fashion_mnist(root, train=False)
    assert torch.equal(got_test[0], test_images) and torch.equal(got_test[1], test_labels)
    # the .gz files were decompressed next to themselves, where torchvision reads them
    assert all((raw_folder(root) / name).is_file() for name in FILES)


def test_rewriting_a_split_is_not_shadowed_by_old_files(fashion_dir):
    root, _, _ = fashion_dir
    load_fashion_mnist(root)  # leaves uncompressed copies
    images, labels = make_learnable_fashion_like(30, seed=9)
    write_fashion_mnist_idx(root, images, labels, train=True)
    assert torch.equal(load_fashion_mnist(root)[0], images)


def test_one_split_alone_is_read(tmp_path):
    images, labels = make_learnable_fashion_like(10, seed=2)
    write_fashion_mnist_idx(tmp_path, images, labels, train=True)
    assert torch.equal(load_fashion_mnist(tmp_path, train=True)[1], labels)
    with pytest.raises(DataNotFoundError, match="t10k-images-idx3-ubyte"):
        load_fashion_mnist(tmp_path, train=False)


def test_missing_files_error_names_files_folder_and_download(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        load_fashion_mnist(tmp_path / "data")
    message = str(info.value)
    assert isinstance(info.value, DataNotFoundError) and "\n" not in message
    for name in FILES:
        assert name in message
    assert str(tmp_path / "data" / "FashionMNIST" / "raw") in message and "--download" in message


def test_failed_download_is_a_clear_error(tmp_path, mocker):
    import trainer_datasets.fashion_mnist as module

    mocker.patch.object(module.FashionMNIST, "download", side_effect=RuntimeError("Error downloading: no network"))
    with pytest.raises(DataNotFoundError, match="download failed.*no network"):
        load_fashion_mnist(tmp_path, download=True)


def test_corrupt_idx_file_is_a_clear_error(fashion_dir):
    root, _, _ = fashion_dir
    load_fashion_mnist(root)
    (raw_folder(root) / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x09garbage")
    with pytest.raises(DatasetError, match="train-images-idx3-ubyte is not a valid IDX images file: 11 bytes"):
        load_fashion_mnist(root)


def test_make_learnable_fashion_like_is_seeded_and_balanced():
    images, labels = make_learnable_fashion_like(2000, seed=3)
    assert images.dtype == torch.uint8 and images.shape == (2000, 28, 28) and labels.dtype == torch.int64
    assert torch.equal(images, make_learnable_fashion_like(2000, seed=3)[0])
    counts = torch.bincount(labels, minlength=10)
    assert counts.min() > 120
    means = torch.stack([images[labels == c].float().mean(0) for c in range(10)]).flatten(1)
    # class means differ clearly: every pair is far apart compared with the pixel range
    distances = torch.cdist(means, means) + torch.eye(10) * 1e9
    assert distances.min() > 300


def unpacked(root):
    """The raw folder of `root` with every .gz IDX file replaced by its uncompressed bytes."""
    raw = raw_folder(root)
    for packed in raw.glob("*.gz"):
        (raw / packed.stem).write_bytes(gzip.decompress(packed.read_bytes()))
        packed.unlink()
    return raw


def edit(path, change):
    path.write_bytes(change(path.read_bytes()))


IDX_FAULTS = {
    "truncated": (
        "train-images-idx3-ubyte",
        lambda b: b[:1000],
        "its header claims 50 items but the file holds only 1 (1000 bytes, 39216 expected)",
    ),
    "claims more": (
        "train-labels-idx1-ubyte",
        lambda b: b[:4] + (1000).to_bytes(4, "big") + b[8:],
        "its header claims 1000 items but the file holds only 50",
    ),
    "wrong magic": (
        "train-images-idx3-ubyte",
        lambda b: b"\x1f\x8b\x08\x03" + b[4:],
        "magic number 0x1f8b0803, not an IDX file's",
    ),
    "float data": ("train-images-idx3-ubyte", lambda b: b"\x00\x00\x0d\x03" + b[4:], "it has data type float (0x0d)"),
    "labels in images": ("train-labels-idx1-ubyte", None, "not a valid IDX labels file: it has 3 dimension(s)"),
    "label out of range": (
        "train-labels-idx1-ubyte",
        lambda b: b[:8] + bytes([200]) + b[9:],
        "has label 200 at item 0 (1 of its 50 labels are out of range); Fashion-MNIST labels are 0 to 9",
    ),
    "32x32 images": (
        "train-images-idx3-ubyte",
        lambda b: b[:8] + (32).to_bytes(4, "big") * 2 + b[16:],
        "its images are 32x32, Fashion-MNIST's are 28x28",
    ),
}


@pytest.mark.parametrize("fault", IDX_FAULTS)
def test_damaged_idx_files_are_named_with_what_is_wrong(fashion_dir, fault):
    root, _, _ = fashion_dir
    raw = unpacked(root)
    name, change, message = IDX_FAULTS[fault]
    if change is None:
        (raw / name).write_bytes((raw / "train-images-idx3-ubyte").read_bytes())
    else:
        edit(raw / name, change)
    with pytest.raises(DatasetError) as info:
        load_fashion_mnist(root)
    assert str(info.value).startswith(f"{raw / name} ") and message in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda b: b + bytes(5_000_000), "holds more than the 39216 bytes its header declares (50 items)"),
        (lambda b: b[:20_000], "holds only 20000 of the 39216 bytes its header declares (50 items)"),
        (lambda b: b[:4] + (10**9).to_bytes(4, "big") + b[8:], "its header asks for 784.0 GB"),
        (lambda b: b"\x00\x00\x08\x01" + b[4:], "it has 1 dimension(s)"),
    ],
    ids=["a bomb", "cut short", "a header claiming 784 GB", "labels' header"],
)
def test_a_gz_file_is_checked_by_its_header_before_more_than_it_declares_is_written(fashion_dir, change, message):
    """Decompressing stops at the size the IDX header declares and checks the disk has room for
    it first: a damaged or hostile .gz cannot fill the disk. Nothing is left behind."""
    root, _, _ = fashion_dir
    packed = raw_folder(root) / "train-images-idx3-ubyte.gz"
    packed.write_bytes(gzip.compress(change(gzip.decompress(packed.read_bytes())), compresslevel=1))
    before = sorted(raw_folder(root).iterdir())
    with pytest.raises(DatasetError, match=re.escape(message)):
        load_fashion_mnist(root)
    assert sorted(raw_folder(root).iterdir()) == before  # no partial copy, no hidden temporary file


def test_a_corrupt_deflate_stream_is_named(fashion_dir):
    root, _, _ = fashion_dir
    packed = raw_folder(root) / "train-images-idx3-ubyte.gz"
    data = bytearray(packed.read_bytes())
    data[40:60] = b"\xff" * 20  # inside the deflate stream, after the gzip header
    packed.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match=rf"cannot decompress {packed}: its deflate stream is corrupt"):
        load_fashion_mnist(root)
    assert sorted(p.name for p in raw_folder(root).iterdir()) == sorted(f"{name}.gz" for name in FILES)  # nothing left


def test_the_recipe_reports_a_damaged_idx_file_in_one_line_and_writes_nothing(fashion_dir, tmp_path, capsys):
    root, _, _ = fashion_dir
    raw = unpacked(root)
    edit(raw / "t10k-labels-idx1-ubyte", lambda b: b[:8] + bytes([10]) + b[9:])
    assert run_cli(fashion_mnist.main, ["--data-dir", str(root), "--log-dir", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err == (
        f"error: {raw / 't10k-labels-idx1-ubyte'} has label 10 at item 0 (1 of its 20 labels "
        "are out of range); Fashion-MNIST labels are 0 to 9\n"
    )
    assert not (tmp_path / "run").exists()
