"""torchrun's process group, joined and read in one place: `fasttl extract` and `fasttl run`
(finetune) join it the same way, and every layer asks it for (rank, world size) the same way."""
from __future__ import annotations

import os
from typing import Tuple

import torch
import torch.distributed as dist


def launched_by_torchrun() -> bool:
    """Whether this process is one of several torchrun started (WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


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
