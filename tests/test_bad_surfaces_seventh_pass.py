"""What was left after the sixth hostile pass of the second hardening round, and what the seventh
found: each case kept with the fix that answers it."""
import codecs
import csv
import os
import re
import shutil
import zlib

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
    in_the_way = tmp_path / "a-file"
    assert code == 2 and line.startswith(f"fasttl: error: {in_the_way}: a file, where the path needs a folder"), err
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
    from fasttl.cli_errors import os_error_line as _os_error_line

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
    for bad, error, message in (([0.5], TypeError, r"rows: expected integer row indices, a slice or a boolean mask, "
                                                    r"got torch.float64"),
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


# ---- eighth pass (a helper's fresh hostile pass, 14 findings) ---------------------------------------
def _tar(path, members):
    import io
    import tarfile

    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _shard_members(cat_ship, keys=None):
    images = [open(os.path.join(cat_ship, "train", c, f"{i}.jpg"), "rb").read() for c in ("cat", "ship")
              for i in range(3)]
    keys = keys or [f"k{i}" for i in range(len(images))]
    return [m for i, (key, image) in enumerate(zip(keys, images))
            for m in ((f"{key}.jpg", image), (f"{key}.cls", str(i // 3).encode()))]


def test_a_shard_named_twice_is_refused_and_dotted_keys_are_listed(cat_ship, tmp_path):
    from fasttl.data.formats.webdataset import read_webdataset

    _tar(tmp_path / "a.tar", _shard_members(cat_ship))
    os.symlink("a.tar", tmp_path / "b.tar")
    for pattern in ("{a,a}.tar", "{a,b}.tar"):
        with pytest.raises(DataError, match=r"[ab]\.tar (is named twice|is the same file as .*a\.tar \(a link\?\)); "
                                            r"its samples would be read twice"):
            read_webdataset(str(tmp_path / pattern))
    keys = ["k0", "k1.v2", "k2", "k3", "k4.v2", "k5"]
    _tar(tmp_path / "dots.tar", _shard_members(cat_ship, keys))
    shards = read_webdataset(str(tmp_path / "dots.tar"))
    assert len(shards) == 4 and dict(shards.skipped) == {
        f"dots.tar/{k}": f"no .jpg/.jpeg/.png image or .cls among its members {k}.v2.jpg, {k}.v2.cls (a key ends at "
                         "the first dot of a member's name)" for k in ("k1", "k4")}


def test_a_file_list_naming_one_image_through_a_link_or_a_hard_link_is_refused(cat_ship, tmp_path):
    from fasttl.data.formats.filelist import read_file_list

    os.symlink(cat_ship, tmp_path / "alias")
    rows = [f"{os.path.join(cat_ship, 'train', c, f'{i}.jpg')},{c}" for c in ("cat", "ship") for i in range(3)]
    for extra in ("alias/train/cat/0.jpg,ship", "hard.jpg,ship"):
        if extra.startswith("hard"):
            os.link(os.path.join(cat_ship, "train", "cat", "0.jpg"), tmp_path / "hard.jpg")
        (tmp_path / "list.csv").write_text("path,label\n" + "\n".join(rows + [extra]) + "\n")
        with pytest.raises(DataError, match=r"is the same file as .*train/cat/0.jpg \(a link\?\); a list names each "
                                            r"image once"):
            read_file_list(str(tmp_path / "list.csv"))


def test_one_name_in_two_unicode_forms_is_refused_everywhere_a_class_is_named(cat_ship, tmp_path):
    import unicodedata

    from fasttl.data.formats.filelist import read_file_list
    from fasttl.data.labels import read_classes_file

    nfc, nfd = unicodedata.normalize("NFC", "caf\u00e9"), unicodedata.normalize("NFD", "caf\u00e9")
    rows = [f"{os.path.join(cat_ship, 'train', 'cat', f'{i}.jpg')},{(nfc, nfd)[i % 2]}" for i in range(4)]
    rows += [f"{os.path.join(cat_ship, 'train', 'ship', f'{i}.jpg')},ship" for i in range(3)]
    (tmp_path / "nf.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    with pytest.raises(DataError, match=r"two Unicode forms"):
        read_file_list(str(tmp_path / "nf.csv"))
    (tmp_path / "classes.txt").write_text(f"{nfc}\n{nfd}\n")
    with pytest.raises(DataError, match=r"classes: .*classes.txt names .* two Unicode forms"):
        read_classes_file(str(tmp_path / "classes.txt"))
    folders = tmp_path / "folders"
    for name in (nfc, nfd):
        shutil.copytree(os.path.join(cat_ship, "train", "cat"), folders / name)
    with pytest.raises(DataError, match=r"has class folders .* two Unicode forms"):
        fasttl.data.scan_class_folder(str(folders))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA GPU visible (the CUDA kernels are compiled, but only a GPU machine "
                                          "runs them)"))])
@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_a_nan_teacher_row_gives_a_nan_loss_as_its_gradient_does(device, alpha):
    from fasttl import _reference

    torch.manual_seed(zlib.crc32(f"nan-teacher-{device}-{alpha}".encode()))
    student, teacher, target = torch.randn(3, 5), torch.randn(3, 5), torch.tensor([0, 1, 2])
    teacher[1] = float("nan")
    teacher[2, 0] = float("nan")
    student = student.to(device).requires_grad_()
    loss = fasttl.distillation_loss(student, teacher.to(device), target.to(device), temperature=2.0, alpha=alpha,
                                    reduction="none")
    expected = _reference.distillation_loss(student.detach().cpu().double(), teacher.double(), target,
                                            temperature=2.0, alpha=alpha, reduction="none")
    assert torch.equal(loss.isnan().cpu(), expected.isnan()) and loss[1:].isnan().all()
    assert torch.allclose(loss[0].cpu().double(), expected[0], rtol=1e-4)
    loss.sum().backward()
    assert student.grad[1:].isnan().all() and student.grad[0].isfinite().all()


@pytest.mark.parametrize("value", ["10\u2078", "\u00b2", "\u0661\u0660"])
def test_a_pixel_budget_in_other_digits_is_one_line_naming_it(monkeypatch, value):
    from fasttl.data.images import max_image_pixels

    monkeypatch.setenv("FASTTL_MAX_IMAGE_PIXELS", value)
    with pytest.raises(DataError, match=r"^FASTTL_MAX_IMAGE_PIXELS: expected a positive number of pixels"):
        max_image_pixels()


def test_empty_settings_are_unset_and_no_folder_fasttl_writes_goes_among_the_images(cat_ship, tmp_path,
                                                                                   monkeypatch):
    from fasttl.util import settings

    monkeypatch.setenv("FASTTL_STATE_DIR", "")
    assert settings.STATE_DIR.path() == os.path.expanduser(settings.STATE_DIR.default)
    assert not settings.STATE_DIR.is_set()
    data = tmp_path / "data"
    shutil.copytree(cat_ship, data)
    monkeypatch.setenv("FASTTL_CACHE_DIR", str(tmp_path / "cache"))
    for variable, place, message in (("FASTTL_STATE_DIR", data / "train", "FASTTL_STATE_DIR"),
                                     (None, data / "train", "--tensorboard")):
        with monkeypatch.context() as patch:
            if variable:
                patch.setenv(variable, str(place))
            options = {} if variable else {"tensorboard": str(place)}
            with pytest.raises(OptionError, match=rf"^data: .*{message}=.* is inside the data folder"):
                run(**one_epoch_run(data, tmp_path / "run", **options))
    assert sorted(os.listdir(data / "train")) == ["cat", "ship"] and not (tmp_path / "run").exists()


def test_eval_of_a_classes_file_run_on_class_folders_compares_the_classes(cat_ship, tmp_path, capsys):
    rows = [f"{os.path.join(cat_ship, 'train', c, f'{i}.jpg')},{c}" for c in ("cat", "ship") for i in range(6)]
    (tmp_path / "list.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    (tmp_path / "classes.txt").write_text("cat\nship\n")
    run(**one_epoch_run(tmp_path / "list.csv", tmp_path / "run", classes_file=str(tmp_path / "classes.txt")))
    code, out, err = cli(capsys, "eval", tmp_path / "run", "--data", cat_ship, "--no-progress")
    assert code == 0 and "accuracy" in out and "classes-file" not in err, err
    (tmp_path / "classes.txt").write_text("ship\ncat\n")  # a run whose classes are in another order
    run(**one_epoch_run(tmp_path / "list.csv", tmp_path / "other", classes_file=str(tmp_path / "classes.txt")))
    code, out, err = cli(capsys, "eval", tmp_path / "other", "--data", cat_ship, "--no-progress")
    assert code == 0 and "accuracy" in out, err  # the same names in another order: matched by name
    (tmp_path / "classes.txt").write_text("ship\ncat\nfrog\n")
    from PIL import Image

    noise = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    (tmp_path / "own").mkdir()  # its folder holds images: the test's feature cache stays out of it
    Image.fromarray(noise).save(tmp_path / "own" / "frog.jpg")  # its own: a copy of a test image would train on it
    rows.append(f"{tmp_path / 'own' / 'frog.jpg'},frog")  # one image labelled frog
    (tmp_path / "list.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    run(**one_epoch_run(tmp_path / "list.csv", tmp_path / "three", classes_file=str(tmp_path / "classes.txt")))
    code, _, err = cli(capsys, "eval", tmp_path / "three", "--data", cat_ship, "--no-progress")
    assert code == 2 and "has classes the run has not (none) and lacks some it has ('frog')" in one_line_error(err)


def test_a_line_break_in_a_name_never_starts_a_line_of_its_own(cat_ship, tmp_path, capsys):
    data = tmp_path / "nl\nfasttl: error: spoofed"
    shutil.copytree(cat_ship, data)
    run(**one_epoch_run(data, tmp_path / "run", progress=True))
    out = capsys.readouterr().out
    assert not any(line.startswith("fasttl: error: spoofed") for line in out.splitlines()), out
    code, out, err = cli(capsys, "eval", tmp_path / "run", "--no-progress")
    assert code == 0 and out.count("\n") == 1 and "nl\\nfasttl: error: spoofed" in out, out


def test_predict_on_a_run_folder_itself_passes_it_over(finished, capsys):
    code, _, err = cli(capsys, "predict", "--run", finished, finished, "--no-progress")
    assert code == 2 and "no .jpg/.jpeg/.png images" in one_line_error(err), err


def test_fetch_never_writes_through_a_hard_link_at_its_partial_download(tmp_path, capsys):
    from fasttl.data import fetch as fetch_module

    mine = tmp_path / "mine.txt"
    mine.write_bytes(b"my notes")
    (tmp_path / "dest").mkdir()
    os.link(mine, tmp_path / "dest" / fetch_module.partial_name(fetch_module.REMOTES["cifar10"], "0" * 64))
    with pytest.raises(fetch_module.DownloadError, match=r"has another name \(a hard link\)"):
        fetch_module.fetch("cifar10", url="http://127.0.0.1:9/none.tar.gz", sha256="0" * 64,
                           dest=str(tmp_path / "dest"), progress=False)
    assert mine.read_bytes() == b"my notes"


def test_an_archive_whose_members_clash_is_named_not_the_destination(tmp_path):
    import io
    import tarfile

    from fasttl.data.archive import extract

    archive = tmp_path / "clash.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name, data in (("cifar-10-batches-py/data_batch_1", b"x" * 100),
                           ("cifar-10-batches-py/data_batch_1/x", b"y")):  # a file where a folder goes
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (tmp_path / "dest").mkdir()
    with pytest.raises(DataError, match=r"^mirror: cannot be extracted \(.* at .*data_batch_1.*: its members clash\); "
                                        r"nothing extracted"):
        extract(str(archive), "cifar-10-batches-py", str(tmp_path / "dest"), source="mirror")
    assert os.listdir(tmp_path / "dest") == []
