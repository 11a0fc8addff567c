"""`finetune`, model transfer: the backbone unfrozen (all or the top --finetune-stages K stages)
with per-stage learning rates, warmup + cosine, train augmentation from the data pipeline, bf16
params with fp32 master weights where --precision says; runs under torchrun (DDP).

By default it is LP-FT (linear probing, then fine-tuning; Kumar et al., ICLR 2022): the tuned
linear head is fit on the cached features of the frozen backbone (as `linear` fits it, on the
same validation split), and the network is fine-tuned from that head, so it starts out computing
the probe's logits. The probe reads the cached --features (by default the multi-stage vector
`linear` uses, from the same cache), and so does the fine-tuned head. The learning-rate scale is
chosen by a one-epoch sweep on the validation split, training stops early on it, and the run
keeps the best validation checkpoint, the probe included: unless fine-tuning beats the probe on
validation by more than one standard error (keep_finetuned), the result is the probe.
`--regularize l2sp` decays the backbone toward its pretrained weights (Li et al., ICML 2018)
instead of toward zero. `--finetune-from random` is the plain fine-tuning of earlier versions
(a new random head, every epoch evaluated on test, no choice made)."""
from __future__ import annotations

import math
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from fasttl import backbones
from fasttl.util.distributed import rank_and_world
from fasttl.heads.train import make_head
from fasttl.data import ImageLoader, TransformSpec
from fasttl.data.splits import VALIDATION_FRACTION, validation_split
from fasttl.util.errors import OptionError
from fasttl.optim import AdamW
from fasttl.heads.fit import eval_record, fit, last_step_lr
from fasttl.transfer.caching import Extraction, cached_features
from fasttl.transfer.models import BackboneWithHead
from fasttl.transfer.options import an_optional_positive_int, option
from fasttl.transfer.registry import Outcome, Strategy, register
from fasttl.transfer.trained import TrainedModel
from fasttl.transfer.rundir import Checkpoint, load_weights, read_config, save_weights
from fasttl.transfer.common import BACKBONE_OPTIONS, check_backbone_options, eval_timings, param_dtype
from fasttl.transfer.image_training import distributed, image_epoch, steps_per_epoch, warmup_cosine_schedule
from fasttl.util.seeds import torch_seed

WEIGHT_DECAY = 0.05
# LP-FT: the learning-rate scales (times --lr) tried for one epoch each; the best on validation
# goes on from where its epoch ended, so the sweep costs len(LR_SCALES) - 1 epochs.
LR_SCALES = (0.1, 0.3)
# LP-FT: stop this many epochs after the best validation score.
PATIENCE = 2
# L2-SP strength (alpha in Li et al.: alpha/2 * ||w - w0||^2 beside the mean cross-entropy).
L2SP_ALPHA = 0.01
# Where fine-tuning starts: the tuned linear probe (LP-FT), or a random head (plain fine-tuning).
FINETUNE_FROM = ("probe", "random")


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


def _renamed(record: Dict[str, float]) -> Dict[str, float]:
    """eval_* of the LP-FT loop are validation scores: named val_* in the history."""
    return {("val_" + k[5:] if k.startswith("eval_") else k): v for k, v in record.items()}


class _Probe:
    """LP-FT's first half: `linear`'s tuned head on the frozen backbone's cached --features (the
    final pooled map, or beside it the pooled outputs of the last stages, which the fine-tuned
    model's head then reads too), fit on the train part of the validation split."""

    @classmethod
    def fit(cls, cfg, ds, backbone, device, rank: int) -> "_Probe":
        from fasttl.heads.tuning import tune_linear

        probe = cls()
        started = time.perf_counter()
        probe.extraction = Extraction.of(cfg)
        cache = cached_features(backbone, ds.train, "train", probe.extraction, device=cfg.device,
                                progress=cfg.progress and rank == 0, rebuild_broken=cfg.overwrite)
        probe.extract_s = time.perf_counter() - started
        probe.extracted_images = cache.last_build.get("images", 0)
        started = time.perf_counter()
        tuned = tune_linear([cache], seed=cfg.seed, device=device, progress=cfg.progress and rank == 0)
        probe.train_part_head, probe.refit_head, probe.path, probe.choice = (tuned.train_part, tuned.head,
                                                                             tuned.records, tuned.choice)
        probe.probe_s = time.perf_counter() - started
        if not np.array_equal(cache.labels.cpu().numpy(), np.asarray(ds.train.labels)):
            raise RuntimeError("finetune: the feature cache's labels are not the training split's, in its order")
        return probe


class _LpftLoop:
    """LP-FT's second half: the network started from the probe's head, its optimizer for one
    learning-rate scale, one training epoch and the validation score; the sweep and fit drive it."""

    def __init__(self, cfg, backbone, probe: _Probe, num_classes: int, train_source, val_source, device, rank: int,
                 world: int):
        self.cfg, self.train_source, self.val_source = cfg, train_source, val_source
        self.device, self.rank, self.world = device, rank, world
        self.dtype = param_dtype(cfg)
        head = probe_head(backbone.tapped_dim(probe.extraction.taps), num_classes)
        head.load_state_dict(probe.train_part_head.state_dict())
        self.model, self.stages, self.trainable = build_model(cfg, num_classes, device, backbone=backbone, head=head,
                                                              taps=probe.extraction.taps)
        self.spec = TransformSpec.for_backbone(self.model.backbone.preprocessing, size=cfg.image_size)
        self.l2sp = (L2SP([p for p in self.model.backbone.parameters()], L2SP_ALPHA) if cfg.regularize == "l2sp"
                     else None)
        self.steps_per_epoch = steps_per_epoch(len(train_source), cfg, world)
        self.trained = distributed(self.model, device, world)
        self.optimizer = self.scheduler = self.scale = None
        self.epoch = 0

    def use_scale(self, scale: float):
        """A new optimizer and schedule at --lr times `scale`; returns them."""
        cfg = self.cfg
        groups = parameter_groups(self.model, self.stages, self.trainable, cfg.lr * scale,
                                  stage_weight_decay=0.0 if self.l2sp is not None else None)
        # bf16 params: fasttl AdamW keeps fp32 master weights and moments, so small updates survive.
        self.optimizer = AdamW(groups, lr=cfg.lr * scale, weight_decay=WEIGHT_DECAY)
        self.scheduler = warmup_cosine_schedule(self.optimizer, cfg, self.steps_per_epoch)
        self.scale = scale
        return self.optimizer, self.scheduler

    def train_epoch(self, epoch: int) -> Dict[str, float]:
        self.epoch = epoch
        record = image_epoch(self.trained, self.model.backbone, self.train_source, self.cfg, epoch, self.optimizer,
                              self.scheduler, rank=self.rank, world=self.world, device=self.device, dtype=self.dtype,
                              penalty=None if self.l2sp is None else self.l2sp.penalty)
        return dict(record, lr_scale=self.scale)

    def evaluate(self) -> Dict[str, float]:
        return eval_record(*_logits(self.model, self.val_source, self.spec, self.device, self.dtype))

    def load_result(self, model_state: dict, refit_head: Optional[nn.Module]) -> None:
        """The kept state; with `refit_head`, the probe's head refit on train + validation."""
        self.model.load_state_dict({k: v.to(self.device) for k, v in model_state.items()})
        if refit_head is not None:
            self.model.head.load_state_dict({k: v.to(device=self.device, dtype=self.dtype if v.is_floating_point()
                                                     else v.dtype) for k, v in refit_head.state_dict().items()})


def _sweep_lr_scales(loop: _LpftLoop, seed: int, best: BestState) -> Tuple[List[Dict[str, float]], Optional[dict]]:
    """One epoch from the probe at each of LR_SCALES; the best on validation goes on from where
    its epoch ended. Returns the sweep's records and the winner's state as fit's checkpoint holds
    it (None, the model back at the probe, when every scale diverged)."""
    initial = {k: v.detach().clone() for k, v in loop.model.state_dict().items()}
    sweep, winner = [], None
    for scale in LR_SCALES:
        loop.model.load_state_dict(initial)
        optimizer, scheduler = loop.use_scale(scale)
        used = last_step_lr(optimizer)
        torch.manual_seed(torch_seed(seed * 1_000_003))  # as fit seeds epoch 0
        loop.model.train()
        epoch_started = time.perf_counter()
        record = {"epoch": 1, **loop.train_epoch(0)}
        record["seconds"] = time.perf_counter() - epoch_started
        record["lr"] = used()
        record["images_per_s"] = record["images"] / max(record["seconds"], 1e-9)
        finite = math.isfinite(record["train_loss"])
        if finite:
            record.update(loop.evaluate())
            finite = math.isfinite(record["eval_loss"])
        sweep.append({"lr_scale": scale, "train_loss": record["train_loss"],
                      "val_accuracy": record.get("eval_accuracy"), "val_loss": record.get("eval_loss"),
                      "seconds": record["seconds"]})
        if finite and (winner is None or _score(record) > _score(winner[0])):
            winner = (record, {k: v.detach().clone() for k, v in loop.model.state_dict().items()},
                      optimizer.state_dict(), scheduler.state_dict())
    if winner is None:
        loop.model.load_state_dict(initial)
        return sweep, None
    record, model_state, optimizer_state, scheduler_state = winner
    loop.model.load_state_dict(model_state)
    loop.use_scale(record["lr_scale"])
    best.offer(1, record, loop.model)
    return sweep, {"epoch": 1, "model": model_state, "optimizer": optimizer_state, "scheduler": scheduler_state,
                   "history": [record], "extra": best.state_dict()}


def _choice(cfg, probe: _Probe, first: Dict[str, float], best: BestState, kept: int, margin: float,
            sweep: Optional[list], history: List[Dict[str, float]], train_images: int,
            validation_images: int) -> dict:
    """What LP-FT chose and why, for metrics.json and the report."""
    kept_record = first if kept == 0 else best.record
    within_error = best.epoch != 0 and kept == 0
    chosen_scale = history[0]["lr_scale"] if history else None
    finetuned, probe_score = best.record["eval_accuracy"], first["eval_accuracy"]
    if within_error:
        outcome = (f"the linear probe: fine-tuning's best validation accuracy {finetuned:.4f} (epoch {best.epoch}) "
                   f"is within one standard error ({margin:.4f}, {validation_images} images) of the probe's "
                   f"{probe_score:.4f}, so the result is the probe (refit on train + validation, on the pretrained "
                   "backbone)")
    elif kept == 0:
        outcome = ("the linear probe: fine-tuning never beat it on validation, so the result is the probe (refit on "
                   "train + validation, on the pretrained backbone)")
    else:
        outcome = f"fine-tuned, epoch {kept} kept: validation accuracy {finetuned:.4f} against the probe's " \
                  f"{probe_score:.4f}"
    choice = {
        "validation": {"fraction": VALIDATION_FRACTION, "train_images": train_images,
                       "validation_images": validation_images, "seed": cfg.seed},
        "start": "linear probe (LP-FT)",
        "probe": {**{key: probe.choice[key] for key in ("weight_decay", "shrinkage") if key in probe.choice},
                  "val_accuracy": probe.choice["val_accuracy"],
                  "val_loss": probe.choice["val_loss"], "first_val_accuracy": probe_score,
                  "first_val_loss": first["eval_loss"]},
        "lr_scale": chosen_scale, "lr": None if chosen_scale is None else cfg.lr * chosen_scale,
        "lr_scales_tried": list(LR_SCALES), "sweep": sweep, "epoch_kept": kept, "max_epochs": cfg.epochs,
        "epochs_run": len(history), "patience": PATIENCE, "regularize": cfg.regularize,
        "batch_norm": "pretrained statistics (frozen)", "val_accuracy": kept_record["eval_accuracy"],
        "val_loss": kept_record["eval_loss"], "one_standard_error": margin,
        "finetuned_best": {"epoch": best.epoch, "val_accuracy": finetuned},
        "refit_on": "train + validation (the probe)" if kept == 0 else "none (fine-tuned on the train part)",
        "outcome": outcome}
    if cfg.regularize == "l2sp":
        choice["l2sp_alpha"] = L2SP_ALPHA
    return choice


@register
class Finetune(Strategy):
    name = "finetune"
    display = "finetune"
    help = ("LP-FT: the tuned linear probe on cached features, then the backbone unfrozen (all or the top "
            "--finetune-stages K) from it, lr scale and epoch chosen on validation; torchrun-aware")
    epochs, lr, batch_size = 5, 1e-3, 32
    outputs = ("model",)
    options = {
        "finetune_stages": option(None, "finetune: unfreeze the top K stages (default all)", kind=int, metavar="K",
                                  check=an_optional_positive_int),
        "finetune_from": option("probe", "finetune: start from the tuned linear probe on cached features, with the "
                                "lr scale and epoch chosen on validation (probe: LP-FT), or from a random head for "
                                "--epochs epochs (random: plain fine-tuning)", choices=FINETUNE_FROM),
        "regularize": option("none", "finetune: decay the backbone toward zero (none: AdamW weight decay) or toward "
                             "its pretrained weights (l2sp)", choices=("none", "l2sp")),
    }
    reads = BACKBONE_OPTIONS

    def preflight(self, cfg) -> None:
        stages = len(check_backbone_options(cfg).stages())
        if cfg.finetune_stages is not None and cfg.finetune_stages > stages:
            raise OptionError(f"finetune_stages: expected 1..{stages} for {cfg.backbone}, got {cfg.finetune_stages}")
    distributed = True
    can_teach = True

    def train(self, cfg, ds, run_dir, device) -> List[Outcome]:
        if getattr(cfg, "finetune_from", "probe") == "random":
            return self._train_from_random(cfg, ds, run_dir, device)
        return self._train_lpft(cfg, ds, run_dir, device)

    def _train_lpft(self, cfg, ds, run_dir, device) -> List[Outcome]:
        rank, world = rank_and_world()
        torch.manual_seed(cfg.seed)
        backbone = backbones.create(cfg.backbone, weights=cfg.weights)
        probe = _Probe.fit(cfg, ds, backbone, device, rank)
        labels = np.asarray(ds.train.labels)
        train_rows, val_rows = validation_split(labels, cfg.seed)
        # Equal shards under torchrun: every rank runs the same number of steps.
        train_rows = train_rows[:len(train_rows) - len(train_rows) % world] if world > 1 else train_rows
        loop = _LpftLoop(cfg, backbone, probe, len(ds.classes), ds.train.subset(train_rows),
                         ds.train.subset(val_rows), device, rank, world)

        started = time.perf_counter()
        best = BestState()
        checkpoint = Checkpoint(run_dir, "model")
        state = checkpoint.load() if cfg.resume else None
        first = loop.evaluate()  # epoch 0: the probe, through the images as every later evaluation
        best.offer(0, first, loop.model)
        probe_state = {k: v.detach().to("cpu", copy=True) for k, v in loop.model.state_dict().items()}
        sweep = None  # when resuming, chosen before the interruption: its records are in the history
        if state is None:
            sweep, state = _sweep_lr_scales(loop, cfg.seed, best)
        else:
            loop.use_scale(state["history"][0]["lr_scale"])
        history: List[Dict[str, float]] = []
        if state is not None:
            def evaluate_and_keep():
                record = loop.evaluate()
                best.offer(loop.epoch + 1, record, loop.model)
                return record

            history = fit(loop.model, loop.optimizer, loop.scheduler, cfg.epochs, loop.train_epoch,
                          evaluate_and_keep, seed=cfg.seed, checkpoint=checkpoint if rank == 0 else None,
                          start=state, progress=cfg.progress and rank == 0, extra_state=best, patience=PATIENCE,
                          description=f"finetune (LP-FT, top {loop.trainable} stages)")
        train_s = time.perf_counter() - started

        # The result: the best validation state; the probe (refit on train + validation, as
        # `linear` makes it) when fine-tuning never beat it by more than one standard error.
        finetuned_won, margin = keep_finetuned(first["eval_accuracy"], best.record["eval_accuracy"], len(val_rows))
        kept = best.epoch if finetuned_won or best.epoch == 0 else 0
        loop.load_result(probe_state if kept == 0 else best.model, probe.refit_head if kept == 0 else None)
        started = time.perf_counter()
        logits, test_labels = _logits(loop.model, ds.test, loop.spec, device, loop.dtype)
        timings = dict(eval_timings(train_s, time.perf_counter() - started,
                                    sum(h.get("images", 0) for h in history) * world, len(test_labels)),
                       extract_s=probe.extract_s, extracted_images=probe.extracted_images, probe_s=probe.probe_s)
        if sweep:
            timings["sweep_s"] = sum(s["seconds"] for s in sweep)
        choice = _choice(cfg, probe, first, best, kept, margin, sweep, history, len(train_rows), len(val_rows))
        weights = save_weights(run_dir, "model", loop.model.float()) if rank == 0 else ""
        notes = {"trainable_stages": loop.trainable, "stages": len(loop.stages), "world_size": world, "init": "probe",
                 "features": {"kind": cfg.features, "dim": backbone.tapped_dim(probe.extraction.taps)},
                 "choice": choice, "probe_path": probe.path}
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
        scheduler = warmup_cosine_schedule(optimizer, cfg, steps_per_epoch(len(ds.train), cfg, world))
        trained = distributed(model, device, world)

        def train_epoch(epoch):
            return image_epoch(trained, model.backbone, ds.train, cfg, epoch, optimizer, scheduler, rank=rank,
                                world=world, device=device, dtype=dtype)

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
        if config["finetune_from"] == "probe":
            taps = Extraction.of(config).taps
            model = FineTuneModel(backbone, probe_head(backbone.tapped_dim(taps), len(config["classes"])), [],
                                  taps=taps)
        else:
            model = FineTuneModel(backbone, finetune_head(backbone.feature_dim, len(config["classes"])), [])
        spec = TransformSpec.for_backbone(backbone.preprocessing, size=config["image_size"])
        return TrainedModel(load_weights(run_dir, "model", model).to(device), spec, config["classes"], device)
