"""The on-disk layer of a feature cache: atomic writes, checksums, the writer lock and the file
names. Nothing is ever left half-written: each file goes to a temporary name, is fsynced and
renamed; the manifest is written last."""
from __future__ import annotations

import errno
import fcntl
import hashlib
import io
import json
import os
from typing import Optional

import numpy as np

MANIFEST = "manifest.json"
BUILD = "build.json"        # the fingerprint of a build in progress (what a resume must match)
LOCK = ".lock"
LABELS = "labels.npy"
SAMPLES = "samples.json"
FORMAT_VERSION = 1


def features_file(shard: int) -> str:
    return f"features-{shard:05d}.npy"


def scales_file(shard: int) -> str:
    return f"scales-{shard:05d}.npy"


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def save_npy_atomic(path: str, array: np.ndarray) -> None:
    write_atomic(path, npy_bytes(array))


def write_json_atomic(path: str, payload: dict) -> None:
    write_atomic(path, (json.dumps(payload, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: str) -> Optional[dict]:
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def remove_stale_temporaries(directory: str) -> None:
    """Temporary files of an interrupted writer (their content was never renamed into place)."""
    for name in os.listdir(directory):
        if ".tmp." in name:
            os.remove(os.path.join(directory, name))


class CacheLockedError(RuntimeError):
    pass


class WriterLock:
    """An exclusive, non-blocking lock on a cache directory: a second writer fails at once
    instead of interleaving. The OS releases it when the holder exits, even on kill -9."""

    def __init__(self, directory: str):
        self.path = os.path.join(directory, LOCK)
        self.fd: Optional[int] = None

    def __enter__(self) -> "WriterLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise CacheLockedError(
                    f"{os.path.dirname(self.path)} is being written by {holder}; wait for it to finish "
                    "(a second writer would interleave shards)") from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}".encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None
