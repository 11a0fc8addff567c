"""The on-disk layer of a feature cache: atomic writes, checksums, the writer lock and the file
names. Nothing is ever left half-written: each file goes to a temporary name, is fsynced and
renamed; the manifest is written last.

fasttl writes and deletes only files it named itself: temporaries start with TEMP_PREFIX and are
created with O_EXCL | O_NOFOLLOW; the lock file is opened with O_NOFOLLOW and written only when it
is a plain file holding nothing but a lock record; no file in a cache folder is read through a
symbolic link."""
from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import re
import stat
from typing import Optional

import numpy as np

from fasttl.util.errors import UserError
from fasttl.util import files
from fasttl.util.files import TEMP_PREFIX

MANIFEST = "manifest.json"
BUILD = "build.json"        # the fingerprint of a build in progress (what a resume must match)
LOCK = ".lock"
LABELS = "labels.npy"
SAMPLES = "samples.json"
FORMAT_VERSION = 2          # 2: labels and samples listed with their checksums, shard names carry the fingerprint
# Shard files: features-<fingerprint key>-<shard>.npy (format 2) or features-<shard>.npy (format 1).
SHARD_FILE = re.compile(r"(features|scales)-(?:[0-9a-f]{16}-)?[0-9]{5}\.npy")
KEYED_SHARD_FILE = re.compile(r"(features|scales)-[0-9a-f]{16}-[0-9]{5}\.npy")  # a format-2 name: fasttl's by its key
# engines.onnx_file_name's names: a 16-hex key (and -int8 for a quantized graph); anything else named
# engine-* (a user's "engine-v8.pdf") is the user's.
ENGINE_FILE = re.compile(r"engine-[0-9a-f]{16}(?:-int8)?\.onnx")
_LOCK_RECORD = re.compile(rb"(pid [0-9]+)?\s*")

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)

REBUILD_HINT = ("rebuild the cache with overwrite=True (FeatureCache.build in Python) "
                "or --overwrite (`fasttl extract`, `fasttl run`)")


class CacheError(UserError, ValueError):
    """A cache directory that is missing, corrupt, or built for something else."""


class CacheLockedError(UserError, RuntimeError):
    """Another process is writing this cache."""


def fingerprint_key(fingerprint: dict) -> str:
    """16 hex digits of the fingerprint's SHA-256: in every shard's name, so a shard is only ever
    adopted by a build of the same fingerprint, even when the manifest and build.json are gone."""
    text = json.dumps(fingerprint, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def features_file(shard: int, key: str) -> str:
    return f"features-{key}-{shard:05d}.npy"


def scales_file(shard: int, key: str) -> str:
    return f"scales-{key}-{shard:05d}.npy"


def is_plain_name(name) -> bool:
    """A file name a manifest may list: one path component inside the cache folder, not hidden
    (fasttl's lock and temporaries) and not the manifest or build record."""
    return (isinstance(name, str) and name not in ("", ".", "..", MANIFEST, BUILD) and not name.startswith(".")
            and "/" not in name and "\\" not in name and "\0" not in name and os.path.basename(name) == name)


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def regular_file(path: str) -> Optional[os.stat_result]:
    """lstat of `path`: None when nothing is there; a CacheError naming it when it is a symbolic
    link or not a regular file (a cache folder holds only fasttl's own plain files)."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(info.st_mode):
        raise CacheError(f"{path}: is a symbolic link; fasttl does not follow links in a cache folder "
                         f"({REBUILD_HINT})")
    if not stat.S_ISREG(info.st_mode):
        raise CacheError(f"{path}: not a regular file (move it out of the cache folder, then {REBUILD_HINT})")
    return info


def open_regular(path: str) -> io.BufferedReader:
    """A plain file of a cache folder opened for reading, without following a link (O_NOFOLLOW)
    and without blocking on a FIFO; anything else is a CacheError naming it."""
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW | _CLOEXEC | _NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            regular_file(path)  # raises the CacheError naming the link
        raise
    return files.plain_reader(fd, lambda info: None if stat.S_ISREG(info.st_mode) else CacheError(
        f"{path}: not a regular file (move it out of the cache folder, then {REBUILD_HINT})"))


def read_bytes(path: str) -> bytes:
    """The bytes of a plain file in a cache folder (its records and sample ids), read without
    following a link; one larger than fasttl ever writes there (a sparse or runaway file) is
    refused unread."""
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        if size > files.MAX_JSON_BYTES:
            raise CacheError(f"{path}: {size:,} bytes, more than fasttl ever writes to a cache record; {REBUILD_HINT}")
        return f.read()


def read_record(path: str):
    """A JSON record of a cache folder (manifest.json, build.json): None when absent; a CacheError
    naming it when it is a link, not a plain file, or not valid JSON."""
    if regular_file(path) is None:
        return None
    data = read_bytes(path)
    try:
        return json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise CacheError(f"{path}: not valid JSON ({type(exc).__name__}: {str(exc)[:200]}); {REBUILD_HINT}") from None


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open_regular(path) as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _plain_files(directory: str):
    """(name, path) of the plain files and symbolic links in `directory` (never folders)."""
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            continue
        if stat.S_ISREG(mode) or stat.S_ISLNK(mode):
            yield name, path


def remove_stale_temporaries(directory: str) -> None:
    """fasttl's temporaries of an interrupted writer (their content was never renamed into place).
    Only names starting with TEMP_PREFIX: a user file with ".tmp." in its name is not fasttl's."""
    for name, path in _plain_files(directory):
        if name.startswith(TEMP_PREFIX):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


def is_own_file(folder: str, name: str) -> bool:
    """Whether the entry `name` of `folder` is one a cache folder holds: its records, labels, sample
    ids, shards, lock, fasttl's temporaries and kept engine graphs and state, and extract's mark on
    its root (by what it holds: a user's file of the mark's name is the user's)."""
    if name == EXTRACT_MARKER:
        return is_extract_mark(os.path.join(folder, name))
    return (name in (MANIFEST, BUILD, LABELS, SAMPLES, LOCK) or bool(SHARD_FILE.fullmatch(name))
            or bool(ENGINE_FILE.fullmatch(name)) or name.startswith(TEMP_PREFIX))


# The folders `fasttl extract` writes under its --out: the two splits of class folders, or the one of a list.
EXTRACT_SPLITS = ("train", "test", "all")
# What `fasttl extract` writes into its --out first: the proof that the folder is an extract root (a
# project holding a cache a script built in its train/ is not one).
EXTRACT_MARKER = ".fasttl-extract"
EXTRACT_MARK = {"fasttl": "the root of a fasttl extract"}  # what the mark holds: a user's file of its name is no mark


def is_extract_mark(path: str) -> bool:
    """Whether `path` is the mark extract writes: a plain file holding EXTRACT_MARK (a link, or a
    file of the user's that bears the name, is not; one fasttl may not read may be, so it counts)."""
    try:
        return files.read_json(path, limit=4096) == EXTRACT_MARK
    except PermissionError:
        return True
    except ValueError:
        return False


def remove_cache_files(directory: str) -> None:
    """Removes a cache's own files from `directory`: its records, labels and sample ids, the files
    named as fasttl names shards, and fasttl's temporaries. Links are removed, never followed;
    folders and every other file are left alone."""
    own = (MANIFEST, BUILD, LABELS, SAMPLES)
    for name, path in _plain_files(directory):
        if name in own or SHARD_FILE.fullmatch(name) or name.startswith(TEMP_PREFIX):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


class WriterLock(files.FolderLock):
    """An exclusive, non-blocking lock on a cache directory: a second writer fails at once
    instead of interleaving (fasttl.util.files.FolderLock)."""

    def __init__(self, directory: str):
        super().__init__(directory, LOCK, "a second writer would interleave shards")

    def refused(self, why: str) -> Exception:
        return CacheError(f"{self.path}: {why}; fasttl will not write to it (move it away: it is not fasttl's lock "
                          "file, which fasttl creates itself)")

    def locked(self, holder: str) -> Exception:
        return CacheLockedError(f"{os.path.dirname(self.path)} is being written by {holder}; wait for it to finish "
                                f"({self.purpose})")
