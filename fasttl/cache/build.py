"""Building a feature cache: the frozen backbone runs once per image, shard by shard. Resumable
(finished shards are kept), guarded by a writer lock, and split across ranks under torchrun."""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
from typing import Optional, Union

import numpy as np
import torch
import torch.distributed as dist

from fasttl.util import files
from fasttl._version import __version__
from fasttl.cache import engines, store
from fasttl.cache.format import (identities, manifest_sha256, mismatch_message, npy_header, record_verified,
                                 storage_dtypes, to_numpy_storage, validate_manifest)
from fasttl.cache.store import CacheError
from fasttl.cache.kernels import CACHE_DTYPE, CACHE_DTYPES, pool_store
from fasttl.data import ImageLoader, TransformSpec
from fasttl.data import screen as screen_source
from fasttl.data.sources import ON_ERROR, ArraySource, FileSource, TarSource


SHARD_ROWS = 4096  # rows per shard file of a built cache: ~1-8 MB shards at typical widths


def compute_settings(device: torch.device, engine: str = "auto", precision: str = "auto") -> dict:
    """How the backbone runs during extraction (engine and precision resolved); part of the
    fingerprint, since it changes the bits."""
    engine, precision = engines.resolve(engine, precision, device)
    return {"device": device.type, "engine": engine, "precision": precision, "memory_format": "channels_last",
            "batchnorm": "folded"}


def fingerprint(backbone, source: Union[FileSource, ArraySource], spec: TransformSpec, dtype: str, backend: str,
                shard_rows: int, device: torch.device = torch.device("cpu"), taps: int = 0, engine: str = "auto",
                precision: str = "auto") -> dict:
    """Everything the cache's content depends on; a cache only serves a request with an equal one.
    "layout" names the pooled maps each row concatenates, in order (the last `taps` stages, then
    the backbone's final map) and their widths."""
    channels = backbone.tap_channels()[-(taps + 1):]
    return {
        "compute": compute_settings(device, engine, precision),
        "backbone": {"name": backbone.name, "weights_sha256": backbone.weights_hash()},
        "layout": {"taps": int(taps), "channels": [int(c) for c in channels]},
        "preprocessing": dict(spec.as_dict(), backend=backend),
        "dataset": {"identity": source.identity(), "count": len(source), "classes": list(source.classes)},
        "dtype": dtype,
        "feature_dim": int(sum(channels)),
        "shard_rows": int(shard_rows),
        "fasttl_version": __version__,
        "format": store.FORMAT_VERSION,
    }


def extraction_model(backbone, device: torch.device):
    """The copy of `backbone` extraction runs: frozen, batch norms folded into the convolutions,
    channels_last (oneDNN's convolutions run about 1.5x faster on NHWC on this class of CPU,
    the folding 1.25x more)."""
    return backbone.for_extraction().to(device, memory_format=torch.channels_last)


def extraction_engine(backbone, device: torch.device, engine: str, precision: str, taps: int, image_size: int,
                      engine_dir: Optional[str] = None, verify_images: Optional[torch.Tensor] = None):
    """The engine (resolved: see engines.resolve) over the extraction copy of `backbone`; an
    exported ONNX graph is kept in `engine_dir` when given, and checked on `verify_images`."""
    name = engines.onnx_file_name(backbone, taps, image_size) if engine == "onnxruntime" else None
    model = extraction_model(backbone, device)
    return engines.create(engine, precision, model, taps, device, image_size, name, engine_dir, verify_images)


VERIFY_IMAGES = 4  # real images of the data an ONNX graph is checked on before it extracts


def verification_images(source, spec) -> torch.Tensor:
    """The first few images of `source`, preprocessed as extraction will preprocess them."""
    count = min(VERIFY_IMAGES, len(source))
    return torch.cat([x for x, _ in ImageLoader(source.subset(range(count)), spec, count, backend="torch")])


def default_batch_size(device: torch.device) -> int:
    return 128 if device.type == "cuda" else 32


def rank_and_world():
    """(rank, world size) of the torchrun process group, (0, 1) outside one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_ranks_agree(ok: bool, message: str, world: int, error=CacheError) -> None:
    """Raises `error` on every rank if any rank failed, so no rank waits forever at a barrier."""
    if world == 1:
        if not ok:
            raise error(message)
        return
    results = [None] * world
    dist.all_gather_object(results, (ok, message))
    for rank_ok, rank_message in results:
        if not rank_ok:
            raise error(rank_message)


def store_maps(maps, cache: torch.Tensor, rows: torch.Tensor, scales: Optional[torch.Tensor]) -> None:
    """Pools each map (N, C_k, H_k, W_k), or takes pooled (N, C_k) as it is, and stores their
    concatenation in cache[rows]: one map straight into the cache; several each into an fp32
    block of a row buffer first, so an int8 row gets one scale for the whole vector."""
    if len(maps) == 1:
        pool_store(maps[0], cache, rows, scales)
        return
    n = maps[0].shape[0]
    pooled = torch.empty((n, sum(m.shape[1] for m in maps)), dtype=torch.float32, device=cache.device)
    local = torch.arange(n, device=cache.device)
    column = 0
    for feature_map in maps:
        block = torch.empty((n, feature_map.shape[1]), dtype=torch.float32, device=cache.device)
        pool_store(feature_map, block, local)
        pooled[:, column:column + block.shape[1]] = block
        column += block.shape[1]
    pool_store(pooled, cache, rows, scales)


@torch.no_grad()
def extract_features(engine, source, spec, dtype: torch.dtype, feature_dim: int, batch_size: int,
                     device: torch.device, backend: str = "auto", progress=None):
    """(features (len(source), feature_dim) in the cache dtype, per-row scales for int8 or None),
    on `device`: every image of `source` through `engine`, pooled and stored in order.
    `progress`: a tqdm bar to advance."""
    rows = len(source)
    features = torch.empty((rows, feature_dim), dtype=dtype, device=device)
    scales = torch.empty(rows, dtype=torch.float32, device=device) if dtype == torch.int8 else None
    written = 0
    for images, _ in ImageLoader(source, spec, batch_size, backend=backend, device=device):
        n = images.shape[0]
        store_maps(engine(images), features, torch.arange(written, written + n, device=device), scales)
        written += n
        if progress is not None:
            progress.update(n)
    return features, scales


def _extract_shard(engine, source, spec, shard: int, shard_rows: int, dtype: torch.dtype, feature_dim: int,
                   batch_size: int, device: torch.device, backend: str, progress) -> dict:
    start = shard * shard_rows
    stop = min(len(source), start + shard_rows)
    features, scales = extract_features(engine, source.subset(range(start, stop)), spec, dtype, feature_dim,
                                        batch_size, device, backend, progress)
    if dtype == torch.float16 and not bool(torch.isfinite(features).all()):
        raise CacheError(f"features: the backbone's features of shard {shard} overflow fp16 (above 65504, or not "
                         "finite); build with --dtype bf16 or fp32")
    return {"features": to_numpy_storage(features), "scales": None if scales is None else scales.cpu().numpy()}


def screen(source, on_error: str):
    """The source to extract and the (path, reason) of each sample left out (fasttl.data.screen:
    with "skip", every file is decoded once before extraction and those that do not are left out;
    with "fail" the source is used as it is and a bad file stops the build, named)."""
    if on_error == "skip":
        source = screen_source(source, "skip")
    return source, list(getattr(source, "skipped", None) or [])


def _screen_as_recorded(data, manifest: Optional[dict]):
    """The screened source a finished cache recorded for the same raw source, without decoding
    every file again; None when the manifest does not record a screening of `data`."""
    screening = (manifest or {}).get("screening")
    if not isinstance(screening, dict) or not isinstance(data, (FileSource, TarSource)):
        return None
    if screening.get("on_error") != "skip" or screening.get("source") != data.identity():
        return None
    reasons = {s["path"]: s["reason"] for s in manifest.get("skipped", [])}
    ids = data.sample_ids()
    keep = [i for i, sample in enumerate(ids) if sample not in reasons]
    source = data.subset(keep)
    names = data.files if isinstance(data, FileSource) else ids  # as screen() lists them
    source.skipped = list(data.skipped) + [(names[i], reasons[ids[i]]) for i in range(len(ids))
                                           if ids[i] in reasons]
    return source


def _skipped_records(source, skipped) -> list:
    root = getattr(source, "root", "")
    return [{"path": os.path.relpath(path, root) if root and os.path.isabs(path) else str(path), "reason": str(reason)}
            for path, reason in skipped]


def _read_state(out_dir: str, wanted: dict, overwrite: bool) -> Optional[dict]:
    """The finished manifest when it matches `wanted` (and overwrite is off), else None. A
    manifest or build record that is unreadable, malformed or for other settings is a CacheError
    naming it, unless `overwrite` (the build then replaces it). Reads only."""
    records = {}
    for name in (store.MANIFEST, store.BUILD):
        path = os.path.join(out_dir, name)
        try:
            record = store.read_record(path)
            if record is not None and name == store.MANIFEST:
                validate_manifest(record, path)
            elif record is not None and (not isinstance(record, dict) or not isinstance(record.get("fingerprint"),
                                                                                          dict)):
                raise CacheError(f"{path}: not a build record (no fingerprint object); {store.REBUILD_HINT}")
        except CacheError:
            if overwrite:
                continue
            raise
        records[name] = record
    if overwrite:
        return None
    # An unfinished build for other settings is replaced: its shards carry their fingerprint's key
    # in their names, so they stay on disk (and serve again if those settings come back).
    manifest = records.get(store.MANIFEST)
    if manifest is not None and manifest["fingerprint"] != wanted:
        raise CacheError(mismatch_message(out_dir, manifest["fingerprint"], wanted))
    return manifest


def _check_labels(source) -> np.ndarray:
    labels = np.asarray(source.labels)
    if labels.ndim != 1 or len(labels) != len(source) or (labels.size and labels.dtype.kind not in "iu"):
        raise ValueError(f"data: labels of shape {labels.shape} and dtype {labels.dtype} (expected {len(source)} "
                         "integers)")
    labels = labels.astype(np.int64)
    classes = len(source.classes)
    if labels.size and (labels.min() < 0 or labels.max() >= classes):
        bad = int(np.flatnonzero((labels < 0) | (labels >= classes))[0])
        raise ValueError(f"data: sample {bad} has label {labels[bad]}, outside the {classes} classes [0, {classes})")
    return labels


def _shard_ready(out_dir: str, s: int, key: str, rows: int, dtype: str, feature_dim: int) -> bool:
    """Whether shard `s` of this fingerprint is already on disk, whole: plain files whose .npy
    headers hold the expected dtype and shape and whose sizes hold exactly that data."""
    files = [(store.features_file(s, key), storage_dtypes(CACHE_DTYPES[dtype]), (rows, feature_dim))]
    if dtype == "int8":
        files.append((store.scales_file(s, key), (np.dtype(np.float32),), (rows,)))
    for name, dtypes, shape in files:
        path = os.path.join(out_dir, name)
        try:
            info = store.regular_file(path)
            if info is None:
                return False
            with store.open_regular(path) as f:
                npy_header(f, path, info.st_size, dtypes, shape)
        except CacheError:
            return False
    return True


def _all_ranks(flag: bool, world: int) -> bool:
    if world == 1:
        return flag
    results = [None] * world
    dist.all_gather_object(results, flag)
    return all(results)


def build_cache(backbone, data: Union[FileSource, ArraySource], out_dir: str, *, dtype: str = CACHE_DTYPE,
                batch_size: Optional[int] = None, device: Union[str, torch.device] = "cpu",
                image_size: Optional[int] = None, shard_rows: int = SHARD_ROWS, overwrite: bool = False,
                backend: str = "auto", progress: bool = True, mirror: bool = False, on_error: str = "fail",
                taps: int = 0, engine: str = "auto", precision: str = "auto",
                engine_dir: Optional[str] = None) -> dict:
    """Runs the frozen ``backbone`` (eval, no grad, batch norms folded) over ``data`` and stores
    its pooled features, labels and sample ids in ``out_dir``.

    * ``taps``: 0 stores the final feature map's pooled vector; K > 0 (multi-stage features)
      stores the pooled maps of the last K intermediate stages and the final map, concatenated
      (``backbone.tapped_dim(K)`` columns; the layout is in the fingerprint).
    * ``engine``: ``"torch"``, ``"onnxruntime"`` (CPU: the folded backbone and its pooling
      exported once, kept as ``.onnx`` beside the cache folder) or ``"auto"``; ``precision``
      ``"fp32"``, ``"bf16"`` (autocast) or ``"auto"`` (bf16 on CUDA, fp32 on the CPU): see
      :func:`fasttl.cache.engines.resolve`. Both are in the fingerprint. ``engine_dir``: a folder
      where the exported ONNX graph is kept for later builds (the run job's cache family folder,
      `fasttl extract`'s --out); without one it is exported once per process (under a second).

    * ``dtype``: cache dtype, ``"fp32"``, ``"fp16"``, ``"bf16"`` or ``"int8"`` (per-row fp32 scale).
    * ``batch_size``: images per backbone call; default 32 on CPU (larger batches ran slower
      there: their activations outgrow the allocator's reuse), 128 on GPU.
    * ``mirror``: features of the horizontally mirrored images (a second view of each sample).
    * ``on_error``: ``"fail"`` (default): an image that does not decode stops the build with an
      error naming it. ``"skip"``: every file is decoded once before extraction and those that do
      not decode are left out; they are listed (path, reason) under ``"skipped"`` in the manifest
      and counted in ``cache.last_build["skipped"]``.
    * Shards of ``shard_rows`` rows are written to a temporary name, fsynced and renamed; the
      manifest (with the SHA-256 and size of every file: shards, labels, sample ids; and the
      fingerprint) comes last. Shard names carry a hash of the fingerprint, so shards left by a
      build for other settings are never taken for this one's.
    * Running the same build again after an interruption (Ctrl-C, kill -9) keeps the finished
      shards; the result is byte-identical to an uninterrupted build. A finished cache with the
      same fingerprint is opened read-only as it is (no lock, nothing written: it works on
      read-only storage); another fingerprint is an error unless ``overwrite``.
    * A second writer on the same directory fails at once (lock file ``.lock``).
    * ``overwrite`` removes only the cache's own files (records, labels, sample ids, shards,
      fasttl's temporaries); any other file in the folder is left alone.
    * Under torchrun (an initialized process group) rank r builds shards r, r + world, ...;
      rank 0 writes labels, sample ids and the manifest after a barrier.

    Returns what it did (``directory``, ``reused``, ``images``, ``seconds``, ``images_per_second``,
    ``bytes_written``, ``shards_built``, ``shards_reused``, ``skipped``); ``FeatureCache.build``
    calls it and opens the result.
    """
    _check_options(dtype, shard_rows, on_error)
    device = torch.device(device)
    batch_size = default_batch_size(device) if batch_size is None else batch_size
    rank, world = rank_and_world()
    out_dir = os.path.abspath(os.path.expanduser(out_dir))
    spec = TransformSpec.for_backbone(backbone.preprocessing, size=image_size, mirror=mirror)
    source, skipped = _screened(data, out_dir, on_error)
    resolved_backend = ImageLoader(source, spec, batch_size, backend=backend).backend
    backbone.check_taps(taps)
    wanted = fingerprint(backbone, source, spec, dtype, resolved_backend, shard_rows, device, taps, engine, precision)
    labels = _check_labels(source)
    _refuse_foreign(out_dir, beside_other_files=True)  # read-only: before a manifest there is read or anything written
    finished = _finished(out_dir, wanted, overwrite, world)  # read-only, without the lock
    if finished is not None:
        return _reused(out_dir, finished)
    os.makedirs(out_dir, exist_ok=True)
    with contextlib.ExitStack() as stack:
        _take_lock(stack, out_dir, rank, world)
        finished = _finished(out_dir, wanted, overwrite, world)  # what another writer finished meanwhile
        if finished is not None:
            return _reused(out_dir, finished)
        if rank == 0:
            if overwrite:
                store.remove_cache_files(out_dir)
            store.remove_stale_temporaries(out_dir)
            files.write_json_atomic(os.path.join(out_dir, store.BUILD), {"fingerprint": wanted})
        if world > 1:
            dist.barrier()
        key = store.fingerprint_key(wanted)
        run = dict(engine=wanted["compute"]["engine"], precision=wanted["compute"]["precision"], taps=taps,
                   image_size=spec.size, engine_dir=engine_dir)
        result = _extract_missing(backbone, source, spec, out_dir, key, dtype, shard_rows, batch_size, device,
                                  resolved_backend, progress, rank, world, run, wanted["feature_dim"])
        if rank == 0:
            screened = on_error == "skip" and isinstance(data, (FileSource, TarSource))
            screening = {"on_error": on_error, "source": data.identity()} if screened else None
            shards = math.ceil(len(source) / shard_rows)
            result["bytes_written"] += _write_manifest(out_dir, source, labels, wanted, key, shards, skipped,
                                                       screening, result.pop("engine_graph", None))
        if world > 1:
            dist.barrier()
        return dict(result, directory=out_dir, reused=False, skipped=len(skipped))


def _check_options(dtype: str, shard_rows: int, on_error: str) -> None:
    if dtype not in CACHE_DTYPES:
        raise ValueError(f"dtype: expected one of {sorted(CACHE_DTYPES)}, got {dtype!r}")
    if not isinstance(shard_rows, int) or shard_rows < 1:
        raise ValueError(f"shard_rows: expected a positive integer, got {shard_rows!r}")
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error: expected one of {ON_ERROR}, got {on_error!r}")


def _screened(data, out_dir: str, on_error: str):
    """(source, skipped): with "skip", a finished cache that recorded its screening of this very
    source spares the decode of every file."""
    if on_error == "skip" and os.path.isdir(out_dir):
        with contextlib.suppress(CacheError):
            path = os.path.join(out_dir, store.MANIFEST)
            source = _screen_as_recorded(data, validate_manifest(store.read_record(path), path))
            if source is not None:
                return source, source.skipped
    return screen(data, on_error)


def _finished(out_dir: str, wanted: dict, overwrite: bool, world: int) -> Optional[dict]:
    """The finished manifest of `wanted` when every rank sees it (and overwrite is off), else None;
    a record for other settings is a CacheError on every rank."""
    ok, message, finished = True, "", None
    try:
        finished = _read_state(out_dir, wanted, overwrite) if os.path.isdir(out_dir) else None
    except CacheError as exc:
        ok, message = False, str(exc)
    _all_ranks_agree(ok, message, world)
    return finished if _all_ranks(finished is not None, world) else None


def _take_lock(stack: contextlib.ExitStack, out_dir: str, rank: int, world: int) -> None:
    """Rank 0 holds the writer lock until `stack` closes; any rank's failure stops every rank."""
    ok, message, error = True, "", store.CacheLockedError
    try:
        if rank == 0:
            stack.enter_context(store.WriterLock(out_dir))
    except (store.CacheLockedError, CacheError) as exc:
        ok, message, error = False, str(exc), type(exc)
    _all_ranks_agree(ok, message, world, error)


def _extract_missing(backbone, source, spec, out_dir: str, key: str, dtype: str, shard_rows: int, batch_size: int,
                     device: torch.device, backend: str, progress: bool, rank: int, world: int, run: dict,
                     feature_dim: int) -> dict:
    """Extracts this rank's shards (r, r + world, ...) that are not on disk yet; returns the
    counts summed over ranks. `run`: the resolved engine, precision, taps, size and .onnx path."""
    shards = math.ceil(len(source) / shard_rows)
    rows = [min(len(source), (s + 1) * shard_rows) - s * shard_rows for s in range(shards)]
    mine = [s for s in range(shards) if s % world == rank]
    todo = [s for s in mine if not _shard_ready(out_dir, s, key, rows[s], dtype, feature_dim)]
    images = sum(rows[s] for s in todo)
    bar = _progress_bar(images, rank, world) if progress and images else None
    verify = verification_images(source, spec) if todo and run["engine"] == "onnxruntime" else None
    engine = extraction_engine(backbone, device, **run, verify_images=verify) if todo else None
    started, written_bytes = time.perf_counter(), 0
    try:
        for s in todo:
            arrays = _extract_shard(engine, source, spec, s, shard_rows, CACHE_DTYPES[dtype], feature_dim, batch_size,
                                    device, backend, bar)
            if arrays["scales"] is not None:
                scale_bytes = store.npy_bytes(arrays["scales"])
                files.write_atomic(os.path.join(out_dir, store.scales_file(s, key)), scale_bytes)
                written_bytes += len(scale_bytes)
            # The features file goes last: its presence marks the shard finished.
            feature_bytes = store.npy_bytes(arrays["features"])
            files.write_atomic(os.path.join(out_dir, store.features_file(s, key)), feature_bytes)
            written_bytes += len(feature_bytes)
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - started
    counts = [images, written_bytes, len(todo), len(mine) - len(todo)]
    if world > 1:
        # nccl reduces only GPU tensors, gloo CPU ones.
        totals = torch.tensor(counts, dtype=torch.float64, device=device if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(totals)
        counts = [int(v) for v in totals.tolist()]
        dist.barrier()
    graph = getattr(engine, "graph_sha256", None)
    return {"images": counts[0], "seconds": seconds, "images_per_second": counts[0] / seconds if seconds > 0 else 0.0,
            "bytes_written": counts[1], "shards_built": counts[2], "shards_reused": counts[3],
            "engine_graph": {"file": engine.name, "bytes": engine.graph_bytes, "sha256": graph} if graph else None}


def _reused(out_dir: str, manifest: dict) -> dict:
    """What a build that found its cache finished did: nothing."""
    return {"directory": out_dir, "reused": True, "images": 0, "seconds": 0.0, "images_per_second": 0.0,
            "bytes_written": 0, "shards_built": 0, "shards_reused": len(manifest["shards"]),
            "skipped": len(manifest.get("skipped", []))}


def _file_entry(out_dir: str, name: str, data: Optional[bytes] = None) -> dict:
    path = os.path.join(out_dir, name)
    if data is None:
        info = store.regular_file(path)
        if info is None:
            raise CacheError(f"{path}: shard missing after every rank finished")
        return {"file": name, "bytes": info.st_size, "sha256": store.sha256_file(path)}
    return {"file": name, "bytes": len(data), "sha256": store.sha256_bytes(data)}


def _write_manifest(out_dir: str, source, labels: np.ndarray, wanted: dict, key: str, shards: int, skipped,
                    screening: Optional[dict], engine_graph: Optional[dict] = None) -> int:
    label_bytes = store.npy_bytes(labels)
    files.write_atomic(os.path.join(out_dir, store.LABELS), label_bytes)
    sample_bytes = (json.dumps(source.sample_ids(), indent=2, sort_keys=True) + "\n").encode()
    files.write_atomic(os.path.join(out_dir, store.SAMPLES), sample_bytes)
    entries = []
    for s in range(shards):
        entry = {"rows": [s * wanted["shard_rows"], min(len(source), (s + 1) * wanted["shard_rows"])],
                 "features": _file_entry(out_dir, store.features_file(s, key))}
        if wanted["dtype"] == "int8":
            entry["scales"] = _file_entry(out_dir, store.scales_file(s, key))
        entries.append(entry)
    manifest = {"fingerprint": wanted, "count": len(source), "shards": entries,
                "files": {"labels": _file_entry(out_dir, store.LABELS, label_bytes),
                          "samples": _file_entry(out_dir, store.SAMPLES, sample_bytes)},
                "skipped": _skipped_records(source, skipped)}
    if screening is not None:
        manifest["screening"] = screening
    if engine_graph is not None:  # the ONNX graph that extracted these shards (verified on real images)
        manifest["engine_graph"] = engine_graph
    _finish(out_dir, manifest)
    return len(label_bytes) + len(sample_bytes)


def _finish(out_dir: str, manifest: dict) -> None:
    """Writes the manifest (last: its presence marks the cache finished), drops the build record
    and records every listed file as verified: its checksum was just taken from what was written."""
    files.write_json_atomic(os.path.join(out_dir, store.MANIFEST), manifest)
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(out_dir, store.BUILD))
    record_verified(out_dir, manifest_sha256(out_dir), identities(out_dir, manifest))


def _write_fingerprint(fingerprint: Optional[dict], classes, dtype: str, feature_dim: int, count: int,
                       shard_rows: int, identity: str) -> dict:
    return {"source": "FeatureCache.write", "user": fingerprint or {},
            "dataset": {"identity": identity, "count": count, "classes": list(classes)},
            "dtype": dtype, "feature_dim": int(feature_dim), "shard_rows": int(shard_rows),
            "fasttl_version": __version__, "format": store.FORMAT_VERSION}


def check_fits(rows: torch.Tensor, cache_dtype: torch.dtype, what: str) -> None:
    """A cache dtype must hold every value it is given: fp16 turns a feature above 65504 into inf
    (bf16 one above 3.39e38), which training would only report later as a diverged run blamed on
    its learning rate."""
    if cache_dtype == torch.bfloat16 and rows.numel() and not bool(torch.isfinite(rows.to(cache_dtype)).all()):
        raise CacheError(f"{what}: a value of magnitude {float(rows.abs().max()):.4g} overflows bf16 (largest "
                         f"{torch.finfo(torch.bfloat16).max:.4g}); store it as fp32 (dtype='fp32'), or scale the features")
    if cache_dtype != torch.float16 or not rows.numel():
        return
    fp16 = torch.finfo(torch.float16)
    magnitudes = rows.reshape(len(rows), -1).abs().amax(dim=1)
    largest = float(magnitudes.max())
    if largest > fp16.max:
        raise CacheError(f"{what}: a value of magnitude {largest:.4g} overflows fp16 (largest {fp16.max:g}); "
                         "store it as bf16 or fp32 (dtype='bf16', or --cache-dtype/--dtype bf16), or scale the features")
    # A row whose every value is below fp16's smallest normal number keeps a few bits at most (and
    # is zeros below 6e-8): a whole image's features lost without a word.
    faint = ((magnitudes > 0) & (magnitudes < fp16.tiny)).nonzero()
    if len(faint):
        row = int(faint[0])
        raise CacheError(f"{what}: row {row}'s values are all below {fp16.tiny:.3g} in magnitude (largest "
                         f"{float(magnitudes[row]):.3g}) and would lose their precision or become zeros in fp16; "
                         "scale the features, or store them as bf16 or fp32 (dtype='bf16')")


def _foreign_entries(directory: str) -> list:
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
            own = store.is_own_file(name)
        if not own:
            foreign.append(name)
    return foreign


def _is_fasttl_record(path: str) -> bool:
    try:
        record = files.read_json(path)
    except ValueError:
        return False
    return isinstance(record, dict) and isinstance(record.get("fingerprint"), dict)


def _refuse_foreign(directory: str, beside_other_files: bool) -> None:
    """Never makes a folder of someone else's files a cache, with or without overwrite. A file of
    the user's under a name the cache writes (labels.npy, manifest.json, ...) is always refused;
    `beside_other_files`: files under other names may stay beside the cache (the build keeps
    them), else only beside a cache fasttl already wrote there (FeatureCache.write)."""
    foreign = _foreign_entries(directory)
    holds_cache = os.path.isfile(os.path.join(directory, store.MANIFEST)) and store.MANIFEST not in foreign
    clobbered = [name for name in foreign if name in (store.MANIFEST, store.BUILD, store.LABELS, store.SAMPLES)]
    if clobbered or (foreign and not beside_other_files and not holds_cache):
        shown = ", ".join(foreign[:3] if not beside_other_files else clobbered[:3])
        raise CacheError(f"{directory}: holds files that are not a fasttl cache's ({shown}); write to an empty or new "
                         "folder")


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
        largest = float(chunk.abs().max()) if chunk.numel() else 0.0
        chunk = chunk.float()
        if not bool(torch.isfinite(chunk).all()):
            raise ValueError(f"chunks: chunk {index} holds a value of magnitude {largest:.4g}, beyond float32's "
                             f"{torch.finfo(torch.float32).max:.4g} (every cache dtype's range); scale the features")
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
    if dtype not in CACHE_DTYPES:
        raise ValueError(f"dtype: expected one of {sorted(CACHE_DTYPES)}, got {dtype!r}")
    if not isinstance(shard_rows, int) or isinstance(shard_rows, bool) or shard_rows < 1:
        raise ValueError(f"shard_rows: expected a positive integer, got {shard_rows!r}")
    classes = list(classes) if not isinstance(classes, str) else None
    if not classes or not all(isinstance(c, str) and c and c.isprintable() for c in classes) \
            or len(set(classes)) != len(classes):
        raise ValueError("classes: expected a list of distinct, printable class names (strings)")
    if fingerprint is not None:
        if not isinstance(fingerprint, dict):
            raise ValueError(f"fingerprint: expected a dict (JSON object), got {type(fingerprint).__name__}")
        try:
            files.json_bytes(fingerprint)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"fingerprint: not JSON-serializable ({exc})") from None
    labels = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)
    if labels.ndim != 1 or (labels.size and labels.dtype.kind not in "iu"):
        raise ValueError(f"labels: expected one integer per row, got {labels.dtype} of shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= len(classes)):  # before the cast: uint64 2**63 stays
        bad = int(np.flatnonzero((labels < 0) | (labels >= len(classes)))[0])
        raise ValueError(f"labels: row {bad} has label {labels[bad]}, outside the {len(classes)} classes "
                         f"[0, {len(classes)})")
    labels = labels.astype(np.int64)
    if sample_ids is not None:
        sample_ids = list(sample_ids)
        if not all(isinstance(s, str) and s for s in sample_ids):
            bad = next(s for s in sample_ids if not (isinstance(s, str) and s))
            raise ValueError(f"sample_ids: expected one non-empty string per row, got {bad!r}")
        if len(sample_ids) != len(labels):
            raise ValueError(f"sample_ids: {len(sample_ids)} ids for {len(labels)} labels (expected one per row)")
        if len(set(sample_ids)) != len(sample_ids):
            raise ValueError("sample_ids: an id names two rows (expected one id per row, each once)")
    directory = os.path.abspath(os.path.expanduser(directory))
    cache_dtype = CACHE_DTYPES[dtype]
    if os.path.lexists(directory) and not os.path.isdir(directory):
        raise CacheError(f"{directory}: is a file, not a folder; write the cache to a folder")
    os.makedirs(directory, exist_ok=True)
    _refuse_foreign(directory, beside_other_files=False)
    with store.WriterLock(directory):
        if store.regular_file(os.path.join(directory, store.MANIFEST)) is not None and not overwrite:
            raise CacheError(f"{directory}: already holds a cache; write to another directory, or pass "
                             "overwrite=True to replace it")
        store.remove_cache_files(directory)  # an interrupted write's shards, or the cache replaced
        store.remove_stale_temporaries(directory)
        # Shard names carry a key of what is known before the first row: this write's settings.
        header = {"write": _write_fingerprint(fingerprint, classes, dtype, 0, 0, shard_rows, ""),
                  "started": time.time_ns(), "pid": os.getpid()}
        key = store.fingerprint_key(header)
        files.write_json_atomic(os.path.join(directory, store.BUILD), {"fingerprint": header})
        entries, written, count, width = [], 0, 0, None
        buffer = scales = None
        filled = 0

        def flush():
            nonlocal written, filled
            shard = len(entries)
            entry = {"rows": [count - filled, count]}
            if scales is not None:
                data = store.npy_bytes(scales[:filled].numpy())
                files.write_atomic(os.path.join(directory, store.scales_file(shard, key)), data)
                entry["scales"] = _file_entry(directory, store.scales_file(shard, key), data)
                written += len(data)
            data = store.npy_bytes(to_numpy_storage(buffer[:filled]))
            files.write_atomic(os.path.join(directory, store.features_file(shard, key)), data)
            entry["features"] = _file_entry(directory, store.features_file(shard, key), data)
            written += len(data)
            entries.append(entry)
            filled = 0

        for index, chunk in enumerate(chunks):
            chunk = _as_rows(chunk, index)
            if width is None:
                width = chunk.shape[1]
                if width < 1:
                    raise ValueError(f"chunks: chunk {index} has no columns (expected D >= 1 features per row)")
                buffer = torch.empty((shard_rows, width), dtype=cache_dtype)
                scales = torch.empty(shard_rows, dtype=torch.float32) if dtype == "int8" else None
            elif chunk.shape[1] != width:
                raise ValueError(f"chunks: chunk {index} has {chunk.shape[1]} columns, the first had {width}")
            check_fits(chunk, cache_dtype, f"chunks: chunk {index}")
            done = 0
            while done < chunk.shape[0]:
                take = min(shard_rows - filled, chunk.shape[0] - done)
                rows = torch.arange(filled, filled + take)
                pool_store(chunk[done:done + take], buffer, rows, scales)
                filled, done, count = filled + take, done + take, count + take
                if filled == shard_rows:
                    flush()
        if filled:
            flush()
        if count != len(labels):
            raise ValueError(f"labels: {len(labels)} labels for {count} rows of features (expected one per row)")
        if count == 0:
            raise ValueError("chunks: no rows (expected at least one (n, D) chunk with n >= 1)")
        ids = sample_ids if sample_ids is not None else [str(i) for i in range(count)]
        identity = store.sha256_bytes(files.json_bytes({"labels": store.sha256_bytes(labels.tobytes()),
                                                        "samples": ids, "shards": [e["features"]["sha256"]
                                                                                   for e in entries]}))
        label_bytes = store.npy_bytes(labels)
        files.write_atomic(os.path.join(directory, store.LABELS), label_bytes)
        sample_bytes = (json.dumps(ids, indent=2, sort_keys=True) + "\n").encode()
        files.write_atomic(os.path.join(directory, store.SAMPLES), sample_bytes)
        manifest = {"fingerprint": _write_fingerprint(fingerprint, classes, dtype, width, count, shard_rows, identity),
                    "count": count, "shards": entries,
                    "files": {"labels": _file_entry(directory, store.LABELS, label_bytes),
                              "samples": _file_entry(directory, store.SAMPLES, sample_bytes)},
                    "skipped": []}
        _finish(directory, manifest)
    written += len(label_bytes) + len(sample_bytes)
    return {"directory": directory, "rows": count, "shards": len(entries), "bytes_written": written,
            "seconds": time.perf_counter() - started}


def _progress_bar(total: int, rank: int, world: int):
    from tqdm import tqdm

    label = "extract" if world == 1 else f"extract rank {rank}/{world}"
    return tqdm(total=total, unit="img", desc=label, position=rank if world > 1 else None, dynamic_ncols=True,
                smoothing=0.1)
