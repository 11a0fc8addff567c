"""The HTTP request of `fasttl data fetch` (fasttl.data.fetch): redirects followed only to http(s)
addresses, every socket kept so that the download's deadline can end a wait for headers that a
server trickles a byte at a time, and a failure named by the address that failed."""
from __future__ import annotations

import contextlib
import io
import os
import http.client
import re
import socket
import string
import threading
import unicodedata
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Optional, Tuple

from fasttl.data.checked_response import CheckedResponse
from fasttl.util.errors import UserError
from fasttl.util.outputs import terminal_text


class DownloadError(UserError, OSError):
    """The download failed: network, server, or an interrupted transfer (run again to resume)."""


@dataclass
class ReplyFacts:
    """What a download learned of its reply, for what is said after it ends (a checksum mismatch,
    a part that is not all of the file)."""
    resumed_from: int = 0                   # what of the partial the file is made of (a reply may start it over)
    where: Optional[str] = None             # the address that answered, after redirects
    part: Optional[Tuple[int, int]] = None  # (first, last) byte of a part of a file of unknown size
    encoding: Optional[str] = None          # the reply's content codings


class PartialRefused(DownloadError):
    """HTTP 416 to a resume, from a server whose file is not the size of the partial download: the
    partial belongs to another file (it changed on the server), so it is dropped."""


def sendable(url: str) -> str:
    """`url` as a request line carries it, in ASCII (urllib's request line and Host header are):
    characters outside ASCII in its path, query and fragment percent-encoded as UTF-8, escapes
    already there kept, and an international host name in IDNA (b\u00fccher.example ->
    xn--bcher-kva.example), as a browser sends an address pasted from its bar. Raises UnicodeError
    for a host IDNA can't write, or one holding a % that escapes anything but a byte of a character
    outside ASCII (fasttl.data.fetch checks --url so first)."""
    parts = urllib.parse.urlsplit(url)
    path, query, fragment = (urllib.parse.quote(part, safe=string.punctuation)
                             for part in (parts.path, parts.query, parts.fragment))
    stray = _NOT_A_HIGH_ESCAPE.search(parts.netloc)
    if stray:  # %40 unquoted is @ (evil%40127.0.0.1 is 127.0.0.1), %0A a line break urllib drops
        raise UnicodeError(f"{parts.netloc!r} holds {stray.group()!r}, a % that escapes no byte of a character "
                           "outside ASCII; write the host name's characters as themselves")
    hostport = parts.netloc.rpartition("@")[2]
    if ("[" in hostport or "]" in hostport) and not _BRACKETED.fullmatch(hostport):
        # urlsplit drops what stands beside the brackets ([::1:8792]x would be ::1 port 8792, unbracketed)
        raise UnicodeError(f"{terminal_text(hostport)!r} holds something beside its IPv6 address's brackets, or a "
                           "bracket with no IPv6 address in it; write [address]:port alone")
    try:  # what is escaped spells a character outside ASCII (urllib so writes a redirect's bücher.example)
        netloc = urllib.parse.unquote(parts.netloc, errors="strict")
    except UnicodeDecodeError:
        raise UnicodeError(f"{parts.hostname!r} holds %-escapes that are not UTF-8 text") from None
    if not netloc.isascii():  # (no user name or password: refused before)
        try:
            host = urllib.parse.urlsplit(f"//{netloc}").hostname
        except ValueError:  # a character NFKC makes a delimiter (a full-width @)
            raise UnicodeError(f"{terminal_text(netloc)!r} holds a character that NFKC makes a delimiter "
                               "(a full-width @ or :), which would make another address of it") from None
        if not host:
            raise UnicodeError(f"{parts.netloc!r} names no host name that can be sent")
        netloc = _idna_host(host) + (f":{parts.port}" if parts.port is not None else "")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc, path=path, query=query, fragment=fragment))


_BRACKETED = re.compile(r"\[[0-9A-Fa-f:.]+\](:[0-9]*)?")  # an IPv6 (or IPv4-in-IPv6) literal, and a port
# a % in a host: only the escape of a byte (0x80 and up) of a character outside ASCII
_NOT_A_HIGH_ESCAPE = re.compile(r"%(?![89a-fA-F][0-9a-fA-F]).{0,2}", re.DOTALL)


def _idna_host(host: str) -> str:
    """`host` in IDNA, where it is a plain international name (bücher.example); a UnicodeError
    where IDNA 2003 (Python's codec) would map it to another host than browsers ask (faß.example to
    fass.example, full-width digits, a joiner dropped): said, never fetched from another host."""
    try:
        written = host.encode("idna").decode("ascii")
    except UnicodeError:
        raise UnicodeError(f"{host!r} is no international domain name IDNA can write") from None
    if written.encode("ascii").decode("idna") != unicodedata.normalize("NFC", host).lower():
        raise UnicodeError(f"{host!r} is written by IDNA as {written!r}, another name than browsers ask for; give the "
                           "host as its ASCII (xn--) form") from None
    return written


def named_address(url: str, redirected: Optional[str]) -> str:
    """`url` as a failure names it: where it redirected to, when it did."""
    if redirected is not None and redirected not in (url, sendable(url)):
        return f"{terminal_text(redirected)[:200]} (where {url} redirects)"
    return url


class HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follows a redirect only to another http(s) address (urllib's default also follows ftp://);
    `last`: the address it was last sent to (what a failure names)."""

    last = None

    def http_error_302(self, req, fp, code, msg, headers):
        location = headers.get("location") or headers.get("uri")
        try:  # (urllib's own parse of it raises a bare ValueError, which names no address)
            urllib.parse.urlsplit(urllib.parse.urljoin(req.full_url, location or "")).port  # (a port of 20 digits too)
        except ValueError as exc:
            raise DownloadError(f"fetch: {req.full_url} redirects to {terminal_text(location)[:200]!r}, which is no "
                                f"valid address ({exc}); refused (check the address, --url)") from None
        fp.close()  # (urllib would read the redirect's whole body into memory first, whatever its size: never read)
        return super().http_error_302(req, io.BytesIO(), code, msg, headers)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        parts = urllib.parse.urlsplit(newurl)
        if parts.scheme not in ("http", "https"):
            raise DownloadError(f"fetch: {req.full_url} redirects to {newurl!r}, not an http(s) address; refused "
                                "(check the address, --url)")
        if "@" in parts.netloc:  # urllib would take the credentials for the host name
            raise DownloadError(f"fetch: {req.full_url} redirects to an address with a user name or password "
                                f"({parts.scheme}://{parts.netloc.rsplit('@', 1)[1]}{parts.path}), which fetch does "
                                "not support; download the file yourself, or use an address without them")
        try:  # a Location naming a host outside ASCII (urllib has percent-encoded its UTF-8), as --url is sent
            newurl = sendable(newurl)
        except UnicodeError as exc:
            raise DownloadError(f"fetch: {req.full_url} redirects to {newurl!r}, whose host name {exc}; refused (check "
                                "the address, --url)") from None
        self.last = newurl
        return super().redirect_request(req, fp, code, msg, headers, newurl)


class _TrackSockets:
    """A handler mixin that keeps each socket it connects, so that the deadline can end a wait for
    response headers (a server may trickle them a byte at a time, under any socket timeout), and
    connects each hop of a redirect within the time left then: no watchdog ends a TLS handshake,
    and urllib gives every hop the first request's timeout."""

    def __init__(self, sockets: list, remaining, **kw):
        super().__init__(**kw)
        self.sockets, self.remaining = sockets, remaining

    def do_open(self, http_class, req, **kw):
        sockets, remaining = self.sockets, self.remaining

        def tracked(host, **connection_kw):
            timeout = connection_kw.get("timeout")
            left = max(0.05, remaining())
            connection_kw["timeout"] = min(timeout, left) if isinstance(timeout, (int, float)) else left
            connection = http_class(host, **connection_kw)
            connection.response_class = CheckedResponse
            connect = connection.connect

            def connect_and_keep():
                connect()
                sockets.append(connection.sock)

            connection.connect = connect_and_keep
            return connection

        return super().do_open(tracked, req, **kw)


class _TrackedHTTP(_TrackSockets, urllib.request.HTTPHandler):
    pass


class _TrackedHTTPS(_TrackSockets, urllib.request.HTTPSHandler):
    pass


def _close_all(sockets: list) -> None:
    for sock in list(sockets):
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


def reply_error(exc: Exception, url: str, have: int, redirected: Optional[str] = None) -> None:
    """Raises the DownloadError for a failed request, naming the address that failed (`redirected`:
    where `url` sent it); returns only for HTTP 416 on a partial file (nothing left to send: the
    file is complete)."""
    url = named_address(url, redirected)
    if isinstance(exc, urllib.error.HTTPError):
        if exc.code == 416 and have:
            said = exc.headers.get("Content-Range") if exc.headers is not None else None
            total = content_range((said or "").strip())[2]  # (a 416's "bytes */N")
            if total is None or total == have:
                return
            raise PartialRefused(f"fetch: {url} refused to resume from {have:,} bytes (HTTP 416) and says the file "
                                 f"is {total:,} bytes: the partial download is not of this file (it changed on the "
                                 "server?); it was removed: run the same command again to download it whole")
        reason = " ".join(str(exc.reason).split())  # urllib's own reasons span lines
        raise DownloadError(f"fetch: {url} answered HTTP {exc.code} ({terminal_text(reason)[:120]}); check "
                            "the address (--url)") from None
    reason = getattr(exc, "reason", None) or f"{type(exc).__name__}: {' '.join(str(exc).split())}"
    reason = terminal_text(reason)[:120]  # a server's bytes, shown escaped and short
    if isinstance(exc, http.client.HTTPException) and not isinstance(exc, ConnectionError):  # it answered, badly
        raise DownloadError(f"fetch: {url} answered with a reply that is not valid HTTP ({reason}); check the "
                            "address (--url)") from None
    raise DownloadError(f"fetch: cannot reach {url} ({reason}); check the network or the address "
                        "(--url)") from None


def content_range(header: Optional[str]) -> Tuple[Optional[int], Optional[int], Optional[int]]:
    """(N, M, T) of 'bytes N-M/T' (the unit in any case, as HTTP allows; ASCII digits: int() also
    reads ' 5', '+5' and other scripts' digits), each None where it is not there or not a number."""
    from fasttl.util.checks import decimal

    unit, _, span = (header or "").partition(" ")
    if unit.lower() != "bytes":
        return None, None, None
    first_last, _, total = span.partition("/")
    first, _, last = first_last.partition("-")
    return decimal(first), decimal(last), decimal(total)


def resume_point(response, fd: int, have: int, where: str) -> int:
    """Where the reply's body goes in the partial download (of `have` bytes; the caller cuts it
    there once the reply is accepted): a 200 is the whole file (start over); a 206 goes at the byte
    it starts from, at or before the partial's end (a server may round a range down to its blocks).
    A 206 that starts past it, or says not where, can't continue it: the partial is emptied (so
    removed) and that said; a 204 or 205 is a body that is none by definition (no file, ever)."""
    if response.status in (204, 205):
        reason = terminal_text(response.reason)[:60]
        raise DownloadError(f"fetch: {where} answered HTTP {response.status} ({reason}): no file there; check the "
                            "address (--url)")
    if response.status != 206:
        return 0
    header = response.headers.get("Content-Range")
    start, last, _ = content_range(header)
    if start is None and not have:  # (no range asked for: the whole file, from a server that says 206)
        return 0
    if start is not None and last is not None and last < start:  # (no range at all: RFC 9110 14.4)
        asked, kept = (f"a resume from byte {have:,}", "; the partial download is kept") if have else ("a download", "")
        raise DownloadError(f"fetch: {where} answered {asked} with bytes {start:,} to {last:,} (HTTP 206), a range "
                            f"that ends before it starts: not a valid reply{kept} (check the address, --url)")
    if start is not None and last is not None and start < have and last < have:  # (its cut would only go back)
        raise DownloadError(f"fetch: {where} answered a resume from byte {have:,} with bytes {start:,} to {last:,} "
                            "(HTTP 206), none of those asked for: it does not send the rest of the file; the partial "
                            "download is kept (check the address, --url, or download the file another way)")
    if start is not None and start <= have:
        return start
    part = f"from byte {start:,}" if start is not None else \
        f"that says not where it starts (Content-Range: {terminal_text(header or '(none)')[:60]})"
    if not have:
        raise DownloadError(f"fetch: {where} answered with a part of a file (HTTP 206) {part} where the whole file "
                            "was asked for; check the address (--url)")
    os.ftruncate(fd, 0)
    raise DownloadError(f"fetch: {where} answered a resume from byte {have:,} with a part (HTTP 206) {part}, which "
                        "can't continue the partial download; it was removed: run the same command again to download "
                        "the file whole")


def open_reply(url: str, have: int, timeout: float, budget):
    """The response to a GET of `url` from byte `have` on, with the deadline ending a wait for its
    headers (a watchdog closes the connection); None for HTTP 416 on a complete partial file."""
    from fasttl._version import __version__

    headers = {"User-Agent": f"fasttl/{__version__}"}
    if have:
        headers["Range"] = f"bytes={have}-"
    sockets: list = []
    redirects = HttpOnlyRedirects()
    opener = urllib.request.build_opener(redirects, _TrackedHTTP(sockets, budget.remaining),
                                         _TrackedHTTPS(sockets, budget.remaining))
    watchdog = threading.Timer(max(0.0, budget.remaining()), _close_all, (sockets,))
    watchdog.daemon = True
    watchdog.start()
    try:  # (each hop's connection timeout is cut to the time left then: see _TrackSockets)
        response = opener.open(urllib.request.Request(sendable(url), headers=headers), timeout=timeout)
    except DownloadError:
        raise
    except (urllib.error.URLError, OSError, ValueError, OverflowError, http.client.HTTPException) as exc:
        if budget.remaining() <= 0 and not isinstance(exc, urllib.error.HTTPError):
            raise budget.past_deadline(have, redirects.last) from None
        if isinstance(exc, urllib.error.HTTPError) and HttpOnlyRedirects.inf_msg in str(exc.msg):
            # urllib's limit, checked after the hop's target was taken down: the hop that answered is exc.url
            raise DownloadError(f"fetch: {url} redirects more than {HttpOnlyRedirects.max_redirections} times, or "
                                f"in a loop (the last address asked, {terminal_text(exc.url)[:200]}, answered HTTP "
                                f"{exc.code} too); check the address (--url)") from None
        reply_error(exc, url, have, redirects.last)
        budget.redirected = redirects.last  # (the 416's address: what a later mismatch names)
        return None
    finally:
        watchdog.cancel()
    if budget.remaining() <= 0:  # the deadline cut the reply short: what arrived is not the file
        response.close()
        raise budget.past_deadline(have, redirects.last)
    return response


def content_encoding(response) -> str:
    """The codings a reply says its body is in (every Content-Encoding line, as one list, identity
    left out), '' for none. A server labelling a .tgz gzip may still send the file's own bytes
    (Apache's AddEncoding): the checksum decides, and a mismatch names this."""
    lines = response.headers.get_all("Content-Encoding") or []
    codings = [c.strip().lower() for line in lines for c in line.split(",")]
    return terminal_text(", ".join(c for c in codings if c not in ("", "identity")))[:60]


def what_the_encoding_did(path: str, encoding: str, expected: str) -> str:
    """Why a download labelled Content-Encoding `encoding` missed the SHA-256 `expected`, as far as
    its bytes at `path` show: compressed again only where undoing one gzip layer gives the file
    (else the label proves nothing: --sha256 may be the one that is wrong)."""
    if encoding in ("gzip", "x-gzip") and _one_gzip_layer_sha256(path) == expected:
        return f"the server sent it with Content-Encoding: {encoding}, compressed again: use another address, or a " \
            "server that sends the file as it is"
    return f"the server labelled it Content-Encoding: {encoding}, which may be the cause"


def _one_gzip_layer_sha256(path: str) -> Optional[str]:
    """The SHA-256 of `path` with one gzip layer undone, or None where it is no gzip stream (or
    undone grows past what a file compressed again could be: a bomb is not unpacked)."""
    import gzip
    import hashlib
    import os
    import zlib

    digest, limit = hashlib.sha256(), 4 * os.path.getsize(path) + (1 << 20)
    try:
        with gzip.open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
                limit -= len(block)
                if limit < 0:
                    return None
    except (OSError, EOFError, zlib.error):  # gzip.BadGzipFile is an OSError
        return None
    return digest.hexdigest()
