"""The fifty-first hostile pass (about 200 attempts, about 193 held; every fix of pass 50 held) found
3: an image behind a folder one may not enter (a list's row, a class folder at mode 600) was to be
"removed", which that folder forbids too, where the folder is what to fix; a row whose path runs
through a file ("plain.jpg/x.jpg") was to be "removed", where there is nothing to remove; predict
--out, export --out and bench --json into a folder one may not write in were refused only after
all the work (the predictions computed, then dropped)."""
import os
import shutil

import pytest

from conftest import cat_ship, finished_run, one_line_error  # noqa: F401 (cat_ship: a fixture)
from test_read_only_folders import fasttl

ENTER = "can't be entered (permission denied; make it accessible to you)"
WRITE = "permission denied, fasttl can't make files in this folder (make it writable to you, or use another path)"


@pytest.fixture(scope="module")
def linear_run(cat_ship, tmp_path_factory):  # noqa: F811
    return finished_run(cat_ship, tmp_path_factory, "linear51", strategy="linear", epochs=None)


def _list_with(tmp_path, cat_ship, row: str):  # noqa: F811
    """A file list of cat_ship's test images, and one more row naming `row` as a cat."""
    rows = [f"{path},{path.parent.name}" for path in sorted((cat_ship / "test").glob("*/*.jpg"))]
    listed = tmp_path / "list.csv"
    listed.write_text("path,label\n" + "\n".join(rows + [f"{row},cat"]) + "\n")
    return listed


# ---- F1: an image behind a folder one may not enter names that folder -------------------------------------
@pytest.mark.parametrize("where", ["mode 600", "mode 000", "three folders up", "through a link"])
def test_a_listed_image_behind_a_closed_folder_names_the_folder(cat_ship, tmp_path, where):  # noqa: F811
    closed = tmp_path / "closed"
    image = closed / ("h/x/a.jpg" if where == "three folders up" else "a.jpg")
    image.parent.mkdir(parents=True)
    shutil.copy(next((cat_ship / "test" / "cat").glob("*.jpg")), image)
    row = image
    if where == "through a link":
        row = closed.parent / "links" / "linked.jpg"
        row.parent.mkdir()
        row.symlink_to(image)
    listed = _list_with(tmp_path, cat_ship, str(row))
    os.chmod(closed, 0 if where == "mode 000" else 0o600)
    try:
        code, _, err = fasttl(tmp_path, "extract", "--data", listed, "--out", tmp_path / "cache", "--image-size",
                              "32", "--no-progress")
    finally:
        os.chmod(closed, 0o755)
    # before: "<row>: cannot be read (Permission denied); remove it, ..." (the folder forbids that too)
    assert code == 2 and one_line_error(err) == (
        f"fasttl: error: {row}: cannot be read (the folder {closed} can't be entered: permission denied); make that "
        "folder accessible to you, or leave unreadable files out: --on-error skip (fasttl run, extract, eval, "
        "predict), fasttl.data.screen(source, on_error='skip') in Python")


def test_a_class_folder_one_may_not_enter_is_named_by_predict(linear_run, cat_ship, tmp_path):  # noqa: F811
    data = tmp_path / "data"
    shutil.copytree(cat_ship / "test", data)
    os.chmod(data / "cat", 0o600)  # listed (read), never entered
    try:
        code, out, err = fasttl(tmp_path, "predict", "--run", linear_run, data)
    finally:
        os.chmod(data / "cat", 0o755)
    first = sorted(os.listdir(data / "cat"))[0]
    # before: ".../cat/<first>.jpg: cannot be read (Permission denied); remove it, ..."
    assert code == 2 and out == "" and one_line_error(err).startswith(
        f"fasttl: error: {data / 'cat' / first}: cannot be read (the folder {data / 'cat'} can't be entered: "
        "permission denied); make that folder accessible to you, or leave")


# ---- F2: a row whose path runs through a file is a wrong path -------------------------------------------
def test_a_path_through_a_file_is_a_wrong_path_not_a_file_to_remove(cat_ship, tmp_path):  # noqa: F811
    from fasttl.data.dali_pipeline import SampleBatches
    from fasttl.data.sources import FileSource, screen
    from fasttl.util.errors import DataError

    plain = tmp_path / "plain.jpg"
    shutil.copy(next((cat_ship / "test" / "cat").glob("*.jpg")), plain)
    source = FileSource([str(plain / "x.jpg")], [0], ["cat"], str(tmp_path))
    for read in (lambda: screen(source, "fail"), lambda: SampleBatches(source, [0], 1)._sample(0)):
        with pytest.raises(DataError) as caught:
            read()
        # before: "cannot be read (Not a directory); remove it, ..." (nothing there to remove)
        assert str(caught.value).startswith(f"{plain / 'x.jpg'}: cannot be read ({plain} is a file, not a folder); "
                                            "fix the path, or leave unreadable files out")


def test_a_missing_file_read_by_dali_says_so_as_screening_does(tmp_path):
    from fasttl.data.dali_pipeline import SampleBatches
    from fasttl.data.sources import FileSource

    gone = tmp_path / "gone.jpg"
    with pytest.raises(Exception) as caught:
        SampleBatches(FileSource([str(gone)], [0], ["cat"], str(tmp_path)), [0], 1)._sample(0)
    assert str(caught.value).startswith(f"{gone}: cannot be read (it does not exist); no file is there now")


# ---- F3: an output folder one may not write in is refused before the work ------------------------------
@pytest.mark.parametrize("mode, said", [(0o555, WRITE), (0o600, ENTER)])
def test_predict_into_a_folder_it_cannot_write_is_refused_before_reading_images(linear_run, cat_ship, tmp_path,  # noqa: F811
                                                                                 mode, said):
    data = tmp_path / "data"
    shutil.copytree(cat_ship / "test", data)
    (data / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0garbage")  # would stop any reading of the images
    folder = tmp_path / "out"
    folder.mkdir()
    os.chmod(folder, mode)
    try:
        code, out, err = fasttl(tmp_path, "predict", "--run", linear_run, data, "--out", folder / "p.csv")
    finally:
        os.chmod(folder, 0o755)
    # before: every image read (here: the broken one named), then "permission denied" at the write
    assert code == 2 and out == "" and one_line_error(err) == f"fasttl: error: out: {folder}: {said}"
    assert os.listdir(folder) == []


@pytest.mark.parametrize("command", ["export", "bench"])
def test_export_and_bench_into_a_folder_they_cannot_write_are_refused_first(linear_run, tmp_path, command):  # noqa: F811
    folder = tmp_path / "ro"
    folder.mkdir()
    os.chmod(folder, 0o555)
    run = tmp_path / "run"
    shutil.copytree(linear_run, run)
    (run / "head.safetensors").write_bytes(b"not weights")  # would stop the export once it began
    words = ["export", run, "--out", folder / "m.onnx"] if command == "export" else \
        ["bench", "distill", "--quick", "--json", folder / "b.json"]
    try:
        code, out, err = fasttl(tmp_path, *words)
    finally:
        os.chmod(folder, 0o755)
    # before: the whole export (and its ONNX Runtime check) or benchmark ran, then the write was refused
    flag = "out" if command == "export" else "json"  # which output, where --json and --plot share a folder
    assert code == 2 and out == "" and one_line_error(err) == f"fasttl: error: {flag}: {folder}: {WRITE}"
    assert os.listdir(folder) == []

# (a folder one may write in and enter but not list, mode 311, still takes the file: pass 50's tests)


# ---- beside F3: a file system that can't sync a folder ---------------------------------------------------
@pytest.mark.parametrize("code", ["EINVAL", "ENOTSUP"])
def test_a_folder_sync_the_file_system_does_not_offer_is_no_failed_write(tmp_path, monkeypatch, code):
    import errno
    import stat

    from fasttl.util import files

    real = os.fsync

    def no_folder_sync(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)))
        real(fd)

    monkeypatch.setattr(os, "fsync", no_folder_sync)
    # before: the file renamed into place, then the write reported failed
    files.write_atomic(str(tmp_path / "p.csv"), b"a,b\n")
    assert (tmp_path / "p.csv").read_bytes() == b"a,b\n" and os.listdir(tmp_path) == ["p.csv"]


def test_a_folder_sync_that_fails_for_the_disk_is_still_said(tmp_path, monkeypatch):
    import errno
    import stat

    from fasttl.util import files

    real = os.fsync

    def broken_disk(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EIO, "Input/output error")
        real(fd)

    monkeypatch.setattr(os, "fsync", broken_disk)
    with pytest.raises(OSError) as caught:
        files.write_atomic(str(tmp_path / "p.csv"), b"a,b\n")
    assert caught.value.errno == errno.EIO
