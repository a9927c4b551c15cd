"""`trainer.WarmupCosineLR`: the warm-up and per-step cosine of the segmentation recipe's default
schedule, its state in checkpoints and its stretch when a run resumes with more epochs."""

from __future__ import annotations

import math

import pytest
import torch

from tests.helpers import scheduled_run
from trainer import Callback, WarmupCosineLR


def rates(scheduler: WarmupCosineLR, steps: int) -> list[float]:
    """The rate of each of `steps` optimizer steps, as the trainer steps the scheduler after each."""
    seen = []
    for _ in range(steps):
        seen.append(scheduler.optimizer.param_groups[0]["lr"])
        scheduler.optimizer.step()
        scheduler.step()
    return seen


def adam(lr: float = 0.5, groups: int = 1) -> torch.optim.Optimizer:
    params = [{"params": [torch.zeros(1, requires_grad=True)], "lr": lr * (i + 1)} for i in range(groups)]
    return torch.optim.Adam(params)


def test_the_rate_rises_over_the_warmup_then_anneals_to_its_final_fraction_and_stays():
    scheduler = WarmupCosineLR(adam(0.5), total_steps=20, warmup_steps=4, final_factor=0.1)
    seen = rates(scheduler, 26)
    assert seen[:5] == pytest.approx([0.125, 0.25, 0.375, 0.5, 0.5])  # (s + 1) / 4 of the rate, then all of it
    decay = seen[4:21]
    assert all(b < a for a, b in zip(decay, decay[1:])), decay
    assert seen[12] == pytest.approx(0.05 + 0.45 * 0.5)  # halfway through the decay: halfway down
    assert seen[20:] == pytest.approx([0.05] * 6)  # the end, and after it


def test_each_group_is_scaled_from_its_own_rate():
    scheduler = WarmupCosineLR(adam(0.5, groups=2), total_steps=10, warmup_steps=2, final_factor=0.0)
    optimizer = scheduler.optimizer
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.25, 0.5])
    rates(scheduler, 10)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.0, 0.0])


def test_without_warmup_the_first_step_trains_at_the_full_rate():
    scheduler = WarmupCosineLR(adam(0.5), total_steps=4, final_factor=0.0)
    cosine = [0.5 * (1 + math.cos(math.pi * step / 4)) / 2 for step in range(5)]
    assert rates(scheduler, 5) == pytest.approx(cosine)  # 0.5 at the first step, 0.0 at the end


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"total_steps": 0}, "total_steps must be a positive int"),
        ({"total_steps": 2.0}, "total_steps must be a positive int"),
        ({"total_steps": 4, "warmup_steps": 4}, r"warmup_steps must be an int in \[0, total_steps=4\)"),
        ({"total_steps": 4, "warmup_steps": -1}, "warmup_steps must be an int"),
        ({"total_steps": 4, "final_factor": 1.5}, r"final_factor must be in \[0, 1\]"),
    ],
)
def test_bad_arguments_are_refused_in_one_line(options, message):
    with pytest.raises(ValueError, match=message):
        WarmupCosineLR(adam(), **options)


class Rates(Callback):
    """The optimizer's rate at the start of every batch of a fit."""

    def __init__(self):
        self.seen = []

    def on_batch_start(self, trainer, batch):
        self.seen.append(trainer.optimizer.param_groups[0]["lr"])


def fit(tmp_path, epochs, resume=False, crash_after=None):
    """The test helper's classifier (10 steps an epoch) under a schedule of `epochs` * 10 steps,
    stepped per step; the rate of each of its steps."""
    seen = Rates()

    def schedule(optimizer):
        return WarmupCosineLR(optimizer, total_steps=epochs * 10, warmup_steps=3, final_factor=0.01)

    scheduled_run(tmp_path, epochs, schedule, [seen], resume, crash_after, scheduler_interval="step")
    return seen.seen


def test_a_resumed_run_takes_the_rates_of_the_uninterrupted_one(tmp_path):
    whole = fit(tmp_path / "whole", epochs=4)
    first = fit(tmp_path / "parts", epochs=4, crash_after=2)
    rest = fit(tmp_path / "parts", epochs=4, resume=True)
    assert len(whole) == 40 and first + rest == whole


@pytest.mark.parametrize("done", [2, 4])
def test_resumed_with_more_epochs_it_decays_to_its_minimum_at_the_new_end(tmp_path, done):
    # A 4-epoch run (40 steps), finished or killed after 2 epochs, resumed with 8 epochs.
    first = fit(tmp_path, epochs=4, crash_after=done if done < 4 else None)
    assert len(first) == done * 10
    rest = fit(tmp_path, epochs=8, resume=True)
    assert len(rest) == 80 - done * 10
    steps = first + rest
    later = steps[done * 10 - 1 :]
    assert all(b <= a + 1e-12 for a, b in zip(later, later[1:])), steps  # never climbs back up
    assert steps[-1] == pytest.approx(0.001, rel=0.05)  # one step before the new end: near the minimum
    if done == 2:  # halfway through the 60 steps left, halfway from the rate at the resume to the minimum
        assert rest[0] > 0.05 and rest[30] == pytest.approx((rest[0] + 0.001) / 2)
