"""Few-shot 5x40 (bird, cat, deer, dog, frog: 40 training images a class) over several draws of the
training images: `fasttl run --budget` beside today's defaults on each draw, scored on every test
image of those classes (1,000 a class), so that the difference is a mean with its standard error
rather than one draw's on 200 test images a class (about 1.4 points of error each).

    python benchmarks/few_shot_budget.py --data ../shared/data/cifar10 [--draws 0 1 2 3 4] [--budget 3m]
        [--test-per-class 1000]

Each run as in budget_table.py: a fresh process, an empty feature cache. Every choice is made on the
training images (the plan's cross-validated probe; the defaults' own validation); the test split is
scored once per run. Rows go to benchmarks/results/few-shot-budget-<budget>.json, replacing those of
the same draws (a draw measured again, e.g. one disturbed by another job, keeps the others)."""
import argparse
import datetime
import json
import os
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results", "few-shot-budget-{budget}.json")  # one record a budget
sys.path.insert(0, HERE)
from budget_table import HARD, class_subset, run_one  # noqa: E402
from record_run import machine_name, write_results  # noqa: E402


def paired(rows) -> dict:
    """Mean budget-minus-default difference (points) over the draws, with its standard error."""
    gains = np.array([100 * (r["budget"]["accuracy"] - r["default"]["accuracy"]) for r in rows])
    error = gains.std(ddof=1) / np.sqrt(len(gains)) if len(gains) > 1 else float("nan")
    return {"mean_gain_points": round(float(gains.mean()), 2), "standard_error": round(float(error), 2),
            "draws": len(gains)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--draws", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="the draws' seeds")
    parser.add_argument("--budget", default="3m")
    parser.add_argument("--train-per-class", type=int, default=40)
    parser.add_argument("--test-per-class", type=int, default=1000)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for draw in args.draws:
            data = class_subset(os.path.abspath(args.data), os.path.join(tmp, f"draw{draw}"), HARD,
                                args.train_per_class, args.test_per_class, seed=draw)
            row = {"draw": draw, "default": run_one(data, None, tmp), "budget": run_one(data, args.budget, tmp),
                   "command": "python benchmarks/few_shot_budget.py " + " ".join(sys.argv[1:])}
            print(json.dumps(row), flush=True)
            rows.append(row)
    results = RESULTS.format(budget=args.budget)
    previous = json.load(open(results))["rows"] if os.path.exists(results) else []
    rows = sorted([r for r in previous if r["draw"] not in args.draws] + rows, key=lambda r: r["draw"])
    write_results(results, {"rows": rows, "summary": paired(rows), "budget": args.budget,
                            "train_per_class": args.train_per_class, "test_per_class": args.test_per_class,
                            "machine": machine_name(), "date": datetime.date.today().isoformat(),
                            "command": "python benchmarks/few_shot_budget.py " + " ".join(sys.argv[1:])})


if __name__ == "__main__":
    main()
