"""Index-value checks of fasttl's ops: on the host for CPU tensors; on CUDA without a host
sync (a bad index is replaced on the device by a harmless one and reported, by name, at the next
fasttl call once the GPU has run it, or at raise_device_errors())."""
from __future__ import annotations

from collections import deque
from typing import Optional

import torch
from torch import Tensor


# A CUDA call must not wait for the GPU to learn whether an index was bad. So on these devices
# the bad entries are replaced on the device (nothing out of bounds is ever touched), and whether
# there were any is copied behind the kernel into pinned host memory. The next fasttl op call that
# finds such a copy done raises its named ValueError; raise_device_errors() waits for them.
SYNC_FREE_DEVICE_TYPES = ("cuda",)  # the tests add "cpu" to run these paths without a GPU
_MAX_PENDING = 1024
_pending: deque = deque()  # (host flag, cuda event or None, message), oldest first


def checks_on_device(t: Tensor) -> bool:
    return t.device.type in SYNC_FREE_DEVICE_TYPES


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _defer_error(bad_any: Tensor, message: str) -> None:
    """Reports `message` later if the 0-dim bool `bad_any` turns out true; no host sync now."""
    if _capturing(bad_any.device):
        # Inside a CUDA graph nothing can be waited on: a device-side assert stops the replay.
        torch._assert_async(~bad_any, message)
        return
    if bad_any.device.type == "cuda":
        flag = torch.empty((), dtype=torch.bool, pin_memory=True)
        flag.copy_(bad_any, non_blocking=True)
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(bad_any.device))  # the stream the copy went on
    else:  # the CPU stand-in of the tests: the value is there already
        flag, done = bad_any, None
    _pending.append((flag, done, message))
    if len(_pending) > _MAX_PENDING and _pending[0][1] is not None:
        _pending[0][1].synchronize()  # the GPU is far behind: wait for the oldest check (rare)


def _raise_ready(wait: bool) -> None:
    """Raises the first reported bad index among the finished checks (all of them when `wait`)."""
    kept = deque()
    error = None
    while _pending:
        flag, done, message = _pending.popleft()
        if done is not None and not wait and not done.query():
            kept.append((flag, done, message))
            continue
        if done is not None and wait:
            done.synchronize()
        # Host memory (pinned): numpy() cannot read a device tensor, so this never syncs.
        if error is None and bool(flag.numpy()):
            error = message
    _pending.extend(kept)
    if error is not None:
        _pending.clear()  # one bad batch, one error
        raise ValueError(error)


def raise_device_errors() -> None:
    """Waits for every pending CUDA index check of fasttl's ops and raises the first bad index
    found as a ValueError naming the argument (a host sync: call it where one costs nothing, e.g.
    at the end of an epoch). Without this, such an error surfaces at the next fasttl op call once
    the GPU has run the call that received the index."""
    if _pending and not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()):
        _raise_ready(wait=True)


def raise_reported(device: torch.device) -> None:
    """At the start of an op on a sync-free device: the errors of earlier calls that are known."""
    if _pending and not _capturing(device):
        _raise_ready(wait=False)


def check_range(name: str, index: Tensor, limit: int, ignore_index: Optional[int] = None,
                 replacement: Optional[int] = None) -> Tensor:
    """Values in [0, limit) (or equal to ignore_index). Returns the index safe to hand to a kernel:
    on a sync-free device, bad entries are replaced by `replacement` (default: ignore_index, else 0)."""
    if index.numel() == 0:
        return index
    bad = (index < 0) | (index >= limit)
    if ignore_index is not None:
        bad &= index != ignore_index
    allowed = f"[0, {limit})" + ("" if ignore_index is None else f" or ignore_index={ignore_index}")
    if checks_on_device(index):
        _defer_error(bad.any(), f"{name}: an index out of range (expected values in {allowed}) reached a "
                                f"{index.device.type} call, which used a valid one in its place (its result is "
                                "wrong; nothing outside the tensors was touched)")
        if replacement is None:
            replacement = 0 if ignore_index is None else ignore_index
        return torch.where(bad, torch.full_like(index, replacement), index)
    if bool(bad.any()):
        raise ValueError(f"{name}: index {index[bad][:5].tolist()} out of range (expected values in {allowed})")
    return index


def check_unique(name: str, index: Tensor) -> None:
    """Distinct values: two writes to one row race (OpenMP threads, CUDA blocks) and may mix.
    Negative entries are rows the kernel skips (bad rows replaced by check_range)."""
    if index.numel() < 2:
        return
    ordered = index.sort().values
    repeated = ordered[1:] == ordered[:-1]
    if checks_on_device(index):
        _defer_error((repeated & (ordered[1:] >= 0)).any(),
                     f"{name}: a row index repeated (expected distinct rows) in a {index.device.type} call; "
                     "its rows may hold a mix of the repeated writes")
    elif bool(repeated.any()):
        raise ValueError(f"{name}: row {ordered[1:][repeated][:5].tolist()} repeated (expected distinct rows)")
