"""End to end: the seed's recipe, reimplemented faithfully in PyTorch, beside
`fasttl run --strategy linear` on the same backbone, image size, data subset and epochs.

The recipe: class-folder images through a PIL data loader, resized to the backbone's size; the
frozen backbone recomputed on every image in every epoch; global average pooling + a dense
softmax head; Adam, cross-entropy, batch 32, 10 epochs; test accuracy at the end."""
from __future__ import annotations

import os
import tempfile
import time
from typing import Dict

import numpy as np
import torch
import torch.nn.functional as F

from fasttl import backbones
from fasttl.bench.common import format_table
from fasttl.bench.data import DEFAULT_DATA
from fasttl.data import class_folder_splits
from fasttl.transfer.datasets import per_class_subset


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


def seed_recipe(train, test, size: int, epochs: int, batch_size: int = 32, seed: int = 0) -> Dict[str, float]:
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
    correct = 0
    with torch.no_grad():
        for x, y in torch.utils.data.DataLoader(PILFolder(test, size, p.mean, p.std), batch_size=batch_size,
                                                num_workers=2):
            correct += int((head(backbone.forward_pooled(x)).argmax(1) == y).sum())
    return {"seconds": time.perf_counter() - started, "accuracy": correct / len(test)}


def _link_folder(train, test, root: str) -> None:
    """A class-folder dataset of links to the chosen images (fasttl run takes folders)."""
    for split, source in (("train", train), ("test", test)):
        for path, label in zip(source.files, source.labels):
            folder = os.path.join(root, split, source.classes[label])
            os.makedirs(folder, exist_ok=True)
            os.symlink(path, os.path.join(folder, os.path.basename(path)))


def fasttl_linear(train, test, size: int, epochs: int, batch_size: int = 32, seed: int = 0) -> Dict[str, float]:
    from fasttl.transfer.job import run as run_job

    with tempfile.TemporaryDirectory() as tmp:
        _link_folder(train, test, os.path.join(tmp, "data"))
        previous = os.environ.get("FASTTL_CACHE_DIR")
        os.environ["FASTTL_CACHE_DIR"] = os.path.join(tmp, "cache")  # a cold cache: extraction is timed
        try:
            started = time.perf_counter()
            metrics = run_job(data=os.path.join(tmp, "data"), strategy="linear", image_size=size, epochs=epochs,
                              batch_size=batch_size, lr=3e-3, seed=seed, out=os.path.join(tmp, "run"), progress=False)
            seconds = time.perf_counter() - started
        finally:
            if previous is None:
                os.environ.pop("FASTTL_CACHE_DIR", None)
            else:
                os.environ["FASTTL_CACHE_DIR"] = previous
    return {"seconds": seconds, "accuracy": metrics["accuracy"], "extract_s": metrics["timings"]["extract_s"]}


def run(device: str = "cpu", quick: bool = False, data: str = None) -> Dict[str, object]:
    root = os.path.abspath(data or os.environ.get("FASTTL_BENCH_DATA", DEFAULT_DATA))
    train, test = class_folder_splits(root)
    per_class, test_per_class, epochs, size = (10, 5, 2, 64) if quick else (100, 50, 10, 128)
    train, test = per_class_subset(train, per_class, 0), per_class_subset(test, test_per_class, 0)
    recipe = seed_recipe(train, test, size, epochs)
    ours = fasttl_linear(train, test, size, epochs)
    rows = [{"case": "seed's recipe (PyTorch, backbone every epoch)", **recipe},
            {"case": "fasttl run --strategy linear", **ours}]
    return {"name": "e2e", "device": device, "rows": rows, "speedup": recipe["seconds"] / ours["seconds"],
            "notes": [f"CIFAR-10 subset: {len(train)} train ({per_class}/class), {len(test)} test ({test_per_class}/class) "
                      f"JPEGs; EfficientNet-Lite0 at {size} px; {epochs} epochs, batch 32; wall time of the whole job "
                      "(fasttl's includes building its feature cache from cold).",
                      "Goal (issue 7): at least 8x less wall time at equal or better accuracy on the CPU."]}


def table(result: Dict[str, object]) -> str:
    recipe = result["rows"][0]
    rows = [[r["case"], f"{r['seconds']:.1f}", f"{r['accuracy']:.4f}", f"{recipe['seconds'] / r['seconds']:.1f}x"]
            for r in result["rows"]]
    return format_table(["job", "wall s", "test accuracy", "speedup"], rows)
