"""`fasttl run --budget 10m`: the best feature-transfer model this machine can make within a time
budget, every choice made on validation data carved from the training images (never the test
split).

1. Screen. Each candidate backbone and image size extracts a probe of the training images (up to
   PROBE_PER_CLASS a class, seeded; all of them when the data is that small), timing the
   extraction (the speed is kept per machine: fasttl.transfer.budget), and a linear head is
   tuned on it by stratified cross-validation: its out-of-fold score (balanced accuracy where
   the classes are imbalanced) ranks the candidate. Concatenations of the best backbones
   (backbone "a+b") are scored on the probe features side by side, with no extraction; the MLP
   head on the best features, compared with the linear head on one held-out split.
   Each probe is extracted as its full run would be: in int8 where the run would be
   (fasttl.transfer.config.auto_int8: enough images, settings whose int8 accuracy was measured),
   its graph calibrated on probe images, so the speed and the score are int8's.
2. Cost. Each candidate's full run is costed from those measurements: every image of both splits
   at its views through each backbone, the head scaled from its probe time by rows, an int8 run's
   own graph quantized.
3. Choose. The best score among the candidates whose full run fits what is left of the budget
   (SAFETY of it), with few images those of the most backbones side by side first
   (_backbones_first); the mirrored test view (--mirror-views test) where scores tie, as they do
   between test and none (cross-validation scores training views). The run then goes on as
   `fasttl run` with those options, and the plan (candidates, scores, costs, the choice) goes
   into metrics.json and report.md.

Screening stops when it would leave too little for the best candidate's full run, or has used
SCREEN_SHARE of the budget. Options given with --budget pin their value (`--backbone`,
`--image-size`, `--mirror-views`, `--strategy`): the plan chooses only the others."""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Dict, List, Tuple

import numpy as np

from fasttl import backbones
from fasttl.cache.cache import FeatureCache
from fasttl.data import TransformSpec
from fasttl.heads.tuning import CROSS_VALIDATION_BELOW, tune_linear, tune_mlp
from fasttl.transfer import budget
from fasttl.transfer.caching import Extraction, cached_features
from fasttl.transfer.config import auto_int8
from fasttl.transfer.plan_candidates import (INT8_GRAPH_S, MARGIN, OVERHEAD_S, SAFETY, SCORED_PER_CLASS, Candidate,
                                              Screened, best_per_set, held_out, score_of, smallest_class)
from fasttl.transfer.plan_refusals import Refusals
from fasttl.util.errors import OptionError

PLANNED = ("backbone", "image_size", "mirror_views", "strategy")
# The single backbones and sizes screened, in this order while time allows: the default first,
# then the larger Lites (more accurate on CIFAR-10 at a higher cost), a larger and a smaller size.
SINGLES = (("efficientnet_lite0", 160), ("efficientnet_lite1", 160), ("efficientnet_lite2", 160),
           ("efficientnet_lite0", 224), ("efficientnet_lite0", 128))
PROBE_PER_CLASS = 200
# Every probe is cross-validated (each of its images scored out of fold, not one 10% split of a few
# images a class: on 20 a class the ranking of candidates a point apart would be noise).
CROSS_VALIDATE_BELOW = PROBE_PER_CLASS + 1
# A linear head tuned on one split and refit costs about this share of its cross-validated tuning
# (5 folds' paths and the refit, against one path and the refit): 0.74 s against 3.7 s on 1,000
# CIFAR-10 images, 0.2; rounded up, as more rows take more iterations.
SPLIT_PER_CROSS_VALIDATION = 0.3
# The MLP head is screened where the probe's validation split (10%) holds at least a tenth of this
# a class: on 4 images a class, the MLP "won" on few-shot data by a noise margin.
MLP_SCREEN_PER_CLASS = 100
SCREEN_SHARE = 0.4
# Backbones side by side decode and prepare each image once for all of them: a concatenation's
# extraction took 0.82 to 0.89 of its parts' summed seconds an image (int8, 160 px; benchmarks/
# RESULTS.md, "Extraction: backbones side by side"); rounded up.
CONCATENATED_SHARE = 0.9
# Equal scores: the run's default view (cross-validation scores training views, so test and none
# always tie: the choice between them is the defaults', not a validated one), then none.
MIRROR_PREFERENCE = {"test": 2, "none": 1, "both": 0}
NO_TIME = "no time left in the screening's share of the budget (or for the best candidate's run after it)"
# A recorded speed for a backbone not screened yet is taken for stale when it is this many times
# slower per pixel than one this plan measured: the Lites differ by 4x at most (Lite2 at 224 px
# against Lite0 at 128 px, benchmarks/RESULTS.md "extract").
IMPLAUSIBLY_SLOWER = 8.0


class Planner(Refusals):
    """Screens, costs and chooses (see the module's doc); `plan()` -> (options, record)."""

    def __init__(self, cfg, given: Dict[str, object], dataset, started: float):
        self.cfg, self.given, self.dataset, self.started = cfg, dict(given), dataset, started
        self.budget_s = budget.parse_budget(cfg.budget)
        # given as None (a script passing each default through) is not a pin
        self.pinned = {name: getattr(cfg, name) for name in PLANNED if given.get(name) is not None}
        self.record_used = False  # whether a cost came from the speed record (a refusal then names it)
        self.probe, self.probe_is_train = self._probe()
        self.smallest_class = smallest_class(dataset.train.labels)
        self.smallest_probe_class = smallest_class(self.probe.labels)
        self.screened: List[Screened] = []
        self.candidates: List[Candidate] = []
        self.skipped: List[Dict[str, str]] = []

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def say(self, text: str) -> None:
        if self.cfg.progress:
            print(f"plan: {text}", flush=True)

    def _probe(self):
        """The training images screened: all of them up to PROBE_PER_CLASS a class, else that many a
        class drawn with the run's seed (the same images for every candidate)."""
        train = self.dataset.train
        labels = np.asarray(train.labels)
        if np.bincount(labels).max(initial=0) <= PROBE_PER_CLASS:
            return train, True
        rng = np.random.default_rng([int(self.cfg.seed), 0xB0D6E7])
        rows = sorted(int(r) for c in np.unique(labels)
                      for r in rng.permutation(np.flatnonzero(labels == c))[:PROBE_PER_CLASS])
        return train.subset(rows), False

    def plan(self):
        self._refuse_if_impossible()
        self._screen_singles()
        self._screen_concatenations()
        self._screen_mlp()
        chosen = self._choose()
        record = self.record(chosen)
        self.say(f"chose {chosen.backbone} at {chosen.image_size} px, {chosen.head} head, mirror views "
                 f"{chosen.mirror_views}: validation {chosen.scored_by}"
                 f"{f' {chosen.score:.4f}' if chosen.scored else ''}, planned "
                 f"{budget.shown(self.elapsed() + chosen.planned_s)} of {budget.shown(self.budget_s)}")
        return chosen.options(), record

    # -- screening ------------------------------------------------------------------------------
    def _singles(self):
        """(backbone, size) to screen, in order: SINGLES within the pins (the parts of a pinned
        concatenation; a pinned size for each backbone)."""
        pinned = self.pinned.get("backbone")
        names = backbones.concatenated.split_name(pinned) if pinned else list(dict.fromkeys(b for b, _ in SINGLES))
        joined = pinned is not None and backbones.concatenated.SEPARATOR in pinned  # its parts at its size only
        if "image_size" in self.pinned or self.dataset.native_size <= 16 or joined:  # (8x8 digits: the run's size)
            return [(b, self.cfg.image_size) for b in names]
        singles = [(b, s) for b, s in SINGLES if b in names]
        return singles + [(b, backbones.run_image_size(b)) for b in names if b not in {x for x, _ in singles}]

    def _may_screen(self, backbone: str, size: int) -> Tuple[bool, bool]:
        """(whether screening one more single (its probe extraction, then its head) has the time,
        whether the speed record is why not: at the speed assumed without it, it would have)."""
        if not self.screened:
            return True, False
        speed, recorded = self._expected_speed(backbone, size)
        head_s = float(np.median([c.head_s for c in self.candidates])) if self.candidates else 0.0
        fits = self._leaves_time(self._probe_images() / speed + head_s)
        blamed = not fits and recorded and self._leaves_time(self._probe_images() / self._unrecorded_speed() + head_s)
        self.record_used |= blamed
        return fits, blamed

    def _unrecorded_speed(self) -> float:
        """Images/s expected of a backbone the record says nothing of: half the slowest measured now."""
        return min(s for x in self.screened for s in x.speeds) / 2

    def _expected_speed(self, backbone: str, size: int):
        """(images/s expected of a backbone not screened yet, whether the speed record says it):
        the record's, unless it claims more than IMPLAUSIBLY_SLOWER times slower per pixel than what
        this plan just measured (a record taken on a loaded machine, or edited: the backbone is
        screened, and its measurement replaces it); else half the slowest measured now."""
        measured = [(s, x.image_size) for x in self.screened for s in x.speeds]
        recorded = budget.measured_speed(self._speed_key(backbone, size))
        floor = min(s * (x / size) ** 2 for s, x in measured) / IMPLAUSIBLY_SLOWER
        if recorded is None or recorded < floor:
            return self._unrecorded_speed(), False
        return recorded, True

    def _probe_images(self) -> int:
        return len(self.probe) * (2 if "both" in self._modes() else 1)

    def _precision(self, backbone: str, size: int) -> str:
        """The extraction precision of `backbone`'s full run at `size` (config.auto_int8: int8 on
        enough images where its accuracy was measured), in which its probe is extracted too: its
        speed and its score are then the run's."""
        images = len(self.dataset.train) + len(self.dataset.test)
        return "int8" if auto_int8(self.cfg, backbone, size, images) else self.cfg.extract_precision

    def _extraction(self, backbone: str, size: int) -> Extraction:
        """The probe's extraction for `backbone` at `size`: as its full run's (an int8 graph
        calibrated on probe images, as the run's is on its training images)."""
        cfg = dataclasses.replace(self.cfg, backbone=backbone, image_size=size,
                                  extract_precision=self._precision(backbone, size))
        return Extraction.of(cfg, self.probe)

    def _compute(self, backbone: str, size: int) -> tuple:
        """(engine, precision) that extract `backbone` at `size`, as they run on the device."""
        plain = dataclasses.replace(Extraction.of(self.cfg), image_size=size, precision=self._precision(backbone, size))
        return plain.resolved(self.cfg.device)

    def _speed_key(self, backbone: str, size: int) -> str:
        engine, precision = self._compute(backbone, size)
        return budget.speed_key(backbone, size, self.cfg.features, engine, precision, str(self.cfg.device))

    def _head_key(self, backbone: str) -> str:
        return budget.head_key(backbone, self.cfg.features, str(self.cfg.device))

    def _screen_singles(self) -> None:
        for name, size in self._singles():
            fits, blamed = self._may_screen(name, size)
            if not fits:
                speed, _ = self._expected_speed(name, size)
                why = NO_TIME + (f" (at {speed:.3g} images/s, as {budget.record_path()} records)" if blamed else "")
                self.skipped.append({"what": f"{name} at {size} px", "why": why})
                continue
            try:
                backbone = backbones.create(name)
            except FileNotFoundError as exc:  # Lite1/Lite2 weights come with an extra
                self.skipped.append({"what": f"{name} at {size} px", "why": str(exc).split(". ")[0]})
                continue
            screened = self._extract(backbone, size)
            self.screened.append(screened)
            self._score(screened)

    def _extract(self, backbone, size: int) -> Screened:
        """The probe's features (and its mirrored view where --mirror-views both is a candidate), with
        the extraction's speed measured and kept for this machine."""
        started = time.perf_counter()
        extraction = self._extraction(backbone.name, size)
        calibration = None
        if extraction.calibration is not None:  # int8: the graph's sample, probe images in the run's view
            from fasttl.cache.extraction import calibration_images

            calibration = calibration_images(self.probe, TransformSpec.for_backbone(backbone.preprocessing, size=size))
        build = dict(device=self.cfg.device, progress=self.cfg.progress, rebuild_broken=self.cfg.overwrite,
                     calibration_images=calibration)
        views = [cached_features(backbone, self.probe, "train", extraction, **build)]
        if "both" in self._modes():
            views.append(cached_features(backbone, self.probe, "train", extraction, mirror=True, **build))
        built = [c.last_build for c in views if c.last_build.get("images")]
        images, seconds = sum(b["images"] for b in built), sum(b["seconds"] for b in built)
        key = self._speed_key(backbone.name, size)
        budget.record_speed(key, images, seconds)
        speed = images / seconds if images and seconds > 0 else budget.measured_speed(key)  # this machine, now
        self.record_used |= not (images and seconds > 0) and speed is not None
        if speed is None:  # every probe cache was there and nothing was ever measured: time a small build
            speed = self._time_extraction(backbone, dataclasses.replace(  # (in fp32: int8's graph is the cache's)
                extraction, precision=self.cfg.extract_precision, calibration=None))
        return Screened(backbone.name, size, views, [speed], time.perf_counter() - started)

    def _time_extraction(self, backbone, extraction) -> float:
        """Images/s of this backbone on up to 256 probe images extracted in memory (no cache)."""
        from fasttl.transfer.caching import FeaturesInMemory

        source = self.probe.subset(list(range(min(256, len(self.probe)))))
        started = time.perf_counter()
        FeaturesInMemory(backbone, extraction, self.cfg.device)(source)
        return len(source) / max(time.perf_counter() - started, 1e-6)

    def _modes(self) -> List[str]:
        if "mirror_views" in self.pinned:
            return [self.pinned["mirror_views"]]
        return ["test", "none", "both"] if self.probe_is_train else ["test", "none"]

    def _score(self, screened: Screened, heads=None) -> None:
        """One candidate per mirror mode and head, scored on the probe while the screening has time
        (_may_tune). Cross-validation scores the training views only, so modes test and none share
        one fit and one score (the choice between them is the cost); both trains on two views."""
        for head in heads or (self.pinned.get("strategy", "linear"),):
            if self.pinned.get("strategy", head) != head:
                continue
            fits = {}
            for mode in self._modes():
                views = screened.views if mode == "both" else screened.views[:1]
                if len(views) not in fits:
                    if not self.candidates and head == "linear":
                        self._refuse_unaffordable_head(views)
                    if not self._may_tune(len(screened.speeds)):
                        self.skipped.append({"what": f"{screened.backbone} at {screened.image_size} px, {head}, "
                                                     f"mirror views {mode}", "why": NO_TIME})
                        continue
                    started = time.perf_counter()
                    fits[len(views)] = (self._tune(head, views), time.perf_counter() - started)
                    if head == "linear" and len(views) == 1 and len(screened.speeds) == 1:
                        budget.record_head_rate(self._head_key(screened.backbone), len(views[0]),
                                                len(self.dataset.classes), fits[1][1])
                tuned, head_s = fits[len(views)]
                score, scored_by, scored_images = score_of(tuned.choice)
                candidate = Candidate(screened.backbone, screened.image_size, mode, head, score, scored_by,
                                      0.0, head_s, held_out(tuned.choice), scored_images,
                                      self._compute(screened.backbone, screened.image_size)[1])
                candidate.planned_s = self._full_cost(candidate, screened)
                self.candidates.append(candidate)
                self.say(f"{candidate.backbone} at {candidate.image_size} px, {head}, mirror views {mode}: "
                         f"validation {scored_by} {score:.4f}; full run {budget.about(candidate.planned_s)}")

    def _may_tune(self, parts: int) -> bool:
        """Whether one more head fit on the probe leaves the best candidate's full run its time."""
        if not self.candidates:
            return True
        cost = parts * float(np.median([c.head_s for c in self.candidates]))
        return self._leaves_time(cost)

    def _leaves_time(self, cost: float) -> bool:
        """Whether `cost` more seconds of screening stay within SCREEN_SHARE of the budget and leave
        the best candidate so far its full run."""
        after = self.elapsed() + cost
        best = max(self.eligible(), key=lambda c: c.score, default=None)
        return after <= SCREEN_SHARE * self.budget_s and \
            (best is None or after + best.planned_s <= SAFETY * self.budget_s)

    def _tune(self, head: str, views):
        if head == "linear":
            return tune_linear(views, seed=self.cfg.seed, device=self.cfg.device, progress=False,
                               cross_validate_below=CROSS_VALIDATE_BELOW)
        from fasttl.transfer import registry

        strategy = registry.get("mlp")
        return tune_mlp(views, epochs=self.given.get("epochs") or strategy.epochs,
                        batch_size=self.given.get("batch_size") or strategy.batch_size,
                        lr=self.given.get("lr") or strategy.lr,
                        seed=self.cfg.seed, device=self.cfg.device, progress=False)

    def _screen_concatenations(self) -> None:
        """The two (then three) best single backbones at one size, side by side, when the pins allow."""
        pinned = self.pinned.get("backbone")
        if pinned is not None and backbones.concatenated.SEPARATOR not in pinned:
            return
        best = best_per_set(self.candidates)
        for size in sorted({s.image_size for s in self.screened}):
            at_size = sorted((s for s in self.screened if s.image_size == size and (s.backbone, size) in best
                              and backbones.concatenated.SEPARATOR not in s.backbone),
                             key=lambda s: -best[(s.backbone, size)])  # those scored (time may have run out)
            for count in range(2, min(len(at_size), backbones.concatenated.MAX_PARTS) + 1):
                # a pinned join in its order (its features' order is the user's), else by name
                order = backbones.concatenated.split_name(pinned) if pinned is not None else \
                    sorted(s.backbone for s in at_size[:count])
                parts = sorted(at_size[:count], key=lambda s: order.index(s.backbone) if s.backbone in order else -1)
                name = backbones.concatenated.SEPARATOR.join(p.backbone for p in parts)
                if pinned is not None and name != pinned:
                    continue
                joined = Screened(name, size, [FeatureCache.side_by_side([p.views[i] for p in parts])
                                               for i in range(len(parts[0].views))],
                                  [s for p in parts for s in p.speeds], 0.0)
                self.screened.append(joined)
                self._score(joined)

    def _screen_mlp(self) -> None:
        """The MLP head on the best-scoring features, where its full run may fit; it is compared
        with the linear head on the probe's one validation split (an MLP is not cross-validated),
        so only where that split holds MLP_SCREEN_PER_CLASS / 10 images of each class at least."""
        if "strategy" in self.pinned or not self.candidates:  # a pinned head was screened already
            return
        if self.smallest_probe_class < MLP_SCREEN_PER_CLASS:
            self.skipped.append({"what": "the mlp head", "why": f"too few images a class (below "
                                 f"{MLP_SCREEN_PER_CLASS}) to compare heads on one validation split"})
            return
        best = max(self.eligible() or self.candidates, key=lambda c: c.score)
        if self.elapsed() + 4 * best.head_s + best.planned_s > SAFETY * self.budget_s:
            self.skipped.append({"what": f"the mlp head on {best.backbone} at {best.image_size} px",
                                 "why": "no time left to score it"})
            return
        screened = next(s for s in self.screened if (s.backbone, s.image_size) == (best.backbone, best.image_size))
        self._score(screened, heads=("mlp",))

    # -- costing and choosing -------------------------------------------------------------------
    def _full_cost(self, candidate: Candidate, screened: Screened) -> float:
        """Seconds the full run of `candidate` would take here: its images through each backbone at
        the measured speed (images already in the probe's caches excepted), the head scaled from
        its probe time by rows, and OVERHEAD_S."""
        return self._run_cost(candidate.mirror_views, candidate.head, candidate.head_s, screened.speeds,
                              candidate.precision)

    def _run_cost(self, mode: str, head: str, probe_head_s: float, speeds: List[float], precision: str) -> float:
        train, test = len(self.dataset.train), len(self.dataset.test)
        train_views = 2 if mode == "both" else 1
        images = train * train_views + test * (1 if mode == "none" else 2) + (math.ceil(train / 10) if mode == "test"
                                                                              else 0)
        if self.probe_is_train and len(speeds) == 1:
            images -= train * train_views  # the probe's caches are the run's
        extract_s = sum(images / speed for speed in speeds) * (CONCATENATED_SHARE if len(speeds) > 1 else 1.0)
        if precision == "int8":  # the run quantizes a graph of its own, on its training images
            extract_s += INT8_GRAPH_S * len(speeds)
        head_s = probe_head_s * max(1.0, train / max(len(self.probe), 1))  # rows scale alike in both views
        if head == "linear" and self.smallest_class >= CROSS_VALIDATION_BELOW:
            head_s *= SPLIT_PER_CROSS_VALIDATION  # the run tunes on one split, the probe was cross-validated
        return extract_s + head_s + OVERHEAD_S

    def eligible(self) -> List[Candidate]:
        """The candidates every pin allows (a pinned pair's parts are screened to build it, never
        chosen alone)."""
        return [c for c in self.candidates
                if all(c.options()[name] == value for name, value in self.pinned.items())]

    def _choose(self) -> Candidate:
        left = SAFETY * self.budget_s - self.elapsed()
        eligible = self.eligible()
        fitting = [c for c in eligible if c.planned_s <= left]
        if not fitting:
            cheapest = min(eligible, key=lambda c: c.planned_s, default=None)
            if cheapest is None:
                why = "; ".join(list(dict.fromkeys(s["why"] for s in self.skipped))[:2]) or "nothing could be scored"
                pinned = self.pinned.get("backbone") or ""
                what = f"the pinned {pinned} could not" if backbones.concatenated.SEPARATOR in pinned and \
                    self.candidates else "no candidate could"
                raise OptionError(f"budget: {what} be screened within {self.cfg.budget} ({why}); pass a "
                                  "larger --budget, or fewer pinned options")
            needed = (self.elapsed() + cheapest.planned_s) / SAFETY * MARGIN
            raise OptionError(f"budget: {self.cfg.budget} is too small for a model on this data here: the cheapest "
                              f"screened ({cheapest.backbone} at {cheapest.image_size} px, {cheapest.head}, mirror "
                              f"views {cheapest.mirror_views}) needs {budget.about(needed)} with the "
                              f"screening; {budget.suggested(needed, needed / MARGIN)}"
                              + (budget.speeds_from() if self.record_used else ""))
        linear = [c for c in fitting if c.head == "linear"]
        defaults = {name: getattr(self.cfg, name) for name in PLANNED}  # what the run would be without --budget
        best = max(linear or fitting, key=lambda c: (self._backbones_first(c), round(c.score, 6),
                                                     MIRROR_PREFERENCE[c.mirror_views], c.options() == defaults,
                                                     -c.planned_s))
        mlp = [c for c in fitting if c.head == "mlp" and None not in (c.held_out, best.held_out) and
               c.held_out > best.held_out]
        return max(mlp, key=lambda c: c.held_out) if mlp and best.head == "linear" else best

    def few_images(self) -> bool:
        """Whether the run's linear head is cross-validated (fasttl.heads.tuning): with backbones
        side by side, one head per backbone, averaged (fasttl.heads.parts)."""
        return self.smallest_class < CROSS_VALIDATION_BELOW

    def _backbones_first(self, candidate: Candidate) -> int:
        """With few images, linear candidates of more backbones come first, then the score: one head per
        backbone, averaged, against the single backbone that cross-validation ranked best, on
        training images no benchmark draws, fell at most 1.05 points below it and gained 2 to 3.4
        where cross-validation ranked a weaker backbone first (+0.83 on average over 12 draws of 40
        a class, +2.62 over 2 of 120; benchmarks/RESULTS.md, "Few images: one head per backbone,
        averaged"): cross-validation on so few images can't rank backbones a point apart."""
        # an MLP on them is one head, not an average; with nothing scored, no head is tuned either
        if not self.few_images() or candidate.head != "linear" or not getattr(candidate, "scored", True):
            return 0
        return len(backbones.concatenated.split_name(candidate.backbone))

    def ranked_by_backbones(self) -> bool:
        """Whether _backbones_first ranked anything: only where the eligible candidates differ in it
        (not with a pinned backbone, an MLP head or nothing scored)."""
        return len({self._backbones_first(c) for c in self.eligible()}) > 1

    def record(self, chosen: Candidate) -> Dict[str, object]:
        return {"budget": self.cfg.budget, "budget_s": self.budget_s, "pinned": self.pinned,
                "probe": {"images": len(self.probe), "per_class_at_most": PROBE_PER_CLASS,
                          "all_training_images": self.probe_is_train},
                "screen_s": round(self.elapsed(), 1), "speeds": {f"{s.backbone}@{s.image_size}px": s.speeds
                                                               for s in self.screened},
                "candidates": [c.as_dict() for c in self.candidates], "skipped": self.skipped,
                "chosen": chosen.as_dict(), "planned_s": round(self.elapsed() + chosen.planned_s, 1),
                "scored_too_few": 0 < chosen.scored_images < SCORED_PER_CLASS * len(self.dataset.classes),
                "more_backbones_first": self.ranked_by_backbones(),
                "machine": budget.machine()}


def plan_run(cfg, given: Dict[str, object], dataset, started: float):
    """(the options the plan chose, its record) for a run with --budget (see the module's doc)."""
    if len(dataset.train) == 0:
        raise OptionError("budget: no training images to plan on")
    return Planner(cfg, given, dataset, started).plan()


__all__ = ["plan_run", "Planner", "PLANNED", "SINGLES"]
