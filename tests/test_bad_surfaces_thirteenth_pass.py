"""What the thirteenth hostile pass of the second hardening round found: each case kept with the
fix that answers it."""
import json
import os
import shutil

import numpy as np
import pytest
import torch

import fasttl
from conftest import cli, one_epoch_run, one_line_error, tiny_backbone
from fasttl.cache import engines
from fasttl.cache.store import CacheError
from fasttl.data import DataError
from fasttl.util.errors import OptionError
from fasttl.transfer.job import run

pytestmark = pytest.mark.usefixtures("private_cache")
needs_ort = pytest.mark.skipif(not engines.onnxruntime_available(), reason="onnxruntime is not installed")


@pytest.fixture(scope="module")
def scratch_run(cat_ship, tmp_path_factory):
    from conftest import finished_run

    return finished_run(cat_ship, tmp_path_factory, "scratch13")


def _doctored(graph: bytes, how: str) -> bytes:
    """The extraction graph with NaN added to column 3 ("nan"), or with a Loop of 10**12 empty
    iterations beside it ("loop"), as the pass planted them."""
    import onnx
    from onnx import TensorProto as T
    from onnx import helper, numpy_helper

    model = onnx.load_from_string(graph)
    g = model.graph
    out = g.output[0].name
    for node in g.node:
        node.output[:] = [o + "_raw" if o == out else o for o in node.output]
    if how == "nan":
        width = g.output[0].type.tensor_type.shape.dim[1].dim_value
        doctor = np.zeros((1, width), np.float32)
        doctor[0, 3] = np.nan
        g.initializer.append(numpy_helper.from_array(doctor, "doctor"))
        g.node.append(helper.make_node("Add", [out + "_raw", "doctor"], [out]))
        return model.SerializeToString()
    body = helper.make_graph(
        [helper.make_node("Identity", ["c"], ["c2"]), helper.make_node("Add", ["v", "one"], ["v2"])], "b",
        [helper.make_tensor_value_info("i", T.INT64, []), helper.make_tensor_value_info("c", T.BOOL, []),
         helper.make_tensor_value_info("v", T.INT64, [])],
        [helper.make_tensor_value_info("c2", T.BOOL, []), helper.make_tensor_value_info("v2", T.INT64, [])],
        [numpy_helper.from_array(np.array(1, np.int64), "one")])
    g.initializer.extend([numpy_helper.from_array(np.array(10**12, np.int64), "M"),
                          numpy_helper.from_array(np.array(True), "T"), numpy_helper.from_array(np.array(0, np.int64),
                                                                                                "z"),
                          numpy_helper.from_array(np.array(0.0, np.float32), "fz")])
    g.node.extend([helper.make_node("Loop", ["M", "T", "z"], ["vf"], body=body),
                   helper.make_node("Cast", ["vf"], ["vff"], to=T.FLOAT),
                   helper.make_node("Mul", ["vff", "fz"], ["vz"]),
                   helper.make_node("Add", [out + "_raw", "vz"], [out])])
    return model.SerializeToString()


def _build(lite0, small_source, out, engine_dir, **kw):
    return fasttl.FeatureCache.build(lite0, small_source, str(out), image_size=32, backend="torch", dtype="fp32",
                                     batch_size=4, progress=False, engine="onnxruntime", engine_dir=str(engine_dir),
                                     **kw)


@needs_ort
@pytest.mark.parametrize("how", ["nan", "loop", "sparse"])
def test_a_planted_engine_graph_is_exported_again(how, lite0, small_source, tmp_path, monkeypatch):
    """A graph giving NaN (which compared as "not above the tolerance"), one that loops for ever
    (stopped by the verification's time budget), and a sparse file of gigabytes (never read)."""
    engine_dir = tmp_path / "engines"
    engine_dir.mkdir()
    first = _build(lite0, small_source, tmp_path / "c", engine_dir)
    (name,) = os.listdir(engine_dir)
    good = (engine_dir / name).read_bytes()
    if how == "sparse":
        with open(engine_dir / name, "wb") as f:
            f.truncate(4 << 30)  # no data blocks: nothing written to disk
    else:
        (engine_dir / name).write_bytes(_doctored(good, how))
    monkeypatch.setattr(engines, "_EXPORTED", {})
    monkeypatch.setattr(engines, "VERIFY_SECONDS", 1.0)  # the budget, small for the test
    again = _build(lite0, small_source, tmp_path / "c", engine_dir, overwrite=True)
    torch.testing.assert_close(again.features, first.features)
    assert (engine_dir / name).read_bytes() == good


def test_a_backbone_giving_nan_is_refused_for_every_cache_dtype(small_source, tmp_path):
    class LogConv(torch.nn.Module):  # NaN wherever the convolution is negative
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3)

        def forward(self, x):
            return torch.log(self.conv(x))

    backbone = fasttl.backbones.CustomBackbone(LogConv(), 8, fasttl.backbones.create("efficientnet_lite0")
                                               .preprocessing)
    for dtype in ("fp32", "bf16", "int8"):
        with pytest.raises(CacheError, match=r"features: the backbone's features of .*\.jpg are not finite"):
            fasttl.FeatureCache.build(backbone, small_source, str(tmp_path / dtype), image_size=32, progress=False,
                                      dtype=dtype, engine="torch", backend="torch")
        assert not (tmp_path / dtype / "manifest.json").exists()


def test_eval_of_own_data_refuses_training_images_moved_into_test(cat_ship, tmp_path):
    from fasttl.transfer.evaluate import evaluate_run

    data = tmp_path / "data"
    shutil.copytree(cat_ship, data)
    out = tmp_path / "run"
    run(**one_epoch_run(data, out))
    for image in sorted((data / "test").glob("*/*.jpg")):
        image.unlink()
    for name in ("cat", "ship"):
        for image in sorted((data / "train" / name).glob("*.jpg"))[:3]:
            image.rename(data / "test" / name / image.name)
    with pytest.raises(DataError, match="its test split holds 6 of the run's training images .*moved there since"):
        evaluate_run(str(out), progress=False)
    assert not (out / "eval_metrics.json").exists()


def test_a_moved_data_folder_keeps_evals_and_teachers_checks(cat_ship, tmp_path):
    from fasttl.transfer.evaluate import evaluate_run
    from fasttl.transfer.strategies.distill import refuse_teachers_of_test_images

    data = tmp_path / "data"
    shutil.copytree(cat_ship, data)
    out = tmp_path / "run"
    run(**one_epoch_run(data, out))
    data.rename(tmp_path / "moved")
    with pytest.raises(DataError, match=r"its test split holds \d+ of the run's training images"):
        evaluate_run(str(out), str(tmp_path / "moved" / "train"), progress=False)  # carved 80/20: some of them
    student_test = fasttl.data.scan_class_folder(str(tmp_path / "moved" / "train"))
    with pytest.raises(DataError, match=f"teacher: {out} trained on 12 of this run's test images"):
        refuse_teachers_of_test_images([str(out)], student_test)
    refuse_teachers_of_test_images([str(out)], fasttl.data.scan_class_folder(str(tmp_path / "moved" / "test")))


def test_eval_of_an_index_labelled_list_reads_the_runs_own_classes(cat_ship, tmp_path):
    from fasttl.transfer.evaluate import evaluate_run

    classes = tmp_path / "classes.txt"
    classes.write_text("cat\nship\n")
    for split in ("train", "test"):
        rows = ["path,label"] + [f"{p},{['cat', 'ship'].index(p.parent.name)}"
                                 for p in sorted((cat_ship / split).glob("*/*.jpg"))]
        (tmp_path / f"{split}.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "run"
    run(**one_epoch_run(tmp_path / "train.csv", out, classes_file=str(classes), labels="indices"))
    before = evaluate_run(str(out), str(tmp_path / "test.csv"), progress=False)
    classes.write_text("ship\ncat\n")  # re-sorted after the run: index 0 is still the run's cat
    after = evaluate_run(str(out), str(tmp_path / "test.csv"), progress=False)
    assert after["confusion_matrix"] == before["confusion_matrix"]
    classes.unlink()  # gone: the run's recorded classes are enough
    assert evaluate_run(str(out), str(tmp_path / "test.csv"), progress=False)["accuracy"] == before["accuracy"]


def test_export_keeps_the_runs_size_and_checks_its_tolerance(scratch_run, tmp_path):
    pytest.importorskip("onnxruntime", reason="the export extra (onnxruntime) is not installed")
    from fasttl.export import export_onnx

    with pytest.raises(OptionError, match="image_size: the run's model was made at 32 px"):
        export_onnx(str(scratch_run), str(tmp_path / "m.onnx"), image_size=64)
    for bad in ("1e-3", float("nan"), -1.0, float("inf"), True):
        with pytest.raises(OptionError, match="tolerance: expected a finite number >= 0"):
            export_onnx(str(scratch_run), str(tmp_path / "m.onnx"), tolerance=bad)
    assert not (tmp_path / "m.onnx").exists()
    assert export_onnx(str(scratch_run), str(tmp_path / "m.onnx"), image_size=32)["image_size"] == 32


def test_export_of_a_run_folder_named_in_another_encoding(scratch_run, tmp_path):
    pytest.importorskip("onnxruntime", reason="the export extra (onnxruntime) is not installed")
    import onnx
    from fasttl.export import export_onnx

    odd = os.fsdecode(os.path.join(os.fsencode(str(tmp_path)), b"r\xe9"))
    shutil.copytree(scratch_run, odd)
    export_onnx(odd, str(tmp_path / "m.onnx"))
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props}
    assert meta["run"] == "r\\xe9"


def test_caches_of_two_image_sizes_are_not_one_feature_space(small_source, tmp_path):
    backbone = tiny_backbone()
    first, second = (fasttl.FeatureCache.build(backbone, small_source, str(tmp_path / str(size)), image_size=size,
                                               progress=False, backend="torch", engine="torch")
                     for size in (16, 24))
    with pytest.raises(CacheError, match="concat: caches made with another image size, normalization or crop"):
        fasttl.FeatureCache.concat([first, second])
    with pytest.raises(OptionError, match="eval_cache: made with another image size, normalization or crop"):
        fasttl.heads.train_head(first, epochs=1, eval_cache=second, progress=False)
    mirrored = fasttl.FeatureCache.build(backbone, small_source, str(tmp_path / "m"), image_size=16, progress=False,
                                         backend="torch", engine="torch", mirror=True)
    assert len(fasttl.FeatureCache.concat([first, mirrored])) == 2 * len(first)  # a split's two views go together


def test_the_runs_model_refuses_pixels_out_of_range_and_takes_float64(scratch_run):
    model = fasttl.load_run(str(scratch_run)).model
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for bad, shown in ((images * 255, "to 25"), (torch.full_like(images, float("nan")), "nan")):
        with pytest.raises(ValueError, match=rf"images: values from .*{shown}.*expected RGB in \[0, 1\]"):
            model(bad)
    torch.testing.assert_close(model(images.double()), model(images))


def test_bench_replaces_only_its_own_earlier_outputs(tmp_path):
    from fasttl.bench.runner import _check_outputs

    notes = tmp_path / "notes.txt"
    notes.write_text("my precious notes")
    with pytest.raises(OptionError, match="json: .*notes.txt exists and is not an earlier fasttl bench json output"):
        _check_outputs(str(notes), None)
    with pytest.raises(OptionError, match="plot: .*notes.png exists and is not an earlier fasttl bench plot output"):
        _check_outputs(None, str(tmp_path / "notes.png")) if (tmp_path / "notes.png").write_text("x") else None
    earlier = tmp_path / "bench.json"
    earlier.write_text(json.dumps({"machine": {}, "device": "cpu", "results": []}))
    from fasttl.bench.runner import PLOT_TITLE

    (tmp_path / "plot.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"tEXtTitle\0" + PLOT_TITLE.encode())
    _check_outputs(str(earlier), str(tmp_path / "plot.png"))  # bench's own: replaced
    for yours in ("holiday.png", "thesis.pdf"):  # a picture or a document of yours, whatever its format
        (tmp_path / yours).write_bytes(b"\x89PNG\r\n\x1a\n" if yours.endswith("png") else b"%PDF-1.4\n% thesis")
        with pytest.raises(OptionError, match=f"plot: .*{yours} exists and is not an earlier fasttl bench plot"):
            _check_outputs(None, str(tmp_path / yours))
    with pytest.raises(OptionError, match="plot: --json and --plot name the same file"):
        _check_outputs(str(tmp_path / "same.png"), str(tmp_path / "same.png"))
    assert notes.read_text() == "my precious notes"


def test_files_named_engine_something_are_the_users(tmp_path):
    from fasttl.cache import store

    folder = str(tmp_path)
    assert store.is_own_file(folder, "engine-0123456789abcdef.onnx")
    assert store.is_own_file(folder, "engine-0123456789abcdef-int8.onnx")
    assert not store.is_own_file(folder, "engine-v8.pdf")
    assert not store.is_own_file(folder, "engine-0123456789abcdef.onnx.bak")
    folder = tmp_path / "manuals"
    folder.mkdir()
    (folder / "engine-v6.pdf").write_text("manual")
    with pytest.raises(CacheError, match="holds files that are not a fasttl cache's \\(engine-v6.pdf\\)"):
        fasttl.FeatureCache.write(str(folder), [np.ones((4, 3), np.float32)], [0, 1, 0, 1], classes=["a", "b"])


def test_empty_folder_names_are_refused(cat_ship, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for words, said in ((["extract", "--data", cat_ship, "--out", "", "--image-size", "32", "--no-progress"],
                         "out: an empty or blank path given as --out"),
                        (["data", "fetch", "cifar10", "--dest", "", "--no-progress"],
                         "dest: an empty or blank path given as --dest")):
        with pytest.raises(SystemExit) as stopped:  # refused as argparse refuses a bad value
            cli(capsys, *words)
        assert stopped.value.code == 2 and said in one_line_error(capsys.readouterr().err)
    assert os.listdir(tmp_path) == []


def test_nothing_else_writes_inside_a_run_folder(scratch_run, cat_ship, tmp_path, capsys, monkeypatch):
    run_copy = tmp_path / "run"
    shutil.copytree(scratch_run, run_copy)
    before = sorted(os.listdir(run_copy))
    code, _, err = cli(capsys, "data", "fetch", "cifar10", "--dest", run_copy, "--no-progress")
    assert code == 2 and "dest: " in err and "is in the fasttl run folder" in one_line_error(err)
    with pytest.raises(CacheError, match="is in the fasttl run folder"):
        fasttl.FeatureCache.write(str(run_copy / "cache"), [np.ones((4, 3), np.float32)], [0, 1, 0, 1],
                                  classes=["a", "b"])
    monkeypatch.setenv("FASTTL_STATE_DIR", str(run_copy / "state"))
    code, _, err = cli(capsys, "extract", "--data", cat_ship, "--out", tmp_path / "ex", "--image-size", "32",
                       "--no-progress")
    assert code == 2 and "FASTTL_STATE_DIR=" in one_line_error(err) and "is in the fasttl run folder" in err
    monkeypatch.delenv("FASTTL_STATE_DIR")
    monkeypatch.setenv("FASTTL_CACHE_DIR", str(tmp_path / "new-run" / "cache"))
    with pytest.raises(OptionError, match="out: .*new-run holds FASTTL_CACHE_DIR=.*new-run/cache"):
        run(**one_epoch_run(cat_ship, tmp_path / "new-run"))
    assert sorted(os.listdir(run_copy)) == before and not (tmp_path / "new-run").exists()


def test_a_sparse_weights_file_is_refused_unread(scratch_run, tmp_path):
    run_copy = tmp_path / "run"
    shutil.copytree(scratch_run, run_copy)
    (name,) = [n for n in os.listdir(run_copy) if n.endswith(".safetensors")]
    with open(run_copy / name, "wb") as f:
        f.truncate(4 << 30)
    with pytest.raises(fasttl.transfer.rundir.RunError, match=r"cannot be read as the run's weights \(4,294,967,296 "
                                                              r"bytes, more than the"):
        fasttl.load_run(str(run_copy))


def test_a_parquet_list_of_too_many_rows_is_refused_before_decoding(tmp_path, monkeypatch):
    pa = pytest.importorskip("pyarrow", reason="Parquet lists need pyarrow")
    import pyarrow.parquet as pq

    from fasttl.data.formats import filelist

    pq.write_table(pa.table({"path": ["x.jpg"] * 50, "label": ["a", "b"] * 25}), str(tmp_path / "l.parquet"))
    monkeypatch.setattr(filelist, "MAX_LIST_ROWS", 10)
    with pytest.raises(DataError, match="lists 50 rows, more than the 10 a list may hold"):
        filelist.read_file_list(str(tmp_path / "l.parquet"))
    (tmp_path / "l.csv").write_text("path,label\n" + "x.jpg,a\n" * 11)
    with pytest.raises(DataError, match="lists more than 10 rows"):
        filelist.read_file_list(str(tmp_path / "l.csv"))


def test_backbone_predictions_go_a_batch_at_a_time(cat_ship, monkeypatch):
    import fasttl.predict as predict

    paths = [str(p) for p in sorted((cat_ship / "test").glob("*/*.jpg"))]
    whole = predict.predict(paths, top=3)
    monkeypatch.setattr(predict, "BACKBONE_BATCH", 2)
    batched = predict.predict(paths, top=3)
    assert [[n for n, _ in row] for row in batched] == [[n for n, _ in row] for row in whole]
    assert all(abs(a[1] - b[1]) < 1e-5 for x, y in zip(whole, batched) for a, b in zip(x, y))


def test_predict_without_a_run_walks_a_folder(cat_ship, capsys):
    code, out, _ = cli(capsys, "predict", cat_ship / "test" / "cat")
    assert code == 0 and out.count(".jpg") == 3


def test_labels_of_thousands_of_digits_are_one_line(tmp_path):
    from fasttl.data.labels import label_indices

    with pytest.raises(DataError, match=r"label '1{20}'\.\.\. \(5,000 digits\) is no class index"):
        label_indices(["0", "1" * 5000], None, "l.csv")
    with pytest.raises(DataError, match=r"\(5,000 characters\) is not an index into the 2 classes"):
        label_indices(["0", "1" * 5000], ["a", "b"], "l.csv", "indices")


def test_plot_labels_are_cut(tmp_path):
    from fasttl.transfer.report import plot_confusion_matrix
    from fasttl.util.outputs import PLOT_LABEL_CHARACTERS, plot_label

    assert plot_label("a" * 10) == "a" * 10 and plot_label("$x$") == r"\$x\$"
    cut = plot_label("b" * 100_000)
    assert len(cut) == PLOT_LABEL_CHARACTERS and cut[(PLOT_LABEL_CHARACTERS - 1) // 2] == "\u2026"
    plot_confusion_matrix({"confusion_matrix": [[2, 2], [1, 3]], "classes": ["a" * 100_000, "b" * 100_000],
                           "accuracy": 0.6, "balanced_accuracy": 0.6}, str(tmp_path / "cm.png"), "x")
    assert (tmp_path / "cm.png").read_bytes()[:4] == b"\x89PNG"


def test_arrays_get_the_aspect_budget_of_image_files(scratch_run):
    with pytest.raises(OptionError, match="images: an array image declares 100000x1 pixels, a side more than 50"):
        fasttl.load_run(str(scratch_run)).predict(np.zeros((1, 1, 100_000, 3), np.uint8))


def test_evaluate_run_checks_on_error(scratch_run):
    from fasttl.transfer.evaluate import evaluate_run

    with pytest.raises(OptionError, match="on_error: expected one of fail, skip, got 'bogus'"):
        evaluate_run(str(scratch_run), on_error="bogus", progress=False)


def test_class_names_in_two_unicode_forms_are_named_so():
    import unicodedata

    from fasttl.data.labels import class_difference

    nfc, nfd = (unicodedata.normalize(form, "caf\u00e9") for form in ("NFC", "NFD"))
    message = class_difference([nfd, "cat"], [nfc, "cat"], "the run")
    assert "another Unicode form" in message and ascii(nfd) in message


def test_a_half_made_cifar10_folder_is_named(tmp_path, monkeypatch):
    from fasttl.transfer.datasets import load_dataset

    (tmp_path / "cifar10" / "train").mkdir(parents=True)
    monkeypatch.setenv("FASTTL_DATA", str(tmp_path))
    with pytest.raises(DataError, match=r"cifar10 has a train/ folder but no test/ \(a copy left unfinished\?\)"):
        load_dataset("cifar10")


def test_fetch_refuses_credentials_in_the_url_without_showing_them(tmp_path, capsys):
    code, out, err = cli(capsys, "data", "fetch", "cifar10", "--url", "http://user:s3cret@127.0.0.1:9/c.tar.gz",
                         "--sha256", "0" * 64, "--dest", tmp_path, "--no-progress")
    assert code == 2 and "a user name or password in the address" in one_line_error(err)
    assert "s3cret" not in out + err and os.listdir(tmp_path) == []


def test_a_list_of_backslash_paths_says_why(cat_ship, tmp_path):
    from fasttl.transfer.datasets import load_dataset

    for image in sorted((cat_ship / "train").glob("*/*.jpg")):
        shutil.copy(image, tmp_path / f"{image.parent.name}-{image.name}")
    rows = ["path,label"] + [f"img\\{p.name},{p.name.split('-')[0]}" for p in sorted(tmp_path.glob("*.jpg"))]
    (tmp_path / "list.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(DataError, match=r"its paths hold a backslash .*write the list's paths with /"):
        load_dataset(str(tmp_path / "list.csv"))
