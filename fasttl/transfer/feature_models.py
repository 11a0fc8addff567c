"""A run's feature caches and the model that predicts from them: what the feature-transfer
strategies (`linear`, `mlp`) and `dann` share. The frozen backbone runs once per image into a
cache; a FeatureModel is a head on those features, predicting through the cache as training did
(or in memory for new images)."""
from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import time
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch
from torch import Tensor

from fasttl.cache.cache import FeatureCache
from fasttl.cache.engines import INT8_CHECK_ROWS
from fasttl.data import TransformSpec
from fasttl.data.splits import validation_split
from fasttl.heads.train import predict_views
from fasttl.transfer import budget
from fasttl.transfer.caching import Extraction, FeaturesInMemory, cached_features, views_of
from fasttl.transfer.cross_fit import cross_fitted_logits
from fasttl.transfer.models import BackboneWithHead
from fasttl.transfer.trained import TrainedModel


@dataclass
class RunCaches:
    """The caches of a run's splits: each split's views ([plain] or [plain, mirrored]), the
    mirrored validation images where --mirror-views test needs them, and what building took."""

    train_views: List[FeatureCache]
    test_views: List[FeatureCache]
    mirrored_validation: Optional[FeatureCache]
    extract_s: float
    extracted_images: int  # images run through the backbone now (0: every cache was there)
    int8_graph: Optional[bytes] = None  # the graph every split went through, where extraction is int8
    int8_check_images: Optional[Tensor] = None  # ... and the images it is checked on (its calibration sample's first)

    @property
    def train(self) -> FeatureCache:
        return self.train_views[0]

    @property
    def test(self) -> FeatureCache:
        return self.test_views[0]

    @property
    def compute(self) -> dict:
        """How the features were computed (engine, precision, versions): the cache's fingerprint."""
        return self.train.fingerprint["compute"]


def feature_caches(cfg, backbone, ds, with_mirror_views: bool = False) -> RunCaches:
    """The train and test caches of a dataset; `with_mirror_views`: each split also with its
    mirrored view where --mirror-views asks for it (fasttl.transfer.caching.views_of)."""
    started = time.perf_counter()
    extraction = Extraction.of(cfg, ds.train)
    calibration = calibration_sample(cfg, backbone, ds.train, extraction)

    def build(split, source, view, rebuild=False):
        return cached_features(backbone, source, split, extraction, device=cfg.device, progress=cfg.progress,
                               rebuild_broken=cfg.overwrite, mirror=view, calibration_images=calibration,
                               rebuild=rebuild)
    splits = {"train": ds.train, "test": ds.test}
    views = {split: views_of(cfg, split) if with_mirror_views else [False] for split in splits}
    caches = {split: [build(split, splits[split], view) for view in views[split]] for split in splits}
    graph = None
    if calibration is not None:
        caches["train"][0], graph = training_graph(cfg, backbone, extraction, caches["train"][0], calibration,
                                                   lambda: build("train", ds.train, False, rebuild=True))
    if graph is not None:  # every split through the training cache's graph: one made by another is made again
        sha = hashlib.sha256(graph).hexdigest()
        caches = {split: [cache if (cache.manifest.get("engine_graph") or {}).get("sha256") == sha else
                          build(split, splits[split], view, rebuild=True)
                          for cache, view in zip(caches[split], views[split])] for split in splits}
    mirrored_validation = None
    if with_mirror_views and len(caches["test"]) > len(caches["train"]):
        mirrored_validation = mirrored_validation_cache(cfg, backbone, ds.train, caches["train"][0], extraction,
                                                        calibration)
        if graph is not None and mirrored_validation is not None and \
                (mirrored_validation.manifest.get("engine_graph") or {}).get("sha256") != sha:
            mirrored_validation = mirrored_validation_cache(cfg, backbone, ds.train, caches["train"][0], extraction,
                                                            calibration, rebuild=True)
    builds = [c.last_build for c in [*caches["train"], *caches["test"], mirrored_validation] if c is not None]
    built = sum(b.get("images", 0) for b in builds)
    engine, precision = extraction.resolved(cfg.device)  # what --budget plans with (fasttl.transfer.budget)
    budget.record_speed(budget.speed_key(backbone.name, extraction.image_size, extraction.features, engine, precision,
                                         str(cfg.device)),
                        built, sum(b.get("seconds", 0.0) for b in builds if b.get("images")))
    check = None if calibration is None else calibration[:INT8_CHECK_ROWS]
    return RunCaches(caches["train"], caches["test"], mirrored_validation, time.perf_counter() - started, built,
                     graph, check)


def training_graph(cfg, backbone, extraction: Extraction, train_cache, calibration: Tensor, rebuild: Callable):
    """(the training cache, the int8 graph that extracted it: int8_graph). A cache whose manifest
    records no graph (its build interrupted after the last shard, the manifest written later by a
    build that extracted nothing) is extracted again (`rebuild()`), and so is one whose graph can't
    be had again when the run was given --overwrite."""
    from fasttl.cache.store import CacheError

    if not (train_cache.manifest.get("engine_graph") or {}).get("sha256"):
        train_cache = rebuild()
    try:
        return train_cache, int8_graph(cfg, backbone, extraction, train_cache, calibration)
    except CacheError:
        if not cfg.overwrite:
            raise
        train_cache = rebuild()
        return train_cache, int8_graph(cfg, backbone, extraction, train_cache, calibration)


def calibration_sample(cfg, backbone, train_source, extraction: Extraction) -> Optional[Tensor]:
    """The training images an int8 run's graph calibrates on (plain view, the run's size), else None."""
    if extraction.calibration is None:
        return None
    from fasttl.cache.extraction import calibration_images

    spec = TransformSpec.for_backbone(backbone.preprocessing, size=extraction.image_size)
    return calibration_images(train_source, spec)


def int8_graph(cfg, backbone, extraction: Extraction, train_cache, calibration: Tensor) -> bytes:
    """The int8 graph the run's caches were extracted through, kept for its folder: the one this
    process verified, or the one left beside the caches, when its SHA-256 is the one the training
    cache's manifest records; else quantized again on the same sample (the same graph: the
    quantizer is deterministic), and refused when that is still not the one."""
    from fasttl.cache import engines
    from fasttl.cache.extraction import extraction_engine
    from fasttl.cache.store import CacheError

    engine_dir, name = os.path.dirname(train_cache.directory), extraction.graph_name(backbone)
    recorded = (train_cache.manifest.get("engine_graph") or {}).get("sha256")  # what extracted the cache
    data = engines.graph_bytes(name, engine_dir)
    if data is None or hashlib.sha256(data).hexdigest() != recorded:
        engines.forget(name)
        with contextlib.suppress(OSError):  # fasttl's own file, not the one the cache records: quantized anew
            os.remove(os.path.join(engine_dir, name))
        engine, precision = extraction.resolved(cfg.device)
        extraction_engine(backbone, torch.device(cfg.device), engine, precision, extraction.taps,
                          extraction.image_size, engine_dir, calibration=(extraction.calibration, calibration))
        data = engines.graph_bytes(name, engine_dir)
    if data is None or hashlib.sha256(data).hexdigest() != recorded:
        raise CacheError(f"engine: the int8 graph {os.path.join(engine_dir, name)} is not the one that extracted "
                         f"{train_cache.directory} (its SHA-256 differs from the manifest's); run again with "
                         "--overwrite to extract anew")
    return data


def mirrored_validation_cache(cfg, backbone, train_source, train_cache, extraction, calibration=None,
                              rebuild: bool = False):
    """--mirror-views test: the validation images (data.splits.validation_split of the run's seed)
    mirrored, so the head is chosen on the same two-view average the test split gets; None when
    one image per class leaves no validation split."""
    _, rows = validation_split(train_cache.labels, cfg.seed)
    if not rows:
        return None
    return cached_features(backbone, train_source.subset(rows), "validation", extraction, device=cfg.device,
                           progress=cfg.progress, rebuild_broken=cfg.overwrite, mirror=True,
                           calibration_images=calibration, rebuild=rebuild)


class FeatureModel(TrainedModel):
    """A head on a frozen backbone's features: `module` runs on images (predict, export), and
    `logits` goes through the feature cache, as training did."""

    def __init__(self, backbone, head, config: dict, device: torch.device, fit_settings: Optional[Callable] = None,
                 refit: Optional[Callable] = None, extraction: Optional[Extraction] = None,
                 int8_graph: Optional[Callable] = None):
        spec = TransformSpec.for_backbone(backbone.preprocessing, size=config["image_size"])
        self.extraction = extraction or Extraction.of(config)  # an int8 run's: its graph named (int8_files)
        mirrored = views_of(config, "test") == [False, True]
        super().__init__(BackboneWithHead(backbone, head, self.extraction.taps, mirror_average=mirrored).to(device),
                         spec, config["classes"], device)
        self.backbone, self.head, self.config = backbone, head.to(device).eval(), config
        # fit_settings() -> the settings this run chose (checked); refit(settings, views, seed, device) -> a head
        self.fit_settings, self.refit = fit_settings, refit
        # an int8 run's: the block it extracts in, its graph the one extraction finds (int8_files.run_graph)
        self.int8_graph = int8_graph or (lambda verify=True: contextlib.nullcontext())
        self._in_memory = None  # FeaturesInMemory, made on the first prediction

    @property
    def prediction_views(self) -> int:
        return len(views_of(self.config, "test"))

    @torch.no_grad()
    def predict_logits(self, source, batch_size: Optional[int] = None, bar=None,
                       refused: Optional[dict] = None) -> Tensor:
        """As the run predicted its test split from the feature cache: the same features, computed
        in memory (FeaturesInMemory, no cache written), through the head, averaged over the views
        the run cached. `refused` (a dict): images the int8 graph can't represent are listed there
        (row -> message) instead of an error; their rows are meaningless."""
        if self._in_memory is None:  # its engine keeps the graph it was made with, checked as it is made
            with self.int8_graph(verify=False):
                self._in_memory = FeaturesInMemory(self.backbone, self.extraction, self.device)
        dtype = next(self.head.parameters()).dtype
        outputs = []
        for mirror in views_of(self.config, "test"):
            features = self._in_memory(source, mirror=mirror, batch_size=batch_size, progress=bar, refused=refused)
            outputs.append(torch.cat([self.head(features[i:i + 4096].to(dtype)).float().cpu()
                                      for i in range(0, len(features), 4096)]))
        return torch.stack(outputs).mean(0)

    def _cache(self, source, split: str, progress: bool, mirror) -> FeatureCache:
        """The cache of `source` (one view), extracted as the run extracted (its int8 graph, if any)."""
        with self.int8_graph():
            return cached_features(self.backbone, source, split, self.extraction, device=self.device,
                                   progress=progress, mirror=bool(mirror))

    @torch.no_grad()
    def logits(self, source, progress: bool = False, split: str = "eval", batch_size: int = 4096):
        caches = [self._cache(source, split, progress, view) for view in views_of(self.config, "test")]
        return predict_views(self.head, caches, self.device)

    @torch.no_grad()
    def view_logits(self, source, mirror: bool, progress: bool = False, split: str = "eval", batch_size: int = 4096):
        """One view's logits through its feature cache ("train-mirror" for the mirrored training
        images), not the average of both views that `logits` gives when --mirror-views mirrors the test split."""
        return predict_views(self.head, [self._cache(source, split, progress, mirror)], self.device)[0]

    def cross_fitter(self):
        if self.fit_settings is None:
            return None
        settings = self.fit_settings()  # checked now, before any teacher runs

        def fit(source, seed: int, progress: bool = False, split: str = "eval"):
            caches = {view: self._cache(source, split, progress, view) for view in (False, True)}
            return cross_fitted_logits(caches, views_of(self.config, "train"),
                                       functools.partial(self.refit, settings), seed, len(self.classes), self.device,
                                       progress)
        return fit

    @torch.no_grad()
    def view_features(self, source, mirror: bool, progress: bool = False, split: str = "eval"):
        """One view's cached features as the head sees them (its block scaling applied), fp16."""
        cache = self._cache(source, split, progress, mirror)
        scale = self.head[0]
        return torch.cat([scale(cache.gather(torch.arange(start, min(start + 8192, len(cache)))).to(self.device))
                          .to(torch.float16).cpu() for start in range(0, len(cache), 8192)])
