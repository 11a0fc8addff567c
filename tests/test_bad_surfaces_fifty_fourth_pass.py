"""Left from the fifty-third pass's last read, and the fifty-fourth hostile pass: a failed --out
whose folder went during the work named the file, not the folder that went; an output refused up
front named its folder but not which option (--json and --plot may share a folder)."""
import errno
import os

import pytest

from conftest import cat_ship, cli, finished_run, one_line_error  # noqa: F401 (cat_ship: a fixture)
from test_read_only_folders import fasttl

WRITE = "permission denied, fasttl can't make files in this folder (make it writable to you, or use another path)"


@pytest.fixture(scope="module")
def linear_run(cat_ship, tmp_path_factory):  # noqa: F811
    return finished_run(cat_ship, tmp_path_factory, "linear54", strategy="linear", epochs=None)


# ---- L1: the folder that went is named, not the file fasttl was making in it ----------------------------
def test_a_failed_out_whose_folder_went_names_that_folder(linear_run, cat_ship, tmp_path, capsys,  # noqa: F811
                                                          monkeypatch):
    from fasttl.util import files

    folder = tmp_path / "gone" / "deeper"
    folder.mkdir(parents=True)
    real_write = files.write_atomic

    def removed_first(path, data):  # the folder is removed while predict works, before its final write
        os.rmdir(folder)
        os.rmdir(folder.parent)
        return real_write(path, data)

    monkeypatch.setattr(files, "write_atomic", removed_first)
    status, out, err = cli(capsys, "predict", "--run", linear_run, cat_ship / "test", "--out", folder / "p.csv")
    # before: ".../gone/deeper/p.csv: no such file or folder (check the path)", a file never meant to be there yet
    assert status == 2 and len(out.splitlines()) == 1 + 6
    assert one_line_error(err) == (f"fasttl: error: {tmp_path / 'gone'}: no such folder (check the path); the "
                                   "predictions go to standard output instead, not saved")


def test_an_os_error_names_the_first_missing_folder_and_leaves_a_present_one_alone(tmp_path):
    from fasttl.cli_errors import os_error_line

    gone = OSError(errno.ENOENT, "No such file or directory", str(tmp_path / "a" / "b" / "f.csv"))
    here = OSError(errno.ENOENT, "No such file or directory", str(tmp_path / "f.csv"))
    assert os_error_line(gone) == f"{tmp_path / 'a'}: no such folder (check the path)"
    assert os_error_line(here) == f"{tmp_path / 'f.csv'}: no such file or folder (check the path)"


# ---- L2: an output refused up front says which option --------------------------------------------------
@pytest.mark.parametrize("option", ["--json", "--plot"])
def test_an_output_refused_up_front_names_its_option(tmp_path, option):
    folder = tmp_path / "ro"
    folder.mkdir()
    os.chmod(folder, 0o555)
    try:
        code, out, err = fasttl(tmp_path, "bench", "distill", "--quick", option, folder / f"b{option[2:]}")
    finally:
        os.chmod(folder, 0o755)
    # before: "<folder>: permission denied, ...", the same words for --json and --plot
    assert code == 2 and out == "" and one_line_error(err) == f"fasttl: error: {option[2:]}: {folder}: {WRITE}"
