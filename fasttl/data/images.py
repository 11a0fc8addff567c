"""Checking image files before any decoder sees them: JPEG and PNG structure (`header_problem`),
a full decode (`check_image`), the pixel budget. Every image file is checked before NVIDIA DALI
sees it, because DALI 2.x crashes the process (SIGSEGV in its decoder's worker threads) when its
parser rejects one sample of a batch."""
from __future__ import annotations

import errno
import io
import os
import stat
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Sequence

from fasttl.util.errors import DataError
from fasttl.util import settings
from fasttl.util.checks import decimal, shown
from fasttl.util.path_problems import TOO_LONG_WHY


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


# A larger image is refused before any decoder allocates it: neither backend needs hundreds of MB
# per sample to make a 224-pixel input, and a forged header must not make either one try.
MAX_IMAGE_PIXELS = int(settings.MAX_IMAGE_PIXELS.default)


def max_image_pixels() -> int:
    """The pixel budget in effect: FASTTL_MAX_IMAGE_PIXELS, else MAX_IMAGE_PIXELS (read when used,
    so that a bad value is one line naming the variable, never a failure at import)."""
    given = settings.MAX_IMAGE_PIXELS.raw()
    if given is None:
        return MAX_IMAGE_PIXELS
    value = decimal(given.strip().replace("_", ""))
    if value is None or value < 1:
        raise DataError(f"FASTTL_MAX_IMAGE_PIXELS: expected a positive number of pixels, got {shown(given)} (at "
                        f"most 18 digits; unset it for the default {MAX_IMAGE_PIXELS:,})")
    return value


MAX_IMAGE_BYTES = 1 << 30  # no photo's file is larger: a bigger one (a sparse file, a device) is not read
# Longer side over shorter side: panoramas stay far below. Every image is resized by its shorter
# side, so a 1 x 100,000 strip at 224 px would be 224 x 22 million pixels (120 GB as floats).
MAX_ASPECT_RATIO = 50
# Scans of a JPEG: progressive photos have about 10; each costs a pass over every block, so a
# file of thousands of tiny scans takes minutes to decode (a "scan bomb").
MAX_JPEG_SCANS = 100


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# PNG bit depths per color type (PNG spec table 11.1), as DALI's (nvImageCodec's) parser checks them.
_PNG_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}


_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # samples per pixel of each color type


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
    pos, frame, exif_segments = 2, None, 0
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
        elif marker == 0xE1 and body[:6] == b"Exif\0\0":
            exif_segments += 1
            if exif_segments > 1:  # PIL reads the first one's orientation, DALI the last's: no one answer
                return "JPEG has two EXIF segments (which orientation holds is ambiguous); re-save it with one"
            tiff = data.get(pos + 8, length - 8)
            if tiff[:4] not in _TIFF_MAGICS and tiff[:6] == b"Exif\0\0":  # PIL strips a doubled prefix
                return "JPEG EXIF segment has its Exif prefix twice (garbled metadata: DALI drops it, PIL reads it); " \
                    "re-save the image"
            problem = _exif_directory_problem(tiff)
            if problem is not None:
                return f"JPEG {problem}"
        pos += length
    if frame is None:
        return "JPEG has no frame header (SOF) before its image data (garbled header)"
    return _frame_problem(frame, huffman, scan_bytes) or _scans_problem(f, pos - 2, size)


# Bytes a value of each TIFF type takes: TIFF 6's twelve and 13, a sub-directory's offset (Adobe's
# TIFF Technical Note 1); others (0, BigTIFF's 16-18) are unknown to DALI's parser.
_TIFF_TYPE_BYTES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 13: 4}
_ORIENTATION_TAG = 0x0112
_TIFF_MAGICS = (b"II*\0", b"MM\0*")  # little- and big-endian TIFF, as an EXIF block starts


def _exif_directory_problem(tiff: bytes) -> Optional[str]:
    """An EXIF block (TIFF header, then IFD0) that PIL and DALI's parser read apart, so that the
    backends would turn the image differently: a first directory declaring more entries than the
    block holds (PIL reads those there, DALI drops the block), an entry of an unknown type or with
    data outside the block (DALI drops the block, PIL skips the entry), an orientation that is not
    one SHORT (DALI reads its first two bytes as one whatever its type, PIL honours the type)."""
    if tiff[:2] in (b"II", b"MM") and tiff[:4] not in _TIFF_MAGICS:  # PIL takes MM*\0, II\0*: DALI not
        return "EXIF block has a malformed TIFF header (garbled metadata: DALI drops it, PIL reads it); re-save " \
            "the image"
    if len(tiff) < 8 or tiff[:4] not in _TIFF_MAGICS:
        return None  # no directory to read: both backends ignore the block alike
    order = "<" if tiff[:2] == b"II" else ">"
    offset = struct.unpack(order + "I", tiff[4:8])[0]
    if offset + 2 > len(tiff):
        return None
    entries = struct.unpack(order + "H", tiff[offset:offset + 2])[0]
    garbled = " (garbled metadata: which orientation holds is ambiguous); re-save the image"
    if offset + 2 + 12 * entries > len(tiff):
        return f"EXIF directory declares {entries} entries, more than its block holds" + garbled
    for at in range(offset + 2, offset + 2 + 12 * entries, 12):
        tag, kind, count, value = struct.unpack(order + "HHII", tiff[at:at + 12])
        if kind not in _TIFF_TYPE_BYTES:
            return f"EXIF entry 0x{tag:04X} has the unknown type {kind}" + garbled
        size = _TIFF_TYPE_BYTES[kind] * count
        if size > 4 and value + size > len(tiff):
            return f"EXIF entry 0x{tag:04X} points past its block" + garbled
        if tag == _ORIENTATION_TAG and (kind != 3 or count != 1):
            return f"EXIF orientation is not one SHORT value (type {kind}, count {count})" + garbled
    return None


def _frame_problem(frame, huffman: bool, scan_bytes: int) -> Optional[str]:
    """What the frame header declares, against what fasttl decodes and what the file can hold."""
    precision, height, width, components = frame
    if precision != 8:
        return f"{precision}-bit JPEG (only 8-bit JPEGs are supported)"
    if components not in (1, 3, 4):
        return f"JPEG with {components} color components (expected 1, 3 or 4)"
    if height == 0 or width == 0:
        return f"JPEG declares a {width}x{height} image"
    problem = size_problem("JPEG", width, height)
    if problem is not None:
        return problem
    # Huffman coding spends at least a bit on each 8x8 block's DC term: fewer bytes than that
    # cannot hold the image the header declares (a cut file, or a decompression bomb). Arithmetic
    # coding (SOF9 and up, rare) can go below, so it is not held to it.
    if huffman and scan_bytes < width * height // 1024:
        return (f"JPEG declares {width}x{height} pixels but holds {scan_bytes:,} bytes of image data, too few to fill "
                "them (truncated, or made to look larger than it is)")
    return None


def _scans_problem(f, start: int, size: int) -> Optional[str]:
    if _count_scans(f, start, size) > MAX_JPEG_SCANS:
        return (f"JPEG has more than {MAX_JPEG_SCANS} scans (photos have about 10; decoding them all would take "
                "minutes): re-encode it")
    return None


def size_problem(kind: str, width: int, height: int) -> Optional[str]:
    if width * height > max_image_pixels():
        return f"{kind} declares {width}x{height} pixels, more than the limit of {max_image_pixels():,} (downscale it)"
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        return (f"{kind} declares {width}x{height} pixels, a side more than {MAX_ASPECT_RATIO} times the other: too "
                "thin to resize by its shorter side (crop it)")
    return None


def _count_scans(f, start: int, size: int) -> int:
    """Start-of-scan markers from `start` (the first scan's header) on, counted up to one past
    the limit. Inside entropy-coded data a 0xFF byte is followed by 0x00 or a restart marker, so
    FF DA is always a marker."""
    f.seek(start)
    scans, tail, read = 0, b"", start
    while read < size and scans <= MAX_JPEG_SCANS:
        block = f.read(1 << 20)
        if not block:
            break
        read += len(block)
        joined = tail + block
        scans += joined.count(b"\xff\xda")
        tail = joined[-1:]
    return scans


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
    problem = size_problem("PNG", width, height)
    if problem is not None:
        return problem
    pos, has_data, has_palette, compressed, exif_chunks = 8, False, False, 0, 0
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
        if kind == b"eXIf":
            exif_chunks += 1
            problem = _png_exif_problem(data[pos + 8:end], exif_chunks)
            if problem is not None:
                return problem
        if kind in (b"tEXt", b"zTXt", b"iTXt") and data[pos + 8:end].split(b"\0", 1)[0] == b"exif":
            return (f"PNG {name} chunk keyed 'exif' (PIL reads it as the image's EXIF, DALI does not: the two "
                    "would turn the image differently); re-save the image")
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


def _png_exif_problem(block: bytes, count: int) -> Optional[str]:
    """PNG allows one eXIf chunk, holding a TIFF header: libpng (DALI) warns and drops a second
    one or one of another form (an "Exif" prefix, as in a JPEG), which PIL reads, so the
    backends would turn the image differently (a second chunk also corrupted DALI's heap)."""
    if count > 1:
        return "PNG has two eXIf chunks (which orientation holds is ambiguous); re-save it with one"
    if block[:4] not in _TIFF_MAGICS:
        return "PNG eXIf chunk does not start with a TIFF header (II* or MM*): garbled metadata; re-save the image"
    problem = _exif_directory_problem(block)
    return None if problem is None else f"PNG {problem}"


_NOT_READ = "cannot be read"  # how a file that would not open starts its problem


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
        return read_problem(path, exc)
    return "not a JPEG or PNG file (bad or missing header)"


def read_problem(path: str, exc: OSError) -> str:
    """Why the file `path` would not open, as a problem: a folder on the way one may not enter, or a
    file on the way where a folder should be, is named; the image itself may be fine (and could not
    be removed either)."""
    from fasttl.util.path_problems import blocking_part, closed_folder, not_a_folder

    if exc.errno in (errno.EACCES, errno.EPERM) and (closed := closed_folder(path)):
        return f"{_NOT_READ} (the folder {closed} can't be entered: permission denied)"
    if exc.errno in (errno.ENOTDIR, errno.ELOOP) and (blocked := blocking_part(path)):  # a file or a loop on the way
        return f"{_NOT_READ} ({blocked} {not_a_folder(blocked)})"
    if exc.errno == errno.ENAMETOOLONG:
        return f"{_NOT_READ} ({TOO_LONG_WHY})"
    return f"{_NOT_READ} ({'it does not exist' if exc.errno == errno.ENOENT else exc.strerror or exc})"


def unreadable(name, problem) -> str:
    """`name` and why it can't be used: a file that would not open (a permission, a missing file) is
    not said to be a bad image."""
    problem = str(problem)
    return f"{name}: {problem}" if problem.startswith(f"{_NOT_READ} (") else \
        f"{name}: {_NOT_READ} as an image ({problem})"



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


def check_all(paths: Sequence[str], check, num_threads: Optional[int], stop_at_first: bool):
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


# What to do about a file that can't be used, by the words of its problem (the first that match):
# a file not there, or one behind a folder one may not enter, is not one to remove.
_ADVICE = (
    (("does not exist", "No such file"), "no file is there now (a wrong path or link, or removed since fasttl "
                                         "listed it): fix the path, or run again once the folders hold still"),
    ((", not a folder)", "is a symbolic link loop)", "more than the system follows)"), "fix the path"),
    ((f"{TOO_LONG_WHY})",), "give a shorter path (move the file up, or rename folders)"),
    (("can't be entered",), "make that folder accessible to you"),
    (("(Permission denied)",), "make it readable to you"),
)


def skip_hint(problem: object = "") -> str:
    """What to do about a file that can't be used (`problem`: why), then how to leave such files out."""
    advice = next((advice for words, advice in _ADVICE if any(w in str(problem) for w in words)), "remove it")
    return (advice + ", or leave unreadable files out: --on-error skip (fasttl run, extract, eval, predict), "
            "fasttl.data.screen(source, on_error='skip') in Python")
