"""int8 extraction against fp32 on the same images: the tuned linear probe's accuracy on a
held-out split carved from CIFAR-10's *training* images (never the test split), and each
engine's extraction rate in the same run. Per seed: `--fit` images a class to fit the probe on
(its L2 strength chosen on its own validation split, as `fasttl run` does), `--score` other
images a class to score it on. Both precisions run ONNX Runtime on the default run's backbone,
size and features (Lite0, 160 px, multi; --backbone for another); int8 extracts both splits through one graph calibrated
on a seeded sample of the fit images, as `fasttl run --extract-precision int8` does with its
training images.

    python benchmarks/int8_accuracy.py --data ../shared/data/cifar10 [--seeds 0 1 2] [--fit 200] [--score 100]
        [--backbone efficientnet_lite2]

Rows are merged into benchmarks/results/int8-accuracy.json, which make_results.py renders."""
import argparse
import datetime
import json
import os
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results", "int8-accuracy.json")
sys.path.insert(0, HERE)
from record_run import machine_name  # noqa: E402


def draw(data: str, seed: int, fit: int, score: int):
    """(fit source, score source): disjoint seeded draws from each class folder of data/train."""
    import fasttl.data as D

    source = D.scan_class_folder(os.path.join(data, "train"))
    labels = np.asarray(source.labels)
    rng = np.random.default_rng(seed)
    fit_rows, score_rows = [], []
    for label in range(len(source.classes)):
        rows = rng.permutation(np.flatnonzero(labels == label))
        fit_rows += rows[:fit].tolist()
        score_rows += rows[fit:fit + score].tolist()
    return source.subset(sorted(fit_rows)), source.subset(sorted(score_rows))


def one_precision(backbone, fit_source, score_source, precision: str, out: str, size: int, seed: int) -> dict:
    import torch
    from fasttl import FeatureCache
    from fasttl.heads.tuning import predict_split, tune_linear

    from fasttl.cache.extraction import calibration_sample
    from fasttl.data import TransformSpec

    spec = TransformSpec.for_backbone(backbone.preprocessing, size=size)
    calibration = calibration_sample(fit_source, spec) if precision == "int8" else None
    caches, seconds, extracting = {}, 0.0, 0.0
    for name, source in (("fit", fit_source), ("score", score_source)):
        started = time.perf_counter()
        caches[name] = FeatureCache.build(backbone, source, os.path.join(out, f"{precision}-{name}"), image_size=size,
                                          taps=4, engine="onnxruntime", precision=precision, dtype="fp32",
                                          progress=False, engine_dir=out, calibration=calibration)
        seconds += time.perf_counter() - started
        extracting += caches[name].last_build["seconds"]  # the images' loop, without exporting the graph
    tuned = tune_linear([caches["fit"]], seed=seed, progress=False)
    logits, labels = predict_split(tuned.head, [caches["score"]])
    accuracy = float((logits.argmax(1) == labels).float().mean())
    images = len(fit_source) + len(score_source)
    return {"accuracy": accuracy, "images_per_s": images / extracting, "seconds_with_graphs": seconds,
            "weight_decay": tuned.choice["weight_decay"],
            "val_accuracy": tuned.choice.get("val_accuracy"), "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--fit", type=int, default=200)
    parser.add_argument("--score", type=int, default=100)
    parser.add_argument("--size", type=int, default=160)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    args = parser.parse_args()
    from fasttl import backbones

    backbone = backbones.create(args.backbone)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            fit_source, score_source = draw(args.data, seed, args.fit, args.score)
            row = {"seed": seed}
            for precision in ("fp32", "int8"):  # fp32 first: int8 rates are not helped by a warm page cache alone
                row[precision] = one_precision(backbone, fit_source, score_source, precision,
                                               os.path.join(tmp, str(seed)), args.size, seed)
            row["difference_points"] = 100 * (row["int8"]["accuracy"] - row["fp32"]["accuracy"])
            row["speedup"] = row["int8"]["images_per_s"] / row["fp32"]["images_per_s"]
            print(json.dumps(row), flush=True)
            rows.append(row)
    prefix = "" if args.backbone == "efficientnet_lite0" else f"{args.backbone.replace('efficientnet_', '')}-"
    result = {"name": f"{prefix}cifar10-{args.fit}-fit-{args.score}-score", "backbone": args.backbone,
              "image_size": args.size, "features": "multi", "fit_per_class": args.fit, "score_per_class": args.score,
              "seeds": rows, "machine": machine_name(), "date": datetime.date.today().isoformat(),
              "command": "python benchmarks/int8_accuracy.py " + " ".join(sys.argv[1:])}
    previous = json.load(open(RESULTS))["rows"] if os.path.exists(RESULTS) else []
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as f:
        json.dump({"rows": [r for r in previous if r["name"] != result["name"]] + [result]}, f, indent=1)
    print(f"wrote {RESULTS}")

if __name__ == "__main__":
    main()
