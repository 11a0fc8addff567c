"""CSV, TSV and Parquet file lists: one row per image, columns path and label."""
from __future__ import annotations

import csv
import os
from typing import List, Optional, Sequence, Tuple

from fasttl.util.checks import not_utf8
from fasttl.util.errors import DataError
from fasttl.util.outputs import shortened
from fasttl.data.formats.folder import missing_data
from fasttl.data.labels import has_control, label_indices, unprintable
from fasttl.data.sources import FileSource, refuse_one_file_twice
from fasttl.util.files import absolute


LIST_EXTENSIONS = (".csv", ".tsv", ".parquet")


def is_file_list(data: str) -> bool:
    return isinstance(data, str) and data.lower().endswith(LIST_EXTENSIONS)


def _refuse_parquet_bomb(path: str, meta, columns) -> None:
    """The row count and the decompressed size of the list's columns, from the file's footer."""
    if meta.num_rows > MAX_LIST_ROWS:
        raise DataError(f"data: {path} lists {meta.num_rows:,} rows, more than the {MAX_LIST_ROWS:,} a list may hold; "
                        "split it into lists of fewer images")
    index = {meta.schema.column(i).name: i for i in range(meta.num_columns)}
    size = sum(meta.row_group(g).column(index[c]).total_uncompressed_size
               for g in range(meta.num_row_groups) for c in columns if c in index)
    if size > MAX_LIST_TEXT:
        raise DataError(f"data: {path} holds {size:,} bytes of list once decompressed, more than the {MAX_LIST_TEXT:,} "
                        "a list may hold; split it into smaller lists")


def _refuse_decoded_text(path: str, table, columns) -> None:
    """Dictionary-encoded text as it would decode (a 2.5 KB file can repeat a 5,000-character path
    400,000 times): each cell at most a CSV line's bound, all of it at most MAX_LIST_TEXT."""
    import pyarrow as pa
    import pyarrow.compute as pc

    total = 0
    for name in columns:
        for chunk in table.column(name).chunks:
            if not pa.types.is_dictionary(chunk.type):
                lengths = pc.binary_length(chunk)
            else:
                lengths = pc.take(pc.binary_length(chunk.dictionary), chunk.indices)
            longest = pc.max(lengths).as_py() or 0
            if longest > MAX_LIST_LINE:
                raise DataError(f"data: {path} has a {name} of {longest:,} characters; not a file list of path,label "
                                "rows")
            total += pc.sum(lengths).as_py() or 0
    if total > MAX_LIST_TEXT:
        raise DataError(f"data: {path} holds {total:,} characters of paths and labels once decoded, more than the "
                        f"{MAX_LIST_TEXT:,} a list may hold; split it into smaller lists")


def _column_kind(path: str, column: str, kind) -> str:
    """"text" (string, large_string, or a dictionary of either) or "integer" (a label only), read
    from the schema before any value is decoded; else one DataError naming the column."""
    import pyarrow as pa

    kind = kind.value_type if pa.types.is_dictionary(kind) else kind
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return "text"
    if column == "label" and pa.types.is_integer(kind):
        return "integer"
    allowed = "string" if column == "path" else "string or integer"
    raise DataError(f"data: {path} column {column} holds {kind} values; expected {allowed} (write the column as text)")


def _parquet_rows(path: str) -> List[Tuple[str, str]]:
    """(path, label) text of each row of a Parquet list, its row count checked before any is decoded."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"data: reading {path} (Parquet) needs pyarrow, which is not installed: pip install "
                        "pyarrow, or give the list as CSV or TSV") from None
    try:
        schema = pq.read_schema(path)
        columns = schema.names
        twice = [c for c in ("path", "label") if columns.count(c) > 1]
        if twice:  # which one is meant is a guess: refused as in a CSV list
            raise DataError(f"data: {path} has {columns.count(twice[0])} '{twice[0]}' columns (expected one path "
                            "and one label column; rename or drop the others)")
        wanted = [c for c in ("path", "label") if c in columns]
        _refuse_parquet_bomb(path, pq.ParquetFile(path).metadata, wanted)  # from the footer: nothing decoded yet
        text = [c for c in wanted if _column_kind(path, c, schema.field(c).type) == "text"]  # types before reading
        table = pq.read_table(path, columns=wanted, read_dictionary=text)  # repeated text stays one copy
        _refuse_decoded_text(path, table, text)
    except DataError:
        raise
    except Exception as exc:  # pyarrow raises its own types for a bad file
        raise DataError(f"data: {path} is not a readable Parquet file ({type(exc).__name__}: "
                        f"{' '.join(str(exc).split())[:200]})") from None
    missing = [c for c in ("path", "label") if c not in table.column_names]
    if missing:
        raise DataError(f"data: {path} has no {' or '.join(missing)} column (expected columns path and label; "
                        f"found {table.column_names[:10]})")
    for column in ("path", "label"):
        _column_kind(path, column, table.schema.field(column).type)
    return [("" if p is None else str(p), "" if l is None else str(l))  # a null cell is an empty one
            for p, l in zip(table.column("path").to_pylist(), table.column("label").to_pylist())]


def _list_rows(path: str) -> List[Tuple[str, str]]:
    """(path, label) text of each row of a CSV, TSV or Parquet list with path and label columns."""
    if path.lower().endswith(".parquet"):
        return _parquet_rows(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # Excel's "CSV UTF-8" starts with a BOM
            # TSV has no quoting (a " in a name is the name's); a CSV field quoted only in part
            # ("a".jpg) is refused (strict), not read as another file's name (a.jpg).
            dialect = (dict(delimiter="\t", quoting=csv.QUOTE_NONE) if path.lower().endswith(".tsv")
                       else dict(delimiter=",", strict=True))
            reader = csv.DictReader(_bounded_lines(f, path), **dialect)
            fields = [name.strip() for name in reader.fieldnames or []]
            reader.fieldnames = fields
            missing = [c for c in ("path", "label") if c not in fields]
            if missing:
                raise DataError(f"data: {path} has no {' or '.join(missing)} column in its header line (expected "
                                f"path and label; found {fields[:10]})")
            twice = [c for c in ("path", "label") if fields.count(c) > 1]
            if twice:  # which one is meant is a guess (csv takes the last, pandas the first)
                raise DataError(f"data: {path} has {fields.count(twice[0])} '{twice[0]}' columns in its header line "
                                "(expected one path and one label column; rename or drop the others)")
            rows = []
            for line, row in enumerate(reader, start=2):
                if line - 1 > MAX_LIST_ROWS:
                    raise DataError(f"data: {path} lists more than {MAX_LIST_ROWS:,} rows, more than a list may hold; "
                                    "split it into lists of fewer images")
                if row.get("path") is None or row.get("label") is None:
                    raise DataError(f"data: {path} line {line} has fewer fields than its header")
                if any(extra.strip() for extra in row.get(None) or ()):  # a comma in a path cuts it in two
                    raise DataError(f"data: {path} line {line} has more fields than its header (a path or label "
                                    "holding a comma or tab must be quoted)")
                if (row["path"].strip(), row["label"].strip()) == ("path", "label"):  # never an image named "path"
                    raise DataError(f"data: {path} line {line} repeats the header line (two lists joined?); "
                                    "delete that line")
                rows.append((row["path"], row["label"]))  # padding is stripped (and checked) by the caller
            return rows
    except UnicodeDecodeError as exc:
        raise DataError(f"data: {not_utf8(path, exc)}") from None
    except (OSError, csv.Error) as exc:
        raise DataError(f"data: cannot read {path} as a file list ({getattr(exc, 'strerror', None) or exc})") from None


MAX_LIST_LINE = 1 << 20  # characters: a path and a label, with room to spare
# Rows a list may hold: ImageNet-21k's 14.2 million images fit; beyond it a list's rows (as Python
# text, about 250 bytes a row) would take more memory than a list is worth.
MAX_LIST_ROWS = 16_000_000
MAX_LIST_TEXT = 1 << 30  # characters of paths and labels a Parquet list may decode to


def _bounded_lines(f, path: str):
    """The lines of a file list, each read with a bound: a huge file with no line break (not a
    list at all) is refused after a megabyte, not read whole into memory."""
    while True:
        line = f.readline(MAX_LIST_LINE + 1)
        if not line:
            return
        if len(line) > MAX_LIST_LINE:
            raise DataError(f"data: {path} has a line of more than {MAX_LIST_LINE:,} characters; not a file list of "
                            "path,label rows")
        yield line


def _stripped(rows, path: str, root: str):
    """Rows with the padding around their fields dropped ("a.jpg, cat"), where that changes no
    meaning: two labels that differ only in it ('cat', 'cat ') are refused, as they are in a
    Parquet list, and so is a path whose padded name is a file of its own (" a.jpg" beside a.jpg)."""
    spellings = {}
    for _, label in rows:
        spellings.setdefault(label.strip(), set()).add(label)
    for name, seen in spellings.items():
        if len(seen) > 1:
            first, other = sorted(seen)[:2]
            raise DataError(f"data: {path}: labels {shortened(repr(first))} and {shortened(repr(other))} differ only "
                            "in white space, so they look the same in every report; write them one way")
    for line, (image, _) in enumerate(rows, start=2):
        if image != image.strip() and image.strip() and os.path.lexists(os.path.join(root, image)):
            raise DataError(f"data: {path} row {line - 1} names {shortened(repr(image))}, a file whose name has "
                            "leading or trailing spaces (fasttl strips them from list fields); rename the file")
    return [(image.strip(), label.strip()) for image, label in rows]


def read_file_list(path: str, classes: Optional[Sequence[str]] = None, labels_kind: str = "names") -> FileSource:
    """A CSV (.csv), TSV (.tsv) or Parquet (.parquet, needs pyarrow) list with columns path and
    label: image paths relative to the list's folder (absolute ones are kept), labels class
    names or indices (see `label_indices`). Rows stay in the list's order. Files are not opened
    here: `screen` and the loaders check them (a missing one is named, or skipped with
    --on-error skip)."""
    path = absolute(path)
    if not os.path.isfile(path):
        raise missing_data(path, "a CSV, TSV or Parquet file list with path and label columns") \
            if not os.path.isdir(path) else DataError(f"data: {path} is a folder, not a file list")
    root = os.path.dirname(path)
    rows = _stripped(_list_rows(path), path, root)
    if not rows:
        raise DataError(f"data: {path} lists no images (expected a header line and one path,label row per image)")
    for line, (image, label) in enumerate(rows, start=2):
        if not image:
            raise DataError(f"data: {path} row {line - 1} has an empty path")
        if has_control(image):
            raise DataError(f"data: {path} row {line - 1} has a control character (such as NUL) in its path "
                            f"{shortened(repr(image))}; fix the path")
        if not label:
            raise DataError(f"data: {path} row {line - 1} ({shortened(image)}) has an empty label")
        if unprintable(label):  # the rule for class folders and classes files: names that look alike differ
            raise DataError(f"data: {path} row {line - 1} ({shortened(image)}) has a character that is not printable "
                            f"({unprintable(label)}) in its label {shortened(ascii(label))}; fix the label")
    labels, names = label_indices([label for _, label in rows], classes, path, labels_kind)
    if len(names) < 2:
        raise DataError(f"data: {path} names only 1 class ({names[0]}); a classifier needs at least 2")
    files = [absolute(os.path.join(root, image)) for image, _ in rows]  # as the kernel finds them ('lk/..', 'x.jpg/')
    first = {}
    for row, file in enumerate(files, start=1):
        sample = os.path.relpath(file, root)  # its sample id: 'x.jpg' and 'x.jpg/.' (unreadable) share one
        if sample in first:  # twice in one list: a label conflict, or a test image that could also train
            raise DataError(f"data: {path} lists {shortened(rows[row - 1][0])} twice (rows {first[sample]} and {row}); "
                            "give each image once")
        first[sample] = row
    refuse_one_file_twice(files, "a list names each image once (through a linked folder or a hard link too)")
    return FileSource(files, labels, names, root)
