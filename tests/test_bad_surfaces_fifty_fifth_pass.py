"""The fifty-fifth hostile pass (about 110 attempts, about 107 held; pass 54's fixes held, and
104,880 fuzzed list-row forms agreed with the kernel) found 3 messages: an output in an existing
folder whose full path is over PATH_MAX was "does not exist"; an input through a plain file or a
link loop (--data afile/d, a predict path, --weights) was "does not exist" or "no file at", the
file never named; a list naming an image and its unreadable twin ('x.jpg', 'x.jpg/.') gave both
one sample id (extract recorded the good image as skipped, and an unchanged rerun was refused).
The fifty-sixth pass (about 420 attempts) found 1: fetch --dest naming a file with a trailing '/'
said "a file appeared there while fasttl worked"."""
import os
import shutil

import pytest

from conftest import cat_ship, cli, finished_run, one_line_error  # noqa: F401 (cat_ship: a fixture)


@pytest.fixture(scope="module")
def linear_run(cat_ship, tmp_path_factory):  # noqa: F811
    return finished_run(cat_ship, tmp_path_factory, "linear55", strategy="linear", epochs=None)


# ---- F1: an existing folder too deep for a path is said so, not "does not exist" ------------------------
def test_an_output_in_a_folder_beyond_path_max_says_the_path_is_too_long(tmp_path):
    from fasttl.util.checks import check_output_path
    from fasttl.util.errors import OptionError

    name, fd = "d" * 200, os.open(tmp_path, os.O_RDONLY)
    try:
        for _ in range(21):  # 21 x 201 bytes: over PATH_MAX (4096) as a whole, each name within NAME_MAX
            os.mkdir(name, dir_fd=fd)
            inner = os.open(name, os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = inner
    finally:
        os.close(fd)
    deep = os.path.join(str(tmp_path), *[name] * 21)
    with pytest.raises(OptionError) as caught:
        check_output_path(os.path.join(deep, "p.csv"), False)
    # before: "out: <deep> does not exist (give another --out in an existing folder)", of a folder that is there
    assert str(caught.value) == f"out: {deep} can't be reached: its path, or a name in it, is too long for the file " \
                                "system (give a shorter path)"


# ---- F2: an input through a plain file or a link loop names it ---------------------------------------------
@pytest.fixture
def in_the_way(tmp_path):
    (tmp_path / "afile").write_text("not a folder")
    (tmp_path / "loop").symlink_to("loop")
    return tmp_path


@pytest.mark.parametrize("blocker, what", [("afile", "is a file, not a folder"), ("loop", "is a symbolic link loop")])
def test_data_through_a_file_or_a_loop_names_it(in_the_way, capsys, blocker, what):
    data = in_the_way / blocker / "d"
    code, _, err = cli(capsys, "extract", "--data", data, "--out", in_the_way / "x", "--no-progress")
    # before: "data: .../afile/d does not exist (give class folders .../afile/d/<class>/*.jpg ...)"
    assert code == 2 and one_line_error(err) == (f"fasttl: error: data: {data} can't be reached: "
                                                 f"{in_the_way / blocker} {what} (fix the path)")
    assert not (in_the_way / "x").exists()


def test_a_predict_path_and_weights_through_a_file_name_it(in_the_way, linear_run, capsys):
    from fasttl.backbones.weights import WeightsError, read_state_dict

    image = in_the_way / "afile" / "x.jpg"
    code, out, err = cli(capsys, "predict", "--run", linear_run, image)
    # before: "...afile/x.jpg: no such file or folder (give image files or folders)"
    assert code == 2 and out == "" and f"can't be reached: {in_the_way / 'afile'} is a file, not a folder" in err
    with pytest.raises(WeightsError) as caught:
        read_state_dict(str(in_the_way / "afile" / "w.pt"))
    # before: "weights: no file at .../afile/w.pt. fasttl never downloads weights ..."
    assert str(caught.value) == (f"weights: {in_the_way / 'afile' / 'w.pt'} can't be reached: "
                                 f"{in_the_way / 'afile'} is a file, not a folder (fix the path)")


def test_a_file_given_as_a_folder_with_a_slash_names_the_file(in_the_way, capsys):
    code, _, err = cli(capsys, "extract", "--data", f"{in_the_way / 'afile'}/", "--out", in_the_way / "x",
                       "--no-progress")
    assert code == 2 and one_line_error(err) == (f"fasttl: error: data: {in_the_way / 'afile'}/ can't be reached: "
                                                 f"{in_the_way / 'afile'} is a file, not a folder (fix the path)")
    code, _, err = cli(capsys, "extract", "--data", f"{in_the_way / 'nope'}/", "--out", in_the_way / "x",
                       "--no-progress")
    assert code == 2 and one_line_error(err).startswith(f"fasttl: error: data: {in_the_way / 'nope'} does not exist")


# ---- F3: an image and its unreadable twin are one image named twice ----------------------------------------
@pytest.mark.parametrize("twin", ["{}/.", "{}/", "nothere/../{}"])
def test_a_list_naming_an_image_and_its_unreadable_twin_is_refused(cat_ship, tmp_path, twin):  # noqa: F811
    from fasttl.data.formats.filelist import read_file_list
    from fasttl.util.errors import DataError

    shutil.copytree(cat_ship / "test", tmp_path / "d")
    rows = [f"d/{c}/{i}.jpg,{c}" for c, i in [("cat", 0), ("cat", 1), ("ship", 0), ("ship", 1)]]
    rows.append(twin.format("d/cat/0.jpg") + ",cat")
    (tmp_path / "l.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    with pytest.raises(DataError) as caught:
        read_file_list(str(tmp_path / "l.csv"))
    # before: read as two rows with one sample id (extract's manifest skipped the good one; a rerun was refused)
    assert str(caught.value) == (f"data: {tmp_path / 'l.csv'} lists {twin.format('d/cat/0.jpg')} twice (rows 1 and "
                                 "5); give each image once")


# ---- observed: file_list's '~' is a folder's name, as in a list file ---------------------------------------
def test_file_list_reads_a_tilde_as_a_folders_name(cat_ship, tmp_path, monkeypatch):  # noqa: F811
    from fasttl.data import file_list

    monkeypatch.chdir(tmp_path)
    shutil.copytree(cat_ship / "test" / "cat", tmp_path / "~")
    source = file_list([("~/0.jpg", 0), ("~/1.jpg", 1)])
    # before: $HOME/0.jpg (expanduser), not the file open("~/0.jpg") reads
    assert source.files == [str(tmp_path / "~" / "0.jpg"), str(tmp_path / "~" / "1.jpg")]


# ---- pass 56, F1: fetch's --dest through a file, a link to one or a loop, with a trailing '/' ------------------
@pytest.mark.parametrize("dest, what", [("afile", "is a file, not a folder"),
                                        ("flink", "is a symbolic link to a file, not a folder"),
                                        ("loop", "is a symbolic link loop")])
def test_fetch_into_a_file_given_with_a_slash_names_it_before_downloading(in_the_way, capsys, dest, what):
    (in_the_way / "flink").symlink_to("afile")
    given = f"{in_the_way / dest}/"
    code, _, err = cli(capsys, "data", "fetch", "cifar10", "--url", "http://127.0.0.1:9/c.tgz", "--sha256", "0" * 64,
                       "--dest", given, "--no-progress")
    # before: "<dest>/: a file appeared there while fasttl worked and was left as it is" (os.makedirs' EEXIST)
    assert code == 2 and one_line_error(err) == (f"fasttl: error: dest: {given} can't be reached: {in_the_way / dest} "
                                                 f"{what} (fix the path)")
    assert (in_the_way / "afile").read_text() == "not a folder"
