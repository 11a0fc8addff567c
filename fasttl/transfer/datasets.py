"""Resolving the job's `--data`: the embedded default (CIFAR-10 mini, shipped in the package),
scikit-learn's 8x8 digits (a far-from-ImageNet example), full CIFAR-10, or a
folder of class folders; subsets and stratified splits, all seeded."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import List, Optional, Tuple, Union

import numpy as np

from fasttl.data import (ArraySource, DataError, FileSource, class_folder_splits, load_cifar_pickles, scan_class_folder,
                         screen)
from fasttl.data.formats.folder import list_folder
from fasttl.data.formats import open_data
from fasttl.data.formats.filelist import is_file_list
from fasttl.data.formats.webdataset import is_webdataset
from fasttl.data.sources import TarSource
from fasttl.data.splits import stratified_split
from fasttl.util.errors import OptionError
from fasttl.util import settings
from fasttl.util.files import absolute
from fasttl.util.outputs import shortened, terminal_text

Source = Union[FileSource, ArraySource, TarSource]
EMBEDDED = "cifar10-mini"
DIGITS = "digits"
BUILTIN = (EMBEDDED, DIGITS)  # shipped with fasttl: their runs compare against scratch by default
CIFAR10 = "cifar10"  # fetched into $FASTTL_DATA
NAMED = BUILTIN + (CIFAR10,)  # data sets --data names, not paths


@dataclass
class Dataset:
    name: str
    train: Source
    test: Source
    native_size: int   # the images' own resolution (the from-scratch student's input size)
    skipped: List[Tuple[str, str]] = field(default_factory=list)  # (file, reason) left out by on_error="skip"
    ignored: List[Tuple[str, str]] = field(default_factory=list)  # (path, reason) a folder scan passed over
    carved: bool = False  # the test split was carved from the data here (seeded 80/20), not given as test/

    @property
    def classes(self):
        return list(self.train.classes)

    def identity(self) -> str:
        """Hash of both splits' contents (each source's identity): what a run's config.json
        records as data_identity, so a run can tell whether another was made on the same images."""
        import hashlib

        return hashlib.sha256(f"{self.train.identity()}:{self.test.identity()}".encode()).hexdigest()


def _digits() -> Dataset:
    """1,797 real 8x8 handwritten digits shipped with scikit-learn, as RGB uint8 images; a
    stratified 75/25 split with a fixed seed."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    gray = np.clip(digits.images * (255.0 / 16.0), 0, 255).astype(np.uint8)
    images = np.ascontiguousarray(np.repeat(gray[..., None], 3, axis=-1))
    source = ArraySource(images, digits.target.astype(np.int64), [str(d) for d in range(10)], name="sklearn-digits")
    train_idx, test_idx = stratified_split(source.labels, test_fraction=0.25, seed=0)
    return Dataset(DIGITS, source.subset(train_idx), source.subset(test_idx), native_size=8)


def _cifar10_mini() -> Dataset:
    """100 training and 50 test images per class of real CIFAR-10, from inside the package."""
    from fasttl.data import cifar10_mini

    train, test = cifar10_mini()
    return Dataset(EMBEDDED, train, test, native_size=32)


def cifar10_location() -> str:
    return settings.DATA.path()


def _cifar10_at(folder: str) -> bool:
    """Whether `folder` holds CIFAR-10 in a form _cifar10 reads (pickles, or both class folder splits)."""
    return os.path.isfile(os.path.join(folder, "batches.meta")) or all(
        os.path.isdir(os.path.join(folder, split)) for split in ("train", "test"))


def _cifar10(download: bool = False) -> Dataset:
    base = cifar10_location()
    candidates = (os.path.join(base, "cifar10"), os.path.join(base, "cifar-10-batches-py"), base)
    if download and not any(_cifar10_at(c) for c in candidates):
        from fasttl.data.fetch import fetch

        fetch("cifar10")  # into $FASTTL_DATA, base: a problem with the folder then names the variable, not --dest
    for candidate in candidates:
        if os.path.isdir(os.path.join(candidate, "train")) and os.path.isdir(os.path.join(candidate, "test")):
            train, test = class_folder_splits(candidate)
            return Dataset("cifar10", train, test, native_size=32)
        if os.path.isfile(os.path.join(candidate, "batches.meta")):
            return Dataset("cifar10", load_cifar_pickles(candidate, True), load_cifar_pickles(candidate, False), 32)
    half = next((c for c in candidates if os.path.isdir(os.path.join(c, "train")) != os.path.isdir(os.path.join(
        c, "test"))), None)
    if half is not None:  # a copy begun and left: neither used nor downloaded over
        present, absent = ("train", "test") if os.path.isdir(os.path.join(half, "train")) else ("test", "train")
        raise DataError(f"data: {half} has a {present}/ folder but no {absent}/ (a copy left unfinished?); complete "
                        f"it, or move it away{' and run again with --download' if download else ''}")
    raise DataError(
        f"data: CIFAR-10 not found under {base}; fetch it with `fasttl data fetch cifar10` (170 MB, checksum "
        f"verified) or add --download, or put it there yourself as class folders ({base}/cifar10/train/<class>/*.jpg "
        f"and .../test/...) or as the python pickles ({base}/cifar-10-batches-py/), or set FASTTL_DATA to the folder "
        "that holds them, or pass --data DIR"
    )


def _native_size(source: Source) -> int:
    """The smaller side of the first image that opens (a corrupt one is reported later, named)."""
    if not source.encoded:
        return int(source.images.shape[1])
    import io

    from PIL import Image

    first = None
    for index in range(min(64, len(source))):
        try:
            with Image.open(io.BytesIO(source.read(index))) as img:
                return int(min(img.size))
        except Exception as exc:
            first = first or f"{shortened(source.name_of(index))}: {' '.join(str(exc).split())[:160]}"
    hint = ""
    if "\\" in source.name_of(0) and not os.path.exists(source.name_of(0)):
        hint = ("; its paths hold a backslash (\\), which is part of a file name here, not a folder separator: "
                "write the list's paths with /")
    raise DataError(f"data: none of the first {min(64, len(source))} images of {source.root or 'the source'} opens "
                    f"as an image (first: {first}){hint}")


def per_class_subset(source: Source, per_class: int, seed: int) -> Source:
    """The first `per_class` samples of each class in a seeded shuffle (stratified subset)."""
    labels = np.asarray(source.labels)
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(labels):
        keep += rng.permutation(np.flatnonzero(labels == c))[:per_class].tolist()
    return source.subset(sorted(keep))


def fewer_than_asked(dataset: Dataset, train_per_class: Optional[int], test_per_class: Optional[int]) -> str:
    """The line that says which classes hold fewer images than --train-per-class/--test-per-class
    asked for (each is used whole; the subset is not what was asked), '' when none does."""
    said = []
    for split, asked in (("train", train_per_class), ("test", test_per_class)):
        counts = np.bincount(np.asarray(getattr(dataset, split).labels, dtype=np.int64),
                             minlength=len(dataset.classes)) if asked else []
        short = [f"{dataset.classes[label]} {count}" for label, count in enumerate(counts) if count < asked]
        if short:
            said.append(f"--{split}-per-class {asked}: {len(short)} of {len(counts)} classes have fewer {split} images "
                        f"(used whole: {', '.join(short[:4])}{' ...' if len(short) > 4 else ''})")
    return terminal_text("; ".join(said))


def _check_usable(dataset: Dataset, data: str) -> None:
    if len(dataset.classes) < 2:
        raise DataError(f"data: {data} has {len(dataset.classes)} class ({dataset.classes}); a classifier needs at "
                        "least 2 class folders")
    for split in ("train", "test"):
        if len(getattr(dataset, split)) == 0:
            raise DataError(f"data: {data} leaves no {split} images; add images, or give DIR/train and DIR/test "
                            "class folders")


def load_held_out(data: str, classes_file: Optional[str] = None, labels: str = "names") -> Dataset:
    """`data` as a held-out set to evaluate a run on (`fasttl eval --data`, data the run never
    trained on): a folder's test/ (beside train/, or alone), else every image the folder holds, a
    list's or shards' every row; never a carved 20% (its other 80% would go unscored). Its train
    split is its test split (eval reads only the classes from it). Built-in data sets: their own
    test split (load_dataset)."""
    if data in NAMED + (EMBEDDED,):
        return load_dataset(data)
    if is_file_list(data) or is_webdataset(data):
        test = open_data(data, classes_file, labels)
        dataset = Dataset(os.path.basename(os.path.normpath(data)) or "data", test, test,
                          native_size=_native_size(test), ignored=list(getattr(test, "ignored", [])))
    else:
        dataset = _class_folders(data, seed=None)
    _check_usable(dataset, data)
    return dataset


def _class_folders(data: str, seed: Optional[int]) -> Dataset:
    """A folder of class folders as a Dataset: its train/ and test/; without them, a seeded 20% of
    each class carved as the test split (`seed`), or, held out (`seed` None: data a run never
    trained on), every image as the test split, as is a test/ alone. Held out, train is test."""
    root = absolute(data)
    name = os.path.basename(root.rstrip("/")) or "data"
    test_dir = os.path.join(root, "test")
    if seed is None and os.path.isdir(test_dir) and not os.path.lexists(os.path.join(root, "train")):
        test = scan_class_folder(test_dir)
        passed = [(os.path.join(root, entry), "hidden" if entry.startswith(".") else "not test/")
                  for entry in list_folder(root) if entry != "test"]
        return Dataset(name, test, test, native_size=_native_size(test),
                       ignored=passed + list(getattr(test, "ignored", [])))
    train, test = class_folder_splits(root)
    carved = test is None and seed is not None
    if carved:
        train_idx, test_idx = stratified_split(train.labels, test_fraction=0.2, seed=seed)
        train, test = train.subset(train_idx), train.subset(test_idx)
    elif seed is None:
        train = test = train if test is None else test
    splits = [train] if train is test else [train, test]
    return Dataset(name, train, test, native_size=_native_size(train), carved=carved,
                   ignored=[entry for split in splits for entry in getattr(split, "ignored", [])])


def load_dataset(data: Optional[str], seed: int = 0, train_per_class: Optional[int] = None,
                 test_per_class: Optional[int] = None, on_error: str = "fail", download: bool = False,
                 classes_file: Optional[str] = None, labels: str = "names") -> Dataset:
    """The data set `data` names (see RunConfig.data). `download`: fetch CIFAR-10 into $FASTTL_DATA
    when it is not there (`fasttl data fetch cifar10`); nothing else is ever downloaded. A file
    list (.csv/.tsv/.parquet) or WebDataset shards (.tar pattern) is split 80/20 (stratified,
    seeded) as a folder without train/ and test/; `classes_file` names their classes, and a file
    list's labels are those names (`labels="names"`) or indices into them ("indices")."""
    if classes_file is not None and not (is_file_list(data) or is_webdataset(data)):
        raise OptionError("classes_file: --classes-file names the classes of a file list or WebDataset shards; "
                          f"{data or EMBEDDED} names its own classes (drop --classes-file)")
    if labels != "names" and not is_file_list(data):
        raise OptionError(f"labels: --labels {labels} reads a file list's labels; {data or EMBEDDED} is labelled "
                          "by its own classes (drop it)")
    if data in NAMED and os.path.isdir(data):
        raise OptionError(f"data: {data!r} names fasttl's built-in data set, and a folder of that name is here too; "
                          f"pass ./{data} for the folder, or run from another folder for the data set")
    if data in (None, EMBEDDED):
        dataset = _cifar10_mini()
    elif data == DIGITS:
        dataset = _digits()
    elif data == CIFAR10:
        dataset = _cifar10(download)
    elif is_file_list(data) or is_webdataset(data):
        source = open_data(data, classes_file, labels)
        if on_error == "skip":  # screened whole, so a class's unreadable images are counted before the split
            source = screen(source, on_error)
        train_idx, test_idx = stratified_split(source.labels, test_fraction=0.2, seed=seed)
        name = os.path.splitext(os.path.basename(data.split("{", 1)[0].rstrip("-_") or data))[0]
        dataset = Dataset(name or "data", source.subset(train_idx), source.subset(test_idx),
                          native_size=_native_size(source), carved=True)
        dataset.train.skipped = list(source.skipped)  # samples the indexing left out, reported once
        dataset.test.skipped = []
    else:
        dataset = _class_folders(data, seed)
    if train_per_class:
        dataset.train = per_class_subset(dataset.train, train_per_class, seed)
    if test_per_class:
        dataset.test = per_class_subset(dataset.test, test_per_class, seed)
    if on_error == "skip":  # with "fail", the loaders name the first unreadable image and stop
        dataset.train, dataset.test = screen(dataset.train, on_error), screen(dataset.test, on_error)
    dataset.skipped = list(getattr(dataset.train, "skipped", [])) + list(getattr(dataset.test, "skipped", []))
    dataset.ignored = list(getattr(dataset.train, "ignored", [])) + list(getattr(dataset.test, "ignored", []))
    _check_usable(dataset, data or EMBEDDED)
    return dataset
