"""`fasttl eval RUN_DIR --data DIR`: re-evaluates a saved run on (new) data."""
from __future__ import annotations

import errno
import os
from typing import Dict

import torch

from fasttl.util.files import write_json_atomic
from fasttl.data import DataError, screen
from fasttl.data.formats.filelist import is_file_list
from fasttl.data.formats.webdataset import is_webdataset
from fasttl.transfer.datasets import load_dataset
from fasttl.transfer.metrics import classification_metrics
from fasttl.transfer.rundir import finite_logits, load_trained, read_config, strict_json


# Why eval_metrics.json may not be writable while the run is readable (a shared or read-only run).
_CANNOT_WRITE = (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT)


@torch.no_grad()
def evaluate_run(run_dir: str, data: str = None, progress: bool = True, device: str = "cpu",
                 on_error: str = "fail") -> Dict[str, object]:
    """Metrics of the run's main model on the test split of `data` (default: the run's own data);
    written to RUN_DIR/eval_metrics.json. The model is rebuilt by its strategy's `load`. With
    on_error="skip", images that do not decode are left out and listed under "skipped"."""
    cfg = read_config(run_dir)
    # A run's own data by the absolute path it recorded (its "data" is as typed, maybe relative to
    # the folder the run was started in).
    own = cfg.get("data_path") or cfg["data"]
    # The run's own data is split as the run split it: a file list screened with the run's policy
    # before its 80/20 split, or the split would move training images into the test set.
    own_split = dict(train_per_class=cfg.get("train_per_class"), test_per_class=cfg.get("test_per_class"),
                     on_error=cfg.get("on_error", "fail")) if data is None else dict(on_error="fail")
    # The run's classes file names the classes of a list or shards; class folders name their own,
    # compared with the run's below.
    listed = data is None or is_file_list(data) or is_webdataset(data)
    dataset = load_dataset(data if data is not None else own, cfg["seed"], **own_split,
                           classes_file=(cfg.get("classes_file_path") or cfg.get("classes_file")) if listed else None,
                           labels=cfg.get("labels", "names") if listed else "names")
    recorded = (cfg.get("identity") or {}).get("data_identity")
    if data is None and dataset.carved and recorded is not None and dataset.identity() != recorded:
        classes_file = cfg.get("classes_file_path") or cfg.get("classes_file")
        what = f"an image added, removed or rewritten, or {classes_file} changed" if classes_file else \
            "an image added, removed or rewritten"
        raise DataError(f"{own}: changed since the run ({what}), so the test split the run carved from it can't be "
                        "rebuilt and would score training images; restore the data, or evaluate on a separate test "
                        "set with --data")
    test = screen(dataset.test, on_error) if on_error == "skip" else dataset.test  # the train split goes unread
    if dataset.classes != cfg["classes"]:
        raise DataError(f"{data if data is not None else own}: {_class_difference(dataset.classes, cfg['classes'])}; "
                        "evaluate on data with the run's classes (same names, same order), or train a run on this "
                        "data")
    model = load_trained(run_dir, torch.device(device))
    logits, labels = model.logits(test, progress=progress)
    finite_logits(run_dir, logits)
    metrics = classification_metrics(logits, labels, cfg["classes"])
    metrics["data"] = data if data is not None else cfg["data"]
    metrics["test_split"] = "carved" if dataset.carved else "given"  # carved: the seeded 20% fasttl split off
    metrics["skipped"] = [{"file": f, "reason": r} for f, r in getattr(test, "skipped", [])]
    path = os.path.join(run_dir, "eval_metrics.json")
    try:
        write_json_atomic(path, strict_json(metrics))
        written = path
    except OSError as exc:
        if exc.errno not in _CANNOT_WRITE:
            raise
        written = None  # a run on read-only storage still evaluates: the caller shows the metrics
        metrics["not_written"] = f"{path}: {os.strerror(exc.errno).lower()}"
    metrics["written"] = written
    return metrics


def _class_difference(found, trained) -> str:
    """The first difference between two class lists, short enough for one line."""
    if len(found) != len(trained):
        return f"has {len(found)} classes, the run was trained for {len(trained)}"
    i = next(i for i, (a, b) in enumerate(zip(found, trained)) if a != b)
    return f"class {i} is {found[i][:60]!r}, the run was trained with {trained[i][:60]!r} there"
