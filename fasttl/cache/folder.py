"""A cache folder's own files, shared by both writers (build.py, write.py): each file's manifest
entry (size, SHA-256), the manifest written last, and a folder of someone else's files refused."""
from __future__ import annotations

import contextlib
import os
from typing import Optional, Tuple

from fasttl.util import files
from fasttl.cache import store
from fasttl.cache.format import identities, manifest_sha256, record_verified
from fasttl.cache.store import CacheError
from fasttl.util.errors import OptionError


def file_entry(out_dir: str, name: str, data: Optional[bytes] = None) -> dict:
    path = os.path.join(out_dir, name)
    if data is None:
        info = store.regular_file(path)
        if info is None:
            raise CacheError(f"{path}: shard missing after every rank finished")
        return {"file": name, "bytes": info.st_size, "sha256": store.sha256_file(path)}
    return {"file": name, "bytes": len(data), "sha256": store.sha256_bytes(data)}


def finish(out_dir: str, manifest: dict) -> None:
    """Writes the manifest (last: its presence marks the cache finished), drops the build record
    and records every listed file as verified: its checksum was just taken from what was written."""
    files.write_json_atomic(os.path.join(out_dir, store.MANIFEST), manifest)
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(out_dir, store.BUILD))
    record_verified(out_dir, manifest_sha256(out_dir), identities(out_dir, manifest))


def foreign_entries(directory: str) -> list:
    """Entries of `directory` that a fasttl cache would not hold. The generic names (manifest.json,
    build.json, labels.npy, samples.json) may be the user's own: they count as fasttl's only when
    the folder is fasttl's by proof, a record with a fingerprint or shards named as fasttl names
    them (a damaged manifest beside fasttl's shards is fasttl's, to rebuild with overwrite)."""
    if not os.path.isdir(directory):
        return []
    names = sorted(os.listdir(directory))
    vouched = (any(store.SHARD_FILE.fullmatch(name) for name in names)
               or any(_is_fasttl_record(os.path.join(directory, name)) for name in (store.MANIFEST, store.BUILD)
                      if name in names))
    foreign = []
    for name in names:
        if name in (store.MANIFEST, store.BUILD, store.LABELS, store.SAMPLES):
            own = vouched
        else:
            own = store.is_own_file(directory, name)
        if not own:
            foreign.append(name)
    return foreign


def _cache_proof(folder: str) -> Optional[str]:
    """What makes `folder` a feature cache's (None when nothing does): a shard named with its
    fingerprint key, a record holding a fingerprint, an engine graph, or the mark `fasttl extract`
    leaves on its root (a user's features-00000.npy or manifest.json is no proof, nor a cache a
    script built into the folder's train/)."""
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return None
    return next((n for n in names if store.KEYED_SHARD_FILE.fullmatch(n) or store.ENGINE_FILE.fullmatch(n) or
                 n == store.EXTRACT_MARKER and store.is_extract_mark(os.path.join(folder, n)) or
                 n in (store.MANIFEST, store.BUILD) and _readable_record(os.path.join(folder, n))), None)


def enclosing_cache_folder(path: str) -> Optional[Tuple[str, str]]:
    """The feature cache folder `path` is or lies in, links resolved, and the file that proves it
    one; None when there is none: only fasttl extract writes into one (a run's or a user's files
    there would make it refuse the cache)."""
    folder = os.path.realpath(os.path.expanduser(path))
    while True:
        proof = _cache_proof(folder)
        if proof is not None:
            return folder, proof
        parent = os.path.dirname(folder)
        if parent == folder:
            return None
        folder = parent


def refuse_inside(option: str, path: str, what: str = "folder", flag: str = "") -> None:
    """An OptionError where `path` (what --`option` names) lies in a feature cache folder: fasttl
    extract would then refuse its own cache, holding files not its own."""
    found = enclosing_cache_folder(path)
    if found is not None:
        raise OptionError(f"{option}: {path} is in the feature cache folder {found[0]} (it holds {found[1]}), which "
                          f"only fasttl extract writes into; give {flag or '--' + option} a {what} outside it")


def _readable_record(path: str) -> bool:
    try:
        return _is_fasttl_record(path)
    except OSError:  # one a user keeps closed, above the output: not a cache's for all one can tell
        return False


def _is_fasttl_record(path: str) -> bool:
    try:
        record = files.read_json(path)
    except ValueError:
        return False
    return isinstance(record, dict) and isinstance(record.get("fingerprint"), dict)


def refuse_run_folder(directory: str) -> None:
    """A cache never goes inside a fasttl run folder (only its run writes there): checked before
    the cache's folder is made."""
    holder = files.enclosing_run_folder(directory)
    if holder is not None:
        raise CacheError(f"{directory}: is in the fasttl run folder {holder}, which only its run writes into; write "
                         "the cache to a folder of its own")


def refuse_foreign(directory: str) -> None:
    """Never makes a folder of someone else's files a cache, with or without overwrite: files of
    the user's may stay only beside a cache fasttl already wrote there; never inside a fasttl run
    folder (only its run writes there)."""
    refuse_run_folder(directory)
    foreign = foreign_entries(directory)
    holds_cache = os.path.isfile(os.path.join(directory, store.MANIFEST)) and store.MANIFEST not in foreign
    clobbered = [name for name in foreign if name in (store.MANIFEST, store.BUILD, store.LABELS, store.SAMPLES)]
    if clobbered or (foreign and not holds_cache):
        raise CacheError(f"{directory}: holds files that are not a fasttl cache's ({', '.join(foreign[:3])}); write "
                         "to an empty or new folder")
