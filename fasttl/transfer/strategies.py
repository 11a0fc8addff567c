"""The transfer strategies. Each trains its model(s), saves weights in the run directory and
returns, per model, the test logits, the training history and the timings."""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

import fasttl
from fasttl import backbones
from fasttl.cache import FeatureCache, make_head, predict_cache
from fasttl.cache.build import sample_ids
from fasttl.cache.heads import evaluate_head, feature_statistics, head_epoch
from fasttl.data import DataError, ImageLoader, TransformSpec, class_folder_splits
from fasttl.optim import AdamW
from fasttl.training import EpochStats, fit, step, warmup_cosine
from fasttl.transfer.caching import cached_features
from fasttl.transfer.config import RunConfig
from fasttl.transfer.datasets import Dataset
from fasttl.transfer.models import DANN, BackboneWithHead, SmallCNN
from fasttl.transfer.rundir import Checkpoint, load_weights, read_config, save_weights

# The from-scratch CNN sees images at their native resolution, normalized around mid-grey.
NATIVE_MEAN, NATIVE_STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


@dataclass
class Outcome:
    """One trained model's results on the test split."""

    name: str
    logits: Tensor
    labels: Tensor
    history: List[Dict[str, float]]
    timings: Dict[str, float] = field(default_factory=dict)
    weights: str = ""
    notes: Dict[str, object] = field(default_factory=dict)
    samples: Optional[List[str]] = None  # names of the evaluated images when not the test split's


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


# ---- feature transfer: linear / mlp heads on cached features -------------------------------
def _caches(cfg: RunConfig, backbone, ds: Dataset, mirror: bool = False) -> Dict[str, object]:
    started = time.perf_counter()
    views = [False, True] if mirror else [False]
    caches = {split: [cached_features(backbone, source, split, cfg.image_size, dtype=cfg.cache_dtype,
                                      device=cfg.device, progress=cfg.progress, mirror=view) for view in views]
              for split, source in (("train", ds.train), ("test", ds.test))}
    built = sum(getattr(c, "last_build", {}).get("images", 0) for views_ in caches.values() for c in views_)
    return {"train": caches["train"][0], "test": caches["test"][0], "train_views": caches["train"],
            "test_views": caches["test"], "extract_s": time.perf_counter() - started, "extracted_images": built}


@torch.no_grad()
def _view_logits(head: nn.Module, views: List[FeatureCache]):
    """Logits averaged over the views of the test split (the plain and, if cached, mirrored images)."""
    outputs = [predict_cache(head, view) for view in views]
    return torch.stack([logits for logits, _ in outputs]).mean(0), outputs[0][1]


def feature_head(cfg: RunConfig, ds: Dataset, run_dir: str) -> List[Outcome]:
    backbone = backbones.create(cfg.backbone, weights=cfg.weights)
    caches = _caches(cfg, backbone, ds, mirror=cfg.mirror_views)
    train = FeatureCache.concat(caches["train_views"]) if cfg.mirror_views else caches["train"]
    torch.manual_seed(cfg.seed)
    mean, std = feature_statistics(train)
    head = make_head(cfg.strategy, train.feature_dim, len(ds.classes), mean, std)
    optimizer = AdamW(head.parameters(), lr=cfg.lr, weight_decay=1e-4)
    loader = train.loader(cfg.batch_size, shuffle=True, seed=cfg.seed)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, pct_start=0.1,
                                                    total_steps=max(1, cfg.epochs * len(loader)))

    def train_epoch(epoch):
        loader.set_epoch(epoch)
        return head_epoch(head, loader, optimizer, scheduler)

    def evaluate():
        logits, labels = _view_logits(head, caches["test_views"])
        return {"eval_loss": float(F.cross_entropy(logits, labels)),
                "eval_accuracy": float((logits.argmax(1) == labels).float().mean())}

    started = time.perf_counter()
    history = fit(head, optimizer, scheduler, cfg.epochs, train_epoch, evaluate, seed=cfg.seed,
                  checkpoint=Checkpoint(run_dir, "head"), resume=cfg.resume, progress=cfg.progress,
                  description=f"{cfg.strategy} head")
    train_s = time.perf_counter() - started
    started = time.perf_counter()
    logits, labels = _view_logits(head, caches["test_views"])
    eval_s = time.perf_counter() - started
    timings = {"extract_s": caches["extract_s"], "extracted_images": caches["extracted_images"], "train_s": train_s,
               "eval_s": eval_s, "train_images_per_s": len(train) * len(history) / max(train_s, 1e-9),
               "eval_images_per_s": len(labels) / max(eval_s, 1e-9)}
    if caches["extracted_images"]:
        timings["extract_images_per_s"] = caches["extracted_images"] / max(caches["extract_s"], 1e-9)
    return [Outcome(cfg.strategy, logits, labels, history, timings, save_weights(run_dir, "head", head),
                    {"cache": os.path.dirname(caches["train"].directory), "views": len(caches["test_views"])})]


# ---- images at native resolution in memory: scratch and distill -----------------------------
def native_images(source, size: int, seed: int) -> Tensor:
    spec = TransformSpec(size, NATIVE_MEAN, NATIVE_STD, 1.0, train=False, seed=seed)
    return torch.cat([x for x, _ in ImageLoader(source, spec, 256)])


def _labels(source) -> Tensor:
    return torch.as_tensor(list(source.labels), dtype=torch.int64)


def _cnn_epoch(model, images: Tensor, labels: Tensor, batch_size: int, optimizer, scheduler, epoch: int, seed: int,
               loss_fn: Callable[[Tensor, Tensor], Tensor]) -> Dict[str, float]:
    generator = torch.Generator().manual_seed(seed * 7919 + epoch)
    order = torch.randperm(len(labels), generator=generator)
    flips = torch.rand(len(labels), generator=generator) < 0.5
    stats = EpochStats()
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        x = images[idx]
        x = torch.where(flips[idx].view(-1, 1, 1, 1), x.flip(-1), x)  # horizontal flip augmentation
        logits = model(x)
        loss = loss_fn(logits, idx)
        step(loss, optimizer, scheduler)
        stats.add(loss, logits, labels[idx])
    return stats.record()


@torch.no_grad()
def _cnn_logits(model, images: Tensor, batch_size: int = 512) -> Tensor:
    model.eval()
    return torch.cat([model(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])


def _train_cnn(cfg: RunConfig, ds: Dataset, run_dir: str, name: str,
               teacher_logits: Optional[Tensor] = None) -> Outcome:
    started = time.perf_counter()
    train_x, test_x = native_images(ds.train, ds.native_size, cfg.seed), native_images(ds.test, ds.native_size, cfg.seed)
    train_y, test_y = _labels(ds.train), _labels(ds.test)
    load_s = time.perf_counter() - started
    torch.manual_seed(cfg.seed)
    model = SmallCNN(len(ds.classes))
    optimizer = AdamW(model.parameters(), lr=cfg.lr, weight_decay=5e-4)
    steps = cfg.epochs * math.ceil(len(train_y) / cfg.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=max(1, steps), pct_start=0.15)
    if teacher_logits is None:
        loss_fn = lambda logits, idx: F.cross_entropy(logits, train_y[idx])  # noqa: E731
    else:
        loss_fn = lambda logits, idx: fasttl.distillation_loss(  # noqa: E731
            logits, teacher_logits[idx], train_y[idx], temperature=cfg.temperature, alpha=cfg.alpha)

    def evaluate():
        logits = _cnn_logits(model, test_x)
        return {"eval_loss": float(F.cross_entropy(logits, test_y)),
                "eval_accuracy": float((logits.argmax(1) == test_y).float().mean())}

    started = time.perf_counter()
    history = fit(model, optimizer, scheduler, cfg.epochs,
                  lambda epoch: _cnn_epoch(model, train_x, train_y, cfg.batch_size, optimizer, scheduler, epoch,
                                           cfg.seed, loss_fn),
                  evaluate, seed=cfg.seed, checkpoint=Checkpoint(run_dir, name), resume=cfg.resume,
                  progress=cfg.progress, description=name)
    train_s = time.perf_counter() - started
    started = time.perf_counter()
    logits = _cnn_logits(model, test_x)
    eval_s = time.perf_counter() - started
    timings = {"load_s": load_s, "train_s": train_s, "eval_s": eval_s,
               "train_images_per_s": len(train_y) * len(history) / max(train_s, 1e-9),
               "eval_images_per_s": len(test_y) / max(eval_s, 1e-9)}
    return Outcome(name, logits, test_y, history, timings, save_weights(run_dir, name, model),
                   {"input_size": ds.native_size})


def scratch(cfg: RunConfig, ds: Dataset, run_dir: str) -> List[Outcome]:
    return [_train_cnn(cfg, ds, run_dir, "scratch")]


# ---- distillation ------------------------------------------------------------------------
def teacher_model(teacher_dir: str, classes: List[str]):
    """(config, model on images or on features) of a finished linear/mlp/finetune run."""
    tcfg = read_config(teacher_dir)
    if tcfg.get("strategy") not in ("linear", "mlp", "finetune"):
        raise ValueError(f"teacher: {teacher_dir} is a {tcfg.get('strategy')!r} run; a teacher must be a linear, mlp "
                         "or finetune run")
    if list(tcfg.get("classes", [])) != list(classes):
        raise ValueError(f"teacher: {teacher_dir} was trained for classes {tcfg.get('classes')}, "
                         f"but the data has {list(classes)}")
    backbone = backbones.create(tcfg["backbone"], weights=tcfg.get("weights"))
    if tcfg["strategy"] == "finetune":
        model = BackboneWithHead(backbone, finetune_head(backbone.feature_dim, len(classes)))
        return tcfg, load_weights(teacher_dir, "model", model).eval()
    head = make_head(tcfg["strategy"], backbone.feature_dim, len(classes))
    return tcfg, (backbone, load_weights(teacher_dir, "head", head).eval())


@torch.no_grad()
def teacher_logits_for(teacher_dir: str, ds: Dataset, cfg: RunConfig, run_dir: str) -> Tensor:
    """The teacher's logits on every training image, computed once and kept in the run directory."""
    path = os.path.join(run_dir, "teacher_logits.pt")
    if os.path.isfile(path):
        saved = torch.load(path, map_location="cpu")
        if saved["teacher"] == os.path.abspath(teacher_dir) and saved["logits"].shape[0] == len(ds.train):
            return saved["logits"]
    tcfg, model = teacher_model(teacher_dir, ds.classes)
    if isinstance(model, tuple):
        backbone, head = model
        cache = cached_features(backbone, ds.train, "train", tcfg["image_size"], dtype=tcfg.get("cache_dtype", "fp16"),
                                device=cfg.device, progress=cfg.progress)
        logits, _ = predict_cache(head, cache)
    else:
        spec = TransformSpec.for_backbone(model.backbone.preprocessing, size=tcfg["image_size"])
        logits = torch.cat([model(x).float() for x, _ in ImageLoader(ds.train, spec, 64)])
    from fasttl.cache.store import write_atomic
    import io

    buffer = io.BytesIO()
    torch.save({"teacher": os.path.abspath(teacher_dir), "logits": logits}, buffer)
    write_atomic(path, buffer.getvalue())
    return logits


def distill(cfg: RunConfig, ds: Dataset, run_dir: str) -> List[Outcome]:
    started = time.perf_counter()
    logits = teacher_logits_for(cfg.teacher, ds, cfg, run_dir)
    teacher_s = time.perf_counter() - started
    outcome = _train_cnn(cfg, ds, run_dir, "distill", teacher_logits=logits)
    outcome.timings["teacher_logits_s"] = teacher_s
    teacher_accuracy = float((logits.argmax(1) == _labels(ds.train)).float().mean())
    outcome.notes.update(teacher=os.path.abspath(cfg.teacher), teacher_train_accuracy=teacher_accuracy,
                         temperature=cfg.temperature, alpha=cfg.alpha)
    return [outcome]


# ---- fine-tuning -----------------------------------------------------------------------------
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


def finetune(cfg: RunConfig, ds: Dataset, run_dir: str) -> List[Outcome]:
    device = torch.device(cfg.device)
    rank, world = _rank(), dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    torch.manual_seed(cfg.seed)
    backbone = backbones.create(cfg.backbone, weights=cfg.weights)
    stages = backbone.stages()
    trainable = len(stages) if cfg.finetune_stages is None else cfg.finetune_stages
    if not 1 <= trainable <= len(stages):
        raise ValueError(f"finetune_stages: expected 1..{len(stages)} for {cfg.backbone}, got {trainable}")
    frozen = stages[:len(stages) - trainable]
    for p in backbone.parameters():
        p.requires_grad_(False)
    for stage in stages[len(stages) - trainable:]:
        for p in stage.parameters():
            p.requires_grad_(True)
    model = FineTuneModel(backbone, finetune_head(backbone.feature_dim, len(ds.classes)), frozen)
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
    # channels_last: oneDNN (and cuDNN) convolutions are faster on NHWC.
    model = model.to(device=device, dtype=dtype, memory_format=torch.channels_last)
    # bf16 params: fasttl AdamW keeps fp32 master weights and moments, so small updates survive.
    optimizer = AdamW(parameter_groups(model, stages, trainable, cfg.lr), lr=cfg.lr, weight_decay=0.05)
    spec = TransformSpec.for_backbone(backbone.preprocessing, size=cfg.image_size)
    train_spec = TransformSpec.for_backbone(backbone.preprocessing, size=cfg.image_size, train=True, seed=cfg.seed)
    steps_per_epoch = math.ceil(len(ds.train) // world / cfg.batch_size) or 1
    scheduler = warmup_cosine(optimizer, cfg.epochs * steps_per_epoch, warmup_steps=max(1, steps_per_epoch // 2))
    trained = model
    if world > 1:
        trained = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    def train_epoch(epoch):
        loader = ImageLoader(ds.train, TransformSpec(**{**train_spec.__dict__, "seed": cfg.seed * 1000 + epoch}),
                             cfg.batch_size, shard_id=rank, num_shards=world, device=device, dtype=dtype)
        stats = EpochStats()
        for images, labels in loader:
            logits = trained(images.contiguous(memory_format=torch.channels_last)).float()
            loss = F.cross_entropy(logits, labels)
            step(loss, optimizer, scheduler)
            stats.add(loss, logits, labels)
        return stats.record()

    @torch.no_grad()
    def test_logits():
        model.eval()
        loader = ImageLoader(ds.test, spec, 128, device=device, dtype=dtype)
        outputs = [(model(x.contiguous(memory_format=torch.channels_last)).float().cpu(), y.cpu()) for x, y in loader]
        return torch.cat([o for o, _ in outputs]), torch.cat([y for _, y in outputs])

    def evaluate():
        logits, labels = test_logits()
        return {"eval_loss": float(F.cross_entropy(logits, labels)),
                "eval_accuracy": float((logits.argmax(1) == labels).float().mean())}

    started = time.perf_counter()
    history = fit(model, optimizer, scheduler, cfg.epochs, train_epoch, evaluate, seed=cfg.seed,
                  checkpoint=Checkpoint(run_dir, "model") if rank == 0 else None, resume=cfg.resume,
                  progress=cfg.progress and rank == 0, description=f"finetune (top {trainable} stages)")
    train_s = time.perf_counter() - started
    started = time.perf_counter()
    logits, labels = test_logits()
    eval_s = time.perf_counter() - started
    timings = {"train_s": train_s, "eval_s": eval_s,
               "train_images_per_s": sum(h.get("images", 0) for h in history) * world / max(train_s, 1e-9),
               "eval_images_per_s": len(labels) / max(eval_s, 1e-9)}
    weights = save_weights(run_dir, "model", model.float()) if rank == 0 else ""
    return [Outcome("finetune", logits, labels, history, timings, weights,
                    {"trainable_stages": trainable, "stages": len(stages), "precision": cfg.precision,
                     "world_size": world})]


# ---- domain-adversarial adaptation ------------------------------------------------------------
def target_source(path: str, classes: List[str]):
    train, test = class_folder_splits(path)
    target = test if test is not None else train
    if list(target.classes) != list(classes):
        raise DataError(f"target_data: {path} has classes {target.classes}, the source has {list(classes)}")
    return target


def dann(cfg: RunConfig, ds: Dataset, run_dir: str) -> List[Outcome]:
    backbone = backbones.create(cfg.backbone, weights=cfg.weights)
    caches = _caches(cfg, backbone, ds)
    target = target_source(cfg.target_data, ds.classes)
    started = time.perf_counter()
    target_cache = cached_features(backbone, target, "target", cfg.image_size, dtype=cfg.cache_dtype,
                                   device=cfg.device, progress=cfg.progress)
    extract_s = caches["extract_s"] + time.perf_counter() - started
    outcomes = []
    for name, adversarial in (("dann", True), ("source_only", False)):
        outcomes.append(_train_dann(cfg, caches["train"], caches["test"], target_cache, run_dir, name, adversarial))
        outcomes[-1].timings["extract_s"] = extract_s
        outcomes[-1].samples = sample_ids(target)
    return outcomes


def _train_dann(cfg: RunConfig, source: FeatureCache, source_test: FeatureCache, target: FeatureCache, run_dir: str,
                name: str, adversarial: bool) -> Outcome:
    torch.manual_seed(cfg.seed)
    mean, std = feature_statistics(source)
    model = DANN(source.feature_dim, len(source.classes), mean=mean, std=std)
    optimizer = AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    source_loader = source.loader(cfg.batch_size, shuffle=True, seed=cfg.seed, drop_last=len(source) > cfg.batch_size)
    target_loader = target.loader(cfg.batch_size, shuffle=True, seed=cfg.seed + 1)
    total_steps = cfg.epochs * len(source_loader)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=max(1, total_steps),
                                                    pct_start=0.1)

    def target_batches(epoch):
        target_loader.set_epoch(epoch)
        while True:
            for features, _ in target_loader:  # target labels are never used in training
                yield features

    def train_epoch(epoch):
        source_loader.set_epoch(epoch)
        targets = target_batches(epoch)
        stats = EpochStats()
        for index, (features, labels) in enumerate(source_loader):
            progress = (epoch * len(source_loader) + index) / max(1, total_steps)
            # Ganin and Lempitsky's schedule: the reversal strength rises from 0 to 1.
            model.reverse.strength = 2.0 / (1.0 + math.exp(-10 * progress)) - 1.0 if adversarial else 0.0
            logits = model(features)
            loss = F.cross_entropy(logits, labels)
            if adversarial:
                target_features = next(targets)
                domain = torch.cat([model.domain_logits(features), model.domain_logits(target_features)])
                is_target = torch.cat([torch.zeros(len(features)), torch.ones(len(target_features))])
                loss = loss + F.binary_cross_entropy_with_logits(domain, is_target)
            step(loss, optimizer, scheduler)
            stats.add(loss, logits, labels)
        return stats.record()

    def evaluate():
        record = evaluate_head(model, target)
        source_record = evaluate_head(model, source_test)
        record["source_eval_accuracy"] = source_record["eval_accuracy"]
        return record

    started = time.perf_counter()
    history = fit(model, optimizer, scheduler, cfg.epochs, train_epoch, evaluate, seed=cfg.seed,
                  checkpoint=Checkpoint(run_dir, name), resume=cfg.resume, progress=cfg.progress, description=name)
    train_s = time.perf_counter() - started
    started = time.perf_counter()
    logits, labels = predict_cache(model, target)
    eval_s = time.perf_counter() - started
    source_accuracy = history[-1]["source_eval_accuracy"] if history else float("nan")
    return Outcome(name, logits, labels, history,
                   {"train_s": train_s, "eval_s": eval_s, "eval_images_per_s": len(labels) / max(eval_s, 1e-9)},
                   save_weights(run_dir, name, model),
                   {"evaluated_on": "target", "source_test_accuracy": source_accuracy})


RUNNERS = {"linear": feature_head, "mlp": feature_head, "finetune": finetune, "distill": distill, "dann": dann,
           "scratch": scratch}
