"""Shared fixtures: tiny models and data that train in milliseconds on the CPU."""

from __future__ import annotations

# First, before torch loads: the test session gets the OpenMP wait policy a user's run gets, and
# no fit warns that torch came first when the machine is busy.
import trainer  # noqa: F401

# isort: split
import atexit
import errno
import os
import shutil
import subprocess
import tempfile
import time

import matplotlib
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

matplotlib.use("Agg")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
# Precision measurements kept apart from the user's own cache, shared by the tests of one session
# and by the recipe processes they start (which inherit the environment).
os.environ["TRAINER_CACHE_DIR"] = tempfile.mkdtemp(prefix="trainer-test-cache-")
atexit.register(shutil.rmtree, os.environ["TRAINER_CACHE_DIR"], ignore_errors=True)


def make_regression(n: int = 20, features: int = 3, seed: int = 0) -> TensorDataset:
    """A linear regression problem with a little noise."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g)
    w = torch.arange(1.0, features + 1).unsqueeze(1)
    y = x @ w + 0.01 * torch.randn(n, 1, generator=g)
    return TensorDataset(x, y)


def make_classification(n: int = 24, features: int = 4, classes: int = 3, seed: int = 0) -> TensorDataset:
    """Separable classes: the label is the argmax of the first `classes` features."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g)
    return TensorDataset(x, x[:, :classes].argmax(1))


def torch_save_on_a_full_disk(saves_that_succeed: int = 0):
    """A stand-in for ``torch.save`` that fails as the real one does on a full disk, after
    `saves_that_succeed` real saves: it writes part of the file, then raises torch's
    ``RuntimeError`` (``[enforce fail at inline_container.cc...]``) with the ``OSError`` as context."""
    real_save, calls = torch.save, []

    def save(obj, file, *args, **kwargs):
        calls.append(file)
        if len(calls) <= saves_that_succeed:
            return real_save(obj, file, *args, **kwargs)
        file.write(b"part of a checkpoint")
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598") from None

    return save


@pytest.fixture
def regression_loaders():
    """(train_loader, val_loader) over a tiny regression problem, uneven last batches."""
    train = DataLoader(make_regression(10, seed=0), batch_size=4)
    val = DataLoader(make_regression(7, seed=1), batch_size=3)
    return train, val


@pytest.fixture
def linear_model():
    torch.manual_seed(0)
    return nn.Linear(3, 1)


def _mount_tmpfs(path, size: str) -> bool:
    """Mount a tmpfs of `size` on `path` (root only); whether it worked."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return False
    path.mkdir(parents=True, exist_ok=True)
    return (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
        ).returncode
        == 0
    )


def _unmount(path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.fixture
def small_disk(tmp_path):
    """``mount(size) -> folder``: a real file system of `size` (``"240m"``) that fills up, a tmpfs
    mounted for the test (skipped where the test cannot mount, i.e. not as root); ``remount(size)``
    resizes it. Unmounted at the end."""
    folder = tmp_path / "disk"

    class Disk:
        def mount(self, size: str):
            if not _mount_tmpfs(folder, size):
                pytest.skip("mounting a small tmpfs needs root")
            return folder

        def remount(self, size: str) -> None:
            subprocess.run(["mount", "-o", f"remount,size={size}", str(folder)], check=True)

    yield Disk()
    if os.path.ismount(folder):
        _unmount(folder)


@pytest.fixture
def read_only_folder(tmp_path):
    """``make(fill=None) -> folder``: an existing folder, filled by ``fill(folder)`` first, that
    then cannot be written: a tmpfs remounted read-only as root (root ignores permission bits),
    else a folder with mode 0o555."""
    folder = tmp_path / "read-only"
    mounted = []

    def make(fill=None):
        if _mount_tmpfs(folder, "400m"):
            mounted.append(folder)
            if fill is not None:
                fill(folder)
            subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
        else:
            folder.mkdir()
            if fill is not None:
                fill(folder)
            folder.chmod(0o555)
        return folder

    yield make
    if mounted:
        _unmount(folder)
    elif folder.exists():
        folder.chmod(0o755)


class FakeClock:
    """A stand-in for `time.monotonic` that moves only when told: by `advance`, and by `tick`
    seconds after each reading. Time limits tested on it stop at a known step, whatever the load."""

    def __init__(self, start: float, tick: float = 0.0) -> None:
        self.now, self.tick = start, tick

    def __call__(self) -> float:
        now = self.now
        self.now += self.tick
        return now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def fake_clock(monkeypatch):
    """`time.monotonic` replaced by a `FakeClock` for the test (the Trainer's time limit reads it)."""
    clock = FakeClock(time.monotonic())
    monkeypatch.setattr(time, "monotonic", clock)
    return clock
