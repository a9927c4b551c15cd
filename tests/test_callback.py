"""`trainer.callback`: the Callback base class: only the hooks a subclass overrides are called."""

from __future__ import annotations

from tests.helpers import make_trainer
from trainer import Callback


def test_only_overridden_hooks_are_dispatched(linear_model, regression_loaders):
    class EpochOnly(Callback):
        def on_epoch_end(self, trainer, logs):
            pass

    trainer = make_trainer(linear_model, [EpochOnly()])
    trainer.fit(regression_loaders[0])
    table = {line.split()[0]: line.split()[1:] for line in trainer.describe().splitlines()}
    assert table["on_epoch_end"] == ["EpochOnly"]
    assert all(names == ["-"] for hook, names in table.items() if hook != "on_epoch_end")
