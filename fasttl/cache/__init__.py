"""Frozen-backbone feature caching: build once, read at memory speed (heads train on it: fasttl.heads).

    cache = fasttl.FeatureCache.build(backbone, train_source, "runs/cache/train", dtype="fp16", image_size=128)
    cache = fasttl.FeatureCache.build(backbone, folder_source, "runs/cache/all", on_error="skip")  # leave out bad images
    cache = fasttl.FeatureCache.write("runs/cache/mine", chunks, labels, classes=names)  # your own features
    cache = fasttl.FeatureCache.open("runs/cache/train")   # shards memory-mapped, nothing loaded
    for features, labels in cache.loader(batch_size=256, shuffle=True, seed=0): ...

Every file of a cache is listed in its manifest.json with its size and SHA-256, and opening checks
them (sizes and headers every time; content once per file state, then recorded: see
FeatureCache.open): a changed, truncated, linked or malformed file is a CacheError naming it, never
a wrong answer. A finished cache is opened read-only (no lock, nothing written).
"""
from fasttl.cache.cache import CacheError, CacheLoader, FeatureCache
from fasttl.cache.kernels import gather, pool_store
from fasttl.cache.store import CacheLockedError

__all__ = ["CacheError", "CacheLoader", "CacheLockedError", "FeatureCache", "gather", "pool_store"]
