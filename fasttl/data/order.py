"""Which samples a loader yields in an epoch, and in which order: torch's DistributedSampler,
index for index, so that a fasttl loader can stand in for DataLoader + DistributedSampler."""
from __future__ import annotations

import math

import torch
from fasttl.util.seeds import torch_seed


def epoch_order(length: int, *, epoch: int, seed: int, shuffle: bool, shard_id: int = 0, num_shards: int = 1,
                drop_last: bool = False) -> torch.Tensor:
    """The sample indices (int64) of one shard in one epoch, as
    ``DistributedSampler(dataset, num_shards, shard_id, shuffle, seed, drop_last)`` gives them
    after ``set_epoch(epoch)``: a permutation of all samples seeded with seed + epoch (or 0..n-1),
    cut to a multiple of num_shards (drop_last) or padded to one with its first indices again,
    then every num_shards-th index from shard_id. The shards of an epoch are disjoint (apart from
    the padding) and together cover every sample."""
    if shuffle:
        generator = torch.Generator()
        generator.manual_seed(torch_seed(seed + epoch))
        order = torch.randperm(length, generator=generator)
    else:
        order = torch.arange(length)
    if drop_last and length % num_shards:
        total = length // num_shards * num_shards
        order = order[:total]
    else:
        total = math.ceil(length / num_shards) * num_shards
        padding = total - length
        if padding and length:
            order = torch.cat([order, order.repeat(math.ceil(padding / length))[:padding]])
    return order[shard_id:total:num_shards]


def shard_length(length: int, num_shards: int, drop_last: bool) -> int:
    """How many samples each shard gets per epoch (epoch_order's length)."""
    return length // num_shards if drop_last else math.ceil(length / num_shards)
