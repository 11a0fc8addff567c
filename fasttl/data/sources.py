"""Where images come from, as one of three source types: image files with labels (FileSource),
decoded arrays (ArraySource) and WebDataset shards (TarSource). Each knows its samples, class
names and a content identity (for cache fingerprints); `screen` decodes every image once and
leaves out or names the unreadable ones. The formats that make sources are in formats/.

What a loader asks of any source: `encoded` (its samples are image bytes to decode, or decoded
pixels already), `name_of(i)` (how errors and skip lists name sample i) and, for encoded ones,
`read(i)` (the image's bytes) and `where(i)` (the file on disk and the member in it), for decoded
ones `images` (uint8, N x H x W x 3); for all, `labels` and `classes`."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import ClassVar, List, Optional, Sequence, Set, Tuple, Union

import numpy as np

from fasttl.util.errors import DataError
from fasttl.data.images import (MAX_IMAGE_BYTES, check_all, check_image, check_image_bytes, header_problem,
                                skip_hint, unreadable)
from fasttl.util.files import read_plain


ON_ERROR = ("fail", "skip")


@dataclass
class FileSource:
    """Image files with integer labels and the class names they index.

    `skipped`: (path, reason) of images left out by `screen(..., on_error="skip")`.
    `ignored`: (path, reason) of what a folder scan passed over without reading it: hidden
    (dot) folders and files, files that are not .jpg/.jpeg/.png, files outside class folders,
    broken links and special files. Print them; nothing else reports them."""

    files: List[str]
    labels: List[int]
    classes: List[str]
    root: str = ""
    skipped: List[Tuple[str, str]] = field(default_factory=list)
    ignored: List[Tuple[str, str]] = field(default_factory=list)
    # (begin, end) ranges of `files` whose headers were found clean: a loader per epoch checks once.
    clean_header_ranges: Set[Tuple[int, int]] = field(default_factory=set, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.files)

    def identity(self) -> str:
        """Hash of the class names and the sorted (relative path, size, modification time, label)
        list: changes when any file, label or class name does. The time is in it because an image
        rewritten with other pixels often keeps its size (copies that keep times, cp -p or
        rsync -a, keep the identity)."""
        digest = hashlib.sha256(json.dumps(list(self.classes)).encode())
        for path, label in sorted(zip(self.files, self.labels)):
            rel = os.path.relpath(path, self.root) if self.root else path
            digest.update(f"{rel}\0{size_and_time(path)}\0{label}\n".encode())
        return digest.hexdigest()

    encoded: ClassVar[bool] = True  # samples are image files to decode (see the module's protocol)

    def sample_ids(self) -> List[str]:
        """A name per sample: the file path relative to the source's root (or as given)."""
        return [os.path.relpath(f, self.root) if self.root else f for f in self.files]

    def name_of(self, index: int) -> str:
        return self.files[index]

    def where(self, index: int) -> Tuple[str, Optional[str]]:
        """(the file on disk, the member in it: None for an image file of its own)."""
        return self.files[index], None

    def read(self, index: int) -> bytes:
        """The file's bytes, bounded: a pipe is never waited on, a device or a huge file never read."""
        try:
            return read_plain(self.files[index], MAX_IMAGE_BYTES)
        except ValueError as exc:
            raise DataError(f"{unreadable(self.files[index], exc)}; {skip_hint()}") from None

    def subset(self, indices: Sequence[int]) -> "FileSource":
        return FileSource([self.files[i] for i in indices], [self.labels[i] for i in indices], list(self.classes),
                          self.root, list(self.skipped), list(self.ignored))

    def verify(self, skip_corrupt: bool = False) -> "FileSource":
        """`screen(self, "skip" if skip_corrupt else "fail")`."""
        return screen(self, "skip" if skip_corrupt else "fail")


@dataclass
class ArraySource:
    """Decoded images in memory: uint8 (N, H, W, 3) and labels."""

    images: np.ndarray
    labels: np.ndarray
    classes: List[str]
    name: str = "arrays"

    def __len__(self) -> int:
        return len(self.labels)

    def identity(self) -> str:
        digest = hashlib.sha256(self.name.encode())
        digest.update(np.ascontiguousarray(self.images).tobytes())
        digest.update(np.asarray(self.labels, dtype=np.int64).tobytes())
        return digest.hexdigest()

    encoded: ClassVar[bool] = False  # decoded pixels already

    def sample_ids(self) -> List[str]:
        """A name per sample: NAME:INDEX."""
        return [f"{self.name}:{i}" for i in range(len(self))]

    def name_of(self, index: int) -> str:
        return f"{self.name}:{index}"

    def subset(self, indices: Sequence[int]) -> "ArraySource":
        idx = np.asarray(indices, dtype=np.int64)
        return ArraySource(self.images[idx], self.labels[idx], list(self.classes), self.name)


def size_and_time(path: str) -> str:
    """A file's size and modification time (ns) as identities hash them: what changes when its
    content does, without reading it."""
    try:
        info = os.stat(path)
    except OSError:  # a file list may name a missing file: skipped, or named when it is read
        return "-1"
    return f"{info.st_size}\0{info.st_mtime_ns}"


@dataclass
class TarSource:
    """WebDataset shards: uncompressed tar files whose samples are KEY.jpg (or .jpeg/.png) beside
    KEY.cls (the class index as text). Indexed once (tar headers and the .cls members are read,
    no image), then each image is read from its recorded offset: `read(i)`.

    `members`: (shard index, byte offset, size) of each sample's image; `keys`: each sample's
    KEY; `shards`: the tar paths; sample ids are "<shard path relative to root>/<KEY>".
    `skipped`: (sample id, reason) left out by `screen(..., "skip")` or by the indexing
    (a sample without an image or a .cls, or with an unreadable class)."""

    shards: List[str]
    members: List[Tuple[int, int, int]]
    keys: List[str]
    labels: List[int]
    classes: List[str]
    root: str = ""
    skipped: List[Tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.members)

    def _shard_name(self, shard: int) -> str:
        return os.path.relpath(self.shards[shard], self.root) if self.root else self.shards[shard]

    encoded: ClassVar[bool] = True  # samples are encoded images in the shards

    def sample_ids(self) -> List[str]:
        return [f"{self._shard_name(m[0])}/{k}" for m, k in zip(self.members, self.keys)]

    def name_of(self, index: int) -> str:
        return f"{self._shard_name(self.members[index][0])}/{self.keys[index]}"

    def where(self, index: int) -> Tuple[str, Optional[str]]:
        """(the shard on disk, the sample's key in it)."""
        return self.shards[self.members[index][0]], self.keys[index]

    def identity(self) -> str:
        """Hash of the class names, the shard names and sizes, the sample keys, image sizes and labels."""
        digest = hashlib.sha256(b"webdataset\n" + json.dumps(list(self.classes)).encode())
        for i, shard in enumerate(self.shards):
            digest.update(f"{self._shard_name(i)}\0{size_and_time(shard)}\n".encode())
        for (shard, _, size), key, label in zip(self.members, self.keys, self.labels):
            digest.update(f"{shard}\0{key}\0{size}\0{label}\n".encode())
        return digest.hexdigest()

    def read(self, index: int) -> bytes:
        return self.read_range(index, 0, self.members[index][2])

    def read_range(self, index: int, start: int, count: int) -> bytes:
        """`count` bytes of sample `index`'s image from byte `start` (within it); a member larger
        than an image file may be (its tar header's size: a sparse shard, a video named .jpg) is
        refused before anything is read."""
        shard, offset, size = self.members[index]
        if size > MAX_IMAGE_BYTES:
            raise DataError(f"{self.name_of(index)}: {size:,} bytes, more than the {MAX_IMAGE_BYTES:,} an image file "
                            "may have")
        count = max(0, min(count, size - start))
        with open(self.shards[shard], "rb") as f:
            f.seek(offset + start)
            data = f.read(count)
        if len(data) != count:
            raise DataError(f"{self.name_of(index)}: the tar ends inside this sample (truncated shard)")
        return data

    def subset(self, indices: Sequence[int]) -> "TarSource":
        return TarSource(list(self.shards), [self.members[i] for i in indices], [self.keys[i] for i in indices],
                         [self.labels[i] for i in indices], list(self.classes), self.root, list(self.skipped))


Source = Union[FileSource, ArraySource, TarSource]

SPLIT_FOLDER_NAMES = ("train", "test", "val", "valid", "validation")


def image_folders(source, with_root: bool = True) -> List[str]:
    """Every folder that holds images of `source`, as absolute paths: each image's (or shard's)
    own folder, the root of class folders (root/<class>/: a folder written there would be read as a
    class; a list's own folder is not one), and the data set's folder above a split folder (data/
    of data/train: data/test holds its images too). What fasttl never writes into (a run folder,
    which scans pass over, excepted); arrays have none. `with_root=False`: the images' own folders
    only (where the data option's own folder is checked apart)."""
    if isinstance(source, FileSource):
        listed = {}
        for f in source.files:
            listed.setdefault(os.path.dirname(os.path.abspath(f)), []).append(f)
        # (a folder whose listed images are all missing holds none: their read names them, not this check)
        folders = {folder for folder, names in listed.items() if any(os.path.lexists(f) for f in names)}
    elif isinstance(source, TarSource):
        folders = {os.path.dirname(os.path.abspath(s)) for s in source.shards}
    else:
        return []
    root = os.path.abspath(source.root) if source.root else ""
    if with_root and root and all(os.path.isdir(os.path.join(root, name)) for name in source.classes):
        folders.add(root)
        if os.path.basename(os.path.normpath(root)).lower() in SPLIT_FOLDER_NAMES:
            folders.add(os.path.dirname(root))
    return sorted(folders)


def _screen_tar(source: TarSource, on_error: str, num_threads: Optional[int]) -> TarSource:
    def check(index: int) -> Optional[str]:
        try:
            return check_image_bytes(source.read(index))
        except (DataError, OSError) as exc:
            return str(exc)

    found = check_all(list(range(len(source))), check, num_threads, stop_at_first=on_error == "fail")
    return _apply_policy(source, found, source.sample_ids(), on_error, "the shards") if found else source


def _apply_policy(source, found: List[Tuple[int, str]], ids: Sequence[str], on_error: str, where: str):
    """What the unreadable images `found` ((index, problem), in order) make of `source`: "fail"
    names the first; "skip" leaves them out, listed in `skipped`, unless nothing, or nothing of
    some class, is left."""
    first = f"{ids[found[0][0]]}: {found[0][1]}"
    if on_error == "fail":
        raise DataError(f"{unreadable(ids[found[0][0]], found[0][1])}; {skip_hint(found[0][1])}")
    bad = {index for index, _ in found}
    kept = source.subset([i for i in range(len(source)) if i not in bad])
    kept.skipped = list(source.skipped) + [(ids[i], problem) for i, problem in found]
    if not len(kept):
        raise DataError(f"data: none of the {len(source)} images of {source.root or where} can be read "
                        f"(first: {first})")
    lost = sorted(set(source.labels) - set(kept.labels))
    if lost:
        names = ", ".join(source.classes[i] if 0 <= i < len(source.classes) else str(i) for i in lost)
        raise DataError(f"data: every image of class {names} is unreadable (first: {first}); fix or remove that "
                        "class")
    return kept


def screen(source: Source, on_error: str = "fail", *, num_threads: Optional[int] = None) -> Source:
    """Decodes every image of `source` once (with PIL, on `num_threads` threads, default the CPU
    count) and checks its structure as `header_problem` does.

    * ``on_error="fail"`` (default): the first unreadable file in order raises a one-line
      DataError naming it; otherwise the source comes back unchanged.
    * ``on_error="skip"``: a new source without the unreadable files; each one is appended to its
      ``skipped`` list as (path, reason). A DataError if nothing is left, or if a class loses
      every image.

    An ArraySource (already decoded) comes back as it is."""
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error: expected one of {ON_ERROR}, got {on_error!r}")
    if not source.encoded:
        return source
    if isinstance(source, TarSource):  # checked from bytes in the shards; files by path, in threads
        return _screen_tar(source, on_error, num_threads)
    found = check_all(source.files, check_image, num_threads, stop_at_first=on_error == "fail")
    if not found:
        source.clean_header_ranges.add((0, len(source.files)))
        return source
    kept = _apply_policy(source, found, source.files, on_error, "the file list")
    kept.clean_header_ranges = {(0, len(kept.files))}
    return kept


def first_bad_image(files: Sequence[str], num_threads: Optional[int] = None) -> Optional[Tuple[str, str]]:
    """(path, problem) of the first file in order that `check_image` rejects, or None."""
    found = check_all(files, check_image, num_threads, stop_at_first=True)
    return (files[found[0][0]], found[0][1]) if found else None


def ensure_headers(source: FileSource, begin: int = 0, end: Optional[int] = None) -> None:
    """A DataError naming the first of source.files[begin:end] that `header_problem` rejects
    (about 70 us a file; one thread, as the parse holds the GIL). A range found clean is
    remembered on the source, so a loader per epoch checks it once."""
    end = len(source) if end is None else end
    checked = source.clean_header_ranges
    if (0, len(source.files)) in checked or (begin, end) in checked:
        return
    found = check_all(source.files[begin:end], header_problem, 1, stop_at_first=True)
    if found:
        index, problem = found[0]
        raise DataError(f"{unreadable(source.files[begin + index], problem)}; {skip_hint(problem)}")
    checked.add((begin, end))


def disk_keys(source) -> list:
    """What each sample is on disk, whatever path or pattern named it: its file's (device, inode)
    and its member key in that file (None for a plain image file); None when it can't be found,
    and nothing for decoded arrays."""
    keys = []
    for i in range(len(source) if source.encoded else 0):
        path, member = source.where(i)
        try:
            info = os.stat(path)
        except OSError:
            keys.append(None)
            continue
        keys.append((info.st_dev, info.st_ino, member))
    return keys


def refuse_one_file_twice(paths: Sequence[str], why: str) -> None:
    """A DataError when two paths reach one file (a linked class folder or image, a hard link), as
    a file list naming one image twice is refused: one file under two labels, or in train and test,
    is a label conflict or a leak, never two images."""
    seen = {}
    for path in paths:
        try:
            info = os.stat(path)
        except OSError:
            continue  # gone since the scan: the loaders name it
        key = (info.st_dev, info.st_ino)
        if key in seen:
            first = seen[key]
            same = "is named twice" if first == path else f"is the same file as {first} (a link?)"
            raise DataError(f"data: {path} {same}; {why}: remove one of them")
        seen[key] = path
