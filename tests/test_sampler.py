"""`trainer.sampler`: data orders that depend on (seed, epoch) alone, loaders that start late, set_epoch."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, RandomSampler

from tests.conftest import make_classification, make_regression
from tests.helpers import make_trainer
from trainer import Callback, ResumableSampler, TrainingInterrupted
from trainer.sampler import batches_from, resumable
from trainer_datasets import TensorBatchLoader


def test_resumable_sampler_orders_by_seed_and_epoch_and_starts_late():
    data = list(range(10))
    sampler = ResumableSampler(data, seed=5)
    sampler.set_epoch(2)
    order = list(sampler)
    again = ResumableSampler(data, seed=5)
    again.set_epoch(2)
    again.skip(4)
    assert list(again) == order[4:] and list(again) == order  # the skip holds for one pass
    other = ResumableSampler(data, seed=5)
    other.set_epoch(3)
    assert sorted(order) == data and list(other) != order
    assert list(ResumableSampler(data, shuffle=False)) == data
    halves = [list(ResumableSampler(data, seed=5, num_replicas=2, rank=r)) for r in (0, 1)]
    for rank, half in enumerate(halves):
        sampler = ResumableSampler(data, seed=5, num_replicas=2, rank=rank)
        sampler.skip(2)
        assert list(sampler) == half[2:]
    assert sorted(halves[0] + halves[1]) == sorted(data)


def test_which_loaders_start_late():
    data = make_classification(12)
    assert resumable([1, 2, 3]) and list(batches_from([1, 2, 3], 2)) == [3]
    sampled = DataLoader(data, batch_size=4, sampler=ResumableSampler(data, shuffle=False))
    assert resumable(sampled)
    assert torch.equal(next(iter(batches_from(sampled, 2)))[0], data.tensors[0][8:12])
    assert not resumable(DataLoader(data, batch_size=4, shuffle=True))
    assert batches_from(DataLoader(data, batch_size=4, sampler=RandomSampler(data)), 1) is None
    images = torch.arange(12 * 4, dtype=torch.uint8).view(12, 1, 2, 2)
    loader = TensorBatchLoader(images, torch.arange(12), batch_size=5, shuffle=False)
    whole = list(loader)
    late = list(batches_from(loader, 1))
    assert len(late) == 2 and all(torch.equal(a[0], b[0]) for a, b in zip(late, whole[1:]))
    assert len(list(loader)) == 3  # the skip holds for one pass


def test_set_epoch_is_called_on_loader_or_sampler_and_on_the_dataset(linear_model, regression_loaders):
    class Sampler(torch.utils.data.SequentialSampler):
        epochs: list = []

        def set_epoch(self, epoch):
            self.epochs.append(epoch)

    class Data(torch.utils.data.TensorDataset):
        epochs: list = []

        def set_epoch(self, epoch):
            self.epochs.append(epoch)

    data = Data(*make_regression(8).tensors)
    loader = DataLoader(data, batch_size=4, sampler=Sampler(data))
    make_trainer(linear_model, max_epochs=3).fit(loader)
    assert Sampler.epochs == [0, 1, 2] and Data.epochs == [0, 1, 2]

    class StopAtStart(Callback):  # the warning comes before training: no worker needs to start
        def on_fit_start(self, trainer):
            raise TrainingInterrupted("stopped")

    kept = DataLoader(data, batch_size=4, num_workers=1, persistent_workers=True)
    with pytest.warns(RuntimeWarning, match="persistent_workers=True.*never see Data.set_epoch"):
        with pytest.raises(TrainingInterrupted):
            make_trainer(linear_model, [StopAtStart()], max_epochs=1).fit(kept)
