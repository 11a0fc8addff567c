"""Frozen-backbone feature caching: build once, train heads from memory.

    cache = fasttl.FeatureCache.build(backbone, train_source, "runs/cache/train", dtype="fp16", image_size=128)
    cache = fasttl.FeatureCache.open("runs/cache/train")
    for features, labels in cache.loader(batch_size=256, shuffle=True, seed=0): ...
"""
from fasttl.cache.cache import CacheError, CacheLoader, FeatureCache
from fasttl.cache.kernels import gather, pool_store
from fasttl.cache.store import CacheLockedError

__all__ = ["CacheError", "CacheLoader", "CacheLockedError", "FeatureCache", "gather", "pool_store"]
from fasttl.cache.heads import evaluate_head, make_head, predict_cache, train_head  # noqa: E402

__all__ += ["evaluate_head", "make_head", "predict_cache", "train_head"]
