"""Input pipeline throughput on the CIFAR-10 JPEGs (decode, resize, normalize, batch): DALI and
fasttl's PyTorch fallback beside a plain PIL + numpy loop (what a user would otherwise write), next
to the backbone's own forward throughput at the same size (the pipeline must never be the
bottleneck). At 32 px nothing is resized: decoding and batching alone."""
from __future__ import annotations

import os
import time
from typing import Dict, List, Tuple

import numpy as np
import torch

from fasttl import backbones
from fasttl.cache import engines
from fasttl.cache.extraction import default_batch_size, extraction_engine
from fasttl.bench.common import bench_splits, every_nth, format_table, load_average
from fasttl.data import ImageLoader, TransformSpec, dali_available



def _pil_loop_images_per_second(files, size: int, mean, std, batch_size: int = 64) -> float:
    """A plain single-process loop: PIL decode and bilinear resize, numpy normalize, batches
    stacked into tensors. Its second pass is timed (the first warms the file cache)."""
    from PIL import Image

    mean = np.asarray(mean, dtype=np.float32)
    std = np.asarray(std, dtype=np.float32)

    def epoch() -> int:
        count, batch = 0, []
        for path in files:
            with Image.open(path) as image:
                image = image.convert("RGB")
                if image.size != (size, size):
                    image = image.resize((size, size), Image.BILINEAR)
                batch.append(((np.asarray(image, dtype=np.float32) / 255.0 - mean) / std).transpose(2, 0, 1))
            if len(batch) == batch_size:
                count += torch.from_numpy(np.stack(batch)).shape[0]
                batch = []
        return count + (torch.from_numpy(np.stack(batch)).shape[0] if batch else 0)

    epoch()
    start = time.perf_counter()
    count = epoch()
    return count / (time.perf_counter() - start)


def _images_per_second(loader: ImageLoader) -> float:
    for _ in loader:  # a first epoch builds the pipeline and warms the caches
        pass
    start, count = time.perf_counter(), 0
    for images, _ in loader:
        count += images.shape[0]
    return count / (time.perf_counter() - start)


@torch.no_grad()
def _forward_images_per_second(backbone, size: int, device: str, repeats: int = 3) -> float:
    """The forward feature extraction runs by default: its engine and precision on this device,
    batch norms folded, its batch size."""
    device = torch.device(device)
    batch = default_batch_size(device)
    engine = extraction_engine(backbone, device, *engines.resolve("auto", "auto", device), taps=0, image_size=size)
    x = torch.randn(batch, 3, size, size, device=device)
    engine(x)
    start = time.perf_counter()
    for _ in range(repeats):
        engine(x)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batch * repeats / (time.perf_counter() - start)


def run(device: str = "cpu", quick: bool = False, data: str = None) -> Dict[str, object]:
    root, _, test = bench_splits(data)
    source = every_nth(test, 512 if quick else 4000)
    backbone = backbones.create("efficientnet_lite0")
    rows = []
    for size in ([32, 128] if quick else [32, 128, 224]):
        spec = TransformSpec.for_backbone(backbone.preprocessing, size=size)
        row = {"size": size, "images": len(source), "load_1m": load_average()}
        row["pil_ips"] = _pil_loop_images_per_second(source.files, size, spec.mean, spec.std)
        if dali_available():
            row["dali_ips"] = _images_per_second(ImageLoader(source, spec, 64, backend="dali", device=device,
                                                             num_threads=2))
        row["torch_ips"] = _images_per_second(ImageLoader(source, spec, 64, backend="torch", num_threads=2))
        row["forward_ips"] = _forward_images_per_second(backbone, size, device, repeats=1 if quick else 3)
        rows.append(row)
    return {"name": "data", "device": device, "rows": rows, "notes": [
        f"{len(source)} CIFAR-10 test JPEGs (32x32) from {os.path.relpath(root)}, decoded, resized to the size, "
        "normalized; 2 threads (DALI) / 2 worker processes (PyTorch fallback); batch 64. plain loop: one process, "
        "PIL decode + bilinear resize, numpy normalize (its resize is not fasttl's, which reproduces DALI's).",
        "forward: EfficientNet-Lite0 images/s at the same size on the same device, as feature extraction runs it "
        "(frozen, batch norms folded, channels_last, fp32 on CPU / bf16 autocast on GPU, batch 32 on CPU / 128 on "
        "GPU)."]}


def speedups(result: Dict[str, object]) -> List[Tuple[str, float]]:
    """(label, ratio) for the bar chart: the pipeline over the backbone's forward (DALI, or the
    fallback where DALI is missing), and DALI over the fallback."""
    bars = []
    for r in result["rows"]:
        bars.append((f"{r['size']} px\nfallback / PIL loop", r["torch_ips"] / r["pil_ips"]))
        if r.get("dali_ips"):
            bars += [(f"{r['size']} px\nDALI / fallback", r["dali_ips"] / r["torch_ips"]),
                     (f"{r['size']} px\nDALI / forward", r["dali_ips"] / r["forward_ips"])]
        else:
            bars.append((f"{r['size']} px\nfallback / forward (no DALI)", r["torch_ips"] / r["forward_ips"]))
    return bars


def table(result: Dict[str, object]) -> str:
    rows = []
    for r in result["rows"]:
        dali = r.get("dali_ips")
        rows.append([f"{r['size']} px", f"{dali:.0f}" if dali else "n/a (no DALI)", f"{r['torch_ips']:.0f}",
                     f"{r['pil_ips']:.0f}", f"{r['torch_ips'] / r['pil_ips']:.2f}x", f"{r['forward_ips']:.0f}",
                     f"{dali / r['forward_ips']:.1f}x" if dali else "n/a", r.get("load_1m")])
    return format_table(["size", "DALI img/s", "fasttl PyTorch fallback img/s", "plain PIL loop img/s",
                         "fallback / PIL loop", "backbone forward img/s", "DALI / forward", "load"], rows)
