"""Text fasttl did not make (class names, file paths, sample ids), escaped for each kind of output
it writes: a CSV cell a spreadsheet would run as a formula, a Markdown table cell a `|` would
split or HTML would reach into, a plot label matplotlib would read as math."""
from __future__ import annotations

import html
import re

# Characters Python calls unprintable that real names hold, kept as they are in names and in every
# output: no-break spaces and the ideographic space, zero-width (non-)joiners (a Persian word, an
# emoji sequence), the left-to-right and right-to-left marks, and the tags of a flag emoji (🏴 of
# Scotland). None of them moves a terminal's cursor or splits a line.
NAME_MARKS = frozenset("\u00a0\u202f\u3000\u200c\u200d\u200e\u200f" + "".join(map(chr, range(0xE0020, 0xE0080))))

# A spreadsheet takes a cell starting with one of these as a formula (OWASP, "CSV Injection").
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r", "\n")


def prints_as_is(char: str) -> bool:
    """Whether outputs write `char` as itself: a printable one, or a mark real names hold (NAME_MARKS);
    any other (an escape sequence's ESC, BEL, a line break) is escaped, and no class name holds it."""
    return char.isprintable() or char in NAME_MARKS


def terminal_text(text: object) -> str:
    """`text` with every character that does not print as itself written as its Python escape: it
    can't drive a terminal or split a line."""
    return "".join(c if prints_as_is(c) else c.encode("unicode_escape").decode("ascii") for c in str(text))


def csv_cell(text: object) -> str:
    """`text` as a CSV cell no spreadsheet runs: one that starts like a formula gets a leading
    apostrophe (OWASP's advice; the csv module quotes what else needs it); characters that are
    not printable are escaped (terminal_text), as the CSV is often printed, and a backslash is
    doubled so that a name holding a backslash and an `n` never reads as one holding a line break.
    A cell that starts with the apostrophe itself gets one more, so `'=cat` and `=cat` stay two."""
    text = terminal_text(str(text).replace("\\", "\\\\"))
    starts = text.lstrip("".join(NAME_MARKS))  # an invisible mark before `=` hides the start from this check only
    return "'" + text if starts.startswith(_FORMULA_STARTS + ("'",)) else text


_MARKDOWN_SPECIAL = "\\`*_{}[]()#+!|~$"
_BREAKS = re.compile(r"[^\S\u00a0\u202f\u3000]+")  # white space, but the no-break spaces names hold


# GitHub's Markdown makes links of bare addresses (www.x.y, https://..., a@b.c) in text: as
# character references these characters render the same but never start or continue one.
_AUTOLINK_PARTS = {".": "&#46;", ":": "&#58;", "@": "&#64;"}


def markdown_cell(text: object) -> str:
    """`text` inside a Markdown table cell, shown as it is: HTML escaped, every character Markdown
    gives a meaning (links, images, emphasis, `|`) backslash-escaped, what would make a bare
    address a link written as a character reference, line breaks as spaces, characters that are
    not printable escaped (terminal_text)."""
    text = html.escape(terminal_text(_BREAKS.sub(" ", str(text)).strip(" ")), quote=False)
    return "".join("\\" + c if c in _MARKDOWN_SPECIAL else _AUTOLINK_PARTS.get(c, c) for c in text)


def terminal_lines(text: object) -> str:
    """Lines of text for the terminal: each line as terminal_text, the line breaks kept."""
    return "\n".join(terminal_text(line) for line in str(text).split("\n"))


PLOT_LABEL_CHARACTERS = 40  # a class name's share of a plot's ticks (a list's label may be a megabyte)


def plot_label(text: object) -> str:
    """`text` as a matplotlib label shown as it is: `$` (mathtext) escaped, and cut to
    PLOT_LABEL_CHARACTERS with an ellipsis (laying out a 100,000-character tick took 25 s)."""
    text = str(text)
    if len(text) > PLOT_LABEL_CHARACTERS:  # cut in the middle: hierarchical names differ at their ends
        half = (PLOT_LABEL_CHARACTERS - 1) // 2
        text = text[:half] + "\u2026" + text[-(PLOT_LABEL_CHARACTERS - 1 - half):]
    return text.replace("$", r"\$")


def plot_labels(names) -> list:
    """plot_label of each name, told apart by their index where two cut names come out alike."""
    labels = [plot_label(name) for name in names]
    counts = {}
    for label in labels:
        counts[label] = counts.get(label, 0) + 1
    return [f"{label} [{i}]" if counts[label] > 1 else label for i, label in enumerate(labels)]


def shortened(text: object, keep: int = 200) -> str:
    """`text` in a message: at most `keep` characters, its middle cut out (a list's cell may hold
    a megabyte; its start and end tell which it is)."""
    text = str(text)
    return text if len(text) <= keep else f"{text[:keep // 2]}...{text[-keep // 2:]} ({len(text):,} characters)"


def counted(count: int, noun: str, plural: str = "") -> str:
    """'1 image', '2 images'; '1 entry', '2 entries' with `plural` given."""
    return f"{count} {noun if count == 1 else plural or noun + 's'}"


def within(path: str, folder) -> str:
    """`path` as a line about `folder` says it: from that folder on (train/b and test/b are two
    entries), else its name."""
    import os

    from fasttl.util.files import absolute

    if isinstance(folder, str):
        relative = os.path.relpath(path, absolute(folder))
        if not relative.startswith(os.pardir):
            return relative
    return os.path.basename(path)


def skipped_line(skipped, most: int = 5) -> str:
    """The line that says which images --on-error skip left out: (path, why) pairs, the first
    `most` shown (the rest counted)."""
    shown = terminal_text("; ".join(f"{path} ({why})" for path, why in skipped[:most]))
    more = f" and {len(skipped) - most} more" if len(skipped) > most else ""
    return f"skipped {counted(len(skipped), 'image')}: {shown}{more}"


def passed_over(ignored, folder=None, where: str = "the data folder", most: int = 3) -> str:
    """The line that says what a scan of `where` did not read: (path, why) pairs, each path said
    from the folder `folder` on (as it is without one); the first `most` shown."""
    shown = "; ".join(f"{within(path, folder) if folder is not None else path} ({why})" for path, why in ignored[:most])
    more = f" and {len(ignored) - most} more" if len(ignored) > most else ""
    return terminal_text(f"passed over {counted(len(ignored), 'entry', 'entries')} of {where}: {shown}{more}")
