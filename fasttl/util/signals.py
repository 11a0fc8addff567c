"""The signals that end a command from outside (SIGTERM: kill, timeout, a cancelled job; SIGHUP:
a closed terminal or ssh session) handled as Ctrl-C is: raised as an exception, so every `finally`
and `with` on the way out runs (temporary folders removed, child processes stopped, a run's
resume hint printed). By default they end the process where it stands."""
from __future__ import annotations

import contextlib
import signal
import threading

ENDING = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))
STOPPING = (signal.SIGINT, *ENDING)  # Ctrl-C too: after any of them, the others must not cut the cleanup short


class Terminated(KeyboardInterrupt):
    """A SIGTERM or SIGHUP, raised where the process stood; `signum` says which."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def exit_code(interrupt: KeyboardInterrupt) -> int:
    """128 + the signal's number, as a shell reports a process its signal ended (Ctrl-C: 130)."""
    return 128 + getattr(interrupt, "signum", signal.SIGINT)


@contextlib.contextmanager
def ending_signals_raised():
    """While the block runs, SIGTERM and SIGHUP raise Terminated and Ctrl-C KeyboardInterrupt,
    once: after the first, all three are ignored while the cleanup runs (a cancelled CI job sends
    SIGINT, then SIGTERM). Only the main thread can set handlers: elsewhere nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminated(signum, frame):
        for number in STOPPING:  # a second one must not cut the cleanup short (SIGKILL still ends it)
            signal.signal(number, signal.SIG_IGN)
        raise KeyboardInterrupt if signum == signal.SIGINT else Terminated(signum)

    with _handled_by(terminated):
        yield


@contextlib.contextmanager
def _handled_by(handler):
    """The STOPPING signals handled by `handler` while the block runs, then as before; a signal
    already ignored stays ignored: `nohup fasttl run ...` must outlive its terminal."""
    before = {number: signal.signal(number, handler) for number in STOPPING
              if signal.getsignal(number) is not signal.SIG_IGN}
    try:
        yield
    finally:
        for number, previous in before.items():
            signal.signal(number, previous)


@contextlib.contextmanager
def default_actions():
    """While the block runs, SIGTERM, SIGHUP and Ctrl-C end the process where it stands, as
    they do by default: for a block that waits in native code which never returns to Python (a
    rank joining torchrun's store retries for 30 minutes), where a Python handler would run only
    after it. The block must hold nothing that needs cleaning up. Main thread only, as above."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    with _handled_by(signal.SIG_DFL):
        yield
