"""Why a path can't be used, in the words an error says after it: what stands where a folder is
wanted, a folder on the way one may not enter, one that is missing, one fasttl can't write in."""
from __future__ import annotations

import errno
import os
from typing import Optional


def standing(path: str) -> str:
    """What stands at `path` where a folder is wanted: a link to nothing or a link loop is no file,
    whatever os.path.isdir says of both."""
    if not os.path.lexists(path):
        return "nothing"
    if os.path.islink(path):
        try:
            os.stat(path)
        except PermissionError:
            return f"a symbolic link into {closed_folder(path)}, which can't be entered (permission denied)"
        except OSError as exc:
            return _too_many_links(path) if exc.errno == errno.ELOOP else "a symbolic link to nothing (dangling)"
        return "a symbolic link to a file"
    return "a file"


LINKS_FOLLOWED = 40  # the most symbolic links Linux follows in one path (then ELOOP)


def _too_many_links(path: str) -> str:
    """ELOOP at a link: a loop, or a chain of links longer than the system follows."""
    seen, here = set(), path
    while os.path.islink(here) and here not in seen and len(seen) <= LINKS_FOLLOWED:
        seen.add(here)
        here = os.path.normpath(os.path.join(os.path.dirname(here), os.readlink(here)))
    if len(seen) > LINKS_FOLLOWED and here not in seen:
        return f"a chain of more than {LINKS_FOLLOWED} symbolic links (more than the system follows)"
    return "a symbolic link loop"


def not_a_folder(path: str) -> str:
    """What stands at `path` where a folder is wanted, as an error says it after the path."""
    what = standing(path)
    return "does not exist" if what == "nothing" else f"is {what}, not a folder" if what.endswith("file") else \
        f"is {what}"


def unreachable(path: str) -> str:
    """Why `path` can't be looked at ('' when it can, or is simply missing): a folder on the way one
    may not enter, a file or a link loop on the way, a path too long. os.path.exists, isdir and
    isfile say False for all of them, so a class folder linked through a folder one may not enter
    would pass for a broken link, `--data afile/d` or a weights file for a missing one."""
    try:
        os.stat(path)
        return ""
    except PermissionError:
        pass
    except OSError as exc:
        return _not_on_the_way(path, exc.errno)
    except ValueError:
        return ""
    closed = closed_folder(path)
    return f"can't be reached: {closed} {CANT_ENTER}" if closed else \
        "can't be reached (permission denied on the way; make its folders accessible to you)"


def _not_on_the_way(path: str, code: int) -> str:
    """What the kernel met on the way to `path` where it is not simply missing, or ''."""
    if code == errno.ENAMETOOLONG:
        return f"can't be reached: {TOO_LONG}"
    blocked = blocking_part(path) if code in (errno.ENOTDIR, errno.ELOOP) else None
    return f"can't be reached: {blocked} {not_a_folder(blocked)} (fix the path)" if blocked else ""


TOO_LONG_WHY = "its path, or a name in it, is too long for the file system"  # ENAMETOOLONG, said one way
TOO_LONG = f"{TOO_LONG_WHY} (give a shorter path)"
CANT_ENTER = "can't be entered (permission denied; make it accessible to you)"
CANT_WRITE_IN = ("permission denied, fasttl can't make files in this folder (make it writable to you, or use another "
                 "path)")


def unwritable(folder: str) -> str:
    """Why fasttl can't make a file in the existing `folder` ('' when it can), as an error says it
    after the folder: asked before the work, so an output written last is never refused after it."""
    if os.access(folder, os.W_OK | os.X_OK):
        return ""
    return CANT_ENTER if not os.access(folder, os.X_OK) else "read-only file system (write elsewhere)" \
        if os.statvfs(folder).f_flag & os.ST_RDONLY else CANT_WRITE_IN


def _folders_above(path: str) -> list:
    """The folders on the way to `path`, from the root (the path itself left out unless it ends in
    '/'), as written: the kernel meets 'file/..' or 'missing/..' at the file or the missing folder."""
    full = os.path.join(os.getcwd(), path)
    parts = [part for part in full.split(os.sep) if part]
    return [os.sep + os.sep.join(parts[:i]) for i in range(len(parts) + full.endswith(os.sep))]  # 'x/': x is one


def closed_folder(path: str) -> Optional[str]:
    """The first folder on the way to `path` (links resolved as far as they can be read) that one
    may not enter, or None."""
    real = os.path.realpath(os.path.expanduser(path))
    for part in _folders_above(real)[1:] + [real]:  # from the root: the first that can't be looked at, in its folder
        try:
            os.stat(part)
        except PermissionError:
            return os.path.dirname(part)
        except OSError:
            return None
    return None


def blocking_part(path: str) -> Optional[str]:
    """The first folder of `path` (from the root) that is there but is no folder (a file, a link to
    nothing, a link loop), or None."""
    return next((p for p in _folders_above(path) if os.path.lexists(p) and not os.path.isdir(p)), None)


def missing_folder(path: str) -> Optional[str]:
    """The first folder on the way to `path` (from the root) that is not there (removed during the
    work, or a wrong path), or None."""
    return next((p for p in _folders_above(path) if not os.path.lexists(p)), None)


def output_folder_problem(path: str, advice: str) -> str:
    """Why `path` can't be the output folder fasttl makes when missing ('' when it can), said from
    the culprit on (a file, a link to nothing or a loop at it or on the way, a folder on the way
    one may not enter, a path too long), `advice` after what a user can move away. Asked before
    any folder is made: makedirs would make the folders before the one it is refused at."""
    blocked = blocking_part(path)
    if blocked is not None and os.path.normpath(blocked) != os.path.normpath(path):
        return f"{blocked} {not_a_folder(blocked)}, where {path} needs a folder; {advice}"
    if os.path.lexists(path) and not os.path.isdir(path):
        return f"{path} {not_a_folder(path)}; {advice}"
    why = "" if os.path.isdir(path) else unreachable(path)
    return f"{path} {why}" if why else ""
