"""Writing and reading fasttl's own small files (run folders, cache records) safely: every write
goes to a temporary named `.fasttl-tmp-*` (created with O_EXCL | O_NOFOLLOW: never an existing
file, never through a link), is fsynced and renamed over its target; JSON is strict (no NaN or
Infinity); a read never follows a link or blocks on a FIFO."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import math
import os
import re
import secrets
import stat
from typing import Callable, Optional, Tuple

TEMP_PREFIX = ".fasttl-tmp-"
RUN_MARKER = ".fasttl-run"  # in every run folder fasttl makes: the proof that it is one
RUN_CONFIG = "config.json"  # a run's options, written when it starts
RUN_MARKER_WHAT = "a fasttl run folder"  # the marker record's "what": what a scan checks
MAX_JSON_BYTES = 256 << 20  # fasttl's own JSON files are far smaller; a larger one is not read
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except PermissionError:  # a folder one may write but not list (mode 311): the file is in place all the same
        return
    try:
        os.fsync(fd)
    except OSError as exc:  # a file system that can't sync a folder (some network and FUSE ones): the file is in place
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def write_atomic(path: str, data: bytes, replace: bool = True) -> None:
    """Writes `data` to a fasttl temporary beside `path`, fsyncs it and renames it over `path`. A
    symbolic link at `path` is replaced, its target left alone. With `replace` False nothing at
    `path` is replaced (a file that appeared there during the work: FileExistsError). On failure the
    temporary is removed."""
    target = absolute(path)
    directory, name = os.path.split(target)
    short = os.fsdecode(os.fsencode(name)[:150])  # within NAME_MAX; a name of bytes that are not UTF-8 as it is
    tmp = os.path.join(directory, f"{TEMP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}-{short}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, 0o666)
    except OSError as exc:  # the error names the user's file, never the temporary
        raise OSError(exc.errno, exc.strerror, target) from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if replace:
            os.replace(tmp, target)
        else:
            _put_new(tmp, target)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.errno is not None and exc.filename in (None, tmp):
            # A full disk or quota fails the write itself, naming no file: the error names the user's.
            raise OSError(exc.errno, exc.strerror, target) from None
        raise
    _fsync_dir(directory)


def _put_new(tmp: str, target: str) -> None:
    """`tmp` moved to `target` only where nothing is there: a hard link fails when a file appeared
    (no check-then-rename race); a file system without hard links gets the check, then the rename."""
    try:
        os.link(tmp, target, follow_symlinks=False)
    except FileExistsError:
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), target) from None
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS):
            raise
        if os.path.lexists(target):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), target) from None
        os.replace(tmp, target)
        return
    with contextlib.suppress(OSError):  # the file is in place; a temporary left is fasttl's hidden name
        os.unlink(tmp)


def json_bytes(payload) -> bytes:
    """Strict JSON: a NaN or infinity is an error here rather than a file other readers reject."""
    return (json.dumps(payload, indent=2, sort_keys=True, allow_nan=False) + "\n").encode()


def write_json_atomic(path: str, payload) -> None:
    write_atomic(path, json_bytes(payload))


def plain_reader(fd: int, refuse: Callable[[os.stat_result], Optional[Exception]]):
    """The file object of the descriptor `fd`, once `refuse(its fstat)` has raised nothing to say
    (it returns the exception to raise, or None). fdopen itself refuses a folder, with an error
    naming the descriptor's number instead of the path: the check comes first."""
    try:
        problem = refuse(os.fstat(fd))
    except BaseException:
        os.close(fd)
        raise
    if problem is not None:
        os.close(fd)
        raise problem
    return os.fdopen(fd, "rb")


def _no_infinity(text: str):
    raise ValueError(f"{text} is not a number strict JSON holds")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999: beyond any double
        raise ValueError(f"{text} is beyond a double's range")
    return value


def read_json(path: str, strict: bool = False, limit: int = MAX_JSON_BYTES):
    """The JSON value in `path`, None when there is no file; ValueError when it is not valid JSON,
    or not a plain file (a link or a FIFO is never followed or read). `strict`: NaN, Infinity and
    numbers beyond a double (which fasttl never writes) are damage too; else the reader's own
    checks name the field that holds one. `limit`: the most bytes read (a file of one kind fasttl
    keeps small may have a smaller one)."""
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW | _CLOEXEC | _NONBLOCK)
    except FileNotFoundError:
        return None
    except PermissionError:  # the user's to fix (make it readable), not damage to refuse the file for
        raise
    except OSError as exc:
        raise ValueError(f"{path}: cannot be read as a plain file ({exc.strerror})") from None
    with plain_reader(fd, lambda info: _json_problem(path, info, limit)) as f:
        data = _read_sized(f, limit)
    try:
        if strict:
            return json.loads(data.decode("utf-8"), parse_constant=_no_infinity, parse_float=_finite)
        return json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ValueError(f"{path}: not valid JSON ({type(exc).__name__})") from None


def _json_problem(path: str, info: os.stat_result, limit: int) -> Optional[Exception]:
    if not stat.S_ISREG(info.st_mode):
        what = "a folder" if stat.S_ISDIR(info.st_mode) else "a pipe or a device"
        return ValueError(f"{path}: not a plain file ({what})")
    if info.st_size > limit:
        return ValueError(f"{path}: {info.st_size:,} bytes, more than fasttl ever writes to a JSON file")
    return None


def is_plain_file(path: str) -> Optional[bool]:
    """None when nothing is at `path`, else whether it is a regular file (not a link)."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except FileNotFoundError:
        return None


_LOCK_RECORD = re.compile(rb"(pid [0-9]+)?\s*")


class FolderLock:
    """An exclusive, non-blocking lock on a folder, held for a writer's whole run: a second one
    fails at once naming the holder, instead of interleaving. The OS releases it when the holder
    exits, even on kill -9 (flock).

    The lock file is opened with O_NOFOLLOW and written only when it is a plain file with one name
    that holds nothing but a lock record ("pid N"): a link, a folder, a hard link to another file or
    a user's file of that name is refused, and left as it is. Subclasses choose the errors."""

    def __init__(self, directory: str, name: str, purpose: str):
        self.path = os.path.join(directory, name)
        self.purpose = purpose
        self.fd: Optional[int] = None

    def refused(self, why: str) -> Exception:
        from fasttl.util.errors import UserError

        return UserError(f"{self.path}: {why}; fasttl will not write to it (move it away: it is not fasttl's lock "
                         "file, which fasttl creates itself)")

    def locked(self, holder: str) -> Exception:
        from fasttl.util.errors import UserError

        return UserError(f"{os.path.dirname(self.path)} is in use by {holder}; wait for it to finish ({self.purpose})")

    def __enter__(self) -> "FolderLock":
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | _NOFOLLOW | _CLOEXEC | _NONBLOCK, 0o644)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise self.refused("is a symbolic link") from None
            if exc.errno == errno.EISDIR:
                raise self.refused("is a folder") from None
            if exc.errno in (errno.EACCES, errno.EPERM) and os.path.lexists(self.path) and \
                    os.access(os.path.dirname(self.path) or ".", os.W_OK):
                raise self._not_yours() from None
            raise self._blamed(exc) from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise self.refused("is not a regular file")
            if info.st_nlink != 1:
                raise self.refused(f"is a hard link shared with {info.st_nlink - 1} other name(s)")
            if info.st_size > 64 or not _LOCK_RECORD.fullmatch(os.pread(fd, 65, 0)):
                raise self.refused("holds something other than a lock record")
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _holder(fd)
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise self.locked(holder) from None
            raise
        except BaseException:
            os.close(fd)
            raise
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()}".encode(), 0)
        except OSError as exc:  # a full disk: the error names the folder, not standard output
            os.close(fd)
            raise self._blamed(exc) from None
        self.fd = fd
        return self

    def _not_yours(self) -> Exception:
        """The lock file is there, in a folder one may write, but not open to this user (its mode
        changed, another user's): what to do about fasttl's own file, not advice to chmod a name."""
        from fasttl.util.errors import UserError

        return UserError(f"{self.path}: permission denied: fasttl's lock file of this folder is not readable and "
                         "writable to you; remove it when no fasttl command is using the folder (fasttl makes it "
                         "again)")

    def _blamed(self, exc: OSError) -> OSError:
        """What a failure to make or write the lock file is said as: a full disk, a read-only file
        system or a folder one may not write names the folder (what to free or make writable), not
        the lock file fasttl makes in it."""
        folder = os.path.dirname(self.path) or "."
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS) or \
                (exc.errno in (errno.EACCES, errno.EPERM) and not os.access(folder, os.W_OK)):
            return OSError(exc.errno, exc.strerror, folder)
        return OSError(exc.errno, exc.strerror, self.path)

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def plain_path(path):
    """os.fspath(path), numpy's text (np.str_, a pandas column's .values) as a plain str: os.listdir
    and os.walk read np.str_ as bytes and list bytes names, which no str joins."""
    path = os.fspath(path)
    return str(path) if isinstance(path, str) else path


def absolute(path) -> str:
    """os.path.abspath(os.path.expanduser(path)), but as the kernel reads the path: a '..' after a
    symbolic link goes up from the link's target, where abspath drops the link and the '..' as text
    (another image, data set or output would be used); a '/', '/.' or '/..' after a file stays. The
    last part is kept as given: a link there stays a link, for the checks that refuse one."""
    path = os.path.expanduser(plain_path(path))
    last = path.split(os.sep)[-1]
    if path not in ("", os.sep) and last in ("", os.curdir, os.pardir):
        try:
            os.stat(path)  # a folder: read below as the kernel reads it
        except OSError as exc:  # 'x.jpg/', 'x.jpg/.', 'missing/..': the kernel stops where abspath would go on
            if exc.errno != errno.ENOENT or last == os.pardir:
                return os.path.join(os.getcwd(), path)
        except ValueError:  # a NUL in the path: refused where it is used
            pass
    if os.pardir not in path.split(os.sep):
        return os.path.abspath(path)
    head, tail = os.path.split(path.rstrip(os.sep))
    if not os.path.isdir(head or os.curdir):
        return os.path.join(os.getcwd(), path)  # the kernel can't go that way (a missing folder, a file): nor may
        # the text, so the path stays as given and fails where it is used (abspath would drop 'missing/..')
    return os.path.realpath(path) if tail == ".." else os.path.join(os.path.realpath(head or os.curdir), tail)


def _holder(fd: int) -> str:
    """The lock record ("pid N") of a lock file another process holds."""
    return os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"


def lock_holder(path: str) -> Optional[str]:
    """Who holds FolderLock's file `path` now ("pid N"), or None when nobody does (or it can't be
    read: a link, no file)."""
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW | _CLOEXEC | _NONBLOCK)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    except OSError as exc:
        if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            return None
        return _holder(fd)
    finally:
        os.close(fd)


def run_record(path: str) -> Optional[dict]:
    """The run marker at `path` when it is fasttl's record (a plain JSON file saying what it is),
    else None; a permission error is raised, never taken for damage."""
    try:
        record = read_json(path, limit=1 << 20)
    except ValueError:
        return None
    return record if isinstance(record, dict) and record.get("what") == RUN_MARKER_WHAT else None


def run_marker_state(folder: str) -> Tuple[str, object]:
    """What the RUN_MARKER entry in `folder` is, one rule for every reader: 'absent' (nothing),
    'folder' (a folder of that name: no run's), 'link' (never followed: no run writes one),
    'record' (a plain file holding fasttl's record, returned beside it), 'unreadable' (a plain
    file fasttl may not read, the reason beside it: it can't tell), 'other' (a file of the user's)."""
    path = os.path.join(folder, RUN_MARKER)
    try:
        mode = os.lstat(path).st_mode
    except OSError:  # nothing there, or a path the kernel can't follow (a link loop): no marker, as os.path says
        return "absent", None
    if stat.S_ISLNK(mode) or stat.S_ISDIR(mode):
        return ("link" if stat.S_ISLNK(mode) else "folder"), None
    if not stat.S_ISREG(mode):
        return "other", None
    try:
        record = run_record(path)
    except OSError as exc:
        return "unreadable", exc.strerror
    return ("record", record) if record is not None else ("other", None)


def holds_run_record(folder: str) -> bool:
    """Whether `folder` holds a run's marker: a plain file (never a link) holding fasttl's record.
    One that can't be read can't be told from a run's: a UserError naming it."""
    return marker_holds_run(folder, *run_marker_state(folder))


def marker_holds_run(folder: str, state: str, why) -> bool:
    """holds_run_record for a marker already read (run_marker_state's state and detail)."""
    if state == "unreadable":
        from fasttl.util.errors import UserError

        raise UserError(f"{os.path.join(folder, RUN_MARKER)} cannot be read ({why}), so fasttl can't tell whether "
                        "its folder is a run folder, which only its run writes into; make it readable, or remove it "
                        "if it is yours")
    return state == "record"


def _marker_problem(folder: str) -> str:
    """Why the RUN_MARKER in `folder` does not make it a run folder ('' when it does): fasttl's
    record, beside the very config.json whose SHA-256 it holds (a marker copied beside another
    config.json vouches for nothing there)."""
    state, record = run_marker_state(folder)
    if state == "link":
        return "is a symbolic link, not the file a run writes"
    if state == "unreadable":
        return f"cannot be read ({record})"
    if state != "record":
        return "is not fasttl's run marker (no run's record)"
    config_path = os.path.join(folder, RUN_CONFIG)
    try:
        config = read_plain(config_path, MAX_JSON_BYTES) if is_plain_file(config_path) else None
    except PermissionError as exc:
        return f"is a run's marker, but the config.json beside it cannot be read ({exc.strerror})"
    except (OSError, ValueError):
        config = None
    if config is None:
        return "is a run's marker, but no run's config.json is beside it (copied in?)"
    return "" if hashlib.sha256(config).hexdigest() == record.get("config_sha256") else \
        "is a run's marker, but not of the config.json beside it (copied in?)"


def run_folder_in_data(folder: str) -> bool:
    """Whether a folder met among images is a fasttl run (passed over: its figures are no photos):
    its marker is a run's record, beside the config.json a run writes. Anything else named like the
    marker is refused (a DataError naming it and why): neither a run nor, with it, a folder of
    images to guess at (a class silently dropped)."""
    from fasttl.util.errors import DataError

    if run_marker_state(folder)[0] in ("absent", "folder"):
        return False
    why = _marker_problem(folder)
    if why:
        raise DataError(f"data: {os.path.join(folder, RUN_MARKER)} {why}, so fasttl can't tell a run folder from a "
                        "folder of images; remove it (or move the folder away)")
    return True


def enclosing_run_folder(path: str) -> Optional[str]:
    """The fasttl run folder (marked with RUN_MARKER) that `path` is or lies in, links resolved;
    None when there is none: only a run writes into its folder. A file of the marker's name that
    holds no run's record is a user's (a marker fasttl may not read counts: it can't tell)."""
    folder = os.path.realpath(os.path.expanduser(path))
    while True:
        if holds_run_record(folder):
            return folder
        parent = os.path.dirname(folder)
        if parent == folder:
            return None
        folder = parent


def is_inside(path: str, folder: str) -> bool:
    """Whether `path` is `folder` or lies under it, links resolved (where fasttl writes never goes
    among a data folder's images or a run's files)."""
    folder = os.path.realpath(os.path.expanduser(folder))
    return os.path.commonpath([os.path.realpath(os.path.expanduser(path)), folder]) == folder


def user_path(path: str) -> str:
    """What an error names instead of one of fasttl's temporaries: the file a user asked for
    (`.fasttl-tmp-PID-HEX-NAME` -> NAME beside it), or the folder a download or an extraction
    goes to (`.fasttl-tmp-download-*`, `.fasttl-tmp-extract-*` -> their folder)."""
    directory, name = os.path.split(path)
    match = re.fullmatch(re.escape(TEMP_PREFIX) + r"[0-9]+-[0-9a-f]+-(.*)", name)
    if match:
        return os.path.join(directory, match.group(1))
    return directory if name.startswith((f"{TEMP_PREFIX}download-", f"{TEMP_PREFIX}extract-")) else path


def read_plain(path: str, limit: int) -> bytes:
    """The bytes of `path`, a regular file of at most `limit` bytes: a pipe is never waited on and a
    device or a larger file never read (OSError/ValueError say which)."""
    def problem(info: os.stat_result) -> Optional[Exception]:
        if not stat.S_ISREG(info.st_mode):
            return ValueError("not a regular file (a folder, a pipe or a device?)")
        if info.st_size > limit:
            return ValueError(f"{info.st_size:,} bytes, more than the {limit:,} read here")
        return None

    with plain_reader(os.open(path, os.O_RDONLY | _CLOEXEC | _NONBLOCK), problem) as f:
        return _read_sized(f, limit)


def first_bytes(path: str, count: int = 8) -> bytes:
    """The first `count` bytes of `path`, to say what kind of file it is (a pipe is never waited on)."""
    fd = os.open(path, os.O_RDONLY | _CLOEXEC | _NONBLOCK)
    try:
        return os.read(fd, count)
    finally:
        os.close(fd)


def _read_sized(f, limit: int) -> bytes:
    """At most limit + 1 bytes of `f`, asking for what its size says (plus one, to see a file that
    grew past the limit): read(limit + 1) would reserve the limit's memory for every small file."""
    return f.read(min(limit, os.fstat(f.fileno()).st_size) + 1)
