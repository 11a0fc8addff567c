"""What the fourteenth hostile pass of the second hardening round found: each case kept with the
fix that answers it (others are in test_cache_order.py, test_fetch.py and the thirteenth pass's
file, beside the fixes they refine)."""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import fasttl
from conftest import cli, one_epoch_run, one_line_error
from fasttl.cache.store import CacheError
from fasttl.data import DataError
from fasttl.util.errors import OptionError
from fasttl.transfer.job import run
from fasttl.transfer.rundir import RunError

pytestmark = pytest.mark.usefixtures("private_cache")


def _trained(cat_ship, tmp_path, name="data"):
    data = tmp_path / name
    shutil.copytree(cat_ship, data)
    out = tmp_path / f"run-{name}"
    run(**one_epoch_run(data, out))
    return data, out


def test_the_record_knows_training_images_by_their_bytes(cat_ship, tmp_path):
    """A copy on another drive (new device and inodes) is still the run's training images; new
    images in the places (inodes) the deleted training images held are not."""
    from fasttl.transfer.evaluate import evaluate_run

    data, out = _trained(cat_ship, tmp_path)
    copied = tmp_path / "elsewhere"
    shutil.copytree(data / "train", copied / "train")
    shutil.copytree(data / "train", copied / "test")
    shutil.rmtree(data)  # its old path gone, as after a move to another file system
    with pytest.raises(DataError, match="its test split holds 12 of the run's training images"):
        evaluate_run(str(out), str(copied), progress=False)
    fresh = tmp_path / "fresh"
    for split in ("train", "test"):  # other CIFAR-10 images, written after the training ones were deleted
        for name in ("cat", "ship"):
            (fresh / split / name).mkdir(parents=True)
            for i, image in enumerate(sorted((cat_ship / "test" / name).glob("*.jpg"))):
                shutil.copy(image, fresh / split / name / f"{i}.jpg")
    assert evaluate_run(str(out), str(fresh), progress=False)["samples"] == 6


def test_a_damaged_record_is_refused_not_ignored(cat_ship, tmp_path):
    from fasttl.transfer.evaluate import evaluate_run

    data, out = _trained(cat_ship, tmp_path)
    record = out / "trained-images.bin"
    good = record.read_bytes()
    assert len(good) == 8 * 12
    record.write_bytes(bytes([good[0] ^ 1]) + good[1:])
    with pytest.raises(RunError, match="trained-images.bin: damaged or changed since the run wrote it"):
        evaluate_run(str(out), str(data / "test"), progress=False)
    with open(record, "wb") as f:
        f.truncate(800_000_000)  # sparse, larger than 12 images' hashes: refused unread
    with pytest.raises(RunError, match="trained-images.bin: damaged"):
        evaluate_run(str(out), str(data / "test"), progress=False)


def test_the_engine_graph_never_goes_into_a_run_or_among_the_images(cat_ship, tmp_path):
    _, out = _trained(cat_ship, tmp_path)
    backbone = fasttl.backbones.create("efficientnet_lite0")
    source = fasttl.data.scan_class_folder(str(cat_ship / "train"))
    for engine_dir, where in ((out, "the fasttl run folder"), (cat_ship / "train" / "cat", "the data folder")):
        with pytest.raises(CacheError, match=f"engine_dir: .* is inside {where}"):
            fasttl.FeatureCache.build(backbone, source, str(tmp_path / "c"), image_size=32, progress=False,
                                      engine="torch", engine_dir=str(engine_dir))
    assert not [n for n in os.listdir(out) if n.startswith("engine-")]
    assert not [n for n in os.listdir(cat_ship / "train" / "cat") if n.startswith("engine-")]


def test_a_parquet_list_decoding_to_gigabytes_is_refused_before_it_decodes(tmp_path):
    pa = pytest.importorskip("pyarrow", reason="Parquet lists need pyarrow")
    import pyarrow.parquet as pq

    from fasttl.data.formats.filelist import read_file_list

    n = 400_000
    path = pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int32)), pa.array(["d/" + "a" * 5000 + ".jpg"]))
    label = pa.DictionaryArray.from_arrays(pa.array(np.repeat(np.array([0, 1], np.int32), n // 2)),
                                           pa.array(["a", "b"]))
    pq.write_table(pa.table({"path": path.cast(pa.string()), "label": label.cast(pa.string())}),
                   str(tmp_path / "bomb.parquet"), compression="zstd")
    assert (tmp_path / "bomb.parquet").stat().st_size < 100_000
    with pytest.raises(DataError, match="characters of paths and labels once decoded, more than the"):
        read_file_list(str(tmp_path / "bomb.parquet"))
    long_path = "d/" + "b" * 5000 + ".jpg"
    (tmp_path / "twice.csv").write_text(f"path,label\n{long_path},a\n{long_path},b\n")
    with pytest.raises(DataError) as refused:
        read_file_list(str(tmp_path / "twice.csv"))
    assert len(str(refused.value)) < 600 and "(5,006 characters)" in str(refused.value)


def test_classes_files_are_checked_in_one_pass(tmp_path):
    from fasttl.data.labels import MAX_INDEX_CLASSES, read_classes_file

    names = [f"c{i}" for i in range(60_000)]
    (tmp_path / "dup.txt").write_text("\n".join(names + ["c123"]) + "\n")
    with pytest.raises(DataError, match="names 'c123' twice \\(line 124 and line 60001\\)"):
        read_classes_file(str(tmp_path / "dup.txt"))
    (tmp_path / "many.txt").write_text("\n".join(f"c{i}" for i in range(MAX_INDEX_CLASSES + 1)) + "\n")
    with pytest.raises(DataError, match="names 100,001 classes, more than the 100,000"):
        read_classes_file(str(tmp_path / "many.txt"))
    with pytest.raises(DataError, match="'c7' is named twice"):
        fasttl.data.file_list([], classes=names[:10] + ["c7"])


def test_bench_help_into_a_closed_pipe_ends_quietly():
    bench = subprocess.Popen([sys.executable, "-m", "fasttl", "bench", "--help"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
    bench.stdout.readline()
    bench.stdout.close()  # the reader goes, as `| head -1` does
    _, err = bench.communicate(timeout=120)
    assert b"Traceback" not in err and b"BrokenPipeError" not in err


def test_loader_arguments_are_checked_when_the_loader_is_made(tmp_path):
    cache = fasttl.FeatureCache.write(str(tmp_path / "c"), [np.ones((4, 3), np.float32)], [0, 1, 0, 1],
                                      classes=["a", "b"])
    with pytest.raises(TypeError, match="out_dtype: expected torch.float32 or torch.bfloat16, got 'float32'"):
        cache.loader(out_dtype="float32")
    with pytest.raises(OptionError, match="device: expected cpu, cuda or cuda:N, got 'meta'"):
        cache.loader(device="meta")
    with pytest.raises(TypeError, match="drop_last: expected True or False, got 'False'"):
        cache.loader(drop_last="False")
    assert len(list(cache.loader(2, out_dtype=torch.bfloat16, drop_last=True))) == 2


def test_predict_without_a_run_says_what_it_passed_over(cat_ship, tmp_path, capsys):
    folder = tmp_path / "pf"
    shutil.copytree(cat_ship / "test" / "cat", folder)
    (folder / "readme.txt").write_text("notes")
    code, out, err = cli(capsys, "predict", folder)
    assert code == 0 and out.count(".jpg") == 3
    assert "passed over 1 entry of the folders given" in err and "readme.txt" in err


def test_cut_plot_labels_stay_apart():
    from fasttl.util.outputs import plot_labels

    prefix = "camera-trap-survey-2024/north-ridge-station/"
    labels = plot_labels([prefix + "airplane", prefix + "cat", prefix + "ship", "x" * 100, "x" * 100 + "y"])
    assert len(set(labels)) == 5 and labels[1].endswith("station/cat")
    assert plot_labels(["a", "b"]) == ["a", "b"]


def test_eval_of_an_index_run_on_a_named_list_says_how_to_label_it(cat_ship, tmp_path):
    from fasttl.transfer.evaluate import evaluate_run

    (tmp_path / "classes.txt").write_text("cat\nship\n")
    for split in ("train", "test"):  # the training list by index, the test list by name
        labels = {p: ["cat", "ship"].index(p.parent.name) if split == "train" else p.parent.name
                  for p in sorted((cat_ship / split).glob("*/*.jpg"))}
        (tmp_path / f"{split}.csv").write_text("path,label\n" + "".join(f"{p},{v}\n" for p, v in labels.items()))
    out = tmp_path / "run"
    run(**one_epoch_run(tmp_path / "train.csv", out, classes_file=str(tmp_path / "classes.txt"), labels="indices"))
    with pytest.raises(DataError, match=r"trained with --labels indices, so eval reads the list's labels as indices "
                                        r"into its classes too: label it 0\.\.1 \(0 cat, 1 ship\)"):
        evaluate_run(str(out), str(tmp_path / "test.csv"), progress=False)


def test_empty_and_one_line_errors_hold_for_the_cli(cat_ship, tmp_path, capsys):
    code, _, err = cli(capsys, "bench", "distill", "--quick", "--json", tmp_path / "same.png", "--plot",
                       tmp_path / "same.png")
    assert code == 2 and "--json and --plot name the same file" in one_line_error(err)


def test_an_image_hashes_alike_as_a_file_and_as_a_tar_member(cat_ship, tmp_path):
    """The record's hash (size, first and last 4 KiB) is the same for one image's bytes wherever they
    are read from, and differs between images."""
    import io
    import tarfile

    from fasttl.transfer import trained_images

    images = sorted((cat_ship / "train").glob("*/*.jpg"))[:2]
    big = tmp_path / "big.jpg"
    big.write_bytes(images[0].read_bytes() + bytes(range(256)) * 64)  # beyond two edges: head and tail read apart
    files = [images[0], images[1], big]
    def edges(data):  # the record's reference: the size, the first and the last EDGE bytes
        return len(data), data[:trained_images.EDGE], data[max(trained_images.EDGE, len(data) - trained_images.EDGE):]

    by_file = [trained_images.content_hash(*edges(p.read_bytes())) for p in files]
    assert len(set(by_file)) == 3
    with tarfile.open(tmp_path / "s.tar", "w") as tar:
        for i, path in enumerate(files):
            data = path.read_bytes()
            for suffix, payload in (("jpg", data), ("cls", str(i % 2).encode())):
                info = tarfile.TarInfo(f"k{i}.{suffix}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    from fasttl.data.formats.webdataset import read_webdataset

    shards = read_webdataset(str(tmp_path / "s.tar"), ["a", "b"])
    assert sorted(trained_images._hashes_by_row(shards)) == sorted(by_file)
    plain = fasttl.data.FileSource([str(p) for p in files], [0, 1, 0], ["a", "b"])
    assert trained_images._hashes_by_row(plain) == by_file
