"""Where images come from: class folders, CIFAR python pickles, or an explicit (path, label) list.
Each source knows its samples, class names and a content identity (for cache fingerprints)."""
from __future__ import annotations

import hashlib
import os
import pickle
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
_MAGIC = {b"\xff\xd8\xff": "jpeg", b"\x89PNG\r\n\x1a\n": "png"}


class DataError(ValueError):
    """A dataset problem, naming the file or folder at fault."""


def _looks_like_image(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError:
        return False
    return any(head.startswith(magic) for magic in _MAGIC)


def check_image(path: str) -> Optional[str]:
    """None if `path` decodes as an image, else why not (full decode with PIL)."""
    if not _looks_like_image(path):
        return "not a JPEG or PNG file (bad or missing header)"
    try:
        from PIL import Image

        with Image.open(path) as img:
            img.load()
    except Exception as exc:  # PIL raises many types for corrupt data
        return f"{type(exc).__name__}: {exc}"
    return None


@dataclass
class FileSource:
    """Image files with integer labels and the class names they index."""

    files: List[str]
    labels: List[int]
    classes: List[str]
    root: str = ""
    skipped: List[Tuple[str, str]] = field(default_factory=list)  # (path, reason) left out on request

    def __len__(self) -> int:
        return len(self.files)

    def identity(self) -> str:
        """Hash of the sorted (relative path, size, label) list: changes when any file does."""
        digest = hashlib.sha256()
        for path, label in sorted(zip(self.files, self.labels)):
            rel = os.path.relpath(path, self.root) if self.root else path
            digest.update(f"{rel}\0{os.path.getsize(path)}\0{label}\n".encode())
        return digest.hexdigest()

    def subset(self, indices: Sequence[int]) -> "FileSource":
        return FileSource([self.files[i] for i in indices], [self.labels[i] for i in indices], list(self.classes),
                          self.root, list(self.skipped))

    def verify(self, skip_corrupt: bool = False) -> "FileSource":
        """Decodes every file once. A bad file is an error naming it, or with skip_corrupt it is
        left out and listed in `skipped`."""
        keep, skipped = [], list(self.skipped)
        for i, path in enumerate(self.files):
            problem = check_image(path)
            if problem is None:
                keep.append(i)
            elif skip_corrupt:
                skipped.append((path, problem))
            else:
                raise DataError(f"{path}: cannot be read as an image ({problem}); remove it or pass skip_corrupt=True")
        source = self.subset(keep)
        source.skipped = skipped
        return source


def scan_class_folder(root: str, classes: Optional[Sequence[str]] = None) -> FileSource:
    """root/<class>/*.jpg|png (Keras' flow_from_directory layout). Labels index the sorted class
    names. An empty class folder, a folder with no images or a file that is not an image by its
    header is an error naming it."""
    root = os.path.abspath(os.path.expanduser(root))
    if not os.path.isdir(root):
        raise DataError(f"data: {root} is not a folder")
    found = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))
    if not found:
        raise DataError(f"data: {root} has no class folders (expected {root}/<class>/<image>.jpg)")
    if classes is not None and list(classes) != found:
        raise DataError(f"data: {root} has classes {found}, expected {list(classes)} (as in the training split)")
    files, labels = [], []
    for label, name in enumerate(found):
        folder = os.path.join(root, name)
        images = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))
        if not images:
            raise DataError(f"data: class folder {folder} holds no .jpg/.jpeg/.png images")
        for image in images:
            path = os.path.join(folder, image)
            if not _looks_like_image(path):
                raise DataError(f"{path}: not a JPEG or PNG file (bad or missing header)")
            files.append(path)
            labels.append(label)
    return FileSource(files, labels, found, root)


def class_folder_splits(root: str) -> Tuple[FileSource, Optional[FileSource]]:
    """(train, test) from root/train and root/test when both exist, else (root, None)."""
    root = os.path.abspath(os.path.expanduser(root))
    train_dir, test_dir = os.path.join(root, "train"), os.path.join(root, "test")
    if os.path.isdir(train_dir) and os.path.isdir(test_dir):
        train = scan_class_folder(train_dir)
        return train, scan_class_folder(test_dir, classes=train.classes)
    return scan_class_folder(root), None


def file_list(pairs: Sequence[Tuple[str, int]], classes: Optional[Sequence[str]] = None) -> FileSource:
    """An explicit list of (path, label)."""
    files, labels = [], []
    for path, label in pairs:
        if not os.path.isfile(path):
            raise DataError(f"{path}: no such file")
        files.append(os.path.abspath(path))
        labels.append(int(label))
    n_classes = max(labels) + 1 if labels else 0
    return FileSource(files, labels, list(classes) if classes is not None else [str(i) for i in range(n_classes)])


@dataclass
class ArraySource:
    """Decoded images in memory: uint8 (N, H, W, 3) and labels."""

    images: np.ndarray
    labels: np.ndarray
    classes: List[str]
    name: str = "arrays"

    def __len__(self) -> int:
        return len(self.labels)

    def identity(self) -> str:
        digest = hashlib.sha256(self.name.encode())
        digest.update(np.ascontiguousarray(self.images).tobytes())
        digest.update(np.asarray(self.labels, dtype=np.int64).tobytes())
        return digest.hexdigest()

    def subset(self, indices: Sequence[int]) -> "ArraySource":
        idx = np.asarray(indices, dtype=np.int64)
        return ArraySource(self.images[idx], self.labels[idx], list(self.classes), self.name)


def load_cifar_pickles(root: str, train: bool) -> ArraySource:
    """CIFAR-10 (`cifar-10-batches-py`) or CIFAR-100 (`cifar-100-python`) python pickle batches."""
    root = os.path.abspath(os.path.expanduser(root))
    if os.path.isfile(os.path.join(root, "batches.meta")):
        names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
        meta, label_key, class_key = "batches.meta", b"labels", b"label_names"
    elif os.path.isfile(os.path.join(root, "meta")):
        names = ["train"] if train else ["test"]
        meta, label_key, class_key = "meta", b"fine_labels", b"fine_label_names"
    else:
        raise DataError(f"data: {root} holds neither cifar-10-batches-py (batches.meta) nor cifar-100-python (meta)")
    images, labels = [], []
    for name in names:
        path = os.path.join(root, name)
        if not os.path.isfile(path):
            raise DataError(f"data: missing CIFAR batch {path}")
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        images.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(np.asarray(batch[label_key], dtype=np.int64))
    with open(os.path.join(root, meta), "rb") as f:
        classes = [c.decode() for c in pickle.load(f, encoding="bytes")[class_key]]
    return ArraySource(np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels), classes,
                       name=f"cifar:{os.path.basename(root)}:{'train' if train else 'test'}")
