"""`TrainerAttributes`: the attributes and methods of the `Trainer` that its parts (`trainer.loop`,
`trainer.state`) read, declared once for the type checker. The class holds no values and does
nothing at run time; `trainer.core.Trainer` sets every attribute."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

    from trainer.amp import Precision
    from trainer.callback_list import CallbackList
    from trainer.position import LoopPosition
    from trainer.precision import PrecisionChoice
    from trainer.resources import FitResources
    from trainer.running import EpochLoss
    from trainer.scheduling import SchedulerStepping
    from trainer.steps import Metric, StepOutput


class TrainerAttributes:
    """What a `Trainer` holds (see its docstring for their meaning), for the parts it is made of."""

    # The parts and options.
    model: nn.Module
    optimizer: torch.optim.Optimizer
    loss_fn: Callable[[Any, Any], torch.Tensor]
    metrics: dict[str, Metric]
    scheduler: Any
    scheduler_interval: str
    device: torch.device
    precision: str
    channels_last: bool | str
    precision_choice: PrecisionChoice | None
    onednn: bool
    grad_clip_norm: float | None
    accumulate_grad_batches: int
    seed: int | None
    val_every_n_steps: int | None
    val_at_epoch_end: bool
    limit_train_batches: int | float | None
    limit_val_batches: int | float | None
    max_time: float | None
    # Progress.
    epoch: int
    max_epochs: int
    global_step: int
    start_step: int
    batch_idx: int
    num_batches: int | None
    history: list[dict[str, float]]
    epoch_loss: EpochLoss
    should_stop: bool
    in_step_validation: bool
    train_loader: Iterable | None
    val_loader: Iterable | None
    # Shared things and what the loop builds once per fit.
    resources: FitResources
    _amp: Precision
    _move: Callable[[Any], Any]
    _callbacks: CallbackList
    _pos: LoopPosition
    _deadline: float | None
    _fitting: bool
    _scheduling: SchedulerStepping

    if TYPE_CHECKING:

        @property
        def module(self) -> nn.Module: ...

        def train_step(self, batch: Any) -> StepOutput: ...

        def eval_step(self, batch: Any) -> StepOutput: ...

        def eval_mode(self) -> AbstractContextManager[nn.Module]: ...
