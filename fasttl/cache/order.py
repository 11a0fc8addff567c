"""The order a cache loader reads its rows in, one epoch at a time.

* ``"rows"`` (``shuffle=True``): an exact per-row shuffle, every row in any batch with equal
  chance, as ``torch.randperm`` gives; each batch's rows are then read in ascending order. A
  batch is a set to the loss (a sum over its rows), so this changes nothing but where each row
  sits in the batch, and it turns the gather's jumps over the whole cache into one forward
  sweep: an epoch over a 2,000,000 x 512 fp16 memory-mapped cache (batch 8192) went from 37% to
  42-45% of the machine's copy bandwidth on the 2-core Xeon (the same epochs alternated in one
  process, idle machine).
* ``"blocks"``: blocks of BLOCK_ROWS neighbouring rows in a random order (then ascending within
  each batch): the gather streams whole blocks, 79-92% of copy bandwidth there where rows read at
  63-71% (fasttl bench cache --scale, 2026-12-05; README "Shuffled epochs"). The trade-off:
  a row always shares its batch with its block's other rows, every epoch, and neighbours in a
  cache are usually alike (a class folder's images are stored together), so small batches hold
  fewer classes. Worth it only when the gather, not the model, bounds an epoch.
* ``False``: the stored order."""
from __future__ import annotations

from typing import Union

import numpy as np
import torch
from torch import Tensor

from fasttl.util.seeds import torch_seed
from fasttl.util.checks import plain_number

SHUFFLES = ("rows", "blocks")
BLOCK_ROWS = 16  # 16 rows of 512 fp16 features are 16 KiB: streamed whole, yet 512 blocks to a batch of 8192


def shuffle_mode(shuffle: Union[bool, str]) -> Union[bool, str]:
    """False, "rows" or "blocks" from a loader's `shuffle` argument (True means "rows")."""
    shuffle = plain_number(shuffle)  # NumPy's bools (a 0-d array too) as Python's, as every flag takes them
    if isinstance(shuffle, str):
        if shuffle in SHUFFLES:
            return shuffle
    elif isinstance(shuffle, bool):
        return "rows" if shuffle else False
    raise ValueError(f"shuffle: expected True, False, 'rows' or 'blocks', got {shuffle!r}")


def epoch_order(rows: int, batch_size: int, shuffle: Union[bool, str], seed: int, epoch: int) -> Tensor:
    """The row indices of one epoch, batch after batch (int64, every row once)."""
    if shuffle is False:
        return torch.arange(rows)
    generator = torch.Generator().manual_seed(torch_seed(seed * 1_000_003 + epoch))
    if shuffle == "rows" or rows < 2 * BLOCK_ROWS:  # too few blocks to shuffle: rows, not the stored order
        order = torch.randperm(rows, generator=generator)
    else:
        # every block, the short last one too, takes a random place (with drop_last the dropped
        # rows differ each epoch); each block's rows stay together
        blocks = -(-rows // BLOCK_ROWS)
        starts = torch.randperm(blocks, generator=generator) * BLOCK_ROWS
        order = (starts[:, None] + torch.arange(BLOCK_ROWS)).reshape(-1)  # one tensor op: 2M rows in ~0.01 s
        short = blocks * BLOCK_ROWS - rows
        if short:  # the short last block's missing rows, wherever it landed (a mask over all rows took 0.03 s)
            end = (int((starts == (blocks - 1) * BLOCK_ROWS).nonzero()) + 1) * BLOCK_ROWS
            order = torch.cat([order[:end - short], order[end:]])
    return ascending_within_batches(order, batch_size)


def ascending_within_batches(order: Tensor, batch_size: int) -> Tensor:
    """`order` with each run of `batch_size` indices (the last may be shorter) sorted.

    NumPy sorts: its SIMD integer sort took 16 ms for a 2,000,000-row epoch where torch.sort took
    172 ms on the 2-core Xeon, a quarter of the epoch's time at batch 8192."""
    values = order.numpy()
    batch_size = min(batch_size, max(len(values), 1))  # one batch of every row (2**61 would not reshape)
    full = len(values) // batch_size * batch_size
    head = np.sort(values[:full].reshape(-1, batch_size), axis=1).reshape(-1)
    return torch.from_numpy(np.concatenate([head, np.sort(values[full:])]))
