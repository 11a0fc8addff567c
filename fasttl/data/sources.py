"""Where images come from: class folders, CIFAR python pickles, or an explicit (path, label) list.
Each source knows its samples, class names and a content identity (for cache fingerprints).

Files from users are data, never code: CIFAR pickles go through a restricted unpickler, and every
image file is checked before NVIDIA DALI sees it (`header_problem`), because DALI 2.x crashes the
process (SIGSEGV in its decoder's worker threads) when its parser rejects one sample of a batch."""
from __future__ import annotations

import csv
import hashlib
import json
import io
import os
import re
import tarfile
import unicodedata
import pickle
import stat
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

from fasttl.util.errors import UserError
from fasttl.util.files import RUN_MARKER, read_plain
from fasttl.util import settings

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
ON_ERROR = ("fail", "skip")
# A larger image is refused before any decoder allocates it: neither backend needs hundreds of MB
# per sample to make a 224-pixel input, and a forged header must not make either one try.
MAX_IMAGE_PIXELS = int(settings.MAX_IMAGE_PIXELS.default)


def max_image_pixels() -> int:
    """The pixel budget in effect: FASTTL_MAX_IMAGE_PIXELS, else MAX_IMAGE_PIXELS (read when used,
    so that a bad value is one line naming the variable, never a failure at import)."""
    given = settings.MAX_IMAGE_PIXELS.raw()
    if given is None:
        return MAX_IMAGE_PIXELS
    value = given.strip().replace("_", "")
    if not value.isdigit() or int(value) < 1:
        raise DataError(f"FASTTL_MAX_IMAGE_PIXELS: expected a positive number of pixels, got {given!r} (unset it "
                        f"for the default {MAX_IMAGE_PIXELS:,})")
    return int(value)
MAX_IMAGE_BYTES = 1 << 30  # no photo's file is larger: a bigger one (a sparse file, a device) is not read
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# PNG bit depths per color type (PNG spec table 11.1), as DALI's (nvImageCodec's) parser checks them.
_PNG_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # samples per pixel of each color type


class DataError(UserError, ValueError):
    """A dataset problem, naming the file or folder at fault and how to fix it (one line)."""


# -- checking image files ------------------------------------------------------------------------

class _Bytes:
    """The head of a file, read in blocks as a parse needs more of it (one read for most headers)."""

    def __init__(self, f, size: int):
        self.f, self.size, self.data = f, size, b""

    def get(self, offset: int, count: int) -> bytes:
        while len(self.data) < offset + count and len(self.data) < self.size:
            block = self.f.read(max(offset + count - len(self.data), 1 << 16))
            if not block:
                break
            self.data += block
        return self.data[offset:offset + count]


def _jpeg_problem(f, size: int) -> Optional[str]:
    """Walks the JPEG markers from SOI to SOS as DALI's parser does: every segment complete, a
    frame header (SOF) with a size and 1, 3 or 4 components before the scan."""
    data = _Bytes(f, size)
    pos, frame = 2, None
    truncated = "JPEG ends before its image data (truncated header)"
    while True:
        head = data.get(pos, 2)
        if len(head) < 2:
            return truncated
        if head[0] != 0xFF:
            return "invalid JPEG marker (garbled header)"
        pos += 1
        marker = 0xFF
        while marker == 0xFF:  # fill bytes may precede a marker
            byte = data.get(pos, 1)
            if not byte:
                return truncated
            marker, pos = byte[0], pos + 1
        if marker == 0x00 or 0xD0 <= marker <= 0xD9 or marker == 0x01:
            return f"invalid JPEG marker 0xFF{marker:02X} before the image data (garbled header)"
        raw = data.get(pos, 2)
        if len(raw) < 2:
            return truncated
        length = struct.unpack(">H", raw)[0]
        if length < 2 or pos + length > size:
            return f"JPEG segment 0xFF{marker:02X} runs past the end of the file (truncated or garbled)"
        if marker == 0xDA:  # SOS: the entropy-coded data follows
            scan_bytes = size - (pos + length)
            break
        body = data.get(pos + 2, min(length - 2, 8))
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if len(body) < 6:
                return "JPEG frame header is too short (garbled header)"
            frame = (body[0], *struct.unpack(">HH", body[1:5]), body[5])
            huffman = marker <= 0xC7
        elif marker == 0xE1 and body[:6] == b"Exif\0\0" and length < 8:
            return "JPEG EXIF segment is too short (garbled header)"  # DALI's parser underflows on it
        pos += length
    if frame is None:
        return "JPEG has no frame header (SOF) before its image data (garbled header)"
    precision, height, width, components = frame
    if precision != 8:
        return f"{precision}-bit JPEG (only 8-bit JPEGs are supported)"
    if components not in (1, 3, 4):
        return f"JPEG with {components} color components (expected 1, 3 or 4)"
    if height == 0 or width == 0:
        return f"JPEG declares a {width}x{height} image"
    if width * height > max_image_pixels():
        return f"JPEG declares {width}x{height} pixels, more than the limit of {max_image_pixels():,} (downscale it)"
    # Huffman coding spends at least a bit on each 8x8 block's DC term: fewer bytes than that
    # cannot hold the image the header declares (a cut file, or a decompression bomb). Arithmetic
    # coding (SOF9 and up, rare) can go below, so it is not held to it.
    if huffman and scan_bytes < width * height // 1024:
        return (f"JPEG declares {width}x{height} pixels but holds {scan_bytes:,} bytes of image data, too few to fill "
                "them (truncated, or made to look larger than it is)")
    return None


def _png_problem(f, size: int) -> Optional[str]:
    """Every chunk complete with a matching CRC, through IEND (DALI's parser walks them all),
    and an IHDR with a size and a bit depth / color type pair PNG allows."""
    data = f.read()  # the CRCs cover every byte
    head = data[8:33]
    if len(head) < 25 or head[4:8] != b"IHDR" or struct.unpack(">I", head[:4])[0] != 13:
        return "PNG has no complete IHDR header (truncated or garbled)"
    width, height, depth, color = struct.unpack(">IIBB", head[8:18])
    if color not in _PNG_DEPTHS or depth not in _PNG_DEPTHS[color]:
        return f"PNG with bit depth {depth} and color type {color} is not a valid combination"
    if width == 0 or height == 0 or width > 2**31 - 1 or height > 2**31 - 1:
        return f"PNG declares a {width}x{height} image"
    if width * height > max_image_pixels():
        return f"PNG declares {width}x{height} pixels, more than the limit of {max_image_pixels():,} (downscale it)"
    pos, has_data, has_palette, compressed = 8, False, False, 0
    while True:
        if pos + 8 > len(data):
            return "PNG ends before its IEND chunk (truncated file)"
        length, kind = struct.unpack(">I", data[pos:pos + 4])[0], data[pos + 4:pos + 8]
        name = kind.decode("latin1")
        if length > 2**31 - 1 or pos + 12 + length > len(data):
            return f"PNG chunk {name!r} runs past the end of the file (truncated or garbled)"
        end = pos + 8 + length
        if zlib.crc32(data[pos + 4:end]) != struct.unpack(">I", data[end:end + 4])[0]:
            return f"PNG chunk {name!r} has a bad CRC (corrupt file)"
        if kind == b"IDAT" and color == 3 and not has_palette:
            return "PNG palette image without a PLTE chunk before its data (corrupt file)"
        has_palette = has_palette or kind == b"PLTE"
        has_data = has_data or kind == b"IDAT"
        compressed += length if kind == b"IDAT" else 0
        if kind == b"IEND":
            if not has_data:
                return "PNG has no image data (IDAT chunk)"
            # deflate compresses at most about 1032:1: fewer bytes cannot hold the declared rows
            raw = height * (1 + (width * _PNG_CHANNELS[color] * depth + 7) // 8)
            if compressed < raw // 1100:
                return (f"PNG declares {width}x{height} pixels but holds {compressed:,} bytes of image data, too few "
                        "to fill them (made to look larger than it is)")
            return None
        pos += 12 + length


def header_problem(path: str) -> Optional[str]:
    """None when `path` is a regular JPEG or PNG file whose structure DALI's parser accepts, else
    why not. Cheap: reads JPEG headers up to the image data and walks the PNG chunks (with their
    CRCs); it does not decode the pixels (`check_image` does)."""
    try:
        # O_NONBLOCK: opening a FIFO (or a file swapped for one) must not wait for a writer.
        with os.fdopen(os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)), "rb") as f:
            info = os.fstat(f.fileno())
            if not stat.S_ISREG(info.st_mode):
                return "not a regular file"
            if info.st_size == 0:
                return "empty file (0 bytes)"
            if info.st_size > MAX_IMAGE_BYTES:
                return f"{info.st_size:,} bytes, more than the {MAX_IMAGE_BYTES:,} an image file may have"
            magic = f.read(8)
            f.seek(0)
            if magic.startswith(b"\xff\xd8\xff"):
                return _jpeg_problem(f, info.st_size)
            if magic == _PNG_SIGNATURE:
                return _png_problem(f, info.st_size)
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    return "not a JPEG or PNG file (bad or missing header)"


def bytes_problem(data: bytes) -> Optional[str]:
    """`header_problem` for an image held in memory (a WebDataset member)."""
    if not data:
        return "empty file (0 bytes)"
    if len(data) > MAX_IMAGE_BYTES:
        return f"{len(data):,} bytes, more than the {MAX_IMAGE_BYTES:,} an image file may have"
    f = io.BytesIO(data)
    if data[:3] == b"\xff\xd8\xff":
        return _jpeg_problem(f, len(data))
    if data[:8] == _PNG_SIGNATURE:
        return _png_problem(f, len(data))
    return "not a JPEG or PNG file (bad or missing header)"


def check_image_bytes(data: bytes) -> Optional[str]:
    """`check_image` for an image held in memory."""
    problem = bytes_problem(data)
    if problem is not None:
        return problem
    try:
        from PIL import Image

        with Image.open(io.BytesIO(data)) as img:
            img.load()
    except Exception as exc:  # PIL raises many types for corrupt data
        return f"{type(exc).__name__}: {' '.join(str(exc).split())}"
    return None


def check_image(path: str) -> Optional[str]:
    """None if `path` passes `header_problem` and decodes in full with PIL, else why not."""
    problem = header_problem(path)
    if problem is not None:
        return problem
    try:
        from PIL import Image

        with Image.open(path) as img:
            img.load()
    except Exception as exc:  # PIL raises many types for corrupt data
        return f"{type(exc).__name__}: {' '.join(str(exc).split())}"
    return None


def _check_all(paths: Sequence[str], check, num_threads: Optional[int], stop_at_first: bool):
    """[(index, problem)] of the paths `check` finds a problem in, in path order; decodes on
    threads (PIL and file reads release the GIL). With stop_at_first, the first in order only."""
    threads = max(1, min(num_threads or (os.cpu_count() or 1), 32, len(paths)))
    found = []
    if threads == 1:
        for i, path in enumerate(paths):
            problem = check(path)
            if problem is not None:
                found.append((i, problem))
                if stop_at_first:
                    break
        return found
    chunk = 4 * threads  # bounded look-ahead, so a first bad file stops the work soon after
    with ThreadPoolExecutor(threads) as pool:
        for begin in range(0, len(paths), chunk):
            problems = pool.map(check, paths[begin:begin + chunk])
            for offset, problem in enumerate(problems):
                if problem is not None:
                    found.append((begin + offset, problem))
                    if stop_at_first:
                        return found
    return found


def skip_hint() -> str:
    return ("remove it, or leave unreadable files out: --on-error skip (fasttl run, extract, eval, predict), "
            "fasttl.data.screen(source, on_error='skip') in Python")


# -- sources ---------------------------------------------------------------------------------------

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
            digest.update(f"{rel}\0{_size_and_time(path)}\0{label}\n".encode())
        return digest.hexdigest()

    def sample_ids(self) -> List[str]:
        """A name per sample: the file path relative to the source's root (or as given)."""
        return [os.path.relpath(f, self.root) if self.root else f for f in self.files]

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

    def sample_ids(self) -> List[str]:
        """A name per sample: NAME:INDEX."""
        return [f"{self.name}:{i}" for i in range(len(self))]

    def subset(self, indices: Sequence[int]) -> "ArraySource":
        idx = np.asarray(indices, dtype=np.int64)
        return ArraySource(self.images[idx], self.labels[idx], list(self.classes), self.name)


def _size_and_time(path: str) -> str:
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

    def sample_ids(self) -> List[str]:
        return [f"{self._shard_name(m[0])}/{k}" for m, k in zip(self.members, self.keys)]

    def identity(self) -> str:
        """Hash of the class names, the shard names and sizes, the sample keys, image sizes and labels."""
        digest = hashlib.sha256(b"webdataset\n" + json.dumps(list(self.classes)).encode())
        for i, shard in enumerate(self.shards):
            digest.update(f"{self._shard_name(i)}\0{_size_and_time(shard)}\n".encode())
        for (shard, _, size), key, label in zip(self.members, self.keys, self.labels):
            digest.update(f"{shard}\0{key}\0{size}\0{label}\n".encode())
        return digest.hexdigest()

    def read(self, index: int) -> bytes:
        shard, offset, size = self.members[index]
        with open(self.shards[shard], "rb") as f:
            f.seek(offset)
            data = f.read(size)
        if len(data) != size:
            raise DataError(f"{self.sample_ids()[index]}: the tar ends inside this sample (truncated shard)")
        return data

    def subset(self, indices: Sequence[int]) -> "TarSource":
        return TarSource(list(self.shards), [self.members[i] for i in indices], [self.keys[i] for i in indices],
                         [self.labels[i] for i in indices], list(self.classes), self.root, list(self.skipped))


Source = Union[FileSource, ArraySource, TarSource]


def _screen_tar(source: TarSource, on_error: str, num_threads: Optional[int]) -> TarSource:
    def check(index: int) -> Optional[str]:
        try:
            return check_image_bytes(source.read(index))
        except (DataError, OSError) as exc:
            return str(exc)

    found = _check_all(list(range(len(source))), check, num_threads, stop_at_first=on_error == "fail")
    return _apply_policy(source, found, source.sample_ids(), on_error, "the shards") if found else source


def _apply_policy(source, found: List[Tuple[int, str]], ids: Sequence[str], on_error: str, where: str):
    """What the unreadable images `found` ((index, problem), in order) make of `source`: "fail"
    names the first; "skip" leaves them out, listed in `skipped`, unless nothing, or nothing of
    some class, is left."""
    first = f"{ids[found[0][0]]}: {found[0][1]}"
    if on_error == "fail":
        raise DataError(f"{ids[found[0][0]]}: cannot be read as an image ({found[0][1]}); {skip_hint()}")
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
    if isinstance(source, TarSource):
        return _screen_tar(source, on_error, num_threads)
    if not isinstance(source, FileSource):
        return source
    found = _check_all(source.files, check_image, num_threads, stop_at_first=on_error == "fail")
    if not found:
        source.__dict__.setdefault("_clean_header_ranges", set()).add((0, len(source.files)))
        return source
    kept = _apply_policy(source, found, source.files, on_error, "the file list")
    kept.__dict__["_clean_header_ranges"] = {(0, len(kept.files))}
    return kept


def first_bad_image(files: Sequence[str], num_threads: Optional[int] = None) -> Optional[Tuple[str, str]]:
    """(path, problem) of the first file in order that `check_image` rejects, or None."""
    found = _check_all(files, check_image, num_threads, stop_at_first=True)
    return (files[found[0][0]], found[0][1]) if found else None


def ensure_headers(source: FileSource, begin: int = 0, end: Optional[int] = None) -> None:
    """A DataError naming the first of source.files[begin:end] that `header_problem` rejects
    (about 70 us a file; one thread, as the parse holds the GIL). A range found clean is
    remembered on the source, so a loader per epoch checks it once."""
    end = len(source) if end is None else end
    checked = source.__dict__.setdefault("_clean_header_ranges", set())
    if (0, len(source.files)) in checked or (begin, end) in checked:
        return
    found = _check_all(source.files[begin:end], header_problem, 1, stop_at_first=True)
    if found:
        index, problem = found[0]
        raise DataError(f"{source.files[begin + index]}: cannot be read as an image ({problem}); {skip_hint()}")
    checked.add((begin, end))


# -- class folders and file lists -------------------------------------------------------------------

def _missing(root: str, what: str) -> DataError:
    if os.path.lexists(root) and not os.path.exists(root):
        return DataError(f"data: {root} is a broken symbolic link (fix the link or give the folder itself)")
    if os.path.exists(root):
        if not os.path.isfile(root) and not os.path.isdir(root):
            link = f" (a link to {os.path.realpath(root)})" if os.path.islink(root) else ""
            return DataError(f"data: {root}{link} is not a regular file or folder (a device or a pipe?); give {what}")
        if root.lower().endswith(_COMPRESSED):
            return DataError(f"data: {root} is a compressed archive; WebDataset shards are uncompressed .tar files "
                             "(images are read at their offsets): decompress it (gunzip), or give class folders or a "
                             ".csv/.tsv/.parquet file list")
        return DataError(f"data: {root} is a file, not a folder (give {what})")
    return DataError(f"data: {root} does not exist (give {what})")


_COMPRESSED = (".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".tar.zst", ".zip")


def _list_folder(folder: str) -> List[str]:
    try:
        return sorted(os.listdir(folder))
    except OSError as exc:
        raise DataError(f"data: cannot list {folder} ({exc.strerror or exc}); check its permissions") from None


def scan_class_folder(root: str, classes: Optional[Sequence[str]] = None) -> FileSource:
    """root/<class>/*.jpg|jpeg|png (Keras' flow_from_directory layout). Labels index the sorted
    class names. Symbolic links to files and folders are followed.

    Refused with a DataError naming the folder: a missing root, fewer than 2 class folders,
    other classes than `classes`, a class folder without images. Passed over and listed in the
    result's ``ignored`` as (path, reason): hidden (dot) folders and files, files without an image
    extension (.txt, Thumbs.db, ...), files directly in root, broken links and special files.
    File contents are not read here: `screen` and the loaders check them."""
    root = os.path.abspath(os.path.expanduser(root))
    expected = f"a folder with one sub-folder of images per class, {root}/<class>/<image>.jpg"
    if not os.path.isdir(root):
        raise _missing(root, expected)
    found, ignored = [], []
    for name in _list_folder(root):
        path = os.path.join(root, name)
        if name.startswith("."):
            ignored.append((path, "hidden"))
        elif os.path.isfile(os.path.join(path, RUN_MARKER)):  # its figures are not images of a class
            ignored.append((path, "a fasttl run folder"))
        elif os.path.isdir(path):
            found.append(name)
        elif not os.path.exists(path):
            ignored.append((path, "broken symbolic link"))
        else:
            ignored.append((path, "not in a class folder"))
    if not found:
        raise DataError(f"data: {root} has no class folders (expected {root}/<class>/<image>.jpg)")
    bad = next((name for name in found if not name.isprintable()), None)
    if bad is not None:  # a name printed raw would drive the terminal (an escape sequence) or split a line
        raise DataError(f"data: {root} has a class folder named {bad!r}, with a control character; rename it")
    if classes is not None and list(classes) != found:
        same = [unicodedata.normalize("NFC", c) for c in found] == [unicodedata.normalize("NFC", c) for c in classes]
        hint = ("; the names are the same but written in another Unicode form (NFC vs NFD, as macOS and other "
                "systems store them): rename the folders in one form") if same else " (as in the training split)"
        raise DataError(f"data: {root} has classes {found!r}, expected {list(classes)!r}{hint}")
    if len(found) < 2:
        raise DataError(f"data: {root} has only 1 class folder ({found[0]}); a classifier needs at least 2 "
                        f"(add {root}/<other class>/)")
    files, labels = [], []
    for label, name in enumerate(found):
        folder = os.path.join(root, name)
        images = []
        for entry in _list_folder(folder):
            path = os.path.join(folder, entry)
            if entry.startswith("."):
                ignored.append((path, "hidden"))
            elif os.path.isdir(path):
                ignored.append((path, "a folder inside a class folder (not scanned)"))
            elif not entry.lower().endswith(IMAGE_EXTENSIONS):
                ignored.append((path, "not a .jpg/.jpeg/.png file"))
            elif not os.path.exists(path):
                ignored.append((path, "broken symbolic link"))
            elif not os.path.isfile(path):
                ignored.append((path, "not a regular file"))
            else:
                images.append(path)
        if not images:
            raise DataError(f"data: class folder {folder} holds no .jpg/.jpeg/.png images (add images or remove it)")
        files.extend(images)
        labels.extend([label] * len(images))
    _refuse_one_file_twice(files, "an image belongs to one class")
    return FileSource(files, labels, found, root, ignored=ignored)


def _refuse_one_file_twice(paths: Sequence[str], why: str) -> None:
    """A DataError when two paths reach one file (a linked class folder or image, a hard link), as
    a file list naming one image twice is refused: one file under two labels, or in train and test,
    is a label conflict or a leak, never two images."""
    seen = {}
    for path in paths:
        try:
            info = os.stat(path)
        except OSError:
            continue  # gone since the scan: the loaders name it
        first = seen.setdefault((info.st_dev, info.st_ino), path)
        if first != path:
            raise DataError(f"data: {path} is the same file as {first} (a link?); {why}: remove one of them")


def class_folder_splits(root: str) -> Tuple[FileSource, Optional[FileSource]]:
    """(train, test) from root/train and root/test when both exist, else (root, None). With
    splits, what root holds besides train/ and test/ is listed in train.ignored. Only one of
    train/ and test/ is a DataError (it would otherwise be read as a class)."""
    root = os.path.abspath(os.path.expanduser(root))
    if not os.path.isdir(root):
        raise _missing(root, f"class folders {root}/<class>/*.jpg, or {root}/train/<class> and {root}/test/<class>")
    train_dir, test_dir = os.path.join(root, "train"), os.path.join(root, "test")
    if os.path.isdir(train_dir) and os.path.isdir(test_dir):
        train = scan_class_folder(train_dir)
        test = scan_class_folder(test_dir, classes=train.classes)
        _refuse_one_file_twice(train.files + test.files, "an image used for training is never a test image")
        # What else root holds (a val/ split, notes, hidden folders) is not used: say so.
        train.ignored[:0] = [(os.path.join(root, name), "hidden" if name.startswith(".") else "not train/ or test/")
                             for name in _list_folder(root) if name not in ("train", "test")]
        return train, test
    for have, lack in ((train_dir, test_dir), (test_dir, train_dir)):
        if os.path.isdir(have):  # a half split would otherwise be scanned as a class called "train"
            raise DataError(f"data: {root} has {os.path.basename(have)}/ but no {os.path.basename(lack)}/ "
                            f"(add {lack}/<class>/, or put the class folders directly in {root})")
    return scan_class_folder(root), None


def file_list(pairs: Iterable[Tuple[str, int]], classes: Optional[Sequence[str]] = None) -> FileSource:
    """An explicit list of (path, label). Each path must be a JPEG or PNG file (checked by its
    header) and each label an integer in [0, len(classes)); else a DataError naming it."""
    files, labels = [], []
    for path, label in pairs:
        path = os.path.abspath(os.path.expanduser(os.fspath(path)))
        if not os.path.exists(path):
            raise DataError(f"{path}: no such file (fix the path in the file list)")
        if not os.path.isfile(path):
            raise DataError(f"{path}: not a regular file (the file list must name image files)")
        if not path.lower().endswith(IMAGE_EXTENSIONS):
            raise DataError(f"{path}: not a .jpg/.jpeg/.png file (remove it from the file list)")
        problem = header_problem(path)
        if problem is not None:
            raise DataError(f"{path}: cannot be read as an image ({problem}); remove it from the file list")
        if isinstance(label, (bool, np.bool_)) or not isinstance(label, (int, np.integer)) or label < 0:
            raise DataError(f"{path}: label {label!r} is not a non-negative integer (labels index the classes)")
        if classes is not None and label >= len(classes):
            raise DataError(f"{path}: label {label} is out of range for {len(classes)} classes {list(classes)}")
        files.append(path)
        labels.append(int(label))
    if not files:
        raise DataError("data: the file list is empty (give at least one (path, label) pair)")
    n_classes = max(labels) + 1
    return FileSource(files, labels, list(classes) if classes is not None else [str(i) for i in range(n_classes)])


# -- file lists (CSV, TSV, Parquet) and WebDataset shards -----------------------------------------------------

LIST_EXTENSIONS = (".csv", ".tsv", ".parquet")
# Integer labels without --classes make classes "0".."K-1"; a label above this is a mistake, not a class.
MAX_INDEX_CLASSES = 100_000


def _is_index(label: str) -> bool:
    """An ASCII decimal class index ("²" and "٢" are digits to str.isdigit, not to a file list)."""
    return label.isascii() and label.isdigit()


def _index_class_names(values: Sequence[int], where: str) -> List[str]:
    """Class names "0".."K-1" for integer labels, K bounded (a huge label would allocate K names)."""
    top = max(values)
    if top >= MAX_INDEX_CLASSES:
        raise DataError(f"data: {where}: integer label {top} implies {top + 1} classes (at most "
                        f"{MAX_INDEX_CLASSES}); fix the label, or name the classes with --classes-file FILE")
    return [str(i) for i in range(top + 1)]


def is_file_list(data: str) -> bool:
    return isinstance(data, str) and data.lower().endswith(LIST_EXTENSIONS)


def is_webdataset(data: str) -> bool:
    return isinstance(data, str) and data.lower().endswith(".tar")


def _has_control(text: str) -> bool:
    return any(ord(c) < 32 or ord(c) == 127 for c in text)


def read_classes_file(path: str) -> List[str]:
    """Class names, one a line (blank lines at the end ignored), for --classes FILE. A blank line
    between names is refused: with --labels indices it would be a guess whether it counts."""
    path = os.path.abspath(os.path.expanduser(path))
    try:
        text = read_plain(path, 64 << 20).decode("utf-8-sig")  # -sig: a leading byte-order mark is not a name
    except (OSError, ValueError) as exc:  # UnicodeDecodeError is a ValueError
        raise DataError(f"classes: cannot read {path} ({getattr(exc, 'strerror', None) or exc}); give a text file "
                        "with one class name a line") from None
    lines = [line.strip() for line in text.splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    if "" in lines:
        raise DataError(f"classes: {path} line {lines.index('') + 1} is blank between class names; remove it (an "
                        "index counts the lines, so a blank one would shift them)")
    names = lines
    bad = next((name for name in names if not name.isprintable()), None)
    if bad is not None:
        raise DataError(f"classes: {path} names a class with a control character ({bad!r}); use plain text names")
    twice = next((name for i, name in enumerate(names) if name in names[:i]), None)
    if twice is not None:
        raise DataError(f"classes: {path} names {twice!r} twice (line {names.index(twice) + 1} and line "
                        f"{names.index(twice, names.index(twice) + 1) + 1}); each class once")
    if len(names) < 2:
        raise DataError(f"classes: {path} must name at least 2 classes, one a line (found {len(names)})")
    return names


def _list_rows(path: str) -> List[Tuple[str, str]]:
    """(path, label) text of each row of a CSV, TSV or Parquet list with path and label columns."""
    if path.lower().endswith(".parquet"):
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError(f"data: reading {path} (Parquet) needs pyarrow, which is not installed: pip install "
                            "pyarrow, or give the list as CSV or TSV") from None
        try:
            table = pq.read_table(path)
        except Exception as exc:  # pyarrow raises its own types for a bad file
            raise DataError(f"data: {path} is not a readable Parquet file ({type(exc).__name__}: "
                            f"{' '.join(str(exc).split())[:200]})") from None
        missing = [c for c in ("path", "label") if c not in table.column_names]
        if missing:
            raise DataError(f"data: {path} has no {' or '.join(missing)} column (expected columns path and label; "
                            f"found {table.column_names[:10]})")
        for column, allowed in (("path", "string"), ("label", "string or integer")):
            kind = table.schema.field(column).type
            if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)
                    or (column == "label" and pa.types.is_integer(kind))):
                raise DataError(f"data: {path} column {column} holds {kind} values; expected {allowed} (write the "
                                "column as text)")
        return [("" if p is None else str(p), "" if l is None else str(l))  # a null cell is an empty one
                for p, l in zip(table.column("path").to_pylist(), table.column("label").to_pylist())]
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # Excel's "CSV UTF-8" starts with a BOM
            reader = csv.DictReader(_bounded_lines(f, path), delimiter="\t" if path.lower().endswith(".tsv") else ",")
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
                if row.get("path") is None or row.get("label") is None:
                    raise DataError(f"data: {path} line {line} has fewer fields than its header")
                if any(extra.strip() for extra in row.get(None) or ()):  # a comma in a path cuts it in two
                    raise DataError(f"data: {path} line {line} has more fields than its header (a path or label "
                                    "holding a comma or tab must be quoted)")
                rows.append((row["path"].strip(), row["label"].strip()))
            return rows
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"data: cannot read {path} as a file list ({getattr(exc, 'strerror', None) or exc})") from None


MAX_LIST_LINE = 1 << 20  # characters: a path and a label, with room to spare


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


LABEL_KINDS = ("names", "indices")  # what a file list's labels are: class names, or indices into --classes-file


def _numbered_classes(values: Sequence[int]) -> Tuple[List[int], List[str]]:
    """Integer labels without class names: the classes are the distinct values found, in numeric
    order, each named by its number, so no class is left without images (labels 1, 2, 3 are three
    classes "1", "2", "3", not four with an empty "0")."""
    found = sorted(set(values))
    position = {value: i for i, value in enumerate(found)}
    return [position[v] for v in values], [str(v) for v in found]


def _label_indices(labels: Sequence[str], classes: Optional[Sequence[str]], where: str,
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
            if kind == "indices" and _is_index(label) and int(label) < len(classes):
                out.append(int(label))
            elif kind == "names" and label in names:
                out.append(names[label])
            elif kind == "indices":
                raise DataError(f"data: {where}: label {label!r} is not an index into the {len(classes)} classes of "
                                "the classes file (--labels indices)")
            else:
                hint = " (to give labels as indices into it, pass --labels indices)" if _is_index(label) else ""
                raise DataError(f"data: {where}: label {label!r} is not one of the {len(classes)} classes of the "
                                f"classes file{hint}")
        empty = sorted(set(range(len(classes))) - set(out))
        if out and empty:  # as an empty class folder: a class no image teaches or tests
            raise DataError(f"data: {where}: class {classes[empty[0]]!r} of the classes file has no images"
                            f"{f' (nor {len(empty) - 1} more)' if len(empty) > 1 else ''}; drop it from the classes "
                            "file, or add its images")
        return out, list(classes)
    if kind == "indices":
        raise DataError("labels: --labels indices needs --classes-file to say which class each index is")
    negative = next((label for label in labels if label[:1] == "-" and _is_index(label[1:])), None)
    if negative is not None:  # -1 is "unlabeled" in many data sets: never a class of its own
        raise DataError(f"data: {where}: label {negative!r} is negative (-1 often means unlabeled); drop those rows, "
                        f"or name {negative!r} in a --classes-file to make it a class")
    if labels and all(_is_index(label) for label in labels):
        values = [int(label) for label in labels]
        _index_class_names(values, where)  # bounded, as before
        return _numbered_classes(values)
    found = sorted(set(labels))
    index = {name: i for i, name in enumerate(found)}
    return [index[label] for label in labels], found


def read_file_list(path: str, classes: Optional[Sequence[str]] = None, labels_kind: str = "names") -> FileSource:
    """A CSV (.csv), TSV (.tsv) or Parquet (.parquet, needs pyarrow) list with columns path and
    label: image paths relative to the list's folder (absolute ones are kept), labels class
    names or indices (see `_label_indices`). Rows stay in the list's order. Files are not opened
    here: `screen` and the loaders check them (a missing one is named, or skipped with
    --on-error skip)."""
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isfile(path):
        raise _missing(path, "a CSV, TSV or Parquet file list with path and label columns") \
            if not os.path.isdir(path) else DataError(f"data: {path} is a folder, not a file list")
    rows = _list_rows(path)
    if not rows:
        raise DataError(f"data: {path} lists no images (expected a header line and one path,label row per image)")
    root = os.path.dirname(path)
    for line, (image, label) in enumerate(rows, start=2):
        if not image:
            raise DataError(f"data: {path} row {line - 1} has an empty path")
        if _has_control(image):
            raise DataError(f"data: {path} row {line - 1} has a control character (such as NUL) in its path "
                            f"{image!r}; fix the path")
        if not label:
            raise DataError(f"data: {path} row {line - 1} ({image}) has an empty label")
        if not label.isprintable():  # the rule for class folders and classes files: names that look alike differ
            bad = next(c for c in label if not c.isprintable())
            raise DataError(f"data: {path} row {line - 1} ({image}) has a character that is not printable "
                            f"(U+{ord(bad):04X}: a control or invisible character) in its label {ascii(label)}; "
                            "fix the label")
    labels, names = _label_indices([label for _, label in rows], classes, path, labels_kind)
    if len(names) < 2:
        raise DataError(f"data: {path} names only 1 class ({names[0]}); a classifier needs at least 2")
    files = [os.path.normpath(os.path.join(root, os.path.expanduser(image))) for image, _ in rows]
    first = {}
    for row, file in enumerate(files, start=1):
        if file in first:  # twice in one list: a label conflict, or a test image that could also train
            raise DataError(f"data: {path} lists {rows[row - 1][0]} twice (rows {first[file]} and {row}); "
                            "give each image once")
        first[file] = row
    return FileSource(files, labels, names, root)


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
    """WebDataset's shard patterns: {000000..000127} (zero-padded numeric ranges) and {a,b,c}."""
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
    shards = [os.path.abspath(p) for p in expand_braces(pattern)]
    root = os.path.dirname(os.path.abspath(pattern.split("{", 1)[0] + "x"))
    members, keys, labels, skipped = [], [], [], []
    for shard_index, shard in enumerate(shards):
        if not os.path.isfile(shard):
            raise _missing(shard, "WebDataset .tar shards (a brace pattern like shards/train-{000000..000127}.tar)") \
                if not os.path.isdir(shard) else DataError(f"data: {shard} is a folder, not a .tar shard")
        name = os.path.relpath(shard, root)
        samples, duplicates = {}, set()
        try:
            with tarfile.open(shard, "r:") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    base = os.path.basename(member.name)
                    if base.startswith("."):
                        continue
                    folder = os.path.dirname(member.name)
                    key, _, ext = base.partition(".")
                    key = f"{folder}/{key}" if folder else key
                    entry = samples.setdefault(key, {})
                    ext = "." + ext.lower()
                    if ext in _WDS_IMAGE or ext == ".cls":
                        part = "image" if ext in _WDS_IMAGE else "cls"
                        if part in entry:  # a second image (or class) for one key
                            duplicates.add(key)
                    if ext in _WDS_IMAGE:
                        entry["image"] = (shard_index, member.offset_data, member.size)
                    elif ext == ".cls":
                        if member.size > 64:
                            entry["cls"] = None
                        else:
                            entry["cls"] = tar.extractfile(member).read().decode("utf-8", "replace").strip()
                end = tar.offset  # where the header after the last member is, or the end-of-archive blocks
            with open(shard, "rb") as f:
                f.seek(end)
                tail = f.read(tarfile.BLOCKSIZE)
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise DataError(f"data: {shard} is not a readable tar file ({' '.join(str(exc).split())[:200]})") from None
        if len(tail) < tarfile.BLOCKSIZE or tail.strip(b"\0"):
            # tarfile ends quietly where a cut falls between members: the lost samples would go unnoticed
            raise DataError(f"data: {shard} ends without tar's end-of-archive blocks: it was cut short (copy or "
                            "write the shard again)")
        for key, entry in samples.items():
            if key in duplicates:
                skipped.append((f"{name}/{key}", "the key names two images or two classes in this shard"))
                continue
            if "image" not in entry or "cls" not in entry:
                what = "no .jpg/.jpeg/.png image" if "image" not in entry else "no .cls class"
                if "image" in entry or "cls" in entry:
                    skipped.append((f"{name}/{key}", f"sample has {what}"))
                continue
            label = entry["cls"]
            # A class that is no index is a label error, as a file list's: never an image left out.
            if label is None or not _is_index(label) or (classes is not None and int(label) >= len(classes)):
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
        _index_class_names(labels, pattern)  # bounded
        labels, names = _numbered_classes(labels)
    if len(names) < 2:
        raise DataError(f"data: {pattern} has only class {names[0]}; a classifier needs at least 2 classes")
    return TarSource(shards, members, keys, labels, names, root, skipped)


def open_data(data: str, classes_file: Optional[str] = None, labels_kind: str = "names"):
    """What --data names, for inputs beyond class folders: a file list (.csv/.tsv/.parquet) as a
    FileSource, WebDataset shards (.tar pattern) as a TarSource; None for anything else.
    `labels_kind`: a file list's labels are class names, or indices into the classes file
    (WebDataset .cls members are indices by their format)."""
    classes = read_classes_file(classes_file) if classes_file else None
    if is_file_list(data):
        return read_file_list(data, classes, labels_kind)
    if is_webdataset(data):
        return read_webdataset(data, classes)
    return None


# -- CIFAR python pickles ------------------------------------------------------------------------------

def _latin1_encode(text, encoding="latin1", errors="strict"):
    """`_codecs.encode` as protocol-2 pickles of bytes use it, for the latin1 codec only."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str) or errors != "strict":
        raise pickle.UnpicklingError(f"_codecs.encode with {encoding!r} is not allowed")
    return text.encode("latin1")


def _numpy_globals() -> dict:
    """The only globals a CIFAR batch may name: numpy's array and dtype reconstructors, under
    numpy 1 (numpy.core) and numpy 2 (numpy._core) module names, and latin1 bytes."""
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy 1
        from numpy.core import multiarray, numeric
    table = {("_codecs", "encode"): _latin1_encode, ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for module in ("numpy.core", "numpy._core"):
        for owner, name in ((multiarray, "_reconstruct"), (multiarray, "scalar"), (numeric, "_frombuffer")):
            if hasattr(owner, name):
                table[(f"{module}.{owner.__name__.rsplit('.', 1)[1]}", name)] = getattr(owner, name)
    return table


class _CifarUnpickler(pickle.Unpickler):
    _allowed = None

    def find_class(self, module, name):
        if _CifarUnpickler._allowed is None:
            _CifarUnpickler._allowed = _numpy_globals()
        try:
            return _CifarUnpickler._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"it refers to {module}.{name}, which a CIFAR batch never does") from None


def _load_pickle(path: str):
    """A pickle that may hold only dicts, lists, str, bytes, numbers and numpy arrays."""
    try:
        with open(path, "rb") as f:
            return _CifarUnpickler(f, encoding="bytes").load()
    except Exception as exc:  # UnpicklingError, EOFError, MemoryError, ...: all a bad file
        raise DataError(f"{path}: not a CIFAR python batch ({type(exc).__name__}: {' '.join(str(exc).split())}); "
                        "download the batches again (https://www.cs.toronto.edu/~kriz/cifar.html)") from None


def _as_str_keys(obj, path: str) -> dict:
    if not isinstance(obj, dict):
        raise DataError(f"{path}: not a CIFAR python batch (holds a {type(obj).__name__}, not a dict)")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def load_cifar_pickles(root: str, train: bool) -> ArraySource:
    """CIFAR-10 (`cifar-10-batches-py`) or CIFAR-100 (`cifar-100-python`) python pickle batches.
    Read with a restricted unpickler (numpy arrays and plain containers only, never code) and
    checked: uint8 (N, 3072) images, N labels within the class list."""
    root = os.path.abspath(os.path.expanduser(root))
    if os.path.isfile(os.path.join(root, "batches.meta")):
        names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
        meta, label_key, class_key = "batches.meta", "labels", "label_names"
    elif os.path.isfile(os.path.join(root, "meta")):
        names = ["train"] if train else ["test"]
        meta, label_key, class_key = "meta", "fine_labels", "fine_label_names"
    else:
        raise DataError(f"data: {root} holds neither cifar-10-batches-py (batches.meta) nor cifar-100-python (meta)")
    meta_path = os.path.join(root, meta)
    names_found = _as_str_keys(_load_pickle(meta_path), meta_path).get(class_key)
    if not isinstance(names_found, list) or not names_found or not all(isinstance(c, (bytes, str))
                                                                       for c in names_found):
        raise DataError(f"{meta_path}: not a CIFAR meta file (no '{class_key}' list of names)")
    classes = [c.decode("latin1") if isinstance(c, bytes) else c for c in names_found]
    if len(set(classes)) != len(classes) or not all(c and c.isprintable() for c in classes):
        raise DataError(f"{meta_path}: its '{class_key}' must be distinct, printable names (found {classes[:12]})")
    images, labels = [], []
    for name in names:
        path = os.path.join(root, name)
        if not os.path.isfile(path):
            raise DataError(f"data: missing CIFAR batch {path}")
        batch = _as_str_keys(_load_pickle(path), path)
        data, batch_labels = batch.get("data"), batch.get(label_key)
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            raise DataError(f"{path}: not a CIFAR python batch ('data' must be a uint8 array of shape (N, 3072), "
                            f"got {getattr(data, 'dtype', type(data).__name__)} {getattr(data, 'shape', '')})")
        try:
            batch_labels = np.asarray(batch_labels)
        except Exception:
            batch_labels = np.asarray([])
        if batch_labels.shape != (len(data),) or batch_labels.dtype.kind not in "iu":
            raise DataError(f"{path}: not a CIFAR python batch ('{label_key}' must be {len(data)} integers)")
        if len(batch_labels) and (batch_labels.min() < 0 or batch_labels.max() >= len(classes)):
            raise DataError(f"{path}: a label is outside 0..{len(classes) - 1} ({len(classes)} classes in {meta_path})")
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(batch_labels.astype(np.int64))
    return ArraySource(np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels), classes,
                       name=f"cifar:{os.path.basename(root)}:{'train' if train else 'test'}")
