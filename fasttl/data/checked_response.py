"""The HTTP response `fasttl data fetch` reads (fasttl.data.http_reply sets it as each connection's
response_class): http.client's, read as HTTP requires of a client. Past interim 1xx replies to the
final one (RFC 9110 15.2: http.client skips only 100 Continue, and would take a 103 Early Hints for
the answer; 101, a protocol switch, is final). A chunked body's framing checked: http.client tosses
the two bytes after a chunk unread and takes int(line, 16) of any line for a size, so a chunk shorter
than its size line says goes on as data and a file's own bytes are read as sizes. `body_checked`:
how many of the body's bytes lie in chunks whose end was checked, the file's own bytes for sure (a
reply cut off keeps only those for a resume)."""
from __future__ import annotations

import http.client
import re

from fasttl.util.outputs import terminal_text


class BrokenChunks(http.client.HTTPException):
    """A chunked body whose framing is broken: what it sent holds framing bytes as data."""


# A chunk size: hexadecimal digits, as many leading zeros as a line holds, then at most 16 that count.
_CHUNK_SIZE = re.compile(rb"0*([0-9A-Fa-f]{1,16})")


class CheckedResponse(http.client.HTTPResponse):
    MOST_INTERIM = 16  # more than any server sends before its answer (each one's headers are bounded too)

    body_read = 0  # the body's bytes read1 handed out
    body_checked = 0  # of them, those of chunks whose CRLF was checked (all of them, unchunked)

    def _read_status(self):
        for _ in range(self.MOST_INTERIM + 1):  # the interim replies, then the answer
            version, status, reason = super()._read_status()
            if not 102 <= status < 200:  # (100: begin skips it itself)
                return version, status, reason
            for _ in range(http.client._MAXHEADERS + 1):  # the interim reply's headers, dropped
                line = self.fp.readline(http.client._MAXLINE + 1)
                if len(line) > http.client._MAXLINE:
                    raise http.client.LineTooLong("header line")
                if line in (b"\r\n", b"\n", b""):
                    break
            else:
                raise http.client.HTTPException(f"got more than {http.client._MAXHEADERS} headers")
        raise http.client.HTTPException(f"more than {self.MOST_INTERIM} interim (1xx) replies before an answer")

    def read1(self, n=-1):
        data = super().read1(n)
        self.body_read += len(data)
        if not self.chunked:
            self.body_checked = self.body_read
        return data

    def _get_chunk_left(self):
        if self.chunk_left == 0:  # at a chunk's end: its CRLF, checked
            if self._safe_read(2) != b"\r\n":
                self._close_conn()
                raise BrokenChunks("a chunk of another length than its size line says")
            self.chunk_left = None
            self.body_checked = self.body_read  # (read1 hands out one chunk's bytes at a time)
        return super()._get_chunk_left()

    def _read_next_chunk_size(self):
        line = self.fp.readline(http.client._MAXLINE + 1)
        if len(line) > http.client._MAXLINE:
            self._close_conn()
            raise BrokenChunks(f"a chunk size line longer than {http.client._MAXLINE:,} bytes")
        if not line.endswith(b"\n"):  # the connection ended: an interrupted transfer, not a broken one
            raise http.client.IncompleteRead(b"")
        size = line.split(b";", 1)[0].strip()  # (a chunk extension dropped)
        digits = _CHUNK_SIZE.fullmatch(size)  # int(line, 16) also takes '0x', '_' and 40 digits
        if digits is None:
            self._close_conn()
            shown = terminal_text(size[:20].decode("latin-1"))
            raise BrokenChunks(f"a chunk size that is no hexadecimal number ({shown!r})")
        return int(digits.group(1), 16)
