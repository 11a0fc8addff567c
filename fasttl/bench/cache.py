"""Feature transfer with and without the cache, on CIFAR-10 JPEGs and EfficientNet-Lite0 at 128 px:
one epoch of head training from the cache vs one epoch of the usual PyTorch recipe (frozen
backbone recomputed on every image, same head); gather throughput vs measured copy bandwidth;
extraction. --scale: fasttl.bench.cache_scale."""
from __future__ import annotations

import tempfile
import time
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F

from fasttl import backbones
from fasttl.bench.common import bench_splits, cache_bytes, copy_bandwidth, every_nth, format_table, median_seconds
from fasttl.cache import FeatureCache, gather
from fasttl.heads import make_head
from fasttl.data import make_loader
from fasttl.optim import AdamW


def _cached_epoch(cache: FeatureCache, batch_size: int) -> float:
    head = make_head("linear", cache.feature_dim, len(cache.classes))
    optimizer = AdamW(head.parameters(), lr=1e-3)
    loader = cache.loader(batch_size, shuffle=True, seed=0)

    def epoch():
        for features, labels in loader:
            loss = F.cross_entropy(head(features), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    return median_seconds(epoch, repeats=5, warmup=1)


def _recompute_epoch(model, source, batch_size: int, size: int) -> float:
    """The usual PyTorch recipe: every image decoded (PIL) and run through the frozen backbone each epoch."""
    head = make_head("linear", model.feature_dim, len(source.classes))
    optimizer = AdamW(head.parameters(), lr=1e-3)
    loader = make_loader(source, model.preprocessing, batch_size, image_size=size, train=False, backend="torch")
    started = time.perf_counter()
    for images, labels in loader:
        with torch.no_grad():
            features = model.forward_pooled(images)
        loss = F.cross_entropy(head(features), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return time.perf_counter() - started


def run(device: str = "cpu", quick: bool = False, data: str = None, scale: bool = False) -> Dict[str, object]:
    if scale:
        from fasttl.bench.cache_scale import run_scale

        return run_scale(quick, data)
    root, train, _ = bench_splits(data)
    source = every_nth(train, 200 if quick else 2000)
    size, batch_size = 128, 32
    model = backbones.create("efficientnet_lite0").freeze()
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        cache = FeatureCache.build(model, source, tmp, dtype="fp16", image_size=size, device=device, progress=False)
        extract_seconds = time.perf_counter() - started
    cached = _cached_epoch(cache, batch_size)
    recompute = _recompute_epoch(model, source, batch_size, size)

    # Gather: batches of training size from a CIFAR-sized cache (50,000 x 1280) in host memory.
    rows = 50_000 if not quick else 5_000
    gather_rows = []
    for cache_dtype in (torch.float16, torch.float32):
        table_ = torch.randn(rows, 1280).to(cache_dtype)
        indices = torch.randint(0, rows, (4096,))
        seconds = median_seconds(lambda: gather(table_, indices), repeats=20)
        moved = indices.numel() * 1280 * (table_.element_size() + 4)  # read cache rows + write fp32 batch
        gather_rows.append((str(cache_dtype).replace("torch.", ""), moved / seconds / 1e9))
    bandwidth = copy_bandwidth(device)
    rows_out = [
        {"case": "one epoch, head from the cache", "value": cached * 1e3, "unit": "ms"},
        {"case": "one epoch, backbone recomputed (the usual recipe)", "value": recompute * 1e3, "unit": "ms"},
        {"case": "cached epoch speedup", "value": recompute / cached, "unit": "x"},
        {"case": "extraction (build the cache once)", "value": len(source) / extract_seconds, "unit": "images/s"},
    ]
    for dtype, gbps in gather_rows:
        rows_out.append({"case": f"gather {dtype} cache -> fp32 batch", "value": gbps, "unit": "GB/s",
                         "of_copy": gbps / bandwidth})
    rows_out.append({"case": "memory copy (same run)", "value": bandwidth, "unit": "GB/s", "of_copy": 1.0})
    l3 = cache_bytes("L3")
    cache_bytes_total = 50_000 * 1280 * 2
    l3_note = ("" if l3 is None else
               f" This CPU's L3 is {l3 / 2**20:.0f} MiB against the {cache_bytes_total / 2**20:.0f} MiB cache"
               + (": rows and the batch partly stay in L3, so gather can exceed the DRAM copy figure." if
                  l3 > cache_bytes_total / 4 else "."))
    return {"name": "cache", "device": device, "rows": rows_out, "notes": [
        f"{len(source)} CIFAR-10 train JPEGs, EfficientNet-Lite0 at {size} px, batch {batch_size}, linear head, "
        "fasttl AdamW; the cached epoch is the median of 5, the recompute epoch one full pass.",
        "gather: 4096 random rows of a 50,000 x 1280 cache per call; GB/s counts cache bytes read + fp32 bytes "
        "written; copy: torch copy_ of 256 MiB, bytes read + written." + l3_note]}


def speedups(result: Dict[str, object]) -> List[Tuple[str, float]]:
    """(label, ratio) for the bar chart: the cached epoch's speedup, gather over copy bandwidth."""
    bars = []
    if result.get("mode") == "scale":
        return [(f"{r['case'].split(':')[0]}\n{r['case'].split(', ')[-1].split(' (')[0]} epoch / memory copy",
                 r["of_copy"])
                for r in result["rows"] if "epoch throughput, shuffle=" in r["case"] and "another" not in r["case"]]
    for r in result["rows"]:
        if r["unit"] == "x":
            bars.append((r["case"], r["value"]))
        elif r["case"].startswith("gather"):
            bars.append((f"{r['case']}\n/ memory copy", r["of_copy"]))
    return bars


def table(result: Dict[str, object]) -> str:
    rows = [[r["case"], f"{r['value']:.3g} {r['unit']}" if r["value"] < 1000 else f"{r['value']:.0f} {r['unit']}",
             _of_copy(r)] for r in result["rows"]]
    return format_table(["measure", "value", "of copy bandwidth"], rows)


def _of_copy(row: Dict[str, object]) -> str:
    if "of_copy" not in row:
        return ""
    beside = f" ({100 * row['of_copy_beside']:.0f}% of what the other leaves)" if "of_copy_beside" in row else ""
    return f"{100 * row['of_copy']:.0f}%{beside}"
