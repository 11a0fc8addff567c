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
from fasttl.util.distributed import rank_and_world
from fasttl._version import __version__
from fasttl.cache import store
from fasttl.cache.format import mismatch_message, npy_header, storage_dtypes, to_numpy_storage, validate_manifest
from fasttl.cache.store import CacheError
from fasttl.cache.kernels import CACHE_DTYPE, CACHE_DTYPES
from fasttl.data import ImageLoader, TransformSpec
from fasttl.data import screen as screen_source
from fasttl.data.sources import ON_ERROR, ArraySource, FileSource, image_folders
from fasttl.cache.extraction import (VERIFY_IMAGES, calibration_key, calibration_sample, compute_settings,
                                     default_batch_size, extract_features, extraction_engine, verification_images)
from fasttl.cache import engines
from fasttl.cache.folder import file_entry, finish, refuse_foreign
from fasttl.util.checks import a_flag, plain_number, positive_int, torch_device
from fasttl.data.spec import check_image_size


SHARD_ROWS = 4096  # rows per shard file of a built cache: ~1-8 MB shards at typical widths


def fingerprint(backbone, source: Union[FileSource, ArraySource], spec: TransformSpec, dtype: str, backend: str,
                shard_rows: int, device: torch.device = torch.device("cpu"), taps: int = 0, engine: str = "auto",
                precision: str = "auto", calibration: Optional[str] = None) -> dict:
    """Everything the cache's content depends on; a cache only serves a request with an equal one.
    "layout" names the pooled maps each row concatenates, in order (the last `taps` stages, then
    the backbone's final map) and their widths."""
    channels = backbone.tapped_channels(taps)
    return {
        "compute": compute_settings(device, engine, precision, calibration),
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


def _check_engine_dir(engine_dir: Optional[str], source) -> None:
    """Where the exported graph is kept: never inside a fasttl run folder nor among the images."""
    if engine_dir is None:
        return
    holder = files.enclosing_run_folder(engine_dir)
    among = next((folder for folder in image_folders(source) if files.is_inside(engine_dir, folder)), None)
    if holder is not None or among is not None:
        where = f"the fasttl run folder {holder}" if holder is not None else f"the data folder {among}"
        raise CacheError(f"engine_dir: {os.path.abspath(engine_dir)} is inside {where}; keep the engine graph in a "
                         "folder of its own (beside the cache)")


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
    if not isinstance(screening, dict) or not data.encoded:
        return None
    if screening.get("on_error") != "skip" or screening.get("source") != data.identity():
        return None
    reasons = {s["path"]: s["reason"] for s in manifest.get("skipped", [])}
    ids = data.sample_ids()
    keep = [i for i, sample in enumerate(ids) if sample not in reasons]
    source = data.subset(keep)
    source.skipped = list(data.skipped) + [(data.name_of(i), reasons[ids[i]]) for i in range(len(ids))
                                           if ids[i] in reasons]  # as screen() lists them
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
                engine_dir: Optional[str] = None, calibration: Optional[tuple] = None) -> dict:
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
    * ``calibration`` (int8): ``(key, images)`` of calibration_sample over another source, whose
      graph extracts this one (a run's test split goes through the graph its training images
      calibrated); images may be None where that graph is kept already (in ``engine_dir``, or
      adopted from a run folder: engines.adopt). Without it the graph calibrates on ``data``.

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
    overwrite, progress, mirror = (a_flag(name, value) for name, value in
                                   (("overwrite", overwrite), ("progress", progress), ("mirror", mirror)))
    image_size, batch_size, shard_rows = (plain_number(v) for v in (image_size, batch_size, shard_rows))
    _check_inputs(backbone, data, image_size, batch_size)
    device = torch_device(device)
    batch_size = default_batch_size(device) if batch_size is None else batch_size
    rank, world = rank_and_world()
    out_dir = files.absolute(out_dir)
    spec = TransformSpec.for_backbone(backbone.preprocessing, size=image_size, mirror=mirror)
    _check_calibration(calibration, spec)
    source, skipped = _screened(data, out_dir, on_error)
    resolved_backend = ImageLoader(source, spec, batch_size, backend=backend).backend
    backbone.check_taps(taps)
    wanted = fingerprint(backbone, source, spec, dtype, resolved_backend, shard_rows, device, taps, engine, precision,
                         _calibration_key(calibration, source, spec, engine, precision, device))
    labels = _check_labels(source)
    refuse_foreign(out_dir)  # read-only: before a manifest there is read or anything written
    _check_engine_dir(engine_dir, source)
    finished = _finished(out_dir, wanted, overwrite, world)  # read-only, without the lock
    if finished is not None:
        return _reused(out_dir, finished)
    _check_graph_kept(backbone, calibration, wanted["compute"], taps, spec.size, engine_dir)
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
                   image_size=spec.size, engine_dir=engine_dir, calibration=calibration)
        result = _extract_missing(backbone, source, spec, out_dir, key, dtype, shard_rows, batch_size, device,
                                  resolved_backend, progress, rank, world, run, wanted["feature_dim"])
        if rank == 0:
            screened = on_error == "skip" and data.encoded
            screening = {"on_error": on_error, "source": data.identity()} if screened else None
            shards = math.ceil(len(source) / shard_rows)
            graph = result.pop("engine_graph", None)
            result["bytes_written"] += _write_manifest(out_dir, source, labels, wanted, key, shards, skipped,
                                                       screening, graph)
            if graph is not None and engine_dir is not None and graph["file"].endswith("-int8.onnx"):
                engines.remove_unrecorded_int8_graphs(engine_dir, keep=graph["file"])
        if world > 1:
            dist.barrier()
        return dict(result, directory=out_dir, reused=False, skipped=len(skipped))


def _check_options(dtype: str, shard_rows: int, on_error: str) -> None:
    if dtype not in CACHE_DTYPES:
        raise ValueError(f"dtype: expected one of {sorted(CACHE_DTYPES)}, got {dtype!r}")
    positive_int("shard_rows", shard_rows)
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error: expected one of {ON_ERROR}, got {on_error!r}")


def _check_inputs(backbone, data, image_size, batch_size) -> None:
    """What a Python caller hands `build` (the CLI checks its options before), named when wrong."""
    from fasttl.backbones.base import Backbone

    if not isinstance(backbone, Backbone):
        raise TypeError(f"backbone: expected a fasttl backbone (fasttl.backbones.create(name), or wrap your own "
                        f"nn.Module with fasttl.backbones.CustomBackbone), got {type(backbone).__name__}")
    if not all(hasattr(data, attr) for attr in ("identity", "labels", "classes", "encoded")):
        raise TypeError(f"data: expected a fasttl source (fasttl.data.class_folder_splits, file_list, "
                        f"load_cifar_pickles, ...), got {type(data).__name__}")
    if image_size is not None:
        check_image_size("image_size", image_size)
    positive_int("batch_size", batch_size, optional=True)


def _calibration_key(calibration, source, spec, engine: str, precision: str, device) -> Optional[str]:
    """What names the sample an int8 build's graph calibrates on, for its fingerprint: the given
    one, else this source's own (so caches of two calibrations never pass for one feature space)."""
    if calibration is not None:
        return calibration[0]
    if engines.resolve(engine, precision, device)[1] != "int8":
        return None
    return calibration_key(source, spec)


def _check_graph_kept(backbone, calibration, compute: dict, taps: int, size: int, engine_dir) -> None:
    """Another source's calibration given without its images: its int8 graph must be kept (in
    engine_dir, or made or adopted in this process), checked before anything is written."""
    if calibration is None or calibration[1] is not None or compute["precision"] != "int8" or \
            compute["engine"] != "onnxruntime":
        return
    if engines.graph_bytes(engines.onnx_file_name(backbone, taps, size, calibration[0]), engine_dir) is None:
        raise engines.no_graph_kept(engine_dir)


def _check_calibration(calibration, spec) -> None:
    """`calibration` (int8, another source's sample): (key, images) as calibration_sample makes them,
    named when not: a key of 64 hex digits, images None or float (N, 3, size, size) preprocessed
    for the backbone (within its normalized range: 0..255 pixels would calibrate a wrong graph)."""
    if calibration is None:
        return
    if not isinstance(calibration, (tuple, list)) or len(calibration) != 2:
        raise ValueError("calibration: expected (key, images) from fasttl.cache.extraction.calibration_sample")
    key, images = calibration
    if not (isinstance(key, str) and len(key) == 64 and all(c in "0123456789abcdef" for c in key)):
        raise ValueError(f"calibration: the key must be 64 hex digits (calibration_sample's), got {key!r:.80}")
    if images is None:
        return
    if not isinstance(images, torch.Tensor) or not images.is_floating_point() or images.dim() != 4 or \
            tuple(images.shape[1:]) != (3, spec.size, spec.size) or not len(images):
        raise ValueError(f"calibration: images must be a float tensor (N, 3, {spec.size}, {spec.size}) preprocessed "
                         f"as extraction preprocesses them, got {getattr(images, 'shape', type(images).__name__)}")
    low = min((0 - m) / s for m, s in zip(spec.mean, spec.std)) - 0.01
    high = max((1 - m) / s for m, s in zip(spec.mean, spec.std)) + 0.01
    if not bool(torch.isfinite(images).all()) or float(images.min()) < low or float(images.max()) > high:
        raise ValueError(f"calibration: images outside the backbone's normalized range [{low:.2f}, {high:.2f}] (or "
                         "not finite): pass images preprocessed as calibration_sample makes them, not raw pixels")


def screened_source(data, out_dir: str, on_error: str):
    """The images of `data` a build into `out_dir` extracts (without those "skip" leaves out)."""
    return _screened(data, out_dir, on_error)[0]


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
    verify = verification_images(source, spec, engines.INT8_CHECK_ROWS if run["precision"] == "int8" else
                                 VERIFY_IMAGES) if todo and run["engine"] == "onnxruntime" else None
    calibration = run.pop("calibration", None)
    if calibration is None and todo and run["precision"] == "int8":
        calibration = calibration_sample(source, spec)
    try:
        engine = extraction_engine(backbone, device, **run, verify_images=verify, calibration=calibration) \
            if todo else None
    except engines.BatchError as exc:  # an int8 graph checked on the source's first images
        raise exc.naming(source.name_of(0)) from None
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


def _write_manifest(out_dir: str, source, labels: np.ndarray, wanted: dict, key: str, shards: int, skipped,
                    screening: Optional[dict], engine_graph: Optional[dict] = None) -> int:
    label_bytes = store.npy_bytes(labels)
    files.write_atomic(os.path.join(out_dir, store.LABELS), label_bytes)
    sample_bytes = (json.dumps(source.sample_ids(), indent=2, sort_keys=True) + "\n").encode()
    files.write_atomic(os.path.join(out_dir, store.SAMPLES), sample_bytes)
    entries = []
    for s in range(shards):
        entry = {"rows": [s * wanted["shard_rows"], min(len(source), (s + 1) * wanted["shard_rows"])],
                 "features": file_entry(out_dir, store.features_file(s, key))}
        if wanted["dtype"] == "int8":
            entry["scales"] = file_entry(out_dir, store.scales_file(s, key))
        entries.append(entry)
    manifest = {"fingerprint": wanted, "count": len(source), "shards": entries,
                "files": {"labels": file_entry(out_dir, store.LABELS, label_bytes),
                          "samples": file_entry(out_dir, store.SAMPLES, sample_bytes)},
                "skipped": _skipped_records(source, skipped)}
    if screening is not None:
        manifest["screening"] = screening
    if engine_graph is not None:  # the ONNX graph that extracted these shards (verified on real images)
        manifest["engine_graph"] = engine_graph
    finish(out_dir, manifest)
    return len(label_bytes) + len(sample_bytes)


def _progress_bar(total: int, rank: int, world: int):
    from tqdm import tqdm

    label = "extract" if world == 1 else f"extract rank {rank}/{world}"
    return tqdm(total=total, unit="img", desc=label, position=rank if world > 1 else None, dynamic_ncols=True,
                smoothing=0.1)
