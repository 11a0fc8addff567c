"""The sixty-seventh hostile pass (about 230 attempts on 62d4ee9) found 8: --lr above float32's
range passed the option check and failed in the optimizer after extraction; CIFAR class names
stored as UTF-8 bytes were read as Latin-1 ('cafÃ©' in every report); a FeatureCache.write cache
in a project's train/ made the whole project a cache folder; names spelled with ZWNJ/ZWJ/NBSP
were refused as "a control character"; a test split's Cyrillic look-alike class was named
unescaped; ImageLoader checked counts, flags and seeds its own way (numpy refused, bools taken
as counts, seeds folded modulo 2**64); evaluate_run took any run_dir and progress value; numpy
bools were refused as predict_run's and loader's flags."""
import os
import pickle

import numpy as np
import pytest

from conftest import cli, one_line_error


# ---- F1: --lr beyond float32 is refused before any work -------------------------------------------------------------
@pytest.mark.parametrize("lr", ["1e39", "3.5e38", "1e-50", "1e-39"])
def test_an_lr_float32_cannot_hold_is_an_option_error(cat_ship, tmp_path, capsys, lr):
    out = tmp_path / "r"
    code, _, err = cli(capsys, "run", "--data", cat_ship, "--out", out, "--strategy", "mlp", "--epochs", 1,
                       "--image-size", 32, "--compare", "none", "--no-progress", "--lr", lr)
    # before: a ValueError traceback from fasttl/optim.py after the features were extracted, config.json left;
    # 1e-50 (pass 68's observation): 0 in float32, an untrained model and exit 0
    assert code == 2 and one_line_error(err) == f"fasttl: error: lr: expected a number from 1.175494e-38 to " \
        f"3.402823e+38 (float32's normal range; the optimizers step in float32), got {float(lr)!r}"
    assert not out.exists()


# ---- F2: CIFAR class names as bytes are UTF-8 ---------------------------------------------------------------------
def _cifar(root, names, protocol):
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    with open(root / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": names}, f, protocol=protocol)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(root / name, "wb") as f:
            pickle.dump({b"data": rng.integers(0, 256, (6, 3072), dtype=np.uint8), b"labels": [0, 1, 2] * 2}, f,
                        protocol=protocol)


@pytest.mark.parametrize("protocol", [2, 4])
def test_cifar_names_as_bytes_are_read_as_utf8(tmp_path, protocol):
    from fasttl.data import load_cifar_pickles
    from fasttl.util.errors import DataError

    root = tmp_path / "cifar-10-batches-py"
    _cifar(root, ["caf\u00e9".encode(), "\u043a\u043e\u0442".encode(), b"dog"], protocol)
    # before: ['cafÃ©', ...], and 'кот' refused as not printable (its Latin-1 reading)
    assert load_cifar_pickles(str(root), True).classes == ["caf\u00e9", "\u043a\u043e\u0442", "dog"]
    os.remove(root / "batches.meta")
    with open(root / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [b"caf\xe9", b"dog", b"cat"]}, f, protocol=protocol)  # Latin-1 bytes
    with pytest.raises(DataError, match=r"batches.meta: its 'label_names' holds b'caf\\xe9', bytes that are not "
                                        r"UTF-8 text; write the class names as UTF-8 \(or as str\)$"):
        load_cifar_pickles(str(root), True)
    os.remove(root / "batches.meta")
    with open(root / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [b"cat", "\u0441at".encode(), b"dog"]}, f, protocol=protocol)
    with pytest.raises(DataError, match=r"differ only in letters drawn alike"):  # a look-alike read as itself
        load_cifar_pickles(str(root), True)


# ---- F3: caches a script wrote into a project's train/ and test/ make no extract root of the project --------------
def test_a_project_holding_written_train_and_test_caches_takes_outputs(cat_ship, tmp_path, capsys, monkeypatch):
    import fasttl
    from fasttl.cache.folder import enclosing_cache_folder

    project = tmp_path / "proj"
    for split in ("train", "test"):
        fasttl.FeatureCache.write(str(project / split), [np.zeros((3, 4), np.float32)], [0, 1, 0],
                                  classes=["a", "b"], dtype="fp32")
    monkeypatch.chdir(project)
    # before: "out: .../proj/runs/scratch-scratch is in the feature cache folder .../proj (it holds train/features-...)"
    assert enclosing_cache_folder(str(project / "runs")) is None
    code, _, err = cli(capsys, "run", "--data", cat_ship, "--strategy", "scratch", "--epochs", 1, "--image-size", 32,
                       "--compare", "none", "--no-progress")
    assert code == 0, err
    folder, proof = enclosing_cache_folder(str(project / "train" / "x.csv"))  # the caches themselves stay guarded
    assert folder == str(project / "train") and proof.startswith("features-")


# ---- F4: names spelled with joiners or a no-break space are names; the refusal names the character -----------------
@pytest.mark.parametrize("name", ["\u06a9\u062a\u0627\u0628\u200c\u062e\u0627\u0646\u0647",
                                  "\U0001f468\u200d\U0001f469\u200d\U0001f467", "Mme\u00a0Curie"],
                         ids=["persian-zwnj", "emoji-zwj", "nbsp"])
def test_names_spelled_with_joiners_or_a_no_break_space_are_taken(tmp_path, name):
    from fasttl.data.formats.filelist import read_file_list
    from fasttl.data.formats.folder import class_folder_splits
    from fasttl.data.labels import read_classes_file

    from PIL import Image

    root = tmp_path / "data"
    for split in ("train", "test"):
        for label in (name, "dog"):
            (root / split / label).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(root / split / label / "0.jpg")
    # before: "has a class folder named ..., with a control character; rename it" (none of them is one)
    assert class_folder_splits(str(root))[0].classes == sorted([name, "dog"])
    (tmp_path / "classes.txt").write_text(f"{name}\ndog\n", encoding="utf-8")
    assert read_classes_file(str(tmp_path / "classes.txt")) == [name, "dog"]
    (tmp_path / "list.csv").write_text(f"path,label\n{root / 'train' / name / '0.jpg'},{name}\n"
                                       f"{root / 'train' / 'dog' / '0.jpg'},dog\n", encoding="utf-8")
    assert sorted(read_file_list(str(tmp_path / "list.csv")).classes) == sorted([name, "dog"])


def test_an_unprintable_character_is_named_as_what_it_is(tmp_path):
    from fasttl.data.formats.folder import class_folder_splits
    from fasttl.util.errors import DataError

    for split in ("train", "test"):
        for label in ("do\u200bg", "cat"):
            (tmp_path / split / label).mkdir(parents=True)
    # before: "with a control character" for a zero-width space
    with pytest.raises(DataError, match=r"class folder named 'do\\u200bg', with a character that is not printable "
                                        r"\(U\+200B ZERO WIDTH SPACE, an invisible format character\); rename it$"):
        class_folder_splits(str(tmp_path))
    twin = tmp_path / "twin"  # a name differing from another only in a joiner is still refused, as a look-alike
    for split in ("train", "test"):
        for label in ("do\u200cg", "dog"):
            (twin / split / label).mkdir(parents=True)
    with pytest.raises(DataError, match=r"differ only in characters that show nothing"):
        class_folder_splits(str(twin))


# ---- F5: a test split whose class differs from the training split's only by a look-alike letter ---------------------
def test_a_look_alike_class_in_the_test_split_is_named_escaped(tmp_path):
    from PIL import Image

    from fasttl.data.formats.folder import class_folder_splits
    from fasttl.util.errors import DataError

    for split, names in (("train", ["cat", "dog"]), ("test", ["\u0441at", "dog"])):
        for name in names:
            (tmp_path / split / name).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(tmp_path / split / name / "0.jpg")
    # before: "has classes ['dog', 'сat'], expected ['cat', 'dog'] (as in the training split)", alike on a terminal
    with pytest.raises(DataError) as refused:
        class_folder_splits(str(tmp_path))
    assert str(refused.value) == f"data: {tmp_path / 'test'} has classes the training split has not " \
        "('\\u0441at') and lacks some it has ('cat'); 'cat' and '\\u0441at' differ only in letters drawn alike (a " \
        "Cyrillic, Greek or full-width letter for a Latin one)"


# ---- F6: ImageLoader checks its counts, flags and seeds as the rest of the API does ----------------------------------
@pytest.fixture
def array_source():
    from fasttl.data.sources import ArraySource

    rng = np.random.default_rng(6)
    return ArraySource(rng.integers(0, 256, (10, 8, 8, 3), dtype=np.uint8), np.arange(10) % 2, ["a", "b"])


def _loader(source, **kw):
    from fasttl.data.loader import ImageLoader
    from fasttl.data.spec import TransformSpec

    spec = TransformSpec(8, (0.5,) * 3, (0.5,) * 3, 1.0, False, 0, False)
    return ImageLoader(source, spec, **dict({"batch_size": 4, "backend": "torch", "num_workers": 0}, **kw))


def _order(loader):
    return [labels.tolist() for _, labels in loader]


def test_image_loader_takes_numpy_counts_and_flags(array_source):
    plain = _loader(array_source, shuffle=True, seed=3, num_shards=2, shard_id=1, drop_last=True)
    # before: "batch_size: expected a positive integer, got np.int64(4)", "shard_id: ... got 0" for num_shards
    numpy = _loader(array_source, batch_size=np.int64(4), shuffle=np.True_, seed=np.uint64(3), num_shards=np.int64(2),
                    shard_id=np.array(1), drop_last=np.bool_(True), num_workers=np.int64(0))
    assert _order(numpy) == _order(plain) and len(numpy) == len(plain) == 1


@pytest.mark.parametrize("kw, error, said", [
    ({"seed": -1}, ValueError, r"^seed: expected an integer in \[0, 2\*\*64\), got -1$"),
    ({"seed": 2**64}, ValueError, r"^seed: expected an integer in \[0, 2\*\*64\), got 18446744073709551616$"),
    ({"seed": 1.0}, TypeError, r"^seed: expected an integer, got 1.0$"),
    ({"num_shards": True}, ValueError, r"^num_shards: expected a positive integer, got True$"),
    ({"num_shards": 2, "shard_id": True}, ValueError, r"^shard_id: expected an integer in \[0, num_shards=2\), got "
                                                      r"True$"),
    ({"num_shards": 10**30, "shard_id": 5}, ValueError, r"^num_shards: expected at most 1,048,576 \(one per process"),
    ({"num_shards": 2, "shard_id": 2}, ValueError, r"^shard_id: expected an integer in \[0, num_shards=2\), got 2$"),
], ids=["seed-negative", "seed-2**64", "seed-float", "shards-bool", "shard-bool", "shards-huge", "shard-past"])
def test_image_loader_refuses_what_is_no_count_naming_it(array_source, kw, error, said):
    # before: seeds folded modulo 2**64 (-1 gave 2**64 - 1's order), bools taken as counts, a torch overflow
    with pytest.raises(error, match=said):
        _loader(array_source, **kw)


# ---- F7 and F8: evaluate_run checks its arguments; numpy bools are flags --------------------------------------------
@pytest.fixture(scope="module")
def scratch_run(cat_ship, tmp_path_factory):
    from conftest import finished_run

    return finished_run(cat_ship, tmp_path_factory, "scratch67")


@pytest.mark.parametrize("given, said", [
    ("", r"^run_dir: an empty or blank path \(an unset variable\?\); give the run folder"),
    (b"runs/r1", r"^run_dir: expected the run folder's path \(a str or a pathlib.Path\), got bytes$"),
    (5, r"^run_dir: expected the run folder's path \(a str or a pathlib.Path\), got int$"),
    (None, r"^run_dir: expected the run folder's path \(a str or a pathlib.Path\), got NoneType$"),
], ids=["empty", "bytes", "int", "none"])
def test_evaluate_run_names_a_run_folder_that_is_none(given, said):
    from fasttl.transfer.evaluate import evaluate_run
    from fasttl.util.errors import OptionError

    # before: ": not a folder, so not a fasttl run folder", or bare TypeErrors from os.path
    with pytest.raises(OptionError, match=said):
        evaluate_run(given)


def test_evaluate_and_predict_take_numpy_bools_and_refuse_other_flags(scratch_run, cat_ship, tmp_path):
    from fasttl.predict import predict_run
    from fasttl.transfer.evaluate import evaluate_run
    from fasttl.util.errors import OptionError

    with pytest.raises(OptionError, match=r"^progress: expected True or False, got 'no'$"):
        evaluate_run(str(scratch_run), progress="no")  # before: taken, as truthy
    evaluate_run(str(scratch_run), progress=np.False_)
    image = str(sorted((cat_ship / "test" / "cat").iterdir())[0])
    # before: "overwrite: expected True or False, got np.True_"
    done = predict_run(str(scratch_run), [image], out=str(tmp_path / "p.csv"), overwrite=np.True_, progress=np.False_)
    assert done["out"] == str(tmp_path / "p.csv") and done["rows"] == 1
    with pytest.raises(OptionError, match=r"^paths: expected image files or folders \(a path, or a list of them\), "
                                          r"got NoneType$"):
        predict_run(str(scratch_run), None, progress=False)  # before: TypeError: 'NoneType' object is not iterable
    from fasttl.util.errors import DataError
    with pytest.raises(DataError, match=r"^no images given \(give image files or folders\)$"):
        predict_run(str(scratch_run), iter([]), progress=False)


def test_a_cache_loader_takes_a_numpy_bool_for_drop_last(tmp_path):
    import fasttl

    cache = fasttl.FeatureCache.write(str(tmp_path / "c"), [np.zeros((5, 4), np.float32)], [0, 1, 0, 1, 0],
                                      classes=["a", "b"], dtype="fp32")
    # before: "drop_last: expected True or False, got np.False_" (shuffle=np.False_ in the same call was taken)
    assert len(cache.loader(batch_size=2, shuffle=np.False_, drop_last=np.True_)) == 2

