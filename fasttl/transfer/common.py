"""What several strategies share: the device and dtype a run trains in, and timing records."""
from __future__ import annotations

from typing import Dict

import torch


def param_dtype(cfg) -> torch.dtype:
    """bf16 params (fasttl AdamW then keeps fp32 master weights and moments) or fp32."""
    return torch.bfloat16 if cfg.precision == "bf16" else torch.float32


def throughput(images: int, seconds: float) -> float:
    return images / max(seconds, 1e-9)


def eval_timings(train_s: float, eval_s: float, trained_images: int, evaluated_images: int) -> Dict[str, float]:
    return {"train_s": train_s, "eval_s": eval_s, "train_images_per_s": throughput(trained_images, train_s),
            "eval_images_per_s": throughput(evaluated_images, eval_s)}


# The common options of a strategy that runs a pretrained backbone (its `reads`): the others (the
# small CNNs of scratch and distill) refuse them instead of ignoring them.
BACKBONE_OPTIONS = ("weights", "backbone", "features", "cache_dtype", "engine", "extract_precision")
