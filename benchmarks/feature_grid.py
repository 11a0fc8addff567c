"""Feature transfer on a CIFAR-10 subset: accuracy of the validation-tuned linear head for a
backbone at an input size, over how many intermediate stages the cached vector pools (taps 0 =
the head's features only), and extraction images/s; appends its rows to
benchmarks/results/feature-transfer.json (make_results.py renders them).

    python benchmarks/feature_grid.py efficientnet_lite0 160 --per-class 500 --test-per-class 200

Every choice (the L2 strength) is made on a 10% validation split of the training images; the
test images are scored once per configuration. Caches go to --cache-dir and are reused."""
import argparse
import datetime
import json
import os
import pathlib
import time

import torch

from fasttl import backbones
from fasttl.bench.common import machine
from fasttl.cache import FeatureCache
from fasttl.heads import solver
from fasttl.data.splits import validation_split
from fasttl.transfer.datasets import load_dataset

HERE = pathlib.Path(__file__).resolve().parent
OUT = HERE / "results" / "feature-transfer.json"
MAX_TAPS = 4


def standardization(features):
    """Per-feature mean and std: the alternative block_scaling is compared against."""
    return features.mean(0), features.std(0).clamp(min=1e-6)


SCALINGS = {"block": solver.block_scaling, "per-feature": lambda x, widths: standardization(x)}


def evaluate(x, y, xt, yt, widths, seed, scaling):
    train, val = validation_split(y.numpy(), seed)
    mean, scale = SCALINGS[scaling](x[train], widths)
    z = (x - mean) / scale
    started = time.perf_counter()
    weight_decay, path, solution = solver.fit_path(z[train], y[train], [z[val]], y[val], int(y.max()) + 1)
    mean, scale = SCALINGS[scaling](x, widths)
    weight, bias, _ = solver.solve((x - mean) / scale, y, int(y.max()) + 1, weight_decay, init=solution)
    accuracy = float((torch.addmm(bias, (xt - mean) / scale, weight.t()).argmax(1) == yt).float().mean())
    chosen = next(p for p in path if p["weight_decay"] == weight_decay)
    return {"weight_decay": weight_decay, "val_accuracy": chosen["val_accuracy"], "test_accuracy": accuracy,
            "solve_s": time.perf_counter() - started, "strengths_solved": len(path)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("backbone")
    parser.add_argument("size", type=int)
    parser.add_argument("--data", default=str(HERE.parent.parent / "shared" / "data" / "cifar10"))
    parser.add_argument("--per-class", type=int, default=500)
    parser.add_argument("--test-per-class", type=int, default=200)
    parser.add_argument("--cache-dir", default="/tmp/fasttl-feature-grid")
    parser.add_argument("--engine", default="auto")
    parser.add_argument("--scalings", default="block")
    args = parser.parse_args()
    dataset = load_dataset(os.path.abspath(args.data), train_per_class=args.per_class,
                           test_per_class=args.test_per_class, seed=0)
    backbone = backbones.create(args.backbone)
    caches, rates = {}, {}
    for split, source in (("train", dataset.train), ("test", dataset.test)):
        directory = os.path.join(args.cache_dir, f"{args.backbone}-{args.size}-{args.per_class}-{args.engine}", split)
        caches[split] = FeatureCache.build(backbone, source, directory, image_size=args.size, taps=MAX_TAPS,
                                           engine=args.engine, progress=False)
        build = caches[split].last_build
        if build["images"]:
            rates[split] = build["images_per_second"]
    channels = backbone.tap_channels()[-(MAX_TAPS + 1):]
    x, y = caches["train"].all_features(), caches["train"].labels
    xt, yt = caches["test"].all_features(), caches["test"].labels
    rows = []
    for scaling in args.scalings.split(","):
        for taps in range(MAX_TAPS + 1):
            start = sum(channels[:MAX_TAPS - taps])
            row = {"backbone": args.backbone, "size": args.size, "taps": taps, "dim": x.shape[1] - start,
                   "scaling": scaling, "train_per_class": args.per_class, "test_per_class": args.test_per_class,
                   "engine": caches["train"].fingerprint["compute"]["engine"],
                   "extract_images_per_s": rates.get("train")}
            row.update(evaluate(x[:, start:], y, xt[:, start:], yt, channels[MAX_TAPS - taps:], 0, scaling))
            print(json.dumps(row), flush=True)
            rows.append(row)
    record = json.loads(OUT.read_text()) if OUT.exists() else {"rows": []}
    key = lambda r: (r["backbone"], r["size"], r["taps"], r["scaling"], r["train_per_class"])  # noqa: E731
    fresh = {key(r) for r in rows}
    record["rows"] = [r for r in record["rows"] if key(r) not in fresh] + rows
    m = machine()
    record["machine"] = f"{m['cpu']}, {m['cores']} cores"
    record["date"] = datetime.date.today().isoformat()
    OUT.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
