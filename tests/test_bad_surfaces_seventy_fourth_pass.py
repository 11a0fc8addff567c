"""Session 34's leftovers and the seventy-fourth hostile pass: a % in a --url host (or a redirect's)
is taken only as the escape of a byte of a character outside ASCII (as urllib writes a redirect's
international host), so no escape can spell a delimiter, white space or a port (the rule that ends
passes 71-73's case-by-case host rules); one UTF-8 check and one "prints as itself" rule shared by
the places that had each their own; a hand-edited run_token; a user's file that happens to bear
extract's mark name."""
import zlib

import numpy as np
import pytest

from conftest import cli, one_line_error


# ---- a % in a host escapes only a byte of a character outside ASCII ----------------------------------------------
@pytest.mark.parametrize("host, stray", [
    ("fe80::1%25lo", "%25"), ("a%zz.example", "%zz"), ("a%.example", "%.e"), ("b%C3%BC%40127.0.0.1", "%40"),
    ("a%7Fb", "%7F"), ("a%00b", "%00"), ("a%2e%2E.example", "%2e"),
])
def test_a_percent_in_a_host_that_escapes_no_byte_outside_ascii_is_refused(host, stray):
    import urllib.parse

    from fasttl.data.http_reply import sendable

    url = f"http://[{host}]:9/x" if host.startswith("fe80") else f"http://{host}:9/x"
    netloc = urllib.parse.urlsplit(url).netloc
    with pytest.raises(UnicodeError) as caught:
        sendable(url)
    # before: each escape had its own rule (delimiters, white space, a second colon); %2e%2E slipped through as dots
    assert str(caught.value) == (f"{netloc!r} holds {stray!r}, a % that escapes no byte of a character outside ASCII; "
                                 "write the host name's characters as themselves")


@pytest.mark.parametrize("written, sent", [
    ("http://b%C3%BCcher.example:8080/x", "http://xn--bcher-kva.example:8080/x"),
    ("http://B%C3%BCcher.example/d%C3%A9?q=%25", "http://xn--bcher-kva.example/d%C3%A9?q=%25"),
    ("http://b\u00fccher.example/x%40y", "http://xn--bcher-kva.example/x%40y"),  # escapes outside the host: kept
    ("http://127.0.0.1:9/a%2Fb", "http://127.0.0.1:9/a%2Fb"),
])
def test_escapes_of_a_character_outside_ascii_are_the_host_they_spell(written, sent):
    from fasttl.data.http_reply import sendable

    assert sendable(written) == sent


def test_a_redirect_to_a_host_with_an_escaped_at_is_refused_and_nothing_is_fetched(tmp_path, capsys, monkeypatch):
    import http.server

    from conftest import LoopbackServer
    from fasttl.cli import main

    asked = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            asked.append(self.path)
            if self.path == "/moved":
                self.send_response(302)
                self.send_header("Location", f"http://evil.invalid%40127.0.0.1:{self.server.server_address[1]}/got")
            else:
                self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()

    monkeypatch.setenv("FASTTL_DATA", str(tmp_path / "data"))
    server = LoopbackServer(Handler)
    try:
        code = main(["data", "fetch", "cifar10", "--no-progress", "--url", server.url("/moved"), "--sha256", "0" * 64])
    finally:
        server.close()
    error = one_line_error(capsys.readouterr().err)
    assert code == 2 and asked == ["/moved"], (asked, error)  # before pass 72: /got fetched from 127.0.0.1
    assert "whose host name 'evil.invalid%40127.0.0.1:" in error and "holds '%40', a % that escapes no byte" in error


# ---- one UTF-8 check, one rule for what prints as itself ----------------------------------------------------------
def test_is_utf8_tells_names_of_other_encodings():
    import os

    from fasttl.util.checks import is_utf8

    assert is_utf8("caf\u00e9 \u6771\u4eac \U0001f3f4") and is_utf8("")
    assert not is_utf8(os.fsdecode(b"caf\xe9")) and not is_utf8("\ud800")


def test_what_a_class_name_may_hold_is_what_outputs_write_as_itself(request):
    from fasttl.data.labels import unprintable
    from fasttl.util.outputs import NAME_MARKS, terminal_text

    rng = np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))
    sample = [chr(c) for c in rng.integers(0, 0x30000, 3000)] + sorted(NAME_MARKS)[:8] + list("\x00\x1b\n\t\x7f\x85")
    for char in sample:
        if 0xD800 <= ord(char) <= 0xDFFF:
            continue
        # before: two spellings of one rule; a name taken must print as itself in every output, and one escaped
        # anywhere must be refused as a name
        assert (unprintable("a" + char) is None) == (terminal_text(char) == char), hex(ord(char))


def test_a_cache_loader_keeps_a_numpy_drop_last_as_a_plain_bool(tmp_path):
    import fasttl

    cache = fasttl.FeatureCache.write(str(tmp_path / "c"), [np.arange(20, dtype=np.float32).reshape(5, 4)],
                                      [0, 1, 0, 1, 0], classes=["a", "b"], dtype="fp32")
    loader = cache.loader(batch_size=2, shuffle=False, drop_last=np.True_)
    assert loader.drop_last is True and len(loader) == 2 and len(list(loader)) == 2


# ---- a hand-edited run_token; a user's file bearing extract's mark name ---------------------------------------------
def test_a_hand_edited_run_token_is_named_as_the_bad_field(cat_ship, tmp_path, capsys):
    from conftest import one_epoch_run, vouched_config_edit
    from fasttl.transfer.job import run

    first = tmp_path / "first"
    run(**one_epoch_run(cat_ship, first))
    image = str(next((cat_ship / "test").rglob("*.jpg")))
    for n, token in enumerate([5, "", "g" * 32, "0" * 10000, ["0" * 32], None]):
        edited = vouched_config_edit(first, tmp_path / f"edited{n}", lambda config: config.update(run_token=token))
        code, _, err = cli(capsys, "predict", "--run", edited, image)
        if token is None:  # a run from before run tokens: predicts
            assert code == 0, err
            continue
        assert code == 2 and one_line_error(err).startswith(
            f"fasttl: error: {edited / 'config.json'}: field 'run_token' is "), err
        assert err.endswith("(expected 32 hexadecimal digits); rerun the run, or fix the value there\n") and \
            len(err) < 400, err


def test_a_users_file_named_as_extracts_mark_keeps_runs_out_and_extract_from_its_other_files(cat_ship, tmp_path,
                                                                                            capsys):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / ".fasttl-extract").write_text("my notes on extraction\n")
    (folder / "notes.txt").write_text("keep me\n")
    code, _, err = cli(capsys, "run", "--data", cat_ship, "--out", folder / "run", "--strategy", "scratch", "--epochs",
                       1, "--image-size", 32, "--compare", "none", "--no-progress")
    assert code == 2 and f"is in the feature cache folder {folder} (it holds .fasttl-extract)" in err, err
    code, _, err = cli(capsys, "extract", "--data", cat_ship, "--out", folder, "--image-size", 32, "--no-progress")
    assert code == 2 and "notes.txt" in one_line_error(err), err  # the user's other file: nothing written beside it
    assert sorted(p.name for p in folder.iterdir()) == [".fasttl-extract", "notes.txt"]
    assert (folder / ".fasttl-extract").read_text() == "my notes on extraction\n"


# ---- pass 73's observation: a list or classes file saved as Latin-1 is named, with the fix ------------------------
@pytest.mark.parametrize("kind", ["csv", "tsv", "classes"])
def test_a_text_file_that_is_not_utf8_names_the_byte_and_the_fix(tmp_path, kind):
    from fasttl.data.formats.filelist import read_file_list
    from fasttl.data.labels import read_classes_file
    from fasttl.util.errors import DataError

    path = tmp_path / f"mine.{'txt' if kind == 'classes' else kind}"
    separator = "\t" if kind == "tsv" else ","
    body = b"caf\xe9\nship\n" if kind == "classes" else \
        f"path{separator}label\na.jpg{separator}ship\n".encode() + b"caf\xe9.jpg" + separator.encode() + b"cat\n"
    path.write_bytes(body)
    with pytest.raises(DataError) as caught:
        read_classes_file(str(path)) if kind == "classes" else read_file_list(str(path))
    # before: "(... 'utf-8' codec can't decode byte 0xe9 in position 59: invalid continuation byte)"
    prefix = "classes" if kind == "classes" else "data"
    assert str(caught.value) == (f"{prefix}: {path} is not UTF-8 text (byte 0xE9, as Latin-1 or another code page "
                                 "writes \u00e9 and its like); save it as UTF-8")
