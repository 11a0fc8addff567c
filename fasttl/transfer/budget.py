"""A run's time budget (`fasttl run --budget 10m`) and this machine's measured extraction speed
(images/s per backbone, image size, features and engine) and its linear head's tuning rate on
those features, kept per machine so that the planner (fasttl.transfer.planner) can cost a plan
before it runs anything.

The speed record is a cache: $FASTTL_STATE_DIR/extraction-speed.json. An entry that is
unreadable, out of range or measured on another machine (CPU model, cores, torch, ONNX Runtime
or fasttl version) is ignored and measured again; a record that cannot be written costs the next
run a new measurement, never the run itself."""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from typing import Dict, Optional, Sequence

from fasttl.util import files, settings
from fasttl.util.machine import cpu_model
from fasttl.util.errors import OptionError

UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}
MAX_BUDGET_S = 7 * 24 * 3600.0
SPEED_FILE = "extraction-speed.json"
MAX_IMAGES_PER_S = 1e6
MAX_RATE = {"images_per_s": MAX_IMAGES_PER_S, "row_classes_per_s": 1e12}
# Far below anything measured (nearly 3 hours an image; the slowest head measured ran 350
# row-classes/s): a rate under them is damage, measured again, not a reason to refuse every budget.
MIN_RATE = {"images_per_s": 1e-4, "row_classes_per_s": 1.0}
MIN_MEASURED_IMAGES = 200  # fewer images time the pipeline's start more than its speed
# Fewer rows time the solver's set-up: a cross-validated Lite0 head ran 350 row-classes/s on 200
# rows, 2,700-3,100 on 1,000 to 5,000 (2-core Xeon); a rate from 200 rows refused 5m budgets that hold.
MIN_HEAD_ROWS = 1000


def parse_budget(value) -> float:
    """'90s', '10m', '1.5h' -> seconds; else one OptionError naming the value and the form."""
    match = re.fullmatch(r"([0-9]+(?:\.[0-9]*)?)([smh])", value.strip()) if isinstance(value, str) else None
    if match is None:
        raise OptionError(f"budget: expected a time with its unit, such as 90s, 10m or 1.5h, got {value!r}")
    seconds = float(match[1]) * UNITS[match[2]]
    if not 0 < seconds <= MAX_BUDGET_S:
        raise OptionError(f"budget: {value} is outside (0s, 168h]; pass a time such as 10m")
    return seconds


def a_budget(name: str, value) -> None:
    """The check of the --budget option: None, or a time parse_budget reads."""
    if value is not None:
        parse_budget(value)


def shown(seconds: float) -> str:
    """A duration as a budget would be written: 95 s -> '1.6m'; past the largest budget, said so."""
    if not seconds <= MAX_BUDGET_S:
        return f"more than {MAX_BUDGET_S / 3600:.0f}h"
    return f"{seconds:.0f}s" if seconds < 120 else f"{seconds / 60:.1f}m" if seconds < 7200 else \
        f"{seconds / 3600:.1f}h"


def about(seconds: float) -> str:
    """An estimate in a message: 'about 1.6m', or 'more than 168h' (no 'about' before that)."""
    return f"about {shown(seconds)}" if seconds <= MAX_BUDGET_S else shown(seconds)


def machine() -> Dict[str, object]:
    """What the measured speeds hold for: the CPU, the cores this process may use, the versions."""
    import torch

    from fasttl._version import __version__

    try:
        import onnxruntime
        ort = onnxruntime.__version__
    except ImportError:
        ort = None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu_model(), "cores": cores, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "onnxruntime": ort, "fasttl": __version__}


def _machine_key() -> str:
    return hashlib.sha256(json.dumps(machine(), sort_keys=True).encode()).hexdigest()[:16]


def speed_key(backbone: str, image_size: int, features: str, engine: str, precision: str, device: str) -> str:
    return f"{backbone}|{image_size}px|{features}|{engine}|{precision}|{device}"


def record_path() -> str:
    return os.path.join(settings.STATE_DIR.path(), SPEED_FILE)


# A machine's record holds a few hundred bytes a backbone and size: a larger file is damage, not
# read on every lookup (nor kept by the next rewrite).
MAX_RECORD_BYTES = 1 << 20
_MACHINE_KEY = re.compile(r"[0-9a-f]{16}")


def _read_all() -> dict:
    """Each machine's record (machine key -> {speed key -> its numbers}); what is not is left out."""
    try:
        record = files.read_json(record_path(), strict=True, limit=MAX_RECORD_BYTES)  # NaN: fails the rewrite
    except (OSError, ValueError):  # too large, a link, not a plain file, not JSON: measured anew
        return {}
    if not isinstance(record, dict):
        return {}
    return {machine_key: {key: entry for key, entry in mine.items() if isinstance(entry, dict)}
            for machine_key, mine in record.items() if _MACHINE_KEY.fullmatch(machine_key) and isinstance(mine, dict)}


def _measured(key: str, field: str) -> Optional[float]:
    entry = (_read_all().get(_machine_key()) or {})
    entry = entry.get(key) if isinstance(entry, dict) else None
    value = entry.get(field) if isinstance(entry, dict) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        value = float(value)  # an integer of 400 digits is no float (OverflowError): damage, measured again
    except OverflowError:
        return None
    return value if math.isfinite(value) and MIN_RATE[field] <= value <= MAX_RATE[field] else None


def measured_speed(key: str) -> Optional[float]:
    """Images/s this machine measured for `key` (speed_key), or None."""
    return _measured(key, "images_per_s")


def head_key(backbone: str, features: str, device: str) -> str:
    """What a head's tuning rate holds for: the features' width (a backbone's, whatever the image
    size or the precision they were extracted in) and where the head is solved."""
    return f"{backbone}|{features}|{device}|linear head"


def measured_head_rate(key: str) -> Optional[float]:
    """The linear head's cross-validated tuning rate for `key` (head_key), or None."""
    return _measured(key, "row_classes_per_s")


def speeds_from() -> str:
    """Where a refusal's speeds came from, and how to measure them again."""
    return f" (speeds measured on this machine, kept in {record_path()}: delete it to measure them again)"


def record_speed(key: str, images: int, seconds: float) -> None:
    """Keeps the speed of an extraction of `images` images in `seconds` (at least
    MIN_MEASURED_IMAGES): the latest measurement replaces any earlier one (a machine's load and
    fasttl change; a stale or edited record does not stick)."""
    if images >= MIN_MEASURED_IMAGES and seconds > 0:
        _record(key, {"images_per_s": images / seconds, "images": int(images)})


def record_head_rate(key: str, rows: int, classes: int, seconds: float) -> None:
    """Keeps how fast the linear head was tuned by cross-validation on `rows` rows of features
    (`key`: head_key) in `classes` classes, as rows x classes a second (a solve's work grows with both), so
    that a budget can be costed, head included, before anything is screened."""
    if rows >= MIN_HEAD_ROWS and classes > 0 and seconds > 0:
        _record(key, {"row_classes_per_s": rows * classes / seconds, "rows": int(rows)})


def _record(key: str, entry: dict) -> None:
    record = _read_all()
    mine = record.get(_machine_key())
    mine = mine if isinstance(mine, dict) else {}
    mine[key] = dict(entry, measured=time.strftime("%Y-%m-%d"))
    record[_machine_key()] = mine
    try:
        os.makedirs(os.path.dirname(record_path()), exist_ok=True)
        files.write_json_atomic(record_path(), record)
    except (OSError, ValueError):  # a read-only or full state folder: the next plan measures again (nothing else
        pass                           # is lost); ValueError: what can't be strict JSON (read_json refuses it)


def check_budget_options(cfg, given: Sequence[str]) -> None:
    """What --budget cannot be combined with, before any data is read."""
    if cfg.strategy not in ("linear", "mlp"):
        raise OptionError(f"budget: --budget plans a feature-transfer model (linear or mlp); --strategy {cfg.strategy} "
                          "has no plan: drop one of them")
    if "compare" in given and cfg.compare != "none":
        raise OptionError("budget: --budget plans one model in its time; run --compare separately, or pass --compare "
                          "none")
    if cfg.resume:
        raise OptionError("budget: a planned run does not resume (its plan is made from the start); run the same "
                          "command again with --overwrite instead of --resume")
    from fasttl.util import distributed

    if distributed.rank_and_world()[1] > 1:
        raise OptionError("budget: --budget plans on one process; run it without torchrun")
    if cfg.weights is not None:
        raise OptionError("budget: --weights is one backbone's file; the plan compares backbones: drop --weights, or "
                          "--budget")
    if cfg.extract_precision == "int8":  # int8 where its accuracy was measured is the plan's (config.auto_int8)
        raise OptionError("budget: --budget extracts in int8 where int8's accuracy was measured, else in fp32; drop "
                          "--extract-precision int8, or --budget")


def _round_up(seconds: float) -> str:
    return f"{math.ceil(seconds)}s" if seconds < 120 else f"{math.ceil(seconds / 60)}m" if seconds < 7200 else \
        f"{math.ceil(seconds / 3600)}h"


def suggested(seconds: float, least: Optional[float] = None) -> str:
    """The budget a refusal suggests (`seconds`: the estimate with its margin), or that none --budget
    takes would do; the largest where only the margin passes it (`least`: the estimate without it)."""
    if seconds <= MAX_BUDGET_S:
        return f"pass --budget {_round_up(seconds)} or more"
    if least is not None and least <= MAX_BUDGET_S:
        return f"pass --budget {MAX_BUDGET_S / 3600:.0f}h, the largest (with room for error: {shown(seconds)})"
    return f"no --budget up to {shown(MAX_BUDGET_S)} fits it"
