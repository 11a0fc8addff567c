"""`fasttl bench cache --scale`: a 2 GB cache under /tmp, opened and read from its memory maps in a
fresh process: open time, resident memory, shuffled epochs in GB/s against the machine's copy
bandwidth, idle and beside other jobs; then extraction from WebDataset shards vs class folders."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

import numpy as np
import torch

from fasttl import backbones
from fasttl.bench.common import bench_splits, copy_bandwidth, median_seconds
from fasttl.cache import FeatureCache
from fasttl.cache.order import BLOCK_ROWS
from fasttl.util.signals import ending_signals_raised

SCALE_ROWS = (2_000_000, 200_000)
SCALE_DIM, SCALE_BATCH = 512, 8192
# The loaders timed, by name: each shuffle mode (fasttl.cache.order) with its gather's threads
# chosen by timing (the default), and the exact shuffle with every thread pinned: the loader as it
# was before that choice, kept to show what the choice is for.
LOADERS = {"rows": {"shuffle": "rows"}, "blocks": {"shuffle": "blocks"},
           "rows, every thread": {"shuffle": "rows", "threads": "every"}}
# Epochs timed per loader after the first (which maps the shard pages into the fresh process): the
# median, since one epoch varied 2-3x between runs on the 2-core Xeon (5 to 14 GB/s, the same code).
SCALE_EPOCHS = 5
# Other jobs on the machine while the epochs run, each in its own process: one thread copying
# 256 MiB buffers (competing for memory bandwidth), and a PyTorch job on every core (another
# training run: competing for the cores, which the gather's OpenMP threads then wait on).
# Each loops while its parent lives: a bench killed outright (SIGKILL) leaves no process behind.
COMPETITORS = {
    "another process copying": "import torch; torch.set_num_threads(1); a = torch.ones(1 << 26); "
                               "b = torch.empty_like(a)\nwhile os.getppid() == parent: b.copy_(a)",
    "another process computing on every core": "import torch; a = torch.randn(1024, 1024)\n"
                                               "while os.getppid() == parent: a @ a",
}


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


def scale_probe(directory: str, batch_size: int, loaders) -> Dict[str, object]:
    """Run in a fresh process: open the cache, one epoch of the first loader named in `loaders`
    (LOADERS) as it maps the pages, then SCALE_EPOCHS timed epochs of each, taken in turn; time
    and RssAnon; the copy bandwidth this process sees."""
    import gc

    import fasttl.cache.cache  # noqa: F401  (imports done before the baseline)

    gc.collect()
    baseline = rss_anon_bytes()
    started = time.perf_counter()
    cache = FeatureCache.open(directory)
    open_s = time.perf_counter() - started
    after_open = rss_anon_bytes()
    peak, epochs = [after_open], {}
    moved = len(cache) * cache.feature_dim * (cache.shards[0].element_size() + 4)  # rows read + fp32 written
    loaders = {name: cache.loader(batch_size, seed=0, **_options(name)) for name in loaders}
    first_s = _epoch(cache, next(iter(loaders.values())), lambda: peak.append(rss_anon_bytes()))  # pages mapped
    times = {name: [] for name in loaders}
    for epoch in range(SCALE_EPOCHS):  # round robin: each loader meets the same moments of the other job
        for name, loader in loaders.items():
            times[name].append(_epoch(cache, loader, lambda: peak.append(rss_anon_bytes())))
    for name, seconds in times.items():
        epochs[name] = {"epoch_s": float(np.median(seconds)), "epoch_gbps": moved / float(np.median(seconds)) / 1e9,
                        "epoch_gbps_range": [moved / max(seconds) / 1e9, moved / min(seconds) / 1e9],
                        "gather_threads": dict(loaders[name].threads.seconds_per_row)}
    # The measurement that chose the per-shard pointer table over grouping each batch by shard.
    table = cache._shard_table()
    indices = torch.randperm(len(cache), generator=torch.Generator().manual_seed(1))[:batch_size]
    out = torch.empty((len(indices), cache.feature_dim))
    methods = {m: median_seconds(lambda m=m: table.gather(indices, out=out, method=m), repeats=5, warmup=1)
               for m in ("table", "grouped")}
    return {"rows": len(cache), "shards": len(cache.shards), "open_s": open_s, "epochs": epochs,
            "rss_anon_baseline_mb": baseline / 2**20, "rss_anon_after_open_mb": (after_open - baseline) / 2**20,
            "rss_anon_epoch_peak_mb": (max(peak) - baseline) / 2**20, "epoch_s": first_s,
            "epoch_gbps": moved / first_s / 1e9, "copy_gbps": copy_bandwidth("cpu"),
            "batch_table_ms": methods["table"] * 1e3, "batch_grouped_ms": methods["grouped"] * 1e3}


def _options(name: str) -> dict:
    options = dict(LOADERS[name])
    if options.get("threads") == "every":
        options["threads"] = torch.get_num_threads()
    return options


def _epoch(cache, loader, after_batch) -> float:
    """Seconds for one epoch of `loader`, every row seen once."""
    rows, started = 0, time.perf_counter()
    for features, labels in loader:
        rows += features.shape[0]
        after_batch()
    assert rows == len(cache)
    return time.perf_counter() - started


def _probe_in_fresh_process(directory: str, batch_size: int, competitor: str = None) -> Dict[str, object]:
    code = ("import json, sys; from fasttl.bench.cache_scale import scale_probe; "
            "print(json.dumps(scale_probe(sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3]))))")
    other = subprocess.Popen([sys.executable, "-c", f"import os; parent = {os.getpid()}; {COMPETITORS[competitor]}"]) \
        if competitor else None
    try:
        if other is not None:
            time.sleep(2)  # its buffers allocated, its loop running
        result = subprocess.run([sys.executable, "-c", code, directory, str(batch_size), json.dumps(list(LOADERS))],
                                capture_output=True, text=True, timeout=3600)
    finally:
        if other is not None:
            other.kill()
            other.wait()
    if result.returncode != 0:
        raise RuntimeError(f"scale probe failed: {result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _extraction_formats(train, count: int, size: int = 128) -> Dict[str, float]:
    """Extraction images/s from the same CIFAR-10 JPEGs as class folders and as WebDataset shards
    (write_webdataset's layout), same backbone, backend and batch; caches compared."""
    import shutil

    from fasttl.data import scan_class_folder
    from fasttl.data.formats.webdataset import read_webdataset, write_webdataset

    per_class = max(1, count // len(train.classes))
    keep = [i for c in range(len(train.classes)) for i in
            [j for j, label in enumerate(train.labels) if label == c][:per_class]]
    source = train.subset(keep)
    model = backbones.create("efficientnet_lite0").freeze()
    tmp = tempfile.mkdtemp(prefix="fasttl-wds-")
    try:
        folder = os.path.join(tmp, "folders")
        for path, label in zip(source.files, source.labels):
            os.makedirs(os.path.join(folder, source.classes[label]), exist_ok=True)
            shutil.copy(path, os.path.join(folder, source.classes[label], os.path.basename(path)))
        folders = scan_class_folder(folder)
        shards = write_webdataset(folders, os.path.join(tmp, "wds"), per_shard=max(1, len(source) // 4))
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
    """The table rows of one scale probe: epochs idle, then beside each competitor (against the
    idle copy rate, and against the copy rate the competitor leaves)."""
    tag = f"{probe['rows']:,} x {SCALE_DIM} fp16 ({probe['gb']:.2f} GB, {probe['shards']} shards)"
    rows = [
        {"case": f"{tag}: write", "value": probe["gb"] / probe["write_s"], "unit": "GB/s"},
        {"case": f"{tag}: open", "value": probe["open_s"] * 1e3, "unit": "ms"},
        {"case": f"{tag}: RssAnon after open", "value": probe["rss_anon_after_open_mb"], "unit": "MB"},
        {"case": f"{tag}: RssAnon epoch peak", "value": probe["rss_anon_epoch_peak_mb"], "unit": "MB"},
        {"case": f"{tag}: first epoch (pages mapped as read)", "value": probe["epoch_s"], "unit": "s"},
    ]
    for beside in (None, *probe["beside"]):
        epochs = probe["epochs"] if beside is None else probe["beside"][beside]["epochs"]
        copy = probe["copy_gbps"] if beside is None else probe["beside"][beside]["copy_gbps"]
        rows += [{"case": f"{tag}: epoch throughput, shuffle={name}{', ' + beside if beside else ''}"
                          + _spread(epoch), "value": epoch["epoch_gbps"], "unit": "GB/s",
                  "of_copy": epoch["epoch_gbps"] / probe["copy_gbps"],
                  **({"of_copy_beside": epoch["epoch_gbps"] / copy} if beside else {})}
                 for name, epoch in epochs.items()]
        rows.append({"case": f"{tag}: memory copy (same process){', ' + beside if beside else ''}", "value": copy,
                     "unit": "GB/s", "of_copy": copy / probe["copy_gbps"]})
    return rows + [
        {"case": f"{tag}: batch gather, shard pointer table", "value": probe["batch_table_ms"], "unit": "ms"},
        {"case": f"{tag}: batch gather, grouped by shard", "value": probe["batch_grouped_ms"], "unit": "ms"},
    ]


def _spread(epoch: Dict[str, object]) -> str:
    low, high = epoch.get("epoch_gbps_range") or (None, None)
    return f" (median of {SCALE_EPOCHS}: {low:.3g}-{high:.3g})" if low is not None else ""


def _probe_size(rows: int, root: Optional[str]) -> Dict[str, object]:
    """A cache of `rows` synthetic rows written under `root` (or /tmp), probed idle and beside each
    competitor, then deleted."""
    import shutil

    directory = tempfile.mkdtemp(prefix="fasttl-scale-", dir=root or "/tmp")
    try:
        started = time.perf_counter()
        FeatureCache.write(directory, _synthetic_chunks(rows, SCALE_DIM), torch.arange(rows) % 10,
                           classes=[str(i) for i in range(10)], dtype="fp16")
        write_s = time.perf_counter() - started
        probe = dict(_probe_in_fresh_process(directory, SCALE_BATCH), write_s=write_s,
                     gb=rows * SCALE_DIM * 2 / 1e9)
        probe["beside"] = {}
        for competitor in COMPETITORS:
            busy = _probe_in_fresh_process(directory, SCALE_BATCH, competitor)
            probe["beside"][competitor] = {"epochs": busy["epochs"], "copy_gbps": busy["copy_gbps"]}
        return probe
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def run_scale(quick: bool = False, data: str = None, root: str = None) -> Dict[str, object]:
    """`fasttl bench cache --scale`: 2,000,000 x 512 fp16 rows (2 GB) written through
    FeatureCache.write under /tmp, then opened and read for one shuffled epoch (batch 8192) in a
    fresh process; the same at 200,000 rows; then extraction from WebDataset vs class folders.
    The caches are deleted afterwards."""
    train = bench_splits(data)[1]  # before the probes: missing data is said at once, not after them
    rows_out, probes = [], []
    sizes = (20_000, 2_000) if quick else SCALE_ROWS
    with ending_signals_raised():  # SIGTERM, SIGHUP: out through the cleanup, as Ctrl-C
        for rows in sizes:
            probe = _probe_size(rows, root)
            probes.append(probe)
            rows_out += _scale_rows(probe)
        formats = _extraction_formats(train, 60 if quick else 2000)
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
                "first, with their range), of copy: against the idle copy rate; beside another process, the share "
                "of the copy rate that process leaves this one is given in brackets. shuffle rows: an exact "
                "per-row shuffle, each batch read in ascending order; blocks: blocks of "
                f"{BLOCK_ROWS} neighbouring rows shuffled (fasttl.cache.order); both with the gather's threads "
                "chosen by timing (every thread unless one is faster by a quarter: fasttl.cache.gather_threads); "
                "\"rows, every thread\": the exact shuffle with the gather pinned to every thread, as the loader "
                "read before that choice. The gather's threads claim chunks of rows, the caller waiting only for "
                "chunks a helper has begun (csrc/cpu/claim_pool.h). The loaders' epochs are taken in turn. "
                "Beside another process: the same epochs in a "
                "fresh process while a second process copies 256 MiB buffers on one thread, or multiplies "
                "1024 x 1024 matrices on every core. copy: torch copy_ of 256 MiB in the same process, bytes read "
                "+ written.",
                "batch gather rows: 8192 random rows per call, after the epoch in the same process; \"shard pointer "
                "table\" (the native gather reads each row in its shard through a table of shard addresses: what the "
                "loader uses) beside \"grouped by shard\" (one gather call per shard touched, rows put back in batch "
                "order). The table was chosen on this measurement.",
                f"extraction: EfficientNet-Lite0 at 128 px, PyTorch backend, batch 32; the two caches are equal row "
                f"for row: {formats['equal']}."]}
