"""`finetune`, model transfer: the backbone unfrozen (all or the top --finetune-stages K stages)
with per-stage learning rates, warmup + cosine, train augmentation from the data pipeline, bf16
params with fp32 master weights where --precision says; runs under torchrun (DDP)."""
from __future__ import annotations

import math
import time
from typing import List

import torch
import torch.nn.functional as F
from torch import nn

from fasttl import backbones
from fasttl.data import ImageLoader, TransformSpec
from fasttl.errors import OptionError
from fasttl.optim import AdamW
from fasttl.training import EpochStats, eval_record, fit, step, warmup_cosine
from fasttl.transfer.models import BackboneWithHead
from fasttl.transfer.registry import Outcome, Strategy, TrainedModel, register
from fasttl.transfer.rundir import Checkpoint, load_weights, read_config, save_weights
from fasttl.cache.build import rank_and_world
from fasttl.transfer.strategies.common import eval_timings, param_dtype


def finetune_head(feature_dim: int, num_classes: int) -> nn.Module:
    return nn.Sequential(nn.Dropout(0.2), nn.Linear(feature_dim, num_classes))


class FineTuneModel(BackboneWithHead):
    """Keeps frozen stages (and their BatchNorm statistics) in eval mode whenever it trains."""

    def __init__(self, backbone, head, frozen: List[nn.Module]):
        super().__init__(backbone, head)
        self._frozen = frozen

    def train(self, mode: bool = True):
        super().train(mode)
        for module in self._frozen:
            module.eval()
        return self


def parameter_groups(model: FineTuneModel, stages: List[nn.Module], trainable: int, lr: float,
                     decay: float = 0.7) -> List[dict]:
    """The head at lr; the top `trainable` stages at lr * decay^(depth from the top)."""
    groups = [{"params": list(model.head.parameters()), "lr": lr, "name": "head"}]
    for depth, stage in enumerate(reversed(stages[len(stages) - trainable:])):
        groups.append({"params": list(stage.parameters()), "lr": lr * decay ** (depth + 1),
                       "name": f"stage -{depth + 1}"})
    return [g for g in groups if g["params"]]


def build_model(cfg, num_classes: int, device: torch.device):
    """(model, its stages, how many train) with only the top stages and the head trainable."""
    backbone = backbones.create(cfg.backbone, weights=cfg.weights)
    stages = backbone.stages()
    trainable = len(stages) if cfg.finetune_stages is None else cfg.finetune_stages
    if not 1 <= trainable <= len(stages):
        raise OptionError(f"finetune_stages: expected 1..{len(stages)} for {cfg.backbone}, got {trainable}")
    for p in backbone.parameters():
        p.requires_grad_(False)
    for stage in stages[len(stages) - trainable:]:
        for p in stage.parameters():
            p.requires_grad_(True)
    model = FineTuneModel(backbone, finetune_head(backbone.feature_dim, num_classes), stages[:len(stages) - trainable])
    # channels_last: oneDNN (and cuDNN) convolutions are faster on NHWC.
    return model.to(device=device, dtype=param_dtype(cfg), memory_format=torch.channels_last), stages, trainable


@torch.no_grad()
def _logits(model, source, spec, device, dtype):
    model.eval()
    outputs = [(model(x.contiguous(memory_format=torch.channels_last)).float().cpu(), y.cpu())
               for x, y in ImageLoader(source, spec, 128, device=device, dtype=dtype)]
    return torch.cat([o for o, _ in outputs]), torch.cat([y for _, y in outputs])


@register
class Finetune(Strategy):
    name = "finetune"
    display = "finetune"
    help = "the backbone unfrozen (all or the top --finetune-stages K) with per-stage learning rates; torchrun-aware"
    epochs, lr, batch_size = 3, 1e-3, 32
    outputs = ("model",)
    uses = ("finetune_stages",)
    distributed = True
    can_teach = True

    def train(self, cfg, ds, run_dir, device) -> List[Outcome]:
        rank, world = rank_and_world()
        torch.manual_seed(cfg.seed)
        model, stages, trainable = build_model(cfg, len(ds.classes), device)
        dtype = param_dtype(cfg)
        # bf16 params: fasttl AdamW keeps fp32 master weights and moments, so small updates survive.
        optimizer = AdamW(parameter_groups(model, stages, trainable, cfg.lr), lr=cfg.lr, weight_decay=0.05)
        spec = TransformSpec.for_backbone(model.backbone.preprocessing, size=cfg.image_size)
        steps_per_epoch = math.ceil(len(ds.train) // world / cfg.batch_size) or 1
        scheduler = warmup_cosine(optimizer, cfg.epochs * steps_per_epoch, warmup_steps=max(1, steps_per_epoch // 2))
        trained = model if world == 1 else nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

        def train_epoch(epoch):
            train_spec = TransformSpec.for_backbone(model.backbone.preprocessing, size=cfg.image_size, train=True,
                                                    seed=cfg.seed * 1000 + epoch)
            stats = EpochStats()
            for images, labels in ImageLoader(ds.train, train_spec, cfg.batch_size, shard_id=rank, num_shards=world,
                                              device=device, dtype=dtype):
                logits = trained(images.contiguous(memory_format=torch.channels_last)).float()
                loss = F.cross_entropy(logits, labels)
                step(loss, optimizer, scheduler)
                stats.add(loss, logits, labels)
            return stats.record()

        started = time.perf_counter()
        history = fit(model, optimizer, scheduler, cfg.epochs, train_epoch,
                      lambda: eval_record(*_logits(model, ds.test, spec, device, dtype)), seed=cfg.seed,
                      checkpoint=Checkpoint(run_dir, "model") if rank == 0 else None, resume=cfg.resume,
                      progress=cfg.progress and rank == 0, description=f"finetune (top {trainable} stages)")
        train_s = time.perf_counter() - started
        started = time.perf_counter()
        logits, labels = _logits(model, ds.test, spec, device, dtype)
        timings = eval_timings(train_s, time.perf_counter() - started,
                               sum(h.get("images", 0) for h in history) * world, len(labels))
        weights = save_weights(run_dir, "model", model.float()) if rank == 0 else ""
        return [Outcome(self.name, self.display, logits, labels, history, timings, weights,
                        {"trainable_stages": trainable, "stages": len(stages), "world_size": world},
                        device=str(device), precision=cfg.precision)]

    def load(self, run_dir, device) -> TrainedModel:
        config = read_config(run_dir)
        backbone = backbones.create(config["backbone"], weights=config.get("weights"), pretrained=False)
        model = FineTuneModel(backbone, finetune_head(backbone.feature_dim, len(config["classes"])), [])
        spec = TransformSpec.for_backbone(backbone.preprocessing, size=config["image_size"])
        return TrainedModel(load_weights(run_dir, "model", model).to(device), spec, config["classes"], device)
