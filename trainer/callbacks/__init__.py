"""Ready-made callbacks."""

from trainer.callbacks.checkpoint import ModelCheckpoint
from trainer.callbacks.early_stopping import EarlyStopping
from trainer.callbacks.figures import PredictionFigureCallback
from trainer.callbacks.graph import GraphCallback
from trainer.callbacks.images import ImageGridCallback
from trainer.callbacks.progress import ProgressBar
from trainer.callbacks.tensorboard import TensorBoardCallback, TensorBoardWriterCallback

__all__ = [
    "EarlyStopping",
    "GraphCallback",
    "ImageGridCallback",
    "ModelCheckpoint",
    "PredictionFigureCallback",
    "ProgressBar",
    "TensorBoardCallback",
    "TensorBoardWriterCallback",
]
