"""Ready-made callbacks."""

from trainer.callbacks.checkpoint import ModelCheckpoint
from trainer.callbacks.confusion import ConfusionMatrixCallback
from trainer.callbacks.csv_logger import CSVLogger
from trainer.callbacks.early_stopping import EarlyStopping
from trainer.callbacks.figures import PredictionFigureCallback, log_figure
from trainer.callbacks.graph import GraphCallback
from trainer.callbacks.histograms import HistogramCallback
from trainer.callbacks.images import ImageGridCallback
from trainer.callbacks.progress import ProgressBar
from trainer.callbacks.projector import EmbeddingCallback, PRCurveCallback
from trainer.callbacks.tensorboard import TensorBoardCallback, TensorBoardWriterCallback

__all__ = [
    "CSVLogger",
    "ConfusionMatrixCallback",
    "EarlyStopping",
    "EmbeddingCallback",
    "GraphCallback",
    "HistogramCallback",
    "ImageGridCallback",
    "ModelCheckpoint",
    "PRCurveCallback",
    "PredictionFigureCallback",
    "ProgressBar",
    "TensorBoardCallback",
    "TensorBoardWriterCallback",
    "log_figure",
]
