"""How many threads a cache loader's gather uses, chosen by timing as the epoch runs.

A gather on every core is the fastest on an idle machine (1.8x one thread's rate on the 2-core
Xeon). It used to be an OpenMP loop, and beside a job computing on every core it switched
unpredictably between that and a sixth of one thread's rate for epochs at a time (1.55 against
5.3-8 GB/s over 2,000,000 x 512 fp16 rows): its static split made each batch wait for whichever
thread the scheduler had parked. The gather's threads now claim chunks of rows, and the caller
waits only for chunks a helper has begun (csrc/cpu/claim_pool.h), so a parked helper costs
nothing. The timing stays as a guard: the loader times its batches with every thread and with
one, gathers with every thread unless one is faster by MARGIN, and times the other again after
EXPLORE_EVERY batches, then less and less often while the choice holds (up to EXPLORE_MOST),
since other jobs come and go."""
from __future__ import annotations

import os
import time
from typing import Callable, Dict, Optional

import torch

EXPLORE_EVERY, EXPLORE_MOST = 16, 128  # batches between timings of the count not chosen
MARGIN = 1.25  # one thread is chosen only when it gathers this much faster than every thread
# The most a loader may pin: OpenMP starts every thread asked for (a hundred thousand hung it).
MOST_THREADS = max(256, os.cpu_count() or 1)


class GatherThreads:
    """The thread count for each batch's gather: `pinned` if given, else torch.get_num_threads()
    or 1 by seconds per row (a running average, halfway towards each new batch's)."""

    def __init__(self, pinned: Optional[int] = None):
        if pinned is not None and pinned > MOST_THREADS:
            raise ValueError(f"threads: {pinned} is more than a gather can use here (1 to {MOST_THREADS})")
        self.pinned = pinned
        self.seconds_per_row: Dict[int, float] = {}
        self.chosen: Optional[int] = None
        self.until_explore, self.interval = EXPLORE_EVERY, EXPLORE_EVERY

    def candidates(self) -> tuple:
        if self.pinned is not None:
            return (self.pinned,)
        # read each batch (the user may change it); capped as `threads` is: each thread beyond the
        # first is a helper that lives as long as the process (torch.set_num_threads(3000): 2999)
        every = min(torch.get_num_threads(), MOST_THREADS)
        return (every, 1) if every > 1 else (1,)

    def choose(self) -> int:
        candidates = self.candidates()
        untimed = [c for c in candidates if c not in self.seconds_per_row]
        if untimed:
            return untimed[0]
        every = candidates[0]
        one_faster = len(candidates) > 1 and \
            self.seconds_per_row[1] * MARGIN < self.seconds_per_row[every]
        best = 1 if one_faster else every
        if best != self.chosen:  # a new choice: the other is timed again soon
            self.chosen, self.interval, self.until_explore = best, EXPLORE_EVERY, EXPLORE_EVERY
        if len(candidates) > 1:
            self.until_explore -= 1
            if self.until_explore <= 0:
                self.interval = min(2 * self.interval, EXPLORE_MOST)
                self.until_explore = self.interval
                return next(c for c in candidates if c != best)
        return best

    def record(self, threads: int, rows: int, seconds: float) -> None:
        if rows:
            rate = seconds / rows
            before = self.seconds_per_row.get(threads)
            self.seconds_per_row[threads] = rate if before is None else (before + rate) / 2

    def run(self, gather: Callable[[int], torch.Tensor], rows: int) -> torch.Tensor:
        """gather(threads) with the chosen count, timed."""
        threads = self.choose()
        started = time.perf_counter()
        out = gather(threads)
        self.record(threads, rows, time.perf_counter() - started)
        return out
