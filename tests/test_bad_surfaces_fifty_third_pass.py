"""The fifty-third hostile pass (about 145 attempts, about 130 held; pass 52's fixes held) found 7,
all beside pass 52's '..' and late-write fixes: the bench data folder, weights messages and
extract's full-stdout line still read '..' as text; a '..' after a missing folder or a file was
dropped as text (the kernel refuses such a path; --out --overwrite replaced another file); predict
kept its predictions only for five errno values at the final write, and said a full standard output
before the failed --out; a path too long as a whole was "a name too long ... no such file"."""
import errno
import os
import shutil

import pytest

from conftest import cat_ship, cli, finished_run  # noqa: F401 (cat_ship: a fixture)
from test_bad_surfaces_fifty_second_pass import linked  # noqa: F401 (a fixture: tmp/a/lk -> ../b/in)


@pytest.fixture(scope="module")
def linear_run(cat_ship, tmp_path_factory):  # noqa: F811
    return finished_run(cat_ship, tmp_path_factory, "linear53", strategy="linear", epochs=None)


# ---- F2: a '..' the kernel can't take stays in the path -----------------------------------------------
@pytest.mark.parametrize("way", ["nope", "x.jpg"])
def test_a_dotdot_after_a_missing_folder_or_a_file_is_never_dropped(linked, way):  # noqa: F811
    from fasttl.util.checks import check_output_path
    from fasttl.util.errors import OptionError
    from fasttl.util.files import absolute

    (linked / "a" / "x.jpg").write_bytes(b"x")  # a file: no folder to go up from
    (linked / "a" / "k.csv").write_text("keep")
    given = linked / "a" / way / ".." / "k.csv"
    assert absolute(given) == str(given)  # before: .../a/k.csv, a file the kernel never reaches that way
    with pytest.raises(OptionError):  # before: accepted, and --overwrite replaced a/k.csv
        check_output_path(str(given), True)
    assert (linked / "a" / "k.csv").read_text() == "keep"


# ---- F1, F3: the bench data folder and the weights message ---------------------------------------------
def test_the_bench_data_folder_after_a_link_is_the_kernels(cat_ship, linked):  # noqa: F811
    from fasttl.bench.common import bench_splits
    from fasttl.util.errors import OptionError

    shutil.copytree(cat_ship, linked / "b" / "d")  # 12 training images: too few, and said of b/d
    with pytest.raises(OptionError) as caught:
        bench_splits(str(linked / "a" / "lk" / ".." / "d"))
    # before: ".../a/d ... does not exist" (or another data set kept there, timed)
    assert str(caught.value).startswith(f"data: {os.path.realpath(linked / 'b' / 'd')}/train (--data) holds 12 "
                                        "images")


def test_weights_not_there_are_named_where_the_kernel_looked(linked):  # noqa: F811
    from fasttl.backbones.weights import read_state_dict

    (linked / "a" / "w.pt").write_bytes(b"there, but not where the path leads")
    with pytest.raises(FileNotFoundError) as caught:
        read_state_dict(str(linked / "a" / "lk" / ".." / "w.pt"))
    # before: "no file at .../a/w.pt", a file that is there
    assert str(caught.value).startswith(f"weights: no file at {os.path.realpath(linked / 'b')}/w.pt.")


# ---- F5, F6: predictions kept whatever stops the final write, said before standard output --------------
@pytest.mark.parametrize("code", ["ENOENT", "EISDIR", "EIO"])
def test_predictions_are_shown_whatever_stops_the_out_file(linear_run, cat_ship, tmp_path, capsys,  # noqa: F811
                                                           monkeypatch, code):
    from fasttl.util import files

    def stopped(path, data, replace=True):
        raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)), path)

    monkeypatch.setattr(files, "write_atomic", stopped)
    status, out, err = cli(capsys, "predict", "--run", linear_run, cat_ship / "test", "--out", tmp_path / "p.csv")
    # before: ENOENT, EISDIR and EIO went up as the error, every prediction dropped
    assert status == 2 and len(out.splitlines()) == 1 + 6
    assert err.startswith("fasttl: error: ") and err.strip().endswith("; the predictions go to standard output "
                                                                      "instead, not saved")


def test_a_failed_out_is_said_before_standard_output_is_written(linear_run, cat_ship, tmp_path, monkeypatch):  # noqa: F811
    import io
    import sys

    from fasttl.predict import predict_run, show_run_predictions
    from fasttl.util import files

    monkeypatch.setattr(files, "write_atomic", lambda path, data, replace=True: (_ for _ in ()).throw(
        OSError(errno.ENOSPC, "No space left on device", path)))
    result = predict_run(linear_run, [str(cat_ship / "test")], out=str(tmp_path / "p.csv"), progress=False)
    said = []

    class FullStdout(io.StringIO):
        def write(self, text):
            said.append("stdout")
            raise OSError(errno.ENOSPC, "No space left on device")

    class Stderr(io.StringIO):
        def write(self, text):
            said.append("stderr")
            return super().write(text)

    monkeypatch.setattr(sys, "stdout", FullStdout())
    monkeypatch.setattr(sys, "stderr", Stderr())
    with pytest.raises(OSError):
        show_run_predictions(result)
    # before: standard output first, its failure the only error (nothing said of --out)
    assert said[0] == "stderr" and "stdout" in said
