"""Feature transfer, `linear` and `mlp`: the frozen backbone runs once per image into a feature
cache (reused by every later run with the same fingerprint), and a head trains on the cache."""
from __future__ import annotations

import functools
import os
import time
from typing import Dict, List


from fasttl import backbones
from fasttl.backbones.concatenated import split_name
from fasttl.heads import make_head, parts, shrinkage, solver
from fasttl.cache.cache import FeatureCache
from fasttl.heads.train import train_head
from fasttl.heads.tuning import MLP_WEIGHT_DECAYS, fit_setting, predict_split, tune_linear, tune_mlp
from fasttl.transfer.caching import MIRROR_VIEWS, Extraction, mirror_mode, views_of
from fasttl.transfer.cross_fit import positive, teacher_setting, teacher_value
from fasttl.transfer.options import option
from fasttl.transfer.feature_models import FeatureModel, feature_caches
from fasttl.transfer.registry import Outcome, Strategy, register
from fasttl.transfer.trained import TrainedModel
from fasttl.util.errors import OptionError
from fasttl.transfer.int8_files import run_graph, write_int8_files
from fasttl.transfer.rundir import Checkpoint, RunError, load_weights, read_config, save_weights
from fasttl.transfer.common import (BACKBONE_OPTIONS, check_backbone_options, eval_timings, param_dtype, run_backbone,
                                    throughput)


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
    reads = BACKBONE_OPTIONS
    joins_backbones = True

    def preflight(self, cfg) -> None:
        check_backbone_options(cfg)
    can_teach = True

    def fit(self, cfg, views, run_dir, device, mirrored_validation=None):
        """This kind of head tuned on validation (a fasttl.heads.tuning.TunedHead);
        `mirrored_validation`: see fasttl.heads.tuning.split_views."""
        raise NotImplementedError

    def train(self, cfg, ds, run_dir, device) -> List[Outcome]:
        backbone = backbones.create(cfg.backbone, weights=cfg.weights)
        caches = feature_caches(cfg, backbone, ds, with_mirror_views=True)
        if caches.int8_graph is not None:  # predict and eval go through it (read back by load)
            write_int8_files(run_dir, caches.int8_graph, caches.int8_check_images)
        started = time.perf_counter()
        tuned = self.fit(cfg, caches.train_views, run_dir, device, caches.mirrored_validation)
        head, history, choice = tuned.head, tuned.records, tuned.choice
        train_s = time.perf_counter() - started
        started = time.perf_counter()
        logits, labels = predict_split(head, caches.test_views, device)
        trained_rows = len(caches.train) * len(caches.train_views)
        timings = dict(eval_timings(train_s, time.perf_counter() - started, trained_rows, len(labels)),
                       extract_s=caches.extract_s, extracted_images=caches.extracted_images)
        if caches.extracted_images:
            timings["extract_images_per_s"] = throughput(caches.extracted_images, caches.extract_s)
        notes = {"cache": os.path.dirname(caches.train.directory),
                 "views": {"train": len(caches.train_views), "test": len(caches.test_views)},
                 "features": {"kind": cfg.features, "dim": caches.train.feature_dim,
                              "layout": caches.train.fingerprint.get("layout")},
                 "extraction": caches.compute, "choice": choice}
        return [Outcome(self.name, self.display, logits, labels, history, timings,
                        save_weights(run_dir, "head", head.float()), notes, device=str(device),
                        precision=cfg.precision if "precision" in self.training_options else "fp32")]

    def load(self, run_dir, device) -> TrainedModel:
        config = read_config(run_dir)
        try:
            views_of(config, "test")
        except OptionError as exc:  # a hand-edited or damaged run: name its file, not an option
            raise RunError(f"{os.path.join(run_dir, 'config.json')}: {exc} (rerun it, or fix the value there)"
                           ) from None
        backbone = run_backbone(config)
        extraction, int8_graph = Extraction.of(config), None
        if extraction.calibration is not None:
            extraction, int8_graph = run_graph(run_dir, backbone, extraction, device)
        head = make_head(self.name, backbone.tapped_dim(extraction.taps), len(config["classes"]))
        return FeatureModel(backbone, load_weights(run_dir, "head", head), config, device,
                            fit_settings=functools.partial(self.fit_settings, run_dir), refit=self.refit_head,
                            extraction=extraction, int8_graph=int8_graph)

    def fit_settings(self, run_dir: str) -> Dict[str, object]:
        """The settings a finished run's head was fit with (what its tuning chose included), each
        checked (fasttl.transfer.cross_fit.teacher_setting): what refit_head needs."""
        raise NotImplementedError

    def refit_head(self, settings: Dict[str, object], views, seed: int, device):
        """A head fit at `settings` on `views` (a fold's training features), for cross-fitting;
        nothing is written to the run folder."""
        raise NotImplementedError


SINGLE_SOLVERS = (solver.SOLVER, shrinkage.SOLVER)


def _linear_setting(chosen, read) -> Dict[str, object]:
    """One linear head's setting for `chosen` (its solver; None before it was recorded: L2), each
    value through `read(name, valid, expected)`, which names the file where one is damaged."""
    if chosen == shrinkage.SOLVER:
        low, high = shrinkage.TEMPERATURE_RANGE
        return {"shrinkage": read("shrinkage", lambda v: v in shrinkage.SHRINKAGES,
                                  "one of the shrinkages its tuning tries"),
                "temperature": read("temperature", shrinkage.is_fitted_temperature,
                                    f"a temperature its tuning fits ({low:g} to {high:g})")}
    strengths = {*solver.WEIGHT_DECAYS, solver.DEFAULT_WEIGHT_DECAY}
    return {"weight_decay": read("weight_decay", lambda v: v in strengths, "one of the L2 strengths its tuning tries")}


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
        """The teacher head's setting: its L2 strength, or its shrinkage and temperature where it
        chose shrinkage LDA (a teacher from before the solver was recorded is an L2 head), or one
        of those for each backbone where it averaged one head per backbone."""
        solvers = (*SINGLE_SOLVERS, parts.AVERAGED_SOLVER)
        chosen = teacher_setting(run_dir, "solver", lambda v: v is None or v in solvers,
                                 " or ".join(repr(s) for s in solvers))
        if chosen != parts.AVERAGED_SOLVER:
            return _linear_setting(chosen, functools.partial(teacher_setting, run_dir))
        names = split_name(teacher_setting(run_dir, "backbone", lambda v: isinstance(v, str), "a backbone name",
                                           choice=False))
        count = len(names)
        if count < 2:  # (only features side by side are averaged)
            teacher_setting(run_dir, "solver", lambda v: False, "a single head's solver (its backbone is one)")
        listed = teacher_setting(run_dir, "parts", lambda v: isinstance(v, list) and len(v) == count and
                                 all(isinstance(p, dict) for p in v), f"a list of its {count} backbones' choices")
        where = os.path.join(run_dir, "metrics.json") + " (notes.choice.parts[{}])"
        for i, part in enumerate(listed):  # each backbone's own choice, in the order its features are joined
            teacher_value(part.get("backbone"), where.format(i), "backbone", lambda v: v == names[i],
                          f"{names[i]!r}, the teacher's backbone {i + 1} of {count}")
        return {"parts": [_linear_setting(teacher_value(part.get("solver"), where.format(i), "solver",
                                                        lambda v: v in SINGLE_SOLVERS, "a single head's solver"),
                                          lambda name, valid, expected, part=part, i=i:
                                          teacher_value(part.get(name), where.format(i), name, valid, expected))
                          for i, part in enumerate(listed)]}

    def refit_head(self, settings, views, seed, device):
        return fit_setting(views, settings, device).head


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
        return train_head(everything, kind="mlp", **settings, seed=seed, device=device, progress=False).head
