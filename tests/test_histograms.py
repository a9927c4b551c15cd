"""`trainer.callbacks.histograms`: HistogramCallback."""

from __future__ import annotations

import math

from tests.helpers import make, read
from trainer.callbacks import HistogramCallback


# ------------------------------------------------------------------------------------------ histograms
def test_histograms_of_weights_and_of_the_gradients_of_each_epochs_last_step(tmp_path):
    grads = {}

    def keep(optimizer, args, kwargs):
        grads["last"] = [p.grad.clone() for p in optimizer.param_groups[0]["params"]]

    histograms = HistogramCallback(tmp_path, every_n_epochs=2)
    trainer, train, val = make([histograms], epochs=4)
    trainer.optimizer.register_step_pre_hook(
        lambda opt, args, kwargs: (
            keep(opt, args, kwargs) if trainer.batch_idx + 1 == trainer.num_batches and trainer.epoch == 3 else None
        )
    )
    trainer.fit(train, val)
    events = read(tmp_path)
    tags = events.Tags()["histograms"]
    assert sorted(tags) == sorted(
        [f"{kind}/{name}" for kind in ("weights", "gradients") for name in ("0.weight", "0.bias", "2.weight", "2.bias")]
    )
    assert [e.step for e in events.Histograms("gradients/0.weight")] == [20, 40]
    last = events.Histograms("gradients/2.bias")[-1].histogram_value
    expected = grads["last"][3]
    assert last.num == 3 and math.isclose(last.sum, expected.sum().item(), rel_tol=1e-5, abs_tol=1e-7)
    assert math.isclose(last.min, expected.min().item(), rel_tol=1e-6)
    # It keeps the gradients at the trainer's hook before the optimizer step, not through a torch optimizer hook.
    assert "HistogramCallback" in trainer.describe().split("on_before_optimizer_step")[1].splitlines()[0]
