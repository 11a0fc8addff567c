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
@pytest.mark.parametrize("lr", ["1e39", "3.5e38"])
def test_an_lr_float32_cannot_hold_is_an_option_error(cat_ship, tmp_path, capsys, lr):
    out = tmp_path / "r"
    code, _, err = cli(capsys, "run", "--data", cat_ship, "--out", out, "--strategy", "mlp", "--epochs", 1,
                       "--image-size", 32, "--compare", "none", "--no-progress", "--lr", lr)
    # before: a ValueError traceback from fasttl/optim.py after the features were extracted, config.json left
    assert code == 2 and one_line_error(err) == f"fasttl: error: lr: expected a finite number > 0 and at most " \
        f"3.402823e+38 (float32's largest; the optimizers step in float32), got {float(lr)!r}"
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
