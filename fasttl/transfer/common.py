"""What several strategies share: the device and dtype a run trains in, and timing records."""
from __future__ import annotations

import os
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


def weights_sha256(path: str) -> str:
    """SHA-256 of a --weights file, as a run records it (config.json's weights_sha256)."""
    import hashlib

    from fasttl.util.files import read_plain

    return hashlib.sha256(read_plain(os.path.expanduser(path), 1 << 34)).hexdigest()


def check_weights(cfg) -> None:
    """A run's --weights file, read, checked and fitted to its backbone (0.1 s) before any folder is
    made: the file's own error, never a traceback or a half-made run folder."""
    from fasttl import backbones
    from fasttl.util import files
    from fasttl.util.errors import OptionError
    from fasttl.util.path_problems import unreachable

    if cfg.weights is None:
        return
    if not os.path.isfile(os.path.expanduser(cfg.weights)):
        where = files.absolute(cfg.weights)
        why = unreachable(where)
        raise OptionError(f"weights: {where} {why}" if why else f"weights: {where} is not a regular file (a folder, "
                          "a pipe or a device?)" if os.path.exists(where) else f"weights: no file at {where}")
    if cfg.budget is None:  # --budget refuses --weights (its plan compares backbones)
        backbones.create(cfg.backbone, weights=cfg.weights)


def run_backbone(config: dict, **kwargs):
    """The backbone a run trained on, rebuilt from its config.json: with --weights, only while
    that file is the one the run read (a file changed since would give other features to the
    run's head, and other predictions, with nothing said)."""
    from fasttl import backbones
    from fasttl.transfer.rundir import RunError

    path, recorded = config.get("weights"), config.get("weights_sha256")
    if path is not None and recorded is not None and kwargs.get("pretrained", True):
        try:
            found = weights_sha256(path)
        except (OSError, ValueError):
            found = None  # missing or not a file: backbones.create names it
        if found is not None and found != recorded:
            raise RunError(f"weights: {path} is not the file the run trained with (its SHA-256 changed since); "
                           "restore it, or train the run again")
    return backbones.create(config["backbone"], weights=path, **kwargs)


def check_backbone_options(cfg):
    """The backbone options' values against the backbone itself (its smallest input, its stages to
    tap for --features), before any work; returns the backbone (random weights: a shape check)."""
    from fasttl import backbones
    from fasttl.transfer.caching import FEATURE_TAPS

    backbone = backbones.create(cfg.backbone, pretrained=False)
    backbone.preprocessing.with_size(cfg.image_size)
    backbone.check_taps(FEATURE_TAPS[cfg.features])
    return backbone
