"""Keeps the measured result of a `fasttl run` for RESULTS.md: reads RUN_DIR/metrics.json and
config.json and writes benchmarks/results/runs/NAME.json with the command that produced it.

    python benchmarks/record_run.py runs/cifar10-linear --name cifar10-linear-128 \\
        --command "fasttl run --data cifar10 --image-size 128"
"""
import argparse
import datetime
import json
import os
import platform

HERE = os.path.dirname(os.path.abspath(__file__))


def machine_name() -> str:
    """The CPU model and core count, as every results table names the machine."""
    cpu = platform.processor()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores"


def write_results(path: str, record: dict) -> None:
    """A benchmark's JSON record at `path` (benchmarks/results/, which make_results.py renders)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(record, f, indent=1)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir")
    parser.add_argument("--name", required=True)
    parser.add_argument("--command", required=True)
    parser.add_argument("--goal", default="")
    args = parser.parse_args()
    with open(os.path.join(args.run_dir, "metrics.json")) as f:
        metrics = json.load(f)
    with open(os.path.join(args.run_dir, "config.json")) as f:
        config = json.load(f)
    models = {metrics["strategy"]: metrics} if metrics["strategy"] != "dann" else {"dann": metrics}
    models.update(metrics.get("compare", {}))
    record = {
        "name": args.name, "command": args.command, "goal": args.goal,
        "date": datetime.date.today().isoformat(), "machine": machine_name(),
        "dataset": config["dataset"], "train_samples": config["train_samples"], "test_samples": config["test_samples"],
        "backbone": config["backbone"], "image_size": config["image_size"], "epochs": config["epochs"],
        "device": config["device"],
        "models": {name: {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"],
                          "timings": {k: v for k, v in m.get("timings", {}).items() if k.endswith("_s")},
                          "notes": m.get("notes", {})} for name, m in models.items()},
    }
    os.makedirs(os.path.join(HERE, "results", "runs"), exist_ok=True)
    path = os.path.join(HERE, "results", "runs", f"{args.name}.json")
    with open(path, "w") as f:
        json.dump(record, f, indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
