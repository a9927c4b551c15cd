"""A small PyTorch training framework: a `Trainer` that fires hooks into pluggable callbacks."""

# First, before anything loads torch: how its OpenMP threads wait (see `trainer.openmp`).
from trainer.openmp import WAIT_POLICY

# isort: split
from trainer.batch import move_to_device
from trainer.callback import HOOKS as HOOKS
from trainer.callback import Callback
from trainer.checkpoint import seed_everything
from trainer.core import Trainer
from trainer.errors import BatchLoadError, NonFiniteLossError, TimeLimitReached, TrainingInterrupted
from trainer.every import Every
from trainer.model_spec import ModelSpecError
from trainer.options import resolve_device
from trainer.precision import PrecisionChoice, choose_precision
from trainer.resources import FitResources as FitResources
from trainer.run_lock import RunLock, RunLockedError
from trainer.running import EpochLoss as EpochLoss
from trainer.running import RunningLoss as RunningLoss
from trainer.sampler import ResumableSampler
from trainer.steps import StepOutput
from trainer.trained_model import load_model
from trainer.workers import ignore_stop_signals

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
    "choose_precision",
    "ignore_stop_signals",
    "load_model",
    "move_to_device",
    "resolve_device",
    "seed_everything",
]
__version__ = "0.1.0"
