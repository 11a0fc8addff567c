"""End to end: the usual PyTorch transfer recipe beside `fasttl run --strategy linear` on the same
backbone, image size and data subset, wall time and test accuracy of the whole job.

The recipe: class-folder images through a PIL data loader, resized to the backbone's size; the
frozen backbone recomputed on every image in every epoch; global average pooling + a dense
softmax head; Adam, cross-entropy, batch 32, 10 epochs; test accuracy at the end."""
from __future__ import annotations

import math
import os
import tempfile
import time
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from fasttl import backbones
from fasttl.bench.common import DEFAULT_DATA, bench_splits, format_table
from fasttl.transfer.datasets import per_class_subset
from fasttl.util import settings


# 500 images per class: the small-data regime transfer learning is for, with enough images that the
# heads' accuracies differ by more than noise; 100 test images per class (1000) for the same reason.
DEFAULT_PER_CLASS, DEFAULT_TEST_PER_CLASS = 500, 100


class PILFolder(torch.utils.data.Dataset):
    """What users write today: PIL open, resize to the target size, to tensor, normalize."""

    def __init__(self, source, size: int, mean, std):
        self.source, self.size = source, size
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        from PIL import Image

        with Image.open(self.source.files[i]) as img:
            img = img.convert("RGB").resize((self.size, self.size), Image.BILINEAR)
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return (x - self.mean) / self.std, self.source.labels[i]


def usual_recipe(train, test, size: int, epochs: int, batch_size: int = 32, seed: int = 0) -> Dict[str, float]:
    torch.manual_seed(seed)
    started = time.perf_counter()
    backbone = backbones.create("efficientnet_lite0").freeze()
    p = backbone.preprocessing
    loader = torch.utils.data.DataLoader(PILFolder(train, size, p.mean, p.std), batch_size=batch_size, shuffle=True,
                                         num_workers=2)
    head = torch.nn.Linear(backbone.feature_dim, len(train.classes))
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-3)
    for _ in range(epochs):
        for x, y in loader:
            with torch.no_grad():
                features = backbone.forward_pooled(x)  # recomputed on every image, every epoch
            loss = F.cross_entropy(head(features), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    predictions = []
    with torch.no_grad():
        for x, _ in torch.utils.data.DataLoader(PILFolder(test, size, p.mean, p.std), batch_size=batch_size,
                                                num_workers=2):
            predictions.append(head(backbone.forward_pooled(x)).argmax(1))
    seconds = time.perf_counter() - started
    predictions = torch.cat(predictions)
    correct = predictions == torch.as_tensor(test.labels)
    return {"seconds": seconds, "accuracy": int(correct.sum()) / len(test), "correct": correct.tolist()}


def _link_folder(train, test, root: str) -> None:
    """A class-folder dataset of links to the chosen images (fasttl run takes folders)."""
    for split, source in (("train", train), ("test", test)):
        for path, label in zip(source.files, source.labels):
            folder = os.path.join(root, split, source.classes[label])
            os.makedirs(folder, exist_ok=True)
            os.symlink(path, os.path.join(folder, os.path.basename(path)))


def fasttl_linear(train, test, size: int, seed: int = 0) -> Dict[str, float]:
    """`fasttl run --data DIR --strategy linear --image-size SIZE` (a linear head is solved, not
    trained in epochs): every other
    setting (head, batch size, learning rate) at the job's defaults."""
    from fasttl.transfer.job import run as run_job

    with tempfile.TemporaryDirectory() as tmp:
        _link_folder(train, test, os.path.join(tmp, "data"))
        previous = settings.CACHE_DIR.raw()
        os.environ[settings.CACHE_DIR.name] = os.path.join(tmp, "cache")  # a cold cache: extraction is timed
        try:
            started = time.perf_counter()
            metrics = run_job(data=os.path.join(tmp, "data"), strategy="linear", image_size=size, seed=seed, out=os.path.join(tmp, "run"), progress=False)
            seconds = time.perf_counter() - started
            correct = _correct_in_order(os.path.join(tmp, "run"), test)
        finally:
            if previous is None:
                os.environ.pop(settings.CACHE_DIR.name, None)
            else:
                os.environ[settings.CACHE_DIR.name] = previous
    return {"seconds": seconds, "accuracy": metrics["accuracy"], "extract_s": metrics["timings"]["extract_s"],
            "correct": correct}


def _correct_in_order(run_dir: str, test) -> list:
    """Per test image, in `test`'s order, whether the run classified it right (its predictions.csv
    names images by CLASS/FILE)."""
    import csv

    with open(os.path.join(run_dir, "predictions.csv")) as f:
        right = {row["sample"]: row["predicted"] == row["label"] for row in csv.DictReader(f)}
    return [right[f"{test.classes[label]}/{os.path.basename(path)}"] for path, label in zip(test.files, test.labels)]


def paired_difference(ours: List[bool], recipe: List[bool]) -> Dict[str, float]:
    """Accuracy difference (fasttl - recipe) on the same test images, with its standard error from
    the images where the two disagree (McNemar's view): a difference is only resolved when it
    exceeds about two standard errors."""
    n = len(ours)
    only_ours = sum(a and not b for a, b in zip(ours, recipe))
    only_recipe = sum(b and not a for a, b in zip(ours, recipe))
    diff = (only_ours - only_recipe) / max(n, 1)
    se = math.sqrt(max(only_ours + only_recipe - (only_ours - only_recipe) ** 2 / max(n, 1), 0.0)) / max(n, 1)
    return {"difference": diff, "standard_error": se, "only_fasttl_right": only_ours, "only_recipe_right": only_recipe}


def run(device: str = "cpu", quick: bool = False, data: str = None, per_class: Optional[int] = None,
        test_per_class: Optional[int] = None) -> Dict[str, object]:
    root, train, test = bench_splits(data)
    default_train, default_test, epochs, size = (10, 5, 2, 64) if quick else (DEFAULT_PER_CLASS, DEFAULT_TEST_PER_CLASS,
                                                                               10, 128)
    per_class = per_class or default_train
    test_per_class = test_per_class or default_test
    train, test = per_class_subset(train, per_class, 0), per_class_subset(test, test_per_class, 0)
    # what was used: a data folder smaller than asked gives every image of each class it has
    per_class, test_per_class = (int(np.bincount(split.labels).max()) for split in (train, test))
    name = "CIFAR-10" if os.path.realpath(root) == os.path.realpath(DEFAULT_DATA) else root
    recipe = usual_recipe(train, test, size, epochs)
    ours = fasttl_linear(train, test, size)
    paired = paired_difference(ours.pop("correct"), recipe.pop("correct"))
    rows = [{"case": "the usual recipe (PyTorch, backbone every epoch)", **recipe},
            {"case": "fasttl run --strategy linear", **ours}]
    return {"name": "e2e", "device": device, "rows": rows, "speedup": recipe["seconds"] / ours["seconds"],
            "paired": paired, "subset": {"train_per_class": per_class, "test_per_class": test_per_class},
            "notes": [f"{name} subset: {len(train)} train (up to {per_class}/class), {len(test)} test (up to "
                      f"{test_per_class}/class) "
                      f"JPEGs; EfficientNet-Lite0 at {size} px; {epochs} epochs; wall time of the whole job "
                      "(fasttl's includes building its feature cache from cold). The recipe: PIL loader, batch 32, "
                      "Adam 1e-3; fasttl: `fasttl run --strategy linear` at its defaults.",
                      f"Accuracy difference (fasttl - recipe) on the same images: {100 * paired['difference']:+.2f} "
                      f"points, standard error {100 * paired['standard_error']:.2f} ({paired['only_fasttl_right']} "
                      f"images only fasttl got right, {paired['only_recipe_right']} only the recipe)."]}


def speedups(result: Dict[str, object]) -> List[Tuple[str, float]]:
    """(label, the recipe's wall time / fasttl's) for the bar chart."""
    recipe, ours = result["rows"]
    return [(f"{ours['case']} vs the usual recipe\n(test accuracy {ours['accuracy']:.3f} vs {recipe['accuracy']:.3f})",
             recipe["seconds"] / ours["seconds"])]


def table(result: Dict[str, object]) -> str:
    recipe = result["rows"][0]
    rows = [[r["case"], f"{r['seconds']:.1f}", f"{r['accuracy']:.4f}", f"{recipe['seconds'] / r['seconds']:.1f}x"]
            for r in result["rows"]]
    return format_table(["job", "wall s", "test accuracy", "speedup"], rows)
