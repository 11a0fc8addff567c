"""CIFAR-10 mini: 100 training and 50 test images per class of real CIFAR-10, shipped inside the
package (see CIFAR10_MINI.md), so the embedded default and the tests need nothing downloaded."""
from __future__ import annotations

import hashlib
import io
import os
import re
import tarfile
from typing import Dict, List, Tuple

import numpy as np

from fasttl.data.sources import ArraySource
from fasttl.util.errors import DataError
from fasttl.util.files import absolute

TAR = os.path.join(os.path.dirname(__file__), "cifar10_mini.tar")
SHA256 = "5e06c84d3ae7001bd77eda2af738aaa018828d91f4a09d7ef1f69c69557dbfa9"
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
_MEMBER = re.compile(r"(train|test)/([a-z]+)/([0-9]{4})\.jpg")


def _members() -> Dict[str, List[Tuple[str, str, bytes]]]:
    """{split: [(class, file name, JPEG bytes)]} in name order, after checking the tar's SHA-256
    and that it holds only the expected plain files (nothing else is ever read or written)."""
    with open(TAR, "rb") as f:
        data = f.read()
    if hashlib.sha256(data).hexdigest() != SHA256:
        raise DataError(f"{TAR}: checksum mismatch (the installed package is damaged); reinstall fasttl")
    splits: Dict[str, List[Tuple[str, str, bytes]]] = {"train": [], "test": []}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for member in tar.getmembers():
            match = _MEMBER.fullmatch(member.name)
            if not member.isfile() or match is None or match.group(2) not in CLASSES:
                raise DataError(f"{TAR}: unexpected member {member.name!r}; reinstall fasttl")
            splits[match.group(1)].append((match.group(2), f"{match.group(3)}.jpg", tar.extractfile(member).read()))
    for split in splits.values():
        split.sort()
    return splits


def cifar10_mini() -> Tuple[ArraySource, ArraySource]:
    """(train, test) as decoded uint8 images (1,000 and 500, 32x32 RGB) with their labels."""
    from PIL import Image

    sources = []
    for split, members in _members().items():
        images = np.stack([np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"), dtype=np.uint8)
                           for _, _, jpeg in members])
        labels = np.asarray([CLASSES.index(name) for name, _, _ in members], dtype=np.int64)
        sources.append(ArraySource(images, labels, list(CLASSES), name=f"cifar10-mini:{split}"))
    return sources[0], sources[1]


def extract_cifar10_mini(destination: str) -> str:
    """Writes the mini set as class folders, DESTINATION/{train,test}/<class>/NNNN.jpg (the layout
    of ../shared/data/cifar10), and returns DESTINATION. Files already there with the same bytes
    are kept; nothing outside DESTINATION is written."""
    destination = absolute(destination)
    for split, members in _members().items():
        for name, file_name, jpeg in members:
            folder = os.path.join(destination, split, name)
            os.makedirs(folder, exist_ok=True)
            path = os.path.join(folder, file_name)
            if os.path.isfile(path) and not os.path.islink(path) and os.path.getsize(path) == len(jpeg):
                with open(path, "rb") as f:
                    if f.read() == jpeg:
                        continue
            from fasttl.util.files import write_atomic

            write_atomic(path, jpeg)
    return destination
