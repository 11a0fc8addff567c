"""Timing, machine description and table printing shared by every benchmark."""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import time
from typing import Callable, Dict, List, Optional

import torch

from fasttl.util.machine import cpu_model


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timings(fn: Callable[[], object], device: str = "cpu", repeats: int = 10, warmup: int = 2,
            min_seconds: float = 0.0) -> Dict[str, float]:
    """Wall times of fn() over `repeats` runs (at least `min_seconds` in all) after `warmup`
    runs, device synchronized: min, median, the interquartile range as a fraction of the median
    ("spread"), and the count."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times: List[float] = []
    start_all = time.perf_counter()
    while len(times) < repeats or time.perf_counter() - start_all < min_seconds:
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    quartiles = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    median = statistics.median(times)
    return {"min": min(times), "median": median, "spread": (quartiles[2] - quartiles[0]) / median, "n": len(times)}


def median_seconds(fn: Callable[[], object], device: str = "cpu", repeats: int = 10, warmup: int = 2,
                   min_seconds: float = 0.0) -> float:
    """Median wall time of fn() (see timings)."""
    return timings(fn, device, repeats, warmup, min_seconds)["median"]


def spread_text(t: Dict[str, float]) -> str:
    """"12.3 (min 12.0, IQR 4%)": a median in ms with its minimum and spread."""
    return f"{1e3 * t['median']:.3g} (min {1e3 * t['min']:.3g}, IQR {100 * t['spread']:.0f}%)"


def copy_bandwidth(device: str = "cpu", nbytes: int = 256 << 20, repeats: int = 10) -> float:
    """Measured memory-copy bandwidth in GB/s, counting bytes read plus bytes written."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    seconds = median_seconds(lambda: dst.copy_(src), device, repeats=repeats)
    return 2 * nbytes / seconds / 1e9


def inplace_bandwidth(device: str = "cpu", nbytes: int = 256 << 20, repeats: int = 10) -> float:
    """Measured bandwidth of an in-place stream (x += 1) in GB/s, bytes read plus written. The
    yardstick for kernels that update buffers in place: a copy into another buffer also pays
    for reading each destination line before writing it (about 1.5x the traffic on this CPU)."""
    x = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    seconds = median_seconds(lambda: x.add_(1.0), device, repeats=repeats)
    return 2 * nbytes / seconds / 1e9


def cpu_caches() -> Dict[str, str]:
    """{"L1d": "48K", "L2": "2048K", "L3": "32768K", ...} of cpu0, read from sysfs ({} where it
    can't be read): what a benchmark's text says about caches comes from here, never from prose."""
    caches = {}
    root = "/sys/devices/system/cpu/cpu0/cache"
    try:
        entries = sorted(os.listdir(root))
    except OSError:
        return caches
    for entry in entries:
        try:
            with open(os.path.join(root, entry, "level")) as f:
                level = f.read().strip()
            with open(os.path.join(root, entry, "type")) as f:
                kind = f.read().strip()
            with open(os.path.join(root, entry, "size")) as f:
                size = f.read().strip()
        except OSError:
            continue
        name = f"L{level}" + {"Data": "d", "Instruction": "i"}.get(kind, "")
        caches[name] = size
    return caches


def cache_bytes(level: str) -> Optional[int]:
    """Size in bytes of a cache level of cpu0 ("L3"), or None."""
    text = cpu_caches().get(level)
    if not text:
        return None
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)


def load_average() -> Optional[float]:
    """The 1-minute load average: how busy the machine was (2 on an idle 2-core box is full)."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def machine() -> Dict[str, object]:
    info = {
        "date": datetime.date.today().isoformat(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "caches": cpu_caches(),
        "load_1m": load_average(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "fasttl": __import__("fasttl").__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    return info


def header(info: Dict[str, object], device: str) -> str:
    gpu = f", GPU {info['gpu']}" if info.get("gpu") else ""
    caches = ", ".join(f"{k} {v}" for k, v in (info.get("caches") or {}).items() if k in ("L2", "L3"))
    return (f"{info['date']} | {info['cpu']} ({info['cores']} cores, {info['threads']} torch threads{gpu}"
            + (f"; {caches}" if caches else "") + f") | load {info.get('load_1m')} | device {device} | "
            f"torch {info['torch']} | fasttl {info['fasttl']}")


def format_table(columns: List[str], rows: List[List[object]]) -> str:
    """A Markdown table (readable in a terminal too)."""
    cells = [[str(c) for c in columns]] + [[_fmt(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    line = lambda r: "| " + " | ".join(v.ljust(w) for v, w in zip(r, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def save_json(path: Optional[str], payload: Dict[str, object], replace: bool = True) -> None:
    """Written atomically through fasttl's own temporary (never a user's PATH.tmp, never through a
    link); an error names PATH. With `replace` False, a file at PATH is kept (FileExistsError)."""
    if not path:
        return
    from fasttl.util.files import write_atomic

    write_atomic(path, json.dumps(payload, indent=2).encode(), replace=replace)


# The images the data, cache and e2e benchmarks read: FASTTL_BENCH_DATA, else the shared CIFAR-10.
DEFAULT_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "data", "cifar10")
MIN_IMAGES = 20  # fewer and a benchmark's per-class sampling or its timing means nothing


def bench_splits(data: Optional[str] = None):
    """(train, test) class-folder splits of the benchmarks' images, checked: train/ and test/ of
    class folders with at least MIN_IMAGES each; else an error naming where they came from."""
    from fasttl.data import class_folder_splits
    from fasttl.util import settings
    from fasttl.util.errors import OptionError

    where = "--data" if data else f"{settings.BENCH_DATA.name}" if settings.BENCH_DATA.is_set() else \
        f"the default ({os.path.normpath(DEFAULT_DATA)}; set {settings.BENCH_DATA.name})"
    from fasttl.util.errors import DataError

    from fasttl.util.files import absolute

    root = absolute(data or settings.BENCH_DATA.value() or DEFAULT_DATA)
    try:
        train, test = class_folder_splits(root)
    except DataError as exc:  # say where the path came from: the fix is there
        raise OptionError(f"{exc} ({where})") from None
    if test is None:
        raise OptionError(f"data: {root} ({where}) has no train/ and test/ class folders, which the benchmarks read")
    for name, split in (("train", train), ("test", test)):
        if len(split) < MIN_IMAGES:
            raise OptionError(f"data: {root}/{name} ({where}) holds {len(split)} images; the benchmarks need at "
                              f"least {MIN_IMAGES} in each split")
    return root, train, test


def every_nth(source, count: int):
    """About `count` samples of `source`, spread evenly over it (class folders are sorted)."""
    return source.subset(range(0, len(source), max(1, len(source) // count)))
