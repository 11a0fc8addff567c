"""Which images a run trained on, recorded in its folder: one 64-bit hash of each training
image's bytes (its size, first and last 4 KiB: see EDGE). A test split checked against the record finds
the run's training images under any name or copy: a hard link, a data folder moved or renamed
(also onto another drive), or images moved from train/ into test/ after the run, where the run's
data as it is now no longer shows them. Content, not a place on disk: a place (device, inode) is
reused by other files once the images are deleted, and changes when a drive is mounted again."""
from __future__ import annotations

import hashlib
import os
import stat
from typing import Optional, Set

import numpy as np

from fasttl.transfer.rundir import RunError, read_recorded, recorded_hash, write_recorded

TRAINED_IMAGES = "trained-images.bin"


# An image is hashed by its size and its first and last EDGE bytes (the whole of a small one): a
# JPEG's first 4 KiB hold its tables and the start of its coded data, so two photos never share
# all three, and a data set of a million large files costs two small reads each, not a full pass.
EDGE = 4096


def content_hash(size: int, head: bytes, tail: bytes) -> int:
    digest = hashlib.sha256(size.to_bytes(8, "little") + head + tail).digest()
    return int.from_bytes(digest[:8], "little", signed=True)


def _image_hash(source, index: int) -> Optional[int]:
    """The hash of image `index`: two small reads of a file (None for anything but a regular file:
    a pipe is never waited on), or of a tar member, seeking to its edges."""
    path, member = source.where(index)
    if member is not None:
        size = source.members[index][2]
        return content_hash(size, source.read_range(index, 0, EDGE), source.read_range(index, max(EDGE, size - EDGE),
                                                                                       EDGE))
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            return None
        head = f.read(EDGE)
        f.seek(max(EDGE, info.st_size - EDGE))
        return content_hash(info.st_size, head, f.read(EDGE))


def _hashes_by_row(source) -> list:
    """Each image's hash, or None where it can't be read now (decoded arrays have none)."""
    hashes = []
    for i in range(len(source) if source.encoded else 0):
        try:
            hashes.append(_image_hash(source, i))
        except (OSError, ValueError):
            hashes.append(None)
    return hashes


def record(run_dir: str, train) -> None:
    """Writes the record of `train`'s images into the run folder (its SHA-256 in the marker)."""
    hashes = {h for h in _hashes_by_row(train) if h is not None}
    write_recorded(run_dir, TRAINED_IMAGES, np.array(sorted(hashes), dtype="<i8").tobytes())


def _intact_beyond(run_dir: str, limit: int) -> bool:
    """Whether the record is over `limit` bytes yet the one fasttl wrote (its SHA-256 the marker's):
    then config.json's train_samples, not the record, was changed. Hashed in chunks, up to 1 GiB."""
    path = os.path.join(run_dir, TRAINED_IMAGES)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as f:  # a link or a pipe: never what fasttl wrote
            info = os.fstat(f.fileno())
            if not (stat.S_ISREG(info.st_mode) and limit < info.st_size <= 1 << 30):
                return False
            digest = hashlib.sha256()
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    except OSError:
        return False
    return digest.hexdigest() == recorded_hash(run_dir, TRAINED_IMAGES)


def recorded(run_dir: str, train_samples: int) -> Optional[Set[int]]:
    """The run's record; None for a run made before records were kept. A record the marker lists
    but whose bytes are not what fasttl wrote (edited, truncated, a sparse file of another size)
    is an error: a damaged record would silently let training images be scored."""
    listed = recorded_hash(run_dir, TRAINED_IMAGES)
    if listed is None:
        return None
    data = read_recorded(run_dir, TRAINED_IMAGES, 8 * train_samples)
    if data is None and _intact_beyond(run_dir, 8 * train_samples):
        raise RunError(f"{run_dir}/config.json: field 'train_samples' is {train_samples}, fewer than the images "
                       f"{TRAINED_IMAGES} records; rerun the run, or fix the value there")
    if data is None or len(data) % 8:
        if not os.path.lexists(os.path.join(run_dir, TRAINED_IMAGES)):
            raise RunError(f"{run_dir}/{TRAINED_IMAGES}: missing (the record of the run's training images, which its "
                           "marker lists); put it back, or train the run again with --overwrite")
        raise RunError(f"{run_dir}/{TRAINED_IMAGES}: damaged or changed since the run wrote it (the record of its "
                       "training images, checked against the SHA-256 in its marker); train the run again with "
                       "--overwrite")
    return set(np.frombuffer(data, dtype="<i8").tolist())


def shared_images(test, trained: Set[int]) -> list:
    """The names of `test`'s images whose bytes are one of `trained`'s."""
    return [test.name_of(i) for i, h in enumerate(_hashes_by_row(test)) if h is not None and h in trained]
