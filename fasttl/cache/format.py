"""The on-disk format of a feature cache, read side: manifest validation, .npy header checks,
and reading every listed file against its recorded size and SHA-256. Shared by the builder
(fasttl.cache.build) and the reader (fasttl.cache.cache), which import it and not each other."""
from __future__ import annotations

import errno
import functools
import hashlib
import json
import os
import re
from typing import Dict, List, Tuple

import numpy as np
import torch
from torch import Tensor

from fasttl.cache import store
from fasttl.cache.kernels import CACHE_DTYPES
from fasttl.cache.store import REBUILD_HINT, CacheError
from fasttl.util import settings
from fasttl.data.labels import unprintable


def to_numpy_storage(tensor: Tensor) -> np.ndarray:
    """bf16 has no numpy dtype: it is stored as its uint16 bits."""
    tensor = tensor.detach().cpu().contiguous()
    return tensor.view(torch.uint16 if hasattr(torch, "uint16") else torch.int16).numpy() \
        if tensor.dtype == torch.bfloat16 else tensor.numpy()


def _from_numpy_storage(array: np.ndarray, dtype: torch.dtype) -> Tensor:
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    return tensor.view(torch.bfloat16) if dtype == torch.bfloat16 else tensor


def _differences(found, wanted, prefix: str = "") -> list:
    """(dotted key, found, wanted) of each leaf where two fingerprints differ."""
    if isinstance(found, dict) and isinstance(wanted, dict):
        return [d for k in sorted(set(found) | set(wanted))
                for d in _differences(found.get(k), wanted.get(k), f"{prefix}{k}.")]
    return [] if found == wanted else [(prefix.rstrip("."), found, wanted)]


def mismatch_message(directory: str, found: dict, wanted: dict) -> str:
    details = "; ".join(f"{k}: cache has {f!r}, asked for {w!r}" for k, f, w in _differences(found, wanted))
    return (f"{directory}: holds a cache built for something else ({details[:600]}). Use another directory, "
            f"or {REBUILD_HINT}.")


# -- checking what a cache folder holds -------------------------------------------------------------------

_SHA256 = re.compile(r"[0-9a-f]{64}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate_manifest(manifest, path: str) -> dict:
    """Checks the manifest's structure and types (nothing on disk): a CacheError naming `path`
    says what is wrong. Every file it lists must be a plain name inside the cache folder."""
    def fail(problem: str):
        raise CacheError(f"{path}: {problem}; {REBUILD_HINT}")

    if not isinstance(manifest, dict):
        fail(f"expected a JSON object, found {type(manifest).__name__}")
    fingerprint = _checked_fingerprint(manifest, fail)
    names: List[str] = []
    _check_shards(manifest, fingerprint, names, fail)
    files = manifest.get("files")
    if not isinstance(files, dict):
        fail("no files object (labels and samples with their checksums)")
    for key in ("labels", "samples"):
        _check_entry(files.get(key), f"files {key}", names, fail)
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        fail(f"lists {duplicates} more than once")
    skipped = manifest.get("skipped", [])
    if not isinstance(skipped, list) or not all(isinstance(s, dict) and isinstance(s.get("path"), str)
                                                and isinstance(s.get("reason"), str) for s in skipped):
        fail("skipped is not a list of {path, reason} objects")
    graph = manifest.get("engine_graph")  # build: the ONNX graph that extracted the rows, if one did
    if graph is not None and not (isinstance(graph, dict) and isinstance(graph.get("file"), str)
                                  and _is_int(graph.get("bytes")) and graph["bytes"] >= 0
                                  and isinstance(graph.get("sha256"), str)
                                  and re.fullmatch(r"[0-9a-f]{64}", graph["sha256"])):
        fail("engine_graph is neither null nor an object of the graph's file, bytes and sha256 (64 hex digits)")
    return manifest


def _checked_fingerprint(manifest: dict, fail) -> dict:
    """The manifest's fingerprint, its format, dtype, sizes, classes and count checked."""
    fingerprint = manifest.get("fingerprint")
    if not isinstance(fingerprint, dict):
        fail("no fingerprint object")
    if fingerprint.get("format") != store.FORMAT_VERSION:
        fail(f"written in cache format {fingerprint.get('format')!r} (fasttl "
             f"{fingerprint.get('fasttl_version', '?')}), this fasttl reads format {store.FORMAT_VERSION}")
    if fingerprint.get("dtype") not in CACHE_DTYPES:
        fail(f"fingerprint dtype {fingerprint.get('dtype')!r} is not one of {sorted(CACHE_DTYPES)}")
    for key in ("feature_dim", "shard_rows"):
        if not _is_int(fingerprint.get(key)) or fingerprint[key] < 1:
            fail(f"fingerprint {key} {fingerprint.get(key)!r} is not a positive integer")
    dataset = fingerprint.get("dataset")
    if not isinstance(dataset, dict) or not isinstance(dataset.get("classes"), list) or \
            not all(isinstance(c, str) for c in dataset["classes"]) or not dataset["classes"]:
        fail("fingerprint dataset classes is not a non-empty list of names")
    classes = dataset["classes"]
    if len(set(classes)) != len(classes) or not all(c and not unprintable(c) for c in classes):
        fail("fingerprint dataset classes are not distinct, printable names (as FeatureCache.write takes them)")
    count = manifest.get("count")
    if not _is_int(count) or count < 0 or dataset.get("count") != count:
        fail(f"count {count!r} is not the dataset's count {dataset.get('count')!r}")
    return fingerprint


def _check_shards(manifest: dict, fingerprint: dict, names: List[str], fail) -> None:
    """One shard entry per `shard_rows` rows, each covering its rows, with scales for int8 only."""
    count, shard_rows = manifest["count"], fingerprint["shard_rows"]
    shards = manifest.get("shards")
    if not isinstance(shards, list):
        fail("shards is not a list")
    if len(shards) != -(-count // shard_rows):
        fail(f"{len(shards)} shards for {count} rows of {shard_rows} per shard")
    for i, shard in enumerate(shards):
        if not isinstance(shard, dict):
            fail(f"shard {i} is not an object")
        expected_rows = [i * shard_rows, min(count, (i + 1) * shard_rows)]
        if shard.get("rows") != expected_rows or not all(_is_int(r) for r in shard["rows"]):
            fail(f"shard {i} rows {shard.get('rows')!r}, expected {expected_rows}")
        _check_entry(shard.get("features"), f"shard {i} features", names, fail)
        if fingerprint["dtype"] == "int8":
            _check_entry(shard.get("scales"), f"shard {i} scales", names, fail)
        elif "scales" in shard:
            fail(f"shard {i} lists scales for a {fingerprint['dtype']} cache")


def _check_entry(entry, what: str, names: List[str], fail) -> None:
    """A listed file: a plain name, its size and SHA-256; its name is added to `names`."""
    if not isinstance(entry, dict):
        fail(f"{what} is not an object")
    if not store.is_plain_name(entry.get("file")):
        fail(f"{what} file {entry.get('file')!r} is not a plain file name inside the cache folder")
    if not _is_int(entry.get("bytes")) or entry["bytes"] < 0:
        fail(f"{what} bytes {entry.get('bytes')!r} is not a non-negative integer")
    if not isinstance(entry.get("sha256"), str) or not _SHA256.fullmatch(entry["sha256"]):
        fail(f"{what} sha256 {entry.get('sha256')!r} is not 64 lowercase hex digits")
    names.append(entry["file"])


def storage_dtypes(dtype: torch.dtype) -> tuple:
    """The numpy dtypes a shard of a cache of `dtype` may hold (bf16 is stored as its 16 bits)."""
    if dtype == torch.bfloat16:
        return np.dtype(np.uint16), np.dtype(np.int16)
    return (np.dtype({torch.float32: np.float32, torch.float16: np.float16, torch.int8: np.int8}[dtype]),)


def _check_file(directory: str, entry: dict) -> str:
    """The path of a file a manifest lists, after checking that it is a plain file of the recorded size."""
    path = os.path.join(directory, entry["file"])
    info = store.regular_file(path)
    if info is None:
        raise CacheError(f"{path}: missing (listed in {store.MANIFEST}); {REBUILD_HINT}")
    if info.st_size != entry["bytes"]:
        raise CacheError(f"{path}: truncated or changed ({info.st_size} bytes, {store.MANIFEST} says "
                         f"{entry['bytes']}); {REBUILD_HINT}")
    return path


def _checksum_error(path: str) -> CacheError:
    return CacheError(f"{path}: checksum mismatch (the file changed since the cache was built); {REBUILD_HINT}")


def _npy_header(stream, path: str, size: int, dtypes: tuple, shape: tuple) -> Tuple[int, np.dtype]:
    try:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            found_shape, fortran, found_dtype = np.lib.format.read_array_header_1_0(stream)
        elif version == (2, 0):
            found_shape, fortran, found_dtype = np.lib.format.read_array_header_2_0(stream)
        else:
            raise ValueError(f"npy format version {version}")
    except (ValueError, SyntaxError, TypeError, OverflowError, EOFError) as exc:
        raise CacheError(f"{path}: not a readable .npy array ({str(exc)[:200]}); {REBUILD_HINT}") from None
    if found_dtype.hasobject or found_dtype not in dtypes:
        raise CacheError(f"{path}: holds {found_dtype}, expected {dtypes[0]}; {REBUILD_HINT}")
    if tuple(found_shape) != tuple(shape) or (fortran and len(shape) > 1):
        order = " (Fortran order)" if fortran else ""
        raise CacheError(f"{path}: holds an array of shape {tuple(found_shape)}{order}, expected {tuple(shape)}; "
                         f"{REBUILD_HINT}")
    offset = stream.tell()
    if offset + int(np.prod(shape, dtype=np.int64)) * found_dtype.itemsize != size:
        raise CacheError(f"{path}: {size} bytes do not hold a {tuple(shape)} {found_dtype} array; {REBUILD_HINT}")
    return offset, found_dtype


def npy_header(stream, path: str, size: int, dtypes: tuple, shape: tuple) -> int:
    """Reads and checks a .npy header (before any data is read or mapped): one of `dtypes`, C
    order, `shape`, and exactly the data the file size leaves. Returns the data offset."""
    return _npy_header(stream, path, size, dtypes, shape)[0]


# -- verification records ---------------------------------------------------------------------------------
# Hashing every shard on every open would read a 50 GB cache each time. A file's content is checked
# against its SHA-256 once; what was checked is recorded outside the cache folder (which may be
# read-only) with the file's identity (size, mtime, ctime, inode). A later open whose files all have
# the recorded identity skips the hash; a file written, replaced or touched since has another
# ctime (which no user can set back) and is hashed again.

VERIFY = (True, False, "full")


def state_dir() -> str:
    return settings.STATE_DIR.path()


def _identity(info: os.stat_result) -> list:
    return [info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_ino]


def _record_path(directory: str, manifest_sha256: str) -> str:
    # fsencode: a path that is not UTF-8 (bytes held as surrogates) is hashed as the bytes it is
    key = store.sha256_bytes(os.fsencode(os.path.realpath(directory)) + f"\0{manifest_sha256}".encode())[:32]
    return os.path.join(state_dir(), "verified", f"{key}.json")


def _read_verified(directory: str, manifest_sha256: str) -> Dict[str, list]:
    """{file name: identity when its content was verified} for this manifest, {} when none."""
    try:
        record = store.read_record(_record_path(directory, manifest_sha256))
    except (CacheError, OSError):
        return {}
    if not isinstance(record, dict) or record.get("directory") != os.path.realpath(directory):
        return {}
    found = record.get("files")
    return found if isinstance(found, dict) else {}


def record_verified(directory: str, manifest_sha256: str, verified: Dict[str, list]) -> None:
    """Records that the files `verified` (name: identity) hold their listed content. Best effort:
    a state folder that cannot be written only means the next open hashes them again."""
    from fasttl.util import files

    path = _record_path(directory, manifest_sha256)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        files.write_json_atomic(path, {"directory": os.path.realpath(directory), "files": verified})
    except OSError:
        pass


def identities(directory: str, manifest: dict) -> Dict[str, list]:
    """The identity of every file `manifest` lists, as they are on disk now (the writers record
    the files they wrote and hashed)."""
    names = [e["file"] for shard in manifest["shards"] for e in (shard["features"], shard.get("scales")) if e]
    names += [manifest["files"]["labels"]["file"], manifest["files"]["samples"]["file"]]
    return {name: _identity(os.lstat(os.path.join(directory, name))) for name in names}


def manifest_sha256(directory: str) -> str:
    return store.sha256_bytes(store.read_bytes(os.path.join(directory, store.MANIFEST)))


# -- reading a cache ------------------------------------------------------------------------------------------

def _sha256_open(f) -> str:
    digest = hashlib.sha256()
    f.seek(0)
    for block in iter(lambda: f.read(1 << 22), b""):
        digest.update(block)
    return digest.hexdigest()


class _Checker:
    """Opens the listed files of one cache: each a plain file (opened without following a link)
    of the recorded size; its content hashed unless the verification record vouches for it."""

    def __init__(self, directory: str, manifest_bytes: bytes, verify):
        self.directory, self.verify = directory, verify
        self.manifest_sha256 = store.sha256_bytes(manifest_bytes)
        self.recorded = _read_verified(directory, self.manifest_sha256) if verify != "full" else {}
        self.identities: Dict[str, list] = {}
        self.hashed = 0

    def open(self, entry: dict, always_check: bool = False):
        """(path, open file, whether its content must be checked now). The caller closes it."""
        path = _check_file(self.directory, entry)
        f = store.open_regular(path)
        info = os.fstat(f.fileno())
        if info.st_size != entry["bytes"]:
            f.close()
            raise CacheError(f"{path}: truncated or changed ({info.st_size} bytes, {store.MANIFEST} says "
                             f"{entry['bytes']}); {REBUILD_HINT}")
        identity = _identity(info)
        self.identities[entry["file"]] = identity
        check = self.verify == "full" or ((self.verify is True or always_check)
                                           and self.recorded.get(entry["file"]) != identity)
        if check:
            self.hashed += 1
            if _sha256_open(f) != entry["sha256"]:
                f.close()
                raise _checksum_error(path)
            f.seek(0)
        return path, f, check

    def record(self) -> None:
        if self.verify is not False and self.hashed:
            record_verified(self.directory, self.manifest_sha256, dict(self.recorded, **self.identities))


def _map(f, path: str, size: int, dtypes: tuple, shape: tuple) -> np.ndarray:
    """The array of an open .npy file, memory-mapped copy-on-write: pages are read from the file
    as they are touched and count as file-backed memory; nothing is ever written back, and a
    write by mistake lands in a private page instead of faulting on a read-only map."""
    offset, dtype = _npy_header(f, path, size, dtypes, shape)
    if int(np.prod(shape, dtype=np.int64)) == 0:
        return np.zeros(shape, dtype)
    try:
        return np.memmap(f, dtype=dtype, mode="c", offset=offset, shape=shape)
    except (ValueError, OSError) as exc:
        if isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOMEM):
            raise OSError(exc.errno, exc.strerror, path) from None  # the machine's limit, not a damaged cache
        raise CacheError(f"{path}: cannot be mapped ({exc}); {REBUILD_HINT}") from exc


def _map_listed(checker: _Checker, entry: dict, dtypes: tuple, shape: tuple, always_check: bool = False):
    path, f, checked = checker.open(entry, always_check)
    with f:
        return path, _map(f, path, entry["bytes"], dtypes, shape), checked


def _check_labels(path: str, labels: np.ndarray, classes: int) -> None:
    if len(labels) and (labels.min() < 0 or labels.max() >= classes):
        raise CacheError(f"{path}: labels span [{labels.min()}, {labels.max()}], outside the {classes} classes "
                         f"[0, {classes}); {REBUILD_HINT}")


def load_samples(directory: str, entry: dict, count: int) -> List[str]:
    """The sample ids (samples.json), always checked against their SHA-256 as they are read."""
    path = _check_file(directory, entry)
    data = store.read_bytes(path)
    if len(data) != entry["bytes"] or store.sha256_bytes(data) != entry["sha256"]:
        raise _checksum_error(path)
    return _parse_samples(path, data, count)


def _parse_samples(path: str, data: bytes, count: int) -> List[str]:
    try:
        samples = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        raise CacheError(f"{path}: not valid JSON ({type(exc).__name__}); {REBUILD_HINT}") from None
    if not isinstance(samples, list) or len(samples) != count or not all(isinstance(s, str) for s in samples):
        raise CacheError(f"{path}: expected a list of {count} sample names; {REBUILD_HINT}")
    return samples


def read_cache(directory: str, verify, expect_fingerprint=None):
    """(manifest, shard features, shard scales or None, labels, samples loader) of the finished
    cache in `directory`: every shard and the labels memory-mapped (nothing concatenated, nothing
    read beyond headers unless it must be verified), every listed file checked against the
    manifest's size, dtype and shape. Content: see `VERIFY` and the verification records above:
    ``True`` hashes (and range-checks the labels of) each file not recorded as verified in its
    present state; ``"full"`` hashes every file now; ``False`` hashes only the labels (when not
    recorded); the sample ids (samples.json) are hashed as the labels, and parsed (hashed again)
    when first asked for."""
    if verify not in VERIFY:
        raise ValueError(f"verify: expected one of {VERIFY}, got {verify!r}")
    if not os.path.isdir(directory):
        raise CacheError(f"{directory}: not a folder, so not a feature cache")
    manifest_path = os.path.join(directory, store.MANIFEST)
    if store.regular_file(manifest_path) is None:
        raise CacheError(f"{directory}: no {store.MANIFEST} (not a feature cache, or its build did not finish: "
                         "run the same build again to resume it)")
    manifest_bytes = store.read_bytes(manifest_path)
    try:
        manifest = json.loads(manifest_bytes.decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        raise CacheError(f"{manifest_path}: not valid JSON ({type(exc).__name__}: {str(exc)[:200]}); "
                         f"{REBUILD_HINT}") from None
    validate_manifest(manifest, manifest_path)
    fingerprint = manifest["fingerprint"]
    if expect_fingerprint is not None and fingerprint != expect_fingerprint:
        raise CacheError(mismatch_message(directory, fingerprint, expect_fingerprint))
    dtype = CACHE_DTYPES[fingerprint["dtype"]]
    feature_dim, count = fingerprint["feature_dim"], manifest["count"]
    checker = _Checker(directory, manifest_bytes, verify)
    parts, scale_parts = [], []
    for shard in manifest["shards"]:
        rows = shard["rows"][1] - shard["rows"][0]
        parts.append(_from_numpy_storage(_map_listed(checker, shard["features"], storage_dtypes(dtype),
                                                     (rows, feature_dim))[1], dtype))
        if "scales" in shard:
            scale_parts.append(torch.from_numpy(_map_listed(checker, shard["scales"], (np.dtype(np.float32),),
                                                            (rows,))[1]))
    if not parts:
        parts = [torch.zeros((0, feature_dim), dtype=dtype)]
        scale_parts = [torch.zeros(0)] if dtype == torch.int8 else []
    path, labels, checked = _map_listed(checker, manifest["files"]["labels"], (np.dtype(np.int64),), (count,),
                                        always_check=True)
    if checked:
        _check_labels(path, labels, len(fingerprint["dataset"]["classes"]))
    entry = manifest["files"]["samples"]
    path, samples_file, checked = checker.open(entry, always_check=True)
    with samples_file:
        if checked:  # its content is checked with its checksum; the ids are kept only once asked for
            _parse_samples(path, samples_file.read(), count)
    checker.record()
    return (manifest, parts, scale_parts or None, torch.from_numpy(labels),
            functools.partial(load_samples, directory, entry, count))  # (a lambda can't be pickled)
