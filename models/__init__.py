"""Models, losses and metrics: the tutorial CNN, UNet and NestedUNet (UNet++)."""

from models.cnn import CNN, FashionCNN
from models.losses import BCEDiceLoss, CEDiceLoss, DeepSupervisionLoss
from models.metrics import accuracy, class_iou, confusion_iou, confusion_matrix, dice, iou, label_class_iou, label_iou
from models.nested_unet import NestedUNet
from models.predict import predict_batch, predict_image
from models.unet import UNet

__all__ = [
    "CNN",
    "BCEDiceLoss",
    "CEDiceLoss",
    "DeepSupervisionLoss",
    "FashionCNN",
    "NestedUNet",
    "UNet",
    "accuracy",
    "class_iou",
    "confusion_iou",
    "confusion_matrix",
    "dice",
    "iou",
    "label_class_iou",
    "label_iou",
    "predict_batch",
    "predict_image",
]
