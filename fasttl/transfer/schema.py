"""What a run folder's config.json may hold, written once: every field fasttl reads back (to
load a model, evaluate, resume, teach a student) with its type and range. A hand-edited or
damaged file is then a one-line error naming the file and the field, never a traceback deep in a
strategy or an option error that blames the command line."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict

from fasttl.util.checks import finite
from fasttl.optim import FLOAT32_MAX, FLOAT32_TINY
from fasttl.data.labels import unprintable


@dataclass(frozen=True)
class Field:
    check: Callable[[Any], bool]
    expected: str
    required: bool = False


def _int_in(low: int, high: int) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and low <= v <= high


def _positive_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and finite(v) and v > 0  # 10**400: not finite


def _text(v) -> bool:
    return isinstance(v, str) and bool(v) and "\0" not in v


def _optional(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: v is None or check(v)


def _class_names(v) -> bool:
    return (isinstance(v, list) and len(v) >= 2 and all(isinstance(c, str) and c and not unprintable(c) for c in v)
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


def _hex64(v) -> bool:
    return isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v)


def _a_backbone(v) -> bool:
    from fasttl import backbones

    return backbones.known(v)


def _a_time(v) -> bool:
    from fasttl.transfer.budget import parse_budget
    from fasttl.util.errors import OptionError

    try:
        parse_budget(v)
    except OptionError:
        return False
    return True


def _teachers(v) -> bool:
    return v is None or _text(v) or (isinstance(v, list) and bool(v) and all(_text(t) for t in v))


MAX_SAMPLES = 1 << 40  # images in one run: far beyond any data set, small enough to bound a read by


def run_config_fields() -> Dict[str, Field]:
    from fasttl.data.spec import MAX_IMAGE_SIZE

    fields = {
        "strategy": Field(_one_of(_strategies), f"one of {', '.join(_strategies())}", required=True),
        "classes": Field(_class_names, "a list of at least 2 distinct, printable class names", required=True),
        "backbone": Field(_a_backbone, f"one of {', '.join(_backbones())}, or 2 to 3 EfficientNet-Lites joined by '+'",
                          required=True),
        "image_size": Field(_int_in(1, MAX_IMAGE_SIZE), f"an integer from 1 to {MAX_IMAGE_SIZE}", required=True),
        "seed": Field(_int_in(0, 2**63 - 1), "an integer >= 0", required=True),
        # how many images the run trained on: bounds the read of its record (trained_images)
        "train_samples": Field(_int_in(0, MAX_SAMPLES), f"an integer from 0 to {MAX_SAMPLES}", required=True),
        "data": Field(_optional(_text), "a path or data set name (text)"),
        "weights": Field(_optional(_text), "a path (text) or null"),
        "data_path": Field(_optional(_text), "a path (text) or null"),
        "classes_file_path": Field(_optional(_text), "a path (text) or null"),
        "classes_file": Field(_optional(_text), "a path (text) or null"),
        "native_size": Field(_int_in(8, MAX_IMAGE_SIZE), f"an integer from 8 to {MAX_IMAGE_SIZE}"),
        "epochs": Field(_optional(_int_in(1, 1 << 31)), "a positive integer"),
        "batch_size": Field(_optional(_int_in(1, 1 << 31)), "a positive integer"),
        "train_per_class": Field(_optional(_int_in(1, 1 << 31)), "a positive integer or null"),
        "test_per_class": Field(_optional(_int_in(1, 1 << 31)), "a positive integer or null"),
        "lr": Field(_optional(lambda v: _positive_number(v) and FLOAT32_TINY <= v <= FLOAT32_MAX),
                    "a number in float32's normal range"),
        "finetune_stages": Field(_optional(_int_in(1, 1 << 16)), "a positive integer or null"),
        "teacher": Field(_teachers, "a run folder or a list of them"),
        "target_data": Field(_optional(_text), "a path (text) or null"),
        "tensorboard": Field(lambda v: v is None or v is True or _text(v), "a folder (text), true or null"),
        "compare": Field(_text, "a strategy name or none"),
        "budget": Field(_optional(_a_time), "a time such as 10m, or null"),
        "run_key": Field(_optional(lambda v: isinstance(v, str) and len(v) == 64), "a 64-character hash"),
        "run_token": Field(_optional(lambda v: isinstance(v, str) and len(v) == 32 and all(
            c in "0123456789abcdef" for c in v)), "32 lower-case hexadecimal digits"),
        "weights_sha256": Field(_optional(lambda v: isinstance(v, str) and len(v) == 64), "a 64-character hash"),
        "extract_calibration": Field(_optional(_hex64), "a 64-character hash or null"),
        "identity": Field(lambda v: isinstance(v, dict), "an object"),
    }
    return dict(fields, **_choice_fields(fields))


def _choice_fields(written: Dict[str, Field]) -> Dict[str, Field]:
    """Every other run option with a list of choices (--features, --engine, --finetune-from, ...):
    one of them, read from the option itself, after the conversion of an older form (a run from
    before --mirror-views had modes holds a bool)."""
    from fasttl.transfer.config import options
    from fasttl.transfer.options import choices_of

    def check(choices, convert):
        return lambda v: _in(choices)(convert(v) if convert is not None else v)

    return {name: Field(check(choices_of(meta), meta["convert"]), f"one of {', '.join(choices_of(meta))}")
            for name, _, meta in options() if name not in written and meta["choices"] is not None}


def added_later() -> Dict[str, Any]:
    """Keys config.json gained after runs were made, each with the value such a run behaved as:
    the one place older run folders are handled (read_config fills them in, and --resume compares
    an older run's options with them)."""
    from fasttl.transfer import cross_fit

    return {"cache_dtype": "fp16",              # the only cache dtype before --cache-dtype
            "features": "head",                 # the final pooled map, before --features
            "engine": "auto", "extract_precision": "auto",
            "mirror_views": "none",             # plain views only, before --mirror-views
            "finetune_from": "random",          # plain fine-tuning, before LP-FT
            "teacher_logits": cross_fit.IN_SAMPLE,
            "budget": None}                     # chosen by hand, before --budget


def upgraded(config: Dict[str, Any]) -> Dict[str, Any]:
    """A checked config.json as today's fasttl writes it: the keys added since filled in, values in
    an older form converted (mirror_views True/False: the flag it was before it had modes)."""
    from fasttl.transfer.caching import mirror_mode

    out = dict(added_later(), **config)
    out.setdefault("extract_calibration", None)  # not an option: what names a run's int8 calibration sample
    out["mirror_views"] = mirror_mode(out["mirror_views"])
    return out


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
    int8 = config.get("extract_precision") == "int8"
    if int8 != _hex64(config.get("extract_calibration")):  # one names the sample the other's graph is calibrated on
        raise error(f"{path}: field 'extract_calibration' is {config.get('extract_calibration')!r:.80} where "
                    f"'extract_precision' is {config.get('extract_precision', 'auto')!r} (expected "
                    f"{'a 64-character hash' if int8 else 'null'}: an int8 run names its calibration sample, no "
                    "other run has one); rerun the run, or fix the value there")
