"""How the CLI reports what went wrong: a user's mistake or the machine's refusal (a full disk,
a permission) is one line naming the path and what to do; a bug keeps its traceback."""
from __future__ import annotations

import contextlib
import errno
import os
import sys

from fasttl.util import settings
from fasttl.util.path_problems import TOO_LONG


def escape_unshowable_text() -> None:
    """A console that can't show a name (an ASCII or Windows code page) gets it escaped, not a
    traceback."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")


def user_error_types() -> tuple:
    """Errors that come from what the user asked for or handed fasttl, not from a bug: fasttl's
    own derive from UserError; a missing or unreadable path is the OS's."""
    from fasttl.util.errors import UserError

    return (UserError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


# What the machine said, and what to do about it: at the CLI these are the user's to fix.
OS_ERRORS = {
    errno.ENOSPC: "no space left on the device (free some, or write elsewhere); nothing half-written was kept",
    errno.EDQUOT: "disk quota exceeded (free some space, or write elsewhere); nothing half-written was kept",
    errno.EACCES: "permission denied (make it accessible to you, or use another path)",
    errno.EPERM: "operation not permitted (use another path)",
    errno.EROFS: "read-only file system (write elsewhere)",
    errno.EMFILE: "too many open files (raise the limit, e.g. ulimit -n 4096, or use fewer workers)",
    errno.ENFILE: "too many open files on the system (close some programs, or use fewer workers)",
    errno.ENOENT: "no such file or folder (check the path)",
    errno.ENOTDIR: "a part of the path is a file, not a folder (check the path)",
    errno.EISDIR: "is a folder where fasttl writes or reads a file (move it away, or use another path)",
    errno.ENAMETOOLONG: TOO_LONG,
    errno.ELOOP: "too many levels of symbolic links (a link loop? check the path)",
    errno.EFBIG: "file too large (a file size limit, ulimit -f, or the file system's; write elsewhere or raise it)",
    errno.EXDEV: "the path crosses file systems where fasttl moves a file into place (use a path on one file system)",
    errno.ENXIO: "no such device (a FIFO with no reader, or a device file? use a regular path)",
    errno.EEXIST: "something is there already (made while fasttl worked?), left as it is (move it away, or use "
                  "another path)",
}


def os_error_line(exc: OSError) -> str:
    from fasttl.util import files
    from fasttl.util.path_problems import (CANT_ENTER, CANT_WRITE_IN, blocking_part, closed_folder, missing_folder,
                                           standing)
    from fasttl.util.outputs import terminal_text

    filename = exc.filename if isinstance(exc.filename, (str, bytes, os.PathLike)) else None  # not a descriptor number
    where = terminal_text(files.user_path(os.fsdecode(filename))) if filename is not None else \
        "standard output" if exc.filename is None else "a file fasttl had open"
    if exc.filename is None and exc.errno in (errno.EMFILE, errno.ENFILE):
        where = "files"
    # a per-process limit (ulimit -f, -n) is no fault of the folder: moving the cache folder won't help
    where_to = "" if exc.errno in (errno.EFBIG, errno.EMFILE, errno.ENFILE) else _in_feature_cache(filename)
    in_the_way = blocking_part(os.fsdecode(filename)) \
        if filename is not None and exc.errno in (errno.ENOTDIR, errno.ENOENT, errno.ELOOP) else None
    if in_the_way is not None:  # what to move, never a name fasttl made inside the folder it wanted
        return f"{terminal_text(in_the_way)}: {standing(in_the_way)}, {NOT_A_FOLDER}{where_to}"
    gone = missing_folder(os.fsdecode(filename)) if filename is not None and exc.errno == errno.ENOENT else None
    if gone is not None:  # the folder that went (or never was), not the file fasttl was making in it
        return f"{terminal_text(gone)}: no such folder (check the path){where_to}"
    closed = closed_folder(os.fsdecode(filename)) \
        if filename is not None and exc.errno in (errno.EACCES, errno.EPERM) else None
    if closed is not None:  # a folder on the way that can't be entered: making it writable would not do
        return f"{terminal_text(closed)}: {CANT_ENTER}{where_to}"
    folder = _folder_to_blame(filename, exc.errno)
    if folder is not None:  # the folder to make writable, not a name fasttl was making in it (a lock, a temporary)
        said = CANT_WRITE_IN if exc.errno in (errno.EACCES, errno.EPERM) else OS_ERRORS[exc.errno]
        return f"{terminal_text(folder)}: {said}{where_to}"
    return f"{where}: {OS_ERRORS[exc.errno]}{where_to}"


def _folder_to_blame(filename, code: int):
    """The folder a permission error came from when fasttl was making a file or folder that is not
    there yet (a run's lock, a temporary, --out itself), or writing in a folder it may only read; the
    folder of one of fasttl's hidden or cache files a full disk stopped; or None."""
    if filename is None:
        return None
    path = os.path.abspath(os.fsdecode(filename))
    folder = os.path.dirname(path)
    if code in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):  # the disk's: a hidden name is fasttl's (a lock, a marker)
        from fasttl.cache.store import is_own_file
        from fasttl.util.files import user_path

        name = os.path.basename(user_path(path))  # (a temporary says the file it stands for)
        return folder if (name.startswith(".") or is_own_file(folder, name)) and os.path.isdir(folder) else None
    if code not in (errno.EACCES, errno.EPERM):
        return None
    if os.path.isdir(path) and os.access(path, os.R_OK | os.X_OK) and not os.access(path, os.W_OK):
        return path
    if os.path.isfile(path) and os.access(path, os.R_OK | os.W_OK) and not os.access(folder, os.W_OK):
        return folder  # a file fasttl may write, in a folder it may not: replacing or removing it needs the folder
    return folder if not os.path.lexists(path) and os.path.isdir(folder) else None


NOT_A_FOLDER = "where the path needs a folder (move it away, or use another path)"


def _in_feature_cache(filename) -> str:
    """Where a failing path is in the feature cache folder, how to move that folder: the path alone
    does not say that FASTTL_CACHE_DIR (or its default) put it there."""
    from fasttl.util.outputs import terminal_text
    from fasttl.transfer.caching import cache_root

    if filename is None:
        return ""
    from fasttl.util.errors import UserError

    try:
        root = os.path.abspath(cache_root())
    except UserError:  # FASTTL_CACHE_DIR itself is refused: not where this path is
        return ""
    path = os.path.abspath(os.fsdecode(filename))
    if path != root and not path.startswith(root.rstrip(os.sep) + os.sep):
        return ""
    chosen = settings.CACHE_DIR.is_set()
    return (f"; it is in the feature cache folder {'FASTTL_CACHE_DIR=' if chosen else ''}{terminal_text(root)}"
            f"{'' if chosen else ' (the default)'}: set FASTTL_CACHE_DIR to a folder you can write")


@contextlib.contextmanager
def summary_of(written, what: str):
    """Around the printing of a summary after the file `written` was saved: a failed standard output
    (a full disk) says the file was written (summary_not_printed)."""
    try:
        yield
        flush_stdout()
    except OSError as exc:
        raise summary_not_printed(exc, written, what) from None


def summary_not_printed(exc: OSError, written, what: str = "the metrics were") -> BaseException:
    """What to raise when standard output failed after the file `written` was saved (eval's
    metrics, export's model): a full disk there is one line saying the file was written; any other
    error as it is."""
    from fasttl.util.errors import UserError
    from fasttl.util.outputs import terminal_text

    if exc.errno not in OS_ERRORS or not written or isinstance(exc, BrokenPipeError):
        return exc
    quiet_stdout()
    return UserError(f"standard output: {OS_ERRORS[exc.errno].split(';')[0]}; {what} written to "
                     f"{terminal_text(written)}, only this summary was not printed")


def flush_stdout() -> None:
    """sys.stdout.flush(), where there is one: a command run with standard output closed (`>&-`)
    has none (Python sets it to None, and print writes nowhere)."""
    if sys.stdout is not None:
        sys.stdout.flush()


def say_error(line: str) -> None:
    """`line` on stderr, where there is one: with standard error closed (`2>&-`) nothing can be
    said, and the exit code still tells (print would raise, or write to stdout when it is None)."""
    if sys.stderr is not None:
        with contextlib.suppress(OSError, ValueError):
            print(line, file=sys.stderr, flush=True)


def quiet_stdout() -> None:
    """After a failed write to stdout, nothing more may go there: the interpreter's own flush at
    exit would print a second error."""
    with contextlib.suppress(OSError, AttributeError):  # (AttributeError: no stdout at all)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def peer_stopped(exc: BaseException) -> str:
    """Under torchrun, a collective that failed because another rank stopped (its own error,
    printed by it, is the one to read): one line for this rank; '' for any other error."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return ""
    text = str(exc)
    if not (isinstance(exc, getattr(dist, "DistError", ())) or "closed by peer" in text or "reset by peer" in text):
        return ""
    return f"rank {dist.get_rank()}: another rank stopped (its error is printed above), so this one stops too"


def one_line(exc: BaseException) -> str:
    """The error as one printable line: what a file name or a server put in it can't drive the
    terminal (escape sequences are shown escaped)."""
    from fasttl.util.outputs import terminal_text

    text = terminal_text(" ".join(str(exc).split()))
    return text if text else type(exc).__name__
