"""The CIFAR-10 python pickles, read through a restricted unpickler: files from users are data,
never code."""
from __future__ import annotations

import os
import pickle

import numpy as np

from fasttl.util.errors import DataError
from fasttl.data.labels import refuse_lookalikes, unprintable
from fasttl.data.sources import ArraySource
from fasttl.util.files import absolute
from fasttl.util.checks import shown


def _latin1_encode(text, encoding="latin1", errors="strict"):
    """`_codecs.encode` as protocol-2 pickles of bytes use it, for the latin1 codec only."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str) or errors != "strict":
        raise pickle.UnpicklingError(f"_codecs.encode with {encoding!r} is not allowed")
    return text.encode("latin1")


class _PickledArray(np.ndarray):
    """What a CIFAR batch's `numpy.ndarray` global stands for: the subtype numpy's own pickles hand
    to `_reconstruct` (which makes an empty array, then fills it from the file's bytes). Called
    itself, as a constructor, it would allocate any size from a few bytes of pickle: refused."""

    def __new__(cls, *args, **kwargs):
        raise pickle.UnpicklingError("it calls numpy.ndarray(...) to make an array, which a CIFAR batch never does")


def _reconstruct_empty(reconstruct):
    """numpy's `_reconstruct(subtype, shape, dtype)` for the empty arrays its pickles make before
    setting their data; any other shape would allocate memory the file does not hold."""
    def checked(subtype, shape, dtype):
        if tuple(shape) != (0,):
            raise pickle.UnpicklingError(f"it asks numpy to make an array of shape {tuple(shape)} from nothing, "
                                         "which a CIFAR batch never does")
        return reconstruct(subtype, shape, dtype)
    return checked


def _numpy_globals() -> dict:
    """The only globals a CIFAR batch may name: numpy's array and dtype reconstructors, under
    numpy 1 (numpy.core) and numpy 2 (numpy._core) module names, and latin1 bytes."""
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy 1
        from numpy.core import multiarray, numeric
    table = {("_codecs", "encode"): _latin1_encode, ("numpy", "ndarray"): _PickledArray,
             ("numpy", "dtype"): np.dtype}
    for module in ("numpy.core", "numpy._core"):
        for owner, name in ((multiarray, "_reconstruct"), (multiarray, "scalar"), (numeric, "_frombuffer")):
            if hasattr(owner, name):
                found = getattr(owner, name)
                table[(f"{module}.{owner.__name__.rsplit('.', 1)[1]}", name)] = \
                    _reconstruct_empty(found) if name == "_reconstruct" else found
    return table


class _CifarUnpickler(pickle.Unpickler):
    _allowed = None

    def find_class(self, module, name):
        if _CifarUnpickler._allowed is None:
            _CifarUnpickler._allowed = _numpy_globals()
        try:
            return _CifarUnpickler._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"it refers to {module}.{name}, which a CIFAR batch never does") from None


def _load_pickle(path: str):
    """A pickle that may hold only dicts, lists, str, bytes, numbers and numpy arrays."""
    try:
        with open(path, "rb") as f:
            return _CifarUnpickler(f, encoding="bytes").load()
    except Exception as exc:  # UnpicklingError, EOFError, MemoryError, ...: all a bad file
        # fetch finds the folder complete while its files are there: it goes first
        raise DataError(f"{path}: not a CIFAR python batch ({type(exc).__name__}: {' '.join(str(exc).split())}); "
                        f"remove {os.path.dirname(path)} and download the batches again (`fasttl data fetch cifar10`, "
                        "or https://www.cs.toronto.edu/~kriz/cifar.html)") from None


def _as_str_keys(obj, path: str) -> dict:
    if not isinstance(obj, dict):
        raise DataError(f"{path}: not a CIFAR python batch (holds a {type(obj).__name__}, not a dict)")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _name_text(name, meta_path: str, class_key: str) -> str:
    """A class name as text: bytes are UTF-8 (Python 3 writes them so; the official ASCII names read
    alike in any encoding), never guessed as Latin-1 ('café' would be 'cafÃ©' in every report)."""
    if not isinstance(name, bytes):
        return name
    try:
        return name.decode("utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{meta_path}: its '{class_key}' holds {shown(name)}, bytes that are not UTF-8 text; "
                        "write the class names as UTF-8 (or as str)") from None


def load_cifar_pickles(root: str, train: bool) -> ArraySource:
    """CIFAR-10 (`cifar-10-batches-py`) or CIFAR-100 (`cifar-100-python`) python pickle batches.
    Read with a restricted unpickler (numpy arrays and plain containers only, never code) and
    checked: uint8 (N, 3072) images, N labels within the class list."""
    root = absolute(root)
    if os.path.isfile(os.path.join(root, "batches.meta")):
        names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
        meta, label_key, class_key = "batches.meta", "labels", "label_names"
    elif os.path.isfile(os.path.join(root, "meta")):
        names = ["train"] if train else ["test"]
        meta, label_key, class_key = "meta", "fine_labels", "fine_label_names"
    else:
        raise DataError(f"data: {root} holds neither cifar-10-batches-py (batches.meta) nor cifar-100-python (meta)")
    meta_path = os.path.join(root, meta)
    names_found = _as_str_keys(_load_pickle(meta_path), meta_path).get(class_key)
    if not isinstance(names_found, list) or not names_found or not all(isinstance(c, (bytes, str))
                                                                       for c in names_found):
        raise DataError(f"{meta_path}: not a CIFAR meta file (no '{class_key}' list of names)")
    classes = [_name_text(c, meta_path, class_key) for c in names_found]
    bad = next((c for c in classes if not c or unprintable(c)), None)
    if bad is not None:
        raise DataError(f"{meta_path}: its '{class_key}' holds {shown(bad)}, "
                        f"{'an empty name' if not bad else 'with ' + unprintable(bad)}; class names must be printable")
    seen: set = set()
    twice = next((c for c in classes if c in seen or seen.add(c)), None)
    if twice is not None:
        raise DataError(f"{meta_path}: its '{class_key}' names {shown(twice)} twice; each class once")
    refuse_lookalikes(classes, f"{meta_path}: its '{class_key}'")
    images, labels = [], []
    for name in names:
        path = os.path.join(root, name)
        if not os.path.isfile(path):
            raise DataError(f"data: missing CIFAR batch {path}")
        batch = _as_str_keys(_load_pickle(path), path)
        data, batch_labels = batch.get("data"), batch.get(label_key)
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            raise DataError(f"{path}: not a CIFAR python batch ('data' must be a uint8 array of shape (N, 3072), "
                            f"got {getattr(data, 'dtype', type(data).__name__)} {getattr(data, 'shape', '')})")
        # A flat list of ints (or an int array) of the data's length, checked before numpy sees it:
        # a few KB of pickle can describe a nested list of billions (shared references).
        flat = (isinstance(batch_labels, np.ndarray) and batch_labels.ndim == 1) or \
            (isinstance(batch_labels, list) and len(batch_labels) == len(data)
             and all(isinstance(v, int) and not isinstance(v, bool) for v in batch_labels))
        try:
            batch_labels = np.asarray(batch_labels) if flat else np.asarray([])
        except Exception:
            batch_labels = np.asarray([])
        if batch_labels.shape != (len(data),) or batch_labels.dtype.kind not in "iu":
            raise DataError(f"{path}: not a CIFAR python batch ('{label_key}' must be {len(data)} integers)")
        if len(batch_labels) and (batch_labels.min() < 0 or batch_labels.max() >= len(classes)):
            raise DataError(f"{path}: a label is outside 0..{len(classes) - 1} ({len(classes)} classes in {meta_path})")
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(batch_labels.astype(np.int64))
    labels = np.concatenate(labels)
    empty = [c for i, c in enumerate(classes) if not (labels == i).any()]
    if train and empty:  # a class nothing teaches: recall 0 by construction, a fake entry in every average
        raise DataError(f"{meta_path}: class {empty[0]!r} (of its '{class_key}') has no image in "
                        f"{', '.join(names)}; a class needs training images (remove it from the meta file)")
    return ArraySource(np.ascontiguousarray(np.concatenate(images)), labels, classes,
                       name=f"cifar:{os.path.basename(root)}:{'train' if train else 'test'}")
