"""`fasttl data fetch cifar10`: downloads a data set's official archive, resumably (HTTP Range),
checks its SHA-256, and extracts it safely into $FASTTL_DATA (or --dest).

* The download goes to DEST/.fasttl-tmp-download-<SHA-256 prefix>-<archive>, opened without following links, each
  block written as it arrives; an interrupted one is continued by the next fetch (Range:
  bytes=N-). It stops (resumable) past a total deadline or below a minimum rate (--deadline,
  --min-rate), and follows redirects only to http(s) addresses.
* A checksum mismatch removes that download (fasttl's own temporary) and nothing else: a data
  folder already there stays as it was.
* Extraction refuses, before writing anything, any member that is not a plain file or folder
  (links, devices), has an absolute name or a `..` part, or lies outside the data set's folder;
  tarfile's "data" filter applies as well where Python has it. The files land in a temporary
  folder beside DEST/<folder> and are renamed into place once complete.

One registry (REMOTES) lists what can be fetched; `fasttl data fetch --help` shows it."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import http.client
import os
import stat
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

from fasttl.data.archive import extract
from fasttl.data.fetch_budget import BodyWatch, Budget
from fasttl.data.checked_response import BrokenChunks
from fasttl.data.http_reply import (DownloadError, PartialRefused, content_encoding, named_address, open_reply,
                                   ReplyFacts, content_range, resume_point, sendable, what_the_encoding_did)
from fasttl.util.checks import is_utf8
from fasttl.util.errors import DataError, OptionError, UserError
from fasttl.util.files import TEMP_PREFIX, absolute
from fasttl.util.path_problems import output_folder_problem, unwritable
from fasttl.util.outputs import terminal_text
from fasttl.util import settings
from fasttl.util.checks import ascii_digits, decimal, shown

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CHUNK = 1 << 20             # hashing
_READ = 64 << 10             # a network read returns what has arrived, up to this: all of it is kept for a resume
DEADLINE_S = 3600.0          # a download that takes longer stops (resumable); --deadline
MAX_DEADLINE_S = 30 * 86400  # the longest --deadline: a timer beyond it overflows time_t on some systems
MIN_RATE = 10_000            # bytes/s over each window (fetch_budget), below which it stops (resumable); --min-rate
SOCKET_TIMEOUT_S = 30.0      # no byte at all for this long: the connection is taken for dead
MAX_DOWNLOAD_BYTES = 4 << 30   # a server that sends more than this is cut off


class ChecksumError(UserError, ValueError):
    """The downloaded file is not the one expected."""


@dataclass(frozen=True)
class Remote:
    name: str
    url: str
    sha256: str
    size: int                   # bytes of the official archive (for the message before a download)
    archive: str                # file name of the archive
    folder: str                 # the one top-level folder of the archive, which lands in DEST
    required: Tuple[str, ...]   # files that make the extracted folder complete
    home: str                   # where the data set and its checksum are published


REMOTES: Dict[str, Remote] = {
    "cifar10": Remote(
        name="cifar10",
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        # SHA-256 of the official archive (the home page publishes its MD5, c58f30108f718f92721af3b95e74349a;
        # Keras and TensorFlow Datasets pin this SHA-256 for the same file of 170,498,071 bytes).
        sha256="6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce",
        size=170_498_071,
        archive="cifar-10-python.tar.gz",
        folder="cifar-10-batches-py",
        required=("batches.meta", "data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5",
                  "test_batch"),
        home="https://www.cs.toronto.edu/~kriz/cifar.html",
    ),
}


def names() -> Tuple[str, ...]:
    return tuple(REMOTES)


def default_dest() -> str:
    return settings.DATA.path()


def is_complete(folder: str, remote: Remote) -> bool:
    return os.path.isdir(folder) and all(os.path.isfile(os.path.join(folder, f)) for f in remote.required)


def _check_url(url: str) -> str:
    try:
        parts = urllib.parse.urlsplit(url) if isinstance(url, str) else None
        if parts is not None:
            parts.port  # a port that is not a number raises here
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname \
            or any(c in url for c in " \r\n\t\0"):
        raise OptionError(f"url: expected an http:// or https:// address, got {url!r}")
    if not is_utf8(url):  # bytes of another encoding, through the command line
        raise OptionError(f"url: {ascii(url)} holds bytes that are not UTF-8 text; give the address as UTF-8, or "
                          "percent-encode those bytes (%E9 for the Latin-1 \u00e9)")
    try:
        sendable(url)
    except UnicodeError as exc:
        raise OptionError(f"url: the host name {exc}") from None
    if parts.username is not None or parts.password is not None:  # urllib would take them for the host name
        shown = parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]).geturl()
        raise OptionError(f"url: a user name or password in the address ({shown} with credentials) is not "
                          "supported; download the file yourself and point --url at a server without them, or put it "
                          "where `fasttl data fetch` puts it")
    return url


def _check_sha256(value: str) -> str:
    text = value.strip().lower() if isinstance(value, str) else ""
    if len(text) != 64 or any(c not in "0123456789abcdef" for c in text):
        raise OptionError(f"sha256: expected 64 hexadecimal digits, got {value!r}")
    return text


def _partial_size(path: str) -> int:
    """Bytes of an earlier, interrupted download at `path` (0 when none); it must be a plain file."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return 0
    if not stat.S_ISREG(info.st_mode):
        raise DownloadError(f"fetch: {path} is not a plain file (a link?); remove it and fetch again")
    if info.st_nlink != 1:  # a hard link: writing it would write the user's other name for the file
        raise DownloadError(f"fetch: {path} has another name (a hard link), so it is not fasttl's partial download; "
                            "remove it and fetch again")
    return info.st_size


def _refuse_unusable_partial(partial: str, dest: str) -> None:
    """A partial download this user may not read or write (another user's, a `sudo fasttl data
    fetch`'s) named as such: an error naming --dest would send the user to fix a folder that is fine."""
    try:
        os.close(os.open(partial, os.O_RDWR | _NOFOLLOW | getattr(os, "O_CLOEXEC", 0)))
    except PermissionError:
        raise DownloadError(f"fetch: the partial download {os.path.basename(partial)} in {dest} can't be read or "
                            "written by you (permission denied: left by another user, or by sudo?); remove it and "
                            "fetch again") from None


def _open_partial(path: str) -> int:
    """An fd appending to `path`: a plain file of fasttl's, never opened through a link (an error
    naming it names --dest at the CLI: files.user_path)."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | _NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o644)


def download(url: str, path: str, progress: bool = True, timeout: float = SOCKET_TIMEOUT_S,
             deadline_s: float = DEADLINE_S, min_rate: float = MIN_RATE, reply: Optional[ReplyFacts] = None) -> int:
    """Downloads `url` into `path`, continuing what is already there (HTTP Range); returns the
    file's size. Every block that arrives is written at once, so an interrupted transfer keeps
    what arrived and raises DownloadError; so does one past `deadline_s` in all, or slower than
    `min_rate` bytes/s over a 30 s window. Redirects are followed only to http(s) addresses.
    `reply` gets what was learned of the reply (ReplyFacts)."""
    have = _partial_size(path)
    reply = reply if reply is not None else ReplyFacts()
    reply.resumed_from = have
    budget = Budget(deadline_s, min_rate, url)  # the wait for the reply counts too
    response = _reply(url, path, have, timeout, budget, reply)
    where = reply.where = named_address(url, budget.redirected)  # (what a later mismatch names too)
    if response is None:  # 416 on a complete file
        return have
    fd = _open_partial(path)
    bar = None
    try:
        with response:
            had, have = have, resume_point(response, fd, have, where)
            reply.resumed_from = have
            # (a chunked body is framed by its chunks: http.client reads no Content-Length beside them)
            length = "" if getattr(response, "chunked", False) else \
                (response.headers.get("Content-Length") or "").strip()
            announced = decimal(length)
            total = have + announced if announced is not None else None
            _, last, whole = content_range(response.headers.get("Content-Range")) if response.status == 206 else \
                (None, None, None)
            total = whole if whole is not None else total  # (a part may end before the file: a server's cap)
            if last is not None and whole is None:  # a part of a file of unknown size: maybe not its end
                reply.part = (have, last)
            shown_total = None if reply.part is not None else total  # (have + its length is no size of the file)
            if (total or 0) > MAX_DOWNLOAD_BYTES or total is None and ascii_digits(length):  # (more digits: more)
                said = f"{total:,}" if total is not None else shown(length)
                raise DownloadError(f"fetch: {where} announces {said} bytes, more than {MAX_DOWNLOAD_BYTES:,}; "
                                    "refused (check the address, --url)")  # (the partial kept as it was)
            if have < had:  # a reply accepted: the partial is cut where its body goes
                os.ftruncate(fd, have)
            bar = _progress_bar(url, shown_total, have) if progress else None
            budget.size = have
            budget.body_starts()  # (the wait for headers counts against the deadline, not the body's rate)
            size = _receive(response, fd, path, budget, bar, shown_total, timeout, where)
            if total is not None and size < total:
                part = f" (its reply held bytes {have:,} to {last:,} only)" if last is not None and last + 1 < total \
                    and shown_total is not None else ""
                raise DownloadError(f"fetch: the download of {where} stopped at {size:,} of "
                                    f"{'?' if shown_total is None else f'{total:,}'} bytes{part}; run the same command "
                                    "again to resume")
            try:
                os.fsync(fd)
            except OSError as exc:
                raise OSError(exc.errno, exc.strerror, os.path.dirname(path)) from None
            return size
    finally:
        os.close(fd)
        if bar is not None:
            bar.close()


def _receive(response, fd: int, path: str, budget: Budget, bar, total: Optional[int], timeout: float,
             where: str) -> int:
    """Writes the reply's body to `fd` as it arrives (from budget.size on) and returns the size
    reached; the budget watched while each read waits. A chunked reply that fails keeps only its
    checked chunks (CheckedResponse.body_checked): a resume never starts from framing bytes."""
    start = budget.size
    try:
        return _receive_blocks(response, fd, path, budget, bar, total, timeout, where)
    except BaseException:  # a refusal, a full disk, Ctrl-C or a signal's exit alike
        written = os.fstat(fd).st_size
        if _kept(response, start, written) < written:  # (never grown: an emptied one stays)
            os.ftruncate(fd, _kept(response, start, written))
        raise


def _kept(response, start: int, size: int) -> int:
    """How much of the partial download a failure keeps: of a chunked reply's body, only its
    checked chunks (CheckedResponse.body_checked; _receive cuts the rest)."""
    checked = getattr(response, "body_checked", None)
    return size if checked is None or not getattr(response, "chunked", False) else start + checked


def _receive_blocks(response, fd: int, path: str, budget: Budget, bar, total: Optional[int], timeout: float,
                    where: str) -> int:
    size = start = budget.size
    sock = getattr(getattr(response.fp, "raw", None), "_sock", None)  # to bound each wait by the deadline
    with BodyWatch(budget, sock) as watch:  # (one read may wait on a server for as long as it likes)
        while True:
            try:
                if sock is not None:
                    sock.settimeout(max(0.05, min(timeout, budget.remaining())))
                block = response.read1(_READ)
            except (OSError, ValueError, EOFError, http.client.HTTPException) as exc:  # IncompleteRead, reset
                kept = _kept(response, start, size)
                if watch.tripped is not None or budget.remaining() <= 0:  # (said with what is kept now)
                    raise budget.problem(kept) or watch.tripped or budget.past_deadline(kept) from None
                if isinstance(exc, BrokenChunks):  # framing bytes went in as data: only checked chunks are kept
                    raise DownloadError(f"fetch: {where} sent a chunked reply whose framing is broken ({exc}); what "
                                        "it sent past its last whole chunk was dropped, so a resume never starts from "
                                        "it (check the address, --url)") from None
                of = f"{total:,}" if total is not None else "?"
                again = "to resume" if kept else "(nothing was kept: no whole chunk of it arrived)"
                raise DownloadError(f"fetch: the download of {where} stopped at {kept:,} of {of} bytes "
                                    f"({type(exc).__name__}); run the same command again {again}") from None
            if not block:
                if watch.tripped is not None:  # the connection ended by the watch: what came is not all
                    raise budget.problem(_kept(response, start, size)) or watch.tripped
                break
            _write_all(fd, block, path)
            size += len(block)
            if bar is not None:
                bar.update(len(block))
            budget.add(len(block), _kept(response, start, size))
            if size > MAX_DOWNLOAD_BYTES:  # no file fetch takes grows out of it: not kept to resume
                os.ftruncate(fd, 0)  # (emptied, then removed with the empty partial)
                raise DownloadError(f"fetch: {where} sent more than {MAX_DOWNLOAD_BYTES:,} bytes; stopped, and "
                                    "what it sent removed (check the address, --url)")
    return size


def _reply(url: str, path: str, have: int, timeout: float, budget: Budget, reply: ReplyFacts):
    """open_reply's response (`budget` told where it came from, `reply` its content codings); the
    partial download emptied where the server says it is another file's (an empty partial is then
    removed: the next fetch starts afresh)."""
    try:
        response = open_reply(url, have, timeout, budget)
        if response is not None:
            budget.redirected = getattr(response, "url", None)
            reply.encoding = content_encoding(response)
        return response
    except PartialRefused:
        fd = _open_partial(path)
        try:
            os.ftruncate(fd, 0)
        finally:
            os.close(fd)
        raise


def _progress_bar(url: str, total: Optional[int], have: int):
    from tqdm import tqdm

    return tqdm(total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
                desc=terminal_text(os.path.basename(urllib.parse.urlsplit(url).path) or "download"), dynamic_ncols=True)


_FULL = (errno.ENOSPC, errno.EDQUOT)  # a disk that is full: free space, and the same command goes on


def _write_all(fd: int, block: bytes, path: str) -> None:
    """Writes `block` to the partial download; a disk error names the folder it goes to (--dest),
    not the temporary (os.write's errors name no file at all)."""
    try:
        view = memoryview(block)
        while view:
            view = view[os.write(fd, view):]
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, os.path.dirname(path)) from None


def _leave_only_progress(partial: str, created: Optional[str]) -> None:
    """After a failed download: bytes that arrived stay for the next try to resume from; an empty
    partial file, and the folder this fetch made for it, do not."""
    with contextlib.suppress(OSError):
        if os.path.isfile(partial) and not os.path.islink(partial) and os.path.getsize(partial) == 0:
            os.remove(partial)
        if created is not None:
            os.rmdir(created)  # only when empty


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch(name: str, url: Optional[str] = None, sha256: Optional[str] = None, dest: Optional[str] = None,
          progress: bool = True, log=print, deadline_s: float = DEADLINE_S, min_rate: float = MIN_RATE) -> str:
    """Downloads, verifies and extracts data set `name` into DEST/<its folder> (DEST: --dest, else
    $FASTTL_DATA, default ~/.cache/fasttl/data); returns that folder. A complete folder already
    there is kept and nothing is downloaded."""
    if name not in REMOTES:
        raise OptionError(f"name: unknown data set {name!r}; fasttl fetches {', '.join(REMOTES)}")

    def say(text: str) -> None:  # addresses and paths shown escaped: they can't drive the terminal
        log(terminal_text(text))

    for option, value, low, high in (("deadline", deadline_s, 1.0, MAX_DEADLINE_S), ("min_rate", min_rate, 0.0,
                                                                                    float("inf"))):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value < high:
            shown = f"a number from {low:g} to {high:g}" if high < float("inf") else f"a finite number >= {low:g}"
            raise OptionError(f"{option}: expected {shown}, got {value!r}")
    remote = REMOTES[name]
    url = _check_url(url if url is not None else remote.url)
    expected = _check_sha256(sha256) if sha256 is not None else remote.sha256
    if url != remote.url and sha256 is None:
        raise OptionError("sha256: --url gives another file than the official archive; pass its --sha256 too")
    if dest is not None and not str(dest).strip():
        raise OptionError(f"dest: {dest!r} names no folder; give a folder (`--dest .` for this one), or leave it out "
                          "for $FASTTL_DATA")
    option = "dest" if dest is not None or not settings.DATA.is_set() else settings.DATA.name  # what the user set
    again = f"give another {'--dest' if option == 'dest' else option}"
    dest = absolute(dest if dest is not None else default_dest())
    problem = output_folder_problem(dest, again)
    if problem:
        raise OptionError(f"{option}: {problem}")
    from fasttl.util.files import enclosing_run_folder

    holder = enclosing_run_folder(dest)
    if holder is not None:
        raise OptionError(f"{option}: {dest} is in the fasttl run folder {holder}, which only its run writes into; "
                          f"{again}")
    target = os.path.join(dest, remote.folder)
    if is_complete(target, remote):
        say(f"{name}: already in {target}; nothing to download")
        return target
    if os.path.lexists(target):
        raise DataError(f"fetch: {target} exists but is not a complete {name} (it lacks some of "
                        f"{', '.join(remote.required)}); move it away and fetch again")
    created = not os.path.isdir(dest)
    if not created and (why := unwritable(dest)):  # refused before the download, not after it
        raise OptionError(f"{option}: {dest}: {why}")
    os.makedirs(dest, exist_ok=True)
    with _fetch_lock(dest):
        if is_complete(target, remote):  # another fetch finished it while this one started
            say(f"{name}: already in {target}; nothing to download")
            return target
        _download_and_extract(name, remote, url, expected, dest, created, say, progress, deadline_s, min_rate)
    say(f"{name}: SHA-256 verified, extracted to {target}")
    return target


@contextlib.contextmanager
def _fetch_lock(dest: str):
    """One fetch at a time into `dest`: an flock on the folder itself, so no lock file lands among
    the data (the OS releases it when the holder exits, even on kill -9). A second fetch fails at
    once instead of both writing one partial download."""
    fd = os.open(dest, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise DataError(f"fetch: {dest} is in use by another `fasttl data fetch`; wait for it to finish, "
                                "then run the same command again") from None
            raise
        yield
    finally:
        os.close(fd)  # releases the lock


def partial_name(remote: "Remote", expected: str) -> str:
    """The partial download of the file whose SHA-256 is `expected`: another --url or --sha256
    never resumes it (its bytes would head the wrong file)."""
    return f"{TEMP_PREFIX}download-{expected[:16]}-{remote.archive}"


def _remove_other_partials(dest: str, remote: "Remote", partial: str) -> None:
    """One partial download of an archive in DEST at a time: another file's (a --sha256 given
    before, or a partial named as before SHA-256s named them) is dropped when this one starts,
    under the fetch lock."""
    mine = os.path.basename(partial)
    for name in os.listdir(dest) if os.path.isdir(dest) else ():
        if name != mine and name.startswith(f"{TEMP_PREFIX}download-") and name.endswith(remote.archive):
            with contextlib.suppress(OSError):
                os.remove(os.path.join(dest, name))  # fasttl's own name; a link is removed, never followed


def _why_it_differs(partial: str, kept: int, encoding: Optional[str], expected: str) -> str:
    """What a checksum mismatch may come from, in parentheses ('' where nothing is known)."""
    reasons = [f"resumed from the {kept:,} bytes an earlier fetch kept: the file may have changed on the server "
               "since, or an earlier reply was broken"] if kept else []
    if encoding:  # what the server said it did to the bytes
        reasons.append(what_the_encoding_did(partial, encoding, expected))
    return f" ({'; '.join(reasons)})" if reasons else ""


def _download_and_extract(name: str, remote: "Remote", url: str, expected: str, dest: str, created: bool, say,
                          progress: bool, deadline_s: float, min_rate: float) -> None:
    """Downloads (or resumes) the archive into DEST's partial file, verifies it and extracts it;
    called under the fetch lock."""
    partial = os.path.join(dest, partial_name(remote, expected))
    _remove_other_partials(dest, remote, partial)
    resumed = os.path.isfile(partial) and not os.path.islink(partial)
    if resumed:
        _refuse_unusable_partial(partial, dest)
    reply = ReplyFacts()
    # A download verified before (an extraction stopped by a full disk) is extracted, not fetched again.
    verified = resumed and sha256_of(partial) == expected
    if verified:
        say(f"{name}: the verified download is already in {dest}; extracting it")
    else:
        say(f"{name}: {'resuming' if resumed else 'downloading'} {url}"
            + (f" ({remote.size / 1e6:.0f} MB)" if url == remote.url else "") + f" into {dest}")
    try:
        if not verified:
            download(url, partial, progress=progress, deadline_s=deadline_s, min_rate=min_rate, reply=reply)
    except BaseException as exc:  # (Ctrl-C before any byte too: no empty partial to 'resume' next time)
        _leave_only_progress(partial, dest if created else None)
        if isinstance(exc, OSError) and exc.errno in _FULL:
            kept = os.path.getsize(partial) if os.path.isfile(partial) else 0
            raise DownloadError(f"fetch: {dest}: {exc.strerror.lower()} (free some space, then run the same command "
                                f"again: the {kept:,} bytes that arrived are kept to resume from)") from None
        raise
    found = expected if verified else sha256_of(partial)
    part = reply.part
    if found != expected and part is not None:  # an interrupted download, not a wrong one: kept to its range's end
        kept = min(os.path.getsize(partial), part[1] + 1)
        os.truncate(partial, kept)
        raise DownloadError(f"fetch: the download of {reply.where} stopped at {kept:,} bytes (its reply held bytes "
                            f"{part[0]:,} to {part[1]:,} of a file of unknown size, and they are not all of it); run "
                            "the same command again to resume")
    if found != expected:
        why = _why_it_differs(partial, reply.resumed_from, reply.encoding, expected)
        with contextlib.suppress(OSError):
            os.remove(partial)
        raise ChecksumError(f"fetch: {reply.where or url} gave a file with SHA-256 {found}, expected "
                            f"{expected}{why}; the download was removed and nothing else touched (fetch again, or "
                            "check --url / --sha256)")
    try:
        extract(partial, remote.folder, dest, remote.required, source=url)
    except OSError as exc:  # the disk: the verified download stays, and the next fetch extracts it without downloading
        if exc.errno in _FULL:
            raise DownloadError(f"fetch: {dest}: {exc.strerror.lower()} while extracting (free some space, then run "
                                "the same command again: the verified download is kept and is not fetched again)") \
                from None
        raise
    except KeyboardInterrupt:  # Ctrl-C, SIGTERM, SIGHUP: the verified download stays, extracted next time
        raise
    except BaseException:  # the archive itself: fetched anew next time
        with contextlib.suppress(OSError):
            os.remove(partial)
        raise
    with contextlib.suppress(OSError):
        os.remove(partial)
