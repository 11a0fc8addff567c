"""Input pipelines: class folders, CIFAR pickles or (path, label) lists, through NVIDIA DALI
(GPU decode where there is a GPU, CPU operators where not) or an equivalent PyTorch fallback.

    train, test = fasttl.data.class_folder_splits("~/data/cifar10")
    loader = fasttl.data.make_loader(test, backbone.preprocessing, batch_size=128, image_size=128)
    for images, labels in loader: ...
"""
from fasttl.data.dali_pipeline import dali_available
from fasttl.data.loader import ImageLoader, make_loader
from fasttl.data.sources import (ArraySource, DataError, FileSource, check_image, class_folder_splits, file_list,
                                 load_cifar_pickles, scan_class_folder)
from fasttl.data.spec import TransformSpec

__all__ = ["ArraySource", "DataError", "FileSource", "ImageLoader", "TransformSpec", "check_image",
           "class_folder_splits", "dali_available", "file_list", "load_cifar_pickles", "make_loader",
           "scan_class_folder"]
