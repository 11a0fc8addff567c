"""Feature transfer, `linear` and `mlp`: the frozen backbone runs once per image into a feature
cache (reused by every later run with the same fingerprint), and a head trains on the cache."""
from __future__ import annotations

import os
import time
from typing import Dict, List

import torch

from fasttl import backbones
from fasttl.cache import FeatureCache, make_head
from fasttl.cache.heads import predict_views, train_head
from fasttl.data import TransformSpec
from fasttl.transfer.caching import cached_features
from fasttl.transfer.models import BackboneWithHead
from fasttl.transfer.registry import Outcome, Strategy, TrainedModel, register
from fasttl.transfer.rundir import Checkpoint, load_weights, read_config, save_weights
from fasttl.transfer.strategies.common import eval_timings, param_dtype, throughput


def feature_caches(cfg, backbone, ds, mirror: bool = False) -> Dict[str, object]:
    """The train and test caches of a dataset (each with its mirrored view when `mirror`)."""
    started = time.perf_counter()
    views = [False, True] if mirror else [False]
    caches = {split: [cached_features(backbone, source, split, cfg.image_size, dtype=cfg.cache_dtype,
                                      device=cfg.device, progress=cfg.progress, rebuild_broken=cfg.overwrite,
                                      mirror=view) for view in views]
              for split, source in (("train", ds.train), ("test", ds.test))}
    built = sum(getattr(c, "last_build", {}).get("images", 0) for views_ in caches.values() for c in views_)
    return {"train": caches["train"][0], "test": caches["test"][0], "train_views": caches["train"],
            "test_views": caches["test"], "extract_s": time.perf_counter() - started, "extracted_images": built}


class FeatureModel(TrainedModel):
    """A head on a frozen backbone's features: `module` runs on images (predict, export), and
    `logits` goes through the feature cache, as training did."""

    def __init__(self, backbone, head, config: dict, device: torch.device):
        spec = TransformSpec.for_backbone(backbone.preprocessing, size=config["image_size"])
        super().__init__(BackboneWithHead(backbone, head).to(device), spec, config["classes"], device)
        self.backbone, self.head, self.config = backbone, head.to(device).eval(), config

    @torch.no_grad()
    def logits(self, source, progress: bool = False, split: str = "eval", batch_size: int = 4096):
        views = [False, True] if self.config.get("mirror_views") else [False]
        caches = [cached_features(self.backbone, source, split, self.config["image_size"],
                                  dtype=self.config.get("cache_dtype", "fp16"), device=self.device, progress=progress,
                                  mirror=view) for view in views]
        return predict_views(self.head, caches, self.device)


class FeatureTransfer(Strategy):
    epochs, batch_size = 10, 256
    outputs = ("head",)
    can_teach = True

    def train(self, cfg, ds, run_dir, device) -> List[Outcome]:
        backbone = backbones.create(cfg.backbone, weights=cfg.weights)
        caches = feature_caches(cfg, backbone, ds, mirror=cfg.mirror_views)
        train = FeatureCache.concat(caches["train_views"]) if cfg.mirror_views else caches["train"]
        started = time.perf_counter()
        head, history = train_head(train, kind=self.name, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                                   weight_decay=1e-4, seed=cfg.seed, device=device, eval_cache=caches["test_views"],
                                   progress=cfg.progress, checkpoint=Checkpoint(run_dir, "head"), resume=cfg.resume,
                                   dtype=param_dtype(cfg))
        train_s = time.perf_counter() - started
        started = time.perf_counter()
        logits, labels = predict_views(head, caches["test_views"], device)
        timings = dict(eval_timings(train_s, time.perf_counter() - started, len(train) * len(history), len(labels)),
                       extract_s=caches["extract_s"], extracted_images=caches["extracted_images"])
        if caches["extracted_images"]:
            timings["extract_images_per_s"] = throughput(caches["extracted_images"], caches["extract_s"])
        return [Outcome(self.name, self.display, logits, labels, history, timings,
                        save_weights(run_dir, "head", head.float()),
                        {"cache": os.path.dirname(caches["train"].directory), "views": len(caches["test_views"])},
                        device=str(device), precision=cfg.precision)]

    def load(self, run_dir, device) -> TrainedModel:
        config = read_config(run_dir)
        backbone = backbones.create(config["backbone"], weights=config.get("weights"))
        head = make_head(self.name, backbone.feature_dim, len(config["classes"]))
        return FeatureModel(backbone, load_weights(run_dir, "head", head), config, device)


@register
class Linear(FeatureTransfer):
    name = "linear"
    display = "linear (feature transfer)"
    help = "a linear head on cached features of the frozen backbone"
    lr = 3e-3


@register
class Mlp(FeatureTransfer):
    name = "mlp"
    display = "mlp (feature transfer)"
    help = "an MLP head on cached features of the frozen backbone"
    lr = 1e-3
