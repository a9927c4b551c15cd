"""`models.cnn`: FashionCNN, its size, names, output, errors and tracing."""

from __future__ import annotations

import warnings

import pytest
import torch

from models import (
    CNN,
    FashionCNN,
)
from tests.helpers import n_params

# --- models -----------------------------------------------------------------------------


def test_fashion_cnn_size_names_and_output():
    torch.manual_seed(0)
    model = FashionCNN()
    assert CNN is FashionCNN
    assert n_params(model) == 44_426
    names = {name for name, _ in model.named_children()}
    assert names == {"conv1", "pool", "conv2", "fc1", "fc2", "fc3"}
    out = model(torch.randn(5, 1, 28, 28))
    assert out.shape == (5, 10)
    channels_last = model(torch.randn(2, 1, 28, 28).to(memory_format=torch.channels_last))
    assert channels_last.shape == (2, 10)


def test_fashion_cnn_rejects_wrong_input_shape():
    with pytest.raises(ValueError, match=r"\(N, 1, 28, 28\).*\(2, 3, 28, 28\)"):
        FashionCNN()(torch.randn(2, 3, 28, 28))


@pytest.mark.numerics
def test_fashion_cnn_traces():
    model = FashionCNN().eval()
    x = torch.randn(2, 1, 28, 28)
    with warnings.catch_warnings():
        warnings.simplefilter("error", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.trace(model, x)
    torch.testing.assert_close(traced(x), model(x))
