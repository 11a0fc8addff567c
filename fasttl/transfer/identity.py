"""A run's identity: what its checkpoints depend on (the options that change what it computes,
the content of its data, a strategy's other inputs such as a teacher's weights), recorded in
config.json, and the comparison `--resume` makes with the identity of the interrupted run."""
from __future__ import annotations

import hashlib
import json
import os
from typing import Dict, List

from fasttl.transfer import registry
from fasttl.transfer.caching import mirror_mode
from fasttl.transfer.common import weights_sha256
from fasttl.transfer.config import RunConfig, options, scoped
from fasttl.transfer.datasets import NAMED
from fasttl.transfer.rundir import RunError
from fasttl.transfer.schema import added_later
from fasttl.util import files

# Options that don't change what a run computes: a resumed run may differ in these.
_NOT_COMPARED = ("resume", "overwrite", "progress", "out", "device", "on_error", "download", "tensorboard")

# What changed, in words, where the identity holds a hash that names no file.
_TOUCHED = "an image added, removed or rewritten, or its modification time changed: a copy keeps it only with cp -p " \
    "or rsync -a"
_CHANGED = {"data_identity": f"the data changed since the run started ({_TOUCHED})",
            "teachers_weights": "a teacher's weights changed since the run started (trained again in place?)",
            "target_identity": f"the --target-data images changed since the run started ({_TOUCHED})",
            "weights_sha256": "the --weights file changed since the run started (rewritten in place?)"}


def trained(cfg: RunConfig) -> List[str]:
    """The strategies a run trains: --strategy, and --compare's baseline when it names one."""
    return [cfg.strategy] + ([cfg.compare] if cfg.compare in registry.names() else [])


def reads(cfg: RunConfig, name: str) -> bool:
    return any(registry.get(s).reads_option(name) for s in trained(cfg))


def absolute_path(path):
    """An absolute form of a path option, so that `fasttl eval RUN` from another folder reads what
    the run read (a data set name such as cifar10, or no option, stays None)."""
    if path is None or path in NAMED:
        return None
    return files.absolute(path)


def _as_compared(name: str, value, path_options) -> object:
    """A path option as the one path the kernel reaches (`./data/`, `data` and a link to it are one
    folder); a data set name stays."""
    if isinstance(value, list) and name in path_options:
        return [_as_compared(name, each, path_options) for each in value]
    if name not in path_options or not isinstance(value, str) or value in NAMED:
        return value  # (a hand-edited record's number or list is compared as it is: it differs)
    try:
        return os.path.realpath(absolute_path(value))
    except ValueError:  # a NUL in a hand-edited record: no path, compared as it is
        return value


def _path_options() -> set:
    return {name for name, _, metadata in options() if metadata["path"]}


def run_identity(cfg: RunConfig, dataset) -> Dict[str, object]:
    """What a run's checkpoints depend on: its options and the content of its data."""
    paths = _path_options()
    compared = {k: _as_compared(k, v, paths) for k, v in cfg.as_dict().items() if k not in _NOT_COMPARED}
    inputs = {"weights_sha256": weights_sha256(cfg.weights)} if cfg.weights is not None else {}
    for name in trained(cfg):  # the --compare baseline's inputs too (a distill baseline's teacher)
        inputs.update(registry.get(name).inputs_identity(cfg))
    return dict(compared, data_identity=dataset.identity(), **inputs)


def key(identity: Dict[str, object]) -> str:
    """config.json's run_key, which the run's checkpoints carry."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


# A path option whose content an identity key holds is compared by that content: a folder moved
# or renamed with its files' times kept, or an older run's path typed from another folder, is the
# same input; an input changed at the same path is still refused.
_CONTENT_OF = {"data": "data_identity", "classes_file": "data_identity", "teacher": "teachers_weights",
               "target_data": "target_identity", "weights": "weights_sha256"}


def resumed_identity(run_dir: str, cfg: RunConfig, identity: dict, recorded: dict) -> dict:
    """The identity a resumed run keeps: the one its interrupted run recorded (its checkpoints
    carry that key), once it is this run's in today's terms; a RunError naming what differs else."""
    before = _identity_as_today(recorded, cfg, identity)
    differing = {k for k in set(identity) | set(before) if identity.get(k) != before.get(k)}
    said, options = [], False
    for k in sorted(differing):
        content = _CONTENT_OF.get(k)
        if content in recorded and content in identity and content not in differing:
            continue  # another path to the same content: moved, linked or spelled otherwise
        if any(c == k and name in differing for name, c in _CONTENT_OF.items()):
            continue  # its path changed too (another file, or none): said by the path
        said.append(_CHANGED[k] if k in _CHANGED else f"{k}: was {before.get(k)!r}, now {identity.get(k)!r}")
        options = options or k not in _CHANGED
    if said:  # (the same options again can't help where only an input changed: restoring it can)
        again = "run with the same options" if options else "restore it as the run read it"
        raise RunError(f"resume: {run_dir} was run with other options or data ({'; '.join(said)[:500]}); {again}, "
                       "or pass --overwrite to start over")
    return recorded


def _identity_as_today(before: dict, cfg: RunConfig, identity: dict) -> dict:
    """An earlier run's identity in today's terms, to compare with this one's: an option added
    since compares as the value that run behaved as where the strategies read it, and not at
    all where they don't (schema.added_later); a path recorded as typed (older runs), as the
    path it names from here."""
    paths = _path_options()
    before = {k: _as_compared(k, v, paths) for k, v in before.items()}
    if "mirror_views" in before:  # a bool before --mirror-views had modes
        before["mirror_views"] = mirror_mode(before["mirror_views"])
    for name, behaved_as in added_later().items():
        if name not in before:
            before[name] = behaved_as if not scoped(name) or reads(cfg, name) else identity.get(name)
    for name in set(identity) - set(before) - set(cfg.as_dict()) - {"data_identity"}:  # an input recorded since
        before[name] = identity[name]  # (a strategy's inputs_identity): not compared, as nothing was recorded
    return before
