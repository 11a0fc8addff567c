"""Where feature caches of the transfer job live, so later runs with the same fingerprint reuse them."""
from __future__ import annotations

import hashlib
import json
import os
from typing import Optional

import torch

from fasttl.cache import FeatureCache
from fasttl.cache.cache import CacheError
from fasttl.cache.build import compute_settings


def cache_root() -> str:
    return os.path.expanduser(os.environ.get("FASTTL_CACHE_DIR", os.path.join("~", ".cache", "fasttl", "features")))


def cache_dir(backbone, source, split: str, image_size: int, dtype: str, device="cpu") -> str:
    """ROOT/<backbone>-<size>px-<dtype>-<device>-<weights>-<compute>/<split>-<dataset content hash>:
    the splits of one dataset side by side, each keyed by its content, so any later run over the
    same images (a subset run's test split, say) reuses it; caches made with other compute
    settings (an older fasttl's) stay apart instead of clashing. The fingerprint in each manifest
    still decides whether a cache found there may be used."""
    device = torch.device(device)
    compute = hashlib.sha256(json.dumps(compute_settings(device), sort_keys=True).encode()).hexdigest()[:6]
    family = f"{backbone.name}-{image_size}px-{dtype}-{device.type}-{backbone.weights_hash()[:12]}-{compute}"
    return os.path.join(cache_root(), family, f"{split}-{source.identity()[:16]}")


def cached_features(backbone, source, split: str, image_size: int, *, dtype: str = "fp16", batch_size: Optional[int] = None,
                    device="cpu", progress: bool = True, mirror: bool = False,
                    rebuild_broken: bool = False) -> FeatureCache:
    """The cache of one split, built on first use (resuming an interrupted build) and reused after.
    `mirror`: the cache of the horizontally mirrored view, kept beside the plain one.
    `rebuild_broken` (`fasttl run --overwrite`): a cache found corrupt or built for something else
    is rebuilt instead of refused."""
    split = f"{split}-mirror" if mirror else split
    directory = cache_dir(backbone, source, split, image_size, dtype, device)
    options = dict(dtype=dtype, batch_size=batch_size, device=torch.device(device), image_size=image_size,
                   progress=progress, mirror=mirror)
    try:
        return FeatureCache.build(backbone, source, directory, **options)
    except CacheError:
        if not rebuild_broken:
            raise
        return FeatureCache.build(backbone, source, directory, overwrite=True, **options)
