"""`fasttl run --budget` over data shapes x budgets, beside today's defaults on the same data: accuracy,
balanced accuracy, wall time and what the plan chose (every choice on validation; the test split is
scored once per run). Each run starts with an empty feature cache (a first run on new data: the
ONNX graphs exported, every image extracted); the per-machine speed record is kept between runs,
as it is for a user.

    python benchmarks/budget_table.py --data ../shared/data/cifar10 [--shapes few-shot-5x40 ...]
        [--budgets 1m 3m 10m]

Shapes: few-shot-5x40 (bird, cat, deer, dog, frog: 40 training images each), 10x100, long-tail-100
(200 down to 2 training images a class), 200-per-class (the test split: 200 a class for these), full
(all of CIFAR-10, its whole test split). Rows are merged into benchmarks/results/budget-table.json."""
import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results", "budget-table.json")
sys.path.insert(0, HERE)
from long_tail import long_tailed_copy  # noqa: E402
from record_run import machine_name, write_results  # noqa: E402

HARD = ["bird", "cat", "deer", "dog", "frog"]


def class_subset(data: str, out: str, classes, train: int, test: int, seed: int = 0) -> str:
    """Class folders under `out`: `train` seeded training images and the first `test` test images a class."""
    rng = np.random.default_rng(seed)
    for name in classes:
        for split, count in (("train", train), ("test", test)):
            files = sorted(os.listdir(os.path.join(data, split, name)))
            chosen = sorted(rng.choice(len(files), size=count, replace=False)) if split == "train" else range(count)
            os.makedirs(os.path.join(out, split, name))
            for i in chosen:
                shutil.copy(os.path.join(data, split, name, files[i]), os.path.join(out, split, name))
    return out


def shape_data(shape: str, data: str, tmp: str) -> str:
    classes = sorted(os.listdir(os.path.join(data, "train")))
    out = os.path.join(tmp, shape)
    if shape == "full":
        return data
    if shape == "few-shot-5x40":
        return class_subset(data, out, HARD, 40, 200)
    if shape == "10x100":
        return class_subset(data, out, classes, 100, 200)
    if shape == "200-per-class":
        return class_subset(data, out, classes, 200, 200)
    if shape == "long-tail-100":
        long_tailed_copy(data, out, 0, 200, 100.0, 200)
        return out
    raise SystemExit(f"unknown shape {shape!r}")


def run_one(data: str, budget, tmp: str) -> dict:
    """One `fasttl run` in a fresh process and an empty feature cache: its metrics, or its error."""
    out = os.path.join(tmp, f"run-{time.time_ns()}")
    cache = os.path.join(tmp, "cache")
    shutil.rmtree(cache, ignore_errors=True)
    command = [sys.executable, "-m", "fasttl", "run", "--data", data, "--compare", "none", "--out", out,
               "--no-progress"] + (["--budget", budget] if budget else [])
    started = time.perf_counter()
    done = subprocess.run(command, env=dict(os.environ, FASTTL_CACHE_DIR=cache), capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        return {"budget": budget, "error": done.stderr.strip().splitlines()[-1], "wall_s": round(wall, 1)}
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    config = json.load(open(os.path.join(out, "config.json")))
    plan = metrics["notes"].get("plan")
    row = {"budget": budget, "accuracy": metrics["accuracy"], "balanced_accuracy": metrics["balanced_accuracy"],
           "wall_s": round(wall, 1), "chosen": {k: config[k] for k in ("backbone", "image_size", "mirror_views",
                                                                         "strategy", "extract_precision")}}
    choice = metrics["notes"].get("choice") or {}
    row["head_setting"] = {k: choice[k] for k in ("weight_decay", "shrinkage", "solver", "parts") if k in choice}
    if plan:
        row.update(planned_s=plan["planned_s"], screen_s=plan["screen_s"], candidates=len(plan["candidates"]),
                   chosen_score=plan["chosen"]["score"], scored_by=plan["chosen"]["scored_by"],
                   screened=[{k: c[k] for k in ("backbone", "image_size", "mirror_views", "head", "score",
                                                "planned_s", "precision")} for c in plan["candidates"]])
    shutil.rmtree(out, ignore_errors=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--shapes", nargs="+", default=["few-shot-5x40", "10x100", "long-tail-100", "200-per-class",
                                                        "full"])
    parser.add_argument("--budgets", nargs="+", default=["1m", "3m", "10m"])
    parser.add_argument("--no-default", action="store_true", help="skip the run at today's defaults")
    args = parser.parse_args()
    previous = json.load(open(RESULTS))["rows"] if os.path.exists(RESULTS) else []
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for shape in args.shapes:
            data = shape_data(shape, os.path.abspath(args.data), tmp)
            for budget in ([] if args.no_default else [None]) + args.budgets:
                row = dict(run_one(data, budget, tmp), shape=shape)
                print(json.dumps(row), flush=True)
                rows.append(row)
    done = {(r["shape"], r["budget"]) for r in rows}
    record = {"rows": [r for r in previous if (r["shape"], r["budget"]) not in done] + rows,
              "machine": machine_name(), "date": datetime.date.today().isoformat(),
              "command": "python benchmarks/budget_table.py " + " ".join(sys.argv[1:])}
    write_results(RESULTS, record)


if __name__ == "__main__":
    main()
