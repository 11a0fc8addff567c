"""The thirty-second hostile pass (27 attempts over every surface of the hardening issue; pass 31's
two fixes held): an int32 target with an ignore_index it can't hold made distillation_loss leave out
class 0 (or weigh class 1 by 0); an empty path option was read as the current folder (`--data ""`)
or as no option (`run --out ""`); `export --out x.jpg` asked for --overwrite, then refused the name;
a batch size past the row count could not be reshaped (a traceback); `bench e2e` recorded the
subset asked for, not the one used; `CacheLoader.set_epoch` took anything."""
import json
import os
import shutil

import numpy as np
import pytest
import torch

import fasttl
from conftest import cifar_subset, cli, finished_run, one_line_error
from fasttl import _reference
from fasttl.cache.order import epoch_order
from fasttl.util.errors import OptionError

pytestmark = pytest.mark.usefixtures("private_cache")


@pytest.fixture(scope="module")
def scratch_run(cat_ship, tmp_path_factory):
    return finished_run(cat_ship, tmp_path_factory, "scratch32")


@pytest.mark.parametrize("ignore_index", [2**32, 2**32 + 1, -2**63, -2**32 + 1, 2**40])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True])
def test_an_ignore_index_an_int32_target_cannot_hold_leaves_out_no_row(ignore_index, reduction, weighted):
    student, teacher = torch.randn(7, 4) * 3, torch.randn(7, 4) * 3
    target = torch.tensor([0, 1, 2, 3, 0, 1, 1])
    weight = torch.rand(4) + 0.5 if weighted else None
    kw = dict(temperature=2.0, alpha=0.7, reduction=reduction, ignore_index=ignore_index, weight=weight)
    want = _reference.distillation_loss(student.double(), teacher.double(), target, **kw)
    for dtype in (torch.int64, torch.int32):
        got = fasttl.distillation_loss(student, teacher, target.to(dtype), **kw)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6, msg=f"{dtype} target")


def test_an_in_range_ignore_index_still_leaves_out_its_rows():
    student, teacher = torch.randn(6, 3), torch.randn(6, 3)
    target = torch.tensor([0, 1, 2, 1, 0, 2])
    for dtype in (torch.int64, torch.int32):
        got = fasttl.distillation_loss(student, teacher, target.to(dtype), ignore_index=1)
        want = _reference.distillation_loss(student.double(), teacher.double(), target, ignore_index=1)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


EMPTY_PATHS = [
    (["run", "--data", "", "--out", "x"], "data", "--data"),
    (["run", "--out", ""], "out", "--out"),
    (["run", "--classes-file", ""], "classes_file", "--classes-file"),
    (["run", "--weights", ""], "weights", "--weights"),
    (["run", "--tensorboard", ""], "tensorboard", "--tensorboard"),
    (["run", "--strategy", "distill", "--teacher", ""], "teacher", "--teacher"),
    (["eval", "{run}", "--data", ""], "data", "--data"),
    (["eval", ""], "run_dir", "RUN_DIR"),
    (["predict", "--run", "{run}", "{image}", "--out", ""], "out", "--out"),
    (["predict", "--run", "", "{image}"], "run", "--run"),
    (["predict", "{image}", ""], "images", "PATH"),
    (["predict", "{image}", "--weights", ""], "weights", "--weights"),
    (["export", "{run}", "--out", ""], "out", "--out"),
    (["extract", "--data", "{data}", "--out", ""], "out", "--out"),
    (["extract", "--data", "{data}", "--out", "x", "--classes-file", ""], "classes", "--classes-file"),
    (["data", "fetch", "cifar10", "--dest", ""], "dest", "--dest"),
]


@pytest.mark.parametrize("words, dest, flag", EMPTY_PATHS, ids=[" ".join(w[:2] + [d]) for w, d, _ in EMPTY_PATHS])
def test_an_empty_path_is_refused_not_read_as_this_folder(words, dest, flag, scratch_run, cat_ship, tmp_path,
                                                         capsys, monkeypatch):
    """Run from a folder of class folders (what `--data ""` read before): nothing is scored,
    trained or written there, and the one line names the empty option."""
    here = tmp_path / "here"
    for split in ("train", "test"):
        shutil.copytree(cat_ship / split, here / split)
    before = sorted(str(p) for p in here.rglob("*"))
    run_files = sorted(os.listdir(scratch_run))
    monkeypatch.chdir(here)
    image = cat_ship / "test" / "cat" / sorted(os.listdir(cat_ship / "test" / "cat"))[0]
    filled = [w.format(run=scratch_run, image=image, data=cat_ship) for w in words]
    with pytest.raises(SystemExit) as stopped:  # refused as argparse refuses a bad value: before any work
        cli(capsys, *filled)
    code, err = stopped.value.code, capsys.readouterr().err
    line = one_line_error(err)
    assert code == 2 and line.startswith(f"fasttl: error: {dest}: an empty or blank path given as {flag}"), line
    assert sorted(str(p) for p in here.rglob("*")) == before and sorted(os.listdir(scratch_run)) == run_files


@pytest.mark.parametrize("option", ["out", "data", "classes_file", "weights"])
def test_an_empty_path_is_refused_in_python_too(option, tmp_path, monkeypatch):
    from fasttl.transfer.job import run

    monkeypatch.chdir(tmp_path)
    with pytest.raises(OptionError, match=f"^{option}: an empty or blank path"):
        run(**{option: ""}, compare="none", progress=False)
    assert os.listdir(tmp_path) == []


def test_export_names_the_ending_before_asking_for_overwrite(scratch_run, tmp_path, capsys):
    victim = tmp_path / "victim.jpg"
    victim.write_bytes(b"a photo")
    for extra in ([], ["--overwrite"]):
        code, _, err = cli(capsys, "export", scratch_run, "--out", victim, *extra)
        assert code == 2 and "does not end in .onnx" in one_line_error(err)
    assert victim.read_bytes() == b"a photo"


@pytest.mark.parametrize("shuffle", [False, True, "blocks"])
@pytest.mark.parametrize("rows", [0, 1, 7])
def test_a_batch_larger_than_the_rows_is_one_batch_of_every_row(rows, shuffle):
    order = epoch_order(rows, 2**61, shuffle, 3, 0)
    assert order.tolist() == list(range(rows))  # one batch, read in ascending order


def test_a_loader_batch_past_the_rows_gives_every_row_once(tmp_path):
    features = np.random.default_rng(0).standard_normal((9, 3)).astype(np.float32)
    cache = fasttl.FeatureCache.write(str(tmp_path / "c"), [features], [0, 1, 2] * 3, classes=["a", "b", "c"],
                                      dtype="fp32")
    for shuffle in (True, False):
        batches = list(cache.loader(batch_size=2**61, shuffle=shuffle))
        assert len(batches) == 1
        torch.testing.assert_close(batches[0][0], torch.from_numpy(features))


def test_an_mlp_run_takes_a_batch_past_its_rows(cat_ship, tmp_path):
    from fasttl.transfer.job import run

    metrics = run(data=str(cat_ship), out=str(tmp_path / "run"), strategy="mlp", epochs=1, image_size=32,
                  features="head", batch_size=2**60 + 1, compare="none", progress=False)
    assert metrics["samples"] == 6 and json.load(open(tmp_path / "run" / "config.json"))["batch_size"] == 2**60 + 1


@pytest.mark.parametrize("epoch, error", [(1.5, TypeError), (True, TypeError), ("3", TypeError), (None, TypeError),
                                          (-1, ValueError), (2**64, ValueError), (2**63, ValueError)])
def test_set_epoch_refuses_what_is_no_epoch(epoch, error, tmp_path):
    cache = fasttl.FeatureCache.write(str(tmp_path / "c"), [np.ones((5, 2), np.float32)], [0, 1, 0, 1, 0],
                                      classes=["a", "b"])
    loader = cache.loader(batch_size=2, seed=1)
    with pytest.raises(error, match="^epoch: "):
        loader.set_epoch(epoch)
    loader.set_epoch(np.int64(3))  # a NumPy integer is an epoch
    assert loader.epoch == 3 and type(loader.epoch) is int


def test_bench_e2e_records_the_subset_it_used(cifar10_root, tmp_path, monkeypatch):
    from fasttl.bench import e2e

    data = cifar_subset(cifar10_root, tmp_path / "small", ["cat", "dog", "ship"], 8, 9)
    timed = {"seconds": 1.0, "accuracy": 0.5, "extract_s": 0.0}
    monkeypatch.setattr(e2e, "usual_recipe", lambda train, test, *a, **k: dict(timed, correct=[True] * len(test)))
    monkeypatch.setattr(e2e, "fasttl_linear", lambda train, test, *a, **k: dict(timed, correct=[False] * len(test)))
    result = e2e.run(data=str(data), per_class=99_999_999_999, test_per_class=1)
    assert result["subset"] == {"train_per_class": 8, "test_per_class": 1}
    assert result["notes"][0].startswith(f"{data} subset: 24 train (up to 8/class), 3 test (up to 1/class)")
