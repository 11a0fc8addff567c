"""Session 35: session 34's final-read leftovers (one reading of a run folder's marker for every
reader, a cache's own files judged by what they hold, one held-out loader for class folders) and
the eighty-second and later hostile passes."""
import json
import os
import shutil

import pytest

from conftest import cli, one_line_error


@pytest.fixture(scope="module")
def a_run(cat_ship, tmp_path_factory):
    from conftest import finished_run

    return finished_run(cat_ship, tmp_path_factory, "eighty-second")


# ---- session 34's leftovers --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind, state", [("none", "absent"), ("record", "record"), ("user", "other"),
                                         ("link", "link"), ("folder", "folder"), ("fifo", "other")])
def test_every_reader_of_a_run_marker_reads_it_one_way(tmp_path, kind, state):
    from fasttl.transfer.rundir import holds_run, mark_run
    from fasttl.util import files

    folder = tmp_path / "f"
    folder.mkdir()
    marker = folder / files.RUN_MARKER
    if kind == "record":
        mark_run(str(folder))
    elif kind == "user":
        marker.write_text("mine\n")
    elif kind == "link":
        os.symlink(tmp_path / "elsewhere", marker)
    elif kind == "folder":
        marker.mkdir()
    elif kind == "fifo":
        os.mkfifo(marker)  # (never waited on)
    assert files.run_marker_state(str(folder))[0] == state
    assert holds_run(str(folder)) is files.holds_run_record(str(folder)) is (kind == "record")
    assert files.enclosing_run_folder(str(folder / "x")) == (os.path.realpath(folder) if kind == "record" else None)


def test_an_unreadable_marker_is_named_by_the_run_folder_check_and_the_search_up(tmp_path):
    import subprocess
    import sys

    from test_read_only_folders import _bound_by_permissions

    from fasttl.util import files

    marker = tmp_path / "f" / files.RUN_MARKER
    marker.parent.mkdir()
    marker.write_text(json.dumps({"what": files.RUN_MARKER_WHAT}))
    marker.chmod(0)
    probe = ("import sys\nfrom fasttl.transfer.rundir import holds_run\nfrom fasttl.util import files\n"
             "from fasttl.util.errors import UserError\nfolder = sys.argv[1]\n"
             "print(files.run_marker_state(folder)[0])\n"
             "for reader in (lambda: holds_run(folder), lambda: files.enclosing_run_folder(folder + '/x')):\n"
             "    try:\n        reader()\n    except UserError as exc:\n        print(exc)\n")
    try:
        result = subprocess.run(_bound_by_permissions() + [sys.executable, "-c", probe, str(marker.parent)],
                                capture_output=True, text=True, timeout=120)
    finally:
        marker.chmod(0o644)
    said = (f"{marker} cannot be read (Permission denied), so fasttl can't tell whether its folder is a run folder, "
            "which only its run writes into; make it readable, or remove it if it is yours")
    assert result.stdout.splitlines() == ["unreadable", said, said], result.stderr  # (holds_run: a raw error before)


def test_a_users_file_named_as_extracts_mark_is_foreign_to_every_cache_check(tmp_path):
    from fasttl.cache import folder as cache_folder
    from fasttl.cache import store

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / store.EXTRACT_MARKER).write_text("a note of mine\n")
    assert not store.is_own_file(str(mine), store.EXTRACT_MARKER)
    assert cache_folder.foreign_entries(str(mine)) == [store.EXTRACT_MARKER]  # before: counted as the cache's
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / store.EXTRACT_MARKER).write_text(json.dumps(store.EXTRACT_MARK) + "\n")
    assert store.is_own_file(str(theirs), store.EXTRACT_MARKER) and cache_folder.foreign_entries(str(theirs)) == []


@pytest.mark.parametrize("layout", ["one class", "no images"])
def test_eval_of_a_held_out_test_folder_with_one_class_or_no_images_names_it(a_run, cat_ship, tmp_path, capsys,
                                                                             layout):
    held = tmp_path / "held"
    if layout == "one class":
        shutil.copytree(cat_ship / "test" / "cat", held / "test" / "cat")
    else:
        for name in ("cat", "ship"):
            (held / "test" / name).mkdir(parents=True)
    code, _, err = cli(capsys, "eval", a_run, "--no-progress", "--data", held)
    test = held / "test"
    assert code == 2 and one_line_error(err) == (
        f"fasttl: error: data: {test} has only 1 class folder (cat); a classifier needs at least 2 (add "
        f"{test}/<other class>/)" if layout == "one class" else
        f"fasttl: error: data: class folder {test / 'cat'} holds no .jpg/.jpeg/.png images (add images or remove it)")
    assert not (a_run / "eval_metrics.json").exists() or "held" not in (a_run / "eval_metrics.json").read_text()


def test_a_held_out_folder_of_class_folders_is_named_as_a_run_names_its_data(tmp_path, cat_ship, monkeypatch):
    from fasttl.transfer.datasets import load_dataset, load_held_out

    flat = tmp_path / "flat"
    shutil.copytree(cat_ship / "test", flat)
    monkeypatch.chdir(flat)
    held, own = load_held_out("."), load_dataset(".")
    assert held.name == own.name == "flat"  # before: "." as the held-out set's name
    assert held.train is held.test and len(held.test) == sum(1 for _ in flat.rglob("*.jpg"))
    assert own.carved and len(own.train) + len(own.test) == len(held.test)


@pytest.mark.parametrize("field, value", [("lr", "0.1"), ("eps", None), ("weight_decay", "0"),
                                          ("betas", ("0.9", 0.99))])
def test_a_param_group_value_set_later_as_text_raises_as_torch_optim_does(request, field, value):
    import zlib

    import torch

    import fasttl.optim

    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    start = torch.randn(5, 3)
    for make in (torch.optim.AdamW, fasttl.optim.AdamW):
        param = torch.nn.Parameter(start.clone())
        optimizer = make([param], lr=0.1)
        param.grad = torch.randn_like(param)
        optimizer.step()
        optimizer.param_groups[0][field] = value
        with pytest.raises(TypeError) as caught:  # before: fasttl's float() read "0.1" as 0.1 and stepped
            optimizer.step()
        if make is fasttl.optim.AdamW:
            name = "betas[0]" if field == "betas" else field
            assert str(caught.value).startswith(f"{name}: a param group's {name} must be a number, got ")
            assert int(optimizer.state[param]["step"]) == 1  # the refused step moved nothing
        assert not torch.equal(param.detach(), start)  # (the first step did move it)


# ---- pass 83 (on c4da6af: about 156 attempts on data fetch): 3 found ---------------------------------------------
_PAYLOAD = bytes(range(256)) * 4  # 1,024 bytes, each position telling its offset's byte


def _part_reply(first_line: bytes, content_range, body: bytes):
    def reply(out):
        out.write(first_line + (b"Content-Range: " + content_range + b"\r\n" if content_range is not None else b"")
                  + b"Content-Length: %d\r\n\r\n" % len(body) + body)
    return reply


def test_a_resume_answered_from_an_earlier_byte_continues_the_partial(tmp_path):
    from test_bad_surfaces_seventy_fourth_pass import _fetched, _raw_server

    (tmp_path / "partial").write_bytes(_PAYLOAD[:100])  # asks for bytes=100-; the server rounds down to its blocks
    reply = _part_reply(b"HTTP/1.1 206 Partial Content\r\n", b"bytes 64-1023/1024", _PAYLOAD[64:])
    # before (N1): written from byte 0 as the whole file; the checksum then blamed the 100 bytes kept before
    assert _fetched(_raw_server(reply), tmp_path) == _PAYLOAD


@pytest.mark.parametrize("have, content_range, said", [
    (100, b"bytes 500-1023/1024", "answered a resume from byte 100 with a part (HTTP 206) from byte 500, which can't "
                                  "continue the partial download; it was removed: run the same command again to "
                                  "download the file whole"),
    (100, None, "answered a resume from byte 100 with a part (HTTP 206) that says not where it starts (Content-Range: "
                "(none)), which can't"),
    (100, b"bytes +64-1023/1024", "with a part (HTTP 206) that says not where it starts (Content-Range: bytes "
                                  "+64-1023/1024)"),  # (int() reads '+64'; HTTP's grammar holds digits only)
    (0, b"bytes 500-1023/1024", "answered with a part of a file (HTTP 206) from byte 500 where the whole file was "
                                "asked for; check the address (--url)")], ids=["past", "no range", "plus", "unasked"])
def test_a_part_that_cant_continue_the_partial_is_said_and_dropped(tmp_path, have, content_range, said):
    from test_bad_surfaces_seventy_fourth_pass import _raw_server, _refusal

    if have:
        (tmp_path / "partial").write_bytes(_PAYLOAD[:have])
    server = _raw_server(_part_reply(b"HTTP/1.1 206 Partial Content\r\n", content_range, _PAYLOAD[500:]))
    # before (N1): written from byte 0 as the whole file, and the checksum blamed the bytes an earlier fetch kept
    refused = _refusal(server, tmp_path)
    assert refused.startswith(f"fetch: {server.url('/x')} ") and said in refused, refused
    assert (tmp_path / "partial").read_bytes() == b""  # (emptied: fetch removes an empty partial)


@pytest.mark.parametrize("ending", ["eof", "deadline"])
def test_a_chunked_reply_cut_before_a_whole_chunk_says_nothing_was_kept(tmp_path, ending):
    import time

    from test_bad_surfaces_seventy_fourth_pass import _raw_server, _refusal

    def reply(out):
        out.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n44c\r\n" + b"i" * 1000)
        out.flush()
        if ending == "deadline":
            time.sleep(5)

    server = _raw_server(reply)
    said = _refusal(server, tmp_path, deadline_s=1.5)
    # before (N2): "stopped at 1,000 of ? bytes; run the same command again to resume", nothing kept to resume from
    assert said == (f"fetch: the download of {server.url('/x')} stopped at 0 of ? bytes (IncompleteRead); run the same "
                    "command again (nothing was kept: no whole chunk of it arrived)" if ending == "eof" else
                    f"fetch: the download of {server.url('/x')} took longer than 1.5 s (--deadline) and stopped at 0 "
                    "bytes; nothing was kept (no whole chunk of it arrived): give a longer --deadline")
    assert (tmp_path / "partial").read_bytes() == b""


def test_a_reply_cut_inside_its_second_chunk_says_what_it_kept(tmp_path):
    from test_bad_surfaces_seventy_fourth_pass import _raw_server, _refusal

    server = _raw_server(lambda out: out.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                                               b"4\r\nabcd\r\n44c\r\n" + b"i" * 1000))
    assert _refusal(server, tmp_path) == (f"fetch: the download of {server.url('/x')} stopped at 4 of ? bytes "
                                          "(IncompleteRead); run the same command again to resume")  # before: 1,004
    assert (tmp_path / "partial").read_bytes() == b"abcd"


def test_a_redirect_to_an_address_that_is_no_url_names_it(tmp_path):
    from test_bad_surfaces_seventy_fourth_pass import _raw_server, _refusal

    server = _raw_server(lambda out: out.write(b"HTTP/1.1 302 Found\r\nLocation: http://[::1/x\r\nContent-Length: 0"
                                               b"\r\n\r\n"))
    # before (N3): "cannot reach <--url> (ValueError: Invalid IPv6 URL); check the network or the address"
    assert _refusal(server, tmp_path) == (f"fetch: {server.url('/x')} redirects to 'http://[::1/x', which is no valid "
                                          "address (Invalid IPv6 URL); refused (check the address, --url)")


# ---- pass 82 (on c4da6af: about 190 attempts on runs, eval, markers and the API): 6 found --------------------------
@pytest.mark.parametrize("kind", [set, frozenset])
def test_classes_given_as_a_set_are_refused_for_their_missing_order(cat_ship, kind):
    from fasttl.data import file_list, scan_class_folder

    pairs = [(str(p), 0 if p.parent.name == "cat" else 1) for p in sorted((cat_ship / "test").rglob("*.jpg"))]
    said = "classes: a set has no order, and the order numbers the labels; give a list"
    with pytest.raises(TypeError, match=f"^{said}$"):  # before (N1): its order changed with PYTHONHASHSEED
        file_list(pairs, classes=kind({"cat", "ship", "dog"}))
    with pytest.raises(TypeError, match=f"^{said}$"):
        scan_class_folder(str(cat_ship / "test"), classes=kind({"cat", "ship"}))


def test_predict_run_names_paths_that_are_no_paths(a_run, cat_ship):
    import numpy as np

    from fasttl.predict import predict_run
    from fasttl.util.errors import OptionError

    image = str(next((cat_ship / "test").rglob("*.jpg")))
    for paths, said in [(np.array(image), "paths: expected image files or folders (a path, or a list of them), got "
                                          "ndarray of shape ()"),
                        ([None], "paths[0]: expected a path (a str or pathlib.Path), got NoneType"),
                        ([image, 3], "paths[1]: expected a path (a str or pathlib.Path), got int"),
                        ({image}, "paths: a set has no order to give the predictions in; give a list")]:
        with pytest.raises(OptionError) as caught:  # before (N2): "iteration over a 0-d array", "expected str, ..."
            predict_run(str(a_run), paths, progress=False)
        assert str(caught.value) == said
    predicted = predict_run(str(a_run), np.array([image, image]), progress=False)  # df["path"].values
    assert predicted["rows"] == 2 and [line.split(",")[0] for line in predicted["csv"].splitlines()[1:]] == [image] * 2


@pytest.mark.parametrize("content, said", [
    (b"\xff\xd8\xff\xe0" + bytes(200), "it starts like a JPEG image"),
    (bytes([7, 0x6b, 0xb3, 0x10, 0xf5, 0xed, 0x11, 0x11]) + bytes(100),
     "its first bytes are 07 6b b3 10 f5 ed 11 11, not a zip's or a pickle's"),
    (b"hello\n", "it starts like text"),
    (b"", "an empty file")], ids=["jpeg", "random", "text", "empty"])
def test_a_weights_file_of_another_kind_is_said_to_be_one(tmp_path, content, said):
    import fasttl
    from fasttl.util.errors import UserError

    weights = tmp_path / "w.pth"
    weights.write_bytes(content)
    with pytest.raises(UserError) as caught:  # before (N3): "it holds Python objects other than tensors ... could
        fasttl.backbones.create("resnet18", weights=str(weights))  # run code", or "(101)"
    assert f"is not a state dict file fasttl can load (not a torch.save file ({said}))" in str(caught.value)
    assert "could run code" not in str(caught.value)


@pytest.mark.parametrize("left", ["weights", "a users config"])
def test_a_marked_folder_with_results_but_no_metrics_is_not_cleared_without_overwrite(a_run, cat_ship, tmp_path,
                                                                                     left):
    import hashlib

    from conftest import one_epoch_run
    from fasttl.transfer.job import run
    from fasttl.transfer.rundir import RunError

    out = tmp_path / "out"
    if left == "weights":  # a finished run whose metrics.json was moved away (a strategy that keeps no checkpoint)
        shutil.copytree(a_run, out)
        for name in ["metrics.json"] + [p.name for p in out.glob("*.checkpoint.pt")]:
            (out / name).unlink()
    else:  # a copy of a run's marker beside a user's own files
        out.mkdir()
        shutil.copy(a_run / ".fasttl-run", out / ".fasttl-run")
        (out / "config.json").write_text('{"a": 1}\n')
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.iterdir() if p.name != ".fasttl-run.lock"}
    with pytest.raises(RunError) as caught:  # before (N4): cleared, the trained weights or the user's files lost
        run(**dict(one_epoch_run(cat_ship, out, strategy="linear"), epochs=None))
    what = "a config.json this run did not write" if left != "weights" else "scratch.safetensors"
    assert str(caught.value).startswith(f"out: {out} holds an unfinished run's files ({what}")
    resume = "--resume to continue it, " if left == "weights" else ""  # (a user's config.json: no run to resume)
    assert str(caught.value).endswith(f") and no checkpoint of an epoch; pass {resume}--overwrite to replace them, or "
                                      "another --out")
    after = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.iterdir() if p.name != ".fasttl-run.lock"}
    assert after == before  # (the lock: fasttl's own, as in any run folder)


def test_a_run_stopped_before_its_first_epoch_is_still_started_over_without_asking(a_run, cat_ship, tmp_path):
    from conftest import one_epoch_run
    from fasttl.transfer.job import run

    out = tmp_path / "out"
    out.mkdir()
    for name in (".fasttl-run", "config.json"):  # what a run holds before its first epoch ends
        shutil.copy(a_run / name, out / name)
    run(**one_epoch_run(cat_ship, out))
    assert (out / "metrics.json").is_file()


@pytest.mark.parametrize("change, said", [
    (dict(std=(1e-300, 1.0, 1.0)), "std, mean: (1e-300, 1.0, 1.0) and (0.5, 0.5, 0.5) normalize pixels to values "
                                   "float32 can't hold (inf"),
    (dict(std=(1e-45, 1.0, 1.0)), "normalize pixels to values float32 can't hold"),
    (dict(mean=(1e300, 0.0, 0.0)), "and (1e+300, 0.0, 0.0) normalize pixels to values float32 can't hold"),
    (dict(crop_fraction=1e-9), "crop_fraction: 1e-09 resizes each image to 32,000,000,000 px before its 32 px center "
                               "crop, more than fasttl handles (2048); expected at least 0.01562"),
    (dict(crop_fraction=0.01), "crop_fraction: 0.01 resizes each image to 3,200 px")],
    ids=["tiny std", "subnormal std", "huge mean", "tiny crop", "small crop"])
def test_a_transform_spec_refuses_values_float32_or_memory_cant_hold(change, said):
    from fasttl.data.spec import TransformSpec

    with pytest.raises(ValueError) as caught:  # before (N5, N6): inf pixels; a 119 GiB resize on the first image
        TransformSpec(**dict(dict(size=32, mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2)), **change))
    assert str(caught.value).startswith(said) if said.startswith(("std", "crop")) else said in str(caught.value)
    assert TransformSpec(32, (0.5,) * 3, (1e-6,) * 3, crop_fraction=32 / 2048).resize_shorter == 2048


@pytest.mark.parametrize("device", [b"cpu", bytearray(b"cpu"), True, False])
def test_a_device_given_as_bytes_or_a_bool_is_refused_by_name(a_run, device):
    from fasttl.predict import load_run
    from fasttl.util.errors import OptionError

    with pytest.raises(OptionError, match=r"^device: expected cpu, cuda or cuda:N, got "):  # before: b"cpu" loaded
        load_run(str(a_run), device=device)


# ---- pass 85 (on b50a6c6: about 101 attempts on data fetch): 4 found -----------------------------------------------
@pytest.mark.parametrize("answer, resumed", [("200", None), ("206 from 64", 64), ("206 from 100", 100)])
def test_a_checksum_mismatch_says_only_the_bytes_the_file_was_resumed_from(tmp_path, capsys, answer, resumed):
    import hashlib

    from test_bad_surfaces_seventy_fourth_pass import _raw_server

    from fasttl.cli import main
    from fasttl.data.fetch import REMOTES, partial_name

    expected = hashlib.sha256(_PAYLOAD).hexdigest()
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / partial_name(REMOTES["cifar10"], expected)).write_bytes(_PAYLOAD[:100])
    other = bytes(reversed(_PAYLOAD))  # another file than the partial's
    if answer == "200":
        reply = _part_reply(b"HTTP/1.1 200 OK\r\n", None, other)
    else:
        start = 64 if answer.endswith("64") else 100
        reply = _part_reply(b"HTTP/1.1 206 Partial Content\r\n", b"bytes %d-1023/1024" % start, other[start:])
    server = _raw_server(reply)
    try:
        code = main(["data", "fetch", "cifar10", "--no-progress", "--url", server.url("/x"), "--sha256", expected,
                     "--dest", str(dest)])
    finally:
        server.close()
    said = one_line_error(capsys.readouterr().err)
    # before (N1): "(resumed from the 100 bytes an earlier fetch kept ...)" of a reply that started the file over
    assert code == 2 and f"expected {expected}" in said
    if resumed is None:
        assert "resumed" not in said, said
    else:
        assert f"(resumed from the {resumed:,} bytes an earlier fetch kept: the file may have changed" in said, said


@pytest.mark.parametrize("layout", ["capped range", "cut without length"])
def test_a_part_that_ends_before_the_file_is_an_interrupted_download_kept_to_resume(tmp_path, layout):
    from test_bad_surfaces_seventy_fourth_pass import _raw_server, _refusal

    (tmp_path / "partial").write_bytes(_PAYLOAD[:100])
    if layout == "capped range":  # a server that sends at most 100 bytes a request
        reply = _part_reply(b"HTTP/1.1 206 Partial Content\r\n", b"bytes 100-199/1024", _PAYLOAD[100:200])
    else:  # no Content-Length, and the connection closes early
        def reply(out):
            out.write(b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 100-1023/1024\r\n\r\n" + _PAYLOAD[100:300])
    server = _raw_server(reply)
    said = _refusal(server, tmp_path)
    # before (N2): taken as the whole file; the checksum then failed and removed the correct partial
    part = " (its reply held bytes 100 to 199 only)" if layout == "capped range" else ""
    kept = 200 if layout == "capped range" else 300
    assert said == (f"fetch: the download of {server.url('/x')} stopped at {kept:,} of 1,024 bytes{part}; run the same "
                    "command again to resume")
    assert (tmp_path / "partial").read_bytes() == _PAYLOAD[:kept]


@pytest.mark.parametrize("way_out", ["ctrl-c", "full disk"])
def test_every_way_out_of_a_chunked_body_keeps_only_its_checked_chunks(tmp_path, monkeypatch, way_out):
    from test_bad_surfaces_seventy_fourth_pass import _raw_server

    from fasttl.data import fetch
    from fasttl.data.fetch import download

    def reply(out):  # a whole chunk, then one whose size line says more than it holds (framing follows as data)
        out.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n")
        out.write(b"44c\r\n" + b"i" * 1000 + b"\r\n3e8\r\n" + b"j" * 20)
        out.flush()

    written = []
    real_write = fetch._write_all

    def write_then_stop(fd, block, path):
        real_write(fd, block, path)
        written.append(len(block))
        if sum(written) > 4:  # past the checked chunk: the signal or the disk comes now
            raise KeyboardInterrupt if way_out == "ctrl-c" else OSError(27, "File too large", path)

    monkeypatch.setattr(fetch, "_write_all", write_then_stop)
    server = _raw_server(reply)
    try:
        with pytest.raises(KeyboardInterrupt if way_out == "ctrl-c" else OSError):
            download(server.url("/x"), str(tmp_path / "partial"), progress=False)
    finally:
        server.close()
    # before (N3): the bytes after "abcd" (framing among them, on the next read) stayed as the point to resume from
    assert (tmp_path / "partial").read_bytes() == b"abcd"


def test_a_rate_stop_after_a_redirect_names_where_it_was_sent(tmp_path, monkeypatch):
    import time

    from test_bad_surfaces_seventy_fourth_pass import _raw_server, _refusal

    from fasttl.data import fetch_budget

    def reply(out):
        out.write(b"HTTP/1.1 200 OK\r\nContent-Length: 8000\r\n\r\n")
        for _ in range(8):
            out.write(b"x" * 100)
            out.flush()
            time.sleep(0.4)

    slow = _raw_server(reply)
    hop = _raw_server(lambda out: out.write(b"HTTP/1.1 302 Found\r\nLocation: " + slow.url("/file").encode()
                                            + b"\r\nContent-Length: 0\r\n\r\n"))
    monkeypatch.setattr(fetch_budget, "RATE_WINDOW_S", 1.0)
    try:
        said = _refusal(hop, tmp_path, min_rate=5000)
    finally:
        slow.close()
    # before (N4): "fetch: <--url> sent 250 bytes/s ...", the address that redirected, not the one that was slow
    assert said.startswith(f"fetch: {slow.url('/file')} (where {hop.url('/x')} redirects) sent "), said


def test_a_content_range_unit_is_read_in_any_case(tmp_path):
    from test_bad_surfaces_seventy_fourth_pass import _fetched, _raw_server

    (tmp_path / "partial").write_bytes(_PAYLOAD[:100])
    reply = _part_reply(b"HTTP/1.1 206 Partial Content\r\n", b"Bytes 100-1023/1024", _PAYLOAD[100:])
    assert _fetched(_raw_server(reply), tmp_path) == _PAYLOAD  # (HTTP's range units are case-insensitive)


# ---- pass 84 (on b50a6c6: about 230 attempts on run folders, markers, the optimizers and the API): 3 found ---------
@pytest.mark.parametrize("field, value, said", [
    ("lr", 1e39, "lr: expected a finite number >= 0 (within float32's range), got 1e+39"),
    ("betas", (1.0, 0.999), "betas[0]: expected a number in [0, 1), got 1.0"),
    ("betas", (0.9, 1.5), "betas[1]: expected a number in [0, 1), got 1.5"),
    ("betas", (0.9, 0.99, 0.5), "betas: expected a pair (beta1, beta2), got (0.9, 0.99, 0.5) (set after the optimizer "
                                "was made?)")], ids=["huge lr", "beta1 of 1", "beta2 past 1", "three betas"])
def test_a_param_group_value_set_later_is_checked_as_the_constructor_checks_it(request, field, value, said):
    import zlib

    import torch

    import fasttl.optim

    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    for make in (torch.optim.AdamW, fasttl.optim.AdamW):
        param = torch.nn.Parameter(torch.randn(4, 3))
        optimizer = make([param], lr=0.1)
        param.grad = torch.randn_like(param)
        optimizer.step()
        optimizer.param_groups[0][field] = value
        moved = param.detach().clone()
        with pytest.raises((ValueError, RuntimeError, ZeroDivisionError)) as caught:  # torch.optim raises too
            optimizer.step()  # before (N1): fasttl stepped, every parameter NaN (a third beta dropped)
        if make is fasttl.optim.AdamW:
            assert str(caught.value) == said and int(optimizer.state[param]["step"]) == 1
            assert torch.equal(param.detach(), moved)


def test_a_compare_run_stopped_between_strategies_is_continued_by_the_resume_it_is_told(a_run, cat_ship, tmp_path):
    from conftest import one_epoch_run
    from fasttl.transfer.job import run
    from fasttl.transfer.rundir import RunError

    out = tmp_path / "out"
    shutil.copytree(a_run, out)  # a first model finished, the next not begun: its weights, no metrics or checkpoint
    for name in ["metrics.json"] + [p.name for p in out.glob("*.checkpoint.pt")]:
        (out / name).unlink()
    with pytest.raises(RunError, match=r"pass --resume to continue it, --overwrite to replace them"):
        run(**one_epoch_run(cat_ship, out))  # before (N2): only --overwrite offered, which drops the finished model
    assert run(**one_epoch_run(cat_ship, out, resume=True))["accuracy"] is not None  # the advice works
    assert (out / "metrics.json").is_file()


def test_a_std_float32_holds_as_inf_is_refused_not_made_zero_pixels():
    from fasttl.data.spec import TransformSpec

    with pytest.raises(ValueError, match=r"^std, mean: \(1e\+39, 1\.0, 1\.0\) .* \(inf; or 0, with a std float32 "
                                         r"holds as inf\)"):  # before (N3): that channel of every image 0
        TransformSpec(32, (0.5, 0.5, 0.5), (1e39, 1.0, 1.0))


# ---- pass 86 (on 887b5ab: about 260 attempts on the API beside torch, run folders, labels and outputs): 2 found ----
@pytest.mark.parametrize("field", ["mean", "std", "crop_fraction"])
def test_a_spec_value_too_large_for_a_float_is_named_not_a_traceback(field):
    from fasttl.data.spec import TransformSpec

    values = dict(size=32, mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2), crop_fraction=1.0)
    values[field] = 10 ** 400 if field == "crop_fraction" else (10 ** 400, 1, 1)
    with pytest.raises(ValueError, match=f"^{field}: expected "):  # before (N1): OverflowError, naming no field
        TransformSpec(**values)  # (crop_fraction: refused before too, kept)


def test_a_resume_refused_for_changed_data_advises_restoring_it(a_run, cat_ship, tmp_path):
    import time

    from conftest import one_epoch_run
    from fasttl.transfer.job import run
    from fasttl.transfer.rundir import RunError

    data, out = tmp_path / "data", tmp_path / "out"
    shutil.copytree(cat_ship, data)
    run(**one_epoch_run(data, out))
    (out / "metrics.json").unlink()  # interrupted before its results
    image = next((data / "train").rglob("*.jpg"))
    later = time.time() + 100
    os.utime(image, (later, later))  # touched, or copied back without -p: the same bytes, another time
    with pytest.raises(RunError) as caught:
        run(**one_epoch_run(data, out, resume=True))
    # before (N2): "; run with the same options, or pass --overwrite", which the user had just done
    assert ("(the data changed since the run started (an image added, removed or rewritten, or its modification time "
            "changed: a copy keeps it only with cp -p or rsync -a)); restore it as the run read it, or pass "
            "--overwrite to start over") in str(caught.value)


# ---- pass 87 (on 887b5ab: about 115 attempts on data fetch): 2 found ------------------------------------------------
def _fetch_cli(server, dest, expected):
    from fasttl.cli import main

    try:
        return main(["data", "fetch", "cifar10", "--no-progress", "--url", server.url("/x"), "--sha256", expected,
                     "--dest", str(dest)])
    finally:
        server.close()


def test_a_part_of_a_file_of_unknown_size_is_kept_to_resume_not_removed(tmp_path, capsys):
    import hashlib

    from test_bad_surfaces_seventy_fourth_pass import _raw_server

    from fasttl.data.fetch import REMOTES, partial_name

    expected = hashlib.sha256(_PAYLOAD).hexdigest()
    partial = tmp_path / partial_name(REMOTES["cifar10"], expected)
    partial.write_bytes(_PAYLOAD[:100])
    server = _raw_server(_part_reply(b"HTTP/1.1 206 Partial Content\r\n", b"bytes 100-499/*", _PAYLOAD[100:500]))
    code = _fetch_cli(server, tmp_path, expected)
    # before (N1): the checksum failed, the 500 correct bytes were removed and the 100 kept before were blamed
    assert code == 2 and one_line_error(capsys.readouterr().err) == (
        f"fasttl: error: fetch: the download of {server.url('/x')} stopped at 500 bytes (its reply held bytes 100 to "
        "499 of a file of unknown size, and they are not all of it); run the same command again to resume")
    assert partial.read_bytes() == _PAYLOAD[:500]


def test_a_part_that_ends_before_the_partial_is_said_and_leaves_it_whole(tmp_path):
    from test_bad_surfaces_seventy_fourth_pass import _raw_server, _refusal

    (tmp_path / "partial").write_bytes(_PAYLOAD[:600])
    server = _raw_server(_part_reply(b"HTTP/1.1 206 Partial Content\r\n", b"bytes 0-511/1024", _PAYLOAD[:512]))
    # before (N2): cut to 512 bytes, "run the same command again to resume", and the same at every rerun
    assert _refusal(server, tmp_path) == (
        f"fetch: {server.url('/x')} answered a resume from byte 600 with bytes 0 to 511 (HTTP 206), none of those "
        "asked for: it does not send the rest of the file; the partial download is kept (check the address, --url, "
        "or download the file another way)")
    assert (tmp_path / "partial").read_bytes() == _PAYLOAD[:600]


def test_ctrl_c_before_any_byte_leaves_no_empty_partial_to_resume(tmp_path, monkeypatch):
    from fasttl.data import fetch

    def interrupted(url, path, **options):  # the reply's headers came, its partial was opened, no byte yet
        open(path, "ab").close()
        raise KeyboardInterrupt

    monkeypatch.setattr(fetch, "download", interrupted)
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(KeyboardInterrupt):
        fetch._download_and_extract("cifar10", fetch.REMOTES["cifar10"], "http://127.0.0.1:9/x", "0" * 64, str(dest),
                                    False, lambda line: None, False, 60.0, 1.0)
    assert os.listdir(dest) == []  # before: an empty partial, and the next fetch said "resuming"


# ---- pass 89 (on 3e352e7: about 170 attempts on data fetch and extraction): 3 found --------------------------------
@pytest.mark.parametrize("body", ["cut early", "past its range"])
def test_a_part_of_unknown_size_that_does_not_fill_its_range_is_kept_to_resume(tmp_path, capsys, body):
    import hashlib

    from test_bad_surfaces_seventy_fourth_pass import _raw_server

    from fasttl.data.fetch import REMOTES, partial_name

    expected = hashlib.sha256(_PAYLOAD).hexdigest()
    partial = tmp_path / partial_name(REMOTES["cifar10"], expected)
    partial.write_bytes(_PAYLOAD[:100])
    if body == "cut early":  # no Content-Length, and the connection closes inside the range
        def reply(out):
            out.write(b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 100-499/*\r\n\r\n" + _PAYLOAD[100:300])
    else:  # a body longer than the range it names
        reply = _part_reply(b"HTTP/1.1 206 Partial Content\r\n", b"bytes 100-299/*", _PAYLOAD[100:600])
    server = _raw_server(reply)
    code = _fetch_cli(server, tmp_path, expected)
    last = 499 if body == "cut early" else 299
    # before (N1): kept only where the body ended exactly at the range's end; else removed, the 100 bytes blamed
    assert code == 2 and one_line_error(capsys.readouterr().err) == (
        f"fasttl: error: fetch: the download of {server.url('/x')} stopped at 300 bytes (its reply held bytes 100 to "
        f"{last} of a file of unknown size, and they are not all of it); run the same command again to resume")
    assert partial.read_bytes() == _PAYLOAD[:300]


def test_a_part_of_unknown_size_cut_short_names_no_file_size(tmp_path):
    from test_bad_surfaces_seventy_fourth_pass import _raw_server, _refusal

    (tmp_path / "partial").write_bytes(_PAYLOAD[:100])
    server = _raw_server(lambda out: out.write(b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 100-499/*\r\n"
                                               b"Content-Length: 400\r\n\r\n" + _PAYLOAD[100:300]))
    # before (N3): "stopped at 300 of 500 bytes", 500 being where that reply would end, not the file's size
    assert _refusal(server, tmp_path) == (f"fetch: the download of {server.url('/x')} stopped at 300 of ? bytes; run "
                                          "the same command again to resume")


@pytest.mark.parametrize("error", ["file size limit", "deep dest", "long member name"])
def test_an_extraction_stopped_by_the_users_limits_is_not_blamed_on_the_archive(tmp_path, monkeypatch, error):
    import errno
    import io
    import tarfile

    from fasttl.data import archive
    from fasttl.util.errors import DataError

    path = tmp_path / "a.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo("folder/a")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    dest = tmp_path / "dest"
    dest.mkdir()
    code = errno.EFBIG if error == "file size limit" else errno.ENAMETOOLONG
    name = "x" * 300 if error == "long member name" else "a"

    def failing(self, staging, *args, **kwargs):
        raise OSError(code, os.strerror(code), os.path.join(staging, "folder", name))

    monkeypatch.setattr(tarfile.TarFile, "extractall", failing)
    if error == "long member name":  # the archive's: said as the archive's
        with pytest.raises(DataError, match=r"cannot be extracted \(file name too long at 'folder/x+\.\.\.': its"):
            archive.extract(str(path), "folder", str(dest), source="http://127.0.0.1/a.tar.gz")
        return
    with pytest.raises(OSError) as caught:  # before (N2): "cannot be extracted (...: its members clash)", download gone
        archive.extract(str(path), "folder", str(dest), source="http://127.0.0.1/a.tar.gz")
    assert caught.value.errno == code and caught.value.filename == str(dest)


# ---- pass 88 (on 3e352e7: about 200 attempts on extract, caches, export, bench, file lists, the API): 2 found ------
@pytest.mark.parametrize("dtype", ["fp32", "int8"])
def test_a_shard_size_far_above_the_rows_reserves_only_what_comes(request, tmp_path, dtype):
    import zlib

    import numpy as np
    import torch

    import fasttl

    rng = np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))
    chunks = [rng.standard_normal((rows, 1280)).astype(np.float32) for rows in (3, 1, 7)]  # grown across chunks
    labels = np.arange(11) % 3
    cache = fasttl.FeatureCache.write(str(tmp_path / "c"), chunks, labels, classes=["a", "b", "c"], dtype=dtype,
                                      shard_rows=10 ** 8)  # before (N1): 256 GB reserved up front, a raw torch error
    reopened = fasttl.FeatureCache.open(str(tmp_path / "c"))
    assert len(reopened) == 11 and len(list((tmp_path / "c").glob("features-*.npy"))) == 1
    expected = torch.from_numpy(np.concatenate(chunks))
    got = reopened.gather(torch.arange(11))
    tolerance = 0.0 if dtype == "fp32" else float(expected.abs().max()) / 127  # int8: one step of its row's scale
    assert torch.allclose(got, expected, rtol=0, atol=tolerance) and cache is not None


def test_a_list_naming_a_missing_image_far_away_names_it_not_the_cache_folder(cat_ship, tmp_path, capsys,
                                                                               monkeypatch):
    monkeypatch.setenv("FASTTL_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("FASTTL_STATE_DIR", str(tmp_path / "state"))
    gone = tmp_path / "gone.jpg"  # the only listed path near the cache and state folders: missing
    rows = [f"{p},{p.parent.name}" for p in sorted((cat_ship / "train").rglob("*.jpg"))] + [f"{gone},cat"]
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "l.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    code, _, err = cli(capsys, "run", "--data", tmp_path / "lists" / "l.csv", "--image-size", "32", "--compare", "none",
                       "--no-progress", "--out", tmp_path / "run")  # (linear: the cache and its records are written)
    # before (N2): "the feature cache folder FASTTL_CACHE_DIR=... is inside the data folder", then FASTTL_STATE_DIR
    assert code == 2 and f"{gone}: cannot be read (it does not exist)" in one_line_error(err), err


def test_eval_says_which_images_it_left_out_as_predict_does(cat_ship, tmp_path, capsys):
    from conftest import one_epoch_run
    from fasttl.transfer.job import run

    data = tmp_path / "data"
    shutil.copytree(cat_ship, data)
    broken = data / "test" / "cat" / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not a whole jpeg")
    run(**one_epoch_run(data, tmp_path / "run", on_error="skip"))
    capsys.readouterr()
    code, out, err = cli(capsys, "eval", tmp_path / "run", "--no-progress")
    # before (an observation of pass 88): "(5 images of data)" with the left-out image said nowhere but the json
    assert code == 0 and f"skipped 1 image: {broken} (" in err, err


# ---- pass 91 (on 8b6358e: about 130 attempts on data fetch; pass 90, about 190 on the rest, found nothing): 2 found
def test_a_command_run_with_standard_output_closed_ends_cleanly(tmp_path):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "fasttl", "info"], stdout=None, stderr=subprocess.PIPE, text=True,
                            timeout=300, preexec_fn=lambda: os.close(1))  # `fasttl info >&-`
    # before (N1): its work done, then "AttributeError: 'NoneType' object has no attribute 'flush'", exit 1
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr


def test_a_mismatch_after_a_redirect_names_where_the_bytes_came_from(tmp_path, capsys):
    import hashlib

    from test_bad_surfaces_seventy_fourth_pass import _raw_server

    expected = hashlib.sha256(_PAYLOAD).hexdigest()
    source = _raw_server(_part_reply(b"HTTP/1.1 200 OK\r\n", None, bytes(reversed(_PAYLOAD))))
    hop = _raw_server(lambda out: out.write(b"HTTP/1.1 302 Found\r\nLocation: " + source.url("/file").encode()
                                            + b"\r\nContent-Length: 0\r\n\r\n"))
    try:
        code = _fetch_cli(hop, tmp_path, expected)
    finally:
        source.close()
    # before (N2): "fetch: <--url> gave a file ...", where every other message names "<source> (where <--url> ...)"
    assert code == 2 and one_line_error(capsys.readouterr().err).startswith(
        f"fasttl: error: fetch: {source.url('/file')} (where {hop.url('/x')} redirects) gave a file with SHA-256 ")
