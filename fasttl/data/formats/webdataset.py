"""WebDataset shards: uncompressed tars of KEY.jpg beside KEY.cls, indexed once, read at offsets."""
from __future__ import annotations

import os
import re
import tarfile
from typing import List, Optional, Sequence

from fasttl.util.errors import DataError
from fasttl.data.formats.folder import missing_data
from fasttl.data.labels import index_class_names, numbered_classes
from fasttl.util.checks import ascii_digits, is_utf8
from fasttl.util.files import absolute
from fasttl.data.sources import TarSource, refuse_one_file_twice


def is_webdataset(data: str) -> bool:
    return isinstance(data, str) and data.lower().endswith(".tar")


# More shards than this in one pattern is a typo (a range too wide, or ranges multiplied), not a data set.
MAX_SHARDS = 1_000_000


def _shard_count(pattern: str) -> int:
    """How many names the pattern's brace groups make together (each innermost group counted)."""
    count = 1
    for body in re.findall(r"\{([^{}]*)\}", pattern):
        numeric = re.fullmatch(r"(\d+)\.\.(\d+)", body)
        count *= max(int(numeric.group(2)) - int(numeric.group(1)) + 1, 1) if numeric else len(body.split(","))
    return count


def expand_braces(pattern: str) -> List[str]:
    """WebDataset's shard patterns: {000000..000127} (zero-padded numeric ranges) and {a,b,c}, side
    by side (not nested)."""
    depth = 0
    for character in pattern:  # nested groups re-expand per outer item: counting them would cost the expansion
        depth = depth + 1 if character == "{" else max(depth - 1, 0) if character == "}" else depth
        if depth > 1:
            raise DataError(f"data: {pattern} nests brace groups; write each group apart ({{a,b}}{{0..9}}, not "
                            "{a,{0..9}})")
    count = _shard_count(pattern)
    if count > MAX_SHARDS:
        raise DataError(f"data: {pattern} names {count:,} shards (at most {MAX_SHARDS:,}); check its brace ranges")
    return _expand(pattern)


def _expand(pattern: str) -> List[str]:
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match is None:
        return [pattern]
    head, tail, body = pattern[:match.start()], pattern[match.end():], match.group(1)
    numeric = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numeric:
        first, last = numeric.groups()
        width = len(first) if first.startswith("0") else 0
        if int(last) < int(first) or int(last) - int(first) > 10_000_000:
            raise DataError(f"data: shard range {{{body}}} in {pattern} is empty or too large")
        items = [str(i).zfill(width) for i in range(int(first), int(last) + 1)]
    else:
        items = body.split(",")
    return [expanded for item in items for expanded in _expand(head + item + tail)]


_WDS_IMAGE = (".jpg", ".jpeg", ".png")


def read_webdataset(pattern: str, classes: Optional[Sequence[str]] = None) -> TarSource:
    """The samples of the WebDataset shards `pattern` names (brace pattern or one .tar path), in
    shard order then tar order. Each sample: KEY.jpg/.jpeg/.png and KEY.cls holding the class
    index as text. Class names: `classes` (from --classes FILE), else the indices found (each class
    named by its number; an index no sample has makes no class).
    A sample without an image or a class is listed in `skipped` (reason given), never silently
    dropped; a class that is not an index into the classes, or a tar that cannot be read, is a
    DataError."""
    pattern = os.path.expanduser(pattern)
    shards = [absolute(p) for p in expand_braces(pattern)]
    refuse_one_file_twice(shards, "its samples would be read twice, some in training and in the test split")
    root = os.path.dirname(absolute(pattern.split("{", 1)[0] + "x"))
    members, keys, labels, skipped = [], [], [], []
    for shard_index, shard in enumerate(shards):
        name = os.path.relpath(shard, root)
        samples, duplicates = _index_shard(shard, shard_index)
        for key, entry in samples.items():
            why = _left_out(entry, key in duplicates)
            if why is not None:
                skipped.append((f"{name}/{key}", why))
                continue
            label = entry["cls"]
            # A class that is no index is a label error, as a file list's: never an image left out.
            if label is None or not ascii_digits(label) or (classes is not None and int(label) >= len(classes)):
                into = f"the {len(classes)} classes of the classes file" if classes else "the classes"
                shown = "of more than 64 bytes" if label is None else repr(label)
                raise DataError(f"data: {name}/{key}.cls: class {shown} is not an index into {into} (a "
                                "WebDataset .cls holds a class index 0, 1, ...); fix or remove that sample")
            members.append(entry["image"])
            keys.append(key)
            labels.append(int(label))
    if not members:
        raise DataError(f"data: {pattern} holds no samples (expected KEY.jpg with KEY.cls in each tar)")
    if classes is not None:
        names = list(classes)
        empty = sorted(set(range(len(names))) - set(labels))
        if empty:  # as an empty class folder: a class no image teaches or tests
            raise DataError(f"data: {pattern}: class {names[empty[0]]!r} of the classes file has no samples"
                            f"{f' (nor {len(empty) - 1} more)' if len(empty) > 1 else ''}; drop it from the classes "
                            "file, or add its samples")
    else:
        index_class_names(labels, pattern)  # bounded
        labels, names = numbered_classes(labels)
    if len(names) < 2:
        raise DataError(f"data: {pattern} has only class {names[0]}; a classifier needs at least 2 classes")
    return TarSource(shards, members, keys, labels, names, root, skipped)


def _refuse_undecodable(shard: str, name: str, what: str) -> None:
    """A name in another encoding than UTF-8 (a tar made on Windows) can't be hashed or written:
    named and refused, as in class folders."""
    if not is_utf8(name):
        raise DataError(f"data: {ascii(shard)}: the {what} {ascii(name)} has a name that is not valid UTF-8 (bytes of "
                        "another encoding, such as Latin-1); rename it")


def _index_shard(shard: str, shard_index: int):
    """({key: {"image": (shard, offset, size), "cls": text, "other": [names]}}, keys with two images
    or two classes) of one shard: tar headers and the .cls members read, no image."""
    if not os.path.isfile(shard):
        raise missing_data(shard, "WebDataset .tar shards (a brace pattern: shards/train-{000000..000127}.tar)") \
            if not os.path.isdir(shard) else DataError(f"data: {shard} is a folder, not a .tar shard")
    _refuse_undecodable(shard, shard, "shard")
    samples, duplicates = {}, set()
    try:
        with tarfile.open(shard, "r:") as tar:
            for member in tar:
                _refuse_undecodable(shard, member.name, "member")
                base = os.path.basename(member.name)
                if member.islnk() and os.path.splitext(base)[1].lower() in _WDS_IMAGE:  # tar's second hard link
                    raise DataError(f"data: {shard}: {member.name} is a hard link to {member.linkname} (one image "
                                    "under two keys); write the shard with tar --hard-dereference")
                if not member.isfile() or base.startswith("."):
                    continue
                key, _, ext = base.partition(".")  # as WebDataset reads it: the key ends at the first dot
                folder = os.path.dirname(member.name)
                key = f"{folder}/{key}" if folder else key
                entry = samples.setdefault(key, {})
                ext = "." + ext.lower()
                part = "image" if ext in _WDS_IMAGE else "cls" if ext == ".cls" else "other"
                if part != "other" and part in entry:  # a second image (or class) for one key
                    duplicates.add(key)
                if member.issparse() and part != "other":  # stored compacted: its bytes at offset_data are not the file
                    raise DataError(f"data: {shard}: {member.name} is a sparse tar member (tar -S/--sparse); write the "
                                    "shard without -S")
                if part == "image":
                    entry["image"] = (shard_index, member.offset_data, member.size)
                elif part == "cls":
                    entry["cls"] = None if member.size > 64 else \
                        tar.extractfile(member).read().decode("utf-8", "replace").strip()
                else:
                    entry.setdefault("other", []).append(base)  # metadata (.json), or a dotted key
            end = tar.offset  # where the header after the last member is, or the end-of-archive blocks
        with open(shard, "rb") as f:
            f.seek(end)
            tail = f.read(tarfile.BLOCKSIZE)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DataError(f"data: {shard} is not a readable tar file ({' '.join(str(exc).split())[:200]})") from None
    if len(tail) < tarfile.BLOCKSIZE or tail.strip(b"\0"):
        # tarfile ends quietly where a cut falls between members: the lost samples would go unnoticed
        raise DataError(f"data: {shard} ends without tar's end-of-archive blocks: it was cut short (copy or write "
                        "the shard again)")
    return samples, duplicates


def _left_out(entry: dict, twice: bool) -> Optional[str]:
    """Why a key's sample is left out (listed in `skipped`), or None when it is one."""
    if twice:
        return "the key names two images or two classes in this shard"
    if "image" in entry and "cls" in entry:
        return None
    if "image" in entry or "cls" in entry:
        return f"sample has {'no .jpg/.jpeg/.png image' if 'image' not in entry else 'no .cls class'}"
    return (f"no .jpg/.jpeg/.png image or .cls among its members {', '.join(entry['other'][:3])} (a key ends at the "
            "first dot of a member's name)")


def write_webdataset(source, out: str, per_shard: int = 10000, prefix: str = "train") -> List[str]:
    """Writes an image-file source as WebDataset shards: each sample KEY.jpg (the file's bytes,
    unchanged) beside KEY.cls (the class index as text), in the source's order, so a cache built
    from the shards equals the cache built from the files row for row; and out/classes.txt. The
    shard paths written (out/<prefix>-000000.tar, ...)."""
    import io

    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "classes.txt"), "w") as f:
        f.write("\n".join(source.classes) + "\n")
    paths = []
    for shard, start in enumerate(range(0, len(source), per_shard)):
        path = os.path.join(out, f"{prefix}-{shard:06d}.tar")
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(start, min(len(source), start + per_shard)):
                key = f"{i:08d}"
                with open(source.files[i], "rb") as image:
                    jpeg = image.read()
                for name, data in ((f"{key}.jpg", jpeg), (f"{key}.cls", str(source.labels[i]).encode())):
                    info = tarfile.TarInfo(name)
                    info.size, info.mtime = len(data), 0
                    tar.addfile(info, io.BytesIO(data))
        paths.append(path)
    return paths
