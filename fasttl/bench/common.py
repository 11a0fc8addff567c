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


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def median_seconds(fn: Callable[[], object], device: str = "cpu", repeats: int = 10, warmup: int = 2,
                   min_seconds: float = 0.0) -> float:
    """Median wall time of fn() over `repeats` runs after `warmup` runs (device synchronized)."""
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
    return statistics.median(times)


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


def machine() -> Dict[str, object]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "date": datetime.date.today().isoformat(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "fasttl": __import__("fasttl").__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    return info


def header(info: Dict[str, object], device: str) -> str:
    gpu = f", GPU {info['gpu']}" if info.get("gpu") else ""
    return (f"{info['date']} | {info['cpu']} ({info['cores']} cores, {info['threads']} torch threads{gpu}) | "
            f"device {device} | torch {info['torch']} | fasttl {info['fasttl']}")


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


def save_json(path: Optional[str], payload: Dict[str, object]) -> None:
    if not path:
        return
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
