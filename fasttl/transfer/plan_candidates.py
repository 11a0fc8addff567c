"""What the budget planner (fasttl.transfer.planner) screens and chooses among: a feature set on
the probe (Screened), one candidate model with its validation score and planned cost (Candidate),
how a tuned head's choice record gives its score, and the margins every plan's costs take."""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Sequence

import numpy as np

from fasttl.cache.cache import FeatureCache

# Fewer scored images a class than this (a pinned MLP head's one validation split of a small probe)
# can't rank candidates: the report says so.
SCORED_PER_CLASS = 10
SAFETY = 0.9            # a full run is planned into this share of what is left (the estimates are measured, not exact)
OVERHEAD_S = 10.0       # the run's own start, report, plots and predictions
INT8_GRAPH_S = 10.0     # an int8 run's graph quantized, a part (3 to 5 s for Lite0 on the 2-core Xeon; Lite2 ~2x)
MARGIN = 1.25           # a suggested budget's room over the estimate (a head's time varies from run to run)


@dataclasses.dataclass
class Screened:
    """One feature set on the probe: its training views, the speed of each of its backbones
    (images/s) and the time its screen took."""

    backbone: str
    image_size: int
    views: List[FeatureCache]
    speeds: List[float]
    seconds: float


@dataclasses.dataclass
class Candidate:
    backbone: str
    image_size: int
    mirror_views: str
    head: str
    score: float
    scored_by: str
    planned_s: float
    head_s: float
    held_out: Optional[float] = None  # the score on the probe's one validation split: linear and MLP heads compared
    scored_images: int = 0  # the images its score is over (every probe image where cross-validated)
    precision: str = "fp32"  # its extraction's (config.auto_int8), the probe's as the full run's

    def options(self) -> Dict[str, object]:
        return {"backbone": self.backbone, "image_size": self.image_size, "mirror_views": self.mirror_views,
                "strategy": self.head}

    @property
    def scored(self) -> bool:
        """Whether anything scored it (one image a class leaves nothing to validate on)."""
        return self.scored_by != UNSCORED

    def as_dict(self) -> Dict[str, object]:
        return dict(dataclasses.asdict(self), score=round(self.score, 6) if self.scored else None,
                    planned_s=round(self.planned_s, 1), head_s=round(self.head_s, 2))


def smallest_class(labels) -> int:
    counts = np.bincount(np.asarray(labels))
    return int(counts[counts > 0].min())


UNSCORED = "none (no validation split)"


def score_of(choice: dict):
    """(score, what it is, over how many images): what a tuned head was chosen by: balanced
    accuracy where the classes are imbalanced, else accuracy; out of fold over every probe image
    where it was cross-validated, else on its one validation split."""
    validation = choice.get("validation") if isinstance(choice.get("validation"), dict) else {}
    crossed = "cross_validation" in choice
    images = int(validation.get("cross_validated_images" if crossed else "validation_images") or 0)
    prefix = "cross-validated " if crossed else ""
    for key, name in (("val_balanced_accuracy", "balanced accuracy"), ("cv_accuracy", "accuracy"),
                      ("val_accuracy", "accuracy")):
        if key in choice:
            return float(choice[key]), prefix + name, images
    return 0.0, UNSCORED, 0


def held_out(choice: dict) -> Optional[float]:
    """The tuned head's accuracy on the run's one validation split, where the classes are balanced
    enough to compare heads by it (imbalanced data keeps the linear head, its logit adjustment
    chosen on balanced accuracy)."""
    return float(choice["val_accuracy"]) if "val_accuracy" in choice and "class_imbalance" not in choice else None


def best_per_set(candidates: Sequence[Candidate]) -> Dict[tuple, float]:
    best: Dict[tuple, float] = {}
    for c in candidates:
        best[(c.backbone, c.image_size)] = max(best.get((c.backbone, c.image_size), -1.0), c.score)
    return best
