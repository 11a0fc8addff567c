"""`fasttl eval RUN_DIR --data DIR`: re-evaluates a saved run on (new) data."""
from __future__ import annotations

import os
from typing import Dict

import torch

from fasttl import backbones
from fasttl.cache import make_head
from fasttl.cache.store import write_json_atomic
from fasttl.data import DataError, ImageLoader, TransformSpec
from fasttl.transfer.caching import cached_features
from fasttl.transfer.datasets import load_dataset
from fasttl.transfer.metrics import classification_metrics
from fasttl.transfer.models import DANN, SmallCNN
from fasttl.transfer.rundir import load_weights, read_config
from fasttl.transfer.strategies import FineTuneModel, _view_logits, finetune_head, native_images


@torch.no_grad()
def evaluate_run(run_dir: str, data: str = None, progress: bool = True) -> Dict[str, object]:
    """Metrics of the run's main model on the test split of `data` (default: the run's own data);
    written to RUN_DIR/eval_metrics.json."""
    cfg = read_config(run_dir)
    dataset = load_dataset(data if data is not None else cfg["data"], cfg["seed"])
    if dataset.classes != cfg["classes"]:
        raise DataError(f"data: has classes {dataset.classes}, the run was trained for {cfg['classes']}")
    source, classes, strategy = dataset.test, cfg["classes"], cfg["strategy"]
    labels = torch.as_tensor(list(source.labels), dtype=torch.int64)
    if strategy in ("scratch", "distill"):
        model = load_weights(run_dir, strategy, SmallCNN(len(classes))).eval()
        logits = torch.cat([model(b) for b in native_images(source, cfg["native_size"], cfg["seed"]).split(512)])
    elif strategy == "finetune":
        backbone = backbones.create(cfg["backbone"], weights=cfg.get("weights"), pretrained=False)
        model = load_weights(run_dir, "model", FineTuneModel(backbone, finetune_head(backbone.feature_dim,
                                                                                     len(classes)), [])).eval()
        spec = TransformSpec.for_backbone(backbone.preprocessing, size=cfg["image_size"])
        logits = torch.cat([model(x) for x, _ in ImageLoader(source, spec, 128)])
    else:
        backbone = backbones.create(cfg["backbone"], weights=cfg.get("weights"))
        views = [False, True] if cfg.get("mirror_views") and strategy != "dann" else [False]
        caches = [cached_features(backbone, source, "eval", cfg["image_size"], dtype=cfg.get("cache_dtype", "fp16"),
                                  progress=progress, mirror=view) for view in views]
        if strategy == "dann":
            head = load_weights(run_dir, "dann", DANN(backbone.feature_dim, len(classes)))
        else:
            head = load_weights(run_dir, "head", make_head(strategy, backbone.feature_dim, len(classes)))
        logits, labels = _view_logits(head, caches)
    metrics = classification_metrics(logits, labels, classes)
    metrics["data"] = data if data is not None else cfg["data"]
    write_json_atomic(os.path.join(run_dir, "eval_metrics.json"), metrics)
    return metrics
