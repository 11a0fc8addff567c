"""Left from the fifty-third pass's last read: a failed --out whose folder went during the work
named the file, not the folder that went; an output refused up front named its folder but not
which option (--json and --plot may share a folder). The fifty-fourth hostile pass (about 80
attempts, about 75 held; pass 53's fixes held) found 3: file-list rows were resolved as text
('missing/..', 'file/..', 'x.jpg/.', 'x.jpg/' read another image); an output made at --out or
--json during the work was replaced without --overwrite (two predicts into one file: the first's
lost); an output ending in '/.' wrote the file before it (bench: refused after all the work)."""
import errno
import os
import threading

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

    def removed_first(path, data, replace=True):  # the folder is removed while predict works, before the write
        os.rmdir(folder)
        os.rmdir(folder.parent)
        return real_write(path, data, replace)

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


# ---- F1: a file list's rows are read as the kernel reads them -------------------------------------------
def test_list_rows_the_kernel_cannot_open_are_never_another_image(cat_ship, tmp_path):  # noqa: F811
    from fasttl.data import screen
    from fasttl.data.formats.filelist import read_file_list

    images = sorted((cat_ship / "test").glob("*/*.jpg"))  # cat 0-2, ship 0-2: one of each class stays readable
    lists = tmp_path / "lists"
    lists.mkdir()
    (tmp_path / "afile").write_text("x")
    odd = ["nothere/../" + os.path.relpath(images[0], lists), "../afile/../" + os.path.relpath(images[1], tmp_path),
           os.path.relpath(images[3], lists) + "/.", os.path.relpath(images[4], lists) + "/"]
    rows = odd + [os.path.relpath(images[i], lists) for i in (2, 5)]
    labels = [images[i].parent.name for i in (0, 1, 3, 4, 2, 5)]
    (lists / "list.csv").write_text("path,label\n" + "".join(f"{r},{c}\n" for r, c in zip(rows, labels)))
    kept = screen(read_file_list(str(lists / "list.csv")), on_error="skip")
    # before: each of the four read an image (realpath and normpath drop what the kernel stops at)
    assert [path for path, _ in kept.skipped] == [os.path.join(lists, row) for row in odd]
    assert [os.path.realpath(path) for path in kept.files] == [str(images[2]), str(images[5])]


# ---- F2: an output that appeared during the work is kept -----------------------------------------------
@pytest.mark.parametrize("overwrite", [False, True])
def test_predict_keeps_a_file_made_at_out_during_the_work(linear_run, cat_ship, tmp_path, capsys,  # noqa: F811
                                                           monkeypatch, overwrite):
    from fasttl.util import files

    out = tmp_path / "p.csv"
    real_write = files.write_atomic

    def user_writes_first(path, data, replace=True):  # the user's file lands after the checks, before the write
        out.write_text("MY PRECIOUS")
        return real_write(path, data, replace)

    monkeypatch.setattr(files, "write_atomic", user_writes_first)
    words = ["predict", "--run", linear_run, cat_ship / "test", "--out", out] + ["--overwrite"] * overwrite
    status, printed, err = cli(capsys, *words)
    if overwrite:  # asked for: replaced
        assert status == 0 and out.read_text().startswith("path,")
        return
    # before: replaced, exit 0
    assert out.read_text() == "MY PRECIOUS" and status == 2 and len(printed.splitlines()) == 1 + 6
    assert one_line_error(err) == (f"fasttl: error: {out}: something is there already (made while fasttl worked?), "
                                   "left as it is (move it away, or use another path); the predictions go to standard "
                                   "output instead, not saved")
    assert [name for name in os.listdir(tmp_path) if name.startswith(".fasttl-tmp")] == []


def test_two_writers_without_overwrite_never_replace_each_other(tmp_path):
    from fasttl.util.files import write_atomic

    target, outcomes = tmp_path / "shared.csv", []

    def writer(text):
        try:
            write_atomic(str(target), text.encode(), replace=False)
            outcomes.append(text)
        except FileExistsError:
            outcomes.append("refused")

    threads = [threading.Thread(target=writer, args=(f"writer {i}",)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    written = [text for text in outcomes if text != "refused"]
    assert len(written) == 1 and outcomes.count("refused") == 7 and target.read_text() == written[0]
    assert os.listdir(tmp_path) == ["shared.csv"]


def test_without_hard_links_a_file_already_there_is_kept(tmp_path, monkeypatch):
    from fasttl.util.files import write_atomic

    def no_links(*args, **kwargs):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)  # a file system without hard links (FAT, some FUSE ones)
    (tmp_path / "mine.json").write_text("mine")
    with pytest.raises(FileExistsError):
        write_atomic(str(tmp_path / "mine.json"), b"theirs", replace=False)
    write_atomic(str(tmp_path / "new.json"), b"new", replace=False)
    assert (tmp_path / "mine.json").read_text() == "mine" and (tmp_path / "new.json").read_text() == "new"
    assert sorted(os.listdir(tmp_path)) == ["mine.json", "new.json"]


def test_bench_keeps_a_json_made_during_the_benchmarks(tmp_path, monkeypatch):
    from fasttl.bench import runner

    out = tmp_path / "b.json"
    monkeypatch.setattr(runner, "header", lambda info, device: out.write_text('{"mine": 1}') and "header")
    with pytest.raises(FileExistsError):
        runner.run(["distill"], quick=True, json_path=str(out))
    assert out.read_text() == '{"mine": 1}'  # before: replaced by the benchmark's results


# ---- F3: an output name ending in '/.' names a folder ----------------------------------------------------
@pytest.mark.parametrize("ending", ["/.", "/.."])
def test_an_output_ending_in_dot_is_refused_before_the_work(tmp_path, ending):
    from fasttl.util.checks import check_output_path
    from fasttl.util.errors import OptionError

    for flag in ("--out", "--json"):
        with pytest.raises(OptionError) as caught:
            check_output_path(str(tmp_path / "p.csv") + ending, True, flag)
        # before: accepted as p.csv (abspath drops the '/.'); bench then failed after all its work
        assert str(caught.value) == (f"{flag[2:]}: {str(tmp_path / 'p.csv') + ending!r} names a folder (it ends in "
                                     f"{ending}); give {flag} a file name")
    assert os.listdir(tmp_path) == []


def test_an_output_name_too_long_is_refused_before_the_work(tmp_path):
    from fasttl.util.checks import check_output_path
    from fasttl.util.errors import OptionError

    with pytest.raises(OptionError) as caught:
        check_output_path(str(tmp_path / ("a" * 300 + ".csv")), False)
    # before: predict read every image, then failed at the write
    assert str(caught.value) == f"out: {'a' * 40}... is a name too long for the file system of {tmp_path}; give " \
                                "--out a shorter name"


def test_a_dotdot_after_a_file_on_the_way_names_the_file(tmp_path):
    from fasttl.util.checks import check_output_path
    from fasttl.util.errors import OptionError

    (tmp_path / "afile").write_text("x")
    with pytest.raises(OptionError) as caught:
        check_output_path(str(tmp_path / "afile" / ".." / "sub" / "p.csv"), False)
    # before: ".../afile/../sub does not exist", the '..' path and not the file the kernel stops at
    assert str(caught.value) == (f"out: {tmp_path / 'afile' / '..' / 'sub'} can't be reached: {tmp_path / 'afile'} "
                                 "is a file, not a folder (fix the path)")
