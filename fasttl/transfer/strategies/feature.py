"""Feature transfer, `linear` and `mlp`: the frozen backbone runs once per image into a feature
cache (reused by every later run with the same fingerprint), and a head trains on the cache."""
from __future__ import annotations

import functools
import os
import time
from typing import Callable, Dict, List, Optional

import torch
from torch import Tensor

from fasttl import backbones
from fasttl.heads import make_head, solver
from fasttl.cache.cache import FeatureCache
from fasttl.heads.train import predict_views, train_head
from fasttl.heads.tuning import MLP_WEIGHT_DECAYS, fit_linear, predict_split, tune_linear, tune_mlp
from fasttl.data import TransformSpec
from fasttl.data.splits import validation_split
from fasttl.transfer.caching import MIRROR_VIEWS, Extraction, FeaturesInMemory, cached_features, mirror_mode, views_of
from fasttl.transfer.cross_fit import cross_fitted_logits, positive, teacher_setting
from fasttl.transfer.options import option
from fasttl.transfer.models import BackboneWithHead
from fasttl.transfer.registry import Outcome, Strategy, TrainedModel, register
from fasttl.util.errors import OptionError
from fasttl.transfer.rundir import Checkpoint, RunError, load_weights, read_config, save_weights
from fasttl.transfer.strategies.common import eval_timings, param_dtype, throughput


def feature_caches(cfg, backbone, ds, with_mirror_views: bool = False) -> Dict[str, object]:
    """The train and test caches of a dataset; `with_mirror_views`: each split also with its
    mirrored view where --mirror-views asks for it (fasttl.transfer.caching.views_of)."""
    started = time.perf_counter()
    extraction = Extraction.of(cfg)
    caches = {split: [cached_features(backbone, source, split, extraction, device=cfg.device, progress=cfg.progress,
                                      rebuild_broken=cfg.overwrite, mirror=view)
                      for view in (views_of(cfg, split) if with_mirror_views else [False])]
              for split, source in (("train", ds.train), ("test", ds.test))}
    mirrored_validation = None
    if with_mirror_views and len(caches["test"]) > len(caches["train"]):
        mirrored_validation = _mirrored_validation(cfg, backbone, ds.train, caches["train"][0], extraction)
    built = sum(c.last_build.get("images", 0)
                for c in [*caches["train"], *caches["test"], mirrored_validation] if c is not None)
    return {"train": caches["train"][0], "test": caches["test"][0], "train_views": caches["train"],
            "test_views": caches["test"], "mirrored_validation": mirrored_validation,
            "extract_s": time.perf_counter() - started, "extracted_images": built,
            "compute": caches["train"][0].fingerprint["compute"]}


def _mirrored_validation(cfg, backbone, train_source, train_cache, extraction):
    """--mirror-views test: the validation images (data.splits.validation_split of the run's seed)
    mirrored, so the head is chosen on the same two-view average the test split gets; None when
    one image per class leaves no validation split."""
    _, rows = validation_split(train_cache.labels, cfg.seed)
    if not rows:
        return None
    return cached_features(backbone, train_source.subset(rows), "validation", extraction, device=cfg.device,
                           progress=cfg.progress, rebuild_broken=cfg.overwrite, mirror=True)


class FeatureModel(TrainedModel):
    """A head on a frozen backbone's features: `module` runs on images (predict, export), and
    `logits` goes through the feature cache, as training did."""

    def __init__(self, backbone, head, config: dict, device: torch.device, fit_settings: Optional[Callable] = None,
                 refit: Optional[Callable] = None):
        spec = TransformSpec.for_backbone(backbone.preprocessing, size=config["image_size"])
        self.extraction = Extraction.of(config)
        mirrored = views_of(config, "test") == [False, True]
        super().__init__(BackboneWithHead(backbone, head, self.extraction.taps, mirror_average=mirrored).to(device),
                         spec, config["classes"], device)
        self.backbone, self.head, self.config = backbone, head.to(device).eval(), config
        # fit_settings() -> the settings this run chose (checked); refit(settings, views, seed, device) -> a head
        self.fit_settings, self.refit = fit_settings, refit
        self._in_memory = None  # FeaturesInMemory, made on the first prediction

    @property
    def prediction_views(self) -> int:
        return len(views_of(self.config, "test"))

    @torch.no_grad()
    def predict_logits(self, source, batch_size: Optional[int] = None, bar=None) -> Tensor:
        """As the run predicted its test split from the feature cache: the same features, computed
        in memory (FeaturesInMemory, no cache written), through the head, averaged over the views
        the run cached."""
        if self._in_memory is None:
            self._in_memory = FeaturesInMemory(self.backbone, self.extraction, self.device)
        dtype = next(self.head.parameters()).dtype
        outputs = []
        for mirror in views_of(self.config, "test"):
            features = self._in_memory(source, mirror=mirror, batch_size=batch_size, progress=bar)
            outputs.append(torch.cat([self.head(features[i:i + 4096].to(dtype)).float().cpu()
                                      for i in range(0, len(features), 4096)]))
        return torch.stack(outputs).mean(0)

    @torch.no_grad()
    def logits(self, source, progress: bool = False, split: str = "eval", batch_size: int = 4096):
        caches = [cached_features(self.backbone, source, split, self.extraction, device=self.device, progress=progress,
                                  mirror=view) for view in views_of(self.config, "test")]
        return predict_views(self.head, caches, self.device)

    @torch.no_grad()
    def view_logits(self, source, mirror: bool, progress: bool = False, split: str = "eval", batch_size: int = 4096):
        """One view's logits through its feature cache ("train-mirror" for the mirrored training
        images), not the average of both views that `logits` gives when --mirror-views mirrors the test split."""
        cache = cached_features(self.backbone, source, split, self.extraction, device=self.device, progress=progress,
                                mirror=bool(mirror))
        return predict_views(self.head, [cache], self.device)[0]

    def cross_fitter(self):
        if self.fit_settings is None:
            return None
        settings = self.fit_settings()  # checked now, before any teacher runs

        def fit(source, seed: int, progress: bool = False, split: str = "eval"):
            caches = {view: cached_features(self.backbone, source, split, self.extraction, device=self.device,
                                            progress=progress, mirror=view) for view in (False, True)}
            return cross_fitted_logits(caches, views_of(self.config, "train"),
                                       functools.partial(self.refit, settings), seed, len(self.classes), self.device,
                                       progress)
        return fit

    @torch.no_grad()
    def view_features(self, source, mirror: bool, progress: bool = False, split: str = "eval"):
        """One view's cached features as the head sees them (its block scaling applied), fp16."""
        cache = cached_features(self.backbone, source, split, self.extraction, device=self.device, progress=progress,
                                mirror=bool(mirror))
        scale = self.head[0]
        return torch.cat([scale(cache.gather(torch.arange(start, min(start + 8192, len(cache)))).to(self.device))
                          .to(torch.float16).cpu() for start in range(0, len(cache), 8192)])


class FeatureTransfer(Strategy):
    """Shared by `linear` and `mlp`: extraction into the cache, the head tuned on a validation
    split of the training features and refit on all of them, one evaluation on test."""

    epochs, batch_size = 10, 256
    outputs = ("head",)
    options = {
        "mirror_views": option("test", "linear/mlp: where the horizontally mirrored images are a second view: test "
                               "(test, validation and predict average both views' logits: one more pass over the "
                               "test and validation images), both (the head also trains on both: twice the "
                               "training extraction) or none",
                               choices=tuple(MIRROR_VIEWS), const="both", metavar="{" + ",".join(MIRROR_VIEWS) + "}",
                               convert=mirror_mode),  # True/False: the flag it was before it had modes
    }
    reads = ("weights",)
    can_teach = True

    def fit(self, cfg, views, run_dir, device, mirrored_validation=None):
        """(head, validation records, choice) of this kind of head; `mirrored_validation`: see
        fasttl.heads.tuning.split_views."""
        raise NotImplementedError

    def train(self, cfg, ds, run_dir, device) -> List[Outcome]:
        backbone = backbones.create(cfg.backbone, weights=cfg.weights)
        caches = feature_caches(cfg, backbone, ds, with_mirror_views=True)
        started = time.perf_counter()
        head, history, choice = self.fit(cfg, caches["train_views"], run_dir, device, caches["mirrored_validation"])
        train_s = time.perf_counter() - started
        started = time.perf_counter()
        logits, labels = predict_split(head, caches["test_views"], device)
        trained_rows = len(caches["train"]) * len(caches["train_views"])
        timings = dict(eval_timings(train_s, time.perf_counter() - started, trained_rows, len(labels)),
                       extract_s=caches["extract_s"], extracted_images=caches["extracted_images"])
        if caches["extracted_images"]:
            timings["extract_images_per_s"] = throughput(caches["extracted_images"], caches["extract_s"])
        notes = {"cache": os.path.dirname(caches["train"].directory),
                 "views": {"train": len(caches["train_views"]), "test": len(caches["test_views"])},
                 "features": {"kind": cfg.features, "dim": caches["train"].feature_dim,
                              "layout": caches["train"].fingerprint.get("layout")},
                 "extraction": caches["compute"], "choice": choice}
        return [Outcome(self.name, self.display, logits, labels, history, timings,
                        save_weights(run_dir, "head", head.float()), notes, device=str(device),
                        precision=cfg.precision)]

    def load(self, run_dir, device) -> TrainedModel:
        config = read_config(run_dir)
        try:
            views_of(config, "test")
        except OptionError as exc:  # a hand-edited or damaged run: name its file, not an option
            raise RunError(f"{os.path.join(run_dir, 'config.json')}: {exc} (rerun it, or fix the value there)") from None
        backbone = backbones.create(config["backbone"], weights=config.get("weights"))
        taps = Extraction.of(config).taps
        head = make_head(self.name, backbone.tapped_dim(taps), len(config["classes"]))
        return FeatureModel(backbone, load_weights(run_dir, "head", head), config, device,
                            fit_settings=functools.partial(self.fit_settings, run_dir), refit=self.refit_head)

    def fit_settings(self, run_dir: str) -> Dict[str, object]:
        """The settings a finished run's head was fit with (what its tuning chose included), each
        checked (fasttl.transfer.cross_fit.teacher_setting): what refit_head needs."""
        raise NotImplementedError

    def refit_head(self, settings: Dict[str, object], views, seed: int, device):
        """A head fit at `settings` on `views` (a fold's training features), for cross-fitting;
        nothing is written to the run folder."""
        raise NotImplementedError


@register
class Linear(FeatureTransfer):
    name = "linear"
    display = "linear (feature transfer)"
    help = "a linear head on cached features of the frozen backbone, its L2 strength tuned on validation"
    lr = 3e-3
    training_options = ()  # solved exactly along its L2 path: no epochs, learning rate or batches

    def fit(self, cfg, views, run_dir, device, mirrored_validation=None):
        return tune_linear(views, seed=cfg.seed, device=device, progress=cfg.progress,
                           mirrored_validation=mirrored_validation)

    def fit_settings(self, run_dir):
        strengths = {*solver.WEIGHT_DECAYS, solver.DEFAULT_WEIGHT_DECAY}
        return {"weight_decay": teacher_setting(run_dir, "weight_decay", lambda v: v in strengths,
                                                "one of the L2 strengths its tuning tries")}

    def refit_head(self, settings, views, seed, device):
        return fit_linear(views, settings["weight_decay"], device)[0]


@register
class Mlp(FeatureTransfer):
    name = "mlp"
    display = "mlp (feature transfer)"
    help = "an MLP head on cached features of the frozen backbone, weight decay and epochs tuned on validation"
    lr = 1e-3

    def fit(self, cfg, views, run_dir, device, mirrored_validation=None):
        return tune_mlp(views, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed, device=device,
                        dtype=param_dtype(cfg), progress=cfg.progress, checkpoint=Checkpoint(run_dir, "head"),
                        resume=cfg.resume, mirrored_validation=mirrored_validation)

    def fit_settings(self, run_dir):
        most = teacher_setting(run_dir, "epochs", positive(int), "a positive integer", choice=False)
        return {"weight_decay": teacher_setting(run_dir, "weight_decay", lambda v: v in MLP_WEIGHT_DECAYS,
                                                "one of the weight decays its tuning tries"),
                "epochs": teacher_setting(run_dir, "epochs", lambda v: positive(int)(v) and v <= most,
                                          f"an epoch count of at most its --epochs {most}"),
                "batch_size": teacher_setting(run_dir, "batch_size", positive(int), "a positive integer", choice=False),
                "lr": teacher_setting(run_dir, "lr", positive(float), "a finite number > 0", choice=False)}

    def refit_head(self, settings, views, seed, device):
        everything = FeatureCache.concat(list(views)) if len(views) > 1 else views[0]
        return train_head(everything, kind="mlp", **settings, seed=seed, device=device, progress=False)[0]
