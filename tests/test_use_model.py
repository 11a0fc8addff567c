"""After training: `fasttl predict --run`, `fasttl.load_run`, `fasttl export` (ONNX, checked with
ONNX Runtime), history.csv and TensorBoard scalars; each with the hostile inputs it must refuse in
one line without touching anything but its output."""
import csv
import io
import json
import os
import shutil
import sys

import numpy as np
import pytest
import torch
from conftest import THREE_CLASSES, cli, one_line_error

import fasttl
from fasttl.transfer import registry
from fasttl.transfer.job import run

@pytest.fixture(scope="module")
def module_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("use-model-cache"))


@pytest.fixture(scope="module")
def trained(three_classes, module_cache, tmp_path_factory):
    """A factory of finished runs, one per strategy, trained once for the module (tiny: 2 epochs
    at 32 px on 30 images; distill learns from the linear run, dann adapts to the same images)."""
    runs = {}

    def get(name):
        if name not in runs:
            strategy = registry.get(name)
            extra = {}
            if "teacher" in strategy.requires:
                extra["teacher"] = str(get("linear"))
            if "target_data" in strategy.requires:
                extra["target_data"] = str(three_classes)
            if name == "mlp":
                extra["mirror_views"] = "both"  # trained on both views (linear: the default, mirrored at test only)
            if strategy.training_options:
                extra["epochs"] = 2  # a linear head is solved, not trained in epochs
            out = tmp_path_factory.mktemp(f"run-{name}") / "run"
            with pytest.MonkeyPatch.context() as patch:
                patch.setenv("FASTTL_CACHE_DIR", module_cache)
                run(data=str(three_classes), strategy=name, image_size=32, out=str(out), compare="none",
                    progress=False, **extra)
            runs[name] = out
        return runs[name]

    return get


def _evaluated_folder(name, three_classes):
    """The images a run's predictions.csv lists: the test split (dann: the target's)."""
    return three_classes / "test"


def _saved_predictions(run_dir):
    with open(run_dir / "predictions.csv") as f:
        return {row["sample"]: row for row in csv.DictReader(f)}


# -- predict -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", registry.names())
def test_predict_gives_the_runs_own_predictions(name, trained, three_classes, capsys):
    run_dir = trained(name)
    folder = _evaluated_folder(name, three_classes)
    code, out, err = cli(capsys, "predict", "--run", run_dir, folder, "--no-progress")
    assert code == 0, err
    rows = list(csv.DictReader(io.StringIO(out)))
    saved = _saved_predictions(run_dir)
    assert len(rows) == len(saved) == 12
    for row in rows:
        expected = saved[os.path.relpath(row["path"], folder)]
        assert row["predicted"] == expected["predicted"], row
        assert abs(float(row["confidence"]) - float(expected["confidence"])) <= 2e-4


def test_load_run_predicts_paths_and_uint8_tensors(trained, three_classes):
    model = fasttl.load_run(str(trained("scratch")))
    assert model.classes == THREE_CLASSES
    files = sorted(str(p) for p in (three_classes / "test").rglob("*.jpg"))
    labels, probabilities = model.predict(files)
    assert probabilities.shape == (12, 3) and probabilities.dtype == torch.float32
    assert torch.allclose(probabilities.sum(1), torch.ones(12), atol=1e-5)
    assert labels == [THREE_CLASSES[i] for i in probabilities.argmax(1).tolist()]
    saved = _saved_predictions(trained("scratch"))
    assert labels == [saved[os.path.relpath(f, three_classes / "test")]["predicted"] for f in files]

    # one path, a folder, and the same images as a uint8 tensor, HWC or CHW
    assert model.predict(files[0])[0] == labels[:1]
    assert model.predict(str(three_classes / "test"))[0] == labels
    from fasttl.data.torch_pipeline import decode

    pixels = torch.stack([decode(f) for f in files])  # (12, 32, 32, 3) uint8
    for images in (pixels, pixels.permute(0, 3, 1, 2), pixels.numpy()):
        tensor_labels, tensor_probabilities = model.predict(images)
        assert torch.allclose(tensor_probabilities, probabilities, atol=1e-4)
    assert model.predict(pixels[0])[0] == labels[:1]

    # .model takes [0, 1] images resized and cropped as input_spec says, and gives the same logits
    from fasttl.data import ImageLoader, file_list

    source = file_list([(f, 0) for f in files], THREE_CLASSES)
    unit = torch.cat([x for x, _ in ImageLoader(source, model.input_spec, 12, backend="torch")])
    assert 0.0 <= float(unit.min()) and float(unit.max()) <= 1.0
    with torch.no_grad():
        logits = model.model(unit)
    assert torch.allclose(logits.softmax(1), probabilities, atol=1e-4)

    with pytest.raises(fasttl.util.errors.OptionError, match="images: expected uint8"):
        model.predict(pixels.float())
    with pytest.raises(fasttl.util.errors.OptionError, match="images: expected shape"):
        model.predict(torch.zeros(2, 5, 5, dtype=torch.uint8)[None, None])
    with pytest.raises(fasttl.util.errors.OptionError, match=r"reads as \(N, H, W, 3\) with H=3 or as \(N, 3, H, W\)"):
        model.predict(torch.zeros(2, 3, 8, 3, dtype=torch.uint8))  # either layout: not guessed
    for nothing in ([], ()):
        with pytest.raises(fasttl.util.errors.OptionError, match="images: no images given"):
            model.predict(nothing)


def test_predict_top_k_and_out_file(trained, three_classes, tmp_path, capsys):
    run_dir = trained("scratch")
    out = tmp_path / "predictions.csv"
    code, stdout, err = cli(capsys, "predict", "--run", run_dir, three_classes / "test" / "cat", "--top-k", "3",
                             "--out", out, "--batch-size", "3", "--no-progress")
    assert code == 0 and stdout == "" and "4 predictions written" in err
    rows = list(csv.DictReader(out.open()))
    assert list(rows[0]) == ["path", "predicted", "confidence", "top2", "top2_confidence", "top3",
                             "top3_confidence"]
    for row in rows:
        assert sorted([row["predicted"], row["top2"], row["top3"]]) == THREE_CLASSES
        confidences = [float(row["confidence"]), float(row["top2_confidence"]), float(row["top3_confidence"])]
        assert confidences == sorted(confidences, reverse=True) and abs(sum(confidences) - 1) < 1e-3
    before = out.read_bytes()
    # an existing --out is kept unless --overwrite
    code, _, err = cli(capsys, "predict", "--run", run_dir, three_classes / "test" / "ship", "--out", out)
    assert code == 2 and "pass --overwrite" in one_line_error(err) and out.read_bytes() == before
    code, _, err = cli(capsys, "predict", "--run", run_dir, three_classes / "test" / "ship", "--out", out,
                        "--overwrite", "--no-progress")
    assert code == 0 and "ship/0.jpg" in out.read_text() and out.read_bytes() != before


@pytest.mark.parametrize("case", ["symlink-out", "out-folder-missing", "top-k-too-large", "top-k-zero", "no-such-image",
                                  "not-a-run", "unfinished-run", "missing-weights", "corrupt-image",
                                  "backbone-with-run", "out-without-run"])
def test_predict_refuses_hostile_input_in_one_line(case, trained, three_classes, tmp_path, capsys):
    run_dir = trained("scratch")
    images = three_classes / "test" / "cat"
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    words = ["predict", "--run", run_dir, images, "--no-progress"]
    expected = None
    if case == "symlink-out":
        (tmp_path / "link.csv").symlink_to(victim)
        words += ["--out", tmp_path / "link.csv", "--overwrite"]
        expected = "symbolic link"
    elif case == "out-folder-missing":
        words += ["--out", tmp_path / "nowhere" / "p.csv"]
        expected = "does not exist"
    elif case == "top-k-too-large":
        words += ["--top-k", "4"]
        expected = "top_k: expected 1..3"
    elif case == "top-k-zero":  # 0 is not "the default"
        words += ["--top-k", "0"]
        expected = "top_k: expected 1..3"
    elif case == "no-such-image":
        words[3] = tmp_path / "missing.jpg"
        expected = "no such file or folder"
    elif case == "not-a-run":
        words[2] = images
        expected = "no config.json; not a fasttl run folder"
    elif case in ("unfinished-run", "missing-weights"):
        copy = tmp_path / "copy"
        shutil.copytree(run_dir, copy)
        (copy / ("metrics.json" if case == "unfinished-run" else "scratch.safetensors")).unlink()
        words[2] = copy
        expected = "did not finish" if case == "unfinished-run" else "no trained weights"
    elif case == "corrupt-image":
        folder = tmp_path / "images"
        shutil.copytree(images, folder)
        (folder / "1.jpg").write_bytes((folder / "1.jpg").read_bytes()[:200])
        words[3] = folder
        expected = "1.jpg"
    elif case == "backbone-with-run":
        words += ["--backbone", "efficientnet_lite0"]
        expected = "drop --backbone"
    elif case == "out-without-run":
        words = ["predict", images / "0.jpg", "--out", tmp_path / "p.csv"]
        expected = "--out needs --run"
    before = sorted(p.name for p in tmp_path.iterdir())
    code, stdout, err = cli(capsys, *words)
    assert code == 2 and stdout == ""
    assert expected in one_line_error(err)
    assert victim.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written beside the inputs


def test_predict_on_error_skip_lists_the_unreadable_image(trained, three_classes, tmp_path, capsys):
    folder = tmp_path / "images"
    shutil.copytree(three_classes / "test" / "cat", folder)
    (folder / "2.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (folder / "notes.txt").write_text("not an image")
    code, out, err = cli(capsys, "predict", "--run", trained("scratch"), folder, "--on-error", "skip",
                          "--no-progress")
    assert code == 0
    paths = [row["path"] for row in csv.DictReader(io.StringIO(out))]
    assert [os.path.basename(p) for p in paths] == ["0.jpg", "1.jpg", "3.jpg"]
    assert "skipped 1 image" in err and "2.jpg" in err


# -- export --------------------------------------------------------------------------------------

EXPORTED = ["linear", "mlp", "finetune", "distill", "dann"]


@pytest.mark.parametrize("name", EXPORTED)
def test_export_matches_torch_in_onnx_runtime(name, trained, three_classes, tmp_path, capsys):
    ort = pytest.importorskip("onnxruntime", reason="the export extra (onnxruntime) is not installed")
    out = tmp_path / "model.onnx"
    code, stdout, err = cli(capsys, "export", trained(name), "--out", out)
    assert code == 0, err
    assert "max abs logit difference from torch" in stdout and "onnxruntime" in stdout
    reported = float(stdout.split("max abs logit difference from torch ")[1].split()[0])
    assert reported <= 1e-3

    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    assert json.loads(meta["classes"]) == THREE_CLASSES and meta["strategy"] == name
    model = fasttl.load_run(str(trained(name)))
    files = sorted(str(p) for p in (three_classes / "test").rglob("*.jpg"))
    from fasttl.data import ImageLoader, file_list

    images = torch.cat([x for x, _ in ImageLoader(file_list([(f, 0) for f in files], THREE_CLASSES), model.input_spec, 12,
                                                  backend="torch")])
    with torch.no_grad():
        expected = model.model(images).numpy()
    for batch in (1, 5, 12):  # the batch dimension is dynamic
        got = session.run(["logits"], {"images": images[:batch].numpy()})[0]
        assert got.shape == (batch, 3)
        assert np.abs(got - expected[:batch]).max() <= 1e-3


def test_export_refuses_without_the_extra_and_keeps_existing_files(trained, tmp_path, capsys, monkeypatch):
    out = tmp_path / "model.onnx"
    out.write_bytes(b"mine")
    code, _, err = cli(capsys, "export", trained("scratch"), "--out", out)
    assert code == 2 and "pass --overwrite" in one_line_error(err) and out.read_bytes() == b"mine"
    link = tmp_path / "link.onnx"
    link.symlink_to(out)
    code, _, err = cli(capsys, "export", trained("scratch"), "--out", link, "--overwrite")
    assert code == 2 and "symbolic link" in one_line_error(err) and out.read_bytes() == b"mine"
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as without the export extra
    code, _, err = cli(capsys, "export", trained("scratch"), "--out", tmp_path / "new.onnx")
    assert code == 2 and "pip install 'fasttl[export]'" in one_line_error(err)
    assert not (tmp_path / "new.onnx").exists()


def test_export_that_fails_verification_writes_nothing(trained, tmp_path, capsys, monkeypatch):
    pytest.importorskip("onnxruntime", reason="the export extra (onnxruntime) is not installed")
    import fasttl.export

    monkeypatch.setattr(fasttl.export, "TOLERANCE", 1e-30)  # no float32 graph passes (its logits differ by ~1e-6)
    code, _, err = cli(capsys, "export", trained("scratch"), "--out", tmp_path / "model.onnx")
    assert code == 1 and "differ from torch's" in one_line_error(err)
    assert list(tmp_path.iterdir()) == []


# -- history.csv and TensorBoard -----------------------------------------------------------------

def test_every_run_writes_history_csv(trained):
    run_dir = trained("scratch")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    rows = list(csv.DictReader((run_dir / "history.csv").open()))
    assert [(r["model"], int(r["epoch"])) for r in rows] == [("scratch", 1), ("scratch", 2)]
    for row, record in zip(rows, metrics["history"]):
        for key in ("train_loss", "train_accuracy", "eval_loss", "eval_accuracy", "lr", "images_per_s"):
            assert float(row[key]) == pytest.approx(record[key], rel=1e-12), key
    assert float(rows[0]["images_per_s"]) == pytest.approx(30 / float(rows[0]["seconds"]), rel=1e-9)


def _scalars(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_scalars_are_readable_with_tensorboard(three_classes, tmp_path, capsys, monkeypatch):
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")
    out = tmp_path / "run"
    code, _, err = cli(capsys, "run", "--data", three_classes, "--strategy", "scratch", "--compare", "none",
                        "--epochs", "3", "--out", out, "--no-progress", "--tensorboard")
    assert code == 0, err
    history = json.loads((out / "metrics.json").read_text())["history"]
    scalars = _scalars(out / "tensorboard" / "scratch")
    assert [step for step, _ in scalars["loss/train"]] == [1, 2, 3]
    for tag, key in (("loss/train", "train_loss"), ("accuracy/eval", "eval_accuracy"), ("lr", "lr"),
                     ("throughput/images_per_s", "images_per_s"), ("loss/eval", "eval_loss")):
        assert [v for _, v in scalars[tag]] == pytest.approx([h[key] for h in history], rel=1e-6), tag
    metrics = json.loads((out / "metrics.json").read_text())
    assert scalars["test/accuracy"] == [(3, pytest.approx(metrics["accuracy"], rel=1e-6))]

    # --tensorboard DIR: DIR/<run folder name>/<model>
    board = tmp_path / "board"
    code, _, err = cli(capsys, "run", "--data", three_classes, "--strategy", "scratch", "--compare", "none",
                        "--epochs", "1", "--out", tmp_path / "second", "--no-progress", "--tensorboard", board)
    assert code == 0, err
    assert [s for s, _ in _scalars(board / "second" / "scratch")["loss/train"]] == [1]


def test_tensorboard_missing_is_one_line_before_any_work(three_classes, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as without the tensorboard extra
    monkeypatch.delitem(sys.modules, "torch.utils.tensorboard", raising=False)
    code, _, err = cli(capsys, "run", "--data", three_classes, "--strategy", "scratch", "--out", tmp_path / "run",
                        "--tensorboard", "--no-progress")
    assert code == 2 and "pip install 'fasttl[tensorboard]'" in one_line_error(err)
    assert not (tmp_path / "run").exists()
