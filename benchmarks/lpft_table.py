"""Issue 18's table: model transfer against its own linear probe over training-set size.

    python benchmarks/lpft_table.py SIZE [SIZE ...] [--image-size 96] [--data ../shared/data/cifar10]

SIZE: `5x40` (5 classes, 40 training images per class, 200 test per class) or `10xN` (all 10
CIFAR-10 classes, N training and 100 test images per class). For each size it runs, one after
the other, `fasttl run` with: linear (its defaults, multi-stage features), linear on the head
features (the probe LP-FT starts from), plain fine-tuning (`--finetune-from random --epochs 3`,
the old default), LP-FT at its defaults (its probe is `linear`'s, on the same cached features), and
LP-FT with `--regularize l2sp`, and LP-FT with only the top three stages unfrozen
(`--finetune-stages 3`); each run's wall time is the whole process, feature extraction
included (every size starts from an empty feature cache: the linear run builds it, the LP-FT runs
reuse it). Rows are merged into
benchmarks/results/lpft.json after every run; make_results.py renders them."""
import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from record_run import machine_name  # noqa: E402

RESULTS = os.path.join(HERE, "results", "lpft.json")
CLASSES5 = ("airplane", "automobile", "bird", "cat", "deer")
VARIANTS = (
    ("linear", ["--strategy", "linear"]),
    ("finetune, random head, 3 epochs (old default)", ["--strategy", "finetune", "--finetune-from", "random",
                                                       "--epochs", "3"]),
    ("LP-FT (default)", ["--strategy", "finetune"]),
    ("LP-FT + L2-SP", ["--strategy", "finetune", "--regularize", "l2sp"]),
    ("LP-FT, top 3 stages", ["--strategy", "finetune", "--finetune-stages", "3"]),
)


def five_class_folder(data: str, root: str) -> str:
    """root/{train,test}/<class> linked to the first five CIFAR-10 classes."""
    for split in ("train", "test"):
        os.makedirs(os.path.join(root, split), exist_ok=True)
        for name in CLASSES5:
            link = os.path.join(root, split, name)
            if not os.path.islink(link):
                os.symlink(os.path.abspath(os.path.join(data, split, name)), link)
    return root


def load() -> dict:
    if os.path.exists(RESULTS):
        with open(RESULTS) as f:
            return json.load(f)
    return {"rows": []}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sizes", nargs="+")
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--data", default=os.path.join(HERE, "..", "..", "shared", "data", "cifar10"))
    parser.add_argument("--only", default="", help="comma-separated variant numbers (0-based) to run")
    parser.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "fasttl-lpft"),
                        help="run folders and feature caches (kept: a later --only run reuses the size's cache)")
    args = parser.parse_args()
    work = args.work
    os.makedirs(work, exist_ok=True)
    only = {int(i) for i in args.only.split(",") if i}
    for size in args.sizes:
        classes, per_class = (int(v) for v in size.split("x"))
        data = five_class_folder(args.data, os.path.join(work, "c5")) if classes == 5 else os.path.abspath(args.data)
        test_per_class = 200 if classes == 5 else 100
        env = dict(os.environ, FASTTL_CACHE_DIR=os.path.join(work, f"cache-{size}"))
        for index, (name, options) in enumerate(VARIANTS):
            if only and index not in only:
                continue
            out = os.path.join(work, f"{size}-{index}")
            command = ["fasttl", "run", "--data", data, "--image-size", str(args.image_size), "--train-per-class",
                       str(per_class), "--test-per-class", str(test_per_class), "--compare", "none",
                       "--out", out, "--overwrite", "--no-progress", *options]
            started = time.perf_counter()
            subprocess.run([sys.executable, "-m", *command[0:1], *command[1:]], check=True, env=env)
            wall = time.perf_counter() - started
            with open(os.path.join(out, "metrics.json")) as f:
                metrics = json.load(f)
            choice = metrics.get("notes", {}).get("choice", {})
            shown = ["fasttl", "run", "--data", "cifar10" if classes == 10 else "CIFAR10_FIRST_5_CLASSES",
                     *command[4:command.index("--out")], *options]
            row = {"size": size, "classes": classes, "train_per_class": per_class, "test_per_class": test_per_class,
                   "variant": name, "command": " ".join(shown), "accuracy": metrics["accuracy"],
                   "macro_f1": metrics["macro_f1"], "wall_s": wall,
                   "timings": {k: v for k, v in metrics.get("timings", {}).items() if k.endswith("_s")},
                   "epochs_run": len(metrics.get("history", [])) if name.startswith(("LP-FT", "finetune")) else None,
                   "epoch_kept": choice.get("epoch_kept"), "lr_scale": choice.get("lr_scale"),
                   "val_accuracy": choice.get("val_accuracy"),
                   "probe_val_accuracy": (choice.get("probe") or {}).get("first_val_accuracy"),
                   "sweep": choice.get("sweep"), "outcome": choice.get("outcome"),
                   "image_size": args.image_size, "date": datetime.date.today().isoformat(), "machine": machine_name()}
            payload = load()
            payload["rows"] = [r for r in payload["rows"] if (r["size"], r["variant"], r.get("image_size")) !=
                               (size, name, args.image_size)] + [row]
            os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
            with open(RESULTS + ".tmp", "w") as f:
                json.dump(payload, f, indent=1)
            os.replace(RESULTS + ".tmp", RESULTS)
            print(f"{size} {name}: accuracy {metrics['accuracy']:.4f}, wall {wall:.1f} s, epoch kept "
                  f"{row['epoch_kept']}", flush=True)


if __name__ == "__main__":
    main()
