"""Seeded stratified splits: a data set's held-out test part, and the validation part carved from
training data on which every choice (regularization, epochs, the checkpoint kept) is made."""
from __future__ import annotations

from typing import List, Tuple

import numpy as np

from fasttl.util.checks import positive_int

VALIDATION_FRACTION = 0.1
# Seeds the validation split apart from any other use of the run's seed.
_VALIDATION_STREAM = 0x7A11D
# Seeds cross-fitting's folds apart from the validation split.
_FOLD_STREAM = 0xF01D5


def stratified_split(labels, test_fraction: float, seed) -> Tuple[List[int], List[int]]:
    """(kept, held out) indices, sorted: per class a seeded shuffle, of which round(fraction * n)
    samples, at least one, are held out; a class with a single sample stays entirely in `kept`."""
    labels = np.asarray(labels.cpu() if hasattr(labels, "cpu") else labels)  # a tensor on any device, or a list
    rng = np.random.default_rng(seed)
    kept, held_out = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        cut = max(1, int(round(len(idx) * test_fraction))) if len(idx) > 1 else 0
        held_out += idx[:cut].tolist()
        kept += idx[cut:].tolist()
    return sorted(kept), sorted(held_out)


def validation_split(labels, seed: int, fraction: float = VALIDATION_FRACTION) -> Tuple[List[int], List[int]]:
    """(train, validation) indices into a training set's `labels`: stratified, seeded by the run's
    seed, `fraction` of each class (at least one image of each class with two or more)."""
    return stratified_split(labels, fraction, [int(seed), _VALIDATION_STREAM])


def stratified_folds(labels, folds: int, seed: int) -> List[List[int]]:
    """`folds` disjoint lists of indices, sorted, that together hold every sample: each class
    shuffled (seeded) and dealt round-robin, continuing where the last class stopped, so every fold
    holds about 1/folds of each class. Cross-fitting refits a model once per fold without it."""
    positive_int("folds", folds)
    labels = np.asarray(labels.cpu() if hasattr(labels, "cpu") else labels)
    rng = np.random.default_rng([int(seed), _FOLD_STREAM])
    dealt: List[List[int]] = [[] for _ in range(folds)]
    position = 0
    for c in np.unique(labels):
        for row in rng.permutation(np.flatnonzero(labels == c)).tolist():
            dealt[position % folds].append(row)
            position += 1
    return [sorted(fold) for fold in dealt]
