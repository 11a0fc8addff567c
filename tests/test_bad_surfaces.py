"""The second hardening round: the newer surfaces (engine graphs, run folders, labels, outputs,
run configs, weights, images that lie about their size, full disks) on hostile input. Each case
checks the exception or exit code, that the message names the culprit, and what files changed."""
import csv
import errno
import io
import json
import os
import shutil
import struct
import zlib

import numpy as np
import pytest
import torch

import fasttl
from conftest import cli, finished_run, one_epoch_run, one_line_error, run_with_config_edit
from fasttl.cache import CacheError
from fasttl.data import DataError
from fasttl.transfer.job import run
from fasttl.transfer.rundir import RunError, RunLock

pytestmark = pytest.mark.usefixtures("private_cache")


def snapshot(folder):
    return {os.path.relpath(os.path.join(d, f), folder): open(os.path.join(d, f), "rb").read()
            for d, _, names in os.walk(folder) for f in names}


# ---- run folders are fasttl's by proof ----------------------------------------------------------
@pytest.mark.parametrize("overwrite", [False, True])
def test_a_folder_with_a_users_config_json_is_not_taken_for_a_run(cat_ship, tmp_path, overwrite):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"strategy": "my own experiment", "lr": 3}))
    (out / "report.md").write_text("my notes")
    before = snapshot(out)
    with pytest.raises(RunError, match=r"^out: .*mine is not empty and holds no fasttl run"):
        run(**one_epoch_run(cat_ship, out, overwrite=overwrite))
    assert snapshot(out) == before and sorted(os.listdir(out)) == ["config.json", "report.md"]


def test_a_second_run_into_a_held_folder_is_refused_naming_the_holder(cat_ship, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    with RunLock(str(out)):
        with pytest.raises(RunError, match=r"^out: .*run is in use by another fasttl run \(pid \d+\)"):
            run(**one_epoch_run(cat_ship, out))
    assert sorted(os.listdir(out)) == [".fasttl-run.lock"]
    run(**one_epoch_run(cat_ship, out))  # released: the run goes ahead, and marks the folder as a run
    assert (out / ".fasttl-run").is_file() and (out / "metrics.json").is_file()


def test_a_run_made_before_the_marker_is_still_a_run(cat_ship, tmp_path):
    out = tmp_path / "run"
    run(**one_epoch_run(cat_ship, out))
    os.remove(out / ".fasttl-run")  # as a folder made by an earlier fasttl
    with pytest.raises(RunError, match=r"holds a finished run; pass --overwrite"):
        run(**one_epoch_run(cat_ship, out))
    run(**one_epoch_run(cat_ship, out, overwrite=True))


# ---- labels are what the user meant ---------------------------------------------------------------
def _file_list(tmp_path, cifar10_root, labels):
    rows = ["path,label"]
    for i, label in enumerate(labels):
        src = os.path.join(cifar10_root, "test", "cat" if i % 2 else "ship", f"{i:04d}.jpg")
        shutil.copy(src, tmp_path / f"{i}.jpg")
        rows.append(f"{i}.jpg,{label}")
    (tmp_path / "list.csv").write_text("\n".join(rows) + "\n")
    return str(tmp_path / "list.csv")


def test_with_a_classes_file_a_label_must_be_one_of_its_names(tmp_path, cifar10_root):
    listed = _file_list(tmp_path, cifar10_root, ["3", "7", "9", "1", "3", "7"])
    (tmp_path / "classes.txt").write_text("3\n7\n9\n")
    with pytest.raises(DataError, match=r"label '1' is not one of the 3 classes of the classes file \(to give labels "
                                         r"as indices into it, pass --labels indices\)"):
        fasttl.data.formats.open_data(listed, str(tmp_path / "classes.txt"))
    fixed = _file_list(tmp_path, cifar10_root, ["3", "7", "9", "7", "3", "9"])
    source = fasttl.data.formats.open_data(fixed, str(tmp_path / "classes.txt"))
    assert source.classes == ["3", "7", "9"] and source.labels == [0, 1, 2, 1, 0, 2]
    indices = _file_list(tmp_path, cifar10_root, ["0", "1", "2", "1"])
    source = fasttl.data.formats.open_data(indices, str(tmp_path / "classes.txt"), "indices")
    assert [source.classes[i] for i in source.labels] == ["3", "7", "9", "7"]
    with pytest.raises(DataError, match=r"label '3' is not an index into the 3 classes"):
        fasttl.data.formats.open_data(_file_list(tmp_path, cifar10_root, ["0", "1", "3"]),
                                      str(tmp_path / "classes.txt"), "indices")


def test_integer_labels_without_a_classes_file_make_no_empty_class(tmp_path, cifar10_root):
    source = fasttl.data.formats.open_data(_file_list(tmp_path, cifar10_root, ["1", "2", "3", "10", "2", "1"]))
    assert source.classes == ["1", "2", "3", "10"]  # numeric order, one class per label found
    assert [source.classes[i] for i in source.labels] == ["1", "2", "3", "10", "2", "1"]
    with pytest.raises(DataError, match=r"^labels: --labels indices needs --classes-file"):
        fasttl.data.formats.open_data(_file_list(tmp_path, cifar10_root, ["0", "1"]), None, "indices")


# ---- outputs escape what fasttl did not make ------------------------------------------------------
def test_class_names_and_paths_are_escaped_in_every_output(tmp_path, cifar10_root):
    data = tmp_path / "data"
    names = ["=1+2+cmd|' calc'!A0", "<b>a|b <x> $x$"]
    for k, name in enumerate(names):
        for split, count in (("train", 5), ("test", 2)):
            folder = data / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                shutil.copy(os.path.join(cifar10_root, split, ("cat", "ship")[k], f"{i:04d}.jpg"), folder / f"{i}.jpg")
    out = tmp_path / "run"
    run(**one_epoch_run(data, out))
    with open(out / "predictions.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert all(not cell.startswith(("=", "+", "-", "@")) for row in rows[1:] for cell in row[:3])
    assert any(cell == "'" + names[0] for row in rows[1:] for cell in row)
    report = (out / "report.md").read_text()
    assert "<b>" not in report and "&lt;b&gt;a\\|b &lt;x&gt; \\$x\\$" in report
    for line in report.splitlines():
        if line.startswith("| &lt;b"):
            assert line.count(" | ") == 1  # the table row kept its two cells
    assert "'=1+2" in "".join(",".join(r) for r in rows)


# ---- every file read back is checked: run configs and weights ------------------------------------
@pytest.fixture(scope="module")
def finished(cat_ship, tmp_path_factory):
    return finished_run(cat_ship, tmp_path_factory, "finished")


@pytest.mark.parametrize("field, value, expected", [
    ("classes", "abc", "a list of at least 2 distinct, printable class names"),
    ("classes", 3, "a list of at least 2"),
    ("image_size", "32", "an integer from 1 to"),
    ("image_size", 1e6, "an integer from 1 to"),
    ("backbone", ["x"], "one of efficientnet_lite0"),
    ("data", ["x"], "a path or data set name"),
    ("seed", -1, "an integer >= 0"),
    ("tensorboard", 5, "a folder \\(text\\), true or null"),
    ("train_samples", "abc", "an integer from 0 to"),
    ("strategy", "bogus", "one of linear"),
])
def test_a_hand_edited_config_json_is_named_with_its_field(cat_ship, finished, tmp_path, capsys, field, value,
                                                           expected):
    run_dir = run_with_config_edit(finished, tmp_path / "edited", field, value)
    with pytest.raises(RunError, match=rf"config.json: field '{field}' is .* \(expected {expected}"):
        fasttl.load_run(str(run_dir))
    code, _, err = cli(capsys, "predict", "--run", run_dir, os.path.join(cat_ship, "test"))
    assert code == 2 and f"field '{field}'" in one_line_error(err)


def test_nan_weights_are_named_when_a_run_is_loaded(finished, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    run_dir = tmp_path / "nan"
    shutil.copytree(finished, run_dir)
    state = load_file(str(run_dir / "scratch.safetensors"))
    first = next(name for name, tensor in state.items() if tensor.is_floating_point())
    state[first] = torch.full_like(state[first], float("nan"))
    save_file(state, str(run_dir / "scratch.safetensors"))
    with pytest.raises(RunError, match=rf"scratch.safetensors: '{first}' holds NaN or infinite weights"):
        fasttl.load_run(str(run_dir))
    code, _, err = cli(capsys, "export", run_dir, "--out", tmp_path / "m.onnx")
    assert code != 0 and "scratch.safetensors" in err and not (tmp_path / "m.onnx").exists()


# ---- numbers a cache dtype can't hold ---------------------------------------------------------------
def test_fp16_cache_refuses_values_it_cannot_hold(tmp_path):
    rows = np.ones((4, 3), dtype=np.float32)
    rows[2, 1] = 1e5
    with pytest.raises(CacheError, match=r"chunks: chunk 0: a value of magnitude 1e\+05 overflows fp16"):
        fasttl.FeatureCache.write(str(tmp_path / "c"), [rows], [0, 1, 0, 1], classes=["a", "b"], dtype="fp16")
    cache = fasttl.FeatureCache.write(str(tmp_path / "b"), [rows], [0, 1, 0, 1], classes=["a", "b"], dtype="bf16")
    assert torch.isfinite(cache.all_features()).all()


# ---- images that lie about their size ----------------------------------------------------------------
def _tiny_jpeg_claiming(width, height) -> bytes:
    """A real JPEG's headers with its frame size rewritten: a few hundred bytes 'of' a huge image."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (120, 30, 200)).save(buffer, "JPEG")
    data = bytearray(buffer.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def _png(width, height, idat: bytes) -> bytes:
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def test_an_image_whose_bytes_cannot_fill_its_declared_size_is_refused(tmp_path):
    from fasttl.data.images import bytes_problem, header_problem

    liar = _tiny_jpeg_claiming(9400, 9400)
    assert len(liar) < 1000
    (tmp_path / "liar.jpg").write_bytes(liar)
    assert "declares 9400x9400 pixels but holds" in header_problem(str(tmp_path / "liar.jpg"))
    bomb = _png(9000, 9000, zlib.compress(b"\0" * (9000 * 3 + 1) * 10))
    assert "declares 9000x9000 pixels but holds" in bytes_problem(bomb)
    honest = _png(40, 30, zlib.compress(b"\0" + bytes(range(120)) * 30))
    assert bytes_problem(honest) is None or "declares" not in bytes_problem(honest)


# ---- full disks, unwritable places, closed pipes --------------------------------------------------
def test_a_full_disk_names_the_users_file_never_a_temporary(tmp_path, monkeypatch):
    from fasttl.util import files

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    target = tmp_path / "predictions.csv"
    with pytest.raises(OSError) as info:
        files.write_atomic(str(target), b"x")
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(target)
    assert os.listdir(tmp_path) == []  # nothing half-written left behind


def test_cli_os_errors_are_one_line_naming_the_path(cat_ship, finished, tmp_path, capsys, monkeypatch):
    from fasttl.util import files

    real = files.write_atomic

    def denied(path, data, replace=True):
        raise PermissionError(errno.EACCES, "Permission denied", os.path.join(os.path.dirname(path),
                                                                               ".fasttl-tmp-1-ab12cd-" + os.path.basename(path)))

    monkeypatch.setattr(files, "write_atomic", denied)
    code, out, err = cli(capsys, "predict", "--run", finished, os.path.join(cat_ship, "test"),
                         "--out", tmp_path / "out.csv")
    line = one_line_error(err)
    # the folder refusing the new file is named (its temporary is never; nor is out.csv, which is not there);
    # the predictions are shown all the same (pass 52: they were lost with the file)
    assert code == 2 and line == f"fasttl: error: {tmp_path}: permission denied, fasttl can't make files in this " \
                                 "folder (make it writable to you, or use another path); the predictions go to " \
                                 "standard output instead, not saved"
    images = sum(len(os.listdir(os.path.join(cat_ship, "test", name))) for name in ("cat", "ship"))
    assert out.startswith("path,") and len(out.splitlines()) == 1 + images
    monkeypatch.setattr(files, "write_atomic", real)


def test_predict_to_a_full_stdout_is_one_line(cat_ship, finished, tmp_path):
    import subprocess
    import sys

    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full (Linux)")
    with open("/dev/full", "w") as full:
        result = subprocess.run([sys.executable, "-m", "fasttl", "predict", "--run", str(finished),
                                 os.path.join(cat_ship, "test")], stdout=full, stderr=subprocess.PIPE,
                                text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["fasttl: error: standard output: no space left on the device (free "
                                                  "some, or write elsewhere); nothing half-written was kept"]


# ---- messages that say what is wrong ------------------------------------------------------------------
def test_a_nul_in_a_file_list_path_is_named_as_such(tmp_path):
    (tmp_path / "list.csv").write_bytes(b"path,label\na\x00b.jpg,cat\nc.jpg,dog\n")
    with pytest.raises(DataError, match=r"row 1 has a control character \(such as NUL\) in its path"):
        fasttl.data.formats.open_data(str(tmp_path / "list.csv"))


def test_a_shard_linked_to_a_device_is_named_as_such(tmp_path):
    if not os.path.exists("/dev/zero"):
        pytest.skip("needs /dev/zero")
    os.symlink("/dev/zero", tmp_path / "train-0.tar")
    with pytest.raises(DataError, match=r"train-0.tar \(a link to /dev/zero\) is not a regular file or folder"):
        fasttl.data.formats.open_data(str(tmp_path / "train-0.tar"))


def test_file_list_paths_may_be_absolute_or_leave_the_lists_folder(tmp_path, cifar10_root):
    # The rule, decided: relative to the list's folder, absolute or `..` allowed (read only as images).
    (tmp_path / "lists").mkdir()
    images = tmp_path / "images"
    images.mkdir()
    for i, name in enumerate(("cat", "ship")):
        shutil.copy(os.path.join(cifar10_root, "test", name, "0000.jpg"), images / f"{name}.jpg")
    (tmp_path / "lists" / "l.csv").write_text(f"path,label\n../images/cat.jpg,cat\n{images / 'ship.jpg'},ship\n")
    source = fasttl.data.formats.open_data(str(tmp_path / "lists" / "l.csv"))
    assert source.files == [str(images / "cat.jpg"), str(images / "ship.jpg")]
