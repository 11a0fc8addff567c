"""Folders and files the user can't write or read, for real: the CLI runs in a process that the
permission bits bind (as root, one without the capability that overrides them). Each refusal is
one line naming the user's folder or file, never a name fasttl was making in it; what can be done
read-only (predict, eval of a read-only run, a read-only feature cache that holds the features) is
done."""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys

import pytest

from conftest import cat_ship, cli, finished_run, one_line_error  # noqa: F401 (cat_ship: a fixture)

# As root the permission bits bind only without these capabilities (setpriv drops them from the
# bounding set, so the command's root has none of them).
UNPRIVILEGED = ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner"]


def _bound_by_permissions() -> list:
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: permission bits would not bind")
    probe = subprocess.run(UNPRIVILEGED + ["true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"setpriv can't drop capabilities here: {probe.stderr.decode(errors='replace').strip()}")
    return UNPRIVILEGED


def fasttl(tmp_path, *words, env=None):
    """(exit code, stdout, stderr) of `fasttl WORDS...` in a process bound by permission bits."""
    env = dict(os.environ, FASTTL_CACHE_DIR=str(tmp_path / "feature-cache"), **(env or {}))
    result = subprocess.run(_bound_by_permissions() + [sys.executable, "-m", "fasttl", *map(str, words)],
                            capture_output=True, text=True, env=env, timeout=600)
    return result.returncode, result.stdout, result.stderr


def read_only(path):
    """`path` and everything in it made read-only (restored by `writable`)."""
    for root, folders, names in os.walk(path):
        for name in names:
            os.chmod(os.path.join(root, name), 0o444)
        os.chmod(root, 0o555)
    return path


def writable(path):
    for root, folders, names in os.walk(path):
        os.chmod(root, 0o755)
        for name in names:
            os.chmod(os.path.join(root, name), 0o644)


@pytest.fixture(scope="module")
def scratch_run(cat_ship, tmp_path_factory):  # noqa: F811
    return finished_run(cat_ship, tmp_path_factory, "read-only-run")


@pytest.fixture
def locked_folder(tmp_path):
    folder = tmp_path / "locked"
    folder.mkdir()
    read_only(folder)
    yield folder
    writable(folder)


@pytest.mark.parametrize("out", ["locked", "locked/new-run"])
def test_a_run_into_a_folder_it_cannot_write_names_that_folder(cat_ship, tmp_path, locked_folder, out):  # noqa: F811
    code, _, err = fasttl(tmp_path, "run", "--data", cat_ship, "--out", tmp_path / out, "--strategy", "scratch",
                          "--epochs", "1", "--image-size", "32", "--compare", "none", "--no-progress")
    # before: an existing read-only --out was blamed as its .fasttl-run.lock, a name fasttl makes
    assert code == 2 and one_line_error(err) == (f"fasttl: error: {locked_folder}: permission denied, fasttl can't "
                                                 "make files in this folder (make it writable to you, or use another "
                                                 "path)")
    assert os.listdir(locked_folder) == []


def test_predictions_into_a_folder_it_cannot_write_name_that_folder(scratch_run, cat_ship, tmp_path,  # noqa: F811
                                                                    locked_folder):
    code, out, err = fasttl(tmp_path, "predict", "--run", scratch_run, cat_ship / "test", "--out",
                            locked_folder / "predictions.csv")
    assert code == 2 and one_line_error(err).startswith(f"fasttl: error: out: {locked_folder}: permission denied, "
                                                        "fasttl")
    assert os.listdir(locked_folder) == [] and out == ""


def test_a_read_only_run_is_predicted_and_evaluated(scratch_run, cat_ship, tmp_path, capsys):  # noqa: F811
    code, writable_out, _ = cli(capsys, "predict", "--run", scratch_run, cat_ship / "test")
    assert code == 0 and len(writable_out.splitlines()) == 1 + 6
    run = tmp_path / "run"
    shutil.copytree(scratch_run, run)
    before = {name: (run / name).read_bytes() for name in os.listdir(run)}
    read_only(run)
    try:
        code, out, err = fasttl(tmp_path, "predict", "--run", run, cat_ship / "test")
        assert code == 0, err
        assert out == writable_out
        code, out, err = fasttl(tmp_path, "eval", run, "--data", cat_ship, "--no-progress")
        assert code == 0, err
        assert f"not saved ({run}/eval_metrics.json: permission denied): these numbers are the result" in out
    finally:
        writable(run)
    assert {name: (run / name).read_bytes() for name in os.listdir(run)} == before


def test_an_image_it_cannot_read_is_not_called_a_bad_image(cat_ship, tmp_path):  # noqa: F811
    data = tmp_path / "data"
    shutil.copytree(cat_ship, data)
    hidden = data / "train" / "cat" / "0.jpg"
    os.chmod(hidden, 0)
    common = ["--strategy", "scratch", "--epochs", "1", "--image-size", "32", "--compare", "none", "--no-progress"]
    code, _, err = fasttl(tmp_path, "run", "--data", data, "--out", tmp_path / "run", *common)
    # before: "cannot be read as an image (cannot be read (Permission denied))"
    # (pass 52: "make it readable to you", not "remove it", which one may not do in a folder of mode 555)
    assert code == 2 and one_line_error(err).startswith(f"fasttl: error: {hidden}: cannot be read (Permission "
                                                        "denied); make it readable to you, or leave unreadable files "
                                                        "out")
    code, out, err = fasttl(tmp_path, "run", "--data", data, "--out", tmp_path / "skipping", "--on-error", "skip",
                            *common)
    assert code == 0, err
    assert f"left out 1 image: listed with the reason in {tmp_path / 'skipping'}/skipped.csv" in out
    assert str(hidden) in (tmp_path / "skipping" / "skipped.csv").read_text()


def test_a_read_only_feature_cache_that_holds_the_features_is_used(cat_ship, tmp_path):  # noqa: F811
    common = ["run", "--data", cat_ship, "--strategy", "linear", "--image-size", "32", "--compare", "none",
              "--no-progress"]
    code, _, err = fasttl(tmp_path, *common, "--out", tmp_path / "first")
    assert code == 0, err
    cache = read_only(tmp_path / "feature-cache")
    try:
        code, _, err = fasttl(tmp_path, *common, "--out", tmp_path / "second")
    finally:
        writable(cache)
    assert code == 0, err
    first, second = ((tmp_path / name / "predictions.csv").read_text() for name in ("first", "second"))
    assert first == second


def test_an_empty_read_only_feature_cache_folder_is_named_with_the_setting(cat_ship, tmp_path):  # noqa: F811
    cache = tmp_path / "feature-cache"
    cache.mkdir()
    read_only(cache)
    try:
        code, _, err = fasttl(tmp_path, "run", "--data", cat_ship, "--out", tmp_path / "run", "--strategy", "linear",
                              "--image-size", "32", "--compare", "none", "--no-progress")
    finally:
        writable(cache)
    assert code == 2 and one_line_error(err) == (
        f"fasttl: error: {cache}: permission denied, fasttl can't make files in this folder (make it writable to "
        f"you, or use another path); it is in the feature cache folder FASTTL_CACHE_DIR={cache}: set "
        "FASTTL_CACHE_DIR to a folder you can write")
    assert stat.S_IMODE(os.stat(cache).st_mode) == 0o755 and os.listdir(cache) == []


@pytest.mark.parametrize("how", ["--overwrite", "--resume"])
def test_a_read_only_run_folder_written_again_is_named_not_its_lock(scratch_run, cat_ship, tmp_path, how):  # noqa: F811
    run = tmp_path / "run"
    shutil.copytree(scratch_run, run)
    assert (run / ".fasttl-run.lock").is_file()  # a lock file fasttl left (flock: released, the file stays)
    before = {name: (run / name).read_bytes() for name in os.listdir(run)}
    read_only(run)
    try:
        code, _, err = fasttl(tmp_path, "run", "--data", cat_ship, "--out", run, how, "--strategy", "scratch",
                              "--epochs", "1", "--image-size", "32", "--compare", "none", "--no-progress")
    finally:
        writable(run)
    # before: the lock file was named (fasttl's name; what to make writable is the folder)
    assert code == 2 and one_line_error(err) == (f"fasttl: error: {run}: permission denied, fasttl can't make files "
                                                 "in this folder (make it writable to you, or use another path)")
    assert {name: (run / name).read_bytes() for name in os.listdir(run)} == before
