"""`trainer_datasets.tensor_loader`: TensorBatchLoader."""

from __future__ import annotations

import pytest
import torch

from trainer_datasets import (
    DatasetError,
    TensorBatchLoader,
)

# TensorBatchLoader


def test_loader_covers_every_sample_once_and_normalises():
    images = torch.randint(0, 256, (10, 28, 28), dtype=torch.uint8)
    labels = torch.arange(10)
    loader = TensorBatchLoader(images, labels, batch_size=4, shuffle=True, seed=0, mean=0.25, std=0.5)
    assert len(loader) == 3 and loader.num_samples == 10
    batches = list(loader)
    assert [len(b[1]) for b in batches] == [4, 4, 2]
    seen = torch.cat([b[1] for b in batches])
    assert sorted(seen.tolist()) == list(range(10))
    for inputs, batch_labels in batches:
        assert inputs.dtype == torch.float32 and inputs.shape[1:] == (1, 28, 28)
        expected = (images[batch_labels].float().unsqueeze(1) / 255 - 0.25) / 0.5
        assert torch.allclose(inputs, expected, atol=1e-6)


def test_loader_reshuffles_per_epoch_deterministically():
    images = torch.zeros(32, 28, 28, dtype=torch.uint8)
    labels = torch.arange(32)

    def orders(loader, epochs):
        return [torch.cat([y for _, y in loader]).tolist() for _ in range(epochs)]

    first = orders(TensorBatchLoader(images, labels, 8, shuffle=True, seed=1), 3)
    assert first == orders(TensorBatchLoader(images, labels, 8, shuffle=True, seed=1), 3)
    assert first[0] != first[1] != first[2]
    assert first[0] != orders(TensorBatchLoader(images, labels, 8, shuffle=True, seed=2), 1)[0]
    loader = TensorBatchLoader(images, labels, 8, shuffle=True, seed=1)
    loader.set_epoch(2)
    assert orders(loader, 1)[0] == first[2]
    # peeking at one batch does not advance the epoch
    loader.set_epoch(0)
    next(iter(loader))
    assert orders(loader, 1)[0] == first[0]


def test_loader_without_shuffle_and_drop_last():
    images = torch.zeros(10, 1, 28, 28, dtype=torch.uint8)
    loader = TensorBatchLoader(images, torch.arange(10), batch_size=4, shuffle=False, drop_last=True)
    assert len(loader) == 2
    assert [y.tolist() for _, y in loader] == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_loader_rejects_bad_input():
    with pytest.raises(DatasetError, match="uint8"):
        TensorBatchLoader(torch.zeros(4, 28, 28), torch.zeros(4), 2)
    with pytest.raises(DatasetError, match="one label per image"):
        TensorBatchLoader(torch.zeros(4, 28, 28, dtype=torch.uint8), torch.zeros(3), 2)
    for batch_size in (0, -1, 2.0, True, None):
        with pytest.raises(ValueError, match=f"batch_size must be a positive integer, got {batch_size!r}"):
            TensorBatchLoader(torch.zeros(4, 28, 28, dtype=torch.uint8), torch.zeros(4), batch_size)


def test_tensor_batch_loader_shards_cover_the_data():
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 1, 2, 2).contiguous()
    labels = torch.arange(10)
    loader = TensorBatchLoader(images, labels, batch_size=2, shuffle=True, seed=1)
    train_parts = [[int(v) for _, y in loader.shard(rank, 3, train=True) for v in y] for rank in range(3)]
    assert [len(p) for p in train_parts] == [3, 3, 3]  # equal steps on every rank
    assert len(set(sum(train_parts, []))) == 9  # disjoint
    eval_parts = [[int(v) for _, y in loader.shard(rank, 3, train=False) for v in y] for rank in range(3)]
    assert sorted(sum(eval_parts, [])) == list(range(10))  # every sample exactly once
