"""FeatureCache: features of a frozen backbone, computed once, served at memory speed."""
from __future__ import annotations

import os
from typing import Iterator, List, Optional, Tuple, Union

import torch
from torch import Tensor

from fasttl import _ops
from fasttl.cache import build, format
from fasttl.cache.format import mismatch_message  # noqa: F401  (part of this module's API)
from fasttl.cache.kernels import gather
from fasttl.cache.store import CacheError


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
        """Runs the frozen backbone over `data` into `out_dir` (or finds that it already did) and
        opens the result; ``cache.last_build`` holds what the build did. See
        :func:`fasttl.cache.build.build_cache` for the arguments."""
        result = build.build_cache(backbone, data, out_dir, **kwargs)
        # A cache this call wrote was checked as it was written; one found finished is verified.
        cache = cls.open(result.pop("directory"), verify=result.pop("reused"))
        cache.last_build = result
        return cache

    @classmethod
    def open(cls, directory: str, verify: bool = True, expect_fingerprint: Optional[dict] = None) -> "FeatureCache":
        """Maps a finished cache. Reads nothing but the files its manifest lists and writes nothing.
        Every listed file must be a plain file (not a link) of the recorded size; labels.npy and
        samples.json are always checked against their SHA-256, shards with ``verify``; each array's
        dtype and shape and each label's range are checked too. Any problem is a CacheError naming
        the file."""
        directory = os.path.abspath(os.path.expanduser(directory))
        return cls(directory, *format.read_cache(directory, verify, expect_fingerprint))

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

    def subset(self, rows) -> "FeatureCache":
        """The rows `rows` (indices into this cache, in that order) as an in-memory cache."""
        rows = torch.as_tensor(rows, dtype=torch.int64)
        index = rows.to(self.device)
        manifest = dict(self.manifest, count=len(rows))
        return FeatureCache(self.directory, manifest, self.features[index],
                            None if self.scales is None else self.scales[index], self.labels[index],
                            [self.samples[i] for i in rows.tolist()])

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


