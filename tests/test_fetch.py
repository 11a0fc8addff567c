"""`fasttl data fetch cifar10` against a loopback HTTP server serving a small tarball in the
official layout: a fetch, a resume after a cut connection, a bad checksum, malicious archives,
and `fasttl run --data cifar10` with the data absent (the fetch command) or --download."""
import contextlib
import hashlib
import http.server
import io
import os
import pickle
import tarfile
import threading
import time

import numpy as np
import pytest

from fasttl.cli import main
from fasttl.data import fetch as fetch_module
from fasttl.data.archive import check_members

from conftest import LoopbackServer, one_line_error

CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _batch(rng, count: int) -> bytes:
    labels = [int(i % 10) for i in range(count)]
    data = rng.integers(0, 256, size=(count, 3072), dtype=np.uint8)
    return pickle.dumps({b"batch_label": b"test", b"labels": labels, b"data": data,
                         b"filenames": [f"{i}.png".encode() for i in range(count)]}, protocol=2)


def _tar(members) -> bytes:
    """A .tar.gz of (name, bytes | ("symlink", target) | ("dir",))."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, content in members:
            info = tarfile.TarInfo(name)
            if isinstance(content, tuple) and content[0] == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, content[1]
                archive.addfile(info)
            elif isinstance(content, tuple) and content[0] == "dir":
                info.type = tarfile.DIRTYPE
                archive.addfile(info)
            else:
                info.size = len(content)
                archive.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


@pytest.fixture(scope="module")
def cifar_tarball():
    """cifar-10-python.tar.gz in the official layout: cifar-10-batches-py/{batches.meta,
    data_batch_1..5,test_batch,readme.html}, 20 images per training batch and 20 test images."""
    rng = np.random.default_rng(10)
    members = [("cifar-10-batches-py", ("dir",)),
               ("cifar-10-batches-py/batches.meta",
                pickle.dumps({b"label_names": [c.encode() for c in CIFAR_CLASSES], b"num_cases_per_batch": 20,
                              b"num_vis": 3072}, protocol=2))]
    members += [(f"cifar-10-batches-py/data_batch_{i}", _batch(rng, 20)) for i in range(1, 6)]
    members += [("cifar-10-batches-py/test_batch", _batch(rng, 20)),
                ("cifar-10-batches-py/readme.html", b"<html>a small stand-in</html>")]
    return _tar(members)


class _Server(LoopbackServer):
    """Serves files from a dict on 127.0.0.1 with HTTP Range support; `cut_after` bytes into the
    next full response it drops the connection (once). Records each request's Range header."""

    def __init__(self):
        self.files, self.ranges, self.cut_after = {}, [], None
        self.trickle = None      # (bytes, seconds): send the body that many bytes at a time, pausing between
        self.redirects = {}      # path -> Location of a 302
        self.extra_headers = {}  # sent with every file
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                if self.path in server.redirects:
                    self.send_response(302)
                    self.send_header("Location", server.redirects[self.path])
                    self.end_headers()
                    return
                body = server.files.get(self.path)
                server.ranges.append(self.headers.get("Range"))
                if body is None:
                    self.send_error(404)
                    return
                start = 0
                if self.headers.get("Range", "").startswith("bytes="):
                    start = int(self.headers["Range"][6:].split("-")[0])
                    if start >= len(body):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(body)}")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body) - start))
                for name, value in server.extra_headers.items():
                    self.send_header(name, value)
                self.end_headers()
                if server.cut_after is not None and start == 0:
                    self.wfile.write(body[:server.cut_after])
                    server.cut_after = None
                    self.wfile.flush()
                    self.close_connection = True
                    return
                if server.trickle is not None:
                    step, pause = server.trickle
                    for i in range(start, len(body), step):
                        try:
                            self.wfile.write(body[i:i + step])
                            self.wfile.flush()
                        except OSError:  # the client gave up
                            return
                        time.sleep(pause)
                    return
                self.wfile.write(body[start:])

        super().__init__(Handler)


@pytest.fixture
def server():
    s = _Server()
    yield s
    s.close()


def _partial(archive: bytes) -> str:
    """The partial download of `archive` (fetched as cifar10 with its own SHA-256)."""
    return fetch_module.partial_name(fetch_module.REMOTES["cifar10"], _sha(archive))


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _fetch(capsys, *words):
    code = main(["data", "fetch", "cifar10", "--no-progress", *[str(w) for w in words]])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _tree(root):
    """Every file and folder under root, relative."""
    return sorted(os.path.relpath(os.path.join(folder, name), root)
                  for folder, dirs, files in os.walk(root) for name in files + dirs)


def test_fetch_downloads_verifies_and_extracts(server, cifar_tarball, tmp_path, capsys, monkeypatch):
    server.files["/cifar-10-python.tar.gz"] = cifar_tarball
    monkeypatch.setenv("FASTTL_DATA", str(tmp_path / "data"))
    code, out, err = _fetch(capsys, "--url", server.url("/cifar-10-python.tar.gz"), "--sha256", _sha(cifar_tarball))
    assert code == 0, err
    assert "SHA-256 verified" in out
    folder = tmp_path / "data" / "cifar-10-batches-py"
    assert sorted(os.listdir(folder)) == ["batches.meta", "data_batch_1", "data_batch_2", "data_batch_3",
                                          "data_batch_4", "data_batch_5", "readme.html", "test_batch"]
    assert os.listdir(tmp_path / "data") == ["cifar-10-batches-py"]  # no archive or temporary left
    from fasttl.transfer.datasets import load_dataset

    dataset = load_dataset("cifar10")
    assert dataset.classes == CIFAR_CLASSES and len(dataset.train) == 100 and len(dataset.test) == 20

    # a second fetch finds it complete and downloads nothing
    requests = len(server.ranges)
    code, out, _ = _fetch(capsys, "--url", server.url("/cifar-10-python.tar.gz"), "--sha256", _sha(cifar_tarball))
    assert code == 0 and "already in" in out and len(server.ranges) == requests


def test_fetch_resumes_after_a_cut_connection(server, cifar_tarball, tmp_path, capsys):
    server.files["/c.tar.gz"] = cifar_tarball
    server.cut_after = 3000
    dest = tmp_path / "data"
    words = ["--url", server.url("/c.tar.gz"), "--sha256", _sha(cifar_tarball), "--dest", dest]
    code, _, err = _fetch(capsys, *words)
    assert code == 2 and "stopped at 3,000 of" in one_line_error(err) and "again to resume" in err
    partial = dest / _partial(cifar_tarball)
    assert partial.read_bytes() == cifar_tarball[:3000]
    code, out, err = _fetch(capsys, *words)
    assert code == 0, err
    assert server.ranges[-1] == "bytes=3000-" and "resuming" in out
    assert (dest / "cifar-10-batches-py" / "test_batch").is_file() and not partial.exists()


def test_fetch_restarts_when_the_server_ignores_range(server, cifar_tarball, tmp_path, capsys):
    server.files["/c.tar.gz"] = cifar_tarball
    dest = tmp_path / "data"
    dest.mkdir()
    (dest / _partial(cifar_tarball)).write_bytes(b"junk from elsewhere")
    handler = server.httpd.RequestHandlerClass
    original = handler.do_GET

    def ignore_range(self):
        del self.headers["Range"]
        original(self)

    handler.do_GET = ignore_range
    try:
        code, _, err = _fetch(capsys, "--url", server.url("/c.tar.gz"), "--sha256", _sha(cifar_tarball), "--dest",
                              dest)
    finally:
        handler.do_GET = original
    assert code == 0, err
    assert (dest / "cifar-10-batches-py" / "batches.meta").is_file()


def test_a_bad_checksum_exits_2_naming_both_sums_and_keeps_what_was_there(server, cifar_tarball, tmp_path,
                                                                          capsys):
    server.files["/c.tar.gz"] = cifar_tarball
    dest = tmp_path / "data"
    (dest / "mine").mkdir(parents=True)
    (dest / "mine" / "notes.txt").write_text("keep")
    before = _tree(dest)
    wanted = "0" * 64
    code, _, err = _fetch(capsys, "--url", server.url("/c.tar.gz"), "--sha256", wanted, "--dest", dest)
    line = one_line_error(err)
    assert code == 2 and _sha(cifar_tarball) in line and wanted in line
    assert _tree(dest) == before and (dest / "mine" / "notes.txt").read_text() == "keep"


def test_an_existing_incomplete_folder_is_never_replaced(server, cifar_tarball, tmp_path, capsys):
    server.files["/c.tar.gz"] = cifar_tarball
    dest = tmp_path / "data"
    (dest / "cifar-10-batches-py").mkdir(parents=True)
    (dest / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"my own")
    code, _, err = _fetch(capsys, "--url", server.url("/c.tar.gz"), "--sha256", _sha(cifar_tarball), "--dest", dest)
    assert code == 2 and "move it away" in one_line_error(err)
    assert os.listdir(dest / "cifar-10-batches-py") == ["data_batch_1"] and server.ranges == []


@pytest.mark.parametrize("filters", [True, False], ids=["tarfile-filters", "python-without-filters"])
@pytest.mark.parametrize("member", ["../escaped.txt", "ABSOLUTE", "cifar-10-batches-py/../../up.txt", "symlink",
                                    "hardlink", "fifo", "elsewhere/file.txt"])
def test_a_malicious_archive_is_refused_before_anything_is_extracted(member, filters, server, cifar_tarball, tmp_path,
                                                                     capsys, monkeypatch):
    """Refused by fasttl's own member check, before extractall; without tarfile's "data" filter
    (Pythons before 3.12 and the 3.8-3.11 backports) that check is the only guard."""
    if not filters and hasattr(tarfile, "data_filter"):
        monkeypatch.delattr(tarfile, "data_filter")
    absolute = tmp_path / "absolute.txt"
    buffer = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(cifar_tarball)) as good, tarfile.open(fileobj=buffer, mode="w:gz") as evil:
        for info in good.getmembers():  # the whole official layout, then one hostile member
            evil.addfile(info, good.extractfile(info) if info.isfile() else None)
        name = str(absolute) if member == "ABSOLUTE" else member
        info = tarfile.TarInfo("cifar-10-batches-py/extra" if member in ("symlink", "hardlink", "fifo") else name)
        if member == "symlink":
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        elif member == "hardlink":
            info.type, info.linkname = tarfile.LNKTYPE, "../../outside.txt"
        elif member == "fifo":
            info.type = tarfile.FIFOTYPE
        else:
            info.size = 5
        evil.addfile(info, io.BytesIO(b"owned") if info.isfile() else None)
    data = buffer.getvalue()
    server.files["/evil.tar.gz"] = data
    root = tmp_path / "root"
    dest = root / "a" / "data"
    dest.mkdir(parents=True)
    code, _, err = _fetch(capsys, "--url", server.url("/evil.tar.gz"), "--sha256", _sha(data), "--dest", dest)
    line = one_line_error(err)
    assert code == 2 and "refused, nothing extracted" in line
    assert _tree(root) == ["a", os.path.join("a", "data")]  # nothing inside or outside the destination
    assert not absolute.exists()


@pytest.mark.parametrize("words, expected", [
    (["--url", "file:///etc/passwd", "--sha256", "0" * 64], "url: expected an http:// or https:// address"),
    (["--url", "http://127.0.0.1:9/x.tar.gz"], "sha256: --url gives another file"),
    (["--sha256", "xyz"], "sha256: expected 64 hexadecimal digits"),
    (["--url", "http://127.0.0.1:port/x.tar.gz", "--sha256", "0" * 64], "url: expected an http:// or https://"),
    (["--url", "http://127.0.0.1/a b.tar.gz", "--sha256", "0" * 64], "url: expected an http:// or https://"),
    (["--url", "http://127.0.0.1/x\r\nHost: evil", "--sha256", "0" * 64], "url: expected an http:// or https://"),
])
def test_bad_options_are_one_line_errors(words, expected, tmp_path, capsys):
    code, _, err = _fetch(capsys, *words, "--dest", tmp_path / "data")
    assert code == 2 and expected in one_line_error(err)
    assert not (tmp_path / "data").exists()


def test_an_unreachable_or_missing_url_is_one_line(server, tmp_path, capsys):
    code, _, err = _fetch(capsys, "--url", server.url("/nothing.tar.gz"), "--sha256", "0" * 64, "--dest", tmp_path)
    assert code == 2 and "answered HTTP 404" in one_line_error(err)
    assert os.listdir(tmp_path) == []
    code, _, err = _fetch(capsys, "--url", "http://127.0.0.1:1/x.tar.gz", "--sha256", "0" * 64, "--dest", tmp_path)
    assert code == 2 and "cannot reach" in one_line_error(err) and os.listdir(tmp_path) == []


def test_run_without_cifar10_prints_the_fetch_command(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FASTTL_DATA", str(tmp_path / "empty"))
    code = main(["run", "--data", "cifar10", "--out", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "fasttl data fetch cifar10" in one_line_error(err) and "--download" in err
    assert not (tmp_path / "run").exists() and not (tmp_path / "empty").exists()


def test_run_download_fetches_cifar10_first(server, cifar_tarball, tmp_path, capsys, monkeypatch):
    server.files["/cifar-10-python.tar.gz"] = cifar_tarball
    remote = fetch_module.REMOTES["cifar10"]
    monkeypatch.setitem(fetch_module.REMOTES, "cifar10", fetch_module.Remote(
        **dict(remote.__dict__, url=server.url("/cifar-10-python.tar.gz"), sha256=_sha(cifar_tarball))))
    monkeypatch.setenv("FASTTL_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("FASTTL_CACHE_DIR", str(tmp_path / "cache"))
    code = main(["run", "--data", "cifar10", "--download", "--strategy", "scratch", "--epochs", "1",
                 "--out", str(tmp_path / "run"), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / "data" / "cifar-10-batches-py" / "test_batch").is_file()
    assert (tmp_path / "run" / "metrics.json").is_file()
    with pytest.raises(Exception, match="download: --download fetches only --data cifar10"):
        from fasttl.transfer.config import RunConfig

        RunConfig(data="digits", download=True).resolved(8)


def test_a_trickling_server_is_dropped_below_the_minimum_rate_keeping_what_arrived(server, cifar_tarball, tmp_path,
                                                                                    monkeypatch):
    from fasttl.data import fetch as fetch_module
    from fasttl.data import fetch_budget

    monkeypatch.setattr(fetch_budget, "RATE_WINDOW_S", 0.5)
    server.files["/slow.tar.gz"] = cifar_tarball
    server.trickle = (7, 0.05)  # 140 bytes/s, a byte more every few ms: no socket timeout ever trips
    partial = tmp_path / "partial"
    with pytest.raises(fetch_module.DownloadError, match=r"sent \d+ bytes/s over the last \d s, below 1,000 "
                                                         r"\(--min-rate\); stopped at \d+ bytes: run the same command"):
        fetch_module.download(server.url("/slow.tar.gz"), str(partial), progress=False, min_rate=1000)
    kept = partial.read_bytes()
    assert 0 < len(kept) < len(cifar_tarball) and cifar_tarball.startswith(kept)  # every block that arrived, kept


def test_a_download_past_its_deadline_stops_resumably(server, cifar_tarball, tmp_path):
    from fasttl.data import fetch as fetch_module

    server.files["/slow.tar.gz"] = cifar_tarball
    server.trickle = (4096, 0.05)
    with pytest.raises(fetch_module.DownloadError, match=r"took longer than 1 s \(--deadline\)"):
        fetch_module.download(server.url("/slow.tar.gz"), str(tmp_path / "partial"), progress=False, deadline_s=1.0,
                              min_rate=0)
    server.trickle = None
    size = fetch_module.download(server.url("/slow.tar.gz"), str(tmp_path / "partial"), progress=False)
    assert size == len(cifar_tarball) and (tmp_path / "partial").read_bytes() == cifar_tarball
    assert server.ranges[-1].startswith("bytes=")  # the second call resumed


def test_the_deadline_holds_while_a_read_waits(server, cifar_tarball, tmp_path):
    # 100 bytes, then a pause far longer than the deadline: the wait itself is cut at the deadline.
    server.files["/stall.tar.gz"] = cifar_tarball
    server.trickle = (100, 20.0)
    started = time.monotonic()
    with pytest.raises(fetch_module.DownloadError, match=r"took longer than 1 s \(--deadline\) and stopped at 100 "):
        fetch_module.download(server.url("/stall.tar.gz"), str(tmp_path / "partial"), progress=False, deadline_s=1.0,
                              min_rate=0)
    assert time.monotonic() - started < 10
    assert (tmp_path / "partial").read_bytes() == cifar_tarball[:100]


def test_a_redirect_off_http_is_refused(server, tmp_path, capsys, monkeypatch):
    server.redirects["/moved.tar.gz"] = "ftp://127.0.0.1/cifar-10-python.tar.gz"
    monkeypatch.setenv("FASTTL_DATA", str(tmp_path / "data"))
    code, _, err = _fetch(capsys, "--url", server.url("/moved.tar.gz"), "--sha256", "0" * 64)
    assert code == 2 and "redirects to 'ftp://127.0.0.1/cifar-10-python.tar.gz', not an http(s) address" in err
    assert not any(name.endswith(".tar.gz") for name in _tree(tmp_path / "data"))


def test_a_redirect_to_an_address_with_credentials_is_refused_without_them(server, tmp_path, capsys, monkeypatch):
    port = server.httpd.server_address[1]
    server.redirects["/cred.tar.gz"] = f"http://bob:hunter2@127.0.0.1:{port}/cifar-10-python.tar.gz"
    monkeypatch.setenv("FASTTL_DATA", str(tmp_path / "data"))
    code, out, err = _fetch(capsys, "--url", server.url("/cred.tar.gz"), "--sha256", "0" * 64)
    assert code == 2 and "redirects to an address with a user name or password" in err
    assert "hunter2" not in out + err and "bob" not in out + err


@pytest.mark.parametrize("words, message", [(("--deadline", "0"), "deadline: expected a number from 1 to 2.592e+06"),
                                            (("--min-rate", "-5"), "min_rate: expected a finite number >= 0"),
                                            (("--deadline", "inf"), "deadline")])
def test_bad_budgets_are_refused(tmp_path, capsys, monkeypatch, words, message):
    monkeypatch.setenv("FASTTL_DATA", str(tmp_path / "data"))
    code, _, err = _fetch(capsys, *words)
    assert code == 2 and message in err and not (tmp_path / "data").exists()


def _raw_server(reply: bytes):
    """A loopback socket that answers every connection with `reply` (not HTTP), then closes."""
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)

    def serve():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:  # closed: the test is over
                return
            with conn:
                conn.recv(4096)
                conn.sendall(reply)

    threading.Thread(target=serve, daemon=True).start()
    return listener


def test_the_deadline_holds_while_headers_trickle_in(tmp_path, capsys):
    # A reply whose headers arrive a byte a second never trips the socket timeout: the deadline ends it.
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)

    def trickle():
        with contextlib.suppress(OSError):
            conn, _ = listener.accept()
            with conn:
                conn.recv(4096)
                conn.sendall(b"HTTP/1.1 200 OK\r\nX-Slow: ")
                for _ in range(60):
                    conn.sendall(b"a")
                    time.sleep(0.5)

    threading.Thread(target=trickle, daemon=True).start()
    started = time.monotonic()
    try:
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/x.tar.gz"
        code, _, err = _fetch(capsys, "--url", url, "--sha256", "0" * 64, "--dest", tmp_path / "data",
                              "--deadline", "1")
    finally:
        listener.close()
    assert code == 2 and time.monotonic() - started < 10
    assert f"the download of {url} took longer than 1 s (--deadline) and stopped at 0 bytes" in one_line_error(err)
    assert not (tmp_path / "data").exists()


def _fetch_from_raw_server(reply: bytes, tmp_path, capsys):
    """(url, exit code, the one error line) of `fasttl data fetch` from a server answering `reply`."""
    listener = _raw_server(reply)
    try:
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/x.tar.gz"
        code, _, err = _fetch(capsys, "--url", url, "--sha256", "0" * 64, "--dest", tmp_path / "data")
    finally:
        listener.close()
    return url, code, one_line_error(err)


@pytest.mark.parametrize("reply", [b"HELLO THERE\r\n\r\n",
                                   b"HTTP/1.1 200 OK\r\n" + b"X-Long: " + b"a" * 70000 + b"\r\n\r\n"],
                         ids=["not-http", "huge-header"])
def test_a_server_that_does_not_speak_http_is_one_line(reply, tmp_path, capsys):
    url, code, line = _fetch_from_raw_server(reply, tmp_path, capsys)
    assert code == 2 and f"{url} answered with a reply that is not valid HTTP (" in line and "--url" in line
    assert not (tmp_path / "data").exists()


def test_a_download_announcing_more_than_the_limit_is_refused_before_reading(server, cifar_tarball, tmp_path,
                                                                            capsys, monkeypatch):
    server.files["/big.tar.gz"] = cifar_tarball
    monkeypatch.setattr(fetch_module, "MAX_DOWNLOAD_BYTES", len(cifar_tarball) - 1)
    code, _, err = _fetch(capsys, "--url", server.url("/big.tar.gz"), "--sha256", _sha(cifar_tarball),
                          "--dest", tmp_path / "data")
    assert code == 2 and f"announces {len(cifar_tarball):,} bytes, more than" in one_line_error(err)
    assert not (tmp_path / "data").exists()


def test_a_full_disk_while_downloading_names_dest_and_leaves_nothing_empty(server, cifar_tarball, tmp_path, capsys,
                                                                           monkeypatch):
    import errno

    server.files["/c.tar.gz"] = cifar_tarball
    real_write = os.write

    def full(fd, data):
        if fd > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", full)
    dest = tmp_path / "data"
    code, _, err = _fetch(capsys, "--url", server.url("/c.tar.gz"), "--sha256", _sha(cifar_tarball), "--dest", dest)
    assert code == 2 and one_line_error(err) == f"fasttl: error: fetch: {dest}: no space left on device (free some " \
        "space, then run the same command again: the 0 bytes that arrived are kept to resume from)"
    assert not dest.exists()  # the folder this fetch made, and its empty partial file, are gone


def test_a_dest_fasttl_cannot_write_into_is_named_not_its_temporary(server, cifar_tarball, tmp_path, capsys,
                                                                     monkeypatch):
    import errno

    server.files["/c.tar.gz"] = cifar_tarball
    real_open = os.open

    def refused(path, flags, *args, **kwargs):  # as a read-only --dest is to a user who is not root
        if os.path.basename(os.fspath(path)).startswith(".fasttl-tmp-download"):
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", refused)
    dest = tmp_path / "data"
    dest.mkdir()
    code, _, err = _fetch(capsys, "--url", server.url("/c.tar.gz"), "--sha256", _sha(cifar_tarball), "--dest", dest)
    assert code == 2 and one_line_error(err) == f"fasttl: error: {dest}: permission denied, fasttl can't make " \
        "files in this folder (make it writable to you, or use another path)", err
    assert "fasttl-tmp" not in err and os.listdir(dest) == []


def test_a_full_disk_while_extracting_keeps_the_verified_download(server, cifar_tarball, tmp_path, capsys,
                                                                  monkeypatch):
    import errno

    server.files["/c.tar.gz"] = cifar_tarball
    dest = tmp_path / "data"

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(tarfile.TarFile, "makefile", full)
        code, _, err = _fetch(capsys, "--url", server.url("/c.tar.gz"), "--sha256", _sha(cifar_tarball), "--dest",
                              dest)
    assert code == 2 and one_line_error(err) == f"fasttl: error: fetch: {dest}: no space left on device while " \
        "extracting (free some space, then run the same command again: the verified download is kept and is not " \
        "fetched again)"
    assert os.listdir(dest) == [_partial(cifar_tarball)]  # verified, kept; no staging left
    requests = len(server.ranges)
    # the server is not asked again (one without Range support would send it all; an offline one would fail)
    code, _, err = _fetch(capsys, "--url", "http://127.0.0.1:9/offline.tar.gz", "--sha256", _sha(cifar_tarball),
                          "--dest", dest)
    assert code == 0, err
    assert server.ranges[requests:] == []
    assert sorted(os.listdir(dest)) == ["cifar-10-batches-py"]


def test_an_interrupted_extraction_keeps_the_verified_download(server, cifar_tarball, tmp_path, capsys,
                                                              monkeypatch):
    """The thirtieth hostile pass: SIGTERM while `data fetch` unpacked removed the complete, verified
    archive (170 MB fetched again); a full disk kept it. Now only a bad archive is removed."""
    import signal

    from fasttl.util import signals

    server.files["/c.tar.gz"] = cifar_tarball
    dest = tmp_path / "data"

    def interrupted(*args, **kwargs):
        raise signals.Terminated(signal.SIGTERM)

    with monkeypatch.context() as patch:
        patch.setattr(tarfile.TarFile, "makefile", interrupted)
        code, _, err = _fetch(capsys, "--url", server.url("/c.tar.gz"), "--sha256", _sha(cifar_tarball), "--dest",
                              dest)
    assert code == 128 + signal.SIGTERM and err.strip().endswith("fasttl: interrupted (SIGTERM)")
    assert os.listdir(dest) == [_partial(cifar_tarball)]  # verified, kept
    requests = len(server.ranges)
    code, _, err = _fetch(capsys, "--url", "http://127.0.0.1:9/offline.tar.gz", "--sha256", _sha(cifar_tarball),
                          "--dest", dest)
    assert code == 0, err
    assert server.ranges[requests:] == [] and sorted(os.listdir(dest)) == ["cifar-10-batches-py"]


def test_a_staging_folder_left_by_an_earlier_extraction_is_removed(server, cifar_tarball, tmp_path, capsys):
    """The thirty-first pass: a `.fasttl-tmp-extract-*` folder left by a fetch killed outright (or
    stopped twice while cleaning up) stayed in the data folder for good; the next fetch removes
    it. A link of that name is left alone, and so is what it points to; so is a user's folder of
    another name under that prefix (fasttl's are mkdtemp's: 8 of its characters)."""
    server.files["/c.tar.gz"] = cifar_tarball
    dest = tmp_path / "data"
    (dest / ".fasttl-tmp-extract-ab12cd_x" / "cifar-10-batches-py").mkdir(parents=True)
    (dest / ".fasttl-tmp-extract-ab12cd_x" / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"half")
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "mine.txt").write_text("mine")
    os.symlink(keep, dest / ".fasttl-tmp-extract-link99xy")
    (dest / ".fasttl-tmp-extract-mine").mkdir()
    (dest / ".fasttl-tmp-extract-mine" / "notes.txt").write_text("mine")  # (before pass 93's fix: removed)
    code, _, err = _fetch(capsys, "--url", server.url("/c.tar.gz"), "--sha256", _sha(cifar_tarball), "--dest", dest)
    assert code == 0, err
    assert sorted(os.listdir(dest)) == [".fasttl-tmp-extract-link99xy", ".fasttl-tmp-extract-mine",
                                        "cifar-10-batches-py"]
    assert (dest / ".fasttl-tmp-extract-mine" / "notes.txt").read_text() == "mine"
    assert (keep / "mine.txt").read_text() == "mine"


def test_a_server_reply_with_escape_sequences_is_shown_escaped(tmp_path, capsys):
    _, code, line = _fetch_from_raw_server(b"HTTP/1.1 500 \x1b[31mevil\x1b[0m\x07\r\nContent-Length: 0\r\n\r\n",
                                           tmp_path, capsys)
    assert code == 2 and "\x1b" not in line and "\x07" not in line and "\\x1b[31mevil" in line


def test_an_archive_made_with_a_dot_slash_prefix_extracts(server, cifar_tarball, tmp_path, capsys):
    # `tar czf x.tgz ./cifar-10-batches-py` names the members ./cifar-10-batches-py/...: the same place
    buffer = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(cifar_tarball)) as good, tarfile.open(fileobj=buffer, mode="w:gz") as dotted:
        top = tarfile.TarInfo(".")
        top.type = tarfile.DIRTYPE
        dotted.addfile(top)
        for info in good.getmembers():
            content = good.extractfile(info) if info.isfile() else None
            info.name = "./" + info.name
            dotted.addfile(info, content)
    server.files["/dotted.tar.gz"] = buffer.getvalue()
    dest = tmp_path / "data"
    code, _, err = _fetch(capsys, "--url", server.url("/dotted.tar.gz"), "--sha256", _sha(buffer.getvalue()),
                          "--dest", dest)
    assert code == 0, err
    assert sorted(os.listdir(dest)) == ["cifar-10-batches-py"]
    assert (dest / "cifar-10-batches-py" / "test_batch").is_file()
    # ./.. is still a way out
    with pytest.raises(fetch_module.DataError, match=r"member './../up.txt' is a '..' path"):
        with tarfile.open(fileobj=io.BytesIO(_tar([("./../up.txt", b"x")]))) as archive:
            check_members(archive, "cifar-10-batches-py", "x.tar.gz")


def test_a_compressed_shard_gets_the_advice_that_fits(tmp_path):
    from fasttl.transfer.datasets import load_dataset

    (tmp_path / "train-000000.tar.gz").write_bytes(b"\x1f\x8b not really")
    with pytest.raises(fetch_module.DataError, match=r"train-000000.tar.gz is a compressed archive; WebDataset shards "
                                                     r"are uncompressed .tar files"):
        load_dataset(str(tmp_path / "train-000000.tar.gz"))


def test_two_fetches_into_one_folder_are_one_at_a_time(server, cifar_tarball, tmp_path, capsys):
    """A second `fasttl data fetch` into a folder another one is filling is refused in one line
    (both used to write one partial download); the lock is the folder's own flock, so nothing is
    left in the data folder, and a holder killed with -9 releases it."""
    import signal
    import subprocess
    import sys

    server.files["/c.tar.gz"] = cifar_tarball
    server.trickle = (512, 0.05)
    dest = tmp_path / "data"
    words = ["--url", server.url("/c.tar.gz"), "--sha256", _sha(cifar_tarball), "--dest", str(dest)]
    first = subprocess.Popen([sys.executable, "-m", "fasttl", "data", "fetch", "cifar10", "--no-progress", *words],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        partial = dest / _partial(cifar_tarball)
        deadline = time.monotonic() + 60
        while not (partial.exists() and partial.stat().st_size > 0):
            assert first.poll() is None, first.stderr.read().decode()
            assert time.monotonic() < deadline, "the first fetch never started writing"
            time.sleep(0.05)
        code, _, err = _fetch(capsys, *words)
        assert code == 2 and one_line_error(err) == f"fasttl: error: fetch: {dest} is in use by another `fasttl " \
            "data fetch`; wait for it to finish, then run the same command again", err
        assert first.poll() is None  # the first one goes on, its download untouched
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
        first.stderr.close()
    server.trickle = None
    code, out, err = _fetch(capsys, *words)
    assert code == 0, err
    assert "resuming" in out and _tree(dest)[0] == "cifar-10-batches-py" and all(
        not name.startswith(".") for name in os.listdir(dest))
