"""Writing features computed elsewhere into a cache (FeatureCache.write): streamed shard by
shard, each value checked to fit the cache dtype."""
from __future__ import annotations

import json
import os
import time
from typing import Optional

import numpy as np
import torch

from fasttl.util import files
from fasttl._version import __version__
from fasttl.cache import store
from fasttl.cache.format import to_numpy_storage
from fasttl.cache.store import CacheError
from fasttl.cache.kernels import CACHE_DTYPE, CACHE_DTYPES, pool_store
from fasttl.cache.folder import file_entry, finish, refuse_foreign, refuse_run_folder
from fasttl.util.checks import a_flag, plain_number, positive_int
from fasttl.data.labels import refuse_lookalikes, unprintable
from fasttl.util.errors import DataError

MAX_FINGERPRINT_BYTES = 1 << 20  # what describes a data set: names and hashes, not the data


def _write_fingerprint(fingerprint: Optional[dict], classes, dtype: str, feature_dim: int, count: int,
                       shard_rows: int, identity: str) -> dict:
    return {"source": "FeatureCache.write", "user": fingerprint or {},
            "dataset": {"identity": identity, "count": count, "classes": list(classes)},
            "dtype": dtype, "feature_dim": int(feature_dim), "shard_rows": int(shard_rows),
            "fasttl_version": __version__, "format": store.FORMAT_VERSION}


# What a value one of the narrow cache dtypes can't hold is stored as instead.
_WIDER = {torch.float16: ("fp16", "bf16 or fp32 (dtype='bf16', or --cache-dtype/--dtype bf16)"),
          torch.bfloat16: ("bf16", "fp32 (dtype='fp32', or --cache-dtype/--dtype fp32)"),
          torch.int8: ("int8", "fp32 (dtype='fp32', or --cache-dtype/--dtype fp32)")}
# int8 rows are read back as q * (max|v| / 127): near float32's largest value that product rounds
# up to inf (a row of 3.4e38 came back as inf), so int8 holds up to half of it.
_LARGEST = {torch.int8: torch.finfo(torch.float32).max / 2}


def check_fits(rows: torch.Tensor, cache_dtype: torch.dtype, what: str) -> None:
    """A cache dtype must hold every value it is given: fp16 turns a feature above 65504 into inf
    (bf16 one above 3.39e38, int8 one above 1.7e38 as read back), which training would only report
    later as a diverged run blamed on its learning rate; fp16 also turns a row of values below its
    smallest normal into zeros."""
    if cache_dtype not in _WIDER or not rows.numel():
        return
    limits = torch.finfo(torch.float32 if cache_dtype == torch.int8 else cache_dtype)
    most = _LARGEST.get(cache_dtype, limits.max)
    name, instead = _WIDER[cache_dtype]
    magnitudes = rows.reshape(len(rows), -1).abs().amax(dim=1)
    largest = float(magnitudes.max())
    if largest > most:
        raise CacheError(f"{what}: a value of magnitude {largest:.4g} overflows {name} (largest {most:.4g}); "
                         f"store it as {instead}, or scale the features")
    if cache_dtype != torch.float16:
        return
    # A row whose every value is below fp16's smallest normal number keeps a few bits at most (and
    # is zeros below 6e-8): a whole image's features lost without a word.
    faint = ((magnitudes > 0) & (magnitudes < limits.tiny)).nonzero()
    if len(faint):
        row = int(faint[0])
        raise CacheError(f"{what}: row {row}'s values are all below {limits.tiny:.3g} in magnitude (largest "
                         f"{float(magnitudes[row]):.3g}) and would lose their precision or become zeros in fp16; "
                         "scale the features, or store them as bf16 or fp32 (dtype='bf16')")


def _as_rows(chunk, index: int) -> torch.Tensor:
    """One chunk of `write` as a 2-D floating tensor on the CPU."""
    if isinstance(chunk, np.ndarray):
        if chunk.dtype.kind != "f":
            raise ValueError(f"chunks: chunk {index} is a {chunk.dtype} array (expected floating point features)")
        chunk = torch.from_numpy(np.ascontiguousarray(chunk))
    if not isinstance(chunk, torch.Tensor) or not chunk.dtype.is_floating_point or chunk.dim() != 2:
        raise ValueError(f"chunks: chunk {index} is {getattr(chunk, 'dtype', type(chunk).__name__)} of shape "
                         f"{tuple(getattr(chunk, 'shape', ()))} (expected an (n, D) float array or tensor)")
    chunk = chunk.detach().cpu()
    if chunk.numel() and not bool(torch.isfinite(chunk).all()):
        raise ValueError(f"chunks: chunk {index} holds NaN or infinite values")
    if chunk.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        wide, chunk = chunk, chunk.float()
        if not bool(torch.isfinite(chunk).all()):
            raise ValueError(f"chunks: chunk {index} holds a value of magnitude {float(wide.abs().max()):.4g}, beyond "
                             f"float32's {torch.finfo(torch.float32).max:.4g} (every cache dtype's range); scale the "
                             "features")
    return chunk


def write_cache(directory: str, chunks, labels, *, classes, dtype: str = CACHE_DTYPE, sample_ids=None,
                fingerprint: Optional[dict] = None, shard_rows: int = 65536, overwrite: bool = False) -> dict:
    """Streams features computed elsewhere into a cache in `directory` (``FeatureCache.write``).

    * ``chunks``: any iterable of (n_i, D) float arrays or tensors (numpy, torch on any device),
      rows in order; converted to ``dtype`` (fp32, fp16, bf16, int8 with a per-row scale) by the
      same kernel as extraction, and written shard by shard: only one shard of ``shard_rows``
      rows is held in memory.
    * ``labels``: one integer per row, in [0, len(classes)); ``classes``: the class names.
    * ``sample_ids``: one string per row (default "0", "1", ...), to trace rows to their source.
    * ``fingerprint``: any JSON object describing what computed the features (model, data
      version); kept under the manifest's fingerprint "user".
    * Same discipline as ``build``: the writer lock, every file to a temporary name, fsynced and
      renamed; the manifest (checksums of every file) last. A folder holding a cache is refused
      unless ``overwrite`` (which removes only the cache's own files). There is no resume: the
      chunks are consumed once; an interrupted write leaves no manifest, and writing again
      starts over.

    Returns what it did (``directory``, ``rows``, ``shards``, ``bytes_written``, ``seconds``)."""
    started = time.perf_counter()
    overwrite = a_flag("overwrite", overwrite)  # "no" would be taken as True: a cache replaced
    shard_rows = plain_number(shard_rows)
    classes, labels, sample_ids = _checked_arguments(dtype, shard_rows, classes, fingerprint, labels, sample_ids)
    directory = files.absolute(directory)
    if os.path.lexists(directory) and not os.path.isdir(directory):
        raise CacheError(f"{directory}: is a file, not a folder; write the cache to a folder")
    refuse_run_folder(directory)
    os.makedirs(directory, exist_ok=True)
    refuse_foreign(directory)
    with store.WriterLock(directory):
        if store.regular_file(os.path.join(directory, store.MANIFEST)) is not None and not overwrite:
            raise CacheError(f"{directory}: already holds a cache; write to another directory, or pass "
                             "overwrite=True to replace it")
        store.remove_cache_files(directory)  # an interrupted write's shards, or the cache replaced
        store.remove_stale_temporaries(directory)
        # Shard names carry a key of what is known before the first row: this write's settings.
        header = {"write": _write_fingerprint(fingerprint, classes, dtype, 0, 0, shard_rows, ""),
                  "started": time.time_ns(), "pid": os.getpid()}
        files.write_json_atomic(os.path.join(directory, store.BUILD), {"fingerprint": header})
        shards = _ShardWriter(directory, store.fingerprint_key(header), dtype, shard_rows)
        for index, chunk in enumerate(chunks):
            shards.add(_as_rows(chunk, index), index)
        shards.close()
        if shards.count != len(labels):
            raise ValueError(f"labels: {len(labels)} labels for {shards.count} rows of features (expected one per "
                             "row)")
        if shards.count == 0:
            raise ValueError("chunks: no rows (expected at least one (n, D) chunk with n >= 1)")
        ids = sample_ids if sample_ids is not None else [str(i) for i in range(shards.count)]
        written = shards.written + _write_records(directory, shards, labels, ids, fingerprint, classes, dtype)
    return {"directory": directory, "rows": shards.count, "shards": len(shards.entries), "bytes_written": written,
            "seconds": time.perf_counter() - started}


def _checked_arguments(dtype, shard_rows, classes, fingerprint, labels, sample_ids):
    """(classes, labels as int64, sample_ids) of a write, each checked: a bad one is a ValueError
    naming the argument, before any folder is made."""
    if dtype not in CACHE_DTYPES:
        raise ValueError(f"dtype: expected one of {sorted(CACHE_DTYPES)}, got {dtype!r}")
    positive_int("shard_rows", shard_rows)
    if isinstance(classes, (set, frozenset)):  # (its order changes from one process to the next: PYTHONHASHSEED)
        raise TypeError("classes: a set has no order, and the order numbers the labels; give a list")
    classes = list(classes) if not isinstance(classes, str) else None
    if not classes or not all(isinstance(c, str) and c and not unprintable(c) for c in classes) \
            or len(set(classes)) != len(classes):
        raise ValueError("classes: expected a list of distinct, printable class names (strings)")
    try:
        refuse_lookalikes(classes, "classes:")
    except DataError as exc:
        raise ValueError(str(exc)) from None
    if fingerprint is not None:
        if not isinstance(fingerprint, dict):
            raise ValueError(f"fingerprint: expected a dict (JSON object), got {type(fingerprint).__name__}")
        try:
            size = len(files.json_bytes(fingerprint))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"fingerprint: not JSON-serializable ({exc})") from None
        except RecursionError:
            raise ValueError("fingerprint: nested too deeply to write as JSON") from None
        if size > MAX_FINGERPRINT_BYTES:  # the manifest holding it must stay readable (files.MAX_JSON_BYTES)
            raise ValueError(f"fingerprint: {size:,} bytes as JSON, more than the {MAX_FINGERPRINT_BYTES:,} a cache "
                             "manifest keeps; fingerprint the data with a hash, not with its content")
    labels = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)
    if labels.ndim != 1 or (labels.size and labels.dtype.kind not in "iu"):
        raise ValueError(f"labels: expected one integer per row, got {labels.dtype} of shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= len(classes)):  # before the cast: uint64 2**63 stays
        bad = int(np.flatnonzero((labels < 0) | (labels >= len(classes)))[0])
        raise ValueError(f"labels: row {bad} has label {labels[bad]}, outside the {len(classes)} classes "
                         f"[0, {len(classes)})")
    if sample_ids is not None:
        sample_ids = list(sample_ids)
        if not all(isinstance(s, str) and s for s in sample_ids):
            bad = next(s for s in sample_ids if not (isinstance(s, str) and s))
            raise ValueError(f"sample_ids: expected one non-empty string per row, got {bad!r}")
        if len(sample_ids) != len(labels):
            raise ValueError(f"sample_ids: {len(sample_ids)} ids for {len(labels)} labels (expected one per row)")
        if len(set(sample_ids)) != len(sample_ids):
            raise ValueError("sample_ids: an id names two rows (expected one id per row, each once)")
    return classes, labels.astype(np.int64), sample_ids


class _ShardWriter:
    """Rows in, shard files out: one shard of `shard_rows` rows held in memory, converted to the
    cache dtype by the extraction kernel, each full shard written (and listed in `entries`)."""

    def __init__(self, directory: str, key: str, dtype: str, shard_rows: int):
        self.directory, self.key, self.dtype, self.shard_rows = directory, key, dtype, shard_rows
        self.entries, self.written, self.count, self.filled = [], 0, 0, 0
        self.width = self.buffer = self.scales = None

    def add(self, chunk: torch.Tensor, index: int) -> None:
        if self.width is None:
            self.width = chunk.shape[1]
            if self.width < 1:
                raise ValueError(f"chunks: chunk {index} has no columns (expected D >= 1 features per row)")
            self.buffer = torch.empty((0, self.width), dtype=CACHE_DTYPES[self.dtype])
            self.scales = torch.empty(0, dtype=torch.float32) if self.dtype == "int8" else None
        elif chunk.shape[1] != self.width:
            raise ValueError(f"chunks: chunk {index} has {chunk.shape[1]} columns, the first had {self.width}")
        check_fits(chunk, CACHE_DTYPES[self.dtype], f"chunks: chunk {index}")
        done = 0
        while done < chunk.shape[0]:
            take = min(self.shard_rows - self.filled, chunk.shape[0] - done)
            self._reserve(self.filled + take)
            pool_store(chunk[done:done + take], self.buffer, torch.arange(self.filled, self.filled + take), self.scales)
            self.filled, done, self.count = self.filled + take, done + take, self.count + take
            if self.filled == self.shard_rows:
                self._flush()

    def _reserve(self, rows: int) -> None:
        """Room for `rows` rows, grown as rows come (doubling, at most shard_rows): a shard_rows far
        above the rows written (1e8 rows of 1280 features: 256 GB) never reserves what it won't use."""
        if rows <= self.buffer.shape[0]:
            return
        grown = min(self.shard_rows, max(rows, 2 * self.buffer.shape[0]))
        buffer = torch.empty((grown, self.width), dtype=self.buffer.dtype)
        buffer[:self.filled] = self.buffer[:self.filled]
        self.buffer = buffer
        if self.scales is not None:
            scales = torch.empty(grown, dtype=torch.float32)
            scales[:self.filled] = self.scales[:self.filled]
            self.scales = scales

    def close(self) -> None:
        if self.filled:
            self._flush()

    def _flush(self) -> None:
        shard = len(self.entries)
        entry = {"rows": [self.count - self.filled, self.count]}
        if self.scales is not None:
            entry["scales"] = self._write(store.scales_file(shard, self.key),
                                          store.npy_bytes(self.scales[:self.filled].numpy()))
        entry["features"] = self._write(store.features_file(shard, self.key),
                                        store.npy_bytes(to_numpy_storage(self.buffer[:self.filled])))
        self.entries.append(entry)
        self.filled = 0

    def _write(self, name: str, data: bytes) -> dict:
        files.write_atomic(os.path.join(self.directory, name), data)
        self.written += len(data)
        return file_entry(self.directory, name, data)


def _write_records(directory: str, shards: _ShardWriter, labels: np.ndarray, ids, fingerprint, classes,
                   dtype: str) -> int:
    """labels.npy, samples.json and, last, the manifest; the bytes written."""
    identity = store.sha256_bytes(files.json_bytes({"labels": store.sha256_bytes(labels.tobytes()), "samples": ids,
                                                    "shards": [e["features"]["sha256"] for e in shards.entries]}))
    label_bytes = store.npy_bytes(labels)
    files.write_atomic(os.path.join(directory, store.LABELS), label_bytes)
    sample_bytes = (json.dumps(ids, indent=2, sort_keys=True) + "\n").encode()
    files.write_atomic(os.path.join(directory, store.SAMPLES), sample_bytes)
    manifest = {"fingerprint": _write_fingerprint(fingerprint, classes, dtype, shards.width, shards.count,
                                                  shards.shard_rows, identity),
                "count": shards.count, "shards": shards.entries,
                "files": {"labels": file_entry(directory, store.LABELS, label_bytes),
                          "samples": file_entry(directory, store.SAMPLES, sample_bytes)},
                "skipped": []}
    finish(directory, manifest)
    return len(label_bytes) + len(sample_bytes)
