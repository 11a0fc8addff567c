"""torchrun's process group, joined and read in one place: `fasttl extract` and `fasttl run`
(finetune) join it the same way, and every layer asks it for (rank, world size) the same way."""
from __future__ import annotations

import os
from typing import Tuple

import torch
import torch.distributed as dist


# What torchrun sets for every process it starts; a WORLD_SIZE > 1 without the rest is a shell's leftover.
TORCHRUN_VARIABLES = ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def launched_by_torchrun() -> bool:
    """Whether this process is one of several torchrun started (WORLD_SIZE > 1, with the other
    variables torchrun sets); a leftover or malformed one is an OptionError naming it."""
    from fasttl.util.errors import OptionError

    given = os.environ.get("WORLD_SIZE", "1")
    try:
        world = int(given)
    except ValueError:
        raise OptionError(f"WORLD_SIZE: expected a number of processes, got {given!r} (unset it, or start fasttl "
                          "with torchrun)") from None
    if world <= 1:
        return False
    missing = [name for name in TORCHRUN_VARIABLES if not os.environ.get(name)]
    if missing:
        raise OptionError(f"WORLD_SIZE={given} but {', '.join(missing)} not set: start fasttl with torchrun, or unset "
                          "WORLD_SIZE (a leftover from another job)")
    for name in ("RANK", "LOCAL_RANK"):
        if not os.environ[name].isdigit():
            raise OptionError(f"{name}: expected a number, got {os.environ[name]!r} (start fasttl with torchrun)")
    return True


def join(device: str) -> Tuple[torch.device, bool]:
    """(the device this rank uses, whether this call created the process group). Under torchrun:
    joins the group (nccl on GPUs, gloo on the CPU) and takes the GPU of LOCAL_RANK; otherwise the
    device as given."""
    created = False
    if launched_by_torchrun() and not dist.is_initialized():
        dist.init_process_group("nccl" if str(device).startswith("cuda") else "gloo")
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
