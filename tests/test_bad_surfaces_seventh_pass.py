"""What was left after the sixth hostile pass of the second hardening round, and what the seventh
found: each case kept with the fix that answers it."""
import codecs
import csv
import os
import shutil

import numpy as np
import pytest
import torch

import fasttl
from conftest import cli, one_epoch_run, one_line_error
from fasttl.cache import CacheError
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
    out = tmp_path_factory.mktemp("seventh-run") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FASTTL_CACHE_DIR", str(tmp_path_factory.mktemp("seventh-cache")))
        run(**one_epoch_run(cat_ship, out))
    return out


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
