"""The fifty-second hostile pass (about 195 attempts, about 185 held; pass 51's fixes held) found 5:
a '..' after a linked folder was resolved as text, where the kernel goes up from the link's target
(predict read another image, eval and extract another data set, --out --overwrite replaced another
file); predict's walk blamed a folder below the one that can't be entered; "remove it" was still
the advice for a link loop on the way, a name too long and a file one may not read; a predict --out
that failed at its final write dropped every prediction; fetch --dest of an existing folder one
may not write in downloaded first and refused after."""
import os
import shutil
import subprocess
import sys

import pytest

from conftest import cat_ship, cli, finished_run, one_line_error  # noqa: F401 (cat_ship: a fixture)
from test_read_only_folders import _bound_by_permissions, fasttl

WRITE = "permission denied, fasttl can't make files in this folder (make it writable to you, or use another path)"


@pytest.fixture(scope="module")
def linear_run(cat_ship, tmp_path_factory):  # noqa: F811
    return finished_run(cat_ship, tmp_path_factory, "linear52", strategy="linear", epochs=None)


@pytest.fixture
def linked(tmp_path):
    """tmp/a/lk -> ../b/in: for the kernel, a/lk/.. is b, where abspath's text says a."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b" / "in").mkdir(parents=True)
    (tmp_path / "a" / "lk").symlink_to(os.path.join("..", "b", "in"))
    return tmp_path


# ---- N1: '..' after a link, as the kernel reads it -----------------------------------------------------
def test_absolute_goes_up_from_a_links_target_and_keeps_the_last_part(linked):
    from fasttl.util.files import absolute

    b = os.path.realpath(linked / "b")
    assert absolute(linked / "a" / "lk" / ".." / "x.jpg") == os.path.join(b, "x.jpg")  # before: .../a/x.jpg
    assert absolute(linked / "a" / "lk" / "..") == b
    assert absolute(str(linked / "a" / "lk")) == str(linked / "a" / "lk")  # no '..': the link stays a link
    assert absolute(str(linked / "b" / ".." / "a" / "lk")) == os.path.join(os.path.realpath(linked / "a"), "lk")


def test_predict_reads_the_image_the_path_names(linear_run, cat_ship, linked, capsys):  # noqa: F811
    (linked / "a" / "x.jpg").write_bytes(b"\xff\xd8\xff\xe0 not an image")  # what the text would name
    shutil.copy(next((cat_ship / "test" / "cat").glob("*.jpg")), linked / "b" / "x.jpg")  # what the kernel names
    given = linked / "a" / "lk" / ".." / "x.jpg"
    code, out, err = cli(capsys, "predict", "--run", linear_run, given)
    # before: a/x.jpg read ("cannot be read as an image"), another image than the one at that path
    assert code == 0, err
    assert out.splitlines()[1].startswith(f"{given},")


def test_a_data_folder_after_a_link_is_the_kernels(cat_ship, linked):  # noqa: F811
    from fasttl.data.formats.folder import class_folder_splits

    shutil.copytree(cat_ship, linked / "b" / "d")
    train, test = class_folder_splits(str(linked / "a" / "lk" / ".." / "d"))
    # before: "data: .../a/d does not exist" (or another data set kept there)
    assert len(train) == 12 and len(test) == 6
    assert all(path.startswith(os.path.realpath(linked / "b" / "d")) for path in train.files + test.files)


def test_an_output_after_a_link_is_the_one_the_path_names(linked):
    from fasttl.util.checks import check_output_path

    (linked / "a" / "p.csv").write_text("keep")
    # before: .../a/p.csv, replaced under --overwrite
    assert check_output_path(str(linked / "a" / "lk" / ".." / "p.csv"), True) == \
        os.path.join(os.path.realpath(linked / "b"), "p.csv")


# ---- N2: predict's walk names the folder that can't be entered --------------------------------------------
def test_predicts_walk_below_a_closed_folder_names_it(cat_ship, tmp_path):  # noqa: F811
    data = tmp_path / "data"
    shutil.copytree(cat_ship / "test", data)
    os.chmod(data, 0o600)  # listed (its class folders are seen), never entered
    try:
        walk = "import sys\nfrom fasttl.predict import image_files\ntry:\n image_files([sys.argv[1]])\n" \
            "except Exception as exc:\n print(exc)"
        result = subprocess.run(_bound_by_permissions() + [sys.executable, "-c", walk, str(data)],
                                capture_output=True, text=True, timeout=120)
    finally:
        os.chmod(data, 0o755)
    # before: ".../data/cat: cannot list this folder (Permission denied); check its permissions" (cat is 755)
    assert result.stdout.strip() == f"{data / 'cat'} can't be reached: {data} can't be entered (permission denied; " \
        "make it accessible to you)", result.stderr


# ---- N3: advice that can be followed ---------------------------------------------------------------------
def test_a_link_loop_or_a_name_too_long_on_the_way_is_a_path_to_fix(tmp_path):
    from fasttl.data.images import header_problem, skip_hint

    (tmp_path / "loop.jpg").symlink_to("loop.jpg")
    for path, problem, advice in [
            (tmp_path / "loop.jpg" / "x.jpg", f"cannot be read ({tmp_path / 'loop.jpg'} is a symbolic link loop)",
             "fix the path"),
            (tmp_path / ("a" * 300 + ".jpg"), "cannot be read (its path, or a name in it, is too long for the file "
                                              "system)", "give a shorter path (move the file up, or rename folders)")]:
        # before: "Too many levels of symbolic links" and "File name too long", each with "remove it"
        assert header_problem(str(path)) == problem
        assert skip_hint(problem).startswith(f"{advice}, or leave unreadable files out")


# ---- N4: a write that fails after the work keeps the predictions -------------------------------------------
def test_predictions_are_shown_when_out_fails_at_the_end(linear_run, cat_ship, tmp_path, capsys,  # noqa: F811
                                                          monkeypatch):
    import errno

    from fasttl.util import files

    def disk_full(path, data, replace=True):
        raise OSError(errno.ENOSPC, "No space left on device", path)

    monkeypatch.setattr(files, "write_atomic", disk_full)
    code, out, err = cli(capsys, "predict", "--run", linear_run, cat_ship / "test", "--out", tmp_path / "p.csv")
    # before: exit 2 with nothing on standard output (every prediction dropped)
    assert code == 2 and len(out.splitlines()) == 1 + 6 and out.startswith("path,")
    assert one_line_error(err) == (f"fasttl: error: {tmp_path / 'p.csv'}: no space left on the device (free some, "
                                   "or write elsewhere); nothing half-written was kept; the predictions go to "
                                   "standard output instead, not saved")
    from fasttl.predict import predict_run

    result = predict_run(linear_run, [str(cat_ship / "test")], out=str(tmp_path / "p.csv"), progress=False)
    assert result["out"] is None and result["not_written"].endswith("nothing half-written was kept")
    assert not (tmp_path / "p.csv").exists()


# ---- N5: fetch into a folder it can't write in is refused before the download ------------------------------
def test_fetch_into_a_folder_it_cannot_write_is_refused_before_downloading(tmp_path):
    folder = tmp_path / "d555"
    folder.mkdir()
    os.chmod(folder, 0o555)
    try:  # nothing listens on port 9: a download would be a connection error
        code, _, err = fasttl(tmp_path, "data", "fetch", "cifar10", "--url", "http://127.0.0.1:9/c.tgz", "--sha256",
                              "0" * 64, "--dest", folder, "--no-progress")
    finally:
        os.chmod(folder, 0o755)
    # before: "downloading ...", then the refusal after the whole archive (here: a connection error)
    assert code == 2 and one_line_error(err) == f"fasttl: error: dest: {folder}: {WRITE}"
