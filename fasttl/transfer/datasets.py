"""Resolving the job's `--data`: the embedded default (scikit-learn's digits), CIFAR-10, or a
folder of class folders; subsets and stratified splits, all seeded."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import numpy as np

from fasttl.data import ArraySource, DataError, FileSource, class_folder_splits, load_cifar_pickles

Source = Union[FileSource, ArraySource]
EMBEDDED = "digits"


@dataclass
class Dataset:
    name: str
    train: Source
    test: Source
    native_size: int   # the images' own resolution (the from-scratch student's input size)

    @property
    def classes(self):
        return list(self.train.classes)


def _digits() -> Dataset:
    """1,797 real 8x8 handwritten digits shipped with scikit-learn, as RGB uint8 images; a
    stratified 75/25 split with a fixed seed."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    gray = np.clip(digits.images * (255.0 / 16.0), 0, 255).astype(np.uint8)
    images = np.ascontiguousarray(np.repeat(gray[..., None], 3, axis=-1))
    source = ArraySource(images, digits.target.astype(np.int64), [str(d) for d in range(10)], name="sklearn-digits")
    train_idx, test_idx = stratified_split(source.labels, test_fraction=0.25, seed=0)
    return Dataset(EMBEDDED, source.subset(train_idx), source.subset(test_idx), native_size=8)


def cifar10_location() -> str:
    return os.path.expanduser(os.environ.get("FASTTL_DATA", os.path.join("~", ".cache", "fasttl", "data")))


def _cifar10() -> Dataset:
    base = cifar10_location()
    for candidate in (os.path.join(base, "cifar10"), os.path.join(base, "cifar-10-batches-py"), base):
        if os.path.isdir(os.path.join(candidate, "train")) and os.path.isdir(os.path.join(candidate, "test")):
            train, test = class_folder_splits(candidate)
            return Dataset("cifar10", train, test, native_size=32)
        if os.path.isfile(os.path.join(candidate, "batches.meta")):
            return Dataset("cifar10", load_cifar_pickles(candidate, True), load_cifar_pickles(candidate, False), 32)
    raise DataError(
        f"data: CIFAR-10 not found under {base}. fasttl never downloads data: put CIFAR-10 there as class folders "
        f"({base}/cifar10/train/<class>/*.jpg and .../test/...) or as the python pickles "
        f"({base}/cifar-10-batches-py/), or set FASTTL_DATA to the folder that holds them, or pass --data DIR."
    )


def _native_size(source: Source) -> int:
    if isinstance(source, ArraySource):
        return int(source.images.shape[1])
    from PIL import Image

    with Image.open(source.files[0]) as img:
        return int(min(img.size))


def stratified_split(labels, test_fraction: float, seed: int):
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    train_idx, test_idx = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        cut = max(1, int(round(len(idx) * test_fraction))) if len(idx) > 1 else 0
        test_idx += idx[:cut].tolist()
        train_idx += idx[cut:].tolist()
    return sorted(train_idx), sorted(test_idx)


def per_class_subset(source: Source, per_class: int, seed: int) -> Source:
    """The first `per_class` samples of each class in a seeded shuffle (stratified subset)."""
    labels = np.asarray(source.labels)
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(labels):
        keep += rng.permutation(np.flatnonzero(labels == c))[:per_class].tolist()
    return source.subset(sorted(keep))


def load_dataset(data: Optional[str], seed: int = 0, train_per_class: Optional[int] = None,
                 test_per_class: Optional[int] = None) -> Dataset:
    if data in (None, EMBEDDED):
        dataset = _digits()
    elif data == "cifar10":
        dataset = _cifar10()
    else:
        root = os.path.abspath(os.path.expanduser(data))
        train, test = class_folder_splits(root)
        if test is None:
            train_idx, test_idx = stratified_split(train.labels, test_fraction=0.2, seed=seed)
            train, test = train.subset(train_idx), train.subset(test_idx)
        dataset = Dataset(os.path.basename(root.rstrip("/")), train, test, native_size=_native_size(train))
    if train_per_class:
        dataset.train = per_class_subset(dataset.train, train_per_class, seed)
    if test_per_class:
        dataset.test = per_class_subset(dataset.test, test_per_class, seed)
    return dataset


def describe(dataset: Dataset) -> Tuple[int, int, int]:
    return len(dataset.train), len(dataset.test), len(dataset.classes)
