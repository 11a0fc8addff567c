"""Seeds derived from a run's --seed (any integer in [0, 2**63)) and an epoch or a stream: the
arithmetic can leave the range a torch generator takes, so each goes through torch_seed."""
from __future__ import annotations

TORCH_SEEDS = 2**64  # torch.manual_seed takes [0, 2**64)


def torch_seed(value: int) -> int:
    """`value` folded into torch's seed range; unchanged for every value already in it."""
    return int(value) % TORCH_SEEDS
