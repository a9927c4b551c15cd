"""Models, losses and metrics: the tutorial CNN, UNet and NestedUNet (UNet++)."""

from models.blocks import BASE_FILTERS, SIDE_MULTIPLE, VGGBlock, nearest_multiple
from models.cnn import CNN, FashionCNN
from models.losses import MASK_TYPES, BCEDiceLoss, CEDiceLoss, DeepSupervisionLoss, mask_type_of_loss
from models.metrics import accuracy, class_iou, confusion_iou, confusion_matrix, dice, iou, label_class_iou, label_iou
from models.nested_unet import NestedUNet
from models.predict import predict_batch, predict_image
from models.unet import UNet

__all__ = [
    "BASE_FILTERS",
    "CNN",
    "MASK_TYPES",
    "SIDE_MULTIPLE",
    "BCEDiceLoss",
    "CEDiceLoss",
    "DeepSupervisionLoss",
    "FashionCNN",
    "NestedUNet",
    "UNet",
    "VGGBlock",
    "accuracy",
    "class_iou",
    "confusion_iou",
    "confusion_matrix",
    "dice",
    "iou",
    "label_class_iou",
    "label_iou",
    "mask_type_of_loss",
    "nearest_multiple",
    "predict_batch",
    "predict_image",
]
