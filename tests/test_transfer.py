"""The transfer job end to end on small real data (CIFAR-10 JPEG subsets, CIFAR-10 mini, scikit-learn digits)."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import cifar_subset

import fasttl
from fasttl.transfer.job import run
from fasttl.transfer.rundir import Checkpoint

CLASSES = ["airplane", "automobile", "frog", "ship"]


pytestmark = pytest.mark.usefixtures("private_cache")


@pytest.fixture(scope="module")
def tiny_cifar(tmp_path_factory, cifar10_root):
    """train/ (16 per class) and test/ (6 per class) class folders of real CIFAR-10 JPEGs."""
    return cifar_subset(cifar10_root, tmp_path_factory.mktemp("tiny") / "cifar4", CLASSES, 16, 6)


def common(**kw):
    base = dict(image_size=32, progress=False, seed=0)
    base.update(kw)
    return base


def check_run_dir(run_dir, weights):
    for name in ("config.json", "metrics.json", "report.md", "confusion_matrix.png", "curves.png", *weights):
        assert (run_dir / name).is_file(), name
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for key in ("accuracy", "macro_f1", "per_class_recall", "confusion_matrix", "timings"):
        assert key in metrics
    cm = metrics["confusion_matrix"]
    assert sum(map(sum, cm)) == metrics["samples"]
    assert abs(metrics["accuracy"] - sum(cm[i][i] for i in range(len(cm))) / metrics["samples"]) < 1e-9
    recalls = [cm[i][i] / sum(cm[i]) for i in range(len(cm)) if sum(cm[i])]
    assert abs(metrics["balanced_accuracy"] - sum(recalls) / len(recalls)) < 1e-9
    assert "| balanced accuracy |" in (run_dir / "report.md").read_text()
    assert (run_dir / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    check_predictions(run_dir, metrics)
    return metrics


def check_predictions(run_dir, metrics):
    """predictions.csv: one row per evaluated image, names unique, agreeing with the metrics."""
    import csv

    with open(run_dir / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == metrics["samples"] and len({r["sample"] for r in rows}) == len(rows)
    classes = list(metrics["per_class_recall"])
    assert all(r["label"] in classes and r["predicted"] in classes and 0 < float(r["confidence"]) <= 1 for r in rows)
    right = sum(r["label"] == r["predicted"] for r in rows)
    assert right / len(rows) == pytest.approx(metrics["accuracy"], abs=1e-12)
    for i, name in enumerate(classes):  # each confusion-matrix row from the file
        counts = [sum(r["label"] == name and r["predicted"] == other for r in rows) for other in classes]
        assert counts == metrics["confusion_matrix"][i]


def test_linear_with_scratch_baseline_writes_everything(tiny_cifar, tmp_path):
    out = tmp_path / "linear"
    metrics = run(data=str(tiny_cifar), strategy="linear", epochs=8, out=str(out), compare="scratch", **common())
    saved = check_run_dir(out, ["head.safetensors", "scratch.safetensors"])
    assert saved["accuracy"] == metrics["accuracy"] and metrics["samples"] == 24
    assert set(metrics["per_class_recall"]) == set(CLASSES)
    assert "scratch" in metrics["compare"] and "accuracy" in metrics["compare"]["scratch"]
    assert metrics["accuracy"] > 0.4  # 4 classes; transfer from ImageNet on 64 images
    assert {"extract_s", "train_s", "eval_s", "train_images_per_s"} <= set(metrics["timings"])
    report = (out / "report.md").read_text()
    assert "scratch (from random init)" in report and "linear (feature transfer)" in report
    config = json.loads((out / "config.json").read_text())
    assert config["classes"] == CLASSES and config["strategy"] == "linear" and config["image_size"] == 32
    # eval re-computes the same accuracy from the saved weights
    from fasttl.transfer.evaluate import evaluate_run

    assert evaluate_run(str(out), str(tiny_cifar), progress=False)["accuracy"] == pytest.approx(metrics["accuracy"])


def test_same_seed_same_metrics_and_the_cache_is_reused(tiny_cifar, tmp_path):
    first = run(data=str(tiny_cifar), strategy="mlp", epochs=4, out=str(tmp_path / "a"), **common())
    second = run(data=str(tiny_cifar), strategy="mlp", epochs=4, out=str(tmp_path / "b"), **common())
    assert first["accuracy"] == second["accuracy"] and first["loss"] == second["loss"]
    # 64 training images, 24 test images in both views, 8 validation images mirrored (--mirror-views test)
    assert first["timings"]["extracted_images"] == 64 + 2 * 24 + 8 and second["timings"]["extracted_images"] == 0


def test_interrupted_run_resumes_to_the_same_result(tiny_cifar, tmp_path, monkeypatch):
    reference = run(data=str(tiny_cifar), strategy="scratch", epochs=4, out=str(tmp_path / "ref"), **common())
    saves = {"n": 0}
    original = Checkpoint.save

    def save_then_interrupt(self, state):
        original(self, state)
        saves["n"] += 1
        if saves["n"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(Checkpoint, "save", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        run(data=str(tiny_cifar), strategy="scratch", epochs=4, out=str(tmp_path / "cut"), **common())
    monkeypatch.setattr(Checkpoint, "save", original)
    resumed = run(data=str(tiny_cifar), strategy="scratch", epochs=4, out=str(tmp_path / "cut"), resume=True,
                  **common())
    assert len(resumed["history"]) == 4
    assert resumed["accuracy"] == reference["accuracy"] and resumed["loss"] == pytest.approx(reference["loss"],
                                                                                             rel=1e-6)


def test_finetune_top_stages_bf16_master_weights(tiny_cifar, tmp_path):
    out = tmp_path / "ft"
    metrics = run(data=str(tiny_cifar), strategy="finetune", epochs=1, batch_size=16, finetune_stages=9,
                  precision="bf16", out=str(out), **common())
    check_run_dir(out, ["model.safetensors"])
    assert metrics["notes"]["trainable_stages"] == 9 and metrics["precision"] == "bf16"
    assert 0.0 <= metrics["accuracy"] <= 1.0 and len(metrics["history"]) == 1


def test_distill_from_a_linear_teacher_and_teacher_checks(tiny_cifar, tmp_path):
    teacher = tmp_path / "teacher"
    run(data=str(tiny_cifar), strategy="linear", out=str(teacher), **common())
    out = tmp_path / "student"
    metrics = run(data=str(tiny_cifar), strategy="distill", teacher=str(teacher), epochs=3, out=str(out),
                  compare="scratch", **common())
    check_run_dir(out, ["distill.safetensors", "scratch.safetensors", "teacher_logits.safetensors"])
    assert metrics["notes"]["teacher_train_accuracy"] > 0.5
    assert "scratch" in metrics["compare"]
    other = tmp_path / "other"
    shutil.copytree(tiny_cifar, other)
    shutil.rmtree(other / "train" / "ship")
    shutil.rmtree(other / "test" / "ship")
    with pytest.raises(ValueError, match="trained for classes"):
        run(data=str(other), strategy="distill", teacher=str(teacher), epochs=1, out=str(tmp_path / "x"), **common())


def test_dann_on_a_shifted_target(tiny_cifar, tmp_path):
    shifted = tmp_path / "shifted"
    subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "..", "benchmarks",
                                                 "make_shifted_cifar.py"), "--src", str(tiny_cifar / "test"), "--out",
                    str(shifted)], check=True, capture_output=True)
    out = tmp_path / "dann"
    metrics = run(data=str(tiny_cifar), strategy="dann", target_data=str(shifted), epochs=3, out=str(out), **common())
    check_run_dir(out, ["dann.safetensors", "source_only.safetensors"])
    assert "source_only" in metrics["compare"] and metrics["notes"]["evaluated_on"] == "target"
    assert metrics["samples"] == 24
    assert "evaluated on the target domain" in (out / "report.md").read_text()


def test_embedded_default_shows_transfer_beating_scratch_offline(tmp_path):
    """`fasttl run` with no options: ImageNet EfficientNet-Lite0 to the CIFAR-10 mini set shipped
    in the package, feature transfer beside the from-scratch baseline, at the job's defaults."""
    out = tmp_path / "default"
    result = subprocess.run([sys.executable, "-m", "fasttl", "run", "--out", str(out), "--no-progress"],
                            capture_output=True, text=True, timeout=900,
                            env=dict(os.environ, FASTTL_DATA=str(tmp_path / "no-data-here")))
    assert result.returncode == 0, result.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["samples"] == 500 and set(metrics["compare"]) == {"scratch"}
    # the README's claim: transfer wins on these photographs by far (measured 0.73 vs 0.41)
    assert metrics["accuracy"] > metrics["compare"]["scratch"]["accuracy"] + 0.15
    assert "scratch (from random init)" in result.stdout and "CIFAR-10 mini" in result.stdout


def test_digits_stay_available_with_their_baseline(tmp_path):
    out = tmp_path / "digits"
    metrics = run(data="digits", epochs=2, out=str(out), progress=False)
    assert metrics["samples"] == 450 and "scratch" in metrics["compare"]
    assert metrics["accuracy"] > 0.5


def test_cli_run_and_eval(tiny_cifar, tmp_path):
    out = tmp_path / "cli"
    env = dict(os.environ)
    result = subprocess.run([sys.executable, "-m", "fasttl", "run", "--data", str(tiny_cifar), "--compare", "scratch", "--epochs", "3",
                             "--image-size", "32", "--out", str(out), "--no-progress"], capture_output=True, text=True,
                            timeout=600, env=env)
    assert result.returncode == 0, result.stderr
    assert "run directory" in result.stdout
    result = subprocess.run([sys.executable, "-m", "fasttl", "eval", str(out), "--data", str(tiny_cifar),
                             "--no-progress"], capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr
    assert "accuracy" in result.stdout and (out / "eval_metrics.json").is_file()


@pytest.mark.parametrize("options, error, match", [
    (dict(strategy="transfer"), ValueError, "strategy"),
    (dict(backbone="vgg16"), ValueError, "backbone"),
    (dict(image_size=16), ValueError, "minimum"),
    (dict(strategy="distill"), ValueError, "teacher"),
    (dict(strategy="dann"), ValueError, "target_data"),
    (dict(epochs=0), ValueError, "epochs"),
])
def test_bad_options_are_clear_errors(tiny_cifar, tmp_path, options, error, match):
    with pytest.raises(error, match=match):
        run(data=str(tiny_cifar), out=str(tmp_path / "bad"), **dict(common(), **options))


def test_train_and_test_classes_must_match(tiny_cifar, tmp_path):
    other = tmp_path / "mismatch"
    shutil.copytree(tiny_cifar, other)
    shutil.rmtree(other / "test" / "frog")
    with pytest.raises(fasttl.data.DataError, match=r"test has classes the training split has not \(none\) and lacks "
                                                    r"some it has \('frog'\)$"):
        run(data=str(other), out=str(tmp_path / "bad"), **common())


def test_cifar10_missing_says_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTTL_DATA", str(tmp_path / "nothing"))
    with pytest.raises(fasttl.data.DataError, match="FASTTL_DATA"):
        run(data="cifar10", out=str(tmp_path / "bad"), **common())


@pytest.mark.slow
def test_finetune_under_torchrun_two_processes_gloo(tiny_cifar, tmp_path):
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29544", "-m",
               "fasttl", "run", "--data", str(tiny_cifar), "--strategy", "finetune", "--epochs", "1", "--image-size",
               "32", "--batch-size", "8", "--finetune-stages", "1", "--out", str(out), "--no-progress"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["notes"]["world_size"] == 2
    # each rank trained its half of the training part (64 images less the validation split held out by LP-FT)
    trained = metrics["notes"]["choice"]["validation"]["train_images"]
    assert trained % 2 == 0 and 48 <= trained < 64 and metrics["history"][0]["images"] == trained // 2


@pytest.mark.parametrize("mode, train_views, test_views", [("both", 2, 2), ("test", 1, 2), ("none", 1, 1)])
def test_mirror_views_extract_and_average_the_views_asked_for(tiny_cifar, tmp_path, mode, train_views, test_views):
    out = tmp_path / "views"
    metrics = run(data=str(tiny_cifar), strategy="linear", mirror_views=mode, out=str(out), **common())
    assert metrics["notes"]["views"] == {"train": train_views, "test": test_views}
    validation = metrics["notes"]["choice"]["validation"]
    # test alone mirrored: so are the validation images, which choose the head on the same average
    mirrored_validation = validation["validation_images"] if (train_views, test_views) == (1, 2) else 0
    assert validation["views"] == test_views and validation["validation_images"] == 8  # 2 of 16 per class
    assert metrics["timings"]["extracted_images"] == train_views * 64 + test_views * 24 + mirrored_validation
    trained = {1: "plain", 2: "plain and mirrored (each a row the head trains on)"}
    averaged = {1: "plain", 2: "plain and mirrored (logits averaged)"}
    assert f"; views: train {trained[train_views]}, test {averaged[test_views]}." in (out / "report.md").read_text()
    from fasttl.transfer.evaluate import evaluate_run

    assert evaluate_run(str(out), str(tiny_cifar), progress=False)["accuracy"] == pytest.approx(metrics["accuracy"])


def test_mirror_views_default_is_test_and_the_flag_alone_means_both(capsys):
    from conftest import one_line_error
    from fasttl.cli import build_parser, main
    from fasttl.transfer.caching import views_of
    from fasttl.transfer.config import RunConfig

    assert RunConfig().mirror_views == "test"
    assert [views_of(RunConfig(), s) for s in ("train", "test")] == [[False], [False, True]]
    # run folders from before the modes hold a bool
    assert views_of({"mirror_views": True}, "train") == [False, True]
    from fasttl.transfer.schema import upgraded

    assert views_of({"mirror_views": False}, "test") == views_of(upgraded({}), "test") == [False]
    assert RunConfig(mirror_views=True).mirror_views == "both"
    from fasttl.util.errors import OptionError

    with pytest.raises(OptionError, match="mirror_views: unknown 'sideways'; choose from none, test, both"):
        views_of({"mirror_views": "sideways"}, "test")
    parse = build_parser().parse_args
    assert parse(["run", "--mirror-views"]).mirror_views == "both"
    assert parse(["run", "--mirror-views", "none"]).mirror_views == "none"
    with pytest.raises(SystemExit) as exited:
        main(["run", "--mirror-views", "sideways"])
    line = one_line_error(capsys.readouterr().err)
    assert exited.value.code == 2 and "--mirror-views" in line and "sideways" in line


def _as_an_older_fasttl_wrote_it(run_dir, dropped):
    """The run's config.json (and its identity) without the keys `dropped`, the marker's hash
    updated: a run folder from before those options existed."""
    import hashlib

    path = run_dir / "config.json"
    config = json.loads(path.read_text())
    for key in dropped:
        config.pop(key)
        config["identity"].pop(key, None)
    data = json.dumps(config, indent=2, sort_keys=True).encode()
    path.write_bytes(data)
    marker = json.loads((run_dir / ".fasttl-run").read_text())
    marker["config_sha256"] = hashlib.sha256(data).hexdigest()
    (run_dir / ".fasttl-run").write_text(json.dumps(marker))


def test_an_older_run_folder_loads_as_it_behaved_in_one_upgrade(three_classes, tmp_path, monkeypatch):
    """Keys config.json gained later are filled by one function (schema.upgraded) with the value
    such a run behaved as: a linear run from before --features/--mirror-views/--cache-dtype reads
    head features, plain views, fp16; a finetune run from before LP-FT has a random-init head."""
    from fasttl.transfer.job import run
    from fasttl.transfer.rundir import load_trained, read_config
    from fasttl.transfer.schema import added_later

    monkeypatch.setenv("FASTTL_CACHE_DIR", str(tmp_path / "cache"))
    linear = tmp_path / "linear"
    run(data=str(three_classes), strategy="linear", image_size=32, features="head", mirror_views="none",
        cache_dtype="fp16", compare="none", out=str(linear), progress=False)
    finetune = tmp_path / "finetune"
    run(data=str(three_classes), strategy="finetune", finetune_from="random", epochs=1, finetune_stages=1,
        image_size=32, compare="none", out=str(finetune), progress=False)
    before = {d: load_trained(str(d), "cpu") for d in (linear, finetune)}
    dropped = {linear: ["features", "mirror_views", "cache_dtype", "engine", "extract_precision", "finetune_from",
                        "teacher_logits"],
               finetune: ["finetune_from", "features", "teacher_logits"]}
    for run_dir, keys in dropped.items():
        _as_an_older_fasttl_wrote_it(run_dir, keys)
        config = read_config(str(run_dir))
        assert {k: config[k] for k in keys} == {k: added_later()[k] for k in keys}
        from fasttl.transfer.datasets import load_dataset

        test = load_dataset(str(three_classes)).test
        after = load_trained(str(run_dir), "cpu")
        assert torch.equal(after.predict_logits(test), before[run_dir].predict_logits(test))
