"""Where feature caches of the transfer job live, so later runs with the same fingerprint reuse them."""
from __future__ import annotations

import hashlib
import os

import torch

from fasttl.cache import FeatureCache


def cache_root() -> str:
    return os.path.expanduser(os.environ.get("FASTTL_CACHE_DIR", os.path.join("~", ".cache", "fasttl", "features")))


def cache_dir(backbone, source, image_size: int, dtype: str) -> str:
    """One folder per (backbone weights, dataset content, size, dtype); the full fingerprint in the
    manifest still decides whether a cache found there may be used."""
    key = hashlib.sha256(f"{backbone.name}:{backbone.weights_hash()}:{source.identity()}:{image_size}:{dtype}"
                         .encode()).hexdigest()[:16]
    return os.path.join(cache_root(), f"{backbone.name}-{image_size}px-{dtype}-{key}")


def cached_features(backbone, source, split: str, image_size: int, *, dtype: str = "fp16", batch_size: int = 64,
                    device="cpu", progress: bool = True) -> FeatureCache:
    """The cache of one split, built on first use (resuming an interrupted build) and reused after."""
    directory = os.path.join(cache_dir(backbone, source, image_size, dtype), split)
    return FeatureCache.build(backbone, source, directory, dtype=dtype, batch_size=batch_size,
                              device=torch.device(device), image_size=image_size, progress=progress)
