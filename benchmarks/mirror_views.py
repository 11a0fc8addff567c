"""Why `--mirror-views` defaults to `test`: on validation splits carved from the training images
(never the test split), the tuned linear head's validation accuracy along its L2 path scored on
the plain view's logits alone, and on the plain and the mirrored view's logits averaged (which is
how a `--mirror-views test` run chooses its L2 strength, and how its test split is scored).

    python benchmarks/mirror_views.py --data ../shared/data/cifar10 [--train-per-class N] [--seeds 0 1 2]

The head trains on the plain training view only (as `--mirror-views test` does); only the
validation images are extracted a second time, mirrored (in memory, no cache). Rows are merged into
benchmarks/results/mirror-views.json, which make_results.py renders."""
import argparse
import datetime
import json
import os
import sys


HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results", "mirror-views.json")
sys.path.insert(0, HERE)
from record_run import machine_name  # noqa: E402


def validation_paths(ds, backbone, extraction, seed: int) -> dict:
    """{"plain": path, "averaged": path}: validation accuracy per L2 strength, for one split."""
    from fasttl.heads import solver
    from fasttl.data.splits import validation_split
    from fasttl.transfer.caching import FeaturesInMemory, cached_features

    cache = cached_features(backbone, ds.train, "train", extraction, progress=True)
    train_rows, val_rows = validation_split(cache.labels.tolist(), seed)
    widths = (cache.fingerprint.get("layout") or {}).get("channels") or [cache.feature_dim]
    x = cache.subset(train_rows).all_features()
    mean, std = solver.block_scaling(x, widths)
    x, y = (x - mean) / std, cache.labels[train_rows]
    plain = (cache.subset(val_rows).all_features() - mean) / std
    mirrored = (FeaturesInMemory(backbone, extraction)(ds.train.subset(val_rows), mirror=True).cpu() - mean) / std
    val_y = cache.labels[val_rows]
    paths = {}
    for name, views in (("plain", [plain]), ("averaged", [plain, mirrored])):
        _, path, _ = solver.fit_path(x, y, views, val_y, len(ds.classes), progress=False)
        paths[name] = {str(p["weight_decay"]): p["val_accuracy"] for p in path}
    return {"seed": seed, "validation_images": len(val_rows), "train_images": len(train_rows), **paths}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--train-per-class", type=int)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--name", required=True)
    args = parser.parse_args()
    from fasttl import backbones
    from fasttl.transfer.caching import Extraction
    from fasttl.transfer.config import RunConfig
    from fasttl.transfer.datasets import load_dataset

    config = RunConfig(data=args.data).resolved(native_size=32)
    ds = load_dataset(args.data, seed=0, train_per_class=args.train_per_class)
    backbone = backbones.create(config.backbone)
    extraction = Extraction.of(config)
    splits = [validation_paths(ds, backbone, extraction, seed) for seed in args.seeds]
    for s in splits:
        print(f"seed {s['seed']}: best plain {max(s['plain'].values()):.4f}, averaged {max(s['averaged'].values()):.4f}")
    row = {"name": args.name, "data": args.data, "train_per_class": args.train_per_class,
           "backbone": config.backbone, "image_size": config.image_size, "features": config.features,
           "splits": splits, "machine": machine_name(), "date": datetime.date.today().isoformat(),
           "command": "python benchmarks/mirror_views.py " + " ".join(sys.argv[1:])}
    rows = json.load(open(RESULTS))["rows"] if os.path.exists(RESULTS) else []
    rows = [r for r in rows if r["name"] != args.name] + [row]
    with open(RESULTS, "w") as f:
        json.dump({"rows": rows}, f, indent=1)
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
