"""How extraction splits the machine between JPEG decode and the backbone, measured: images/s of
the extraction loop (decode, backbone, pooling) for each decode backend and thread count, ONNX
Runtime intra-op thread count and batch size, fp32 and int8, on the default run's backbone, size
and features (Lite0, 160 px, multi). Decode overlaps inference in every setting (DALI's threads
or the PyTorch DataLoader's worker processes prefetch the next batch while the engine runs); the
question is how many threads each side gets. The fastest setting is what fasttl's defaults are
(and, measured here, what they stay).

    python benchmarks/extraction_split.py --data ../shared/data/cifar10 [--images 1024] [--rounds 3]

Writes benchmarks/results/extraction-split.json, which make_results.py renders."""
import argparse
import datetime
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results", "extraction-split.json")
sys.path.insert(0, HERE)
from record_run import machine_name  # noqa: E402

# (decode backend, decode threads or workers, ONNX Runtime threads, batch): the defaults, then one
# change at a time
SETTINGS = [("dali", 2, 2, 32), ("dali", 1, 2, 32), ("dali", 2, 1, 32), ("torch", 2, 2, 32),
            ("dali", 2, 2, 16), ("dali", 2, 2, 64)]


def measure(data: str, images: int, rounds: int, settings=SETTINGS) -> dict:
    import torch

    import fasttl
    import fasttl.data as D
    from fasttl.cache.extraction import calibration_sample, extraction_engine

    train, _ = D.class_folder_splits(data)
    source = train.subset(list(range(0, len(train), max(1, len(train) // images)))[:images])
    backbone = fasttl.backbones.create("efficientnet_lite0")
    spec = D.TransformSpec.for_backbone(backbone.preprocessing, size=160)
    calibration = calibration_sample(source, spec)
    default_threads = torch.get_num_threads()
    found = {}
    for precision in ("fp32", "int8"):
        engines = {}
        for threads in sorted({s[2] for s in settings}):
            torch.set_num_threads(threads)  # ONNX Runtime's session takes torch's thread count
            engines[threads] = extraction_engine(backbone, torch.device("cpu"), "onnxruntime", precision, 4, 160,
                                                 calibration=calibration if precision == "int8" else None)
        torch.set_num_threads(default_threads)
        for _ in range(rounds):  # settings alternate within a round: drift hits them alike
            for backend, workers, threads, batch in settings:
                engine = engines[threads]
                torch.set_num_threads(threads)
                count, started = 0, time.perf_counter()
                for pixels, _ in D.ImageLoader(source, spec, batch, backend=backend, num_workers=workers):
                    engine(pixels)
                    count += len(pixels)
                torch.set_num_threads(default_threads)
                key = f"{precision} {backend} {workers} {threads} {batch}"
                found.setdefault(key, []).append(count / (time.perf_counter() - started))
    rows = []
    for key, rates in found.items():
        precision, backend, workers, threads, batch = key.split()
        rows.append({"precision": precision, "backend": backend, "decode_threads": int(workers),
                     "engine_threads": int(threads), "batch": int(batch), "images_per_s": rates,
                     "median": statistics.median(rates)})
    return {"rows": rows, "images": len(source), "rounds": rounds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    result = measure(args.data, args.images, args.rounds)
    result.update(machine=machine_name(), date=datetime.date.today().isoformat(),
                  command=f"python benchmarks/extraction_split.py --data {args.data} --images {args.images} "
                          f"--rounds {args.rounds}")
    with open(RESULTS, "w") as f:
        json.dump(result, f, indent=1)
    for row in result["rows"]:
        print(row["precision"], row["backend"], row["decode_threads"], row["engine_threads"], row["batch"],
              [round(r) for r in row["images_per_s"]])


if __name__ == "__main__":
    main()
