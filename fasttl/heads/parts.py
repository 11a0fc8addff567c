"""The parts of features side by side (backbone "a+b": each backbone's pooled stages, first part
first) and the linear head that averages one head per part. With few images a class, the
average of each backbone's own cross-validated head, against the single backbone that
cross-validation ranked best, fell at most 1.05 points below it and gained 2 to 3.4 where that
ranking put a weaker backbone first, on training images no benchmark draws (benchmarks/
RESULTS.md, "Few images: one head per backbone, averaged"): 200 images can't rank backbones a
point apart, and the average does not depend on that ranking.

The average of linear heads is one linear head on the concatenation (each part's weights over
the number of parts, their biases' mean): saved, exported and predicted as any linear head."""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from fasttl.backbones.concatenated import split_name
from fasttl.cache.cache import FeatureCache, flat_parts
from fasttl.heads.train import make_head

AVERAGED_SOLVER = "one head per backbone, averaged"


def part_layouts(cache: FeatureCache) -> List[Tuple[Optional[str], List[int]]]:
    """(backbone name, block widths) of each part of `cache`'s rows, in order: one part for a
    single backbone, or for features whose layout does not split evenly by their backbone name
    (written by hand)."""
    fingerprint = cache.fingerprint if isinstance(cache.fingerprint, dict) else {}
    backbone = fingerprint.get("backbone") if isinstance(fingerprint.get("backbone"), dict) else {}
    layout = fingerprint.get("layout") if isinstance(fingerprint.get("layout"), dict) else {}
    name = backbone.get("name") if isinstance(backbone.get("name"), str) else None
    channels, taps = layout.get("channels") or [cache.feature_dim], layout.get("taps")
    # a join's own record of its models (FeatureCache.side_by_side: "res+net" joined with "b" is two
    # models), else the joined name's ("a+b", as a run's concatenated backbone records it)
    joined = flat_parts(backbone) if isinstance(backbone.get("parts"), list) else []
    names = [p.get("name") if isinstance(p, dict) else None for p in joined] if len(joined) > 1 else \
        split_name(name) if name else [name]
    per = taps + 1 if isinstance(taps, int) and not isinstance(taps, bool) and taps >= 0 else 0
    if len(names) < 2 or not per or len(channels) != per * len(names) or sum(channels) != cache.feature_dim:
        return [(name, list(channels))]
    return [(part, list(channels[i * per:(i + 1) * per])) for i, part in enumerate(names)]


def split(cache: FeatureCache) -> List[FeatureCache]:
    """One in-memory cache per part of `cache` (its columns, named by its backbone and laid out by
    its blocks); `[cache]` itself where it has one part."""
    layouts = part_layouts(cache)
    if len(layouts) == 1:
        return [cache]
    rows, start, parts = cache.all_features(), 0, []
    layout = cache.fingerprint["layout"]
    for name, widths in layouts:
        stop = start + sum(widths)
        fingerprint = dict(cache.fingerprint, backbone={"name": name}, feature_dim=stop - start,
                           layout=dict(layout, channels=widths), dtype="fp32")
        manifest = dict(cache.manifest, fingerprint=fingerprint, feature_dim=stop - start)
        parts.append(FeatureCache(cache.directory, manifest, rows[:, start:stop].contiguous(), None, cache.labels,
                                  cache.samples))
        start = stop
    return parts


def split_views(views: Sequence[FeatureCache]) -> List[List[FeatureCache]]:
    """`views` (a split's plain and mirrored rows) as one list of views per part."""
    return [list(part) for part in zip(*(split(v) for v in views))]


def average(heads: Sequence[nn.Sequential]) -> nn.Sequential:
    """The linear head whose logits are the mean of `heads`' (each a linear head on one part's
    columns, its own standardization in front), on the parts' columns side by side."""
    means = torch.cat([h[0].mean.cpu() for h in heads])
    stds = torch.cat([h[0].std.cpu() for h in heads])
    head = make_head("linear", len(means), heads[0][-1].out_features, means, stds)
    with torch.no_grad():
        head[-1].weight.copy_(torch.cat([h[-1].weight.detach().cpu() for h in heads], 1) / len(heads))
        head[-1].bias.copy_(torch.stack([h[-1].bias.detach().cpu() for h in heads]).mean(0))
    return head.to(heads[0][-1].weight.device)


__all__ = ["AVERAGED_SOLVER", "average", "part_layouts", "split", "split_views"]
