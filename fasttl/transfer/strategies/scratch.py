"""`scratch`: the small CNN from random initialization at the images' native resolution, the
baseline every transfer strategy is judged against (`--compare scratch`); its trainer is
fasttl.transfer.small_cnn, which `distill` shares."""
from __future__ import annotations

from typing import List

from fasttl.transfer.registry import Outcome, Strategy, register
from fasttl.transfer.trained import TrainedModel
from fasttl.transfer.small_cnn import load_cnn, train_cnn


@register
class Scratch(Strategy):
    name = "scratch"
    display = "scratch (from random init)"
    help = "the small CNN from random initialization, same budget: the baseline"
    epochs, lr, batch_size = 15, 3e-3, 64
    outputs = ("scratch",)
    baseline = True

    def train(self, cfg, dataset, run_dir, device) -> List[Outcome]:
        return [train_cnn(cfg, dataset, run_dir, self.name, self.display, device)]

    def load(self, run_dir, device) -> TrainedModel:
        return load_cnn(run_dir, self.name, device)
