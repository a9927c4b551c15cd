"""`trainer.precision.Precision`: autocast, the optimizer step (gradient clipping) and evaluation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.conftest import make_regression
from tests.helpers import make_trainer, one_update
from trainer import Callback, Trainer


@pytest.mark.numerics
def test_gradient_clipping_bounds_the_update():
    ds = make_regression(8)
    batches = [tuple(t * 100 for t in ds.tensors)]  # huge gradients
    torch.manual_seed(0)
    before = [p.detach().clone() for p in nn.Linear(3, 1).parameters()]
    clipped, _ = one_update(0, batches, grad_clip_norm=0.5)
    update = torch.cat([(p.detach() - b).flatten() for p, b in zip(clipped.parameters(), before)])
    print(f"measured: clipped update norm {update.norm().item():.7f}")
    assert update.norm().item() == pytest.approx(0.1 * 0.5, rel=1e-4)  # lr x max norm
    free, _ = one_update(0, batches)
    update_free = torch.cat([(p.detach() - b).flatten() for p, b in zip(free.parameters(), before)])
    print(f"measured: free update norm {update_free.norm().item():.3f}")
    assert update_free.norm().item() > 1.0


@pytest.mark.numerics
def test_bf16_autocast_on_cpu_trains(regression_loaders):
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    dtypes = []

    class Spy(Callback):
        def on_batch_end(self, trainer, batch, outputs):
            dtypes.append(outputs.predictions.dtype)

    trainer = Trainer(
        model,
        torch.optim.SGD(model.parameters(), lr=0.05),
        nn.MSELoss(),
        max_epochs=5,
        device="cpu",
        precision="bf16",
        callbacks=[Spy()],
    )
    history = trainer.fit(*regression_loaders)
    assert set(dtypes) == {torch.bfloat16}
    print(f"measured: bf16 loss {history[0]['loss']:.4f} -> {history[-1]['loss']:.4f}")
    assert history[-1]["loss"] < history[0]["loss"]


def test_predict_and_eval_mode_restore_training_mode_and_use_no_grad():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.9), nn.Linear(4, 1))
    trainer = make_trainer(model)
    x = torch.randn(5, 3)
    first, second = trainer.predict(x), trainer.predict(x)
    assert torch.equal(first, second) and not first.requires_grad  # eval mode: dropout off
    assert model.training
    with trainer.eval_mode() as module:
        assert module is model and not model.training and not torch.is_grad_enabled()
    assert model.training


def test_predict_and_validate_before_fit_with_auto_precision_compute_in_float32(linear_model, regression_loaders):
    # "auto" is resolved by fit; before it, nothing may autocast (float16 autocast on the CPU was the bug).
    seen = []

    class Dtypes(Callback):
        def on_validation_batch_end(self, trainer, batch, outputs):
            seen.append(outputs.predictions.dtype)

    trainer = make_trainer(linear_model, [Dtypes()], precision="auto")
    assert trainer.predict(torch.randn(4, 3)).dtype == torch.float32
    trainer.validate(regression_loaders[1])
    assert seen and set(seen) == {torch.float32}
