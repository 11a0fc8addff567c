"""Class folders (root/<class>/<image>.jpg, Keras' layout), optionally split into train/ and test/,
and an explicit (path, label) list in Python."""
from __future__ import annotations

import os
from typing import Iterable, List, Optional, Sequence, Tuple

import numpy as np

from fasttl.util.checks import folder_path, is_utf8
from fasttl.util.errors import DataError
from fasttl.util.files import absolute, run_folder_in_data
from fasttl.util.path_problems import unreachable
from fasttl.data.images import IMAGE_EXTENSIONS, header_problem, unreadable
from fasttl.data.labels import MAX_INDEX_CLASSES, class_difference, refuse_lookalikes, unprintable
from fasttl.data.sources import FileSource, refuse_one_file_twice


def missing_data(root: str, what: str) -> DataError:
    if why := unreachable(root):
        return DataError(f"data: {root} {why}")
    if os.path.lexists(root) and not os.path.exists(root):
        return DataError(f"data: {root} is a broken symbolic link (fix the link or give the folder itself)")
    if os.path.exists(root):
        if not os.path.isfile(root) and not os.path.isdir(root):
            link = f" (a link to {os.path.realpath(root)})" if os.path.islink(root) else ""
            return DataError(f"data: {root}{link} is not a regular file or folder (a device or a pipe?); give {what}")
        if root.lower().endswith(_COMPRESSED):
            return DataError(f"data: {root} is a compressed archive; WebDataset shards are uncompressed .tar files "
                             "(images are read at their offsets): decompress it (gunzip), or give class folders or a "
                             ".csv/.tsv/.parquet file list")
        return DataError(f"data: {root} is a file, not a folder (give {what})")
    return DataError(f"data: {root} does not exist (give {what})")


_COMPRESSED = (".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".tar.zst", ".zip")


def list_folder(folder: str) -> List[str]:
    try:
        return sorted(os.listdir(folder))
    except OSError as exc:
        raise DataError(f"data: cannot list {folder} ({exc.strerror or exc}); check its permissions") from None


def scan_class_folder(root: str, classes: Optional[Sequence[str]] = None, *,
                      classes_are: str = "the classes given") -> FileSource:
    """root/<class>/*.jpg|jpeg|png (Keras' flow_from_directory layout). Labels index the sorted
    class names. Symbolic links to files and folders are followed.

    Refused with a DataError naming the folder: a missing root, fewer than 2 class folders,
    other classes than `classes`, a class folder without images. Passed over and listed in the
    result's ``ignored`` as (path, reason): hidden (dot) folders and files, files without an image
    extension (.txt, Thumbs.db, ...), files directly in root, broken links and special files.
    File contents are not read here: `screen` and the loaders check them. `classes_are`: what
    `classes` are, for a message (class_folder_splits: "the training split")."""
    root = absolute(folder_path("root", root, what="the class folders"))
    if classes is not None:
        classes = checked_classes(classes)
    expected = f"a folder with one sub-folder of images per class, {root}/<class>/<image>.jpg"
    if not os.path.isdir(root):
        raise missing_data(root, expected)
    found, ignored = [], []
    for name in list_folder(root):
        path = os.path.join(root, name)
        if name.startswith("."):
            ignored.append((path, "hidden"))
        elif os.path.isdir(path) and run_folder_in_data(path):  # a run's figures are not images of a class
            ignored.append((path, "a fasttl run folder"))
        elif os.path.isdir(path):
            found.append(name)
        elif why := unreachable(path):  # a class folder, maybe: never passed over as a broken link
            raise DataError(f"data: {path} {why}")
        elif not os.path.exists(path):
            ignored.append((path, "broken symbolic link"))
        else:
            ignored.append((path, "not in a class folder"))
    if not found:
        raise DataError(f"data: {root} has no class folders (expected {root}/<class>/<image>.jpg)")
    for name in found:
        _refuse_undecodable(os.path.join(root, name), "a class folder")
    bad = next((name for name in found if unprintable(name)), None)
    if bad is not None:  # a name printed raw would drive the terminal (an escape sequence) or split a line
        raise DataError(f"data: {root} has a class folder named {bad!r}, with a character that is not printable "
                        f"({unprintable(bad)}); rename it")
    refuse_lookalikes(found, f"data: {root} has class folders")
    if classes is not None and list(classes) != found:
        raise DataError(f"data: {root} {class_difference(found, classes, classes_are)}")
    if len(found) < 2:
        raise DataError(f"data: {root} has only 1 class folder ({found[0]}); a classifier needs at least 2 "
                        f"(add {root}/<other class>/)")
    files, labels = [], []
    for label, name in enumerate(found):
        images = _class_images(os.path.join(root, name), ignored)
        files.extend(images)
        labels.extend([label] * len(images))
    refuse_one_file_twice(files, "an image belongs to one class")
    return FileSource(files, labels, found, root, ignored=ignored)


def _class_images(folder: str, ignored: list) -> List[str]:
    """The images of one class folder; what else it holds goes to `ignored` as (path, why)."""
    images = []
    for entry in list_folder(folder):
        path = os.path.join(folder, entry)
        if entry.startswith("."):
            ignored.append((path, "hidden"))
        elif os.path.isdir(path):
            ignored.append((path, "a folder inside a class folder (not scanned)"))
        elif not entry.lower().endswith(IMAGE_EXTENSIONS):
            ignored.append((path, "not a .jpg/.jpeg/.png file"))
        elif os.path.isfile(path) or unreachable(path):  # one that can't be reached is named (or skipped) as read
            _refuse_undecodable(path, "an image")
            images.append(path)
        elif not os.path.exists(path):
            ignored.append((path, "broken symbolic link"))
        else:
            ignored.append((path, "not a regular file"))
    if not images:
        raise DataError(f"data: class folder {folder} holds no .jpg/.jpeg/.png images (add images or remove it)")
    return images


def _refuse_undecodable(path: str, what: str) -> None:
    """A name the file system holds in another encoding than UTF-8 (a zip made on Windows, an
    old Latin-1 disk) can't be hashed, written to a CSV or matched across systems: named, refused."""
    if not is_utf8(os.path.basename(path)):
        raise DataError(f"data: {ascii(path)} is {what} whose name is not valid UTF-8 (bytes of another encoding, "
                        "such as Latin-1); rename it")


def class_folder_splits(root: str) -> Tuple[FileSource, Optional[FileSource]]:
    """(train, test) from root/train and root/test when both exist, else (root, None). With
    splits, what root holds besides train/ and test/ is listed in train.ignored. Only one of
    train/ and test/ is a DataError (it would otherwise be read as a class)."""
    root = absolute(folder_path("root", root, what="the data"))
    if not os.path.isdir(root):
        raise missing_data(root, f"class folders {root}/<class>/*.jpg, or {root}/train/<class> and {root}/test/<class>")
    train_dir, test_dir = os.path.join(root, "train"), os.path.join(root, "test")
    for split in (train_dir, test_dir):  # never taken for a half split, or for a class called "test"
        if why := unreachable(split):
            raise DataError(f"data: {split} {why}")
    if os.path.isdir(train_dir) and os.path.isdir(test_dir):
        train = scan_class_folder(train_dir)
        test = scan_class_folder(test_dir, classes=train.classes, classes_are="the training split")
        refuse_one_file_twice(train.files + test.files, "an image used for training is never a test image")
        # What else root holds (a val/ split, notes, hidden folders) is not used: say so.
        train.ignored[:0] = [(os.path.join(root, name), "hidden" if name.startswith(".") else "not train/ or test/")
                             for name in list_folder(root) if name not in ("train", "test")]
        return train, test
    for have, lack in ((train_dir, test_dir), (test_dir, train_dir)):
        if os.path.isdir(have):  # a half split would otherwise be scanned as a class called "train"
            raise DataError(f"data: {root} has {os.path.basename(have)}/ but no {os.path.basename(lack)}/ "
                            f"(add {lack}/<class>/, or put the class folders directly in {root})")
    return scan_class_folder(root), None


def checked_classes(classes) -> List[str]:
    """`classes` of the Python API (file_list, scan_class_folder) as a list, by the rules of a
    classes file: distinct printable names, not a str (whose letters would be the names)."""
    given = classes
    if isinstance(classes, (set, frozenset)):  # (its order changes from one process to the next: PYTHONHASHSEED)
        raise TypeError("classes: a set has no order, and the order numbers the labels; give a list")
    classes = None if isinstance(classes, (str, bytes, dict)) or not hasattr(classes, "__iter__") \
        or getattr(classes, "ndim", 1) == 0 else list(classes)  # (a 0-d array has __iter__, and raises in it)
    if classes is None or not all(isinstance(name, str) for name in classes):
        raise TypeError(f"classes: expected a list of class names (strings), got {given!r:.80}")
    classes = [str(name) for name in classes]  # (numpy's text as plain str)
    bad = next((name for name in classes if not name or unprintable(name)), None)
    if bad is not None:
        raise DataError(f"classes: {bad!r} is empty or holds a character that is not printable "
                        f"({unprintable(bad) or 'empty'}); use plain text names")
    if len(classes) > MAX_INDEX_CLASSES:
        raise DataError(f"classes: {len(classes):,} classes, more than the {MAX_INDEX_CLASSES:,} fasttl takes")
    seen = set()
    twice = next((name for name in classes if name in seen or seen.add(name)), None)  # one pass
    if twice is not None:
        raise DataError(f"classes: {twice[:60]!r} is named twice; name each class once")
    return classes


def file_list(pairs: Iterable[Tuple[str, int]], classes: Optional[Sequence[str]] = None) -> FileSource:
    """An explicit list of (path, label). Each path must be a JPEG or PNG file (checked by its
    header), named once (by name, link or hard link), and each label an integer in
    [0, len(classes)); else a DataError naming it. Without `classes`, the labels found must be
    0..K-1 with no gap (each becomes a class named by its number)."""
    if classes is not None:  # the rules of a classes file, before any image is looked at
        classes = checked_classes(classes)
    files, labels = [], []
    for index, pair in enumerate(pairs):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2 or not isinstance(pair[0], (str, os.PathLike)):
            raise TypeError(f"pairs[{index}]: expected a (path, integer label) pair, got {pair!r:.80}")
        path, label = pair
        path = absolute(os.path.join(os.getcwd(), os.fspath(path)))  # as open() reads it: '~' is a folder's name
        if not os.path.exists(path):
            raise DataError(f"{path}: no such file (fix the path in the file list)")
        if not os.path.isfile(path):
            raise DataError(f"{path}: not a regular file (the file list must name image files)")
        if not path.lower().endswith(IMAGE_EXTENSIONS):
            raise DataError(f"{path}: not a .jpg/.jpeg/.png file (remove it from the file list)")
        problem = header_problem(path)
        if problem is not None:
            raise DataError(f"{unreadable(path, problem)}; remove it from the file list")
        if isinstance(label, (bool, np.bool_)) or not isinstance(label, (int, np.integer)) or label < 0:
            raise DataError(f"{path}: label {label!r} is not a non-negative integer (labels index the classes)")
        if classes is not None and label >= len(classes):
            raise DataError(f"{path}: label {label} is out of range for {len(classes)} classes {list(classes)}")
        if label >= MAX_INDEX_CLASSES:  # as integer labels of a list are bounded: a class per number below it
            raise DataError(f"{path}: label {label} is not below {MAX_INDEX_CLASSES}; pass classes=[...] and labels "
                            "that index them")
        files.append(path)
        labels.append(int(label))
    if not files:
        raise DataError("data: the file list is empty (give at least one (path, label) pair)")
    refuse_one_file_twice(files, "one image under two labels, or twice under one, is a conflict or a weight")
    if classes is not None:  # the caller's classes: one may have no image here (images to predict)
        names = list(classes)
        refuse_lookalikes(names, "classes: the classes given name")
    else:  # one class per label found, never one without images (labels 1, 2 would make an empty "0")
        names = [str(i) for i in range(max(labels) + 1)]
        empty = sorted(set(range(len(names))) - set(labels))
        if empty:
            raise DataError(f"data: the file list has no image with label {empty[0]}, so class {empty[0]} would have "
                            "none; number the labels 0, 1, 2, ... without gaps, or pass classes=[...]")
    return FileSource(files, labels, names)
