"""`scratch`: the small CNN from random initialization at the images' native resolution, the
baseline every transfer strategy is judged against (`--compare scratch`). Its trainer also
serves `distill`, whose student is the same CNN."""
from __future__ import annotations

import math
import time
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fasttl.data import ImageLoader, TransformSpec
from fasttl.optim import AdamW
from fasttl.training import EpochStats, eval_record, fit, one_cycle, step
from fasttl.transfer.models import SmallCNN
from fasttl.transfer.registry import Outcome, Strategy, TrainedModel, register
from fasttl.transfer.rundir import Checkpoint, load_weights, read_config, save_weights
from fasttl.transfer.strategies.common import eval_timings, param_dtype

# The from-scratch CNN sees images at their native resolution, normalized around mid-grey.
NATIVE_MEAN, NATIVE_STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def native_spec(size: int, seed: int = 0) -> TransformSpec:
    return TransformSpec(size, NATIVE_MEAN, NATIVE_STD, 1.0, train=False, seed=seed)


def native_images(source, size: int, seed: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Every image of `source` decoded once, at its native size, on `device`."""
    return torch.cat([x for x, _ in ImageLoader(source, native_spec(size, seed), 256, device=device, dtype=dtype)])


def labels_of(source, device: torch.device) -> Tensor:
    return torch.as_tensor(list(source.labels), dtype=torch.int64, device=device)


def _cnn_epoch(model, images: Tensor, labels: Tensor, batch_size: int, optimizer, scheduler, epoch: int, seed: int,
               loss_fn: Callable[[Tensor, Tensor], Tensor]) -> Dict[str, float]:
    generator = torch.Generator().manual_seed(seed * 7919 + epoch)
    order = torch.randperm(len(labels), generator=generator).to(images.device)
    flips = (torch.rand(len(labels), generator=generator) < 0.5).to(images.device)
    stats = EpochStats()
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        x = images[idx]
        x = torch.where(flips[idx].view(-1, 1, 1, 1), x.flip(-1), x)  # horizontal flip augmentation
        logits = model(x).float()
        loss = loss_fn(logits, idx)
        step(loss, optimizer, scheduler)
        stats.add(loss, logits, labels[idx])
    return stats.record()


@torch.no_grad()
def _cnn_logits(model, images: Tensor, batch_size: int = 512) -> Tensor:
    model.eval()
    return torch.cat([model(images[i:i + batch_size]).float().cpu() for i in range(0, len(images), batch_size)])


def train_cnn(cfg, ds, run_dir: str, name: str, display: str, device: torch.device,
              teacher_logits: Optional[Tensor] = None) -> Outcome:
    """The small CNN on the training images (flip augmentation), with cross-entropy or, given the
    teacher's logits per training image, fasttl's fused distillation loss."""
    import fasttl

    dtype = param_dtype(cfg)
    started = time.perf_counter()
    train_x = native_images(ds.train, ds.native_size, cfg.seed, device, dtype)
    test_x = native_images(ds.test, ds.native_size, cfg.seed, device, dtype)
    train_y, test_y = labels_of(ds.train, device), labels_of(ds.test, device)
    load_s = time.perf_counter() - started
    torch.manual_seed(cfg.seed)
    model = SmallCNN(len(ds.classes)).to(device, dtype)
    optimizer = AdamW(model.parameters(), lr=cfg.lr, weight_decay=5e-4)
    scheduler = one_cycle(optimizer, cfg.lr, cfg.epochs * math.ceil(len(train_y) / cfg.batch_size), pct_start=0.15)
    if teacher_logits is None:
        loss_fn = lambda logits, idx: F.cross_entropy(logits, train_y[idx])  # noqa: E731
    else:
        teacher_logits = teacher_logits.to(device)
        loss_fn = lambda logits, idx: fasttl.distillation_loss(  # noqa: E731
            logits, teacher_logits[idx], train_y[idx], temperature=cfg.temperature, alpha=cfg.alpha)

    started = time.perf_counter()
    history = fit(model, optimizer, scheduler, cfg.epochs,
                  lambda epoch: _cnn_epoch(model, train_x, train_y, cfg.batch_size, optimizer, scheduler, epoch,
                                           cfg.seed, loss_fn),
                  lambda: eval_record(_cnn_logits(model, test_x), test_y), seed=cfg.seed,
                  checkpoint=Checkpoint(run_dir, name), resume=cfg.resume, progress=cfg.progress, description=name)
    train_s = time.perf_counter() - started
    started = time.perf_counter()
    logits = _cnn_logits(model, test_x)
    timings = dict(eval_timings(train_s, time.perf_counter() - started, len(train_y) * len(history), len(test_y)),
                   load_s=load_s)
    return Outcome(name, display, logits, test_y.cpu(), history, timings,
                   save_weights(run_dir, name, model.float()), {"input_size": ds.native_size},
                   device=str(device), precision=cfg.precision)


def load_cnn(run_dir: str, name: str, device: torch.device) -> TrainedModel:
    config = read_config(run_dir)
    model = load_weights(run_dir, name, SmallCNN(len(config["classes"]))).to(device)
    return TrainedModel(model, native_spec(config["native_size"], config["seed"]), config["classes"], device)


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
