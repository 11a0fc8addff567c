"""What was left after the sixth hostile pass of the second hardening round, and what the seventh
found: each case kept with the fix that answers it."""
import codecs
import csv
import os
import re
import shutil

import numpy as np
import pytest
import torch

import fasttl
from conftest import cli, finished_run, one_epoch_run, one_line_error
from fasttl.cache import CacheError
from fasttl.data import DataError
from fasttl.util.errors import OptionError
from fasttl.transfer.job import run

pytestmark = pytest.mark.usefixtures("private_cache")


def _scalars(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [e.step for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_curves_of_a_resumed_run_replace_the_earlier_attempts(cat_ship, tmp_path):
    pytest.importorskip("tensorboard", reason="needs the tensorboard package (fasttl[tensorboard])")
    logs, out = tmp_path / "logs", tmp_path / "run"
    run(**one_epoch_run(cat_ship, out, epochs=2, tensorboard=str(logs)))
    first = _scalars(logs / "run" / "scratch")
    assert first["loss/train"] == [1, 2] and first["test/accuracy"] == [2]
    os.remove(out / "metrics.json")  # as a run stopped after its curves were written leaves it
    run(**one_epoch_run(cat_ship, out, epochs=2, tensorboard=str(logs), resume=True))
    assert len(os.listdir(logs / "run" / "scratch")) == 2  # both attempts' files kept (they are outside the run)
    assert _scalars(logs / "run" / "scratch") == first  # each epoch once, not drawn twice


def test_a_link_at_a_models_tensorboard_folder_is_refused_before_training(cat_ship, tmp_path):
    pytest.importorskip("tensorboard", reason="needs the tensorboard package (fasttl[tensorboard])")
    logs = tmp_path / "logs"
    (logs / "run").mkdir(parents=True)
    os.symlink(tmp_path / "elsewhere", logs / "run" / "scratch")
    with pytest.raises(OptionError, match=r"logs/run/scratch is a symbolic link or not a folder"):
        run(**one_epoch_run(cat_ship, tmp_path / "run", tensorboard=str(logs)))
    assert not (tmp_path / "run").exists() and not (tmp_path / "elsewhere").exists()


@pytest.fixture(scope="module")
def finished(cat_ship, tmp_path_factory):
    """A finished one-epoch scratch run on cats and ships."""
    return finished_run(cat_ship, tmp_path_factory, "seventh")


def test_a_backslash_and_n_in_a_name_never_reads_as_a_line_break_in_the_csv(finished, cat_ship, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    names = ["a\nb.jpg", "a\\nb.jpg", "c\\d.jpg"]  # a line break; a backslash and an n; a backslash
    for name in names:
        shutil.copy(os.path.join(cat_ship, "test", "cat", "0.jpg"), images / name)
    code, _, err = cli(capsys, "predict", "--run", finished, images, "--out", tmp_path / "p.csv", "--no-progress")
    assert code == 0, err
    with open(tmp_path / "p.csv", newline="") as f:
        cells = [row["path"] for row in csv.DictReader(f)]
    assert len(set(cells)) == 3 and all("\n" not in cell for cell in cells)
    # read back as Python escapes, each cell is the file's own name
    assert sorted(os.path.basename(codecs.decode(cell, "unicode_escape")) for cell in cells) == sorted(names)


def test_fp16_cache_refuses_rows_too_faint_to_keep(tmp_path):
    rows = np.ones((4, 3), dtype=np.float32)
    rows[3] = [1e-9, -2e-9, 0.0]  # zeros in fp16: the image's features would be lost
    with pytest.raises(CacheError, match=r"chunks: chunk 0: row 3's values are all below 6.1e-05 .*largest 2e-09"):
        fasttl.FeatureCache.write(str(tmp_path / "c"), [rows], [0, 1, 0, 1], classes=["a", "b"], dtype="fp16")
    with pytest.raises(CacheError, match="c: no manifest.json"):  # a refused write leaves no manifest: never a cache
        fasttl.FeatureCache.open(str(tmp_path / "c"))
    rows[3] = 0.0  # a row of zeros is a row fp16 holds exactly
    cache = fasttl.FeatureCache.write(str(tmp_path / "z"), [rows], [0, 1, 0, 1], classes=["a", "b"], dtype="fp16")
    assert torch.equal(cache.all_features().float(), torch.from_numpy(rows))
    rows[3] = [1e-9, -2e-9, 0.0]
    cache = fasttl.FeatureCache.write(str(tmp_path / "b"), [rows], [0, 1, 0, 1], classes=["a", "b"], dtype="bf16")
    assert float(cache.all_features()[3, 1]) == pytest.approx(-2e-9, rel=1e-2)


def test_a_feature_cache_folder_that_cannot_be_made_names_fasttl_cache_dir(cat_ship, tmp_path, capsys, monkeypatch):
    (tmp_path / "a-file").write_bytes(b"")
    monkeypatch.setenv("FASTTL_CACHE_DIR", str(tmp_path / "a-file" / "cache"))
    code, _, err = cli(capsys, "run", "--data", cat_ship, "--strategy", "linear", "--image-size", "32",
                       "--out", tmp_path / "run", "--no-progress")
    line = one_line_error(err)
    assert code == 2 and "a part of the path is a file" in line, err
    assert f"in the feature cache folder FASTTL_CACHE_DIR={tmp_path / 'a-file' / 'cache'}: set FASTTL_CACHE_DIR" in line
    assert (tmp_path / "a-file").read_bytes() == b""


@pytest.mark.parametrize("dtype", [np.uint64, np.int64, np.uint8])
def test_an_out_of_range_label_is_shown_as_given(tmp_path, dtype):
    big = np.iinfo(dtype).max if dtype != np.int64 else -np.iinfo(dtype).max
    labels = np.array([0, 1, big], dtype=dtype)
    with pytest.raises(ValueError, match=rf"labels: row 2 has label {big}, outside the 2 classes \[0, 2\)"):
        fasttl.FeatureCache.write(str(tmp_path / "c"), [np.ones((3, 2), np.float32)], labels, classes=["a", "b"])


# ---- seventh pass (a helper's fresh hostile pass, 10 findings) ------------------------------------
@pytest.mark.parametrize("name", ["config.json", ".fasttl-run"])
def test_a_folder_where_a_run_file_should_be_is_one_line(finished, cat_ship, tmp_path, capsys, name):
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    os.remove(run_dir / name)
    (run_dir / name).mkdir()
    image = os.path.join(cat_ship, "test", "cat", "0.jpg")
    for words in (("predict", "--run", run_dir, image), ("eval", run_dir), ("export", run_dir, "--out",
                                                                             tmp_path / "m.onnx")):
        code, _, err = cli(capsys, *words)
        line = one_line_error(err)
        assert code == 2 and f"{run_dir / name}" in line and "Traceback" not in err, (words, err)
    with pytest.raises(fasttl.transfer.rundir.RunError, match=re.escape(str(run_dir / name))):
        fasttl.load_run(str(run_dir))


@pytest.mark.parametrize("name", ["manifest.json", "build.json"])
def test_a_folder_where_a_cache_record_should_be_is_one_line(cat_ship, tmp_path, capsys, name):
    (tmp_path / "out" / "train" / name).mkdir(parents=True)
    code, _, err = cli(capsys, "extract", "--data", cat_ship, "--out", tmp_path / "out", "--image-size", "32",
                       "--no-progress")
    assert code == 2 and name in one_line_error(err) and "Traceback" not in err, err
    with pytest.raises(CacheError, match=name):
        fasttl.FeatureCache.write(str(tmp_path / "out" / "train"), [np.ones((2, 3), np.float32)], [0, 1],
                                  classes=["a", "b"])


def test_an_os_error_naming_a_descriptor_is_still_one_line():
    from fasttl.cli import _os_error_line

    assert _os_error_line(IsADirectoryError(21, "Is a directory", 3)) == \
        "a file fasttl had open: is a folder where fasttl writes or reads a file (move it away, or use another path)"


@pytest.mark.parametrize("label", ["do\u200bg", "do\u202eg", "do\x85g"])
def test_a_list_label_with_an_invisible_character_is_refused_before_any_work(cat_ship, tmp_path, label):
    from fasttl.data.formats.filelist import read_file_list

    rows = [f"{os.path.join(cat_ship, 'train', c, f'{i}.jpg')},{c if i % 2 else c.replace('cat', label)}"
            for c in ("cat", "ship") for i in range(4)]
    listed = tmp_path / "list.csv"
    listed.write_text("path,label\n" + "\n".join(rows) + "\n")
    with pytest.raises(DataError, match=rf"list.csv row 1 .* not printable \(U\+{ord(label[2]):04X}.*in its label"):
        read_file_list(str(listed))
    with pytest.raises(DataError, match=r"not printable"):
        run(**one_epoch_run(listed, tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_a_feature_cache_folder_inside_the_data_is_refused_before_any_work(cat_ship, tmp_path, monkeypatch):
    data = tmp_path / "flat"
    shutil.copytree(os.path.join(cat_ship, "train"), data)
    before = sorted(os.listdir(data))
    for inside in (data, data / "cat"):
        monkeypatch.setenv("FASTTL_CACHE_DIR", str(inside))
        message = rf"^data: the feature cache folder FASTTL_CACHE_DIR={re.escape(str(inside))} is inside the data"
        with pytest.raises(OptionError, match=message + r" .*set FASTTL_CACHE_DIR to a folder outside"):
            run(**one_epoch_run(data, tmp_path / "run", strategy="linear", epochs=None))
    assert sorted(os.listdir(data)) == before and not (tmp_path / "run").exists()


def test_predict_on_folders_passes_over_run_folders_and_says_what_it_left(finished, cat_ship, tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    shutil.copy(os.path.join(cat_ship, "test", "cat", "0.jpg"), folder / "0.jpg")
    shutil.copytree(finished, folder / "oldrun")  # its confusion_matrix.png and curves.png are no photos
    os.symlink(tmp_path / "nowhere.jpg", folder / "dangling.jpg")
    os.mkfifo(folder / "fifo.jpg")
    code, out, err = cli(capsys, "predict", "--run", finished, folder, "--no-progress")
    assert code == 0 and out.count("\n") == 2 and "0.jpg" in out and ".png" not in out, out
    assert "passed over 3 entries of the folders given" in err
    for name, why in (("oldrun", "a fasttl run folder"), ("dangling.jpg", "broken link"),
                      ("fifo.jpg", "not a regular")):
        assert re.search(rf"{name} \([^)]*{why}", err), (name, err)


def test_a_run_without_metrics_is_unfinished_to_every_reader(finished, cat_ship, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    os.remove(run_dir / "metrics.json")
    for words in (("predict", "--run", run_dir, os.path.join(cat_ship, "test", "cat", "0.jpg")), ("eval", run_dir),
                  ("export", run_dir, "--out", tmp_path / "m.onnx")):
        code, _, err = cli(capsys, *words)
        assert code == 2 and "the run did not finish (no metrics.json)" in one_line_error(err), (words, err)
    assert not (run_dir / "eval_metrics.json").exists()
    (run_dir / "metrics.json").mkdir()
    with pytest.raises(fasttl.transfer.rundir.RunError, match=r"did not finish \(metrics.json there is not a plain"):
        fasttl.load_run(str(run_dir))


def test_feature_cache_rows_are_indices_or_a_mask_never_a_truncated_number(tmp_path):
    rows = np.arange(32, dtype=np.float32).reshape(4, 8)
    cache = fasttl.FeatureCache.write(str(tmp_path / "c"), [rows], [0, 1, 0, 1], classes=["a", "b"], dtype="fp32")
    for mask in (torch.tensor([True, False, True, False]), np.array([True, False, True, False])):
        picked = cache.subset(mask)
        assert torch.equal(picked.all_features(), torch.from_numpy(rows[[0, 2]])) and picked.labels.tolist() == [0, 0]
    assert torch.equal(cache.subset([3, 1]).all_features(), torch.from_numpy(rows[[3, 1]]))
    assert torch.equal(cache.gather(np.array([2, 0])), torch.from_numpy(rows[[2, 0]]))
    for bad, error, message in (([0.5], TypeError, r"rows: expected integer row indices or a boolean mask, got "
                                                    r"torch.float64"),
                                ([True, False], ValueError, r"rows: a boolean mask needs one entry per row \(4\)"),
                                (np.array([[0, 1]]), ValueError, r"rows: expected a 1-D list")):
        with pytest.raises(error, match=message):
            cache.subset(bad)
    with pytest.raises(ValueError, match=r"caches: expected a non-empty list of FeatureCache"):
        fasttl.FeatureCache.concat([])


def test_bf16_and_fp32_caches_refuse_what_overflows_them(tmp_path):
    with pytest.raises(CacheError, match=r"chunk 0: a value of magnitude 3.4e\+38 overflows bf16 \(largest 3.39e"):
        fasttl.FeatureCache.write(str(tmp_path / "b"), [np.full((2, 4), 3.4e38, np.float32)], [0, 1],
                                  classes=["a", "b"], dtype="bf16")
    kept = fasttl.FeatureCache.write(str(tmp_path / "k"), [np.full((2, 4), 3.38e38, np.float32)], [0, 1],
                                     classes=["a", "b"], dtype="bf16")  # rounds to bf16's largest, not to inf
    assert bool(torch.isfinite(kept.all_features()).all())
    with pytest.raises(ValueError, match=r"chunk 0 holds a value of magnitude 1e\+300, beyond float32's"):
        fasttl.FeatureCache.write(str(tmp_path / "f"), [np.full((2, 4), 1e300)], [0, 1], classes=["a", "b"],
                                  dtype="fp32")


def test_one_file_reached_twice_in_class_folders_is_refused(cat_ship, tmp_path):
    linked = tmp_path / "linked"
    shutil.copytree(cat_ship, linked)
    os.symlink("cat", linked / "train" / "cat2")
    os.symlink("cat", linked / "test" / "cat2")
    with pytest.raises(DataError, match=r"train/cat2/0.jpg is the same file as .*train/cat/0.jpg \(a link\?\); an "
                                        r"image belongs to one class"):
        fasttl.data.class_folder_splits(str(linked))
    leaked = tmp_path / "leaked"
    shutil.copytree(cat_ship, leaked)
    os.link(leaked / "train" / "cat" / "1.jpg", leaked / "test" / "cat" / "x.jpg")
    with pytest.raises(DataError, match=r"test/cat/x.jpg is the same file as .*train/cat/1.jpg .*never a test image"):
        fasttl.data.class_folder_splits(str(leaked))


def test_true_is_never_taken_for_a_count_of_one(tmp_path):
    # one positive-integer check for every layer (fasttl.util.checks): the cache loader and a build's
    # shard_rows took True as 1 before
    cache = fasttl.FeatureCache.write(str(tmp_path / "c"), [np.ones((2, 3), np.float32)], [0, 1], classes=["a", "b"])
    with pytest.raises(ValueError, match=r"batch_size: expected a positive integer, got True"):
        cache.loader(batch_size=True)
    from fasttl.cache.build import build_cache
    from fasttl.data.sources import ArraySource

    source = ArraySource(np.zeros((2, 8, 8, 3), np.uint8), np.array([0, 1]), ["a", "b"])
    with pytest.raises(ValueError, match=r"shard_rows: expected a positive integer, got True"):
        build_cache(None, source, str(tmp_path / "b"), shard_rows=True)
    assert not (tmp_path / "b").exists()
