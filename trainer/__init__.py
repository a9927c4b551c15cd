"""A small PyTorch training framework: a `Trainer` that fires hooks into pluggable callbacks.

The names below load their modules (and torch) on first use, so that ``import trainer`` is cheap
and the parts that need no torch (``python -m trainer.board``, `trainer.openmp`) run without it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# First, before anything loads torch: how its OpenMP threads wait (see `trainer.openmp`).
from trainer.openmp import WAIT_POLICY

if TYPE_CHECKING:
    from trainer.batch import StepOutput, move_to_device
    from trainer.callback import HOOKS as HOOKS
    from trainer.callback import Callback
    from trainer.callback import FitResources as FitResources
    from trainer.core import Trainer
    from trainer.epoch_loss import EpochLoss as EpochLoss
    from trainer.errors import BatchLoadError, NonFiniteLossError, TimeLimitReached, TrainingInterrupted
    from trainer.every import Every
    from trainer.model_spec import ModelSpecError
    from trainer.options import resolve_device
    from trainer.precision import PrecisionChoice
    from trainer.precision_probe import choose_precision
    from trainer.rng import seed_everything
    from trainer.running import RunningLoss as RunningLoss
    from trainer.runs.lock import RunLock, RunLockedError
    from trainer.sampler import ResumableSampler
    from trainer.schedules import WarmupCosineLR
    from trainer.trained_model import load_model
    from trainer.workers import ignore_stop_signals

#: Where each name of the package lives.
_MODULES = {
    "move_to_device": "trainer.batch",
    "HOOKS": "trainer.callback",
    "Callback": "trainer.callback",
    "seed_everything": "trainer.rng",
    "Trainer": "trainer.core",
    "BatchLoadError": "trainer.errors",
    "NonFiniteLossError": "trainer.errors",
    "TimeLimitReached": "trainer.errors",
    "TrainingInterrupted": "trainer.errors",
    "Every": "trainer.every",
    "ModelSpecError": "trainer.model_spec",
    "resolve_device": "trainer.options",
    "PrecisionChoice": "trainer.precision",
    "choose_precision": "trainer.precision_probe",
    "FitResources": "trainer.callback",
    "RunLock": "trainer.runs.lock",
    "RunLockedError": "trainer.runs.lock",
    "EpochLoss": "trainer.epoch_loss",
    "RunningLoss": "trainer.running",
    "ResumableSampler": "trainer.sampler",
    "WarmupCosineLR": "trainer.schedules",
    "StepOutput": "trainer.batch",
    "load_model": "trainer.trained_model",
    "ignore_stop_signals": "trainer.workers",
}


def __getattr__(name: str) -> Any:
    """Load the module of a package name on first use (`_MODULES`)."""
    if name not in _MODULES:
        raise AttributeError(f"module 'trainer' has no attribute {name!r}")
    value = getattr(importlib.import_module(_MODULES[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_MODULES})


# HOOKS, EpochLoss, RunningLoss and FitResources stay importable here (and from their modules)
# but are not part of the surface a user needs.
__all__ = [
    "WAIT_POLICY",
    "BatchLoadError",
    "Callback",
    "Every",
    "ModelSpecError",
    "NonFiniteLossError",
    "PrecisionChoice",
    "ResumableSampler",
    "RunLock",
    "RunLockedError",
    "StepOutput",
    "TimeLimitReached",
    "Trainer",
    "TrainingInterrupted",
    "WarmupCosineLR",
    "choose_precision",
    "ignore_stop_signals",
    "load_model",
    "move_to_device",
    "resolve_device",
    "seed_everything",
]
__version__ = "0.1.0"
