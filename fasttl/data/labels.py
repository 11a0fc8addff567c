"""Class names and labels as users write them: classes files, integer labels, the rule that a
label is what the user meant (a typo is an error, never another class)."""
from __future__ import annotations

import os
import unicodedata
from typing import List, Optional, Sequence, Tuple

from fasttl.util.errors import DataError
from fasttl.util.checks import ascii_digits, decimal, not_utf8, shown
from fasttl.util.outputs import prints_as_is
from fasttl.util.files import absolute, read_plain
from fasttl.util.path_problems import unreachable


# Integer labels without --classes make classes "0".."K-1"; a label above this is a mistake, not a class.
MAX_INDEX_CLASSES = 100_000


def index_class_names(values: Sequence[int], where: str) -> List[str]:
    """Class names "0".."K-1" for integer labels, K bounded (a huge label would allocate K names)."""
    top = max(values)
    if top >= MAX_INDEX_CLASSES:
        raise DataError(f"data: {where}: integer label {top} implies {top + 1} classes (at most "
                        f"{MAX_INDEX_CLASSES}); fix the label, or name the classes with --classes-file FILE")
    return [str(i) for i in range(top + 1)]


def has_control(text: str) -> bool:
    return any(ord(c) < 32 or ord(c) == 127 for c in text)


def _unread(path: str, exc: Exception) -> str:
    """Why the classes file `path` would not read, from the culprit on: a folder on the way one may
    not enter, a file or a loop on the way, a link to nothing, the file's own permission."""
    if isinstance(exc, UnicodeDecodeError):
        return not_utf8(path, exc)
    why = unreachable(path) if isinstance(exc, OSError) else ""
    if why:
        return f"{path} {why}"
    if isinstance(exc, FileNotFoundError) and os.path.islink(path):
        return f"{path} is a symbolic link to nothing (dangling); fix the link, or give the file itself"
    if isinstance(exc, PermissionError):
        return f"cannot read {path} (permission denied); make it readable to you"
    return f"cannot read {path} ({getattr(exc, 'strerror', None) or exc}); give a text file with one class name a line"


def read_classes_file(path: str) -> List[str]:
    """Class names, one a line (blank lines at the end ignored), for --classes FILE. A blank line
    between names is refused: with --labels indices it would be a guess whether it counts."""
    path = absolute(path)
    try:
        text = read_plain(path, 64 << 20).decode("utf-8-sig")  # -sig: a leading byte-order mark is not a name
    except (OSError, ValueError) as exc:  # UnicodeDecodeError is a ValueError
        raise DataError(f"classes: {_unread(path, exc)}") from None
    # Lines end at \n, \r\n or \r (as open() reads text), not at what str.splitlines also takes (U+2028,
    # \x1c, \f ...): a name holding one is refused as unprintable, not split into two that shift the indices.
    lines = [line.strip() for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    if "" in lines:
        raise DataError(f"classes: {path} line {lines.index('') + 1} is blank between class names; remove it (an "
                        "index counts the lines, so a blank one would shift them)")
    names = lines
    if len(names) > MAX_INDEX_CLASSES:  # before the checks below walk them
        raise DataError(f"classes: {path} names {len(names):,} classes, more than the {MAX_INDEX_CLASSES:,} fasttl "
                        "takes; name fewer")
    bad = next((name for name in names if unprintable(name)), None)
    if bad is not None:
        raise DataError(f"classes: {path} names a class with a character that is not printable ({unprintable(bad)}: "
                        f"{bad!r}); use plain text names")
    refuse_lookalikes(names, f"classes: {path} names", lines=True)
    first = {}
    for line, name in enumerate(names, start=1):
        if first.setdefault(name, line) != line:  # a dict of first lines: one pass, not one per name
            raise DataError(f"classes: {path} names {shown(name)} twice (line {first[name]} and line {line}); each "
                            "class once")
    if len(names) < 2:
        raise DataError(f"classes: {path} must name at least 2 classes, one a line (found {len(names)})")
    return names


LABEL_KINDS = ("names", "indices")  # what a file list's labels are: class names, or indices into --classes-file


def numbered_classes(values: Sequence[int]) -> Tuple[List[int], List[str]]:
    """Integer labels without class names: the classes are the distinct values found, in numeric
    order, each named by its number, so no class is left without images (labels 1, 2, 3 are three
    classes "1", "2", "3", not four with an empty "0")."""
    found = sorted(set(values))
    position = {value: i for i, value in enumerate(found)}
    return [position[v] for v in values], [str(v) for v in found]


def label_indices(labels: Sequence[str], classes: Optional[Sequence[str]], where: str,
                   kind: str = "names") -> Tuple[List[int], List[str]]:
    """Labels as class indices and the class names.

    * With `classes` (--classes-file): each label must be one of its names; with kind "indices",
      each must be an index into them instead. A label of another kind is an error, never a guess:
      with classes "3", "7", "9", the label "1" is a typo, not class "7".
    * Without: class names are the labels found, sorted as class folders sort them (integer labels
      in numeric order, each class named by its number); no class is left without images."""
    if kind not in LABEL_KINDS:
        raise DataError(f"labels: unknown {kind!r}; choose from {', '.join(LABEL_KINDS)}")
    if classes is not None:
        names = {name: i for i, name in enumerate(classes)}
        out = []
        for label in labels:
            index = decimal(label) if kind == "indices" else None
            if index is not None and index < len(classes):
                out.append(index)
            elif kind == "names" and label in names:
                out.append(names[label])
            elif kind == "indices":
                raise DataError(f"data: {where}: label {shown(label)} is not an index into the {len(classes)} "
                                "classes of the classes file (--labels indices)")
            else:
                hint = " (to give labels as indices into it, pass --labels indices)" if ascii_digits(label) else \
                    _twin_hint(label, names)
                raise DataError(f"data: {where}: label {shown(label)} is not one of the {len(classes)} classes of the "
                                f"classes file{hint}")
        empty = sorted(set(range(len(classes))) - set(out))
        if out and empty:  # as an empty class folder: a class no image teaches or tests
            raise DataError(f"data: {where}: class {classes[empty[0]]!r} of the classes file has no images"
                            f"{f' (nor {len(empty) - 1} more)' if len(empty) > 1 else ''}; drop it from the classes "
                            "file, or add its images")
        return out, list(classes)
    if kind == "indices":
        raise DataError("labels: --labels indices needs --classes-file to say which class each index is")
    negative = next((label for label in labels if label[:1] == "-" and ascii_digits(label[1:])), None)
    if negative is not None:  # -1 is "unlabeled" in many data sets: never a class of its own
        raise DataError(f"data: {where}: label {negative!r} is negative (-1 often means unlabeled); drop those rows, "
                        f"or name {negative!r} in a --classes-file to make it a class")
    if labels and all(ascii_digits(label) for label in labels):
        huge = next((label for label in labels if decimal(label) is None), None)
        if huge is not None:  # int() of thousands of digits is slow, or refused by Python itself
            raise DataError(f"data: {where}: label {huge[:20]!r}... ({len(huge):,} digits) is no class index; write "
                            "the labels as class names or small indices")
        spelled = {}
        for label in set(labels):
            other = spelled.setdefault(int(label), label)
            if other != label:  # "1" and "01": one index, or two classes? Not guessed
                raise DataError(f"data: {where}: labels {min(other, label)!r} and {max(other, label)!r} are the same "
                                "index written two ways; write them one way, or name both in a --classes-file")
        values = [int(label) for label in labels]
        index_class_names(values, where)  # bounded, as before
        return numbered_classes(values)
    found = sorted(set(labels))
    refuse_lookalikes(found, f"data: {where}: labels")
    index = {name: i for i, name in enumerate(found)}
    return [index[label] for label in labels], found


_KINDS = {"Cc": "a control character", "Zl": "a line separator", "Zp": "a paragraph separator",
          "Zs": "a space that is not ' '", "Cf": "an invisible format character", "Co": "a private-use character",
          "Cn": "an unassigned code point", "Cs": "a lone surrogate"}


def unprintable(name: str) -> Optional[str]:
    """The first character no class name may hold, described ('U+001B ESCAPE, a control
    character'): one a terminal would act on, or that shows nothing or splits a line; None when
    every character may stand in a name."""
    bad = next((c for c in name if not prints_as_is(c)), None)
    if bad is None:
        return None
    title = unicodedata.name(bad, "")
    return f"U+{ord(bad):04X}{' ' + title if title else ''}, {_KINDS.get(unicodedata.category(bad), 'not printable')}"


def _unseen(char: str) -> bool:
    """A character that renders as nothing of its own: a format character (zero-width joiners,
    direction marks), or one Unicode marks Default_Ignorable (variation selectors, the combining
    grapheme joiner, the Hangul and Khmer fillers), or the blank Braille pattern."""
    code = ord(char)
    return unicodedata.category(char) == "Cf" or code == 0x2800 or any(low <= code <= high for low, high in _IGNORABLE)


# Unicode's Default_Ignorable_Code_Point ranges (DerivedCoreProperties.txt, Unicode 15).
_IGNORABLE = ((0x00AD, 0x00AD), (0x034F, 0x034F), (0x061C, 0x061C), (0x115F, 0x1160), (0x17B4, 0x17B5),
              (0x180B, 0x180F), (0x200B, 0x200F), (0x202A, 0x202E), (0x2060, 0x206F), (0x3164, 0x3164),
              (0xFE00, 0xFE0F), (0xFEFF, 0xFEFF), (0xFFA0, 0xFFA0), (0xFFF0, 0xFFF8), (0x1BCA0, 0x1BCA3),
              (0x1D173, 0x1D17A), (0xE0000, 0xE0FFF))


def class_difference(found: Sequence[str], expected: Sequence[str], other: str) -> str:
    """How a data set's classes differ from `other`'s ('the training split', 'the run'), for a
    message: the names in one and not the other, escaped (two spellings can look alike) and cut,
    and why they may look alike (another Unicode form, a letter of another script)."""
    here, there = [c for c in found if c not in expected], [c for c in expected if c not in found]
    if not here and not there:
        return f"has the classes of {other} in another order ({shown(list(found), 120)}); give them in its order"
    listed = [", ".join(ascii(c[:60]) + ("..." if len(c) > 60 else "") for c in names[:5])
              + (f" and {len(names) - 5:,} more" if len(names) > 5 else "") or "none" for names in (here, there)]
    said = f"has classes {other} has not ({listed[0]}) and lacks some it has ({listed[1]})"
    if [unicodedata.normalize("NFC", c) for c in found] == [unicodedata.normalize("NFC", c) for c in expected]:
        return said + ("; the names are the same but written in another Unicode form (NFC vs NFD, as macOS and "
                       "other systems store them): write them in one form")
    try:
        refuse_lookalikes(list(expected) + here, "")
    except DataError as exc:  # 'сat' here, 'cat' there
        return said + ";" + str(exc).split(", so they look the same")[0]
    return said


def _twin_hint(label: str, names) -> str:
    """Where `label` is a class of the classes file written in another Unicode form: says so."""
    nfc = unicodedata.normalize("NFC", label)
    twin = next((name for name in names if unicodedata.normalize("NFC", name) == nfc), None)
    return "" if twin is None else (f": the label is {_form_shown(label, 0, False)} and the classes file has "
                                    f"{_form_shown(twin, 0, False)}, one name in two Unicode forms; write it one way")


def _form_shown(name: str, index: int, lines: bool) -> str:
    """A name escaped (on a terminal its two forms look alike), its Unicode form and its line."""
    form = "NFC" if name == unicodedata.normalize("NFC", name) else \
        "NFD" if name == unicodedata.normalize("NFD", name) else "mixed forms"
    return f"{ascii(name)} ({form}{f', line {index + 1}' if lines else ''})"


# Cyrillic and Greek letters drawn as a Latin one in common fonts (from Unicode's confusables.txt).
_OTHER_SCRIPTS = "аеорсухіјѕԁԛԝһӏАВЕКМНОРСТХІЈЅΑΒΕΖΗΙΚΜΝΟΡΤΥΧοϲν"
_LATIN_LOOK = "aeopcyxijsdqwhlABEKMHOPCTXIJSABEZHIKMNOPTYXocv"
_FULL_WIDTH = {code: code - 0xFEE0 for code in range(0xFF01, 0xFF5F)}  # East Asian fonts' wide ASCII
_AS_LATIN = {**str.maketrans(_OTHER_SCRIPTS, _LATIN_LOOK), **_FULL_WIDTH}


def refuse_lookalikes(names: Sequence[str], where: str, lines: bool = False) -> None:
    """A DataError when two names look the same in every report: one name in two Unicode forms
    (NFC and NFD, as macOS and other systems store them), or two that differ only in white space
    ('cat' and 'cat '), in characters that show nothing ('cat' and 'cat' + U+FE0F), or in a
    Cyrillic, Greek or full-width letter drawn as a Latin one ('cat' with a Cyrillic 'с'). `lines`: the names
    are a file's lines, named by number."""
    seen, drawn = {}, {}
    for index, name in enumerate(names):
        nfc = unicodedata.normalize("NFC", name)
        shown = " ".join("".join(c for c in nfc if not _unseen(c)).split())
        if not shown:  # a class every report shows as blank
            raise DataError(f"{where} {ascii(name)}, a name that shows nothing (only white space or invisible "
                            "characters); rename it")
        other, first = seen.setdefault(shown, (name, index))
        if other == name:  # new, or the same name twice (the caller's duplicate check names it)
            look = drawn.setdefault(shown.translate(_AS_LATIN), name)
            if look != name:
                raise DataError(f"{where} {ascii(look)} and {ascii(name)} differ only in letters drawn alike (a "
                                "Cyrillic, Greek or full-width letter for a Latin one), so they look the same in every "
                                "report; rename one")
            continue
        if unicodedata.normalize("NFC", other) == nfc:
            raise DataError(f"{where} {_form_shown(other, first, lines)} and {_form_shown(name, index, lines)}: one "
                            "name written in two Unicode forms; write it one way")
        if " ".join(unicodedata.normalize("NFC", other).split()) == " ".join(nfc.split()):
            raise DataError(f"{where} {other!r} and {name!r} differ only in white space, so they look the same in "
                            "every report; rename one")
        raise DataError(f"{where} {ascii(other)} and {ascii(name)} differ only in characters that show nothing (format "
                        "characters or variation selectors), so they look the same in every report; rename one")
