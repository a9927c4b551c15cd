"""What a train or eval step returns (`StepOutput`) and the type of a validation metric."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch

#: ``metric(predictions, targets) -> 0-dim tensor``: the batch mean of a validation metric.
Metric = Callable[[Any, Any], torch.Tensor]


class StepOutput(NamedTuple):
    """What a train or eval step returns: the batch `loss`, the model's `predictions` and the
    `targets` that metrics compare them with (None when there are none)."""

    loss: torch.Tensor
    predictions: Any
    targets: Any = None
