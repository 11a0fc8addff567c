"""How many threads a cache loader's gather uses on the CPU, chosen by measurement as it runs.

A gather is bound by memory, not arithmetic, and its rows are split evenly between its threads
(OpenMP, static schedule): when another process takes one of the cores, the thread that shares
it finishes last and the whole batch waits for it, while its spinning partner takes more of the
time it needed. On the 2-core Xeon an epoch over a 200,000 x 512 fp16 cache fell from ~20 GB/s
to 3-6 GB/s on two threads beside a process copying memory, and ran at ~10 GB/s on one; idle,
two threads are the faster. No setting suits both, and the load changes while a job runs, so
each loader keeps timing its batches: every candidate count in turn at first, then the faster
one, with the other tried again every EXPLORE_EVERY batches (a batch of 8,192 rows takes a few
milliseconds: the exploration costs little, and the loader follows the load within a second)."""
from __future__ import annotations

import time
from typing import Callable, Dict, Optional, TypeVar

import torch

EXPLORE_EVERY = 8
SMOOTHING = 0.3  # the weight of the newest batch in each count's running seconds-per-row
T = TypeVar("T")


class GatherThreads:
    """The thread counts tried (torch's count, and one) and their running seconds per row."""

    def __init__(self, most: Optional[int] = None):
        most = torch.get_num_threads() if most is None else int(most)
        self.candidates = (most, 1) if most > 1 else (1,)
        self.per_row: Dict[int, float] = {}
        self.batches = 0

    def choose(self) -> int:
        untried = [t for t in self.candidates if t not in self.per_row]
        if untried:
            return untried[0]
        best = min(self.candidates, key=lambda t: self.per_row[t])
        if self.batches % EXPLORE_EVERY == EXPLORE_EVERY - 1:
            return next(t for t in self.candidates if t != best)
        return best

    def record(self, threads: int, seconds: float, rows: int) -> None:
        self.batches += 1
        if rows <= 0:
            return
        rate = seconds / rows
        last = self.per_row.get(threads)
        self.per_row[threads] = rate if last is None else (1 - SMOOTHING) * last + SMOOTHING * rate

    def timed(self, gather: Callable[[int], T], rows: int) -> T:
        """gather(threads) with the count chosen, its time recorded."""
        if len(self.candidates) == 1:
            return gather(self.candidates[0])
        threads = self.choose()
        started = time.perf_counter()
        result = gather(threads)
        self.record(threads, time.perf_counter() - started, rows)
        return result
