"""The files an int8 run keeps so that predict and eval repeat its extraction: the graph every
split went through, and the images it is checked on (the first of its calibration sample: it
can't be quantized again, nor checked, without training images)."""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import os
from typing import Callable, ContextManager, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from fasttl.transfer.rundir import INT8_CHECK, INT8_GRAPH, RunError, read_recorded, write_recorded

_AGAIN = "its int8 features can't be made again without the training images: train the run again"


def write_int8_files(run_dir: str, graph: bytes, check_images: Tensor) -> None:
    """The graph, and its check images as float16 (N, 3, S, S), N <= engines.INT8_CHECK_ROWS."""
    from fasttl.cache.store import npy_bytes

    write_recorded(run_dir, INT8_GRAPH, graph)
    write_recorded(run_dir, INT8_CHECK, npy_bytes(check_images.to(torch.float16).numpy()))


def run_graph(run_dir: str, backbone, extraction, device) -> Tuple[object, Callable[..., ContextManager]]:
    """(the run's extraction as a loaded model keeps it, the block a model extracts in: predict,
    eval, as a teacher; its engine is made in it). The graph and check images are read now (a later change of the
    folder does not reach a model loaded before it); the extraction names the graph by its SHA-256
    beside its calibration sample, so the caches, engine files and graph the model uses are this
    graph's alone, never another run's of the same data. The first block checks the graph on its
    check images (whatever caches exist); every block makes it the graph extraction finds, kept
    until the block ends (engines.adopted: other threads' runs can't push it out meanwhile). Files
    missing or damaged are refused only then: export and `.model` run the fp32 backbone."""
    from fasttl.cache import engines

    try:
        graph, check = _read_int8_files(run_dir, extraction.image_size)
    except RunError as exc:
        def refuse(verify: bool = True, message=str(exc)):
            raise RunError(message)
        return extraction, refuse
    graph_sha256 = hashlib.sha256(graph).hexdigest()
    own = dataclasses.replace(extraction, calibration=hashlib.sha256(  # a key as calibration_sample's: 64 hex digits
        f"{extraction.calibration} {graph_sha256}".encode()).hexdigest())
    checked = []

    @contextlib.contextmanager
    def use(verify: bool = True):
        with engines.adopted(own.graph_name(backbone), graph, shown=os.path.join(run_dir, INT8_GRAPH),
                             fix="train the run with --extract-precision fp32 to use it on images like these",
                             check_images=check, check_shown=os.path.join(run_dir, INT8_CHECK)):
            if verify and not checked:  # verify=False: the caller makes an engine in the block, which checks it
                from fasttl.cache.extraction import extraction_engine

                extraction_engine(backbone, torch.device(device), *own.resolved(device), own.taps, own.image_size,
                                  calibration=(own.calibration, None))
                checked.append(True)
            yield
    return own, use


def _read_int8_files(run_dir: str, image_size: int) -> tuple:
    from fasttl.cache import engines

    graph = read_recorded(run_dir, INT8_GRAPH, engines.MAX_ENGINE_BYTES)
    if graph is None:
        raise RunError(_unreadable(run_dir, INT8_GRAPH, "missing, a link, or changed since the run wrote it"))
    return graph, read_check_images(run_dir, image_size)


def read_check_images(run_dir: str, image_size: int) -> Tensor:
    """The run's check images, float32: refused, naming the file, unless they are what write_int8_files
    writes (a run made before they were kept has none: train it again)."""
    from fasttl.cache.engines import INT8_CHECK_ROWS

    path = os.path.join(run_dir, INT8_CHECK)
    data = read_recorded(run_dir, INT8_CHECK, INT8_CHECK_ROWS * 3 * image_size * image_size * 2 + 4096)
    if data is None:
        raise RunError(_unreadable(run_dir, INT8_CHECK, "missing, a link, or changed since the run wrote it (a run "
                                   "made by an older fasttl has none)"))
    array = _plain_array(data)
    if array is None or array.dtype != np.float16 or array.ndim != 4 or array.shape[1:] != (3, image_size, image_size) \
            or not 1 <= len(array) <= INT8_CHECK_ROWS or not np.isfinite(array).all():
        raise RunError(f"{path}: not {INT8_CHECK_ROWS} or fewer finite float16 images of 3x{image_size}x{image_size} "
                       f"as the run wrote them; {_AGAIN}")
    return torch.from_numpy(array.astype(np.float32))


def _unreadable(run_dir: str, name: str, why: str) -> str:
    """Why a run's int8 file can't be used, and the fix that works: a link is replaced by the file
    it points to (fasttl reads a run's files only as plain files); else the run is trained again."""
    path = os.path.join(run_dir, name)
    if os.path.islink(path):
        return (f"{path}: a link, not the file the run wrote (a run's files are read only as plain files); put the "
                "file itself there (cp --remove-destination), or train the run again")
    return f"{path}: {why}; {_AGAIN}"


def _plain_array(data: bytes) -> Optional[np.ndarray]:
    """The one array of a .npy file's bytes, else None (a .npz archive, a pickle, not an array)."""
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError):
        return None
    return array if isinstance(array, np.ndarray) else None
