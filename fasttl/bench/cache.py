"""Feature transfer with and without the cache, on CIFAR-10 JPEGs and EfficientNet-Lite0 at 128 px:
one epoch of head training from the cache vs one epoch of the usual PyTorch recipe (frozen
backbone recomputed on every image, same head); gather throughput vs measured copy bandwidth;
extraction. --scale: a 2 GB cache under /tmp, opened and read from its memory maps in a fresh
process (open time, resident memory, epoch GB/s; WebDataset vs class folders)."""
from __future__ import annotations

import os
import tempfile
import time
from typing import Dict, List, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from fasttl import backbones
from fasttl.bench.common import bench_splits, cache_bytes, copy_bandwidth, every_nth, format_table, median_seconds
from fasttl.cache import FeatureCache, gather
from fasttl.cache.order import BLOCK_ROWS
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
             f"{100 * r['of_copy']:.0f}%" if "of_copy" in r else ""] for r in result["rows"]]
    return format_table(["measure", "value", "of copy bandwidth"], rows)


# -- at scale: a cache larger than what a process should hold, read from its memory maps ----------------

SCALE_ROWS = (2_000_000, 200_000)
SCALE_DIM, SCALE_BATCH = 512, 8192
SHUFFLES = ("rows", "blocks")  # fasttl.cache.order's modes
# Epochs timed per mode after the first (which maps the shard pages into the fresh process): the
# median, since one epoch varied 2-3x between runs on the 2-core Xeon (5 to 14 GB/s, the same code).
SCALE_EPOCHS = 5


def rss_anon_bytes() -> int:
    """The process's anonymous resident memory (RssAnon in /proc/self/status): its own heap, not
    the page cache pages its memory maps show."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status (Linux only)")


def _synthetic_chunks(rows: int, dim: int, chunk: int = 65536):
    generator = torch.Generator().manual_seed(0)
    for start in range(0, rows, chunk):
        yield torch.randn((min(chunk, rows - start), dim), generator=generator)


def scale_probe(directory: str, batch_size: int, shuffles=("rows",)) -> Dict[str, float]:
    """Run in a fresh process: open the cache, one shuffled epoch of its loader per mode in
    `shuffles` (fasttl.cache.order; the first gives epoch_s and the memory figures); time and
    RssAnon."""
    import gc

    import fasttl.cache.cache  # noqa: F401  (imports done before the baseline)

    gc.collect()
    baseline = rss_anon_bytes()
    started = time.perf_counter()
    cache = FeatureCache.open(directory)
    open_s = time.perf_counter() - started
    after_open = rss_anon_bytes()
    peak, epochs = after_open, {}
    moved = len(cache) * cache.feature_dim * (cache.shards[0].element_size() + 4)  # rows read + fp32 written
    first_s = None  # the first epoch: its pages mapped into this fresh process as it reads them
    for shuffle in shuffles:
        times = []
        for epoch in range(SCALE_EPOCHS + (first_s is None)):
            rows, started = 0, time.perf_counter()
            for features, labels in cache.loader(batch_size, shuffle=shuffle, seed=epoch):
                rows += features.shape[0]
                peak = max(peak, rss_anon_bytes())
            assert rows == len(cache)
            times.append(time.perf_counter() - started)
        if first_s is None:
            first_s, times = times[0], times[1:]
        seconds = float(np.median(times))
        epochs[shuffle] = {"epoch_s": seconds, "epoch_gbps": moved / seconds / 1e9,
                           "epoch_gbps_range": [moved / max(times) / 1e9, moved / min(times) / 1e9]}
    epoch_s = first_s
    # The measurement that chose the per-shard pointer table over grouping each batch by shard.
    table = cache._shard_table()
    indices = torch.randperm(len(cache), generator=torch.Generator().manual_seed(1))[:batch_size]
    out = torch.empty((len(indices), cache.feature_dim))
    methods = {m: median_seconds(lambda m=m: table.gather(indices, out=out, method=m), repeats=5, warmup=1)
               for m in ("table", "grouped")}
    return {"rows": len(cache), "shards": len(cache.shards), "open_s": open_s, "epochs": epochs,
            "rss_anon_baseline_mb": baseline / 2**20, "rss_anon_after_open_mb": (after_open - baseline) / 2**20,
            "rss_anon_epoch_peak_mb": (peak - baseline) / 2**20, "epoch_s": epoch_s,
            "epoch_gbps": moved / epoch_s / 1e9, "copy_gbps": copy_bandwidth("cpu"),
            "batch_table_ms": methods["table"] * 1e3, "batch_grouped_ms": methods["grouped"] * 1e3}


# Another job on the machine while an epoch runs: one thread copying 256 MiB buffers in a loop,
# the kind of load that competes with a gather for memory bandwidth.
COMPETITOR = ("import torch; torch.set_num_threads(1); a = torch.ones(1 << 26); b = torch.empty_like(a)\n"
              "while True: b.copy_(a)")


def _probe_in_fresh_process(directory: str, batch_size: int, shuffles=("rows",),
                            competing: bool = False) -> Dict[str, float]:
    import json
    import subprocess
    import sys

    code = ("import json, sys; from fasttl.bench.cache import scale_probe; "
            "print(json.dumps(scale_probe(sys.argv[1], int(sys.argv[2]), tuple(sys.argv[3].split(',')))))")
    competitor = subprocess.Popen([sys.executable, "-c", COMPETITOR]) if competing else None
    try:
        if competitor is not None:
            time.sleep(2)  # its buffers allocated, its loop running
        result = subprocess.run([sys.executable, "-c", code, directory, str(batch_size), ",".join(shuffles)],
                                capture_output=True, text=True, timeout=3600)
    finally:
        if competitor is not None:
            competitor.kill()
            competitor.wait()
    if result.returncode != 0:
        raise RuntimeError(f"scale probe failed: {result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _extraction_formats(train, count: int, size: int = 128) -> Dict[str, float]:
    """Extraction images/s from the same CIFAR-10 JPEGs as class folders and as WebDataset shards
    (benchmarks/make_webdataset.py's layout), same backbone, backend and batch; caches compared."""
    import importlib.util
    import shutil

    from fasttl.data.formats.webdataset import read_webdataset

    per_class = max(1, count // len(train.classes))
    keep = [i for c in range(len(train.classes)) for i in
            [j for j, label in enumerate(train.labels) if label == c][:per_class]]
    source = train.subset(keep)
    spec = importlib.util.spec_from_file_location(
        "make_webdataset", os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "make_webdataset.py"))
    model = backbones.create("efficientnet_lite0").freeze()
    tmp = tempfile.mkdtemp(prefix="fasttl-wds-")
    try:
        folder = os.path.join(tmp, "folders")
        for path, label in zip(source.files, source.labels):
            os.makedirs(os.path.join(folder, source.classes[label]), exist_ok=True)
            shutil.copy(path, os.path.join(folder, source.classes[label], os.path.basename(path)))
        if spec is not None and os.path.isfile(spec.origin):
            maker = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(maker)
            shards = maker.write_shards(folder, os.path.join(tmp, "wds"), per_shard=max(1, len(source) // 4))
        else:
            raise RuntimeError("benchmarks/make_webdataset.py not found (run from a source checkout)")
        from fasttl.data import scan_class_folder

        folders = scan_class_folder(folder)
        pattern = os.path.join(tmp, "wds", f"train-{{000000..{len(shards) - 1:06d}}}.tar")
        results = {}
        for name, make in (("class folders", lambda: folders),
                           ("WebDataset", lambda: read_webdataset(pattern, folders.classes))):
            started = time.perf_counter()
            built = FeatureCache.build(model, make(), os.path.join(tmp, name.replace(" ", "-")), image_size=size,
                                       backend="torch", progress=False)
            results[name] = (len(built) / (time.perf_counter() - started), built)
        same = torch.equal(results["class folders"][1].features, results["WebDataset"][1].features)
        return {"images": len(source), "folders_ips": results["class folders"][0],
                "webdataset_ips": results["WebDataset"][0], "equal": bool(same)}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _scale_rows(probe: Dict[str, object]) -> List[Dict[str, object]]:
    """The table rows of one scale probe."""
    tag = f"{probe['rows']:,} x {SCALE_DIM} fp16 ({probe['gb']:.2f} GB, {probe['shards']} shards)"
    return [
        {"case": f"{tag}: write", "value": probe["gb"] / probe["write_s"], "unit": "GB/s"},
        {"case": f"{tag}: open", "value": probe["open_s"] * 1e3, "unit": "ms"},
        {"case": f"{tag}: RssAnon after open", "value": probe["rss_anon_after_open_mb"], "unit": "MB"},
        {"case": f"{tag}: RssAnon epoch peak", "value": probe["rss_anon_epoch_peak_mb"], "unit": "MB"},
        {"case": f"{tag}: first epoch (pages mapped as read)", "value": probe["epoch_s"], "unit": "s"},
        *[{"case": f"{tag}: epoch throughput, shuffle={shuffle}{', another process copying' if busy else ''}"
                   + _spread(epochs[shuffle]),
           "value": epochs[shuffle]["epoch_gbps"], "unit": "GB/s",
           "of_copy": epochs[shuffle]["epoch_gbps"] / probe["copy_gbps"]}
          for busy, epochs in ((False, probe["epochs"]), (True, probe["competing"])) for shuffle in SHUFFLES],
        {"case": f"{tag}: memory copy (same process)", "value": probe["copy_gbps"], "unit": "GB/s",
         "of_copy": 1.0},
        *([{"case": f"{tag}: memory copy (same process), another process copying",
            "value": probe["copy_competing_gbps"], "unit": "GB/s",
            "of_copy": probe["copy_competing_gbps"] / probe["copy_gbps"]}] if "copy_competing_gbps" in probe else []),
        {"case": f"{tag}: batch gather, shard pointer table", "value": probe["batch_table_ms"], "unit": "ms"},
        {"case": f"{tag}: batch gather, grouped by shard", "value": probe["batch_grouped_ms"], "unit": "ms"},
    ]


def _spread(epoch: Dict[str, object]) -> str:
    low, high = epoch.get("epoch_gbps_range") or (None, None)
    return f" (median of {SCALE_EPOCHS}: {low:.3g}-{high:.3g})" if low is not None else ""


def run_scale(quick: bool = False, data: str = None, root: str = None) -> Dict[str, object]:
    """`fasttl bench cache --scale`: 2,000,000 x 512 fp16 rows (2 GB) written through
    FeatureCache.write under /tmp, then opened and read for one shuffled epoch (batch 8192) in a
    fresh process; the same at 200,000 rows; then extraction from WebDataset vs class folders.
    The caches are deleted afterwards."""
    import shutil

    rows_out, probes = [], []
    sizes = (20_000, 2_000) if quick else SCALE_ROWS
    for rows in sizes:
        directory = tempfile.mkdtemp(prefix="fasttl-scale-", dir=root or "/tmp")
        try:
            started = time.perf_counter()
            FeatureCache.write(directory, _synthetic_chunks(rows, SCALE_DIM), torch.arange(rows) % 10,
                               classes=[str(i) for i in range(10)], dtype="fp16")
            write_s = time.perf_counter() - started
            probe = dict(_probe_in_fresh_process(directory, SCALE_BATCH, SHUFFLES), write_s=write_s,
                         gb=rows * SCALE_DIM * 2 / 1e9)
            competing = _probe_in_fresh_process(directory, SCALE_BATCH, SHUFFLES, competing=True)
            probe["competing"], probe["copy_competing_gbps"] = competing["epochs"], competing["copy_gbps"]
        finally:
            shutil.rmtree(directory, ignore_errors=True)
        probes.append(probe)
        rows_out += _scale_rows(probe)
    formats = _extraction_formats(bench_splits(data)[1], 60 if quick else 2000)
    rows_out += [
        {"case": f"extraction, {formats['images']} CIFAR-10 JPEGs as class folders", "value": formats["folders_ips"],
         "unit": "images/s"},
        {"case": "extraction, the same as WebDataset shards", "value": formats["webdataset_ips"],
         "unit": "images/s"},
        {"case": "WebDataset / class folders", "value": formats["webdataset_ips"] / formats["folders_ips"],
         "unit": "x"},
    ]
    return {"name": "cache", "mode": "scale", "device": "cpu", "rows": rows_out, "probes": probes,
            "extraction_formats": formats, "notes": [
                f"FeatureCache.write of synthetic rows (65,536-row shards), then in a fresh process: open, one "
                f"shuffled epoch of cache.loader(batch {SCALE_BATCH}) into fp32 batches on the CPU. RssAnon from "
                "/proc/self/status above the interpreter's baseline after importing fasttl; the shard pages "
                "(page cache, just written, so warm) count as RssFile, not RssAnon.",
                f"epoch GB/s counts fp16 rows read + fp32 batch written (the median of {SCALE_EPOCHS} epochs after the "
                "first, with their range), of copy: against the idle copy rate (the copy beside the other process "
                "is shown too: what the other process leaves this one); shuffle "
                "rows: an exact per-row shuffle, each batch read in ascending order; blocks: blocks of "
                f"{BLOCK_ROWS} neighbouring rows shuffled (fasttl.cache.order). \"another process copying\": the "
                "same epochs in a fresh process while a second process copies 256 MiB buffers on one thread. "
                "copy: torch copy_ of 256 MiB in the same "
                "process, bytes read + written.",
                "batch gather rows: 8192 random rows per call, after the epoch in the same process; \"shard pointer "
                "table\" (the native gather reads each row in its shard through a table of shard addresses: what the "
                "loader uses) beside \"grouped by shard\" (one gather call per shard touched, rows put back in batch "
                "order). The table was chosen on this measurement.",
                f"extraction: EfficientNet-Lite0 at 128 px, PyTorch backend, batch 32; the two caches are equal row "
                f"for row: {formats['equal']}."]}
