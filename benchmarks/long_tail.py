"""Long-tailed training data: the `linear` (or `--strategy mlp`) head with and without its logit adjustment, on
CIFAR-10 subsets whose classes have 200 down to 2 training images (imbalance 100, an exponential
profile), scored on a balanced test set. Each seed shuffles which classes are rare and which
images are drawn. The adjustment is switched off by raising fasttl.heads.imbalance.IMBALANCE_RATIO
out of reach (a run then behaves as before the correction existed); the choice of tau is made on
the validation split by the run itself.

    python benchmarks/long_tail.py --data ../shared/data/cifar10 [--seeds 0 1 2] [--test-per-class 200]

Rows are merged into benchmarks/results/long-tail.json, which make_results.py renders."""
import argparse
import datetime
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results", "long-tail.json")
sys.path.insert(0, HERE)
from record_run import machine_name  # noqa: E402


def long_tailed_copy(data: str, out: str, seed: int, most: int, imbalance: float, test_per_class: int) -> dict:
    """Class folders under `out` (train: `most` down to most/imbalance images, classes in a seeded
    order; test: `test_per_class` each); returns {class: training images}."""
    rng = np.random.default_rng(seed)
    classes = sorted(os.listdir(os.path.join(data, "train")))
    order = rng.permutation(len(classes))
    counts = {}
    for rank, index in enumerate(order):
        name = classes[index]
        counts[name] = max(1, round(most * (1 / imbalance) ** (rank / (len(classes) - 1))))
        for split, count in (("train", counts[name]), ("test", test_per_class)):
            files = sorted(os.listdir(os.path.join(data, split, name)))
            chosen = rng.choice(len(files), size=count, replace=False) if split == "train" else range(count)
            os.makedirs(os.path.join(out, split, name))
            for i in sorted(chosen):
                shutil.copy(os.path.join(data, split, name, files[i]), os.path.join(out, split, name))
    return counts


def run_once(data: str, out: str, adjust: bool, strategy: str = "linear") -> dict:
    from fasttl.heads import imbalance
    from fasttl.transfer.job import run

    saved = imbalance.IMBALANCE_RATIO
    imbalance.IMBALANCE_RATIO = saved if adjust else float("inf")
    try:
        started = time.perf_counter()
        metrics = run(data=data, strategy=strategy, compare="none", out=out, progress=False, print_summary=False)
    finally:
        imbalance.IMBALANCE_RATIO = saved
    choice = metrics["notes"]["choice"]
    return {"accuracy": metrics["accuracy"], "balanced_accuracy": metrics["balanced_accuracy"],
            "per_class_recall": metrics["per_class_recall"], "weight_decay": choice["weight_decay"],
            "logit_adjustment": choice.get("logit_adjustment"), "seconds": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--most", type=int, default=200)
    parser.add_argument("--imbalance", type=float, default=100.0)
    parser.add_argument("--test-per-class", type=int, default=200)
    parser.add_argument("--name", default=None, help="the row's name (default cifar10-long-tail-100, with the "
                        "strategy's name after it when not linear)")
    parser.add_argument("--strategy", default="linear", choices=("linear", "mlp"))
    args = parser.parse_args()
    args.name = args.name or "cifar10-long-tail-100" + ("" if args.strategy == "linear" else f"-{args.strategy}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("FASTTL_CACHE_DIR", os.path.join(tmp, "cache"))
        for seed in args.seeds:
            data = os.path.join(tmp, f"data-{seed}")
            counts = long_tailed_copy(args.data, data, seed, args.most, args.imbalance, args.test_per_class)
            row = {"seed": seed, "train_counts": counts}
            for name, adjust in (("without", False), ("with", True)):
                row[name] = run_once(data, os.path.join(tmp, f"run-{seed}-{name}"), adjust, args.strategy)
            print(f"seed {seed}: balanced accuracy {row['without']['balanced_accuracy']:.4f} without, "
                  f"{row['with']['balanced_accuracy']:.4f} with (tau {row['with']['logit_adjustment']})", flush=True)
            rows.append(row)
    from fasttl.transfer.config import RunConfig

    config = RunConfig().resolved(native_size=32)
    record = {"name": args.name, "most": args.most, "imbalance": args.imbalance,
              "test_per_class": args.test_per_class, "backbone": config.backbone, "image_size": config.image_size,
              "features": config.features, "seeds": rows, "machine": machine_name(),
              "date": datetime.date.today().isoformat(),
              "command": "python benchmarks/long_tail.py " + " ".join(sys.argv[1:])}
    previous = json.load(open(RESULTS))["rows"] if os.path.exists(RESULTS) else []
    with open(RESULTS, "w") as f:
        json.dump({"rows": [r for r in previous if r["name"] != args.name] + [record]}, f, indent=1)
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
