"""What the twelfth hostile pass of the second hardening round found: each case kept with the fix
that answers it."""
import io
import os
import shutil
import struct
import tarfile

import numpy as np
import pytest
import torch

import fasttl
from conftest import cli, one_epoch_run
from fasttl.data import DataError
from fasttl.util.errors import OptionError
from fasttl.transfer.job import run

pytestmark = pytest.mark.usefixtures("private_cache")


def _list(folder, rows, name="list.csv"):
    folder.mkdir(exist_ok=True)
    (folder / name).write_text("path,label\n" + "\n".join(rows) + "\n")
    return folder / name


def _images(cat_ship, split="train"):
    return sorted((cat_ship / split).glob("*/*.jpg"))


@pytest.mark.parametrize("spellings", [("cat", "cat "), ("1", "01")])
def test_list_labels_that_read_alike_are_refused_not_merged(spellings, cat_ship, tmp_path):
    from fasttl.data.formats.filelist import read_file_list

    first, second = spellings
    label = {"cat": first, "ship": second}
    rows = [f'{p},"{label[p.parent.name]}"' for p in _images(cat_ship)]
    with pytest.raises(DataError, match=rf"labels {min(first, second)!r} and {max(first, second)!r}"):
        read_file_list(str(_list(tmp_path / "l", rows)))


def test_a_padded_path_naming_a_file_of_its_own_is_refused(cat_ship, tmp_path):
    from fasttl.data.formats.filelist import read_file_list

    folder = tmp_path / "l"
    folder.mkdir()
    rows = []
    for image in _images(cat_ship):
        shutil.copy(image, folder / f" {image.parent.name}-{image.name}")
        shutil.copy(_images(cat_ship)[0], folder / f"{image.parent.name}-{image.name}")
        rows.append(f'" {image.parent.name}-{image.name}",{image.parent.name}')
    with pytest.raises(DataError, match="a file whose name has leading or trailing spaces"):
        read_file_list(str(_list(folder, rows)))
    plain = [f"{image.parent.name}-{image.name}, {image.parent.name}" for image in _images(cat_ship)]
    assert read_file_list(str(_list(folder, plain, "plain.csv"))).classes == ["cat", "ship"]  # padding still fine


@pytest.mark.parametrize("how", ["link", "hard links"])
def test_eval_of_a_test_folder_holding_the_runs_training_images_is_refused(how, cat_ship, tmp_path):
    from fasttl.transfer.evaluate import evaluate_run

    out = tmp_path / "run"
    run(**one_epoch_run(cat_ship, out))
    data = tmp_path / "data"
    shutil.copytree(cat_ship / "test", data / "train")
    if how == "link":
        (data / "test").symlink_to(cat_ship / "train")
    else:
        for image in _images(cat_ship):
            (data / "test" / image.parent.name).mkdir(parents=True, exist_ok=True)
            os.link(image, data / "test" / image.parent.name / image.name)
    with pytest.raises(DataError, match="its test split holds 12 of the run's training images"):
        evaluate_run(str(out), str(data), progress=False)
    assert not (out / "eval_metrics.json").exists()


def test_csv_cells_of_an_apostrophe_and_a_formula_stay_two():
    from fasttl.util.outputs import csv_cell

    assert {csv_cell("=cat"), csv_cell("'=cat")} == {"'=cat", "''=cat"}
    assert csv_cell("cat") == "cat"


def _jpeg_with_exif(tmp_path, orientations):
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 64, 3), np.uint8)).save(buffer, "JPEG")
    base = buffer.getvalue()

    def app1(orientation):
        body = b"Exif\0\0II*\0" + struct.pack("<IHHHII", 8, 1, 0x0112, 3, 1, orientation) + struct.pack("<I", 0)
        return b"\xff\xe1" + struct.pack(">H", len(body) + 2) + body

    path = tmp_path / f"exif{''.join(map(str, orientations))}.jpg"
    path.write_bytes(base[:2] + b"".join(app1(o) for o in orientations) + base[2:])
    return str(path)


def test_a_jpeg_with_two_exif_segments_is_refused_one_is_read(tmp_path):
    from fasttl.data.images import header_problem

    assert header_problem(_jpeg_with_exif(tmp_path, [6])) is None
    assert "two EXIF segments" in header_problem(_jpeg_with_exif(tmp_path, [1, 6]))


def test_predict_of_a_folder_follows_linked_class_folders_once(cat_ship, scratch_run, tmp_path, capsys):
    data = tmp_path / "linked"
    data.mkdir()
    for name in ("cat", "ship"):
        (data / name).symlink_to(cat_ship / "test" / name)
    (data / "again").symlink_to(cat_ship / "test" / "cat")  # one folder reached twice: read once
    code, out, err = cli(capsys, "predict", "--run", scratch_run, data, "--no-progress")
    assert code == 0 and out.count("\n") == 1 + 6, out
    assert "reached a second time" in err


@pytest.fixture(scope="module")
def scratch_run(cat_ship, tmp_path_factory):
    from conftest import finished_run

    return finished_run(cat_ship, tmp_path_factory, "scratch12")


@pytest.fixture
def caches(tmp_path):
    rng = np.random.default_rng(0)
    features = rng.standard_normal((40, 8)).astype(np.float32)
    labels = [i % 2 for i in range(40)]
    write = fasttl.FeatureCache.write
    return {"train": write(str(tmp_path / "t"), [features], labels, classes=["a", "b"], dtype="fp32"),
            "flipped": write(str(tmp_path / "f"), [features], [1 - v for v in labels], classes=["a", "b"],
                             dtype="fp32"),
            "narrow": write(str(tmp_path / "n"), [np.ones((4, 5), np.float32)], [0, 1, 0, 1], classes=["a", "b"],
                            dtype="fp32")}


def test_train_and_evaluate_head_name_what_does_not_fit(caches):
    train = caches["train"]
    with pytest.raises(OptionError, match="eval_cache: its views hold other rows or labels"):
        fasttl.heads.train_head(train, epochs=1, eval_cache=[train, caches["flipped"]], progress=False)
    with pytest.raises(OptionError, match="train: the cache holds no rows"):
        fasttl.heads.train_head(train.subset([]), epochs=1, progress=False)
    with pytest.raises(TypeError, match="train: expected a FeatureCache"):
        fasttl.heads.train_head("fc", epochs=1, progress=False)
    for arguments, message in ((dict(dtype=torch.int64), "dtype: expected torch.float32 or torch.bfloat16"),
                               (dict(patience=-1), "patience: expected a positive integer")):
        with pytest.raises(OptionError, match=message):
            fasttl.heads.train_head(train, epochs=1, progress=False, **arguments)
    head = fasttl.heads.train_head(train, epochs=1, progress=False).head
    with pytest.raises(OptionError, match="cache: its 5 features do not fit the head"):
        fasttl.heads.evaluate_head(head, caches["narrow"])
    with torch.no_grad():
        head[0].mean.fill_(float("nan"))
    with pytest.raises(fasttl.heads.fit.DivergedError, match="logits are not finite"):
        fasttl.heads.evaluate_head(head, train)


def test_file_list_checks_its_pairs_and_classes_up_front(cat_ship):
    cats = [str(p) for p in sorted((cat_ship / "train" / "cat").glob("*.jpg"))]
    ships = [str(p) for p in sorted((cat_ship / "train" / "ship").glob("*.jpg"))]
    pairs = [(p, 1) for p in cats] + [(p, 0) for p in ships]
    unprintable = "is empty or holds a character that is not printable "
    for classes, error, message in ((["a", "a"], DataError, "'a' is named twice"),
                                    (["", "b"], DataError, unprintable + r"\(empty\)"),
                                    (["a\nb", "c"], DataError, unprintable + r"\(U\+000A, a control character\)"),
                                    ([0, 1], TypeError, "classes: expected a list of class names")):
        with pytest.raises(error, match=message):
            fasttl.data.file_list(pairs, classes=classes)
    with pytest.raises(TypeError, match=r"pairs\[0\]: expected a \(path, integer label\) pair"):
        fasttl.data.file_list([(p, 1, 2) for p in cats])
    with pytest.raises(TypeError, match=r"pairs\[0\]"):
        fasttl.data.file_list([(None, 1)] + [(p, 0) for p in ships])
    with pytest.raises(DataError, match="label 1000000000000 is not below 100000"):
        fasttl.data.file_list([(cats[0], 10**12), (ships[0], 0)])


def test_a_webdataset_member_named_in_another_encoding_is_named(cat_ship, tmp_path):
    from fasttl.data.formats.webdataset import read_webdataset

    shard = tmp_path / "latin.tar"
    with tarfile.open(shard, "w", format=tarfile.GNU_FORMAT, encoding="latin-1") as tar:
        for index, image in enumerate(_images(cat_ship)):
            key = f"s{index:02d}" + ("caf\xe9" if index == 0 else "")
            for ext, data in ((".jpg", image.read_bytes()), (".cls", str(int(image.parent.name == "ship")).encode())):
                info = tarfile.TarInfo(key + ext)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    with pytest.raises(DataError, match="has a name that is not valid UTF-8"):
        read_webdataset(str(shard))


def test_the_report_says_which_score_a_cross_validated_head_was_chosen_by(cat_ship, tmp_path):
    out = tmp_path / "run"
    metrics = run(**one_epoch_run(cat_ship, out, strategy="linear", epochs=None))
    choice = metrics["notes"]["choice"]
    assert f"cross-validated accuracy {choice['cv_accuracy']:.4f}" in (out / "report.md").read_text()


def test_a_class_never_predicted_has_no_precision():
    from fasttl.transfer.metrics import classification_metrics

    logits = torch.tensor([[2.0, 0.0, 0.0], [2.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    metrics = classification_metrics(logits, torch.tensor([0, 2, 1]), ["a", "b", "c"])
    assert metrics["per_class_precision"] == {"a": 0.5, "b": 1.0, "c": None}


def test_a_blank_setting_counts_as_unset(monkeypatch, tmp_path):
    from fasttl.util import settings

    monkeypatch.setenv("FASTTL_CACHE_DIR", " ")
    assert settings.CACHE_DIR.raw() is None and not settings.CACHE_DIR.is_set()
    assert settings.CACHE_DIR.path() != os.path.abspath(" ")


def test_caches_of_two_backbones_are_not_one_feature_space(tmp_path):
    rows = [np.ones((4, 8), np.float32)]
    first, second = (fasttl.FeatureCache.write(str(tmp_path / name), rows, [0, 1, 0, 1], classes=["a", "b"],
                                               fingerprint={"backbone": {"name": name}})
                     for name in ("lite0", "lite1"))
    with pytest.raises(fasttl.cache.store.CacheError, match="concat: caches made with another backbone"):
        fasttl.FeatureCache.concat([first, second])
    with pytest.raises(OptionError, match="eval_cache: made with another backbone"):
        fasttl.heads.train_head(first, epochs=1, eval_cache=second, progress=False)
    assert len(fasttl.FeatureCache.concat([first, first])) == 8


def test_a_runs_weights_replaced_by_another_runs_are_refused(cat_ship, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    run(**one_epoch_run(cat_ship, first, seed=0))
    run(**one_epoch_run(cat_ship, second, seed=1))
    fasttl.load_run(str(first))  # its own weights: loaded
    shutil.copy(second / "scratch.safetensors", first / "scratch.safetensors")
    with pytest.raises(fasttl.transfer.rundir.RunError, match="not the weights this run wrote"):
        fasttl.load_run(str(first))


def test_a_hard_linked_webdataset_image_is_named_as_one(cat_ship, tmp_path):
    from fasttl.data.formats.webdataset import read_webdataset

    shard = tmp_path / "hl.tar"
    with tarfile.open(shard, "w") as tar:
        for index, image in enumerate(_images(cat_ship)):
            tar.add(str(image), arcname=f"s{index:02d}.jpg")
            label = str(int(image.parent.name == "ship")).encode()
            info = tarfile.TarInfo(f"s{index:02d}.cls")
            info.size = len(label)
            tar.addfile(info, io.BytesIO(label))
        link = tarfile.TarInfo("zz.jpg")
        link.type, link.linkname = tarfile.LNKTYPE, "s00.jpg"
        tar.addfile(link)
        info = tarfile.TarInfo("zz.cls")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"1"))
    with pytest.raises(DataError, match="zz.jpg is a hard link to s00.jpg"):
        read_webdataset(str(shard))
