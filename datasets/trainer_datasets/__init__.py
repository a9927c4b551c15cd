"""Datasets: Fashion-MNIST loading, segmentation folders, synthetic nuclei, DSB2018 preparation."""

from trainer_datasets.errors import DataNotFoundError, DatasetError
from trainer_datasets.fashion_mnist import (
    CLASSES,
    load_fashion_mnist,
    make_learnable_fashion_like,
    write_fashion_mnist_idx,
)
from trainer_datasets.image_files import read_image_rgb, read_label_map, read_mask, write_label_map, write_png_file
from trainer_datasets.segmentation_folder import SegmentationFolder, write_segmentation_folder
from trainer_datasets.segmentation_layout import CLASSES_FILE, IGNORE_INDEX, MASK_MODES, scan_segmentation_folder
from trainer_datasets.segmentation_split import split_segmentation
from trainer_datasets.segmentation_stream import SegmentationStream
from trainer_datasets.synthetic import SyntheticNuclei
from trainer_datasets.tensor_loader import TensorBatchLoader
from trainer_datasets.transforms import segmentation_augmentation

__all__ = [
    "CLASSES",
    "CLASSES_FILE",
    "IGNORE_INDEX",
    "MASK_MODES",
    "DataNotFoundError",
    "DatasetError",
    "SegmentationFolder",
    "SegmentationStream",
    "SyntheticNuclei",
    "TensorBatchLoader",
    "load_fashion_mnist",
    "make_learnable_fashion_like",
    "prepare_dsb2018",
    "read_image_rgb",
    "read_label_map",
    "read_mask",
    "scan_segmentation_folder",
    "segmentation_augmentation",
    "split_segmentation",
    "write_fashion_mnist_idx",
    "write_label_map",
    "write_png_file",
    "write_segmentation_folder",
]


def __getattr__(name: str):
    # Imported on first use so that `python -m trainer_datasets.dsb2018` does not find its own module
    # already imported by the package (runpy warns about that).
    if name == "prepare_dsb2018":
        from trainer_datasets.dsb2018 import prepare_dsb2018

        return prepare_dsb2018
    raise AttributeError(f"module 'trainer_datasets' has no attribute {name!r}")
