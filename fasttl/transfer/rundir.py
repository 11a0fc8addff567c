"""The run directory: config.json, metrics.json, weights (safetensors) and the resumable checkpoint."""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
from typing import Dict, List, Optional

import torch
from torch import nn

from fasttl.util.errors import UserError
from fasttl.util import files, torch_files
from fasttl.util.path_problems import output_folder_problem, unreachable
from fasttl.util.files import RUN_CONFIG, RUN_MARKER, read_json, write_atomic, write_json_atomic
from fasttl.util.outputs import csv_cell

CONFIG = RUN_CONFIG
MARKER = RUN_MARKER
LOCK = ".fasttl-run.lock"   # held for a run's whole duration (files.FolderLock)
METRICS = "metrics.json"
PREDICTIONS = "predictions.csv"
HISTORY = "history.csv"   # one row per epoch per model
# An int8 run's extraction graph and the images it is checked on (fasttl.transfer.int8_files).
INT8_GRAPH, INT8_CHECK = "extract-int8.onnx", "extract-int8-check.npy"
CHECKPOINT = "checkpoint.pt"
# What a run writes besides its config: the files an --overwrite removes, and nothing else.
TENSORBOARD = "tensorboard"  # RUN_DIR/tensorboard/<model>/: --tensorboard without a folder
EVENT_FILES = "events.out.tfevents."  # what TensorBoard's SummaryWriter names its files
# What a run records (write_recorded) before its first epoch: its training images, a teacher's logits and choice.
RECORDED_FIRST = ("teacher_logits.safetensors", "distill_choice.json", "trained-images.bin")
RESULT_FILES = (METRICS, PREDICTIONS, HISTORY, "report.md", "confusion_matrix.png", "curves.png", "eval_metrics.json",
                "skipped.csv", *RECORDED_FIRST, INT8_GRAPH, INT8_CHECK)


class RunError(UserError, ValueError):
    """A run directory that can't be used as asked: finished, mismatched, or not a fasttl run."""


def write_predictions(run_dir: str, logits: torch.Tensor, labels: torch.Tensor, classes, samples) -> str:
    """predictions.csv: per evaluated image its name, true class, predicted class and the
    predicted class's probability, for error analysis beside the confusion matrix."""
    import csv

    probabilities = torch.softmax(logits.float(), dim=1)
    confidence, predicted = probabilities.max(1)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["sample", "label", "predicted", "confidence"])
    for sample, label, guess, p in zip(samples, labels.tolist(), predicted.tolist(), confidence.tolist()):
        writer.writerow([csv_cell(sample), csv_cell(classes[label]), csv_cell(classes[guess]), f"{p:.4f}"])
    path = os.path.join(run_dir, PREDICTIONS)
    write_atomic(path, buffer.getvalue().encode())
    return path


MAX_WEIGHTS_BYTES = 1 << 34  # far above any backbone fasttl trains (Lite2 fine-tuned: about 40 MB)
WEIGHTS_HEADER_BYTES = 100 << 20  # safetensors refuses a JSON header above 100 MB


def weights_file(name: str) -> str:
    return f"{name}.safetensors"


def save_weights(run_dir: str, name: str, module: nn.Module) -> str:
    from safetensors.torch import save

    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    path = os.path.join(run_dir, weights_file(name))
    if os.path.isfile(os.path.join(run_dir, MARKER)):  # a run's: its SHA-256 recorded, checked when loaded
        write_recorded(run_dir, weights_file(name), save(state))
    else:
        write_atomic(path, save(state))
    return path


def load_weights(run_dir: str, name: str, module: nn.Module) -> nn.Module:
    from safetensors.torch import load

    path = os.path.join(run_dir, weights_file(name))
    if not os.path.lexists(path):
        _refuse_while_written(run_dir)
        raise RunError(f"{path}: no trained weights in this run directory (an unfinished or failed run?)")
    if os.path.islink(path) or not os.path.isfile(path):
        raise RunError(f"{path}: not a plain file (a link, a pipe or a device?), so not the weights fasttl wrote; "
                       "train the run again with --overwrite")
    # What the model's tensors take in any dtype up to 8 bytes, plus safetensors' header: a larger
    # file (a sparse one of gigabytes, say) is no weights of this model, refused unread.
    limit = min(MAX_WEIGHTS_BYTES, 8 * sum(t.numel() for t in module.state_dict().values()) + WEIGHTS_HEADER_BYTES)
    try:
        data = files.read_plain(path, limit)
    except (OSError, ValueError) as exc:
        raise RunError(f"{path}: cannot be read as the run's weights ({getattr(exc, 'strerror', None) or exc})") \
            from None
    try:
        state = load(data)
        module.load_state_dict(state)
    except Exception as exc:  # safetensors raises its own types for a damaged file
        raise RunError(f"{path}: not weights for this run's model ({_first_line(exc)}); train the run again "
                       "with --overwrite") from exc
    check_finite(module, path)  # the most telling refusals first; then: sound weights, but another run's?
    recorded = (_marker(run_dir).get("files") or {}).get(weights_file(name))
    if isinstance(recorded, str) and hashlib.sha256(data).hexdigest() != recorded:
        raise RunError(f"{path}: not the weights this run wrote (its SHA-256 changed since: copied from another "
                       "run?); restore them, or train the run again with --overwrite")
    return module


def check_finite(module: nn.Module, path: str) -> None:
    """Every float weight of `module` as loaded (after any cast to its dtype: 1e300 stored as
    float64 is inf in float32) is finite; else a RunError naming the file."""
    from fasttl.heads.fit import nonfinite_weight

    name = nonfinite_weight(module)
    if name is not None:
        raise RunError(f"{path}: '{name}' holds NaN or infinite weights (a damaged file or a run that "
                       "diverged); train the run again with --overwrite")


def _first_line(exc: BaseException) -> str:
    """The exception in one line: its first line, and the second where the first only says that
    errors follow (load_state_dict's "Error(s) in loading state_dict ...:")."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    shown = " ".join(lines[:2]) if lines and lines[0].endswith(":") else (lines[0] if lines else "")
    return f"{type(exc).__name__}: {shown}"[:300]


def load_tensors(path: str) -> Dict[str, object]:
    """A checkpoint: tensors and plain containers only (fasttl.util.torch_files.load_tensors)."""
    try:
        return torch_files.load_tensors(path)
    except ValueError as exc:
        raise RunError(f"{path}: not a fasttl checkpoint: {exc}; delete it, or run again with --overwrite") from None


class Checkpoint:
    """Per-epoch training state of one model of a run, saved atomically, so Ctrl-C (or a kill)
    leaves a run that `--resume` continues. It holds only tensors and plain containers (loaded
    with weights_only=True) and the run's key, so a checkpoint of another run is refused."""

    def __init__(self, run_dir: str, name: str):
        self.path = os.path.join(run_dir, f"{name}.{CHECKPOINT}")
        self.run_key = (read_json(os.path.join(run_dir, CONFIG)) or {}).get("run_key")

    def save(self, state: Dict[str, object]) -> None:
        buffer = io.BytesIO()
        torch.save(dict(state, run_key=self.run_key), buffer)
        write_atomic(self.path, buffer.getvalue())

    def load(self) -> Optional[Dict[str, object]]:
        if not os.path.isfile(self.path):
            return None
        state = load_tensors(self.path)
        if not isinstance(state, dict) or state.get("run_key") != self.run_key:
            raise RunError(f"{self.path}: a checkpoint of another run (other data or options); delete it, or run "
                           "again with --overwrite")
        return state


def strict_json(value):
    """NaN and infinities become null: metrics.json stays strict JSON for every reader."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def write_config(run_dir: str, config: Dict[str, object]) -> None:
    """config.json, and its SHA-256 in the run folder's marker: a later hand edit is then told
    apart from what fasttl wrote (read_config refuses it) instead of changing predictions."""
    data = files.json_bytes(strict_json(config))
    write_atomic(os.path.join(run_dir, CONFIG), data)
    mark_run(run_dir, hashlib.sha256(data).hexdigest())


def read_config(run_dir: str) -> Dict[str, object]:
    if not os.path.isdir(run_dir):
        why = unreachable(run_dir)
        raise RunError(f"{run_dir} {why}" if why else f"{run_dir}: not a folder, so not a fasttl run folder")
    path = os.path.join(run_dir, CONFIG)
    if not os.path.lexists(path):
        raise RunError(f"{run_dir}: no {CONFIG}; not a fasttl run folder")
    unreadable = files.run_marker_state(run_dir)[0] == "unreadable"  # (named by the read below, as any run file)
    if not unreadable and not holds_run(run_dir):  # (a config.json of a user's own is no run's, whatever it holds)
        raise RunError(f"{run_dir}: not a fasttl run folder ({_no_run_marker(run_dir)}; fasttl marks each run folder "
                       f"it writes with a {MARKER} record); give a fasttl run's --out folder")
    try:
        config = read_json(path)
    except ValueError as exc:
        raise RunError(f"{exc}; not a fasttl run folder (a run of yours there? train it again: "
                       "fasttl run ... --overwrite)") from None
    if config is None:
        raise RunError(f"{run_dir}: no {CONFIG}; not a fasttl run folder")
    if not isinstance(config, dict) or not isinstance(config.get("strategy"), str):
        raise RunError(f"{path}: not a fasttl run configuration (train the run again: fasttl run ... --overwrite)")
    from fasttl.transfer.schema import check_run_config, upgraded

    check_run_config(path, config, RunError)  # first: a bad field is named as such
    _check_unchanged(run_dir, path)
    return upgraded(config)


def _no_run_marker(run_dir: str) -> str:
    """Why `run_dir`'s marker makes it no run folder (holds_run said it does not)."""
    state = files.run_marker_state(run_dir)[0]
    return {"absent": f"it holds no {MARKER}", "link": f"its {MARKER} is a symbolic link",
            "folder": f"its {MARKER} is a folder"}.get(state, f"its {MARKER} is not fasttl's record")


def _refuse_while_written(run_dir: str) -> None:
    """A RunError naming the fasttl run that holds `run_dir`'s lock now (its files come and go)."""
    holder = files.lock_holder(os.path.join(run_dir, LOCK))
    if holder is not None:
        raise RunError(f"{run_dir}: a fasttl run ({holder}) is writing it now; wait for it to finish")


def load_trained(run_dir: str, device):
    """A finished run's model, rebuilt by its strategy's `load`: the one rule for predict, export,
    eval and a distillation teacher. Its options come from config.json, so an option error raised
    while rebuilding names that file, not the command line."""
    from fasttl.util.errors import OptionError
    from fasttl.transfer import registry

    config = read_config(run_dir)
    if not is_finished(run_dir):
        _refuse_while_written(run_dir)
        found = files.is_plain_file(os.path.join(run_dir, METRICS))
        what = f"no {METRICS}" if found is None else f"{METRICS} there is not a plain file"
        again = "run its command again with --overwrite (a planned run, --budget, does not resume)" \
            if config.get("budget") is not None else "finish it with `fasttl run ... --resume`, or train it again"
        raise RunError(f"{run_dir}: the run did not finish ({what}); {again}")
    try:
        return registry.get(config["strategy"]).load(run_dir, device)
    except OptionError as exc:
        raise RunError(f"{os.path.join(run_dir, CONFIG)}: a value there is refused ({exc}); rerun the run, or fix "
                       "the value there") from None


def finite_logits(run_dir: str, logits: torch.Tensor) -> torch.Tensor:
    """`logits` of the run's model, refused when any is not finite: weights that are finite can
    still make NaN (a norm's zero std, a negative running variance), and a NaN confidence or a
    teacher's NaN must not pass as a result."""
    rows = logits.reshape(-1, logits.shape[-1]) if logits.dim() else logits.reshape(1, 1)  # (views x) images
    bad = int((~torch.isfinite(rows)).any(dim=-1).sum()) if rows.numel() else 0
    if bad:
        raise RunError(f"{run_dir}: the run's weights give non-finite logits on {bad} of {len(rows)} images (a "
                       "damaged or hand-edited weights file); train the run again with --overwrite")
    return logits


def write_metrics(run_dir: str, metrics: Dict[str, object]) -> None:
    write_json_atomic(os.path.join(run_dir, METRICS), strict_json(metrics))


def is_finished(run_dir: str) -> bool:
    """Whether the run wrote its metrics.json, its last file (a plain file, not a link or a folder)."""
    return bool(files.is_plain_file(os.path.join(run_dir, METRICS)))


def holds_run(run_dir: str) -> bool:
    """Whether `run_dir` is a fasttl run folder, by proof: the marker fasttl writes there (a plain
    file holding fasttl's record, not a link), or, for folders made before the marker, a config.json
    whose run_key is the hash of its own identity (which no config.json of a user's own carries by
    chance). Any other config.json, or file of the marker's name, is a user's, never taken for a run."""
    state, detail = files.run_marker_state(run_dir)
    if state in ("record", "other", "unreadable"):
        return files.marker_holds_run(run_dir, state, detail)
    try:
        config = read_json(os.path.join(run_dir, CONFIG))
    except ValueError:
        return False
    if not isinstance(config, dict) or not isinstance(config.get("identity"), dict):
        return False
    key = hashlib.sha256(json.dumps(config["identity"], sort_keys=True).encode()).hexdigest()
    return config.get("run_key") == key


def unfinished_leftovers(run_dir: str) -> List[str]:
    """What a run folder with no metrics.json and no checkpoint holds that a new run would lose: a
    model of a run whose metrics.json went, a report, any run file but its config.json and what a
    run records before its first epoch (write_recorded: its training images, a teacher's logits);
    and a config.json other than the one its marker vouches for (a user's, beside a copied marker).
    None: a run that stopped before its first epoch, cleared without asking."""
    kept = sorted((name for name in run_files() if name != CONFIG and files.is_plain_file(os.path.join(run_dir, name))
                   and (name not in RECORDED_FIRST or read_recorded(run_dir, name, files.MAX_JSON_BYTES) is None)),
                  key=lambda name: not name.endswith(".safetensors"))  # (trained weights named first)
    try:
        config = files.read_plain(os.path.join(run_dir, CONFIG), files.MAX_JSON_BYTES)
    except FileNotFoundError:
        return kept
    except (OSError, ValueError):
        config = None
    if config is None or hashlib.sha256(config).hexdigest() != _marker(run_dir).get("config_sha256"):
        kept.insert(0, FOREIGN_CONFIG)
    return kept


FOREIGN_CONFIG = f"a {CONFIG} this run did not write"  # (what unfinished_leftovers says of one: no run to resume)


def refuse_blocked(run_dir: str) -> None:
    """A RunError where --out, or a folder on its way, is there but no folder (a file, a link to
    nothing, a link loop), naming that part."""
    problem = output_folder_problem(run_dir, "pass another --out")
    if problem:
        raise RunError(f"out: {problem}")


def refuse_leftovers(run_dir: str) -> None:
    """A RunError where a marked folder with no metrics.json and no checkpoint holds what a new run
    would lose (unfinished_leftovers); --resume continues a --compare run stopped between strategies."""
    leftovers = unfinished_leftovers(run_dir)
    if leftovers:
        resume = "" if FOREIGN_CONFIG in leftovers else "--resume to continue it, "
        raise RunError(f"out: {run_dir} holds an unfinished run's files ({', '.join(leftovers[:3])}) and no "
                       f"checkpoint of an epoch; pass {resume}--overwrite to replace them, or another --out")


def mark_run(run_dir: str, config_sha256: Optional[str] = None, keep_records: bool = True) -> None:
    """Writes the marker that makes `run_dir` a fasttl run folder (with the SHA-256 of the
    config.json fasttl wrote, once there is one). `keep_records=False`: the records of the files
    an earlier run made are dropped (its files were cleared: the marker vouches for none of them)."""
    from fasttl._version import __version__

    marker = {"fasttl": __version__, "what": files.RUN_MARKER_WHAT}
    if config_sha256 is not None:
        marker["config_sha256"] = config_sha256
    recorded = _marker(run_dir).get("files")
    if keep_records and isinstance(recorded, dict):  # a resumed run keeps the records of the files it made before
        marker["files"] = recorded
    write_json_atomic(os.path.join(run_dir, MARKER), marker)


def _marker(run_dir: str) -> dict:
    try:
        marker = read_json(os.path.join(run_dir, MARKER))
    except ValueError:
        return {}
    return marker if isinstance(marker, dict) else {}


def write_recorded(run_dir: str, name: str, data: bytes) -> None:
    """A file a run makes and reads back on --resume (distill's choice, its teachers' logits),
    written atomically with its SHA-256 recorded in the marker, as config.json's is."""
    write_atomic(os.path.join(run_dir, name), data)
    marker = _marker(run_dir)
    marker.setdefault("files", {})[name] = hashlib.sha256(data).hexdigest()
    write_json_atomic(os.path.join(run_dir, MARKER), marker)


def recorded_hash(run_dir: str, name: str) -> Optional[str]:
    """The SHA-256 the marker recorded for a file write_recorded made, or None."""
    value = (_marker(run_dir).get("files") or {}).get(name)
    return value if isinstance(value, str) else None


def read_recorded(run_dir: str, name: str, limit: int) -> Optional[bytes]:
    """The bytes of a file write_recorded made, or None when it is missing, not a plain file, over
    `limit` bytes or not what fasttl wrote (edited or damaged since): the caller makes it anew."""
    recorded = (_marker(run_dir).get("files") or {}).get(name)
    if not isinstance(recorded, str) or os.path.islink(os.path.join(run_dir, name)):  # a link: not what fasttl wrote
        return None
    try:
        data = files.read_plain(os.path.join(run_dir, name), limit)
    except PermissionError:  # the user's to fix, not damage (which would send them to --overwrite)
        raise
    except (OSError, ValueError):
        return None
    return data if hashlib.sha256(data).hexdigest() == recorded else None


def _check_unchanged(run_dir: str, path: str) -> None:
    """config.json is the one fasttl wrote: its SHA-256 is the one the marker recorded. A marker
    that is missing, damaged or without the hash (a folder made by an older fasttl) can't vouch for
    it: a config.json with other classes would otherwise name every prediction wrong."""
    marker = os.path.join(run_dir, MARKER)
    if os.path.islink(marker):
        raise RunError(f"{marker}: a link, not the file fasttl wrote (it reads a run's files only as plain files); put "
                       "the file itself there, or train the run again with --overwrite")
    try:
        recorded = read_json(marker)
    except ValueError:
        recorded = None
    recorded = recorded.get("config_sha256") if isinstance(recorded, dict) else None
    if not (isinstance(recorded, str) and len(recorded) == 64):
        raise RunError(f"{marker}: missing, damaged or without the SHA-256 of config.json (a run made by an older "
                       "fasttl?), so its config.json can't be trusted; train the run again with --overwrite")
    try:
        data = files.read_plain(path, files.MAX_JSON_BYTES)
    except (OSError, ValueError) as exc:
        raise RunError(f"{path}: cannot be read as a plain file ({getattr(exc, 'strerror', None) or exc})") from None
    if hashlib.sha256(data).hexdigest() != recorded:
        raise RunError(f"{path}: changed after fasttl wrote it (its SHA-256 is not the one recorded in {MARKER}); "
                       "restore it, or train the run again with --overwrite")


class RunLock(files.FolderLock):
    """Held by a run for its whole duration: a second `fasttl run` into the same folder is refused
    at once, naming the holder, instead of mixing its files with the first's."""

    def __init__(self, run_dir: str):
        super().__init__(run_dir, LOCK, "two runs in one folder would mix their files")

    def refused(self, why: str) -> Exception:
        return RunError(f"{self.path}: {why}; fasttl will not write to it (move it away: fasttl makes its own lock "
                        "file there)")

    def locked(self, holder: str) -> Exception:
        return RunError(f"out: {os.path.dirname(self.path)} is in use by another fasttl run ({holder}); wait for it "
                        "to finish, or pass another --out")


def run_files() -> List[str]:
    """The names of every file a run writes: its config, results, and each strategy's models."""
    from fasttl.transfer import registry

    models = registry.output_names()
    return [CONFIG, *RESULT_FILES, *(weights_file(m) for m in models), *(f"{m}.{CHECKPOINT}" for m in models)]


def own_entries() -> tuple:
    """What fasttl keeps in a run folder besides the run's files: its marker and lock."""
    return (MARKER, LOCK)


def clear_results(run_dir: str) -> List[str]:
    """Removes what an earlier run wrote here: fasttl's own file names only (a file of yours, even
    one named *.safetensors, stays), and never through a link."""
    removed = []
    for name in run_files():
        path = os.path.join(run_dir, name)
        if os.path.isfile(path) and not os.path.islink(path):
            os.remove(path)
            removed.append(name)
    board = os.path.join(run_dir, TENSORBOARD)  # the replaced run's curves, one folder per model
    for model in (sorted(os.listdir(board)) if os.path.isdir(board) and not os.path.islink(board) else ()):
        removed += [os.path.join(TENSORBOARD, model, name) for name in remove_event_files(os.path.join(board, model))]
    return removed


def event_files(folder: str) -> List[str]:
    """The TensorBoard event files fasttl's SummaryWriter wrote in `folder` (plain files, no links)."""
    if not os.path.isdir(folder) or os.path.islink(folder):
        return []
    return [name for name in sorted(os.listdir(folder)) if name.startswith(EVENT_FILES)
            and os.path.isfile(os.path.join(folder, name)) and not os.path.islink(os.path.join(folder, name))]


def remove_event_files(folder: str) -> List[str]:
    names = event_files(folder)
    for name in names:
        os.remove(os.path.join(folder, name))
    return names


def has_checkpoints(run_dir: str) -> bool:
    return any(os.path.isfile(os.path.join(run_dir, name)) for name in run_files() if name.endswith(CHECKPOINT))
