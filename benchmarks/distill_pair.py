"""Issue 14's measurement: a distilled student against its from-scratch twin on the same test
images, as a paired accuracy difference with its standard error (fasttl.bench.e2e.paired_difference).

    python benchmarks/distill_pair.py STUDENT_RUN [TWIN_RUN] --name NAME --command "fasttl run ..."

STUDENT_RUN is a finished `--strategy distill` run; the twin is its own `--compare scratch` model,
or the `scratch` model of TWIN_RUN (a run on the same data and seed). Both are rebuilt from their
saved weights and scored on the run's test split; the row is merged into
benchmarks/results/distill-student.json (make_results.py renders it)."""
import argparse
import datetime
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results", "distill-student.json")
sys.path.insert(0, HERE)
from record_run import machine_name  # noqa: E402


def correct(run_dir: str, name: str, test) -> list:
    from fasttl.transfer import registry

    model = registry.get(name).load(run_dir, torch.device("cpu"))
    logits, labels = model.logits(test)
    return (logits.argmax(1) == labels).tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("student_run")
    parser.add_argument("twin_run", nargs="?")
    parser.add_argument("--name", required=True)
    parser.add_argument("--command", required=True)
    args = parser.parse_args()
    from fasttl.bench.e2e import paired_difference
    from fasttl.transfer.datasets import load_dataset
    from fasttl.transfer.rundir import read_config

    config = read_config(args.student_run)
    test = load_dataset(config["data"], config["seed"], config.get("train_per_class"),
                        config.get("test_per_class")).test
    student = correct(args.student_run, "distill", test)
    twin = correct(args.twin_run or args.student_run, "scratch", test)
    with open(os.path.join(args.student_run, "metrics.json")) as f:
        metrics = json.load(f)
    notes = metrics.get("notes", {})
    row = {"name": args.name, "command": args.command, "student_accuracy": sum(student) / len(student),
           "twin_accuracy": sum(twin) / len(twin), "test_images": len(student),
           "teacher_test_accuracy": notes.get("teacher_test_accuracy"),
           "teacher_train_accuracy": notes.get("teacher_train_accuracy"),
           "teacher_logits": notes.get("teacher_logits", "in-sample"),  # before --teacher-logits: in-sample
           "choice": {k: v for k, v in notes.get("choice", {}).items() if k != "validation"},
           "train_images": config.get("train_samples"), "epochs": config.get("epochs"),
           "paired": paired_difference(student, twin), "date": datetime.date.today().isoformat(),
           "machine": machine_name()}
    payload = {"rows": []}
    if os.path.exists(RESULTS):
        with open(RESULTS) as f:
            payload = json.load(f)
    payload["rows"] = [r for r in payload["rows"] if r["name"] != args.name] + [row]
    with open(RESULTS + ".tmp", "w") as f:
        json.dump(payload, f, indent=1)
    os.replace(RESULTS + ".tmp", RESULTS)
    paired = row["paired"]
    print(f"{args.name}: student {row['student_accuracy']:.4f} vs twin {row['twin_accuracy']:.4f}: "
          f"{100 * paired['difference']:+.2f} +- {100 * paired['standard_error']:.2f} points")


if __name__ == "__main__":
    main()
