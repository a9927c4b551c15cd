"""Shared fixtures: tiny models and data that train in milliseconds on the CPU."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

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
