"""`fasttl eval RUN_DIR --data DIR`: re-evaluates a saved run on (new) data."""
from __future__ import annotations

import errno
import os
from typing import Dict

import torch

from fasttl.util.checks import a_flag, folder_path, torch_device
from fasttl.util.errors import OptionError, UserError
from fasttl.util.files import write_json_atomic
from fasttl.util.outputs import within
from fasttl.data import DataError, screen
from fasttl.data.labels import class_difference
from fasttl.data.sources import ON_ERROR, disk_keys
from fasttl.data.formats.filelist import is_file_list
from fasttl.data.formats.webdataset import is_webdataset
from fasttl.transfer.caching import refuse_writes_among_images, refuse_writes_among_sources
from fasttl.transfer.datasets import NAMED, load_dataset, load_held_out
from fasttl.transfer import trained_images
from fasttl.transfer.metrics import classification_metrics
from fasttl.transfer.rundir import RunError, finite_logits, load_trained, read_config, strict_json


# Why eval_metrics.json may not be writable while the run is readable (a shared or read-only run).
_CANNOT_WRITE = (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT)


@torch.no_grad()
def evaluate_run(run_dir: str, data: str = None, progress: bool = True, device: str = "cpu",
                 on_error: str = "fail") -> Dict[str, object]:
    """Metrics of the run's main model on the test split of `data` (default: the run's own data, split
    as the run split it; other data: its test/, or all its images: datasets.load_held_out);
    written to RUN_DIR/eval_metrics.json. The model is rebuilt by its strategy's `load`. With
    on_error="skip", images that do not decode are left out and listed under "skipped"; what the
    scan of the data folder passed over is listed under "ignored"."""
    run_dir = folder_path("run_dir", run_dir, OptionError, "the run folder")
    a_flag("progress", progress, OptionError)
    if data is not None:
        data = folder_path("data", data, OptionError, "the data")
    device = torch_device(device)
    if not isinstance(on_error, str) or on_error not in ON_ERROR:
        raise OptionError(f"on_error: expected one of {', '.join(ON_ERROR)}, got {on_error!r}")
    state = _run_state(run_dir)
    cfg = read_config(run_dir)
    if data is not None and _is_own_data(data, cfg):
        data = None  # the run's own data, split as the run split it (never re-carved, never changed)
    own = own_data(cfg)
    # (the run's own data is read too, against --data: its training images are never scored)
    refuse_writes_among_images([("data", folder) for folder in (data, own) if folder is not None])
    if data is None:
        dataset = own_dataset(cfg)
        # changed since the run (training images moved into test/?): its record says which it trained on
        if dataset.identity() != (cfg.get("identity") or {}).get("data_identity"):
            _refuse_recorded(run_dir, cfg, dataset.test, f"{own}: its test split", "moved there since the run? "
                             "evaluate on images the run never trained on (with --data)")
    else:  # another data set: its classes are compared with the run's below
        dataset = _load_other(data, cfg, run_dir)
    if data is not None:  # a carved split, or a test/ folder that links to or hard-links them
        _refuse_recorded(run_dir, cfg, dataset.test, f"{data}: its test split", "the run's own data named another "
                         "way, copied or moved: evaluate without --data, or on images the run never trained on")
        _refuse_training_images(data, dataset.test, cfg)
    refuse_writes_among_sources([dataset.test])  # a list's images may lie far from the list
    test = screen(dataset.test, on_error) if on_error == "skip" else dataset.test  # the train split goes unread
    if dataset.classes != cfg["classes"] and sorted(dataset.classes) == sorted(cfg["classes"]):
        test = _in_run_order(test, cfg["classes"])  # the same names in another order (class folders are sorted)
    elif dataset.classes != cfg["classes"]:
        differ = class_difference(dataset.classes, cfg["classes"], "the run")
        raise DataError(f"{data if data is not None else own}: {differ}; evaluate on data with the run's classes (the "
                        "same names), or train a run on this data")
    model = load_trained(run_dir, device)
    logits, labels = model.logits(test, progress=progress)
    finite_logits(run_dir, logits)
    metrics = classification_metrics(logits, labels, cfg["classes"])
    metrics["data"] = data if data is not None else cfg["data"]
    metrics["test_split"] = "carved" if dataset.carved else "given"  # carved: the seeded 20% fasttl split off
    metrics["skipped"] = [{"file": f, "reason": r} for f, r in getattr(test, "skipped", [])]
    metrics["ignored"] = [{"path": within(p, metrics["data"]), "reason": r} for p, r in dataset.ignored]  # as run's
    path = os.path.join(run_dir, "eval_metrics.json")
    if _run_state(run_dir) != state:
        raise RunError(f"{run_dir}: replaced while it was evaluated (a run with --overwrite, or a copy over it); "
                       "nothing written: evaluate it again")
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


def _run_state(run_dir: str) -> tuple:
    """Which run the folder holds now: its config and metrics files (each run writes both anew)."""
    state = []
    for name in ("config.json", "metrics.json"):
        try:
            info = os.stat(os.path.join(run_dir, name))
            state.append((info.st_ino, info.st_mtime_ns, info.st_size))
        except OSError:
            state.append(None)
    return tuple(state)


def own_data(cfg: dict) -> str:
    """What a run read, as it named it: a data set's name, else the absolute path it recorded (its
    "data" is as typed, maybe relative to the folder the run was started in)."""
    return cfg["data"] if cfg["data"] in NAMED else cfg.get("data_path") or cfg["data"]


def classes_file_of(cfg: dict):
    return cfg.get("classes_file_path") or cfg.get("classes_file")


def own_dataset(cfg: dict):
    """The data a run read, split as the run split it: screened with its --on-error before the
    80/20 split of a file list (or the split would move training images into the test set), its
    per-class subsets, its classes file. A carved split whose data changed since is refused: it
    can't be rebuilt and would score training images."""
    own = own_data(cfg)
    dataset = _load_own(cfg)
    recorded = (cfg.get("identity") or {}).get("data_identity")
    if dataset.carved and recorded is not None and dataset.identity() != recorded:
        what = f"an image added, removed or rewritten, or {classes_file_of(cfg)} changed" if classes_file_of(cfg) \
            else "an image added, removed or rewritten"
        raise DataError(f"{own}: changed since the run ({what}), so the test split the run carved from it can't be "
                        "rebuilt and would score training images; restore the data, or evaluate on a separate test "
                        "set with --data")
    return dataset


def _load_own(cfg: dict):
    """The run's own data loaded as the run loaded it, whether or not it changed since."""
    own = own_data(cfg)
    listed = is_file_list(own) or is_webdataset(own)
    # The run's --on-error, as the run read it: a list is screened before it is cut, and the
    # identity of a carved folder is that of its screened images.
    dataset = load_dataset(own, cfg["seed"], train_per_class=cfg.get("train_per_class"),
                           test_per_class=cfg.get("test_per_class"), on_error=cfg.get("on_error", "fail"),
                           classes_file=classes_file_of(cfg) if listed else None,
                           labels=cfg.get("labels", "names") if listed else "names")
    return dataset


def _load_other(data: str, cfg: dict, run_dir: str):
    """Data other than the run's own, its labels read as the run read its own: a list against the
    run's recorded classes (not its classes file as it is now: edited, re-sorted or gone since)."""
    listed = is_file_list(data) or is_webdataset(data)
    try:
        return load_held_out(data, classes_file=cfg["classes"] if listed and classes_file_of(cfg) else None,
                             labels=cfg["labels"] if listed else "names")
    except DataError as exc:
        if listed and cfg["labels"] == "indices" and "is not an index" in str(exc):
            names = ", ".join(f"{i} {name}" for i, name in enumerate(cfg["classes"][:3]))
            raise DataError(f"{exc}; {run_dir} was trained with --labels indices, so eval reads the list's labels "
                            f"as indices into its classes too: label it 0..{len(cfg['classes']) - 1} ({names}"
                            f"{', ...' if len(cfg['classes']) > 3 else ''})") from None
        raise


def _refuse_recorded(run_dir: str, cfg: dict, test, what: str, fix: str) -> None:
    """The run's record of the images it trained on (trained_images), checked whatever became of
    its data since (moved, renamed, re-split, copied)."""
    recorded = trained_images.recorded(run_dir, cfg["train_samples"])
    shared = trained_images.shared_images(test, recorded) if recorded else []
    if shared:
        raise DataError(f"{what} holds {len(shared)} of the run's training images ({shared[0]}"
                        f"{', ...' if len(shared) > 1 else ''}); {fix}")


def _refuse_training_images(data: str, test, cfg: dict) -> None:
    """A test split fasttl cut from --data never holds an image the run trained on (its own data
    named another way: a hard link, another brace pattern of the same shards). Checked when the
    run's own data can still be read as the run read it."""
    changed = False
    try:
        trained = {key for key in disk_keys(own_dataset(cfg).train) if key is not None}
    except (UserError, OSError):
        try:  # changed since the run: which images it trained on can't be told, so none of them is scored
            own = _load_own(cfg)
        except (UserError, OSError):
            return  # gone or unreadable: nothing of it can be in --data
        trained = {key for split in (own.train, own.test) for key in disk_keys(split) if key is not None}
        changed = True
    shared = [test.name_of(i) for i, key in enumerate(disk_keys(test)) if key in trained]
    if shared and changed:
        raise DataError(f"{data}: its test split holds {len(shared)} images of the run's own data "
                        f"({shared[0]}{', ...' if len(shared) > 1 else ''}), which changed since the run, so which of "
                        "them it trained on can't be told; evaluate on images the run never read")
    if shared:
        raise DataError(f"{data}: its test split holds {len(shared)} of the run's training images "
                        f"({shared[0]}{', ...' if len(shared) > 1 else ''}); it is the run's own data named another "
                        "way: evaluate without --data, or on images the run never trained on")


def _is_own_data(data: str, cfg: dict) -> bool:
    """Whether --data names what the run read (the same name, or the same folder or file)."""
    own = own_data(cfg)
    if data in NAMED or own in NAMED:
        return data == own
    return os.path.realpath(os.path.expanduser(data)) == os.path.realpath(os.path.expanduser(own))


def _in_run_order(source, classes):
    """`source` with its labels renumbered to index `classes` (the same names, the run's order)."""
    import dataclasses

    import numpy as np

    index = [classes.index(name) for name in source.classes]
    labels = [index[int(label)] for label in source.labels]
    if isinstance(source.labels, np.ndarray):
        labels = np.asarray(labels, dtype=np.int64)
    return dataclasses.replace(source, labels=labels, classes=list(classes))
