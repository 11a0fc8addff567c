"""Argument checks every layer repeats, written once: each raises the caller's error type with a
message naming the argument."""
from __future__ import annotations

from fasttl._op_checks import finite  # noqa: F401  (a kernel-layer check every layer names here)


def positive_int(name: str, value, error=ValueError, optional: bool = False):
    """`value` when it is an int >= 1 (True is not 1 here), or None when `optional`; else `error`
    naming `name` (a numpy integer too: the Python API's entry points make it Python's first, with
    plain_number, so that what they keep and record is plain)."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise error(f"{name}: expected a positive integer, got {value!r}")
    return value


# The largest image side fasttl resizes to: a bigger one is a typo (its activations outgrow memory).
MAX_IMAGE_SIZE = 1024


def check_image_size(name: str, value, error=ValueError) -> int:
    """`value` when it is an image side fasttl handles (1 to MAX_IMAGE_SIZE pixels); else `error`
    (a numpy integer: refused here; TransformSpec makes it plain first)."""
    value = positive_int(name, value, error)
    if value > MAX_IMAGE_SIZE:
        raise error(f"{name}: {value} px is more than fasttl handles ({MAX_IMAGE_SIZE})")
    return value


# More digits than any count, rank, port or size fasttl reads from text needs; int() of a longer
# string is slow, and past 4,300 digits refused by Python itself with a traceback.
MOST_DECIMAL_DIGITS = 18


def ascii_digits(text) -> bool:
    """Whether `text` is spelled in ASCII decimal digits alone, however many: str.isdigit() takes
    '²' and '٣', which int() refuses or reads differently."""
    return isinstance(text, str) and text.isascii() and text.isdigit()


def is_utf8(text: str) -> bool:
    """Whether `text` is UTF-8 text: a name or argument of bytes in another encoding (Latin-1) comes
    from the OS as lone surrogates, which UTF-8 outputs (TensorBoard, a URL, a CSV) can't hold."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def not_utf8(path: str, exc: UnicodeDecodeError) -> str:
    """Why the text file `path` would not read as UTF-8, for a message: the first byte that is no
    UTF-8 (Python's codec text names no file and no fix)."""
    byte = exc.object[exc.start:exc.start + 1].hex().upper()
    return (f"{path} is not UTF-8 text (byte 0x{byte}, as Latin-1 or another code page writes \u00e9 and its like); "
            "save it as UTF-8")


def decimal(text, signed: bool = False):
    """The int that `text` spells in ASCII decimal digits (at most MOST_DECIMAL_DIGITS of them; a
    leading '-' too where `signed`), else None (int() of thousands of digits is slow, or refused
    by Python itself)."""
    negative = signed and isinstance(text, str) and text[:1] == "-"
    digits = text[1:] if negative else text
    if not ascii_digits(digits) or len(digits) > MOST_DECIMAL_DIGITS:
        return None
    return -int(digits) if negative else int(digits)


def shown(value, most: int = 40) -> str:
    """A value read from outside in a message: its first `most` characters (a line of a list, an
    environment variable or a field of a hand-edited file may hold a megabyte); text as its repr,
    anything else by its repr cut alike."""
    try:
        text = value if isinstance(value, str) else repr(value)
    except ValueError:  # an int past Python's 4,300-digit limit for text
        text = f"an integer of {value.bit_length():,} bits"
    cut = text[:most]
    return (repr(cut) if isinstance(value, str) else cut) + (f"... ({len(text):,} characters)" if len(text) > most
                                                               else "")


def plain_number(value):
    """NumPy's numbers (scalars and 0-d arrays) as Python's, anything else as it is: for the Python
    API, where a count often comes out of an array. The option's own check then judges the value
    (a bool or a float where an integer belongs is refused there, not truncated here)."""
    return value.item() if type(value).__module__ == "numpy" and getattr(value, "ndim", None) == 0 else value


def order_number(name: str, value, bits: int) -> int:
    """A loader's seed (any in [0, 2**64): each has its own order) or epoch (an integer in
    [0, 2**63)); the order's generator reads them modulo 2**64, so 2**64 would give 0's order
    again, -1 that of 2**64 - 1: refused, not folded."""
    import operator

    try:  # operator.index, not int(): a float tensor or array (1.9) is no integer, not 1
        number = None if isinstance(value, bool) else operator.index(value)
    except (TypeError, ValueError, RuntimeError, OverflowError):  # (a uint64 tensor past int64: RuntimeError)
        number = None
    if number is None:
        raise TypeError(f"{name}: expected an integer, got {value!r}")
    if not 0 <= number < 2**bits:
        raise ValueError(f"{name}: expected an integer in [0, 2**{bits}), got {value!r}")
    return number


def a_flag(name: str, value, error=TypeError) -> bool:
    """`value` as True or False (numpy's bools as Python's), nothing else: `overwrite="no"` from
    a script is a mistake, never True."""
    value = plain_number(value)
    if not isinstance(value, bool):
        raise error(f"{name}: expected True or False, got {value!r}")
    return value


def folder_path(name: str, value, error=None, what: str = "a folder") -> str:
    """A folder argument of the Python API as text: a str or os.PathLike; a blank one is refused
    (it would mean the current folder: an unset variable, most likely). `error`: the class raised
    (TypeError / ValueError when left out)."""
    import os

    from fasttl.util.files import plain_path

    text = plain_path(value) if isinstance(value, (str, os.PathLike)) else None
    if not isinstance(text, str):
        raise (error or TypeError)(f"{name}: expected {what}'s path (a str or a pathlib.Path), got "
                                   f"{type(value).__name__}")
    if not text.strip():
        here = "" if "file" in what else " ('.' for the current one)"
        raise (error or ValueError)(f"{name}: an empty or blank path (an unset variable?); give {what}{here}")
    return text


def torch_device(value, name: str = "device"):
    """`value` (cpu, cuda or cuda:N) as a torch.device this machine has; else an OptionError
    naming `name` (a GPU asked for where torch sees none says so)."""
    import torch

    from fasttl.util.errors import OptionError

    try:
        if isinstance(value, (bytes, bytearray, bool)):  # (torch takes b"cpu", and True as the index cuda:1)
            raise TypeError
        device = torch.device(value)
    except (RuntimeError, TypeError, ValueError):
        raise OptionError(f"{name}: expected cpu, cuda or cuda:N, got {value!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise OptionError(f"{name}: {device} asked for, but torch sees no CUDA GPU; pass --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise OptionError(f"{name}: {device} asked for, but torch sees {torch.cuda.device_count()} GPU(s)")
    elif device.type != "cpu":
        raise OptionError(f"{name}: expected cpu, cuda or cuda:N, got {str(device)!r}")
    elif device.index:  # (torch takes cpu:7 and means the one CPU device: a typo of cuda:7?)
        raise OptionError(f"{name}: {device} asked for, but there is one CPU device; pass cpu (or cuda:{device.index} "
                          "for a GPU)")
    return device


def _longest_name(folder: str) -> int:
    """The longest file name `folder`'s file system takes, in bytes (255 where it can't say; no
    bound where it has none)."""
    import os

    try:
        longest = os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255
    return longest if longest > 0 else 1 << 30


def check_output_path(path: str, overwrite: bool, flag: str = "--out", ending: str = "") -> str:
    """An output file fasttl may write: a new file in an existing folder, or with `overwrite` a
    plain file it replaces. A link, a folder or anything else there is refused, whatever the flag;
    so is a name without `ending` (".onnx"). Checked before any work, so a mistake costs nothing,
    and in the order no flag can mend: the run folder, the name, then what is there."""
    import os

    from fasttl.util.errors import OptionError

    name = flag.lstrip("-").replace("-", "_")
    given = os.fspath(path) if isinstance(path, (str, os.PathLike)) else None
    if not isinstance(given, str):
        raise OptionError(f"{name}: expected a file path (a str or a pathlib.Path), got {type(path).__name__}")
    last = os.path.basename(given)
    if given and last in ("", os.curdir, os.pardir):  # 'p.csv/.' names a folder to the kernel (abspath: p.csv)
        raise OptionError(f"{name}: {given!r} names a folder (it ends in /{last}); give {flag} a file name")
    from fasttl.util.files import absolute, enclosing_run_folder
    from fasttl.util.path_problems import blocking_part, not_a_folder, unreachable, unwritable

    path = absolute(given)
    parent = os.path.dirname(path)

    holder = enclosing_run_folder(parent)
    if holder is not None:  # a run's folder holds only what its run wrote: eval, predict and export never mix in
        raise OptionError(f"{name}: {path} is in the fasttl run folder {holder}, which only its run writes into; "
                          f"give another {flag}")  # first: no flag would make the other refusals go away
    if not path.lower().endswith(ending):  # before "exists; pass --overwrite", which can't mend a name
        example = {".csv": "predictions"}.get(ending, "model")
        raise OptionError(f"{name}: {given!r} does not end in {ending} (name the file {example}{ending}, say)")
    if os.path.islink(path):
        raise OptionError(f"{name}: {path} is a symbolic link; fasttl does not write through links (give another "
                          f"{flag})")
    if os.path.lexists(path):
        if not os.path.isfile(path):
            raise OptionError(f"{name}: {path} exists and is not a plain file (give another {flag})")
        if not overwrite:
            raise OptionError(f"{name}: {path} exists; pass --overwrite to replace it, or another {flag}")
    if not os.path.isdir(parent):
        if why := unreachable(parent):  # behind a folder one may not enter: never "does not exist" or a dangling link
            raise OptionError(f"{name}: {parent} {why}")
        blocked = blocking_part(path)  # what is in the way, where it is further up than the file's folder
        if blocked is not None and blocked != parent:
            raise OptionError(f"{name}: {blocked} {not_a_folder(blocked)}, where {parent} needs a folder (give "
                              f"another {flag} in an existing folder)")
        raise OptionError(f"{name}: {parent} {not_a_folder(parent)} (give another {flag} in an existing folder)")
    if why := unwritable(parent):  # the file is written last: refused before the work, not after it
        raise OptionError(f"{name}: {parent}: {why}")  # which output, where --json and --plot share a folder
    if len(os.fsencode(os.path.basename(path))) > _longest_name(parent):
        raise OptionError(f"{name}: {os.path.basename(path)[:40]}... is a name too long for the file system of "
                          f"{parent}; give {flag} a shorter name")
    return path
