"""What a run folder's config.json may hold, written once: every field fasttl reads back (to
load a model, evaluate, resume, teach a student) with its type and range. A hand-edited or
damaged file is then a one-line error naming the file and the field, never a traceback deep in a
strategy or an option error that blames the command line."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict


@dataclass(frozen=True)
class Field:
    check: Callable[[Any], bool]
    expected: str
    required: bool = False


def _int_in(low: int, high: int) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and low <= v <= high


def _positive_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def _text(v) -> bool:
    return isinstance(v, str) and bool(v) and "\0" not in v


def _optional(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: v is None or check(v)


def _class_names(v) -> bool:
    return (isinstance(v, list) and len(v) >= 2 and all(isinstance(c, str) and c and c.isprintable() for c in v)
            and len(set(v)) == len(v))


def _one_of(choices: Callable[[], tuple]) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, str) and v in choices()


def _in(choices) -> Callable[[Any], bool]:
    """A text value among `choices` (a list or a dict's keys: a list or dict value is never looked up)."""
    return lambda v: isinstance(v, str) and v in choices


def _strategies() -> tuple:
    from fasttl.transfer import registry

    return registry.names()


def _backbones() -> tuple:
    from fasttl import backbones

    return tuple(backbones.available())


def _teachers(v) -> bool:
    return v is None or _text(v) or (isinstance(v, list) and bool(v) and all(_text(t) for t in v))


def run_config_fields() -> Dict[str, Field]:
    from fasttl.cache import engines
    from fasttl.data.labels import LABEL_KINDS
    from fasttl.data.sources import ON_ERROR
    from fasttl.transfer.caching import FEATURE_TAPS, MIRROR_VIEWS
    from fasttl.transfer.config import MAX_IMAGE_SIZE

    return {
        "strategy": Field(_one_of(_strategies), f"one of {', '.join(_strategies())}", required=True),
        "classes": Field(_class_names, "a list of at least 2 distinct, printable class names", required=True),
        "backbone": Field(_one_of(_backbones), f"one of {', '.join(_backbones())}", required=True),
        "image_size": Field(_int_in(1, MAX_IMAGE_SIZE), f"an integer from 1 to {MAX_IMAGE_SIZE}", required=True),
        "seed": Field(_int_in(0, 2**63 - 1), "an integer >= 0", required=True),
        "data": Field(_optional(_text), "a path or data set name (text)"),
        "weights": Field(_optional(_text), "a path (text) or null"),
        "data_path": Field(_optional(_text), "a path (text) or null"),
        "classes_file_path": Field(_optional(_text), "a path (text) or null"),
        "classes_file": Field(_optional(_text), "a path (text) or null"),
        "labels": Field(_in(LABEL_KINDS), f"one of {', '.join(LABEL_KINDS)}"),
        "on_error": Field(_in(ON_ERROR), f"one of {', '.join(ON_ERROR)}"),
        "native_size": Field(_int_in(8, MAX_IMAGE_SIZE), f"an integer from 8 to {MAX_IMAGE_SIZE}"),
        "epochs": Field(_optional(_int_in(1, 1 << 31)), "a positive integer"),
        "batch_size": Field(_optional(_int_in(1, 1 << 31)), "a positive integer"),
        "train_per_class": Field(_optional(_int_in(1, 1 << 31)), "a positive integer or null"),
        "test_per_class": Field(_optional(_int_in(1, 1 << 31)), "a positive integer or null"),
        "lr": Field(_optional(_positive_number), "a finite number > 0"),
        "features": Field(_in(FEATURE_TAPS), f"one of {', '.join(FEATURE_TAPS)}"),
        "mirror_views": Field(lambda v: isinstance(v, bool) or _in(MIRROR_VIEWS)(v),
                              f"one of {', '.join(MIRROR_VIEWS)}"),
        "cache_dtype": Field(_in(("fp16", "bf16", "fp32", "int8")), "one of fp16, bf16, fp32, int8"),
        "engine": Field(_in(engines.ENGINES), f"one of {', '.join(engines.ENGINES)}"),
        "extract_precision": Field(_in(engines.PRECISIONS), f"one of {', '.join(engines.PRECISIONS)}"),
        "precision": Field(_in(("auto", "fp32", "bf16")), "one of auto, fp32, bf16"),
        "finetune_stages": Field(_optional(_int_in(1, 1 << 16)), "a positive integer or null"),
        "finetune_from": Field(_in(("probe", "random")), "one of probe, random"),
        "teacher": Field(_teachers, "a run folder or a list of them"),
        "target_data": Field(_optional(_text), "a path (text) or null"),
        "compare": Field(_text, "a strategy name or none"),
        "run_key": Field(_optional(lambda v: isinstance(v, str) and len(v) == 64), "a 64-character hash"),
        "identity": Field(lambda v: isinstance(v, dict), "an object"),
    }


def check_run_config(path: str, config: Dict[str, Any], error: Callable[[str], Exception]) -> None:
    """Raises `error` (the run folder's RunError, passed in so that this module imports nothing of
    the run folder's) naming `path` and the first field that is missing or not what fasttl wrote."""
    for name, field in run_config_fields().items():
        if name not in config:
            if field.required:
                raise error(f"{path}: no '{name}' field (not a fasttl run configuration; rerun the run, or "
                            "restore the file)")
            continue
        if not field.check(config[name]):
            shown = repr(config[name])
            shown = shown if len(shown) <= 80 else shown[:77] + "..."
            raise error(f"{path}: field '{name}' is {shown} (expected {field.expected}); rerun the run, or fix the "
                        "value there")
