"""`fasttl run`: resolve the data, run the strategy (and the from-scratch baseline beside it),
measure, and write the run directory."""
from __future__ import annotations

import glob
import os
import sys
import time
from typing import Dict, List

import torch
import torch.distributed as dist

from fasttl.transfer import report
from fasttl.transfer.config import RunConfig
from fasttl.transfer.datasets import EMBEDDED, load_dataset
from fasttl.transfer.metrics import classification_metrics
from fasttl.cache.build import sample_ids
from fasttl.transfer.rundir import write_config, write_metrics, write_predictions
from fasttl.transfer.strategies import RUNNERS, Outcome, scratch

DISPLAY = {"linear": "linear (feature transfer)", "mlp": "mlp (feature transfer)", "finetune": "finetune",
           "distill": "distill (student with teacher)", "dann": "dann", "scratch": "scratch (from random init)",
           "source_only": "source only (no adaptation)"}


def _init_distributed(cfg: RunConfig) -> bool:
    """Joins the torchrun process group (finetune only); True when this call created it."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if cfg.strategy != "finetune":
            raise ValueError(f"strategy: {cfg.strategy!r} runs in one process; only finetune runs under torchrun (DDP)")
        dist.init_process_group("nccl" if str(cfg.device).startswith("cuda") else "gloo")
        if str(cfg.device).startswith("cuda"):
            local_rank = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local_rank)
            cfg.device = f"cuda:{local_rank}"
        return True
    return False


def run(print_summary: bool = None, **options) -> Dict[str, object]:
    """Runs a transfer job; the same options as the `fasttl run` command (see RunConfig).
    Returns the metrics written to RUN_DIR/metrics.json. Prints a closing summary when
    `print_summary` (default: when progress bars are on)."""
    started = time.perf_counter()
    cfg = RunConfig(**options)
    if cfg.data in (None, EMBEDDED) and cfg.compare is None and "compare" not in options:
        cfg.compare = "scratch"  # the embedded default shows transfer beside its from-scratch baseline
    owns_process_group = _init_distributed(cfg)
    rank = dist.get_rank() if dist.is_initialized() else 0
    dataset = load_dataset(cfg.data, cfg.seed, cfg.train_per_class, cfg.test_per_class)
    cfg = cfg.resolved(dataset.native_size)
    torch.manual_seed(cfg.seed)
    run_dir = os.path.abspath(os.path.expanduser(cfg.out or os.path.join("runs", f"{dataset.name}-{cfg.strategy}")))
    os.makedirs(run_dir, exist_ok=True)
    if not cfg.resume and rank == 0:
        for stale in glob.glob(os.path.join(run_dir, "*.checkpoint.pt")):
            os.remove(stale)
    config = dict(cfg.as_dict(), data=cfg.data or EMBEDDED, dataset=dataset.name, classes=dataset.classes,
                  train_samples=len(dataset.train), test_samples=len(dataset.test), native_size=dataset.native_size,
                  run_dir=run_dir, command=" ".join(sys.argv) if sys.argv and "fasttl" in sys.argv[0] else None)
    if rank == 0:
        write_config(run_dir, config)
    if cfg.progress and rank == 0:
        print(f"fasttl run: {cfg.strategy} on {dataset.name} ({len(dataset.train)} train / {len(dataset.test)} test "
              f"images, {len(dataset.classes)} classes), backbone {cfg.backbone} at {cfg.image_size} px -> {run_dir}",
              flush=True)
    outcomes: List[Outcome] = RUNNERS[cfg.strategy](cfg, dataset, run_dir)
    if cfg.compare == "scratch" and cfg.strategy != "scratch":
        outcomes += scratch(cfg, dataset, run_dir)
    if owns_process_group:
        dist.barrier()
        dist.destroy_process_group()
    if rank != 0:
        return {}
    results = {}
    for outcome in outcomes:
        metrics = classification_metrics(outcome.logits, outcome.labels, dataset.classes)
        results[outcome.name] = {"metrics": metrics, "timings": outcome.timings, "history": outcome.history,
                                 "weights": os.path.basename(outcome.weights), "notes": outcome.notes}
    main = outcomes[0].name
    payload = dict(results[main]["metrics"], timings=dict(results[main]["timings"],
                                                          total_s=time.perf_counter() - started),
                   strategy=cfg.strategy, history=results[main]["history"], notes=results[main]["notes"],
                   compare={name: {"accuracy": r["metrics"]["accuracy"], "macro_f1": r["metrics"]["macro_f1"],
                                   "loss": r["metrics"]["loss"], "per_class_recall": r["metrics"]["per_class_recall"],
                                   "per_class_precision": r["metrics"]["per_class_precision"],
                                   "confusion_matrix": r["metrics"]["confusion_matrix"], "timings": r["timings"],
                                   "history": r["history"], "notes": r["notes"]}
                            for name, r in results.items() if name != main})
    write_metrics(run_dir, payload)
    write_predictions(run_dir, outcomes[0].logits, outcomes[0].labels, dataset.classes,
                      outcomes[0].samples or sample_ids(dataset.test))
    report.plot_confusion_matrix(results[main]["metrics"], os.path.join(run_dir, "confusion_matrix.png"),
                                 DISPLAY.get(main, main))
    report.plot_curves({DISPLAY.get(n, n): r["history"] for n, r in results.items()},
                       os.path.join(run_dir, "curves.png"))
    line = (f"Data: {dataset.name}, {len(dataset.train)} training and {len(dataset.test)} test images, "
            f"{len(dataset.classes)} classes" + (f"; evaluated on the target domain {cfg.target_data}"
                                                 if cfg.strategy == "dann" else "") + ".")
    report.write_report(run_dir, config, {DISPLAY.get(n, n): r for n, r in results.items()}, line, DISPLAY[main])
    if cfg.progress if print_summary is None else print_summary:
        print(summary(run_dir, results, main, dataset.name))
    return payload


def summary(run_dir: str, results: Dict[str, dict], main: str, dataset: str) -> str:
    lines = ["", f"{'model':<34} {'accuracy':>9} {'macro F1':>9} {'train s':>8}"]
    for name, r in results.items():
        lines.append(f"{DISPLAY.get(name, name):<34} {r['metrics']['accuracy']:>9.4f} {r['metrics']['macro_f1']:>9.4f} "
                     f"{r['timings'].get('train_s', 0):>8.1f}")
    lines += ["", f"run directory: {run_dir}  (report.md, metrics.json, confusion_matrix.png, curves.png, "
                      "predictions.csv, weights)"]
    if dataset == EMBEDDED:
        lines += ["", "That was the embedded default: scikit-learn's 8x8 digits through an ImageNet EfficientNet-Lite0.",
                  "Next:",
                  "  fasttl run --data cifar10 --compare scratch          # CIFAR-10 from $FASTTL_DATA (~/.cache/fasttl/data)",
                  "  fasttl run --data path/to/folder --strategy finetune # your own class folders (train/ and test/ used "
                  "when present)",
                  "  fasttl run --help                                    # strategies: linear mlp finetune distill dann "
                  "scratch"]
    return "\n".join(lines)
