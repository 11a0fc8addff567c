"""The forty-fourth hostile pass (about 150 attempts on fetch's transport and archives, output
escaping, OS errors, two processes at once, the speed record, labels and --budget on odd data;
about 139 held) found 11: `ulimit -n` 10 to 13 gave a traceback from DALI's import; a partial
download of another file (another --url or --sha256) was resumed into this one, then blamed on
--url / --sha256; --budget where nothing could be scored recorded every score as 0.0 and chose
three backbones side by side; a dangling --out link or a link loop was called a file (extract
named a sub-path); NFC and NFD twins were shown alike; a skip note blamed a speed record that
could not have been the cause; a speed record padded to 256 MB was read on every lookup and kept;
a per-process limit (ulimit -f, -n) was told to move the cache folder; predict of a run being
written said to --resume it; a 416 with a larger total, a gzip-encoded reply and a deadline after a
redirect were misnamed; `eval > /dev/full` said nothing was kept though eval_metrics.json was."""
import errno
import json
import os
import subprocess
import sys
import types
import unicodedata

import pytest

from conftest import cli, finished_run, link_in_the_way, one_line_error
from fasttl.util.errors import DataError
from test_fetch import _fetch, _partial, _sha, cifar_tarball, server  # noqa: F401 (fixtures)


# ---- F1: a process out of file descriptors -------------------------------------------------------------
def test_dali_out_of_file_descriptors_is_the_os_error(monkeypatch):
    import importlib

    from fasttl.cli_errors import os_error_line
    from fasttl.data import dali_pipeline

    def out_of_descriptors(name):
        raise ImportError("filesystem error: cannot increment recursive directory iterator: Too many open files")

    monkeypatch.setattr(importlib, "import_module", out_of_descriptors)
    with pytest.raises(OSError) as caught:
        dali_pipeline.dali_module("nvidia.dali.plugin.pytorch")
    assert caught.value.errno == errno.EMFILE
    assert os_error_line(caught.value).startswith("files: too many open files (raise the limit, e.g. ulimit -n")


def test_another_import_error_of_dali_is_left_as_it_is(monkeypatch):
    import importlib

    from fasttl.data import dali_pipeline

    monkeypatch.setattr(importlib, "import_module", lambda name: (_ for _ in ()).throw(ImportError("no libcuda")))
    with pytest.raises(ImportError, match="no libcuda"):
        dali_pipeline.dali_module("nvidia.dali")


# ---- F2 and F10: fetch --------------------------------------------------------------------------------
def test_a_partial_download_of_another_file_is_not_resumed(server, cifar_tarball, tmp_path, capsys):  # noqa: F811
    other = cifar_tarball[::-1]
    server.files["/other.tar.gz"] = other
    server.files["/c.tar.gz"] = cifar_tarball
    server.cut_after = 3000
    dest = tmp_path / "data"
    code, _, err = _fetch(capsys, "--url", server.url("/other.tar.gz"), "--sha256", _sha(other), "--dest", dest)
    assert code == 2 and "stopped at 3,000 of" in one_line_error(err)
    assert os.listdir(dest) == [_partial(other)]
    code, out, err = _fetch(capsys, "--url", server.url("/c.tar.gz"), "--sha256", _sha(cifar_tarball), "--dest", dest)
    assert code == 0, err
    assert server.ranges[-1] is None and "resuming" not in out  # the other file's bytes never head this one
    assert sorted(os.listdir(dest)) == ["cifar-10-batches-py"]  # the other partial dropped, this one extracted


def test_a_resumed_download_that_fails_its_check_says_it_was_resumed(server, cifar_tarball, tmp_path, capsys):  # noqa: F811
    server.files["/c.tar.gz"] = cifar_tarball
    dest = tmp_path / "data"
    dest.mkdir()
    (dest / _partial(cifar_tarball)).write_bytes(b"x" * 1000)  # (the file changed on the server since)
    code, _, err = _fetch(capsys, "--url", server.url("/c.tar.gz"), "--sha256", _sha(cifar_tarball), "--dest", dest)
    line = one_line_error(err)
    assert code == 2 and "(resumed from the 1,000 bytes an earlier fetch kept: the file may have changed on the " \
        "server since, or an earlier reply was broken)" in line, err
    assert os.listdir(dest) == []


def test_a_416_with_a_larger_file_drops_the_partial(server, cifar_tarball, tmp_path, capsys):  # noqa: F811
    server.files["/c.tar.gz"] = cifar_tarball
    dest = tmp_path / "data"
    dest.mkdir()
    partial = dest / _partial(cifar_tarball)
    partial.write_bytes(cifar_tarball + b"more than the server's file")
    have = len(cifar_tarball) + 27
    code, _, err = _fetch(capsys, "--url", server.url("/c.tar.gz"), "--sha256", _sha(cifar_tarball), "--dest", dest)
    assert code == 2 and one_line_error(err) == (
        f"fasttl: error: fetch: {server.url('/c.tar.gz')} refused to resume from {have:,} bytes (HTTP 416) and says "
        f"the file is {len(cifar_tarball):,} bytes: the partial download is not of this file (it changed on the "
        "server?); it was removed: run the same command again to download it whole"), err
    assert not partial.exists()
    code, _, err = _fetch(capsys, "--url", server.url("/c.tar.gz"), "--sha256", _sha(cifar_tarball), "--dest", dest)
    assert code == 0, err


def test_a_416_on_the_whole_file_is_still_complete(server, cifar_tarball, tmp_path, capsys):  # noqa: F811
    server.files["/c.tar.gz"] = cifar_tarball
    dest = tmp_path / "data"
    dest.mkdir()
    (dest / _partial(cifar_tarball)).write_bytes(cifar_tarball[:100])  # resumed, then the check passes below
    code, _, err = _fetch(capsys, "--url", server.url("/c.tar.gz"), "--sha256", _sha(cifar_tarball), "--dest", dest)
    assert code == 0 and server.ranges[-1] == "bytes=100-", err


def test_a_compressed_reply_is_named_where_the_checksum_fails(server, cifar_tarball, tmp_path, capsys):  # noqa: F811
    import gzip

    server.files["/c.tar.gz"] = gzip.compress(cifar_tarball)  # compressed again by the server
    server.extra_headers = {"Content-Encoding": "gzip"}
    dest = tmp_path / "data"
    code, _, err = _fetch(capsys, "--url", server.url("/c.tar.gz"), "--sha256", _sha(cifar_tarball), "--dest", dest)
    assert code == 2 and one_line_error(err).endswith(
        "(the server sent it with Content-Encoding: gzip, compressed again: use another address, or a server that "
        "sends the file as it is); the download was removed and nothing else touched (fetch again, or check --url / "
        "--sha256)"), err
    assert not dest.exists() or os.listdir(dest) == []


def test_a_redirect_loop_is_one_line_without_escaped_breaks(server, cifar_tarball, tmp_path, capsys):  # noqa: F811
    server.redirects["/loop"] = server.url("/loop")
    code, _, err = _fetch(capsys, "--url", server.url("/loop"), "--sha256", _sha(cifar_tarball), "--dest",
                          tmp_path / "data")
    line = one_line_error(err)
    assert code == 2 and line == (f"fasttl: error: fetch: {server.url('/loop')} redirects more than 10 times, or in a "
                                  f"loop (the last address asked, {server.url('/loop')}, answered HTTP 302 too); check "
                                  "the address (--url)")
    assert "\\n" not in line, line


def test_a_deadline_after_a_redirect_names_the_target_and_what_to_do():
    from fasttl.data.fetch_budget import Budget

    budget = Budget(15, 0, "http://a.example/x")
    nothing = str(budget.past_deadline(0, "https://b.example/y"))
    assert nothing == ("fetch: the download of https://b.example/y (where http://a.example/x redirects) took longer "
                       "than 15 s (--deadline) and stopped at 0 bytes; nothing arrived: check that the address "
                       "answers (--url), or give a longer --deadline")
    assert str(budget.past_deadline(10)).endswith("stopped at 10 bytes; run the same command again to resume")


# ---- F3: --budget where nothing could be scored -------------------------------------------------------
def test_a_candidate_nothing_scored_has_no_score():
    from fasttl.transfer import planner
    from fasttl.transfer.plan_candidates import UNSCORED, Candidate
    from fasttl.transfer.report import _score_cell

    bare = Candidate("efficientnet_lite0+efficientnet_lite1", 32, "test", "linear", 0.0, UNSCORED, 5.0, 1.0)
    assert bare.as_dict()["score"] is None and not bare.scored
    assert _score_cell(bare.as_dict()) == "n/a (none (no validation split))"
    assert _score_cell({"score": 0.5, "scored_by": "accuracy"}) == "0.5000 (accuracy)"
    plan = types.SimpleNamespace(smallest_class=1)
    plan.few_images = types.MethodType(planner.Planner.few_images, plan)
    assert planner.Planner._backbones_first(plan, bare) == 0  # nothing tuned: no head per backbone either


@pytest.fixture(scope="module")
def one_a_class(tmp_path_factory, cifar10_root):
    from conftest import cifar_subset

    return cifar_subset(cifar10_root, tmp_path_factory.mktemp("one") / "one", ["cat", "ship"], 1, 2)


def test_a_budget_where_nothing_scores_keeps_the_defaults(one_a_class, tmp_path, private_cache):
    from fasttl.transfer.job import run

    metrics = run(data=str(one_a_class), budget="10m", image_size=32, out=str(tmp_path / "run"), progress=False)
    plan = metrics["notes"]["plan"]
    assert all(c["score"] is None for c in plan["candidates"]) and plan["candidates"]
    assert plan["chosen"]["backbone"] == "efficientnet_lite0" and plan["more_backbones_first"] is False
    report = (tmp_path / "run" / "report.md").read_text()
    assert "n/a (none (no validation split))" in report and "come first" not in report
    assert "the choice is the defaults'" in report


# ---- F4: links where --out wants a folder --------------------------------------------------------------
@pytest.mark.parametrize("kind, said", [("dangling", "is a symbolic link to nothing (dangling)"),
                                        ("loop", "is a symbolic link loop")])
def test_an_out_link_is_named_for_what_it_is(cat_ship, tmp_path, capsys, private_cache, kind, said):
    link = link_in_the_way(tmp_path / "out", kind)
    code, _, err = cli(capsys, "run", "--data", cat_ship, "--strategy", "linear", "--image-size", "32",
                       "--compare", "none", "--out", link, "--no-progress")
    assert code == 2 and one_line_error(err) == f"fasttl: error: out: {link} {said}; pass another --out", err
    code, _, err = cli(capsys, "extract", "--data", cat_ship, "--out", link, "--image-size", "32")
    assert code == 2 and one_line_error(err).startswith(f"fasttl: error: out: {link} {said}; give a folder"), err
    assert not os.path.exists(tmp_path / "nowhere")


def test_not_a_folder_says_what_stands_there(tmp_path):
    from fasttl.util.path_problems import not_a_folder

    (tmp_path / "file").write_bytes(b"")
    os.symlink(tmp_path / "file", tmp_path / "to-file")
    assert not_a_folder(str(tmp_path / "file")) == "is a file, not a folder"
    assert not_a_folder(str(tmp_path / "to-file")) == "is a symbolic link to a file, not a folder"
    assert not_a_folder(str(tmp_path / "none")) == "does not exist"


# ---- F5: one name in two Unicode forms -----------------------------------------------------------------
def test_unicode_twins_are_shown_apart_with_their_lines(tmp_path):
    from fasttl.data.labels import read_classes_file

    nfc, nfd = unicodedata.normalize("NFC", "caf\u00e9"), unicodedata.normalize("NFD", "caf\u00e9")
    (tmp_path / "classes.txt").write_text(f"cat\nship\ndog\n{nfd}\n{nfc}\n")
    with pytest.raises(DataError) as caught:
        read_classes_file(str(tmp_path / "classes.txt"))
    assert str(caught.value) == (f"classes: {tmp_path / 'classes.txt'} names 'cafe\\u0301' (NFD, line 4) and "
                                 "'caf\\xe9' (NFC, line 5): one name written in two Unicode forms; write it one way")


def test_unicode_twin_folders_are_shown_apart(tmp_path):
    from fasttl.data.labels import refuse_lookalikes

    nfc, nfd = unicodedata.normalize("NFC", "caf\u00e9"), unicodedata.normalize("NFD", "caf\u00e9")
    with pytest.raises(DataError) as caught:
        refuse_lookalikes([nfc, "ship", nfd], "data: root has class folders")
    assert str(caught.value) == ("data: root has class folders 'caf\\xe9' (NFC) and 'cafe\\u0301' (NFD): one name "
                                 "written in two Unicode forms; write it one way")
    refuse_lookalikes(["cat", "cat"], "data:")  # the same name twice is the duplicate check's to name


# ---- F6: the speed record named only where it was the reason ----------------------------------------------
@pytest.mark.parametrize("recorded, leaves, blamed", [
    (1e6, lambda seconds: False, False),          # nothing fits at any speed: not the record's doing
    (1.0, lambda seconds: seconds < 10, True),    # 240 s at the record's speed, 4.8 s without it
    (1.0, lambda seconds: seconds < 1, False),    # too slow even without the record
])
def test_the_speed_record_is_blamed_only_where_it_tipped_the_plan(recorded, leaves, blamed):
    from fasttl.transfer.planner import Planner

    plan = types.SimpleNamespace(screened=[types.SimpleNamespace(speeds=[100.0], image_size=32)], candidates=[],
                                 record_used=False, _leaves_time=leaves, _probe_images=lambda: 240,
                                 _expected_speed=lambda backbone, size: (recorded, True))
    plan._unrecorded_speed = types.MethodType(Planner._unrecorded_speed, plan)
    assert Planner._may_screen(plan, "efficientnet_lite1", 32) == (False, blamed)
    assert plan.record_used is blamed


# ---- F7: a speed record past its size -----------------------------------------------------------------
def test_a_huge_speed_record_is_damage_and_not_kept(tmp_path, monkeypatch):
    from fasttl.transfer import budget

    monkeypatch.setenv("FASTTL_STATE_DIR", str(tmp_path))
    key = budget.speed_key("efficientnet_lite0", 32, "pooled", "torch", "fp32", "cpu")
    budget.record_speed(key, 500, 1.0)
    record = json.loads((tmp_path / budget.SPEED_FILE).read_text())
    record["junk"] = {"k": "x" * budget.MAX_RECORD_BYTES}
    (tmp_path / budget.SPEED_FILE).write_text(json.dumps(record))
    assert budget.measured_speed(key) is None  # past the record's size: measured again
    budget.record_speed(key, 600, 1.0)
    assert budget.measured_speed(key) == 600.0
    assert os.path.getsize(tmp_path / budget.SPEED_FILE) < 1000
    record = json.loads((tmp_path / budget.SPEED_FILE).read_text())
    record["junk"] = {"k": "x"}  # small, but no machine's: dropped by the next rewrite
    (tmp_path / budget.SPEED_FILE).write_text(json.dumps(record))
    budget.record_speed(key, 700, 1.0)
    assert "junk" not in json.loads((tmp_path / budget.SPEED_FILE).read_text())


# ---- F8: a per-process limit is no fault of the cache folder ---------------------------------------------
@pytest.mark.parametrize("code, moved", [(errno.EFBIG, False), (errno.EMFILE, False), (errno.EACCES, True),
                                         (errno.ENOSPC, True)])
def test_only_a_folders_fault_says_to_move_the_cache(tmp_path, monkeypatch, code, moved):
    from fasttl.cli_errors import os_error_line

    monkeypatch.setenv("FASTTL_CACHE_DIR", str(tmp_path))
    line = os_error_line(OSError(code, os.strerror(code), str(tmp_path / "c" / "features-00000.npy")))
    assert ("set FASTTL_CACHE_DIR to a folder you can write" in line) is moved, line
    assert line.startswith(f"{tmp_path / 'c' / 'features-00000.npy'}: ")


# ---- F9 and F11: a run being written; eval's summary to a full disk ---------------------------------------
@pytest.fixture(scope="module")
def linear_run(cat_ship, tmp_path_factory):
    return finished_run(cat_ship, tmp_path_factory, "linear-run", strategy="linear", epochs=None)


def test_predict_of_a_run_being_written_says_to_wait(linear_run, tmp_path):
    import shutil

    from fasttl.transfer.rundir import RunError, RunLock, load_trained

    copy = tmp_path / "run"
    shutil.copytree(linear_run, copy)
    (copy / "metrics.json").unlink()
    with RunLock(str(copy)):
        with pytest.raises(RunError) as caught:
            load_trained(str(copy), "cpu")
    assert str(caught.value) == f"{copy}: a fasttl run (pid {os.getpid()}) is writing it now; wait for it to finish"
    with pytest.raises(RunError, match="the run did not finish"):  # nobody writes it: it did not finish
        load_trained(str(copy), "cpu")


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_eval_to_a_full_stdout_says_the_metrics_were_written(linear_run, cat_ship, tmp_path):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(linear_run, copy)
    with open("/dev/full", "w") as full:
        result = subprocess.run([sys.executable, "-m", "fasttl", "eval", str(copy), "--data", str(cat_ship),
                                 "--no-progress"], stdout=full,
                                stderr=subprocess.PIPE, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"fasttl: error: standard output: no space left on the device (free some, or write elsewhere); the metrics "
        f"were written to {copy / 'eval_metrics.json'}, only this summary was not printed"]
    assert json.loads((copy / "eval_metrics.json").read_text())["samples"] == 6
