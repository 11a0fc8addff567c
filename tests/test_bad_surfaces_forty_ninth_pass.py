"""The forty-ninth hostile pass (about 165 attempts, about 160 held; every fix of pass 48 held)
found 4: `eval --data` never said what its scan passed over; an output under a folder one may not
enter (mode 600 or 000) was "can't make files in this folder (make it writable)", where the folder
lacked the permission to enter it; extract's "passed over" line went to standard output, lost with
the summary on a full one; an image removed while predict read the folders was to be "removed"."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import cat_ship, cli, finished_run, one_line_error  # noqa: F401 (cat_ship: a fixture)
from test_read_only_folders import fasttl

ENTER = "can't be entered (permission denied; make it accessible to you)"


@pytest.fixture(scope="module")
def linear_run(cat_ship, tmp_path_factory):  # noqa: F811
    return finished_run(cat_ship, tmp_path_factory, "linear49", strategy="linear", epochs=None)


# ---- N1: eval says what its scan passed over, and records it ----------------------------------------------
def test_eval_says_and_records_what_it_passed_over(linear_run, cat_ship, tmp_path, capsys):  # noqa: F811
    run = tmp_path / "run"
    shutil.copytree(linear_run, run)
    data = tmp_path / "data"
    shutil.copytree(cat_ship, data)
    (data / "test" / "cat" / "more").mkdir()
    shutil.copy(next((data / "test" / "cat").glob("*.jpg")), data / "test" / "cat" / "more" / "x.jpg")
    code, out, err = cli(capsys, "eval", run, "--data", data, "--no-progress")
    assert code == 0, err
    # before: nothing said, nothing recorded (a folder of test images unread, exit 0)
    assert err.strip() == "passed over 1 entry of the data folder: test/cat/more (a folder inside a class folder " \
        "(not scanned))"
    recorded = json.loads((run / "eval_metrics.json").read_text())["ignored"]
    assert recorded == [{"path": "test/cat/more", "reason": "a folder inside a class folder (not scanned)"}]


# ---- N2: an output behind a folder one may not enter names that folder -----------------------------------
@pytest.mark.parametrize("mode", [0o600, 0])
@pytest.mark.parametrize("command", ["run", "predict", "export"])
def test_an_output_behind_a_closed_folder_names_it(linear_run, cat_ship, tmp_path, mode, command):  # noqa: F811
    closed = tmp_path / "closed"
    closed.mkdir()
    os.chmod(closed, mode)
    words = {"run": ["run", "--data", cat_ship, "--out", closed / "a" / "run", "--strategy", "scratch", "--epochs",
                     "1", "--image-size", "32", "--compare", "none", "--no-progress"],
             "predict": ["predict", "--run", linear_run, cat_ship / "test", "--out", closed / "p.csv"],
             "export": ["export", linear_run, "--out", closed / "m.onnx"]}[command]
    try:
        code, _, err = fasttl(tmp_path, *words)
    finally:
        os.chmod(closed, 0o755)
    # before: "permission denied, fasttl can't make files in this folder (make it writable to you, ...)"
    # (pass 54: an output file refused up front names its option; session 31: run's --out folder is checked up front
    # too, by path_problems.output_folder_problem)
    said = f"out: {closed / 'a' / 'run'} can't be reached: {closed} {ENTER}" if command == "run" else \
        f"out: {closed}: {ENTER}"
    assert code == 2 and one_line_error(err) == f"fasttl: error: {said}"
    assert os.listdir(closed) == []


def test_a_read_only_folder_still_says_make_it_writable(linear_run, cat_ship, tmp_path):  # noqa: F811
    folder = tmp_path / "ro"
    folder.mkdir()
    os.chmod(folder, 0o555)
    try:
        code, _, err = fasttl(tmp_path, "predict", "--run", linear_run, cat_ship / "test", "--out", folder / "p.csv")
    finally:
        os.chmod(folder, 0o755)
    assert code == 2 and one_line_error(err) == (f"fasttl: error: out: {folder}: permission denied, fasttl can't make "
                                                 "files in this folder (make it writable to you, or use another path)")


# ---- N3: extract's "passed over" survives a full standard output ------------------------------------------
@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_extracts_passed_over_line_survives_a_full_stdout(cat_ship, tmp_path):  # noqa: F811
    data = tmp_path / "data"
    shutil.copytree(cat_ship, data)
    (data / "train" / "notes.txt").write_text("mine")
    with open("/dev/full", "w") as full:
        result = subprocess.run([sys.executable, "-m", "fasttl", "extract", "--data", str(data), "--out",
                                 str(tmp_path / "c"), "--image-size", "32", "--no-progress"], stdout=full,
                                stderr=subprocess.PIPE, text=True, timeout=600,
                                env=dict(os.environ, FASTTL_CACHE_DIR=str(tmp_path / "fc")))
    lines = result.stderr.strip().splitlines()
    # before: the line went to standard output with the summary, and was lost with it
    assert result.returncode == 2 and lines[0] == "passed over 1 entry of the data folder: train/notes.txt (not in " \
        "a class folder)"
    assert lines[-1].startswith("fasttl: error: standard output: no space left on the device")


# ---- N4: an image removed while it was being read ----------------------------------------------------------
@pytest.mark.parametrize("problem, advice", [
    ("cannot be read (it does not exist)", "no file is there now (a wrong path or link, or removed since fasttl "
                                           "listed it): fix the path, or run again once the folders hold still, or "
                                           "leave unreadable files out"),
    ("cannot be read ([Errno 2] No such file or directory: 'x.jpg')", "no file is there now"),
    ("cannot be read (Permission denied)", "make it readable to you, or leave unreadable files out"),  # (pass 52)
])
def test_the_advice_for_an_unreadable_image_fits_why(problem, advice):
    from fasttl.data.images import skip_hint

    assert skip_hint(problem).startswith(advice)


def test_an_image_removed_before_it_is_read_is_not_to_be_removed(tmp_path):
    from fasttl.data.sources import FileSource, screen
    from fasttl.util.errors import DataError

    gone = str(tmp_path / "gone.jpg")  # listed, then removed (as by another process during the walk)
    with pytest.raises(DataError) as caught:
        screen(FileSource([gone], [0], ["a"], str(tmp_path)), "fail")
    # before: "...; remove it, or leave unreadable files out"
    assert str(caught.value).startswith(f"{gone}: cannot be read (") and "no file is there now (a wrong path or " \
        "link, or removed since fasttl listed it)" in str(caught.value)


# ---- pass 50 -------------------------------------------------------------------------------------------------
# R1: a folder one may write and enter but not list (mode 311) takes a file: the write succeeded
@pytest.mark.parametrize("command", ["predict", "export"])
def test_an_output_into_a_folder_one_may_not_list_is_written_and_says_so(linear_run, cat_ship, tmp_path,  # noqa: F811
                                                                         command):
    folder = tmp_path / "blind"
    folder.mkdir()
    out = folder / ("p.csv" if command == "predict" else "m.onnx")
    os.chmod(folder, 0o311)
    words = ["predict", "--run", linear_run, cat_ship / "test", "--out", out] if command == "predict" else \
        ["export", linear_run, "--out", out]
    try:
        code, _, err = fasttl(tmp_path, *words)
    finally:
        os.chmod(folder, 0o755)
    # before: the file written, then exit 2 "permission denied" (syncing the folder it could not list)
    assert code == 0, err
    assert out.stat().st_size > 0 and [p for p in os.listdir(folder) if p.startswith(".fasttl")] == []


# R2: an output two folders below a closed one names it, never "does not exist"
@pytest.mark.parametrize("through_link", [False, True])
def test_an_output_deep_below_a_closed_folder_names_it(linear_run, cat_ship, tmp_path, through_link):  # noqa: F811
    closed = tmp_path / "closed"
    (closed / "a" / "b").mkdir(parents=True)
    parent = closed / "a" / "b"
    if through_link:
        (tmp_path / "link").symlink_to(closed / "a")
        parent = tmp_path / "link" / "b"
    os.chmod(closed, 0)
    try:
        code, _, err = fasttl(tmp_path, "predict", "--run", linear_run, cat_ship / "test", "--out", parent / "p.csv")
    finally:
        os.chmod(closed, 0o755)
    # before: "out: .../closed/a/b does not exist", or "is a symbolic link to nothing (dangling)"
    assert code == 2 and one_line_error(err) == f"fasttl: error: out: {parent} can't be reached: {closed} {ENTER}"
