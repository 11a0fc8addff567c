"""`dann`, domain-adversarial adaptation (Ganin and Lempitsky 2015): a trainable bottleneck on
cached features feeds the label classifier and, through gradient reversal, a domain classifier
that tells the labeled source from the unlabeled target (--target-data). Evaluated on the
target's labels, beside the same network trained without adaptation (source only)."""
from __future__ import annotations

import math
import sys
import time
from typing import List

import torch
import torch.nn.functional as F

from fasttl import backbones
from fasttl.cache import FeatureCache
from fasttl.heads import predict_cache
from fasttl.heads.train import evaluate_head, feature_statistics, on_device
from fasttl.data import DataError, class_folder_splits, screen
from fasttl.data.sources import disk_keys
from fasttl.optim import AdamW
from fasttl.heads.fit import EpochStats, fit, one_cycle, step
from fasttl.transfer.caching import Extraction, cached_features
from fasttl.transfer.models import DANN
from fasttl.transfer.options import a_path, option
from fasttl.transfer.registry import Outcome, Strategy, register
from fasttl.transfer.trained import TrainedModel
from fasttl.transfer.rundir import Checkpoint, load_weights, read_config, save_weights
from fasttl.transfer.common import BACKBONE_OPTIONS, check_backbone_options, run_backbone, param_dtype
from fasttl.transfer.feature_models import FeatureModel, feature_caches
from fasttl.util.distributed import rank_and_world
from fasttl.util.outputs import passed_over, within


def _target_split(path: str):
    """The target domain's images as listed: its test/ split when it has one, else the folder."""
    try:
        train, test = class_folder_splits(path)
    except DataError as exc:  # its lines name data:, the option it reads elsewhere
        said = str(exc)
        raise DataError(f"target_data: {said[len('data: '):]}" if said.startswith("data: ") else said) from None
    return test if test is not None else train


def target_source(path: str, classes: List[str], on_error: str = "fail"):
    """The target domain's images (its test/ split when it has one), screened with the run's
    --on-error as the source is."""
    target = _target_split(path)
    if list(target.classes) != list(classes):
        raise DataError(f"target_data: {path} has classes {target.classes}, the source has {list(classes)}")
    return screen(target, on_error) if on_error == "skip" else target


def refuse_source_images(target, source_train) -> None:
    """The target domain is not the source's training images (its accuracy would be scored on
    images the model trained on)."""
    trained = {key for key in disk_keys(source_train) if key is not None}
    shared = [target.name_of(i) for i, key in enumerate(disk_keys(target)) if key in trained]
    if shared:
        raise DataError(f"target_data: {len(shared)} of its images are the source's training images ({shared[0]}"
                        f"{', ...' if len(shared) > 1 else ''}); give the target domain's own images")


def _endless(loader, epoch: int):
    """Target batches, cycling: the target may be smaller than the source."""
    loader.set_epoch(epoch)
    while True:
        for features, _ in loader:  # target labels are never used in training
            yield features


def _adversarial_epoch(model, source_loader, target_loader, optimizer, scheduler, epoch: int, total_steps: int,
                       adversarial: bool):
    source_loader.set_epoch(epoch)
    targets = _endless(target_loader, epoch)
    stats = EpochStats()
    for index, (features, labels) in enumerate(source_loader):
        progress = (epoch * len(source_loader) + index) / max(1, total_steps)
        # Ganin and Lempitsky's schedule: the reversal strength rises from 0 to 1.
        model.reverse.strength = 2.0 / (1.0 + math.exp(-10 * progress)) - 1.0 if adversarial else 0.0
        logits = model(features).float()
        loss = F.cross_entropy(logits, labels)
        if adversarial:
            target_features = next(targets)
            domain = torch.cat([model.domain_logits(features), model.domain_logits(target_features)]).float()
            is_target = torch.cat([torch.zeros(len(features)), torch.ones(len(target_features))]).to(domain.device)
            loss = loss + F.binary_cross_entropy_with_logits(domain, is_target)
        step(loss, optimizer, scheduler)
        stats.add(loss, logits, labels)
    return stats.record()


def train_dann(cfg, source: FeatureCache, source_test: FeatureCache, target: FeatureCache, run_dir: str,
               name: str, display: str, adversarial: bool, device: torch.device) -> Outcome:
    torch.manual_seed(cfg.seed)
    dtype = param_dtype(cfg)
    mean, std = feature_statistics(source)
    model = DANN(source.feature_dim, len(source.classes), mean=mean, std=std).to(device, dtype)
    optimizer = AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    source, source_test, target = (on_device(c, device) for c in (source, source_test, target))
    source_loader = source.loader(cfg.batch_size, shuffle=True, seed=cfg.seed, drop_last=len(source) > cfg.batch_size,
                                  device=device, out_dtype=dtype)
    target_loader = target.loader(cfg.batch_size, shuffle=True, seed=cfg.seed + 1, device=device, out_dtype=dtype)
    total_steps = cfg.epochs * len(source_loader)
    scheduler = one_cycle(optimizer, cfg.lr, total_steps, pct_start=0.1)

    def evaluate():
        return dict(evaluate_head(model, target, device),
                    source_eval_accuracy=evaluate_head(model, source_test, device)["eval_accuracy"])

    started = time.perf_counter()
    history = fit(model, optimizer, scheduler, cfg.epochs,
                  lambda epoch: _adversarial_epoch(model, source_loader, target_loader, optimizer, scheduler, epoch,
                                                   total_steps, adversarial),
                  evaluate, seed=cfg.seed, checkpoint=Checkpoint(run_dir, name), resume=cfg.resume,
                  progress=cfg.progress, description=name)
    train_s = time.perf_counter() - started
    started = time.perf_counter()
    logits, labels = predict_cache(model, target, device)
    eval_s = time.perf_counter() - started
    source_accuracy = history[-1]["source_eval_accuracy"] if history else None
    return Outcome(name, display, logits, labels, history,
                   {"train_s": train_s, "eval_s": eval_s, "eval_images_per_s": len(labels) / max(eval_s, 1e-9)},
                   save_weights(run_dir, name, model.float()),
                   {"evaluated_on": "target", "source_test_accuracy": source_accuracy},
                   device=str(device), precision=cfg.precision)


@register
class Dann(Strategy):
    name = "dann"
    display = "dann"
    help = "domain-adversarial adaptation on cached features to an unlabeled target domain (--target-data DIR)"
    options = {
        "target_data": option(None, "dann: the unlabeled target domain (class folders; labels only for evaluation)",
                              kind=str, metavar="DIR", check=a_path, path=True),
    }
    requires = ("target_data",)
    reads = BACKBONE_OPTIONS

    def inputs_identity(self, cfg) -> dict:
        return {"target_identity": _target_split(cfg.target_data).identity()}

    def preflight(self, cfg) -> None:
        check_backbone_options(cfg)
    epochs, lr, batch_size = 15, 1e-3, 256
    outputs = ("dann", "source_only")

    def train(self, cfg, ds, run_dir, device) -> List[Outcome]:
        backbone = backbones.create(cfg.backbone, weights=cfg.weights)
        caches = feature_caches(cfg, backbone, ds)
        target = target_source(cfg.target_data, ds.classes, cfg.on_error)
        refuse_source_images(target, ds.train)
        passed = [{"path": within(p, cfg.target_data), "reason": why} for p, why in target.ignored]
        if passed and rank_and_world()[0] == 0:  # said as --data's are: its score is on fewer images than it holds
            print(passed_over(target.ignored, cfg.target_data, "the --target-data folder") + " (listed in metrics.json "
                  "under \"notes\")", file=sys.stderr, flush=True)
        started = time.perf_counter()
        target_cache = cached_features(backbone, target, "target", Extraction.of(cfg), device=cfg.device,
                                       progress=cfg.progress, rebuild_broken=cfg.overwrite)
        extract_s = caches.extract_s + time.perf_counter() - started
        outcomes = []
        for name, display, adversarial in (("dann", self.display, True),
                                           ("source_only", "source only (no adaptation)", False)):
            outcome = train_dann(cfg, caches.train, caches.test, target_cache, run_dir, name, display,
                                 adversarial, device)
            outcome.timings["extract_s"] = extract_s
            outcome.samples = target.sample_ids()
            if passed:
                outcome.notes["target_ignored"] = passed
            outcomes.append(outcome)
        return outcomes

    def load(self, run_dir, device) -> TrainedModel:
        config = read_config(run_dir)
        backbone = run_backbone(config)
        dim = backbone.tapped_dim(Extraction.of(config).taps)
        head = load_weights(run_dir, "dann", DANN(dim, len(config["classes"])))
        return FeatureModel(backbone, head, dict(config, mirror_views="none"), device)
