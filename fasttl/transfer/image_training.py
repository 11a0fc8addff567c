"""Training a network on images, as the strategies that train one share it: an epoch over the
training images with the train augmentation, under torchrun each rank on its shard; the
warmup + cosine schedule over the run's epochs; the DDP wrapping."""
from __future__ import annotations

import math
from typing import Dict

import torch
import torch.nn.functional as F
from torch import nn

from fasttl.data import ImageLoader, TransformSpec
from fasttl.heads.fit import EpochStats, step, warmup_cosine


def steps_per_epoch(images: int, cfg, world: int) -> int:
    """Optimizer steps in an epoch of `images` split over `world` ranks."""
    return math.ceil(images // world / cfg.batch_size) or 1


def warmup_cosine_schedule(optimizer, cfg, epoch_steps: int):
    """Warmup over half an epoch, then cosine to zero at --epochs."""
    return warmup_cosine(optimizer, cfg.epochs * epoch_steps, warmup_steps=max(1, epoch_steps // 2))


def distributed(model: nn.Module, device, world: int) -> nn.Module:
    """The model as each step calls it: DDP-wrapped under torchrun."""
    return model if world == 1 else nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)


def image_epoch(trained: nn.Module, backbone: nn.Module, source, cfg, epoch: int, optimizer, scheduler, *,
                 rank: int, world: int, device, dtype, penalty=None) -> Dict[str, float]:
    """One epoch over the training images with the train augmentation seeded by (seed, epoch):
    this rank's shard under torchrun; `penalty()` (L2-SP) is added to the loss, not to the record."""
    train_spec = TransformSpec.for_backbone(backbone.preprocessing, size=cfg.image_size, train=True,
                                            seed=cfg.seed * 1000 + epoch)
    stats = EpochStats()
    for images, labels in ImageLoader(source, train_spec, cfg.batch_size, shard_id=rank, num_shards=world,
                                      device=device, dtype=dtype):
        logits = trained(images.contiguous(memory_format=torch.channels_last)).float()
        loss = F.cross_entropy(logits, labels)
        stats.add(loss, logits, labels)
        if penalty is not None:
            loss = loss + penalty().to(loss.device)
        step(loss, optimizer, scheduler)
    return stats.record()
