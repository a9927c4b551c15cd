"""The debug limits (limit_train_batches, limit_val_batches) and the time limit (max_time)."""

from __future__ import annotations

from datetime import timedelta

import pytest

from tests.helpers import make
from trainer import Callback, TimeLimitReached
from trainer.callbacks import ModelCheckpoint
from trainer.checkpoint import load_checkpoint
from trainer.durations import format_duration, parse_duration


# ------------------------------------------------------------------------------------------ debug limits
@pytest.mark.parametrize("limits, batches, val_batches", [((3, 2), 3, 2), ((0.25, 0.5), 2, 2), ((1.0, None), 10, 5)])
def test_limit_batches(limits, batches, val_batches):
    class Count(Callback):
        train = val = 0

        def on_batch_end(self, trainer, batch, outputs):
            Count.train += 1

        def on_validation_batch_end(self, trainer, batch, outputs):
            Count.val += 1

    trainer, train, val = make([Count()], epochs=1, limit_train_batches=limits[0], limit_val_batches=limits[1])
    trainer.fit(train, val)
    assert (Count.train, Count.val, trainer.num_batches, trainer.global_step) == (
        batches,
        val_batches,
        batches,
        batches,
    )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"limit_train_batches": 0}, "limit_train_batches must be a number of batches"),
        ({"limit_val_batches": 1.5}, "limit_val_batches must be a number of batches"),
        ({"limit_train_batches": True}, "limit_train_batches must be"),
        ({"val_every_n_steps": 0}, "val_every_n_steps must be a positive integer"),
        ({"max_time": "1:2"}, "max_time must be a positive number of seconds"),
        ({"max_time": -1}, "max_time must be"),
    ],
)
def test_bad_options_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make(**kwargs)


def test_a_fraction_needs_a_loader_with_a_length():
    trainer, train, _ = make(limit_train_batches=0.5)
    with pytest.raises(ValueError, match="is a fraction, but the loader has no length"):
        trainer.fit(iter(list(train)))


# ------------------------------------------------------------------------------------------ time limit
def test_durations():
    assert parse_duration("01:30:05") == 5405 and parse_duration("2:00:00:01") == 2 * 86400 + 1
    assert parse_duration(timedelta(minutes=2)) == 120 and parse_duration(1.5) == 1.5
    assert format_duration(5405) == "1:30:05" and parse_duration(format_duration(2 * 86400 + 1)) == 2 * 86400 + 1


def test_time_limit_stops_after_the_first_step_past_it(tmp_path, fake_clock):
    class Slow(Callback):
        def on_batch_end(self, trainer, batch, outputs):
            fake_clock.advance(0.3)

    checkpoint = ModelCheckpoint(tmp_path, monitor=None)
    trainer, train, val = make([Slow(), checkpoint], epochs=3, max_time=0.75)
    with pytest.raises(TimeLimitReached, match=r"time limit 0.75 s reached after global step 3 \(epoch 1, batch 3 of"):
        trainer.fit(train, val)
    state = load_checkpoint(checkpoint.last_path)
    assert state["global_step"] == 3 and state["position"]["batches"] == 3 and not state["should_stop"]
