"""Cross-fitted teacher logits (`distill --teacher-logits cross-fitted`): each training image's
logits come from a teacher head refit, at the settings the teacher chose on validation, on the
other folds of the same training images. A head scores its own training images more surely than
unseen ones (on 10,000 CIFAR-10 images a linear probe is right on 0.94 of them in-sample and
0.83 out of fold), so the student's soft targets then carry the teacher's real uncertainty."""
from __future__ import annotations

import math
import os
from collections import Counter
from typing import Callable, Dict, List, Optional

import torch
from torch import Tensor

from fasttl.data.splits import stratified_folds
from fasttl.util.checks import shown
from fasttl.util.errors import OptionError, UserError

FOLDS = 5
IN_SAMPLE = "in-sample"
# --teacher-logits; the first is the default: on 10,000 CIFAR-10 images (seed 0, 30 epochs) the
# student beat its twin by +2.02 points with in-sample logits and +1.14 with cross-fitted ones
# (benchmarks/RESULTS.md, "Distillation").
MODES = (IN_SAMPLE, "cross-fitted")
CROSS_FITTED = f"cross-fitted ({FOLDS} folds)"  # how a teacher's logits were made, as metrics.json notes it


def teacher_setting(run_dir: str, name: str, valid: Callable[[object], bool], expected: str, choice: bool = True):
    """One setting a finished teacher run's head was fit with: from metrics.json's notes.choice
    (what its tuning chose) or, `choice` False, from its config.json. A missing or damaged value,
    or one the teacher could not have chosen, is an error naming the file and the way out."""
    from fasttl.util.files import read_json

    path = os.path.join(run_dir, "metrics.json" if choice else "config.json")
    try:
        values = read_json(path)
    except ValueError as exc:
        raise OptionError(f"teacher: {exc}; rerun the teacher, or pass --teacher-logits in-sample") from None
    if values is None:
        raise OptionError(f"teacher: {path} is missing; rerun the teacher, or pass --teacher-logits in-sample")
    if choice:
        notes = values.get("notes") if isinstance(values, dict) else None
        values = notes.get("choice") if isinstance(notes, dict) else None
    value = values.get(name) if isinstance(values, dict) else None
    return teacher_value(value, f"{path} (notes.choice)" if choice else path, name, valid, expected)


def teacher_value(value, where: str, name: str, valid: Callable[[object], bool], expected: str):
    """`value`, the setting `name` read from `where`, where `valid` takes it; else the error
    naming the file and the way out."""
    try:
        ok = not isinstance(value, bool) and valid(value)
    except (TypeError, ValueError, OverflowError):
        ok = False
    if not ok:
        raise OptionError(f"teacher: {where} has {name} {shown(value)}, not {expected}; rerun the teacher, or pass "
                          "--teacher-logits in-sample")
    return value


def positive(kind: type) -> Callable[[object], bool]:
    """A validity test for teacher_setting: a finite `kind` (int, or any number for float) > 0."""
    def valid(value) -> bool:
        if kind is int:
            return isinstance(value, int) and value > 0
        return isinstance(value, (int, float)) and math.isfinite(float(value)) and value > 0
    return valid


def obstacle(teacher_config: dict, dataset) -> Optional[str]:
    """Why a teacher's logits on `dataset`'s training images can't be cross-fitted, or None:
    the refits must see the images the teacher trained on, and every fold's refit each class."""
    identity = teacher_config.get("identity")
    if not isinstance(identity, dict) or identity.get("data_identity") != dataset.identity():
        return "the teacher trained on other images (its logits on these are already out of sample)"
    counts = Counter(int(label) for label in dataset.train.labels)
    if len(dataset.train) < FOLDS or min(counts.values(), default=0) < 2:
        return f"too few training images ({FOLDS} folds need {FOLDS} images and 2 of each class)"
    return None


def cross_fitted_logits(caches: Dict[bool, object], trained_views: List[bool], refit: Callable, seed: int,
                        num_classes: int, device, progress: bool = False) -> Tensor:
    """(2, N, C) logits per view (plain, mirrored) of the cached training features `caches`
    ({False: plain, True: mirrored}): the rows of each fold scored by `refit(views, seed, device)`
    fit on the other folds' rows of `trained_views` (the views the teacher trained on)."""
    from fasttl.heads.train import predict_views

    count = len(caches[False])
    out = torch.empty(2, count, num_classes)
    folds = [rows for rows in stratified_folds(caches[False].labels, FOLDS, seed) if rows]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(folds), unit="fold", desc="cross-fitting the teacher", dynamic_ncols=True)
    for held in folds:
        kept = sorted(set(range(count)).difference(held))
        try:
            head = refit([caches[view].subset(kept) for view in trained_views], seed, device).eval()
        except UserError as exc:  # e.g. an edited lr that diverges: the teacher's file is the culprit
            raise OptionError(f"teacher: refitting its head for cross-fitting failed ({exc}); rerun the teacher, "
                              "or pass --teacher-logits in-sample") from None
        for view in (False, True):
            out[int(view), held] = predict_views(head, [caches[view].subset(held)], device)[0].float().cpu()
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    return out
