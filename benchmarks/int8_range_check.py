"""What the int8 input-range check (fasttl/cache/int8_checks.py) catches: a graph calibrated on
64 CIFAR-10 training images shifted in exposure or levels (normal, video levels 10-245, levels
30-225 and 64-191, exposure x0.85, x0.7, x0.5), 60 normal test photos extracted through it at
32 px, head (taps 0) and multi-stage (taps 4) features. Per setting: the photos' int8 error
against PyTorch fp32 (median, 90th percentile, largest, share above 0.35), the share the check
refuses at a margin of a tenth and of a quarter of the range's width (fasttl's: a quarter), and
the largest error among the photos it accepts.

    python benchmarks/int8_range_check.py --data ../shared/data/cifar10
"""
import argparse

import numpy as np
import torch

import fasttl
import fasttl.data as D
from fasttl.cache import engines, quantize
from fasttl.cache.int8_checks import INT8_OUTSIDE_SHARE

# pixel values in [0, 1] -> the shifted training images a graph is calibrated on
SHIFTS = {"normal": lambda p: p, "video10-245": lambda p: (p * 235 + 10) / 255,
          "levels30-225": lambda p: (p * 195 + 30) / 255, "levels64-191": lambda p: (p * 127 + 64) / 255,
          "x0.85": lambda p: p * 0.85, "x0.7": lambda p: p * 0.7, "x0.5": lambda p: p * 0.5}
MARGINS = (0.1, 0.25)


def images(source, spec, count: int) -> torch.Tensor:
    rows = list(range(0, len(source), max(1, len(source) // count)))[:count]
    return torch.cat([x for x, _ in D.ImageLoader(source.subset(rows), spec, count, backend="torch")])


def refused(photos: torch.Tensor, low: float, high: float, margin: float) -> np.ndarray:
    """Which photos the check refuses at `margin` (int8_checks.Int8Checks.refuse_outside_range's rule)."""
    step = margin * (high - low)
    flat = photos.flatten(1)
    return (((flat < low - step) | (flat > high + step)).float().mean(1) > INT8_OUTSIDE_SHARE).numpy()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default="../shared/data/cifar10")
    train, test = D.class_folder_splits(parser.parse_args().data)
    backbone = fasttl.backbones.create("efficientnet_lite0")
    spec = D.TransformSpec.for_backbone(backbone.preprocessing, size=32)
    calibration, photos = images(train, spec, 64), images(test, spec, 60)
    mean, std = backbone.preprocessing.mean[0], backbone.preprocessing.std[0]
    model = backbone.for_extraction()
    for taps in (0, 4):
        fp32, want = engines.export_onnx(model, taps, 32), engines.pooled_reference(model, taps, photos)
        for name, shift in SHIFTS.items():
            graph = quantize.quantize(fp32, (shift(calibration * std + mean) - mean) / std)
            low, high = quantize.input_range(graph)
            got = torch.from_numpy(engines._session(graph).run(None, {"images": photos.numpy()})[0])
            error = np.array([engines.norm_error(g[None], w[None]) for g, w in zip(got, want)])
            shares = {margin: refused(photos, low, high, margin) for margin in MARGINS}
            accepted = error[~shares[0.25]]
            print(f"taps {taps} {name:13s} range [{low:.2f}, {high:.2f}] error median {np.median(error):.2f} "
                  f"p90 {np.percentile(error, 90):.2f} max {error.max():.2f} above 0.35 {np.mean(error > 0.35):.2f} | "
                  + " ".join(f"refused at {m} {shares[m].mean():.2f}" for m in MARGINS)
                  + f" | largest accepted {accepted.max() if len(accepted) else 0:.2f}", flush=True)


if __name__ == "__main__":
    main()
