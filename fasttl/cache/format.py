"""The on-disk format of a feature cache, read side: manifest validation, .npy header checks,
and reading every listed file against its recorded size and SHA-256. Shared by the builder
(fasttl.cache.build) and the reader (fasttl.cache.cache), which import it and not each other."""
from __future__ import annotations

import io
import json
import os
import re
from typing import List, Tuple

import numpy as np
import torch
from torch import Tensor

from fasttl.cache import store
from fasttl.cache.kernels import CACHE_DTYPES
from fasttl.cache.store import REBUILD_HINT, CacheError


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
    count, shard_rows = manifest.get("count"), fingerprint["shard_rows"]
    if not _is_int(count) or count < 0 or dataset.get("count") != count:
        fail(f"count {count!r} is not the dataset's count {dataset.get('count')!r}")
    shards = manifest.get("shards")
    if not isinstance(shards, list):
        fail("shards is not a list")
    if len(shards) != -(-count // shard_rows):
        fail(f"{len(shards)} shards for {count} rows of {shard_rows} per shard")
    names = []

    def check_entry(entry, what: str):
        if not isinstance(entry, dict):
            fail(f"{what} is not an object")
        if not store.is_plain_name(entry.get("file")):
            fail(f"{what} file {entry.get('file')!r} is not a plain file name inside the cache folder")
        if not _is_int(entry.get("bytes")) or entry["bytes"] < 0:
            fail(f"{what} bytes {entry.get('bytes')!r} is not a non-negative integer")
        if not isinstance(entry.get("sha256"), str) or not _SHA256.fullmatch(entry["sha256"]):
            fail(f"{what} sha256 {entry.get('sha256')!r} is not 64 lowercase hex digits")
        names.append(entry["file"])

    for i, shard in enumerate(shards):
        if not isinstance(shard, dict):
            fail(f"shard {i} is not an object")
        expected_rows = [i * shard_rows, min(count, (i + 1) * shard_rows)]
        if shard.get("rows") != expected_rows or not all(_is_int(r) for r in shard["rows"]):
            fail(f"shard {i} rows {shard.get('rows')!r}, expected {expected_rows}")
        check_entry(shard.get("features"), f"shard {i} features")
        if fingerprint["dtype"] == "int8":
            check_entry(shard.get("scales"), f"shard {i} scales")
        elif "scales" in shard:
            fail(f"shard {i} lists scales for a {fingerprint['dtype']} cache")
    files = manifest.get("files")
    if not isinstance(files, dict):
        fail("no files object (labels and samples with their checksums)")
    for key in ("labels", "samples"):
        check_entry(files.get(key), f"files {key}")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        fail(f"lists {duplicates} more than once")
    skipped = manifest.get("skipped", [])
    if not isinstance(skipped, list) or not all(isinstance(s, dict) and isinstance(s.get("path"), str)
                                                and isinstance(s.get("reason"), str) for s in skipped):
        fail("skipped is not a list of {path, reason} objects")
    return manifest


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


def npy_header(stream, path: str, size: int, dtypes: tuple, shape: tuple) -> int:
    """Reads and checks a .npy header (before any data is read or mapped): one of `dtypes`, C
    order, `shape`, and exactly the data the file size leaves. Returns the data offset."""
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
    return offset


def _load_shard(directory: str, entry: dict, verify: bool, dtypes: tuple, shape: tuple) -> np.ndarray:
    path = _check_file(directory, entry)
    if verify and store.sha256_file(path) != entry["sha256"]:
        raise _checksum_error(path)
    with store.open_regular(path) as f:
        npy_header(f, path, entry["bytes"], dtypes, shape)
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise CacheError(f"{path}: unreadable shard ({exc}); {REBUILD_HINT}") from exc


def _read_listed(directory: str, entry: dict) -> Tuple[str, bytes]:
    """A small listed file, always checked against its SHA-256."""
    path = _check_file(directory, entry)
    data = store.read_bytes(path)
    if len(data) != entry["bytes"] or store.sha256_bytes(data) != entry["sha256"]:
        raise _checksum_error(path)
    return path, data


def _load_labels(directory: str, entry: dict, count: int, classes: int) -> np.ndarray:
    path, data = _read_listed(directory, entry)
    stream = io.BytesIO(data)
    npy_header(stream, path, len(data), (np.dtype(np.int64),), (count,))
    stream.seek(0)
    try:
        labels = np.array(np.load(stream, allow_pickle=False), dtype=np.int64)
    except ValueError as exc:
        raise CacheError(f"{path}: unreadable labels ({exc}); {REBUILD_HINT}") from exc
    if count and (labels.min() < 0 or labels.max() >= classes):
        raise CacheError(f"{path}: labels span [{labels.min()}, {labels.max()}], outside the {classes} classes "
                         f"[0, {classes}); {REBUILD_HINT}")
    return labels


def _load_samples(directory: str, entry: dict, count: int) -> List[str]:
    path, data = _read_listed(directory, entry)
    try:
        samples = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        raise CacheError(f"{path}: not valid JSON ({type(exc).__name__}); {REBUILD_HINT}") from None
    if not isinstance(samples, list) or len(samples) != count or not all(isinstance(s, str) for s in samples):
        raise CacheError(f"{path}: expected a list of {count} sample names; {REBUILD_HINT}")
    return samples


def read_cache(directory: str, verify: bool, expect_fingerprint=None):
    """(manifest, features, scales, labels, samples) of the finished cache in `directory`, every
    file checked against the manifest (shards' SHA-256 with `verify`)."""
    if not os.path.isdir(directory):
        raise CacheError(f"{directory}: not a folder, so not a feature cache")
    manifest_path = os.path.join(directory, store.MANIFEST)
    manifest = store.read_record(manifest_path)
    if manifest is None:
        raise CacheError(f"{directory}: no {store.MANIFEST} (not a feature cache, or its build did not finish: "
                         "run the same build again to resume it)")
    validate_manifest(manifest, manifest_path)
    fingerprint = manifest["fingerprint"]
    if expect_fingerprint is not None and fingerprint != expect_fingerprint:
        raise CacheError(mismatch_message(directory, fingerprint, expect_fingerprint))
    dtype = CACHE_DTYPES[fingerprint["dtype"]]
    feature_dim, count = fingerprint["feature_dim"], manifest["count"]
    parts, scale_parts = [], []
    for shard in manifest["shards"]:
        rows = shard["rows"][1] - shard["rows"][0]
        parts.append(_load_shard(directory, shard["features"], verify, storage_dtypes(dtype), (rows, feature_dim)))
        if "scales" in shard:
            scale_parts.append(_load_shard(directory, shard["scales"], verify, (np.dtype(np.float32),), (rows,)))
    features = _from_numpy_storage(np.concatenate(parts) if parts else
                                   np.zeros((0, feature_dim), storage_dtypes(dtype)[0]), dtype)
    scales = torch.from_numpy(np.concatenate(scale_parts)) if scale_parts else None
    labels = torch.from_numpy(_load_labels(directory, manifest["files"]["labels"], count,
                                           len(fingerprint["dataset"]["classes"])))
    samples = _load_samples(directory, manifest["files"]["samples"], count)
    return manifest, features, scales, labels, samples
