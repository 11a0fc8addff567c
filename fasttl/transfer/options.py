"""How a run option is declared: one dataclass field holding its default, help, choices, value
check and command-line form, written once. The options every run reads live in config.py; a
strategy declares the options only it reads in its own class (Strategy.options), and RunConfig,
`fasttl run`'s flags and --help, and the refusals (a value out of range, a required option
missing, an option no trained strategy reads) are generated from these fields."""
from __future__ import annotations

from dataclasses import field
from typing import Callable, Optional

from fasttl.util.checks import finite, positive_int
from fasttl.util.errors import OptionError

Check = Callable[[str, object], None]  # (option name, value): raises OptionError naming the option


def option(default, help: str, *, kind=None, choices=None, metavar: Optional[str] = None, cli: bool = True,
           const=None, repeat: bool = False, check: Optional[Check] = None, scoped: bool = False,
           convert: Optional[Callable[[object], object]] = None, path: bool = False):
    """A RunConfig field. `kind`: the value's type on the command line (str, int, float; bool for
    a flag); `choices`: a tuple, or a callable returning one (looked up when asked); `const`: the
    value of the flag given without one (its value is then optional on the command line);
    `repeat`: the flag may be given several times, the value is then the list of them; `check`:
    the value's test once the strategy's defaults are in; `scoped`: an option of the common set
    that only the strategies listing it in `reads` take (a strategy's own options always are);
    `convert`: maps a value given in an older form to today's (when the config is made); `path`:
    the value names a file or folder (a list of them with `repeat`): a pathlib.Path is taken as its
    text, and a run compares it on --resume as the path it names (`./data/` and `data` are one)."""
    kind = kind or type(default)
    return field(default=default, metadata=dict(help=help, kind=kind, choices=choices, metavar=metavar, cli=cli,
                                                 const=const, repeat=repeat, check=check, scoped=scoped,
                                                 convert=convert, path=path))


def choices_of(metadata: dict) -> Optional[tuple]:
    choices = metadata["choices"]
    return choices() if callable(choices) else choices


# ---- value checks (the `check` of an option) -----------------------------------------------------
def a_path(name: str, value) -> None:
    """None or a path (a string); an empty one is refused (`--out "$DIR"` with DIR unset), not
    taken for the current folder or for "not given"."""
    if value is not None and not isinstance(value, str):
        raise OptionError(f"{name}: expected a path (a string), got {value!r}")
    if value is not None and not value.strip():
        raise OptionError(f"{name}: an empty or blank path (an unset variable?); give --{name.replace('_', '-')} a "
                          "path, or leave it out")


def a_positive_int(name: str, value) -> None:
    positive_int(name, value, OptionError)


def an_optional_positive_int(name: str, value) -> None:
    positive_int(name, value, OptionError, optional=True)


def a_positive_number(name: str, value) -> None:
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and finite(value) and value > 0):
        raise OptionError(f"{name}: expected a finite number > 0, got {value!r}")


def a_learning_rate(name: str, value) -> None:
    """A finite number > 0 that float32 holds: the optimizers step in float32 (a larger one fails
    there, after the data was read and the features extracted)."""
    from fasttl.optim import FLOAT32_MAX, FLOAT32_TINY

    a_positive_number(name, value)
    if not FLOAT32_TINY <= value <= FLOAT32_MAX:  # below: float32 holds it as 0 or a denormal, no training
        raise OptionError(f"{name}: expected a number from {FLOAT32_TINY:.7g} to {FLOAT32_MAX:.7g} (float32's "
                          f"normal range; the optimizers step in float32), got {value!r}")


def an_optional_positive_number(name: str, value) -> None:
    """None (chosen on validation) or a finite number > 0."""
    if value is not None:
        a_positive_number(name, value)


def an_optional_fraction(name: str, value) -> None:
    """None (chosen on validation) or a number in [0, 1]."""
    if value is not None and not (isinstance(value, (int, float)) and not isinstance(value, bool)
                                  and 0.0 <= value <= 1.0):
        raise OptionError(f"{name}: expected a number in [0, 1], got {value!r}")
