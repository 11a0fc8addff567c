"""The small CNN trained at the images' native resolution, from random initialization (`scratch`,
the baseline every transfer is judged beside) or from a teacher's softened outputs (`distill`,
whose student is the same CNN): its inputs, its epoch, its loss, its trainer and its load."""
from __future__ import annotations

import math
import time
from typing import Callable, Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fasttl.data import ImageLoader, TransformSpec
from fasttl.optim import AdamW
from fasttl.heads.fit import EpochStats, eval_record, fit, one_cycle, step
from fasttl.transfer.models import SmallCNN
from fasttl.transfer.registry import Outcome
from fasttl.transfer.trained import TrainedModel
from fasttl.util.errors import OptionError
from fasttl.transfer.rundir import Checkpoint, load_weights, read_config, save_weights
from fasttl.transfer.common import eval_timings, param_dtype
from fasttl.util.seeds import torch_seed

# The from-scratch CNN sees images at their native resolution, normalized around mid-grey.
NATIVE_MEAN, NATIVE_STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def native_spec(size: int, seed: int = 0) -> TransformSpec:
    return TransformSpec(size, NATIVE_MEAN, NATIVE_STD, 1.0, train=False, seed=seed)


# The small CNN holds every image at its native size in memory: meant for small images (CIFAR's
# 32 px, digits' 8 px); 24 photos of 1500 px would already ask for 3.4 GB.
MAX_NATIVE_SIZE = 256


def native_images(source, size: int, seed: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Every image of `source` decoded once, at its native size, on `device`."""
    if size > MAX_NATIVE_SIZE:
        raise OptionError(f"strategy: the small CNN (scratch, distill's student, --compare scratch) trains at the "
                          f"images' native size, {size} px here, and holds them all in memory; it takes images up "
                          f"to {MAX_NATIVE_SIZE} px: resize the data, or use a transfer strategy (--compare none)")
    return torch.cat([x for x, _ in ImageLoader(source, native_spec(size, seed), 256, device=device, dtype=dtype)])


def labels_of(source, device: torch.device) -> Tensor:
    return torch.as_tensor(list(source.labels), dtype=torch.int64, device=device)


def cnn_epoch(model, images: Tensor, labels: Tensor, batch_size: int, optimizer, scheduler, epoch: int, seed: int,
               loss_fn: Callable[[Tensor, Tensor, Tensor], Tensor]) -> Dict[str, float]:
    """One epoch in a seeded order, each image mirrored or not by a seeded coin; `loss_fn(logits,
    idx, mirrored)` sees which images (rows of `images`) the batch holds and which were mirrored."""
    generator = torch.Generator().manual_seed(torch_seed(seed * 7919 + epoch))
    order = torch.randperm(len(labels), generator=generator).to(images.device)
    flips = (torch.rand(len(labels), generator=generator) < 0.5).to(images.device)
    stats = EpochStats()
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        x = images[idx]
        mirrored = flips[idx]
        x = torch.where(mirrored.view(-1, 1, 1, 1), x.flip(-1), x)  # horizontal flip augmentation
        logits = model(x).float()
        loss = loss_fn(logits, idx, mirrored)
        step(loss, optimizer, scheduler)
        stats.add(loss, logits, labels[idx])
    return stats.record()


@torch.no_grad()
def cnn_logits(model, images: Tensor, batch_size: int = 512) -> Tensor:
    model.eval()
    return torch.cat([model(images[i:i + batch_size]).float().cpu() for i in range(0, len(images), batch_size)])


def cnn_loss(train_y: Tensor, teacher_logits: Optional[Tensor], temperature: float = 1.0, alpha: float = 0.5,
             extra: Optional[Callable[[Tensor, Tensor], Tensor]] = None):
    """loss_fn(logits, idx, mirrored) of a CNN epoch: cross-entropy, or given the teacher's logits
    per view, (2, N, C) (plain, mirrored), fasttl's fused distillation loss against the logits of
    the view each image was shown in; plus `extra(idx, mirrored)` when given (distill's feature term)."""
    from fasttl.losses import distillation_loss

    if teacher_logits is None:
        return lambda logits, idx, mirrored: F.cross_entropy(logits, train_y[idx])
    if teacher_logits.dim() == 2:
        teacher_logits = torch.stack([teacher_logits, teacher_logits])  # one view only: the same for both

    def loss(logits, idx, mirrored):
        soft = teacher_logits[mirrored.long(), idx]
        value = distillation_loss(logits, soft, train_y[idx], temperature=temperature, alpha=alpha)
        return value if extra is None else value + extra(idx, mirrored)
    return loss


def cnn_model(cfg, classes: int, device: torch.device, dtype: torch.dtype, steps: int, extra: Sequence[nn.Module] = ()):
    """(SmallCNN, its AdamW, its one-cycle schedule); the optimizer also trains the `extra` modules."""
    torch.manual_seed(cfg.seed)
    model = SmallCNN(classes).to(device, dtype)
    optimizer = AdamW([*model.parameters(), *(p for m in extra for p in m.parameters())], lr=cfg.lr, weight_decay=5e-4)
    return model, optimizer, one_cycle(optimizer, cfg.lr, steps, pct_start=0.15)


def train_cnn(cfg, ds, run_dir: str, name: str, display: str, device: torch.device,
              teacher_logits: Optional[Tensor] = None, temperature: float = 1.0, alpha: float = 0.5,
              train_x: Optional[Tensor] = None, hint=None) -> Outcome:
    """The small CNN on the training images (flip augmentation), with cross-entropy or, given the
    teacher's logits per view of each training image ((2, N, C) or (N, C)), fasttl's fused
    distillation loss at `temperature` and `alpha`; `hint` (distill.FeatureHint) adds its feature
    term, its projection trained beside the CNN and not saved."""
    dtype = param_dtype(cfg)
    started = time.perf_counter()
    if train_x is None:
        train_x = native_images(ds.train, ds.native_size, cfg.seed, device, dtype)
    test_x = native_images(ds.test, ds.native_size, cfg.seed, device, dtype)
    train_y, test_y = labels_of(ds.train, device), labels_of(ds.test, device)
    load_s = time.perf_counter() - started
    model, optimizer, scheduler = cnn_model(cfg, len(ds.classes), device, dtype,
                                            cfg.epochs * math.ceil(len(train_y) / cfg.batch_size),
                                            extra=() if hint is None else (hint.projection,))
    if hint is not None:
        hint.attach(model)
    loss_fn = cnn_loss(train_y, None if teacher_logits is None else teacher_logits.to(device), temperature, alpha,
                       extra=hint)

    started = time.perf_counter()
    history = fit(model, optimizer, scheduler, cfg.epochs,
                  lambda epoch: cnn_epoch(model, train_x, train_y, cfg.batch_size, optimizer, scheduler, epoch,
                                           cfg.seed, loss_fn),
                  lambda: eval_record(cnn_logits(model, test_x), test_y), seed=cfg.seed,
                  checkpoint=Checkpoint(run_dir, name), resume=cfg.resume, progress=cfg.progress, description=name,
                  extra_state=None if hint is None else hint.projection)
    if hint is not None:
        hint.detach()
    train_s = time.perf_counter() - started
    started = time.perf_counter()
    logits = cnn_logits(model, test_x)
    timings = dict(eval_timings(train_s, time.perf_counter() - started, len(train_y) * len(history), len(test_y)),
                   load_s=load_s)
    return Outcome(name, display, logits, test_y.cpu(), history, timings,
                   save_weights(run_dir, name, model.float()), {"input_size": ds.native_size},
                   device=str(device), precision=cfg.precision)


def load_cnn(run_dir: str, name: str, device: torch.device) -> TrainedModel:
    config = read_config(run_dir)
    model = load_weights(run_dir, name, SmallCNN(len(config["classes"]))).to(device)
    return TrainedModel(model, native_spec(config["native_size"], config["seed"]), config["classes"], device)
