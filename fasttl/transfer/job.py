"""`fasttl run`: resolve the data, run the strategy (and the from-scratch baseline beside it),
measure, and write the run directory."""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import itertools
import os
import secrets
import sys
import time
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from fasttl.transfer import report
from fasttl.util.errors import OptionError
from fasttl.transfer.caching import (refuse_settings_in_run_folders, refuse_writes_among_images,
                                     refuse_writes_among_sources, run_calibration)
from fasttl.util import distributed
from fasttl.util.checks import is_utf8
from fasttl.transfer.common import check_weights
from fasttl.transfer.config import RunConfig
from fasttl.transfer.datasets import EMBEDDED, fewer_than_asked, load_dataset
from fasttl.transfer.metrics import classification_metrics
from fasttl.util import files
from fasttl.util.path_problems import unreachable
from fasttl.util.files import enclosing_run_folder, is_inside, write_atomic
from fasttl.cache.folder import refuse_inside
from fasttl.transfer import budget, planner, trained_images
from fasttl.transfer.rundir import (HISTORY, MARKER, TENSORBOARD, RunError, RunLock, clear_results, event_files,
                                    has_checkpoints, holds_run, is_finished, mark_run, own_entries, read_config,
                                    refuse_blocked, refuse_leftovers, run_files, unfinished_leftovers, write_config,
                                    write_metrics, write_predictions)
from fasttl.transfer import registry
from fasttl.util.outputs import counted, csv_cell, markdown_cell, passed_over, terminal_lines, terminal_text, within
from fasttl.transfer.registry import Outcome
from fasttl.transfer.identity import absolute_path, key as identity_key, reads, resumed_identity, run_identity, \
    trained


def _init_distributed(cfg: RunConfig) -> bool:
    """Joins the torchrun process group (finetune only); True when this call created it."""
    if not distributed.launched_by_torchrun() or dist.is_initialized():
        return False
    if not registry.get(cfg.strategy).distributed:
        ready = ", ".join(n for n in registry.names() if registry.get(n).distributed)
        raise OptionError(f"strategy: {cfg.strategy!r} runs in one process; under torchrun (DDP) only {ready}")
    device, created = distributed.join(cfg.device)
    if device.type == "cuda":
        cfg.device = str(device)
    return created


def _default_run_dir(base: str, reuse: bool) -> str:
    """runs/<data>-<strategy>, or -2, -3, ... when it already holds a run: a default folder is
    never replaced; --resume and --overwrite take the latest of the series."""
    series = [base] + [f"{base}-{i}" for i in range(2, 10_000)]
    taken = [d for d in itertools.takewhile(holds_run, series)]
    if reuse:
        return taken[-1] if taken else base
    return series[len(taken)]


def choose_run_dir(cfg: RunConfig, dataset_name: str) -> str:
    if cfg.out is not None:
        out = files.absolute(cfg.out)
        holder = enclosing_run_folder(os.path.dirname(out))
        if holder is not None:  # a run folder holds its own run's files, never another run
            raise RunError(f"out: {out} is inside the fasttl run folder {holder}; give a folder outside it")
        refuse_inside("out", out)
        return out
    run_dir = _default_run_dir(os.path.abspath(os.path.join("runs", f"{dataset_name}-{cfg.strategy}")),
                               cfg.resume or cfg.overwrite)
    refuse_inside("out", run_dir)  # runs/ made where one stands: not in a cache folder either
    return run_dir


def prepare_run_dir(run_dir: str, cfg: RunConfig, identity: Dict[str, object]) -> Dict[str, object]:
    """Refuses to mix two runs in one folder: a finished run needs --overwrite, an unfinished one
    --resume (with the same options and data) or --overwrite; a folder of other files is left alone.
    Returns config.json's identity, run_key and run_token: a resumed run keeps its interrupted
    run's (the key its checkpoints carry; the token, drawn once per run, that tells its TensorBoard
    curves from those of a run with the same settings in another folder)."""
    recorded = {"identity": identity, "run_key": identity_key(identity), "run_token": secrets.token_hex(16)}
    refuse_blocked(run_dir)
    cleared = None
    for name in (*run_files(), *own_entries()):  # found now, not when the results are written after training
        path = os.path.join(run_dir, name)
        if os.path.lexists(path) and not os.path.isfile(path) and not os.path.islink(path):
            raise RunError(f"out: {path} is not a plain file (a folder, a pipe?); move it away: fasttl writes its own "
                           f"{name} there")
    if holds_run(run_dir):
        if cfg.resume:
            if is_finished(run_dir):  # --resume is for an interrupted run; a finished one is replaced on purpose
                raise RunError(f"resume: {run_dir} holds a finished run: nothing to resume (pass --overwrite instead "
                               "of --resume to train it again, or another --out)")
            earlier = read_config(run_dir)
            recorded = {"identity": resumed_identity(run_dir, cfg, identity, earlier.get("identity", {})),
                        "run_key": earlier.get("run_key"),  # a run from before run tokens gets one now
                        "run_token": earlier.get("run_token") or recorded["run_token"]}
        elif cfg.overwrite:
            cleared = clear_results(run_dir)
        elif is_finished(run_dir):
            raise RunError(f"out: {run_dir} holds a finished run; pass --overwrite to replace it, or another --out")
        elif has_checkpoints(run_dir):
            raise RunError(f"out: {run_dir} holds an unfinished run; pass --resume to continue it, or --overwrite "
                           "to start over")
        else:
            refuse_leftovers(run_dir)  # trained weights, a report, a config.json not its own: never cleared unasked
            cleared = clear_results(run_dir)  # a run that stopped before its first epoch: nothing to resume or lose
    else:
        _refuse_foreign(run_dir)
        if cfg.resume:  # an auto-resuming job's first start; or a typo of the interrupted run's folder: said
            print(terminal_text(f"fasttl run: --resume: {run_dir} holds no run to resume (a new or empty folder); a "
                                "new run starts there (an interrupted run is resumed by its own --out)"),
                  file=sys.stderr, flush=True)
    os.makedirs(run_dir, exist_ok=True)
    mark_run(run_dir, keep_records=cleared is None)  # cleared: the records of its files go with them
    return recorded


def _refuse_taken_out(cfg: RunConfig) -> None:
    """What prepare_run_dir would refuse of a given --out, said before any work."""
    if cfg.out is None:
        return
    run_dir = choose_run_dir(cfg, "")  # --out itself, refused inside another run folder
    refuse_blocked(run_dir)  # (a --budget run screens for minutes before it makes --out)
    if not holds_run(run_dir):
        _refuse_foreign(run_dir)
    elif not cfg.overwrite and is_finished(run_dir):
        raise RunError(f"out: {run_dir} holds a finished run; pass --overwrite to replace it, or another --out")
    elif not cfg.overwrite and (has_checkpoints(run_dir) or unfinished_leftovers(run_dir)):
        raise RunError(f"out: {run_dir} holds an unfinished run; pass --overwrite to start over (a planned run "
                       "does not resume)")


def _refuse_foreign(run_dir: str) -> None:
    """A folder of someone else's files is never written into (not even a lock file)."""
    if not os.path.isdir(run_dir) or holds_run(run_dir):
        return
    marked = files.run_marker_state(run_dir)[0] != "absent"  # but no run's record (holds_run): the user's
    if set(os.listdir(run_dir)) - set(own_entries()) or marked:
        yours = f"; its {MARKER} is not fasttl's record: a file of yours?" if marked else ""
        raise RunError(f"out: {run_dir} is not empty and holds no fasttl run (fasttl marks its run folders with "
                       f"{MARKER}{yours}); pass an empty or new folder as --out")


def preflight(cfg: RunConfig) -> None:
    """What can be checked before any work beyond each option's own check (the device's among
    them, in the config): the files named exist."""
    check_weights(cfg)
    for name in ("teacher", "target_data"):
        paths = getattr(cfg, name)
        for path in [paths] if isinstance(paths, str) else paths or []:
            if not os.path.isdir(os.path.expanduser(path)):
                where = files.absolute(path)
                raise OptionError(f"{name}: {where} {unreachable(where) or 'is not a folder'}")
            if cfg.out is not None and \
                    os.path.realpath(os.path.expanduser(path)) == os.path.realpath(os.path.expanduser(cfg.out)):
                raise OptionError(f"out: --out {cfg.out} is the --{name.replace('_', '-')} folder itself; the run "
                                  f"would replace what it learns from (give another --out)")
    _refuse_writes_among_images(cfg)
    refuse_settings_in_run_folders(cfg.out, cfg.tensorboard)
    for name in trained(cfg):
        registry.get(name).preflight(cfg)
    if cfg.tensorboard is not None:
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401  (needs the tensorboard package)
        except ImportError:
            raise OptionError("tensorboard: --tensorboard needs the tensorboard package; install it with pip install "
                              "'fasttl[tensorboard]', or drop --tensorboard") from None
        if isinstance(cfg.tensorboard, str) and os.path.lexists(os.path.expanduser(cfg.tensorboard)) \
                and not os.path.isdir(os.path.expanduser(cfg.tensorboard)):
            raise OptionError(f"tensorboard: {files.absolute(cfg.tensorboard)} is not a folder")


def _refuse_writes_among_images(cfg: RunConfig, sources=None) -> None:
    """The run's caches, records and --tensorboard DIR never go among its data's images: the data
    options' folders first, then (`sources`) every folder holding one of the images read."""
    also = [("--tensorboard", os.path.expanduser(cfg.tensorboard), "give --tensorboard")] \
        if isinstance(cfg.tensorboard, str) else []
    if sources is not None:  # a run folder may lie among them (scans pass over it): not refused
        refuse_writes_among_sources(sources, also)
        return
    targets = [cfg.target_data] if isinstance(cfg.target_data, str) else list(cfg.target_data or [])
    refuse_writes_among_images([("data", cfg.data), *(("target_data", p) for p in targets)], also)


def write_skipped(run_dir: str, skipped) -> None:
    """skipped.csv: each image left out by --on-error skip, with the reason."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["file", "reason"])
    writer.writerows([csv_cell(path), csv_cell(reason)] for path, reason in skipped)
    write_atomic(os.path.join(run_dir, "skipped.csv"), buffer.getvalue().encode())


def run(print_summary=None, **options) -> Dict[str, object]:
    """Runs a transfer job; the same options as the `fasttl run` command (see RunConfig).
    Returns the metrics written to RUN_DIR/metrics.json. Prints a closing summary when
    `print_summary` (default: when progress bars are on); a callable prints it, given the summary's
    text and the run folder, written by then."""
    started = time.perf_counter()
    if isinstance(options.get("device"), torch.device):  # recorded in config.json as its text
        options["device"] = str(options["device"])
    if options.get("budget") is not None:  # a plan trains one model: no baseline beside unless asked
        options.setdefault("compare", "none")
    cfg = RunConfig(**options)
    owns_process_group = _init_distributed(cfg)
    rank, _ = distributed.rank_and_world()
    preflight(cfg.resolved(0))  # option errors first, before any data is read or any folder made
    if cfg.budget is not None:
        budget.check_budget_options(cfg, options)
        _refuse_taken_out(cfg)  # before the plan's minutes, not after them
    dataset = load_dataset(cfg.data, cfg.seed, cfg.train_per_class, cfg.test_per_class, on_error=cfg.on_error,
                           download=cfg.download, classes_file=cfg.classes_file, labels=cfg.labels)
    plan = None
    if cfg.budget is not None:
        choice, plan = planner.plan_run(cfg.resolved(dataset.native_size), options, dataset, started)
        cfg = dataclasses.replace(cfg, **choice)
    cfg = cfg.resolved(dataset.native_size, len(dataset.train) + len(dataset.test))
    torch.manual_seed(cfg.seed)
    run_dir = choose_run_dir(cfg, dataset.name)
    _refuse_writes_among_images(cfg, [dataset.train, dataset.test])  # the folders of the images read
    for name in trained(cfg):  # what the data tells a strategy to refuse, before its folder is made
        registry.get(name).check_data(cfg, dataset)
    tensorboard_dir(cfg, run_dir)  # a link where its events would go is refused before the folder is made
    identity = run_identity(cfg, dataset)
    config = dict(cfg.as_dict(), data=cfg.data or EMBEDDED, data_path=absolute_path(cfg.data),
                  classes_file_path=absolute_path(cfg.classes_file), dataset=dataset.name, classes=dataset.classes,
                  train_samples=len(dataset.train), test_samples=len(dataset.test), native_size=dataset.native_size,
                  skipped=len(dataset.skipped), run_dir=run_dir, weights_sha256=identity.get("weights_sha256"),
                  extract_calibration=run_calibration(cfg, dataset.train),
                  command=" ".join(sys.argv) if sys.argv and "fasttl" in sys.argv[0] else None)
    with contextlib.ExitStack() as held:
        if rank == 0:
            held.enter_context(_locked_run_dir(run_dir))
            if isinstance(cfg.tensorboard, str):  # DIR/<run name> is shared by runs of one name: one at a time
                board = tensorboard_dir(cfg, run_dir)
                os.makedirs(board, exist_ok=True)
                held.enter_context(files.FolderLock(board, TENSORBOARD_LOCK, "it writes TensorBoard curves of a run "
                                                    "of that name"))
            config.update(prepare_run_dir(run_dir, cfg, identity))
            write_config(run_dir, config)
            if isinstance(cfg.tensorboard, str):  # whose curves DIR/<run name> holds: a --resume adds to its own only
                write_atomic(os.path.join(board, TENSORBOARD_OWNER), config["run_token"].encode())
            trained_images.record(run_dir, dataset.train)
            if dataset.skipped:
                write_skipped(run_dir, dataset.skipped)
        return _train_and_write(cfg, dataset, run_dir, config, rank, owns_process_group, started, print_summary,
                                plan)


def _locked_run_dir(run_dir: str):
    """The run folder's lock, held for the run: the folder is made first only when it is new (an
    existing one is checked by prepare_run_dir, under the lock)."""
    refuse_blocked(run_dir)
    if not os.path.lexists(run_dir):
        os.makedirs(run_dir, exist_ok=True)
    _refuse_foreign(run_dir)
    return RunLock(run_dir)


def _train_and_write(cfg, dataset, run_dir: str, config: dict, rank: int, owns_process_group: bool, started: float,
                     print_summary, plan: Optional[dict] = None) -> Dict[str, object]:
    if world_size() > 1:
        dist.barrier()
    if cfg.progress and rank == 0:
        backbone = f", backbone {cfg.backbone} at {cfg.image_size} px" if reads(cfg, "backbone") else ""
        print(terminal_text(f"fasttl run: {cfg.strategy} on {dataset.name} ({len(dataset.train)} train / "
                            f"{len(dataset.test)} test images, {len(dataset.classes)} classes){backbone} -> {run_dir}"
                             + (f"; {counted(len(dataset.skipped), 'image')} left out (skipped.csv says why)"
                                if dataset.skipped else "")), flush=True)
    if dataset.ignored and rank == 0:  # said even without progress output (then on stderr): data went unread
        print(passed_over(dataset.ignored, cfg.data) + " (listed in metrics.json under \"ignored\")", flush=True,
              file=sys.stdout if cfg.progress else sys.stderr)
    short = fewer_than_asked(dataset, cfg.train_per_class, cfg.test_per_class) if rank == 0 else ""
    if short:  # (said even without progress output: the subset is not the one asked for)
        print(f"fasttl run: {short}", flush=True, file=sys.stdout if cfg.progress else sys.stderr)
    device = torch.device(cfg.device)
    board = tensorboard_dir(cfg, run_dir) if rank == 0 else None
    outcomes: List[Outcome] = registry.get(cfg.strategy).train(cfg, dataset, run_dir, device)
    if plan is not None:  # metrics.json and report.md say why this model (fasttl.transfer.planner)
        outcomes[0].notes["plan"] = plan
    if board:
        write_tensorboard(board, outcomes, dataset.classes)  # each model's curves as soon as it has trained
    if cfg.compare != "none" and cfg.compare != cfg.strategy:
        compared = registry.get(cfg.compare).train(cfg, dataset, run_dir, device)
        if board:
            write_tensorboard(board, compared, dataset.classes)
        outcomes += compared
    if owns_process_group:
        dist.barrier()
        dist.destroy_process_group()
    if rank != 0:
        return {}
    results = {outcome.name: _result(outcome, dataset.classes) for outcome in outcomes}
    if plan is not None:
        plan.update(wall_s=round(time.perf_counter() - started, 1))  # the report's figure; metrics' total_s is final
    payload = _write_results(run_dir, cfg, config, dataset, outcomes, results, time.perf_counter() - started)
    show = cfg.progress if print_summary is None else print_summary
    if show:
        text = terminal_lines(summary(run_dir, results, outcomes[0].name, dataset))
        if callable(show):
            show(text, run_dir)
        else:
            print(text)
    return payload


TENSORBOARD_LOCK = ".fasttl-tensorboard.lock"  # in DIR/<run name> while a run writes there (TensorBoard ignores it)
TENSORBOARD_OWNER = ".fasttl-tensorboard-run"  # in DIR/<run name>: the run_token of the run whose curves it holds


def tensorboard_dir(cfg: RunConfig, run_dir: str):
    """Where --tensorboard writes: DIR/<run folder name>, or RUN_DIR/tensorboard; None without it."""
    if cfg.tensorboard is None:
        return None
    own = cfg.tensorboard is True  # the run's own board: --overwrite clears it with the run
    board = os.path.join(run_dir, TENSORBOARD) if own else \
        os.path.join(files.absolute(cfg.tensorboard), os.path.basename(run_dir))
    if not is_utf8(board):  # TensorBoard's writer takes UTF-8 paths only: it would fail after training
        fix = "give the run an --out whose name is" if own else \
            "give --tensorboard a folder, and the run an --out, whose names are"
        raise OptionError(f"tensorboard: {ascii(board)} is not UTF-8 text, which TensorBoard's writer needs; {fix} "
                          "UTF-8")
    if not own:
        if is_inside(board, run_dir):  # fasttl's own files in --out would make it no run's folder
            where = "this run's --out folder itself" if os.path.realpath(board) == os.path.realpath(run_dir) else \
                f"inside this run's --out folder {run_dir}"
            raise OptionError(f"tensorboard: {board} is {where}; drop DIR (--tensorboard alone writes into "
                              f"{os.path.join(run_dir, TENSORBOARD)}), or give a folder outside it")
        other = enclosing_run_folder(board)
        if other is not None:
            raise OptionError(f"tensorboard: {board} is in the fasttl run folder {other}, which only its run writes "
                              "into; give another --tensorboard folder")
        refuse_inside("tensorboard", board)
    # A link where events go (the folder, or a model's folder in it) is refused now, not after training.
    models = sorted({name for s in trained(cfg) for name in (s, *registry.get(s).outputs)})
    for folder in [board] + [os.path.join(board, name) for name in models]:
        if os.path.islink(folder) or (os.path.lexists(folder) and not os.path.isdir(folder)):
            raise OptionError(f"tensorboard: {folder} is a symbolic link or not a folder, where fasttl writes event "
                              "files into a folder of its own; move it away, or give another --tensorboard")
    if own:
        return board
    models = [name for name in sorted(os.listdir(board)) if os.path.isdir(os.path.join(board, name))] \
        if os.path.isdir(board) else []
    # Curves already there are another run's (one of the same folder name, or this one's before
    # --overwrite): never deleted, never mixed with this run's.
    held = [os.path.join(model, name) for model in models for name in event_files(os.path.join(board, model))]
    own = _run_token(run_dir) if held and cfg.resume else None  # a --resume adds to its own curves only
    if held and not (own is not None and _board_owner(board) == own):
        older = " (this run, made before fasttl recorded which curves are a run's own, can't prove them its own)" \
            if cfg.resume and own is None and _run_token(run_dir, "run_key") else ""
        raise OptionError(f"tensorboard: {board} already holds event files ({held[0]}{', ...' if len(held) > 1 else ''}"
                          f") of a run named {os.path.basename(run_dir)}{older}; give another --tensorboard folder, or "
                          "move them away")
    return board


def _run_token(run_dir: str, key: str = "run_token"):
    """The run_token of the run in `run_dir`, which DIR/<run name> records as its owner's (None
    where there is none to read, or the run is from before run tokens: its run_key, a hash of its
    settings, is shared by every run of one command, so it proves no curves its own)."""
    try:
        return read_config(run_dir).get(key)
    except RunError:  # no run there (yet): prepare_run_dir says what is wrong with it
        return None


def _board_owner(board: str):
    """The run recorded in a --tensorboard DIR/<run name> (None: none, or not fasttl's)."""
    try:
        return files.read_plain(os.path.join(board, TENSORBOARD_OWNER), 64).decode("ascii")
    except (OSError, ValueError):
        return None


def _scalar_tag(key: str) -> str:
    """History keys as TensorBoard tags, grouped by what they measure: train_loss -> loss/train."""
    for metric in ("loss", "accuracy"):
        if key.endswith("_" + metric):
            return f"{metric}/{key[:-len(metric) - 1]}"
    return {"lr": "lr", "images_per_s": "throughput/images_per_s", "seconds": "time/epoch_s"}.get(key, f"other/{key}")


def write_tensorboard(log_dir: str, outcomes: List[Outcome], classes) -> None:
    """Scalars of each model (a sub-folder per model, so TensorBoard overlays them): per epoch the
    history's loss, accuracy, lr, throughput and validation metrics; after the last epoch the
    test accuracy and macro F1."""
    from torch.utils.tensorboard import SummaryWriter

    for outcome in outcomes:
        folder = os.path.join(log_dir, outcome.name)
        if os.path.islink(folder):
            raise OptionError(f"tensorboard: {folder} is a symbolic link; fasttl does not write through links")
        # purge_step: TensorBoard drops what an earlier attempt of a resumed run wrote from epoch 1 on,
        # so the curves are this run's once, not drawn twice.
        with SummaryWriter(folder, purge_step=1) as writer:
            epoch = 0
            for record in outcome.history:
                epoch = int(record.get("epoch", epoch + 1))
                for key, value in record.items():
                    if key not in ("epoch", "images") and isinstance(value, (int, float)):
                        writer.add_scalar(_scalar_tag(key), float(value), epoch)
            metrics = classification_metrics(outcome.logits, outcome.labels, classes)
            writer.add_scalar("test/accuracy", float(metrics["accuracy"]), epoch)
            writer.add_scalar("test/macro_f1", float(metrics["macro_f1"]), epoch)
            writer.add_scalar("test/balanced_accuracy", float(metrics["balanced_accuracy"]), epoch)


def history_csv(outcomes: List[Outcome]) -> bytes:
    """history.csv: one row per epoch per model, the union of the models' history columns."""
    columns: List[str] = []
    for outcome in outcomes:
        for record in outcome.history:
            columns += [k for k in record if k not in columns and k != "epoch"]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["model", "epoch", *columns])
    for outcome in outcomes:
        for record in outcome.history:
            writer.writerow([outcome.name, record.get("epoch", "")] + [_csv_value(record.get(k)) for k in columns])
    return buffer.getvalue().encode()


def _csv_value(value) -> str:
    if value is None:
        return ""
    return repr(float(value)) if isinstance(value, float) else str(value)


def world_size() -> int:
    return distributed.rank_and_world()[1]


def _result(outcome: Outcome, classes) -> Dict[str, object]:
    return {"metrics": classification_metrics(outcome.logits, outcome.labels, classes), "timings": outcome.timings,
            "history": outcome.history, "weights": os.path.basename(outcome.weights), "notes": outcome.notes,
            "display": outcome.display, "device": outcome.device, "precision": outcome.precision}


def _write_results(run_dir: str, cfg: RunConfig, config: dict, dataset, outcomes: List[Outcome],
                   results: Dict[str, dict], total_s: float) -> Dict[str, object]:
    """metrics.json (written last: its presence marks the run finished), predictions, plots, report."""
    main = outcomes[0].name
    compared = ("accuracy", "balanced_accuracy", "macro_f1", "loss", "per_class_recall", "per_class_precision",
                "confusion_matrix")
    per_model = ("timings", "history", "notes", "device", "precision")
    payload = dict(results[main]["metrics"], timings=dict(results[main]["timings"], total_s=total_s),
                   strategy=cfg.strategy, history=results[main]["history"], notes=results[main]["notes"],
                   device=results[main]["device"], precision=results[main]["precision"],
                   skipped=[{"file": f, "reason": r} for f, r in dataset.skipped],
                   ignored=[{"path": within(p, cfg.data), "reason": r} for p, r in dataset.ignored],  # as eval's
                   compare={name: dict({k: r["metrics"][k] for k in compared}, **{k: r[k] for k in per_model})
                            for name, r in results.items() if name != main})
    write_predictions(run_dir, outcomes[0].logits, outcomes[0].labels, dataset.classes,
                      outcomes[0].samples or dataset.test.sample_ids())
    write_atomic(os.path.join(run_dir, HISTORY), history_csv(outcomes))
    report.plot_confusion_matrix(results[main]["metrics"], os.path.join(run_dir, "confusion_matrix.png"),
                                 results[main]["display"])
    report.plot_curves({r["display"]: r["history"] for r in results.values()}, os.path.join(run_dir, "curves.png"))
    line = (f"Data: {markdown_cell(dataset.name)}, {len(dataset.train)} training and {len(dataset.test)} test images, "
            f"{len(dataset.classes)} classes" + (f"; evaluated on the target domain {markdown_cell(cfg.target_data)}"
                                                 if cfg.target_data else "") + ".")
    report.write_report(run_dir, config, {r["display"]: r for r in results.values()}, line, results[main]["display"])
    write_metrics(run_dir, payload)
    return payload


def summary(run_dir: str, results: Dict[str, dict], main: str, data) -> str:
    dataset, run_dir = data.name, terminal_text(run_dir)  # one line each: a name's line break is shown escaped
    lines = ["", f"{'model':<34} {'accuracy':>9} {'balanced':>9} {'macro F1':>9} {'train s':>8}"]
    for name, r in results.items():
        lines.append(f"{r['display']:<34} {r['metrics']['accuracy']:>9.4f} {r['metrics']['balanced_accuracy']:>9.4f} "
                     f"{r['metrics']['macro_f1']:>9.4f} {r['timings'].get('train_s', 0):>8.1f}")
    lines += ["", f"run directory: {run_dir}  (report.md, metrics.json, confusion_matrix.png, curves.png, "
                      "predictions.csv, weights)"]
    if data.skipped:
        lines.append(f"left out {counted(len(data.skipped), 'image')}: listed with the reason in {run_dir}/skipped.csv")
    if dataset == EMBEDDED:
        lines += ["", "That was the embedded default: an ImageNet EfficientNet-Lite0 carried to CIFAR-10 mini (100 "
                      "training images per class) beside the same budget from scratch.",
                  "Next:",
                  "  fasttl run --data cifar10 --compare scratch          # all of CIFAR-10, from $FASTTL_DATA "
                  "(~/.cache/fasttl/data)",
                  "  fasttl run --data path/to/folder --strategy finetune # your own class folders (train/ and test/ "
                  "used when present)",
                  "  fasttl run --help                                    # strategies: " + " ".join(registry.names())]
    return "\n".join(lines)
