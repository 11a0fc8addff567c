"""What backbones side by side cost to extract, against the sum of their parts: the budget
planner costs a concatenation "a+b" from its parts' speeds measured on the probe, but the
concatenated run decodes and prepares each image once for both. Per backbone (each single, then
each pair and the three) the extraction loop's images/s on the same images, in one process, one
after another in turn (`--rounds`), at the planner's precision (int8 where it is measured).

    python benchmarks/concatenated_speed.py --data ../shared/data/cifar10 [--images 2000] [--rounds 2]
        [--precision int8]

"share": the concatenation's seconds an image over the sum of its parts'. Rows are written to
benchmarks/results/concatenated-speed.json, which make_results.py renders."""
import argparse
import datetime
import json
import os
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results", "concatenated-speed.json")
sys.path.insert(0, HERE)
from record_run import machine_name, write_results  # noqa: E402

LITES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
JOINED = ("efficientnet_lite0+efficientnet_lite2", "efficientnet_lite1+efficientnet_lite2",
          "efficientnet_lite0+efficientnet_lite1+efficientnet_lite2")


def seconds_an_image(name: str, source, precision: str, size: int, out: str) -> float:
    """The extraction loop's seconds an image (decode, backbone, pooling, store; the graph made
    and quantized before, not timed)."""
    from fasttl import FeatureCache, backbones
    from fasttl.cache.extraction import calibration_sample
    from fasttl.data import TransformSpec

    backbone = backbones.create(name)
    spec = TransformSpec.for_backbone(backbone.preprocessing, size=size)
    calibration = calibration_sample(source, spec) if precision == "int8" else None
    cache = FeatureCache.build(backbone, source, os.path.join(out, name), image_size=size, taps=4,
                               engine="onnxruntime", precision=precision, dtype="fp16", progress=False,
                               engine_dir=out, calibration=calibration, overwrite=True)
    return cache.last_build["seconds"] / cache.last_build["images"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--precision", default="int8", choices=("int8", "fp32"))
    parser.add_argument("--size", type=int, default=160)
    args = parser.parse_args()
    import fasttl.data as D

    source = D.scan_class_folder(os.path.join(args.data, "train"))
    rows = np.random.default_rng(0).permutation(len(source))[:args.images]
    source = source.subset(sorted(int(r) for r in rows))
    timed = {name: [] for name in LITES + JOINED}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):  # in turn: a slower spell of the machine lands on every backbone
            for name in timed:
                timed[name].append(seconds_an_image(name, source, args.precision, args.size, tmp))
                print(json.dumps({"round": round_, "backbone": name, "images_per_s": 1 / timed[name][-1]}), flush=True)
    best = {name: min(times) for name, times in timed.items()}
    rows = []
    for name in LITES + JOINED:
        parts = name.split("+")
        row = {"backbone": name, "images_per_s": 1 / best[name], "per_round_images_per_s": [1 / t for t in timed[name]]}
        if len(parts) > 1:
            row["share"] = best[name] / sum(best[p] for p in parts)
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {"rows": rows, "images": len(source), "precision": args.precision, "image_size": args.size,
              "rounds": args.rounds, "machine": machine_name(), "date": datetime.date.today().isoformat(),
              "command": "python benchmarks/concatenated_speed.py " + " ".join(sys.argv[1:])}
    write_results(RESULTS, result)


if __name__ == "__main__":
    main()
