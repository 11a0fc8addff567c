"""`finetune`, model transfer: the backbone unfrozen (all or the top --finetune-stages K stages)
with per-stage learning rates, warmup + cosine, train augmentation from the data pipeline, bf16
params with fp32 master weights where --precision says; runs under torchrun (DDP).

By default it is LP-FT (linear probing, then fine-tuning; Kumar et al., ICLR 2022): the tuned
linear head is fit on the cached features of the frozen backbone (as `linear` fits it, on the
same validation split), and the network is fine-tuned from that head, so it starts out computing
the probe's logits. The probe reads the cached --features (by default the
multi-stage vector `linear` uses, from the same cache), and so does the fine-tuned head. The learning-rate scale is chosen by a one-epoch sweep on the validation
split, training stops early on it, and the run keeps the best validation checkpoint, the probe
included: unless fine-tuning beats the probe on validation by more than one standard error
(keep_finetuned), the result is the probe.
`--regularize l2sp` decays the backbone toward its pretrained weights (Li et al., ICML 2018)
instead of toward zero. `--finetune-from random` is the plain fine-tuning of earlier versions
(a new random head, every epoch evaluated on test, no choice made)."""
from __future__ import annotations

import math
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fasttl import backbones
from fasttl.util.distributed import rank_and_world
from fasttl.heads.train import make_head
from fasttl.data import ImageLoader, TransformSpec
from fasttl.data.splits import VALIDATION_FRACTION, validation_split
from fasttl.util.errors import OptionError
from fasttl.optim import AdamW
from fasttl.heads.fit import EpochStats, eval_record, fit, step, warmup_cosine
from fasttl.transfer.caching import Extraction, cached_features
from fasttl.transfer.models import BackboneWithHead
from fasttl.transfer.registry import Outcome, Strategy, TrainedModel, register
from fasttl.transfer.rundir import Checkpoint, load_weights, read_config, save_weights
from fasttl.transfer.strategies.common import eval_timings, param_dtype

WEIGHT_DECAY = 0.05
# LP-FT: the learning-rate scales (times --lr) tried for one epoch each; the best on validation
# goes on from where its epoch ended, so the sweep costs len(LR_SCALES) - 1 epochs.
LR_SCALES = (0.1, 0.3)
# LP-FT: stop this many epochs after the best validation score.
PATIENCE = 2
# L2-SP strength (alpha in Li et al.: alpha/2 * ||w - w0||^2 beside the mean cross-entropy).
L2SP_ALPHA = 0.01


def finetune_head(feature_dim: int, num_classes: int) -> nn.Module:
    """The random head of `--finetune-from random`."""
    return nn.Sequential(nn.Dropout(0.2), nn.Linear(feature_dim, num_classes))


def probe_head(feature_dim: int, num_classes: int) -> nn.Module:
    """The LP-FT head: the linear probe's own module (Standardize -> Dropout -> Linear), so the
    fine-tuned model computes exactly the probe's logits at the start, and the head's gradients
    keep the scale the probe was solved in."""
    return make_head("linear", feature_dim, num_classes)


class FineTuneModel(BackboneWithHead):
    """Keeps frozen stages (and their BatchNorm statistics) in eval mode whenever it trains; with
    `freeze_batch_norm` every BatchNorm keeps its pretrained statistics (LP-FT: batch
    statistics of the first small batches would shift the features the probe was fit on)."""

    def __init__(self, backbone, head, frozen: List[nn.Module], freeze_batch_norm: bool = False, taps: int = 0):
        super().__init__(backbone, head, taps)
        self._frozen = frozen
        self._freeze_batch_norm = freeze_batch_norm

    def train(self, mode: bool = True):
        super().train(mode)
        for module in self._frozen:
            module.eval()
        if self._freeze_batch_norm:
            for module in self.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self


class L2SP:
    """L2-SP (Li et al., ICML 2018): alpha/2 * sum_i ||w_i - w0_i||^2 over `params`, w0 their
    values when this is made (the pretrained weights): weight decay toward the starting point
    instead of toward zero. Its gradient is alpha * (w - w0); `penalty()` is added to the loss."""

    def __init__(self, params: Sequence[Tensor], alpha: float):
        self.params = [p for p in params if p.requires_grad]
        self.anchors = [p.detach().float().clone() for p in self.params]
        self.alpha = float(alpha)

    def penalty(self) -> Tensor:
        if not self.params:
            return torch.zeros(())
        total = sum((p.float() - anchor).pow(2).sum() for p, anchor in zip(self.params, self.anchors))
        return 0.5 * self.alpha * total


def parameter_groups(model: FineTuneModel, stages: List[nn.Module], trainable: int, lr: float,
                     decay: float = 0.7, stage_weight_decay: Optional[float] = None) -> List[dict]:
    """The head at lr; the top `trainable` stages at lr * decay^(depth from the top) (and
    `stage_weight_decay` when given: L2-SP sets 0, its penalty decays them instead)."""
    groups = [{"params": list(model.head.parameters()), "lr": lr, "name": "head"}]
    for depth, stage in enumerate(reversed(stages[len(stages) - trainable:])):
        group = {"params": list(stage.parameters()), "lr": lr * decay ** (depth + 1), "name": f"stage -{depth + 1}"}
        if stage_weight_decay is not None:
            group["weight_decay"] = stage_weight_decay
        groups.append(group)
    return [g for g in groups if g["params"]]


def build_model(cfg, num_classes: int, device: torch.device, backbone=None, head: Optional[nn.Module] = None,
                taps: int = 0):
    """(model, its stages, how many train) with only the top stages and the head trainable;
    `head` given: LP-FT (that head on `taps` tapped stages, BatchNorm statistics frozen)."""
    backbone = backbone if backbone is not None else backbones.create(cfg.backbone, weights=cfg.weights)
    stages = backbone.stages()
    trainable = len(stages) if cfg.finetune_stages is None else cfg.finetune_stages
    if not 1 <= trainable <= len(stages):
        raise OptionError(f"finetune_stages: expected 1..{len(stages)} for {cfg.backbone}, got {trainable}")
    for p in backbone.parameters():
        p.requires_grad_(False)
    for stage in stages[len(stages) - trainable:]:
        for p in stage.parameters():
            p.requires_grad_(True)
    lpft = head is not None
    head = head if lpft else finetune_head(backbone.feature_dim, num_classes)
    model = FineTuneModel(backbone, head, stages[:len(stages) - trainable], freeze_batch_norm=lpft, taps=taps)
    # channels_last: oneDNN (and cuDNN) convolutions are faster on NHWC.
    return model.to(device=device, dtype=param_dtype(cfg), memory_format=torch.channels_last), stages, trainable


@torch.no_grad()
def _logits(model, source, spec, device, dtype):
    model.eval()
    outputs = [(model(x.contiguous(memory_format=torch.channels_last)).float().cpu(), y.cpu())
               for x, y in ImageLoader(source, spec, 128, device=device, dtype=dtype)]
    return torch.cat([o for o, _ in outputs]), torch.cat([y for _, y in outputs])


def _score(record: Dict[str, float]) -> Tuple[float, float]:
    """Validation accuracy, ties to the lower validation loss."""
    return record["eval_accuracy"], -record["eval_loss"]


def keep_finetuned(probe_accuracy: float, finetuned_accuracy: float, validation_images: int) -> Tuple[bool, float]:
    """(keep the fine-tuned model, margin): Breiman's one-standard-error rule. Fine-tuning is kept
    only when its validation accuracy beats the probe's by more than one standard error of the
    probe's (sqrt(p (1 - p) / n)); within it, the simpler model, the probe, is the result. On 20
    validation images one image more is within the error (5 classes x 40 images: fine-tuning 0.80
    against the probe's 0.75 on validation, then 0.745 against 0.757 on test)."""
    p = min(max(float(probe_accuracy), 0.0), 1.0)
    margin = math.sqrt(p * (1.0 - p) / max(int(validation_images), 1))
    return finetuned_accuracy > p + margin, margin


class BestState:
    """The model state with the best validation score seen so far (epoch 0: the probe). fit
    checkpoints it beside the last state (extra_state), so a resumed run keeps it."""

    def __init__(self):
        self.score, self.epoch, self.record, self.model = None, None, None, None

    def offer(self, epoch: int, record: Dict[str, float], model: nn.Module) -> bool:
        if not (math.isfinite(record["eval_loss"]) and (self.score is None or _score(record) > self.score)):
            return False
        self.score, self.epoch, self.record = _score(record), epoch, dict(record)
        self.model = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        return True

    def state_dict(self) -> dict:
        return {"score": list(self.score), "epoch": self.epoch, "record": self.record, "model": self.model}

    def load_state_dict(self, state: dict) -> None:
        self.score, self.epoch = tuple(state["score"]), state["epoch"]
        self.record, self.model = state["record"], state["model"]


class _Start:
    """What fit resumes from: the run's checkpoint when resuming an interrupted run, else the
    state the sweep's winner ended its epoch in; saves go to the run's checkpoint (rank 0)."""

    def __init__(self, checkpoint: Checkpoint, state: dict, saving: bool):
        self.checkpoint, self.state, self.saving = checkpoint, state, saving

    @property
    def path(self) -> str:  # what a damaged state is named by: the run's checkpoint
        return self.checkpoint.path

    def load(self):
        return self.state

    def save(self, state):
        if self.saving:
            self.checkpoint.save(state)


def _renamed(record: Dict[str, float]) -> Dict[str, float]:
    """eval_* of the LP-FT loop are validation scores: named val_* in the history."""
    return {("val_" + k[5:] if k.startswith("eval_") else k): v for k, v in record.items()}


@register
class Finetune(Strategy):
    name = "finetune"
    display = "finetune"
    help = ("LP-FT: the tuned linear probe on cached features, then the backbone unfrozen (all or the top "
            "--finetune-stages K) from it, lr scale and epoch chosen on validation; torchrun-aware")
    epochs, lr, batch_size = 5, 1e-3, 32
    outputs = ("model",)
    uses = ("finetune_stages", "finetune_from", "regularize", "weights")
    distributed = True
    can_teach = True

    def train(self, cfg, ds, run_dir, device) -> List[Outcome]:
        if getattr(cfg, "finetune_from", "probe") == "random":
            return self._train_from_random(cfg, ds, run_dir, device)
        return self._train_lpft(cfg, ds, run_dir, device)

    def _train_lpft(self, cfg, ds, run_dir, device) -> List[Outcome]:
        from fasttl.heads.tuning import linear_probe

        rank, world = rank_and_world()
        torch.manual_seed(cfg.seed)
        dtype = param_dtype(cfg)
        backbone = backbones.create(cfg.backbone, weights=cfg.weights)

        # The probe: `linear`'s tuned head on the same cached features (--features: the final
        # pooled map, or beside it the pooled outputs of the last stages, which the fine-tuned
        # model's head then reads too), fit on the train part of the split.
        started = time.perf_counter()
        extraction = Extraction.of(cfg)
        cache = cached_features(backbone, ds.train, "train", extraction, device=cfg.device,
                                progress=cfg.progress and rank == 0, rebuild_broken=cfg.overwrite)
        extract_s = time.perf_counter() - started
        started = time.perf_counter()
        train_part_head, refit_head, path, probe_choice = linear_probe([cache], seed=cfg.seed, device=device,
                                                                      progress=cfg.progress and rank == 0)
        probe_s = time.perf_counter() - started
        labels = np.asarray(ds.train.labels)
        if not np.array_equal(cache.labels.cpu().numpy(), labels):
            raise RuntimeError("finetune: the feature cache's labels are not the training split's, in its order")
        train_rows, val_rows = validation_split(labels, cfg.seed)
        # Equal shards under torchrun: every rank runs the same number of steps.
        train_rows = train_rows[:len(train_rows) - len(train_rows) % world] if world > 1 else train_rows
        train_source, val_source = ds.train.subset(train_rows), ds.train.subset(val_rows)

        head = probe_head(backbone.tapped_dim(extraction.taps), len(ds.classes))
        head.load_state_dict(train_part_head.state_dict())
        model, stages, trainable = build_model(cfg, len(ds.classes), device, backbone=backbone, head=head,
                                               taps=extraction.taps)
        spec = TransformSpec.for_backbone(model.backbone.preprocessing, size=cfg.image_size)
        l2sp = (L2SP([p for p in model.backbone.parameters()], L2SP_ALPHA) if cfg.regularize == "l2sp" else None)
        steps_per_epoch = math.ceil(len(train_source) // world / cfg.batch_size) or 1
        trained = model if world == 1 else nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
        current: Dict[str, object] = {}

        def make_optimizer(scale: float):
            groups = parameter_groups(model, stages, trainable, cfg.lr * scale,
                                      stage_weight_decay=0.0 if l2sp is not None else None)
            # bf16 params: fasttl AdamW keeps fp32 master weights and moments, so small updates survive.
            optimizer = AdamW(groups, lr=cfg.lr * scale, weight_decay=WEIGHT_DECAY)
            scheduler = warmup_cosine(optimizer, cfg.epochs * steps_per_epoch,
                                      warmup_steps=max(1, steps_per_epoch // 2))
            current.update(optimizer=optimizer, scheduler=scheduler, scale=scale)
            return optimizer, scheduler

        def train_epoch(epoch):
            current["epoch"] = epoch
            train_spec = TransformSpec.for_backbone(model.backbone.preprocessing, size=cfg.image_size, train=True,
                                                    seed=cfg.seed * 1000 + epoch)
            stats = EpochStats()
            for images, y in ImageLoader(train_source, train_spec, cfg.batch_size, shard_id=rank, num_shards=world,
                                         device=device, dtype=dtype):
                logits = trained(images.contiguous(memory_format=torch.channels_last)).float()
                loss = F.cross_entropy(logits, y)
                stats.add(loss, logits, y)
                if l2sp is not None:
                    loss = loss + l2sp.penalty().to(loss.device)
                step(loss, current["optimizer"], current["scheduler"])
            return dict(stats.record(), lr_scale=current["scale"])

        def evaluate():
            return eval_record(*_logits(model, val_source, spec, device, dtype))

        best = BestState()
        checkpoint = Checkpoint(run_dir, "model")
        state = checkpoint.load() if cfg.resume else None
        started = time.perf_counter()
        sweep: List[Dict[str, float]] = []
        first = evaluate()  # epoch 0: the probe, through the images as every later evaluation
        best.offer(0, first, model)
        probe_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        if state is None:
            initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
            winner = None
            for scale in LR_SCALES:
                model.load_state_dict(initial)
                optimizer, scheduler = make_optimizer(scale)
                torch.manual_seed(cfg.seed * 1_000_003)  # as fit seeds epoch 0
                model.train()
                epoch_started = time.perf_counter()
                record = {"epoch": 1, **train_epoch(0)}
                record["seconds"] = time.perf_counter() - epoch_started
                record["lr"] = float(optimizer.param_groups[0]["lr"])
                record["images_per_s"] = record["images"] / max(record["seconds"], 1e-9)
                finite = math.isfinite(record["train_loss"])
                if finite:
                    record.update(evaluate())
                    finite = math.isfinite(record["eval_loss"])
                sweep.append({"lr_scale": scale, "train_loss": record["train_loss"],
                              "val_accuracy": record.get("eval_accuracy"), "val_loss": record.get("eval_loss"),
                              "seconds": record["seconds"]})
                if finite and (winner is None or _score(record) > _score(winner[0])):
                    winner = (record, {k: v.detach().clone() for k, v in model.state_dict().items()},
                              optimizer.state_dict(), scheduler.state_dict())
            if winner is not None:
                record, model_state, optimizer_state, scheduler_state = winner
                model.load_state_dict(model_state)
                make_optimizer(record["lr_scale"])
                best.offer(1, record, model)
                state = {"epoch": 1, "model": model_state, "optimizer": optimizer_state,
                         "scheduler": scheduler_state, "history": [record], "extra": best.state_dict()}
            else:
                model.load_state_dict(initial)
        else:
            sweep = None  # chosen before the interruption: its records are in the history
            make_optimizer(state["history"][0]["lr_scale"])
        history: List[Dict[str, float]] = []
        if state is not None:
            def evaluate_and_keep():
                record = evaluate()
                best.offer(current["epoch"] + 1, record, model)
                return record

            history = fit(model, current["optimizer"], current["scheduler"], cfg.epochs, train_epoch,
                          evaluate_and_keep, seed=cfg.seed, checkpoint=_Start(checkpoint, state, rank == 0),
                          resume=True, progress=cfg.progress and rank == 0, extra_state=best, patience=PATIENCE,
                          description=f"finetune (LP-FT, top {trainable} stages)")
        train_s = time.perf_counter() - started

        # The result: the best validation state; the probe (refit on train + validation, as
        # `linear` makes it) when fine-tuning never beat it by more than one standard error.
        kept, kept_record = best.epoch, best.record
        finetuned_won, margin = keep_finetuned(first["eval_accuracy"], best.record["eval_accuracy"], len(val_rows))
        within_error = kept != 0 and not finetuned_won
        if within_error:
            kept, kept_record = 0, first
        model.load_state_dict({k: v.to(device) for k, v in (probe_state if kept == 0 else best.model).items()})
        if kept == 0:
            model.head.load_state_dict({k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype)
                                        for k, v in refit_head.state_dict().items()})
        started = time.perf_counter()
        logits, test_labels = _logits(model, ds.test, spec, device, dtype)
        timings = dict(eval_timings(train_s, time.perf_counter() - started,
                                    sum(h.get("images", 0) for h in history) * world, len(test_labels)),
                       extract_s=extract_s, extracted_images=cache.last_build.get("images", 0),
                       probe_s=probe_s)
        if sweep:
            timings["sweep_s"] = sum(s["seconds"] for s in sweep)
        chosen_scale = history[0]["lr_scale"] if history else None
        info = {"fraction": VALIDATION_FRACTION, "train_images": len(train_rows), "validation_images": len(val_rows),
                "seed": cfg.seed}
        choice = {
            "validation": info, "start": "linear probe (LP-FT)",
            "probe": {"weight_decay": probe_choice["weight_decay"], "val_accuracy": probe_choice["val_accuracy"],
                      "val_loss": probe_choice["val_loss"], "first_val_accuracy": first["eval_accuracy"],
                      "first_val_loss": first["eval_loss"]},
            "lr_scale": chosen_scale, "lr": None if chosen_scale is None else cfg.lr * chosen_scale,
            "lr_scales_tried": list(LR_SCALES), "sweep": sweep, "epoch_kept": kept, "max_epochs": cfg.epochs,
            "epochs_run": len(history), "patience": PATIENCE, "regularize": cfg.regularize,
            "batch_norm": "pretrained statistics (frozen)", "val_accuracy": kept_record["eval_accuracy"],
            "val_loss": kept_record["eval_loss"], "one_standard_error": margin,
            "finetuned_best": {"epoch": best.epoch, "val_accuracy": best.record["eval_accuracy"]},
            "refit_on": "train + validation (the probe)" if kept == 0 else "none (fine-tuned on the train part)",
            "outcome": (f"the linear probe: fine-tuning's best validation accuracy {best.record['eval_accuracy']:.4f} "
                        f"(epoch {best.epoch}) is within one standard error ({margin:.4f}, "
                        f"{len(val_rows)} images) of the probe's {first['eval_accuracy']:.4f}, so the result is the "
                        "probe (refit on train + validation, on the pretrained backbone)" if within_error else
                        "the linear probe: fine-tuning never beat it on validation, so the result is the probe "
                        "(refit on train + validation, on the pretrained backbone)" if kept == 0 else
                        f"fine-tuned, epoch {kept} kept: validation accuracy {best.record['eval_accuracy']:.4f} "
                        f"against the probe's {first['eval_accuracy']:.4f}")}
        if l2sp is not None:
            choice["l2sp_alpha"] = L2SP_ALPHA
        weights = save_weights(run_dir, "model", model.float()) if rank == 0 else ""
        notes = {"trainable_stages": trainable, "stages": len(stages), "world_size": world, "init": "probe",
                 "features": {"kind": cfg.features, "dim": backbone.tapped_dim(extraction.taps)},
                 "choice": choice, "probe_path": path}
        return [Outcome(self.name, self.display, logits, test_labels, [_renamed(h) for h in history], timings,
                        weights, notes, device=str(device), precision=cfg.precision)]

    def _train_from_random(self, cfg, ds, run_dir, device) -> List[Outcome]:
        """Fine-tuning as before LP-FT: a random head, a fixed number of epochs on all training
        images, each evaluated on test (reported as such; nothing is chosen on it)."""
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
        # Runs from before LP-FT have no finetune_from: their head is the random-init one.
        if config.get("finetune_from", "random") == "probe":
            taps = Extraction.of(config).taps
            model = FineTuneModel(backbone, probe_head(backbone.tapped_dim(taps), len(config["classes"])), [],
                                  taps=taps)
        else:
            model = FineTuneModel(backbone, finetune_head(backbone.feature_dim, len(config["classes"])), [])
        spec = TransformSpec.for_backbone(backbone.preprocessing, size=config["image_size"])
        return TrainedModel(load_weights(run_dir, "model", model).to(device), spec, config["classes"], device)
