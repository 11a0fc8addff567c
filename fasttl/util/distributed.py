"""torchrun's process group, joined and read in one place: `fasttl extract` and `fasttl run`
(finetune) join it the same way, and every layer asks it for (rank, world size) the same way."""
from __future__ import annotations

import os
from typing import Tuple

import torch
import torch.distributed as dist

from fasttl.util import signals
from fasttl.util.checks import decimal, shown


# What torchrun sets for every process it starts; a WORLD_SIZE > 1 without the rest is a shell's leftover.
TORCHRUN_VARIABLES = ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def launched_by_torchrun() -> bool:
    """Whether this process is one of several torchrun started (WORLD_SIZE > 1, with the other
    variables torchrun sets); a leftover or malformed one is an OptionError naming it."""
    from fasttl.util.errors import OptionError

    given = os.environ.get("WORLD_SIZE", "1")
    world = decimal(given.strip(), signed=True)  # a negative one keeps its own message
    if world is None:
        raise OptionError(f"WORLD_SIZE: expected a number of processes, got {shown(given)} (unset it, or start fasttl "
                          "with torchrun)")
    if world < 1:
        raise OptionError(f"WORLD_SIZE: expected 1 or more processes, got {shown(given)} (unset it, or start fasttl "
                          "with torchrun)")
    if world == 1:
        rank = os.environ.get("RANK")
        if rank is not None and rank.strip() and decimal(rank.strip()) != 0:
            world_said = f"WORLD_SIZE={given}" if "WORLD_SIZE" in os.environ else "no WORLD_SIZE (one process)"
            raise OptionError(f"RANK={shown(rank)} with {world_said}: a single process is rank 0 (unset RANK, a "
                              "leftover from another job, or start fasttl with torchrun)")
        return False
    missing = [name for name in TORCHRUN_VARIABLES if not os.environ.get(name)]
    if missing:
        raise OptionError(f"WORLD_SIZE={given} but {', '.join(missing)} not set: start fasttl with torchrun, or unset "
                          "WORLD_SIZE (a leftover from another job)")
    for name in ("RANK", "LOCAL_RANK"):
        if decimal(os.environ[name]) is None:
            raise OptionError(f"{name}: expected a number, got {shown(os.environ[name])} (start fasttl with torchrun)")
    if decimal(os.environ["RANK"]) >= world:  # it could never join: the others would wait for it forever
        raise OptionError(f"RANK={os.environ['RANK']} is not below WORLD_SIZE={world}: ranks are 0 to {world - 1} "
                          "(start fasttl with torchrun, which sets them)")
    _check_master()
    return True


def _check_master() -> None:
    """MASTER_PORT a port number and MASTER_ADDR a host this machine resolves: else torch raises
    a traceback, or every rank waits for a store that can't be reached."""
    import socket

    from fasttl.util.errors import OptionError

    port, host = os.environ["MASTER_PORT"], os.environ["MASTER_ADDR"]
    if not 1 <= (decimal(port) or 0) <= 65535:
        raise OptionError(f"MASTER_PORT: expected a port number 1 to 65535, got {shown(port)} (start fasttl with "
                          "torchrun, or set it to a free port)")
    try:
        socket.getaddrinfo(host, int(port))
    except (OSError, UnicodeError):
        raise OptionError(f"MASTER_ADDR: {shown(host)} does not resolve to an address here; set it to the host of "
                          "rank 0 (127.0.0.1 on one machine)") from None


JOIN_NOTICE_S = 30.0  # a rank still waiting for the others this long says so (torchrun's own wait is silent)


def _init_group(backend: str) -> None:
    import sys
    import threading

    where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
    notice = threading.Timer(JOIN_NOTICE_S, lambda: print(
        f"fasttl: rank {os.environ.get('RANK')} of {os.environ.get('WORLD_SIZE')}: still waiting for the other ranks "
        f"at {where} (each is one process torchrun starts; Ctrl-C stops)", file=sys.stderr, flush=True))
    notice.daemon = True
    notice.start()
    try:
        # Nothing is held yet that a signal would leave behind; torch's store retries in native
        # code, where Python's handlers (fasttl.util.signals) would wait for its 30-minute timeout.
        with signals.default_actions():
            dist.init_process_group(backend)
    finally:
        notice.cancel()


def join(device: str) -> Tuple[torch.device, bool]:
    """(the device this rank uses, whether this call created the process group). Under torchrun:
    joins the group (nccl on GPUs, gloo on the CPU) and takes the GPU of LOCAL_RANK; otherwise the
    device as given."""
    created = False
    if launched_by_torchrun() and not dist.is_initialized():
        _init_group("nccl" if str(device).startswith("cuda") else "gloo")
        created = True
    if str(device).startswith("cuda") and launched_by_torchrun():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank), created
    return torch.device(device), created


def rank_and_world() -> Tuple[int, int]:
    """(rank, world size) of the torchrun process group, (0, 1) outside one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1
