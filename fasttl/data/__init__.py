"""Input pipelines: class folders, CIFAR pickles or (path, label) lists, through NVIDIA DALI
(GPU decode where there is a GPU, CPU operators where not) or an equivalent PyTorch fallback.

    train, test = fasttl.data.class_folder_splits("~/data/cifar10")
    loader = fasttl.data.make_loader(test, backbone.preprocessing, batch_size=128, image_size=128)
    for images, labels in loader: ...

Before a large job: `source = fasttl.data.screen(source, on_error="skip")` decodes every image once
(threads) and leaves out the unreadable ones, listed in `source.skipped`; a folder scan lists what
it passed over (hidden folders, non-image files) in `source.ignored`.
"""
from fasttl.data.dali_pipeline import dali_available
from fasttl.data.loader import ImageLoader, make_loader
from fasttl.data.formats.cifar import load_cifar_pickles
from fasttl.data.formats.folder import class_folder_splits, file_list, scan_class_folder
from fasttl.data.images import check_image, header_problem
from fasttl.data.sources import ArraySource, FileSource, screen
from fasttl.util.errors import DataError
from fasttl.data.mini import cifar10_mini, extract_cifar10_mini
from fasttl.data.spec import TransformSpec

__all__ = ["ArraySource", "DataError", "FileSource", "ImageLoader", "TransformSpec", "check_image",
           "class_folder_splits", "dali_available", "file_list", "header_problem", "load_cifar_pickles", "make_loader",
           "scan_class_folder", "screen", "cifar10_mini", "extract_cifar10_mini"]
