"""Few training images: how the linear head is chosen, its L2 strength on one 10% validation split,
or by 5-fold cross-validation on every training image among the L2 strengths and shrinkage LDA
(fasttl.heads.shrinkage), at 10 to 200 training images per class.

Features (the run's defaults: Lite0, 160 px, multi-stage, plain view) are extracted once for a
pool of training images per class and for the test images. Each seed draws K training images per
class from the first `--pool` of each class; the images from `--pool` to `--pool + --design` of
each class, never drawn, are the design split: the size below which cross-validation is used
(tuning.CROSS_VALIDATION_BELOW) is read from it, never from the test split, which is reported
beside it.

    python benchmarks/few_shot.py --data ../shared/data/cifar10 [--classes bird cat deer dog frog]
        [--sizes 10 20 40 100 200] [--seeds 0 1 2 3 4] [--name NAME]

Rows are merged into benchmarks/results/few-shot.json, which make_results.py renders."""
import argparse
import datetime
import json
import os
import sys
import tempfile

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results", "few-shot.json")
sys.path.insert(0, HERE)
from record_run import machine_name  # noqa: E402


def features_of(data: str, classes, split: str, first: int, count: int, embed):
    from fasttl.data import FileSource

    files, labels = [], []
    for label, name in enumerate(classes):
        names = sorted(os.listdir(os.path.join(data, split, name)))[first:first + count]
        files += [os.path.join(data, split, name, n) for n in names]
        labels += [label] * len(names)
    source = FileSource(files, labels, list(classes), root=data)
    return embed(source).cpu(), torch.tensor(labels)


def accuracy(head, x, y) -> float:
    with torch.no_grad():
        return float((head(x).argmax(1) == y).float().mean())


def one_draw(pool, design, test, classes, channels, size, seed, folder):
    """Design and test accuracy of the head each way of choosing chose, on one draw."""
    from fasttl.cache.cache import FeatureCache
    from fasttl.heads import tuning

    x, y = pool
    rng = np.random.default_rng([seed, size])
    rows = np.concatenate([rng.choice(np.flatnonzero(y.numpy() == c), size, replace=False)
                           for c in range(len(classes))])
    cache = FeatureCache.write(os.path.join(folder, f"{seed}-{size}"), [x[rows]], y[rows], classes=list(classes),
                               fingerprint={"layout": {"channels": channels}})
    row = {"seed": seed}
    saved = tuning.CROSS_VALIDATION_BELOW
    try:
        for name, below in (("split", 0), ("folds", 1 << 30)):
            tuning.CROSS_VALIDATION_BELOW = below
            tuned = tuning.tune_linear([cache], seed=seed, progress=False)
            setting = {key: tuned.choice[key] for key in tuning.SETTINGS if key in tuned.choice}
            row[name] = {**setting, "design": accuracy(tuned.head, *design), "test": accuracy(tuned.head, *test)}
    finally:
        tuning.CROSS_VALIDATION_BELOW = saved
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--classes", nargs="+")
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 20, 40, 100, 200])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--pool", type=int, default=400)
    parser.add_argument("--design", type=int, default=200)
    parser.add_argument("--test-per-class", type=int, default=1000)
    parser.add_argument("--name", default=None)
    args = parser.parse_args()
    from fasttl import backbones
    from fasttl.transfer.caching import Extraction, FeaturesInMemory
    from fasttl.transfer.config import RunConfig

    classes = args.classes or sorted(os.listdir(os.path.join(args.data, "train")))
    config = RunConfig(data=args.data).resolved(native_size=32)
    backbone = backbones.create(config.backbone)
    extraction = Extraction.of(config)
    embed = FeaturesInMemory(backbone, extraction)
    channels = [int(c) for c in backbone.tap_channels()[-(extraction.taps + 1):]]
    pool = features_of(args.data, classes, "train", 0, args.pool, embed)
    design = features_of(args.data, classes, "train", args.pool, args.design, embed)
    test = features_of(args.data, classes, "test", 0, args.test_per_class, embed)
    sizes = []
    with tempfile.TemporaryDirectory() as folder:
        for size in args.sizes:
            draws = [one_draw(pool, design, test, classes, channels, size, seed, folder) for seed in args.seeds]
            mean = {way: {part: float(np.mean([d[way][part] for d in draws])) for part in ("design", "test")}
                    for way in ("split", "folds")}
            print(f"{size}/class: design {mean['split']['design']:.4f} split, {mean['folds']['design']:.4f} folds; "
                  f"test {mean['split']['test']:.4f} split, {mean['folds']['test']:.4f} folds", flush=True)
            sizes.append({"per_class": size, "draws": draws})
    from fasttl.heads import tuning

    record = {"name": args.name or f"{len(classes)}-classes", "classes": classes,
              "offered": list(tuning.SETTINGS),  # what cross-validation chose among "backbone": config.backbone,
              "image_size": config.image_size, "features": config.features, "pool": args.pool,
              "design": args.design, "test_per_class": args.test_per_class, "sizes": sizes,
              "machine": machine_name(), "date": datetime.date.today().isoformat(),
              "command": "python benchmarks/few_shot.py " + " ".join(sys.argv[1:])}
    previous = json.load(open(RESULTS))["rows"] if os.path.exists(RESULTS) else []
    with open(RESULTS, "w") as f:
        json.dump({"rows": [r for r in previous if r["name"] != record["name"]] + [record]}, f, indent=1)
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
