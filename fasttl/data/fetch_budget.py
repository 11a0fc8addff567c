"""The time `fasttl data fetch` gives a download (fasttl.data.fetch): a total deadline and a
minimum rate, checked as blocks arrive and, by a watcher thread, while a read waits: a server can
hold one read open for as long as it likes (a chunked body's endless trailer lines, a chunk-size
line trickled a byte at a time) and never reach the next check between reads."""
from __future__ import annotations

import contextlib
import socket
import threading
import time
from typing import Optional

from fasttl.data.http_reply import DownloadError, named_address

RATE_WINDOW_S = 30.0  # the window --min-rate is measured over
_WATCH_EVERY_S = 0.25  # how often the watcher looks at the budget while a read waits


class Budget:
    """The time a download may take: a total deadline, and a minimum rate over each window (a
    server that trickles a byte every few seconds never trips a socket timeout)."""

    def __init__(self, deadline_s: float, min_rate: float, url: str):
        self.deadline_s, self.min_rate, self.url = deadline_s, min_rate, url
        self.redirected: Optional[str] = None  # where the reply came from, once it came
        self.started = self.window_start = time.monotonic()
        self.window_bytes = self.size = self.arrived = 0  # size: what the partial keeps; arrived: the body's bytes
        self._lock = threading.Lock()  # the watcher reads the window while the download rolls it

    def body_starts(self) -> None:
        """The rate is the body's: its first window starts when it does (a server slow to answer
        but fast to send is no slow server; the deadline counts the wait)."""
        with self._lock:
            self.window_start, self.window_bytes = time.monotonic(), 0

    def remaining(self) -> float:
        return self.deadline_s - (time.monotonic() - self.started)

    def past_deadline(self, size: int, redirected: Optional[str] = None) -> DownloadError:
        """`size`: the bytes the partial download keeps (a chunked reply's unchecked tail is cut)."""
        if size:
            again = "run the same command again to resume"
        elif self.arrived:
            again = "nothing was kept (no whole chunk of it arrived): give a longer --deadline"
        else:
            again = "nothing arrived: check that the address answers (--url), or give a longer --deadline"
        return DownloadError(f"fetch: the download of {named_address(self.url, redirected or self.redirected)} "
                             "took longer than "
                             f"{self.deadline_s:g} s (--deadline) and stopped at {size:,} bytes; {again}")

    def problem(self, kept: Optional[int] = None) -> Optional[DownloadError]:
        """Why the download must stop now (past the deadline, or below the rate over a window that
        has run its length), None while it may go on. `kept`: what the partial keeps now, where the
        reader knows better than its last add (a chunk's end checked since)."""
        with self._lock:
            now = time.monotonic()
            if kept is not None:
                self.size = kept
            if now - self.started > self.deadline_s:
                return self.past_deadline(self.size)
            window = now - self.window_start
            if window >= RATE_WINDOW_S and self.window_bytes / window < self.min_rate:
                return DownloadError(f"fetch: {named_address(self.url, self.redirected)} sent "
                                     f"{self.window_bytes / window:,.0f} bytes/s over the last "
                                     f"{window:.0f} s, below {self.min_rate:,.0f} (--min-rate); stopped at "
                                     f"{self.size:,} bytes: run the same command again"
                                     f"{' to resume' if self.size else ''} (or give a lower --min-rate for a server "
                                     "this slow)")
            return None

    def add(self, count: int, size: int) -> None:
        with self._lock:
            self.window_bytes += count
            self.arrived += count
            self.size = size
        problem = self.problem()
        if problem is not None:
            raise problem
        with self._lock:
            if time.monotonic() - self.window_start >= RATE_WINDOW_S:
                self.window_start, self.window_bytes = time.monotonic(), 0


class BodyWatch:
    """While a response body is read: a thread that ends the connection (shutdown, so the waiting
    read returns) once the budget says stop; `tripped` then holds why, for the reader to raise."""

    def __init__(self, budget: Budget, sock: Optional[socket.socket]):
        self.budget, self.sock, self.tripped = budget, sock, None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="fasttl-fetch-budget", daemon=True)

    def _watch(self) -> None:
        while not self._done.wait(_WATCH_EVERY_S):
            problem = self.budget.problem()
            if problem is not None:
                self.tripped = problem
                with contextlib.suppress(OSError):
                    self.sock.shutdown(socket.SHUT_RDWR)
                return

    def __enter__(self) -> "BodyWatch":
        if self.sock is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        if self._thread.is_alive():
            self._thread.join()
