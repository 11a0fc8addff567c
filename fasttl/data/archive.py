"""Extracting a verified archive safely: every member checked before anything is written (no
link, device, absolute or `..` name, nothing outside the data set's folder, a bounded total size),
the files unpacked into a temporary folder beside the target and renamed into place once complete."""
from __future__ import annotations

import errno
import os
import shutil
import tarfile
import tempfile
from typing import Optional, Tuple

from fasttl.util.errors import DataError
from fasttl.util.files import TEMP_PREFIX

MAX_EXTRACTED_BYTES = 4 << 30  # an archive that unpacks to more than this is refused
# ... or holds more members (the data sets fetch knows ship a few files: CIFAR-10's archive holds 8);
# each member read costs a record in memory and a file on disk (200,000 empty ones: 33 s, 324 MB).
MAX_MEMBERS = 10_000
# A member's extended header (a GNU long name or link, a PAX record) is read whole into memory: a
# 100 KB archive declaring a 100 MB name took 1.7 GB. Real ones hold a path and a few attributes.
MAX_HEADER_BYTES = 1 << 20
# ... and all of them together: each member keeps its own decoded copy, so 10,000 members of 1 MB
# each took 10 GB from an 11 MB download. 10,000 members with a path and three times each (GNU tar's
# pax form, ~400 bytes) hold 4 MB.
MAX_TOTAL_HEADER_BYTES = 8 << 20
MAX_NAME_BYTES = 4096         # PATH_MAX; a longer name can't be created anyway
SHOWN_NAME = 120              # characters of a member's name a message shows
MAX_CHAINED_HEADERS = 8       # extended headers before one member (tarfile recurses once for each)
# The times a member may carry: the years 1 to 9999 (a file system's time_t holds them). Past them
# setting the file's time raised OverflowError (1e400, 10**20) after the files were written.
MEMBER_TIMES = (-62135596800, 253402300799)
# The destination's faults, not the archive's: named as DEST's (a full disk keeps the download to retry).
# The disk's or the user's (a full disk, a permission, a file size limit, ulimit -f), never the archive's.
_DISK = (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EIO, errno.EFBIG)


class _BoundedTarInfo(tarfile.TarInfo):
    """A tar header that refuses, before reading them, an extended header past MAX_HEADER_BYTES
    (or past MAX_TOTAL_HEADER_BYTES with the earlier ones), more than MAX_CHAINED_HEADERS of them in
    a row (400 chained ones overflowed Python's stack), sparse members (their maps are read block by
    block, unbounded; data sets ship none), and a negative size (a Python without the fix of
    CVE-2025-8194 steps back by it: the same headers are read again and again, each a new member)."""

    EXTENDED = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE,
                tarfile.SOLARIS_XHDTYPE)

    def _proc_member(self, tarfile_):
        chained = getattr(tarfile_, "_fasttl_chained", 0) + 1 if self.type in self.EXTENDED else 0
        tarfile_._fasttl_chained = chained
        if chained > MAX_CHAINED_HEADERS:
            raise DataError(f"holds more than {MAX_CHAINED_HEADERS} extended headers in a row before one member")
        _refuse_negative_size(self)
        if self.type in self.EXTENDED:
            _count_header_bytes(tarfile_, self.size)
        if self.type == tarfile.GNUTYPE_SPARSE:
            _refuse_sparse()
        return super()._proc_member(tarfile_)

    def _apply_pax_info(self, pax_headers, encoding, errors):
        super()._apply_pax_info(pax_headers, encoding, errors)
        _refuse_negative_size(self)  # a pax size, before tarfile moves to the next header by it

    def _proc_gnusparse_00(self, *args):  # sparse files in PAX form (CPython's names, 3.8 to 3.13)
        _refuse_sparse()

    _proc_gnusparse_01 = _proc_gnusparse_10 = _proc_gnusparse_00


def _refuse_negative_size(member: tarfile.TarInfo) -> None:
    if member.size < 0:
        raise DataError(f"member {_shown(member.name)} has a negative size")


def _count_header_bytes(tarfile_: tarfile.TarFile, size: int) -> None:
    if size > MAX_HEADER_BYTES:
        raise DataError(f"holds an extended header of {size:,} bytes (a name or attributes), more than "
                        f"{MAX_HEADER_BYTES:,}")
    tarfile_._fasttl_header_bytes = getattr(tarfile_, "_fasttl_header_bytes", 0) + size
    if tarfile_._fasttl_header_bytes > MAX_TOTAL_HEADER_BYTES:
        raise DataError(f"holds more than {MAX_TOTAL_HEADER_BYTES:,} bytes of extended headers (names or "
                        "attributes) in all")


def _refuse_sparse():
    raise DataError("holds a sparse file member (data sets hold plain files)")


def _shown(name: str) -> str:
    return repr(name if len(name) <= SHOWN_NAME else name[:SHOWN_NAME] + "...")


def check_members(archive: tarfile.TarFile, folder: str, source: str) -> None:
    """Refuses an archive with a member that could land outside `folder`, or is not a plain file
    or folder, before anything is extracted."""
    total = 0
    for count, member in enumerate(archive, 1):  # read one at a time: a refusal reads no further
        if count > MAX_MEMBERS:
            raise DataError(f"{source}: holds more than {MAX_MEMBERS:,} files; refused, nothing extracted (is this "
                            "the right archive? --url)")
        name = member.name
        parts = name.replace("\\", "/").split("/")
        while len(parts) > 1 and parts[0] == ".":  # tar czf x.tgz ./folder: the same place as folder/
            parts = parts[1:]
        dated = MEMBER_TIMES[0] <= member.mtime <= MEMBER_TIMES[1]  # compared only: 10**400 is no float
        if parts in (["."], [""]) and member.isdir() and dated:  # the archive's own top folder, "./"
            continue
        if len(os.fsencode(name)) > MAX_NAME_BYTES or any(len(os.fsencode(part)) > 255 for part in parts):
            why = "a name too long for a file system"
        elif name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
            why = "an absolute path"
        elif ".." in parts:
            why = "a '..' path"
        elif member.issym() or member.islnk():
            why = f"a link (to {_shown(member.linkname)})"
        elif member.issparse() or not (member.isfile() or member.isdir()):
            why = "not a plain file or folder"
        elif not dated:  # (extractall sets the top folder's time too)
            why = f"dated {str(member.mtime)[:40]} (its time is out of range)"
        elif parts[0] != folder:
            why = f"outside {folder}/"
        else:
            total += member.size
            if total > MAX_EXTRACTED_BYTES:
                raise DataError(f"{source}: unpacks to more than {MAX_EXTRACTED_BYTES:,} bytes; refused, nothing "
                                "extracted")
            continue
        raise DataError(f"{source}: member {_shown(name)} is {why}; refused, nothing extracted (is this the right "
                        "archive? --url)")


def _remove_stale_staging(dest: str) -> None:
    """Staging folders an earlier extraction into `dest` left (killed outright, or stopped twice
    during its cleanup): fasttl's own names as mkdtemp draws them (8 of its characters: a user's
    `.fasttl-tmp-extract-mine` is left), real folders only (a link is left alone, never followed);
    the caller holds the fetch lock, so none is in use."""
    import re
    import shutil
    import stat

    for name in os.listdir(dest):
        path = os.path.join(dest, name)
        if re.fullmatch(re.escape(f"{TEMP_PREFIX}extract-") + r"[a-z0-9_]{8}", name) and \
                stat.S_ISDIR(os.lstat(path).st_mode):
            shutil.rmtree(path, ignore_errors=True)


def _long_member_name(filename, staging: str) -> bool:
    """Whether the path an extraction failed at holds a name longer than file systems take (255
    bytes): the archive's; else a path too long is --dest's, too deep for what it holds."""
    if not isinstance(filename, (str, bytes)):
        return True
    return any(len(os.fsencode(part)) > 255 for part in os.path.relpath(os.fsdecode(filename), staging).split(os.sep))


def extract(archive_path: str, remote_folder: str, dest: str, required: Tuple[str, ...] = (),
            source: Optional[str] = None) -> str:
    """Extracts the archive's one folder into DEST/<folder> through a temporary folder beside it
    (removed on any failure); returns DEST/<folder>. Messages name `source` (the URL it came
    from) for the archive; a disk error (no space, read-only) is an OSError naming DEST."""
    source = source or archive_path
    target = os.path.join(dest, remote_folder)
    _remove_stale_staging(dest)
    staging = tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}extract-", dir=dest)
    try:
        try:
            with tarfile.open(archive_path, "r:*", tarinfo=_BoundedTarInfo) as archive:
                check_members(archive, remote_folder, source)
                if hasattr(tarfile, "data_filter"):
                    archive.extractall(staging, filter="data")
                else:  # Python without extraction filters: the members were checked above
                    archive.extractall(staging)
        except RecursionError:  # headers tarfile reads recursively (MAX_CHAINED_HEADERS stops the known chains)
            raise DataError(f"{source}: not a readable archive (its headers nest too deep); nothing "
                            "extracted") from None
        except (tarfile.TarError, EOFError, OSError, ValueError, OverflowError) as exc:  # Overflow: a time
            if isinstance(exc, DataError):
                if not str(exc).startswith(source):  # (_BoundedTarInfo's, raised inside tarfile)
                    raise DataError(f"{source}: {exc}; refused, nothing extracted (is this the right archive? "
                                    "--url)") from None
                raise
            if isinstance(exc, OSError) and (exc.errno in _DISK or exc.errno == errno.ENAMETOOLONG
                                             and not _long_member_name(exc.filename, staging)):  # (a deep --dest)
                raise OSError(exc.errno, exc.strerror, dest) from None
            if isinstance(exc, OSError) and exc.errno is not None:  # members that clash (a file where a folder goes)
                member = _shown(os.path.relpath(os.fsdecode(exc.filename), staging)) \
                    if isinstance(exc.filename, (str, bytes)) else "a member"
                raise DataError(f"{source}: cannot be extracted ({exc.strerror.lower()} at {member}: its members "
                                "clash); nothing extracted") from None
            raise DataError(f"{source}: not a readable archive ({type(exc).__name__}: "
                            f"{' '.join(str(exc).split())[:200]}); nothing extracted") from None
        extracted = os.path.join(staging, remote_folder)
        missing = [f for f in required if not os.path.isfile(os.path.join(extracted, f))]
        if missing:
            raise DataError(f"{source}: the archive lacks {remote_folder}/{missing[0]}; not the expected data "
                            "set, nothing extracted")
        if os.path.lexists(target):
            raise DataError(f"fetch: {target} appeared while extracting; nothing replaced")
        os.rename(extracted, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
