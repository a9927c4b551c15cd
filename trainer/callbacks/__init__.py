"""Ready-made callbacks."""

from trainer.callbacks.early_stopping import EarlyStopping
from trainer.callbacks.progress import ProgressBar

__all__ = ["EarlyStopping", "ProgressBar"]
