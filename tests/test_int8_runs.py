"""int8 extraction in a run (`fasttl run --extract-precision int8`): one graph, calibrated on a
seeded sample of the run's training images, extracts every split (train, test, the mirrored
views, validation); it is kept in the run folder (its SHA-256 in the marker), so predict and eval
go through the same graph and repeat the run's predictions exactly; a missing, edited or doctored
graph is a one-line error naming it; the strategies that don't train on pooled features refuse it."""
import hashlib
import json
import os

import pytest
import torch

from conftest import cli, one_line_error

from fasttl.cache import engines
from fasttl.cache.store import CacheError

pytestmark = pytest.mark.skipif(not engines.onnxruntime_available(),
                                reason="onnxruntime is not installed (pip install onnx onnxruntime)")
SIZE = 48


@pytest.fixture(scope="module")
def int8_run(tmp_path_factory, three_classes):
    """A finished linear run on int8 features (its own feature cache folder)."""
    import fasttl.util.settings as settings_module
    from fasttl.transfer.job import run

    root = tmp_path_factory.mktemp("int8-run")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(settings_module.CACHE_DIR.name, str(root / "feature-cache"))
        patch.setattr(engines, "_EXPORTED", {})
        metrics = run(data=str(three_classes), image_size=SIZE, extract_precision="int8", features="multi",
                      compare="none", out=str(root / "run"), progress=False)
    return root, metrics


def _caches(root):
    """{split folder name: manifest} of the run's caches."""
    found = {}
    for family in os.listdir(root / "feature-cache"):
        for name in os.listdir(root / "feature-cache" / family):
            manifest = root / "feature-cache" / family / name / "manifest.json"
            if manifest.is_file():
                found[name.split("-")[0] + ("-mirror" if "-mirror-" in name else "")] = json.loads(manifest.read_text())
    return found


def test_every_split_goes_through_the_graph_the_training_images_calibrated(int8_run):
    root, metrics = int8_run
    config = json.loads((root / "run" / "config.json").read_text())
    key = config["extract_calibration"]
    assert len(key) == 64 and config["extract_precision"] == "int8"
    assert metrics["notes"]["extraction"]["precision"] == "int8"
    assert metrics["notes"]["extraction"]["calibration"]["sample"] == key
    graph = (root / "run" / "extract-int8.onnx").read_bytes()
    assert b"QuantizeLinear" in graph
    marker = json.loads((root / "run" / ".fasttl-run").read_text())
    assert marker["files"]["extract-int8.onnx"] == hashlib.sha256(graph).hexdigest()
    caches = _caches(root)
    assert {"train", "test", "test-mirror", "validation-mirror"} <= set(caches), sorted(caches)
    for name, manifest in caches.items():  # one graph for all: not each split's own calibration
        assert manifest["fingerprint"]["compute"]["calibration"]["sample"] == key, name
        assert manifest["engine_graph"]["sha256"] == hashlib.sha256(graph).hexdigest(), name


def test_predict_and_eval_repeat_the_run_through_its_graph(int8_run, three_classes, capsys, monkeypatch):
    """In a fresh process (no graph in memory), predict on the test images gives the run's own
    predictions.csv, confidences included, and eval scores what the run scored."""
    import fasttl
    from fasttl import data

    root, metrics = int8_run
    monkeypatch.setenv("FASTTL_CACHE_DIR", str(root / "feature-cache"))
    monkeypatch.setattr(engines, "_EXPORTED", {})
    model = fasttl.load_run(str(root / "run"))
    names, probabilities = model.predict(data.scan_class_folder(str(three_classes / "test")))
    confidences = probabilities.max(1).values.tolist()
    rows = [line.split(",") for line in (root / "run" / "predictions.csv").read_text().splitlines()[1:]]
    assert names == [row[2] for row in rows]
    assert [round(c, 4) for c in confidences] == [float(row[3]) for row in rows]
    monkeypatch.setattr(engines, "_EXPORTED", {})
    code, text, err = cli(capsys, "eval", root / "run", "--no-progress")
    assert code == 0, err
    evaluated = json.loads((root / "run" / "eval_metrics.json").read_text())
    assert evaluated["accuracy"] == metrics["accuracy"]


def _check_images_damaged(run_dir, damage: str) -> None:
    """The run's check images replaced by `damage`'s, the marker rewritten to match (or not)."""
    import io

    import numpy as np

    check = run_dir / "extract-int8-check.npy"
    images = np.load(check, allow_pickle=False)
    planted = {"check images missing": None,
               "check images edited": check.read_bytes()[:-4] + b"\0\0\0\0",
               "check images of NaN": np.full_like(images, np.nan),
               "check images of another size": images[:, :, :-1, :-1],
               "check images as objects": np.array([{"a": 1}], dtype=object),
               "check images as an npz archive": images,
               "check images of noise, marker updated": np.random.default_rng(0).standard_normal(images.shape
                                                                                              ).astype(np.float16),
               "check images far outside, marker updated": images * 20}
    value = planted[damage]
    check.unlink()
    if value is None:
        return
    if isinstance(value, np.ndarray):
        buffer = io.BytesIO()
        if damage.endswith("npz archive"):  # np.load gives an NpzFile, not an array
            np.savez(buffer, images=value)
        else:
            np.save(buffer, value, allow_pickle=value.dtype == object)
        value = buffer.getvalue()
    check.write_bytes(value)
    if damage != "check images edited":
        marker = json.loads((run_dir / ".fasttl-run").read_text())
        marker["files"]["extract-int8-check.npy"] = hashlib.sha256(value).hexdigest()
        (run_dir / ".fasttl-run").write_text(json.dumps(marker))


@pytest.mark.parametrize("damage", ["missing", "a link to a copy", "edited", "zeros, marker updated",
                                    "another calibration, marker updated", "check images missing",
                                    "check images edited", "check images of NaN", "check images of another size",
                                    "check images as objects", "check images as an npz archive",
                                    "check images of noise, marker updated"])
def test_a_missing_or_doctored_run_graph_is_named(int8_run, three_classes, tmp_path, capsys, monkeypatch, damage,
                                                  lite0):
    """The graph and its check images (the first of the calibration sample) as the run wrote them
    are used; a file missing, edited, or not what the run writes is named with the fix that works
    (train again: without the training images neither can be made again); a graph answering
    zeros fails on its own check images, whichever images predict is shown."""
    import shutil

    root, _ = int8_run
    run_dir = tmp_path / "run"
    shutil.copytree(root / "run", run_dir)
    graph, check = run_dir / "extract-int8.onnx", run_dir / "extract-int8-check.npy"
    if damage == "missing":
        graph.unlink()
    elif damage == "a link to a copy":  # the twenty-fifth pass: the fix is the file itself in its place
        (tmp_path / "copy.onnx").write_bytes(graph.read_bytes())
        graph.unlink()
        graph.symlink_to(tmp_path / "copy.onnx")
    elif damage == "edited":
        graph.write_bytes(graph.read_bytes()[:-10] + b"0123456789")
    elif damage.startswith("check images"):
        _check_images_damaged(run_dir, damage)
    else:
        from test_int8_engine import _zeros_graph

        planted = _zeros_graph(lite0, 4, SIZE) if damage.startswith("zeros") else \
            _another_calibration(lite0, three_classes)
        graph.write_bytes(planted)
        marker = json.loads((run_dir / ".fasttl-run").read_text())
        marker["files"]["extract-int8.onnx"] = hashlib.sha256(planted).hexdigest()
        (run_dir / ".fasttl-run").write_text(json.dumps(marker))
    monkeypatch.setenv("FASTTL_CACHE_DIR", str(tmp_path / "fresh-cache"))  # nothing to reuse: the graph must run
    monkeypatch.setattr(engines, "_EXPORTED", {})
    code, _, err = cli(capsys, "predict", "--run", run_dir, three_classes / "test" / "cat")
    if damage.startswith(("another calibration", "check images of noise")):  # the README's rule: a marker
        assert code == 0, err  # rewritten to match vouches for the file, subject only to the check against the backbone
        return
    line = one_line_error(err)
    assert code != 0
    if damage.endswith("marker updated"):  # off on its own check images: the graph or they are not the run's
        assert f"int8 graph {graph} is off PyTorch fp32 on the run's check images {check}" in line
    else:
        assert str(check if damage.startswith("check") else graph) in line
    if damage == "a link to a copy":
        assert "a link, not the file the run wrote" in line and "put the file itself there" in line
    assert "train the run again" in line and "--engine torch" not in line


def _plant(run_dir, name: str, data: bytes) -> None:
    """`data` in place of the run's file `name`, the marker rewritten to match (as its writer can)."""
    (run_dir / name).write_bytes(data)
    marker = json.loads((run_dir / ".fasttl-run").read_text())
    marker["files"][name] = hashlib.sha256(data).hexdigest()
    (run_dir / ".fasttl-run").write_text(json.dumps(marker))


def _another_calibration(backbone, data) -> bytes:
    """An int8 graph of the run's backbone, size and taps calibrated on other images (its test split)."""
    import fasttl.data as D
    from fasttl.cache.extraction import calibration_images
    from fasttl.cache.quantize import quantize

    spec = D.TransformSpec.for_backbone(backbone.preprocessing, size=SIZE)
    images = calibration_images(D.class_folder_splits(str(data))[1], spec)
    return quantize(engines.export_onnx(backbone.for_extraction(), 4, SIZE), images)


@pytest.mark.parametrize("words", [["--strategy", "finetune"], ["--strategy", "dann", "--target-data", "x"],
                                   ["--compare", "finetune"], ["--budget", "5m"]])
def test_int8_is_refused_where_a_run_cannot_use_it(capsys, tmp_path, words):
    code, _, err = cli(capsys, "run", "--extract-precision", "int8", *words, "--out", tmp_path / "run",
                       "--no-progress")
    line = one_line_error(err)
    assert code == 2 and "int8" in line and ("fp32 or auto" in line or "drop --extract-precision int8" in line)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("options,vnni,expected", [
    ({}, True, "int8"),
    ({}, False, "auto"),
    ({"images": 9_999}, True, "auto"),       # too few images to pay for quantizing
    ({"strategy": "mlp"}, True, "int8"),
    ({"compare": "scratch"}, True, "int8"),  # scratch reads no features
    ({"compare": "finetune"}, True, "auto"),
    ({"strategy": "finetune"}, True, "auto"),
    ({"budget": "5m"}, True, "int8"),        # the plan's candidates are probed in int8 where their runs are
    ({"engine": "torch"}, True, "auto"),
    ({"extract_precision": "fp32"}, True, "fp32"),
    ({"extract_precision": "int8"}, False, "int8"),
    ({"image_size": 128}, True, "auto"),     # accuracy measured at the default run's settings only
    ({"features": "head"}, True, "auto"),
    ({"backbone": "efficientnet_lite1"}, True, "int8"),
    ({"backbone": "efficientnet_lite2"}, True, "int8"),
    ({"backbone": "efficientnet_lite0+efficientnet_lite2"}, True, "int8"),  # each part measured
    ({"backbone": "resnet18"}, True, "auto"),
    ({"backbone": "efficientnet_lite1", "image_size": 128}, True, "auto"),
    ({"image_size": 128, "extract_precision": "int8"}, True, "int8"),
])
def test_a_runs_auto_precision_is_int8_only_where_it_was_measured_to_pay(tmp_path, monkeypatch, options, vnni,
                                                                         expected):
    from fasttl.transfer.config import run_config

    monkeypatch.setattr(engines, "cpu_has_int8_dot", lambda: vnni)
    images = options.pop("images", 60_000)
    resolved = run_config()(**dict(dict(data=str(tmp_path)), **options)).resolved(32, images)
    assert resolved.extract_precision == expected


def test_export_of_an_int8_run_says_it_runs_the_fp32_backbone(int8_run, tmp_path, capsys, monkeypatch):
    root, _ = int8_run
    monkeypatch.setenv("FASTTL_CACHE_DIR", str(root / "feature-cache"))
    code, _, err = cli(capsys, "export", root / "run", "--out", tmp_path / "model.onnx")
    assert code == 0, err
    assert "int8 graph (extract-int8.onnx); this export runs the fp32 backbone" in err


def test_a_run_keeps_the_graph_its_caches_record_not_a_damaged_copy(int8_run, three_classes, tmp_path, monkeypatch):
    """The caches are there (a second run on the same data) but the graph beside them was truncated:
    the run quantizes it again (the quantizer is deterministic) and keeps the graph whose SHA-256 the
    training cache's manifest records, never the damaged file."""
    from fasttl.transfer.job import run

    root, _ = int8_run
    monkeypatch.setenv("FASTTL_CACHE_DIR", str(root / "feature-cache"))
    monkeypatch.setattr(engines, "_EXPORTED", {})
    train = next(m for name, m in _caches(root).items() if name == "train")
    graph = next((root / "feature-cache").glob(f"*/{train['engine_graph']['file']}"))
    graph.write_bytes(graph.read_bytes()[: len(graph.read_bytes()) // 2])
    run(data=str(three_classes), image_size=SIZE, extract_precision="int8", features="multi", compare="none",
        out=str(tmp_path / "again"), progress=False)
    kept = (tmp_path / "again" / "extract-int8.onnx").read_bytes()
    assert hashlib.sha256(kept).hexdigest() == train["engine_graph"]["sha256"]


@pytest.mark.parametrize("calibration,culprit", [
    ("abc", "expected \\(key, images\\)"),
    ((None, "images"), "64 hex digits"),
    ((123, None), "64 hex digits"),
    (("a" * 64, "images"), "float tensor"),
    (("a" * 64, "uint8"), "float tensor"),
    (("a" * 64, "size"), "float tensor"),
    (("a" * 64, "pixels"), "normalized range"),
    (("a" * 64, "nan"), "normalized range"),
])
def test_a_hostile_calibration_argument_is_named(lite0, small_source, tmp_path, calibration, culprit):
    import torch

    import fasttl

    images = {"uint8": torch.zeros(2, 3, SIZE, SIZE, dtype=torch.uint8), "size": torch.zeros(2, 3, 8, 8),
              "pixels": torch.full((2, 3, SIZE, SIZE), 200.0), "nan": torch.full((2, 3, SIZE, SIZE), float("nan"))}
    if isinstance(calibration, tuple) and calibration[1] in images:
        calibration = (calibration[0], images[calibration[1]])
    with pytest.raises(ValueError, match=f"^calibration: .*{culprit}"):
        fasttl.FeatureCache.build(lite0, small_source, str(tmp_path / "c"), image_size=SIZE, precision="int8",
                                  calibration=calibration, progress=False)
    assert not (tmp_path / "c").exists()


def test_messages_of_int8_never_advise_the_torch_engine(monkeypatch):
    import torch

    from fasttl.util.errors import OptionError

    monkeypatch.setattr(engines, "onnxruntime_available", lambda: False)
    with pytest.raises(OptionError, match=r"or pass --extract-precision fp32 \(a run's: train it again\)$"):
        engines.resolve("auto", "int8", torch.device("cpu"))


def test_an_int8_run_on_one_image_a_class_trains_and_predicts(tmp_path, cifar10_root, capsys, monkeypatch):
    """The calibration sample is every training image where there are fewer than its size (here
    two), and no validation split is carved: the run still goes through one graph and predict
    repeats its predictions."""
    from conftest import cifar_subset

    data = cifar_subset(cifar10_root, tmp_path / "one", ["cat", "ship"], 1, 3)
    monkeypatch.setenv("FASTTL_CACHE_DIR", str(tmp_path / "feature-cache"))
    monkeypatch.setattr(engines, "_EXPORTED", {})
    code, _, err = cli(capsys, "run", "--data", data, "--image-size", SIZE, "--extract-precision", "int8",
                       "--compare", "none", "--out", tmp_path / "run", "--no-progress")
    assert code == 0, err
    caches = _caches(tmp_path)
    assert {m["fingerprint"]["compute"]["precision"] for m in caches.values()} == {"int8"}
    assert len({m["engine_graph"]["sha256"] for m in caches.values()}) == 1
    monkeypatch.setattr(engines, "_EXPORTED", {})
    code, out, err = cli(capsys, "predict", "--run", tmp_path / "run", data / "test")
    assert code == 0, err
    predicted = {os.path.relpath(path, data / "test"): (name, confidence)
                 for path, name, confidence in (line.split(",") for line in out.strip().splitlines()[1:])}
    recorded = {sample: (name, confidence) for sample, _, name, confidence in
                (line.split(",") for line in (tmp_path / "run" / "predictions.csv").read_text().splitlines()[1:])}
    assert predicted == recorded and len(recorded) == 6


def test_two_runs_loaded_in_one_process_each_go_through_their_own_graph(int8_run, three_classes, tmp_path,
                                                                        monkeypatch, lite0):
    """The twenty-third pass: a graph adopted by name (backbone, size, taps, calibration) made the
    last run loaded speak for every earlier one of the same data; each run's model now makes its
    own graph and check images the ones extraction finds, as it extracts."""
    import shutil

    import fasttl
    from fasttl import data

    root, _ = int8_run
    other, broken = tmp_path / "other", tmp_path / "broken"
    shutil.copytree(root / "run", other)
    shutil.copytree(root / "run", broken)
    _plant(other, "extract-int8.onnx", _another_calibration(lite0, three_classes))  # same name, other graph
    _check_images_damaged(broken, "check images of NaN")
    monkeypatch.setenv("FASTTL_CACHE_DIR", str(tmp_path / "fresh-cache"))
    monkeypatch.setattr(engines, "_EXPORTED", {})
    monkeypatch.setattr(engines, "_ADOPTED", {})
    photos = data.scan_class_folder(str(three_classes / "test"))
    alone = fasttl.load_run(str(root / "run")).predict(photos)[1]
    own, theirs, damaged = (fasttl.load_run(str(path)) for path in (root / "run", other, broken))
    with pytest.raises(Exception, match="extract-int8-check.npy"):
        damaged.predict(photos)
    other_probabilities = theirs.predict(photos)[1]
    assert bool((own.predict(photos)[1] == alone).all())  # loaded before the others, used after them
    assert not bool((other_probabilities == alone).all())  # the other folder's graph is its own


def test_export_and_model_of_an_int8_run_need_no_int8_files(int8_run, tmp_path, capsys, monkeypatch):
    """The twenty-third pass: they run the fp32 backbone, so a run whose int8 files are gone (one
    made before check images were kept) still exports; predict names the missing file."""
    import shutil

    import fasttl

    root, _ = int8_run
    run_dir = tmp_path / "run"
    shutil.copytree(root / "run", run_dir)
    (run_dir / "extract-int8-check.npy").unlink()
    (run_dir / "extract-int8.onnx").unlink()
    monkeypatch.setattr(engines, "_EXPORTED", {})
    code, _, err = cli(capsys, "export", run_dir, "--out", tmp_path / "model.onnx")
    assert code == 0 and (tmp_path / "model.onnx").stat().st_size > 1000, err
    assert fasttl.load_run(str(run_dir)).model is not None
    code, _, err = cli(capsys, "predict", "--run", run_dir, tmp_path / "model.onnx")
    assert code == 2 and "extract-int8.onnx: missing" in one_line_error(err)


def _eval_loss(capsys, run_dir) -> float:
    code, _, err = cli(capsys, "eval", run_dir, "--no-progress")
    assert code == 0, err
    return json.loads((run_dir / "eval_metrics.json").read_text())["loss"]


def test_eval_goes_through_the_runs_own_graph_whatever_caches_exist(int8_run, three_classes, tmp_path, capsys,
                                                                    monkeypatch, lite0):
    """The twenty-fourth pass: eval reused any cache of the same data, whichever run's graph made it
    (an untouched run scored with another folder's graph), and a run whose check images fail was
    accepted once such a cache existed. A loaded run's caches are named by its graph's SHA-256, and
    its graph is checked on its check images at its first use."""
    import shutil

    root, _ = int8_run
    own, other, broken = tmp_path / "own", tmp_path / "other", tmp_path / "broken"
    for path in (own, other, broken):
        shutil.copytree(root / "run", path)
    _plant(other, "extract-int8.onnx", _another_calibration(lite0, three_classes))
    _check_images_damaged(broken, "check images far outside, marker updated")  # the graph is own's
    monkeypatch.setenv("FASTTL_CACHE_DIR", str(tmp_path / "cache"))
    alone = _eval_loss(capsys, own)
    assert _eval_loss(capsys, other) != alone and _eval_loss(capsys, own) == alone
    code, _, err = cli(capsys, "eval", broken, "--no-progress")  # own's caches exist: still checked, refused
    assert code == 2 and "is off PyTorch fp32 on the run's check images" in one_line_error(err)


def test_a_new_run_after_loading_another_makes_its_own_graph(int8_run, three_classes, tmp_path, monkeypatch, lite0):
    """The twenty-fourth pass: a loaded run's graph, adopted under the name a new run of the same data
    looks up, became the new run's graph (and was written into the cache folder for later runs)."""
    import shutil

    import fasttl
    from fasttl import data
    from fasttl.transfer.job import run

    root, _ = int8_run
    other = tmp_path / "other"
    shutil.copytree(root / "run", other)
    _plant(other, "extract-int8.onnx", _another_calibration(lite0, three_classes))
    monkeypatch.setenv("FASTTL_CACHE_DIR", str(tmp_path / "cache"))
    fasttl.load_run(str(other)).predict(data.scan_class_folder(str(three_classes / "test")))
    run(data=str(three_classes), image_size=SIZE, extract_precision="int8", features="multi", compare="none",
        out=str(tmp_path / "new"), progress=False)
    assert (tmp_path / "new" / "extract-int8.onnx").read_bytes() == (root / "run" / "extract-int8.onnx").read_bytes()


def test_a_model_loaded_before_its_folder_changes_keeps_its_graph(int8_run, three_classes, tmp_path, monkeypatch,
                                                                 lite0):
    """The twenty-fourth pass: the graph was read at the first predict, so a folder retrained after
    load_run (here: its graph replaced, the marker rewritten) gave the old head the new graph."""
    import shutil

    import fasttl
    from fasttl import data

    root, _ = int8_run
    copy = tmp_path / "run"
    shutil.copytree(root / "run", copy)
    monkeypatch.setenv("FASTTL_CACHE_DIR", str(tmp_path / "cache"))
    photos = data.scan_class_folder(str(three_classes / "test"))
    before = fasttl.load_run(str(root / "run")).predict(photos)[1]
    model = fasttl.load_run(str(copy))
    _plant(copy, "extract-int8.onnx", _another_calibration(lite0, three_classes))
    assert bool((model.predict(photos)[1] == before).all())


def test_a_run_graph_that_does_not_load_is_told_to_train_again(int8_run, tmp_path, capsys, monkeypatch):
    """The twenty-fourth pass: it was told to train with fp32 "to use it on images like these"."""
    import shutil

    root, _ = int8_run
    copy = tmp_path / "run"
    shutil.copytree(root / "run", copy)
    _plant(copy, "extract-int8.onnx", b"not a graph")
    monkeypatch.setenv("FASTTL_CACHE_DIR", str(tmp_path / "cache"))
    code, _, err = cli(capsys, "predict", "--run", copy, copy / "config.json")
    line = one_line_error(err)
    assert code == 2 and f"{copy / 'extract-int8.onnx'} does not load" in line and line.endswith("train the run again")


def test_a_swapped_engine_file_in_the_cache_folder_is_quantized_anew_on_overwrite(int8_run, three_classes, tmp_path,
                                                                               capsys, monkeypatch, lite0):
    """The twenty-fourth pass: the graph left beside the caches replaced, a run said "run again with
    --overwrite", and --overwrite failed the same way (it reused the file): the file is fasttl's own,
    removed and quantized anew."""
    monkeypatch.setenv("FASTTL_CACHE_DIR", str(tmp_path / "cache"))
    words = ["run", "--data", three_classes, "--image-size", str(SIZE), "--extract-precision", "int8", "--features",
             "multi", "--compare", "none", "--no-progress", "--out", tmp_path / "run"]
    assert cli(capsys, *words)[0] == 0
    (graph,) = (tmp_path / "cache").glob("*/engine-*-int8.onnx")
    graph.write_bytes(_another_calibration(lite0, three_classes))
    monkeypatch.setattr(engines, "_EXPORTED", {})
    code, _, err = cli(capsys, *words, "--overwrite")
    assert code == 0, err
    assert (tmp_path / "run" / "extract-int8.onnx").read_bytes() == (root_graph := graph.read_bytes())
    assert root_graph == (int8_run[0] / "run" / "extract-int8.onnx").read_bytes()


def test_splits_extracted_through_a_swapped_engine_file_are_extracted_again(int8_run, three_classes, tmp_path,
                                                                           capsys, monkeypatch, lite0):
    """The twenty-fifth pass: with another graph in place of the engine file and the test caches
    gone, a run extracted its test split through that graph, then kept the training cache's graph
    and scored the test caches the other had made. Every split's cache is now checked against the
    training cache's graph and made again through it where another made it."""
    monkeypatch.setenv("FASTTL_CACHE_DIR", str(tmp_path / "cache"))
    words = ["run", "--data", three_classes, "--image-size", str(SIZE), "--extract-precision", "int8", "--features",
             "multi", "--compare", "none", "--no-progress"]
    assert cli(capsys, *words, "--out", tmp_path / "first")[0] == 0
    (graph,) = (tmp_path / "cache").glob("*/engine-*-int8.onnx")
    graph.write_bytes(_another_calibration(lite0, three_classes))
    import shutil

    for test_cache in (tmp_path / "cache").glob("*/test-*"):
        shutil.rmtree(test_cache)
    monkeypatch.setattr(engines, "_EXPORTED", {})
    code, _, err = cli(capsys, *words, "--out", tmp_path / "second")
    assert code == 0, err
    sha = hashlib.sha256((tmp_path / "second" / "extract-int8.onnx").read_bytes()).hexdigest()
    assert sha == hashlib.sha256((int8_run[0] / "run" / "extract-int8.onnx").read_bytes()).hexdigest()
    manifests = [json.loads(m.read_text()) for m in (tmp_path / "cache").glob("*/*/manifest.json")]
    assert len(manifests) >= 3 and {m["engine_graph"]["sha256"] for m in manifests} == {sha}


def test_a_training_cache_whose_build_was_cut_after_its_last_shard_is_extracted_again(int8_run, three_classes,
                                                                                     tmp_path, capsys, monkeypatch):
    """The twenty-sixth pass: its manifest, written by a resumed build that had nothing left to
    extract, recorded no graph, and every later int8 run of the data was refused (--overwrite too)."""
    monkeypatch.setenv("FASTTL_CACHE_DIR", str(tmp_path / "cache"))
    words = ["run", "--data", three_classes, "--image-size", str(SIZE), "--extract-precision", "int8", "--features",
             "multi", "--compare", "none", "--no-progress"]
    assert cli(capsys, *words, "--out", tmp_path / "first")[0] == 0
    (manifest,) = (tmp_path / "cache").glob("*/train-*[0-9a-f]/manifest.json")
    manifest.unlink()  # as a build stopped after its last shard leaves it
    monkeypatch.setattr(engines, "_EXPORTED", {})
    code, _, err = cli(capsys, *words, "--out", tmp_path / "second")
    assert code == 0, err
    assert json.loads(manifest.read_text())["engine_graph"]["sha256"] == \
        hashlib.sha256((tmp_path / "second" / "extract-int8.onnx").read_bytes()).hexdigest()


def test_a_process_loading_run_after_run_keeps_a_few_graphs(int8_run, three_classes, tmp_path, monkeypatch, lite0):
    """The twenty-sixth pass: every graph adopted stayed in memory (72 MB after 20 runs); a loaded
    run adopts its own again before each use, so the oldest can go."""
    import fasttl

    from test_int8_engine import _zeros_graph

    root, _ = int8_run
    photos = _a_fresh_process(monkeypatch, tmp_path, three_classes)
    model = fasttl.load_run(str(root / "run"))
    first = model.predict(photos)[1]
    zeros = _zeros_graph(lite0, 4, SIZE)
    for i in range(engines.MAX_ADOPTED + 3):
        engines.adopt(f"engine-{i:016x}-int8.onnx", zeros, shown=f"run{i}/extract-int8.onnx")
    assert len(engines._ADOPTED) == engines.MAX_ADOPTED and len(engines._EXPORTED) == engines.MAX_ADOPTED
    again = fasttl.load_run(str(root / "run"))  # a new model: its engine is made anew from the graph it adopts
    assert bool((again.predict(photos)[1] == first).all())


def _adopt_others(lite0, count: int) -> None:
    """What other threads' loaded runs do meanwhile: adopt graphs of their own."""
    from test_int8_engine import _zeros_graph

    zeros = _zeros_graph(lite0, 4, SIZE)
    for i in range(count):
        engines.adopt(f"engine-{i:016x}-int8.onnx", zeros, shown=f"other{i}/extract-int8.onnx")


def test_other_threads_adopting_runs_do_not_push_out_a_graph_an_engine_is_being_made_from(
        int8_run, three_classes, tmp_path, monkeypatch, lite0):
    """The twenty-seventh pass: with 5 or more loaded int8 runs predicting in threads, a first
    predict was refused ("no int8 graph of that calibration sample is kept ... pass
    calibration=(key, images)"): others adopted their graphs between this run's adopt and its
    engine. The graph is now kept until its engine has it (engines.adopted)."""
    import fasttl
    from fasttl.cache import extraction

    root, _ = int8_run
    photos = _a_fresh_process(monkeypatch, tmp_path, three_classes)
    alone = fasttl.load_run(str(root / "run"))
    want, want_logits = alone.predict(photos)[1], alone.logits(photos)
    made = extraction.extraction_engine

    def others_first(*args, **kwargs):  # the race, made certain: others adopt just before the engine is made
        _adopt_others(lite0, engines.MAX_ADOPTED + 2)
        return made(*args, **kwargs)

    monkeypatch.setattr(extraction, "extraction_engine", others_first)
    monkeypatch.setattr(engines, "_EXPORTED", {})
    monkeypatch.setattr(engines, "_ADOPTED", {})
    assert bool((fasttl.load_run(str(root / "run")).predict(photos)[1] == want).all())
    assert len(engines._ADOPTED) == engines.MAX_ADOPTED  # none kept beyond the bound once the engine has it
    # eval's path (the feature caches; the graph checked at its first use) too
    assert torch.equal(fasttl.load_run(str(root / "run")).logits(photos), want_logits)


def test_a_loaded_runs_messages_name_its_file_after_its_graph_is_pushed_out(int8_run, three_classes, tmp_path,
                                                                            monkeypatch, lite0):
    """The twenty-seventh pass: once other runs pushed a loaded run's graph out, its refusals named
    an engine file that does not exist and gave the Python-only fix; the engine keeps what adopt
    said of the graph when it is made."""
    import fasttl

    root, _ = int8_run
    photos = _a_fresh_process(monkeypatch, tmp_path, three_classes)
    model = fasttl.load_run(str(root / "run"))
    model.predict(photos, batch_size=2)
    _adopt_others(lite0, engines.MAX_ADOPTED + 1)
    assert not [a for a in engines._ADOPTED.values() if str(root) in a.shown]  # pushed out
    monkeypatch.setattr(engines, "INT8_TOLERANCE", 0.0)  # the check at the next new batch size fails
    with pytest.raises(CacheError) as refused:
        model.predict(photos, batch_size=3)
    message = str(refused.value)
    assert str(root / "run" / "extract-int8.onnx") in message and "engine-" not in message
    assert "train the run again" in message and "calibration=" not in message  # the run's fix, not Python's


def _a_fresh_process(monkeypatch, tmp_path, three_classes):
    """No graph exported or adopted yet, caches of this test's own; the test photos."""
    from fasttl import data

    monkeypatch.setenv("FASTTL_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(engines, "_EXPORTED", {})
    monkeypatch.setattr(engines, "_ADOPTED", {})
    return data.scan_class_folder(str(three_classes / "test"))


def test_predict_on_error_skip_leaves_out_photos_the_graph_cannot_represent(int8_run, tmp_path, monkeypatch, capsys):
    """Noted since the twenty-sixth pass: --on-error skip skipped undecodable images, while a photo
    the int8 range check refused stopped the whole predict. Now it is left out and listed; the
    others' predictions are what they are without it (each image checked alone)."""
    from PIL import Image

    root, _ = int8_run
    monkeypatch.setenv("FASTTL_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(engines, "_EXPORTED", {})
    monkeypatch.setattr(engines, "_ADOPTED", {})
    monkeypatch.setattr(engines, "_input_range", lambda data: (-0.5, 0.5))  # as if calibrated on grey photos
    photos, greys = tmp_path / "photos", tmp_path / "greys"
    for folder, names in ((photos, ("a-grey", "b-black", "c-grey", "d-white")), (greys, ("a-grey", "c-grey"))):
        folder.mkdir()
        for name in names:
            value = {"grey": 127 + len(name), "black": 0, "white": 255}[name.split("-")[1]]
            Image.new("RGB", (40, 40), (value, value - 10, value)).save(folder / f"{name}.png")
    code, mixed, err = cli(capsys, "predict", "--run", root / "run", "--no-progress", "--on-error", "skip", photos)
    assert code == 0 and [line.split(",")[0] for line in mixed.splitlines()[1:]] == \
        [str(photos / "a-grey.png"), str(photos / "c-grey.png")]
    assert "skipped 2 images: " in err and "b-black.png (engine: the int8 graph " in err and "d-white.png" in err
    assert "can't represent an image (100% of its values beyond the range [-0.50, 0.50]" in err
    code, alone, _ = cli(capsys, "predict", "--run", root / "run", "--no-progress", greys)
    assert code == 0 and [line.split(",", 1)[1] for line in mixed.splitlines()] == \
        [line.split(",", 1)[1] for line in alone.splitlines()]  # the same predictions, byte for byte
    for batch_size in (1, 2, 3):  # refused first, last, alone in its batch, two in one batch
        code, again, _ = cli(capsys, "predict", "--run", root / "run", "--no-progress", "--on-error", "skip",
                             "--batch-size", batch_size, photos)
        assert code == 0 and again == mixed
    code, _, err = cli(capsys, "predict", "--run", root / "run", "--no-progress", photos)  # without skip: refused
    assert code == 2 and "can't represent an image (" in one_line_error(err) and "b-black.png" in err
    code, _, err = cli(capsys, "predict", "--run", root / "run", "--no-progress", "--on-error", "skip",
                       photos / "b-black.png", photos / "d-white.png")
    assert code == 2 and "every image was refused (engine: the int8 graph" in one_line_error(err)
