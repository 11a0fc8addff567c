"""Building a feature cache: the frozen backbone runs once per image, shard by shard. Resumable
(finished shards are kept), guarded by a writer lock, and split across ranks under torchrun."""
from __future__ import annotations

import contextlib
import math
import os
import shutil
import time
from typing import Optional, Union

import numpy as np
import torch
import torch.distributed as dist

import fasttl
from fasttl.cache import store
from fasttl.cache.cache import CacheError, FeatureCache, _to_numpy_storage, mismatch_message
from fasttl.cache.kernels import CACHE_DTYPES, pool_store
from fasttl.data import ImageLoader, TransformSpec
from fasttl.data.sources import ArraySource, FileSource


def compute_settings(device: torch.device) -> dict:
    """How the backbone runs during extraction; part of the fingerprint, since it changes the bits."""
    return {"device": device.type, "autocast": "bf16" if device.type == "cuda" else None,
            "memory_format": "channels_last", "batchnorm": "folded"}


def fingerprint(backbone, source: Union[FileSource, ArraySource], spec: TransformSpec, dtype: str, backend: str,
                shard_rows: int, device: torch.device = torch.device("cpu")) -> dict:
    """Everything the cache's content depends on; a cache only serves a request with an equal one."""
    return {
        "compute": compute_settings(device),
        "backbone": {"name": backbone.name, "weights_sha256": backbone.weights_hash()},
        "preprocessing": dict(spec.as_dict(), backend=backend),
        "dataset": {"identity": source.identity(), "count": len(source), "classes": list(source.classes)},
        "dtype": dtype,
        "feature_dim": int(backbone.feature_dim),
        "shard_rows": int(shard_rows),
        "fasttl_version": fasttl.__version__,
        "format": store.FORMAT_VERSION,
    }


def extraction_model(backbone, device: torch.device):
    """The copy of `backbone` extraction runs: frozen, batch norms folded into the convolutions,
    channels_last (oneDNN's convolutions run about 1.5x faster on NHWC on this class of CPU,
    the folding 1.25x more)."""
    return backbone.for_extraction().to(device, memory_format=torch.channels_last)


def extraction_autocast(device: torch.device):
    """bf16 autocast on GPU (as compute_settings records), none on CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def default_batch_size(device: torch.device) -> int:
    return 128 if device.type == "cuda" else 32


def _rank_and_world():
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


def sample_ids(source) -> list:
    """A name per sample: the file path relative to the source's root, or SOURCE:INDEX."""
    if isinstance(source, FileSource):
        return [os.path.relpath(f, source.root) if source.root else f for f in source.files]
    return [f"{source.name}:{i}" for i in range(len(source))]


@torch.no_grad()
def _extract_shard(backbone, source, spec, shard: int, shard_rows: int, dtype: torch.dtype, batch_size: int,
                   device: torch.device, backend: str, progress) -> dict:
    start = shard * shard_rows
    stop = min(len(source), start + shard_rows)
    rows = stop - start
    features = torch.empty((rows, backbone.feature_dim), dtype=dtype, device=device)
    scales = torch.empty(rows, dtype=torch.float32, device=device) if dtype == torch.int8 else None
    loader = ImageLoader(source.subset(range(start, stop)), spec, batch_size, backend=backend, device=device)
    written = 0
    for images, _ in loader:
        with extraction_autocast(device):
            feature_map = backbone.forward_features(images.contiguous(memory_format=torch.channels_last))
        n = images.shape[0]
        pool_store(feature_map, features, torch.arange(written, written + n, device=device), scales)
        written += n
        if progress is not None:
            progress.update(n)
    return {"features": _to_numpy_storage(features), "scales": None if scales is None else scales.cpu().numpy()}


def build_cache(backbone, data: Union[FileSource, ArraySource], out_dir: str, *, dtype: str = "fp16",
                batch_size: Optional[int] = None, device: Union[str, torch.device] = "cpu",
                image_size: Optional[int] = None,
                shard_rows: int = 4096, overwrite: bool = False, backend: str = "auto",
                progress: bool = True, mirror: bool = False) -> FeatureCache:
    """Runs the frozen ``backbone`` (eval, no grad, bf16 autocast on GPU) over ``data`` and stores
    its pooled features, labels and sample ids in ``out_dir``.

    * ``dtype``: cache dtype, ``"fp32"``, ``"fp16"``, ``"bf16"`` or ``"int8"`` (per-row fp32 scale).
    * ``batch_size``: images per backbone call; default 32 on CPU (larger batches ran slower
      there: their activations outgrow the allocator's reuse), 128 on GPU.
    * ``mirror``: features of the horizontally mirrored images (a second view of each sample).
    * Shards of ``shard_rows`` rows are written to a temporary name, fsynced and renamed; the
      manifest (with each shard's SHA-256 and the fingerprint) comes last.
    * Running the same build again after an interruption (Ctrl-C, kill -9) keeps the finished
      shards; the result is byte-identical to an uninterrupted build. A finished cache with the
      same fingerprint is returned as it is; another fingerprint is an error unless ``overwrite``.
    * A second writer on the same directory fails at once (lock file).
    * Under torchrun (an initialized process group) rank r builds shards r, r + world, ...;
      rank 0 writes labels, sample ids and the manifest after a barrier.
    """
    if dtype not in CACHE_DTYPES:
        raise ValueError(f"dtype: expected one of {sorted(CACHE_DTYPES)}, got {dtype!r}")
    if not isinstance(shard_rows, int) or shard_rows < 1:
        raise ValueError(f"shard_rows: expected a positive integer, got {shard_rows!r}")
    device = torch.device(device)
    batch_size = default_batch_size(device) if batch_size is None else batch_size
    rank, world = _rank_and_world()
    out_dir = os.path.abspath(os.path.expanduser(out_dir))
    os.makedirs(out_dir, exist_ok=True)
    spec = TransformSpec.for_backbone(backbone.preprocessing, size=image_size, mirror=mirror)
    resolved_backend = ImageLoader(data, spec, batch_size, backend=backend).backend
    wanted = fingerprint(backbone, data, spec, dtype, resolved_backend, shard_rows, device)
    backbone = extraction_model(backbone, device)

    lock = store.WriterLock(out_dir) if rank == 0 else contextlib.nullcontext()
    try:
        lock.__enter__()
        ok, message = True, ""
    except store.CacheLockedError as exc:
        ok, message = False, str(exc)
    _all_ranks_agree(ok, message, world, store.CacheLockedError)
    try:
        existing = store.read_json(os.path.join(out_dir, store.MANIFEST))
        pending = store.read_json(os.path.join(out_dir, store.BUILD))
        for found in (existing, pending):
            if found is not None and found.get("fingerprint", found) != wanted and not overwrite:
                _all_ranks_agree(False, mismatch_message(out_dir, found.get("fingerprint", found), wanted), world)
        if existing is not None and existing["fingerprint"] == wanted and not overwrite:
            if world > 1:
                dist.barrier()
            return FeatureCache.open(out_dir)
        if rank == 0:
            if overwrite and (existing is not None or pending is not None):
                _clear(out_dir)
            store.remove_stale_temporaries(out_dir)
            store.write_json_atomic(os.path.join(out_dir, store.BUILD), {"fingerprint": wanted})
        if world > 1:
            dist.barrier()

        shards = math.ceil(len(data) / shard_rows)
        mine = [s for s in range(shards) if s % world == rank]
        todo = [s for s in mine if not os.path.isfile(os.path.join(out_dir, store.features_file(s)))]
        images = sum(min(len(data), (s + 1) * shard_rows) - s * shard_rows for s in todo)
        bar = _progress_bar(images, rank, world) if progress and images else None
        started, written_bytes = time.perf_counter(), 0
        try:
            for s in todo:
                arrays = _extract_shard(backbone, data, spec, s, shard_rows, CACHE_DTYPES[dtype], batch_size, device,
                                        resolved_backend, bar)
                if arrays["scales"] is not None:
                    scale_bytes = store.npy_bytes(arrays["scales"])
                    store.write_atomic(os.path.join(out_dir, store.scales_file(s)), scale_bytes)
                    written_bytes += len(scale_bytes)
                # The features file goes last: its presence marks the shard finished.
                feature_bytes = store.npy_bytes(arrays["features"])
                store.write_atomic(os.path.join(out_dir, store.features_file(s)), feature_bytes)
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
        manifest_bytes = _write_manifest(out_dir, data, wanted, shards) if rank == 0 else 0
        if world > 1:
            dist.barrier()
        cache = FeatureCache.open(out_dir, verify=False)
        cache.last_build = {"images": counts[0], "seconds": seconds,
                            "images_per_second": counts[0] / seconds if seconds > 0 else 0.0,
                            "bytes_written": counts[1] + (manifest_bytes if rank == 0 else 0),
                            "shards_built": counts[2], "shards_reused": counts[3]}
        return cache
    finally:
        lock.__exit__(None, None, None)


def _write_manifest(out_dir: str, data, wanted: dict, shards: int) -> int:
    labels = np.asarray(data.labels, dtype=np.int64)
    label_bytes = store.npy_bytes(labels)
    store.write_atomic(os.path.join(out_dir, store.LABELS), label_bytes)
    samples = sample_ids(data)
    store.write_json_atomic(os.path.join(out_dir, store.SAMPLES), samples)
    entries = []
    for s in range(shards):
        entry = {"rows": [s * wanted["shard_rows"], min(len(data), (s + 1) * wanted["shard_rows"])]}
        names = [("features", store.features_file(s))]
        if wanted["dtype"] == "int8":
            names.append(("scales", store.scales_file(s)))
        for key, name in names:
            path = os.path.join(out_dir, name)
            if not os.path.isfile(path):
                raise CacheError(f"{path}: shard missing after every rank finished")
            entry[key] = {"file": name, "bytes": os.path.getsize(path), "sha256": store.sha256_file(path)}
        entries.append(entry)
    manifest = {"fingerprint": wanted, "count": len(data), "shards": entries}
    store.write_json_atomic(os.path.join(out_dir, store.MANIFEST), manifest)
    os.remove(os.path.join(out_dir, store.BUILD))
    return len(label_bytes)


def _clear(out_dir: str) -> None:
    for name in os.listdir(out_dir):
        if name == store.LOCK:
            continue
        path = os.path.join(out_dir, name)
        if name.startswith(("features-", "scales-")) or name in (store.MANIFEST, store.BUILD, store.LABELS,
                                                                 store.SAMPLES) or ".tmp." in name:
            os.remove(path) if os.path.isfile(path) else shutil.rmtree(path)


def _progress_bar(total: int, rank: int, world: int):
    from tqdm import tqdm

    label = "extract" if world == 1 else f"extract rank {rank}/{world}"
    return tqdm(total=total, unit="img", desc=label, position=rank if world > 1 else None, dynamic_ncols=True,
                smoothing=0.1)
