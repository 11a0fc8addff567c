"""FeatureCache: features of a frozen backbone, computed once, served at memory speed."""
from __future__ import annotations

import json
import os
from typing import Iterator, List, Optional, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from fasttl import _ops
from fasttl.cache import store
from fasttl.cache.kernels import CACHE_DTYPES, gather


class CacheError(ValueError):
    """A cache directory that is missing, corrupt, or built for something else."""


def _to_numpy_storage(tensor: Tensor) -> np.ndarray:
    """bf16 has no numpy dtype: it is stored as its uint16 bits."""
    tensor = tensor.detach().cpu().contiguous()
    return tensor.view(torch.uint16 if hasattr(torch, "uint16") else torch.int16).numpy() \
        if tensor.dtype == torch.bfloat16 else tensor.numpy()


def _from_numpy_storage(array: np.ndarray, dtype: torch.dtype) -> Tensor:
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    return tensor.view(torch.bfloat16) if dtype == torch.bfloat16 else tensor


class FeatureCache:
    """Features of one split of a dataset under one backbone and preprocessing.

    ``FeatureCache.build(backbone, source, out_dir, ...)`` runs the frozen backbone once over the
    dataset (resumable, lock-protected, torchrun-aware) and ``FeatureCache.open(out_dir)`` maps it
    back. Then ``len(cache)``, ``cache.feature_dim``, ``cache.classes``, ``cache.labels`` and
    ``cache.loader(batch_size, shuffle, seed, device)`` yielding ``(features, labels)`` batches
    through the native gather kernel, every row exactly once per epoch. ``cache.to("cuda")`` keeps
    the whole cache on the GPU.
    """

    def __init__(self, directory: str, manifest: dict, features: Tensor, scales: Optional[Tensor], labels: Tensor,
                 samples: List[str]):
        self.directory = directory
        self.manifest = manifest
        self.features = features
        self.scales = scales
        self.labels = labels
        self.samples = samples

    # -- building and opening ------------------------------------------------------------
    @classmethod
    def build(cls, backbone, data, out_dir: str, **kwargs) -> "FeatureCache":
        """See :func:`fasttl.cache.build.build_cache` for the arguments."""
        from fasttl.cache.build import build_cache

        return build_cache(backbone, data, out_dir, **kwargs)

    @classmethod
    def open(cls, directory: str, verify: bool = True, expect_fingerprint: Optional[dict] = None) -> "FeatureCache":
        """Maps a finished cache. Each shard's size and (with verify) SHA-256 are checked against
        the manifest, so a truncated or corrupt shard is an error naming it."""
        directory = os.path.abspath(os.path.expanduser(directory))
        manifest = store.read_json(os.path.join(directory, store.MANIFEST))
        if manifest is None:
            raise CacheError(f"{directory}: no {store.MANIFEST} (not a feature cache, or its build did not finish: "
                             "run the same build again to resume it)")
        if expect_fingerprint is not None and manifest["fingerprint"] != expect_fingerprint:
            raise CacheError(mismatch_message(directory, manifest["fingerprint"], expect_fingerprint))
        dtype = CACHE_DTYPES[manifest["fingerprint"]["dtype"]]
        parts, scale_parts = [], []
        for shard in manifest["shards"]:
            for key, target in (("features", parts), ("scales", scale_parts)):
                if key not in shard:
                    continue
                path = os.path.join(directory, shard[key]["file"])
                if not os.path.isfile(path):
                    raise CacheError(f"{path}: shard file missing")
                if os.path.getsize(path) != shard[key]["bytes"]:
                    raise CacheError(f"{path}: truncated or changed ({os.path.getsize(path)} bytes, manifest says "
                                     f"{shard[key]['bytes']}); rebuild with overwrite")
                if verify and store.sha256_file(path) != shard[key]["sha256"]:
                    raise CacheError(f"{path}: checksum mismatch (corrupt shard); rebuild with overwrite")
                try:
                    target.append(np.load(path, mmap_mode="r"))
                except ValueError as exc:
                    raise CacheError(f"{path}: unreadable shard ({exc})") from exc
        feature_dim = manifest["fingerprint"]["feature_dim"]
        features = _from_numpy_storage(np.concatenate(parts) if parts else np.zeros((0, feature_dim)), dtype)
        scales = torch.from_numpy(np.concatenate(scale_parts)) if scale_parts else None
        labels = torch.from_numpy(np.load(os.path.join(directory, store.LABELS)))
        with open(os.path.join(directory, store.SAMPLES)) as f:
            samples = json.load(f)
        if features.shape != (manifest["count"], feature_dim) or labels.shape != (manifest["count"],):
            raise CacheError(f"{directory}: shards hold {tuple(features.shape)} features and {len(labels)} labels, "
                             f"the manifest says {manifest['count']} x {feature_dim}")
        return cls(directory, manifest, features, scales, labels, samples)

    @classmethod
    def concat(cls, caches: List["FeatureCache"]) -> "FeatureCache":
        """The rows of several caches (e.g. two views of one split) as one in-memory cache."""
        first = caches[0]
        for other in caches[1:]:
            if (other.feature_dim, other.features.dtype, other.classes) != (first.feature_dim, first.features.dtype,
                                                                            first.classes):
                raise CacheError("concat: caches differ in feature dim, dtype or classes")
        manifest = dict(first.manifest, count=sum(len(c) for c in caches))
        scales = None if first.scales is None else torch.cat([c.scales for c in caches])
        return cls(first.directory, manifest, torch.cat([c.features for c in caches]), scales,
                   torch.cat([c.labels for c in caches]), [s for c in caches for s in c.samples])

    # -- what it holds ----------------------------------------------------------------------
    def __len__(self) -> int:
        return self.features.shape[0]

    @property
    def feature_dim(self) -> int:
        return self.features.shape[1]

    @property
    def classes(self) -> List[str]:
        return list(self.manifest["fingerprint"]["dataset"]["classes"])

    @property
    def fingerprint(self) -> dict:
        return self.manifest["fingerprint"]

    @property
    def device(self) -> torch.device:
        return self.features.device

    def nbytes(self) -> int:
        return self.features.numel() * self.features.element_size() + (0 if self.scales is None else
                                                                        self.scales.numel() * 4)

    def to(self, device: Union[str, torch.device]) -> "FeatureCache":
        """The whole cache on `device` (e.g. "cuda": training reads it at GPU memory speed)."""
        device = torch.device(device)
        if device.type == "cuda":
            free = torch.cuda.mem_get_info(device)[0]
            if self.nbytes() > free:
                raise RuntimeError(f"cache: {self.nbytes() / 2**30:.1f} GiB does not fit in {free / 2**30:.1f} GiB "
                                   f"free on {device}; keep it in host memory")
        return FeatureCache(self.directory, self.manifest, self.features.to(device),
                            None if self.scales is None else self.scales.to(device), self.labels.to(device),
                            self.samples)

    def gather(self, indices: Tensor, out_dtype: torch.dtype = torch.float32) -> Tensor:
        """Rows `indices` dequantized to out_dtype (indices checked against the cache's size)."""
        return gather(self.features, indices.to(self.device), self.scales, out_dtype)

    def _gather_in_range(self, indices: Tensor, out_dtype: torch.dtype) -> Tensor:
        # The loader's indices come from a permutation of range(len(self)): skipping the bounds
        # check saves two host syncs per batch on the GPU.
        return _ops.gather(self.features, self.scales, indices, out_dtype)

    def all_features(self, out_dtype: torch.dtype = torch.float32) -> Tensor:
        return self.gather(torch.arange(len(self), device=self.device), out_dtype)

    def loader(self, batch_size: int = 256, shuffle: bool = True, seed: int = 0,
               device: Optional[Union[str, torch.device]] = None, out_dtype: torch.dtype = torch.float32,
               drop_last: bool = False) -> "CacheLoader":
        return CacheLoader(self, batch_size, shuffle, seed, device, out_dtype, drop_last)


class CacheLoader:
    """(features, labels) batches gathered from a cache; a new seeded order each epoch when shuffling."""

    def __init__(self, cache: FeatureCache, batch_size: int, shuffle: bool, seed: int, device, out_dtype, drop_last):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
        self.cache, self.batch_size, self.shuffle, self.seed = cache, batch_size, shuffle, seed
        self.device = torch.device(device) if device is not None else cache.device
        self.out_dtype, self.drop_last, self.epoch = out_dtype, drop_last, 0

    def __len__(self) -> int:
        n = len(self.cache)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[Tuple[Tensor, Tensor]]:
        n = len(self.cache)
        if self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch))
        else:
            order = torch.arange(n)
        order = order.to(self.cache.device)
        self.epoch += 1
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            indices = order[start:start + self.batch_size]
            features = self.cache._gather_in_range(indices, self.out_dtype)
            labels = self.cache.labels[indices]
            yield features.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)


def mismatch_message(directory: str, found: dict, wanted: dict) -> str:
    differing = sorted(k for k in set(found) | set(wanted) if found.get(k) != wanted.get(k))
    details = "; ".join(f"{k}: cache has {found.get(k)!r}, asked for {wanted.get(k)!r}" for k in differing)
    return (f"{directory}: holds a cache built for something else ({details[:600]}). Use another directory, "
            "or overwrite=True / --overwrite to rebuild it.")
