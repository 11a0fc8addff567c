"""`fasttl run` / `fasttl eval` on hostile input: run folders that hold another run, resumes that
don't match, diverging options, tiny and single-class datasets, crafted checkpoints; every case
checks the exit code or exception, that the message names the culprit, and what files changed."""
import json
import re
import os
import pickle
import shutil
import subprocess
import sys

import pytest
from conftest import cifar_subset
import torch

from fasttl.util.errors import OptionError
from fasttl.heads.fit import DivergedError
from fasttl.data import DataError
from fasttl.transfer.job import run
from fasttl.transfer.rundir import RunError, write_config

CLASSES = ["cat", "ship"]


pytestmark = pytest.mark.usefixtures("private_cache")


@pytest.fixture(scope="module")
def two_classes(tmp_path_factory, cifar10_root):
    """train/ (8 per class) and test/ (3 per class) of real CIFAR-10 JPEGs: a small target task."""
    return cifar_subset(cifar10_root, tmp_path_factory.mktemp("bad-run") / "two", CLASSES, 8, 3)


def quick(data, out, **kw):
    options = dict(data=str(data), out=None if out is None else str(out), strategy="scratch", epochs=2, image_size=32, progress=False, seed=0)
    options.update(kw)
    if options["strategy"] == "linear" and options.get("compare", "none") in ("none", "auto") and "epochs" not in kw:
        del options["epochs"]  # a linear head is solved, not trained in epochs: it refuses --epochs
    return options


def snapshot(folder):
    """{relative path: bytes} of every file below folder."""
    files = {}
    for base, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(base, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, folder)] = f.read()
    return files


def cli(*args, cwd=None, env=None):
    environment = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "fasttl", *args], capture_output=True, text=True, cwd=cwd,
                          env=environment, timeout=300)


def assert_one_line_error(result, *names):
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("fasttl: error: "), result.stderr
    for name in names:
        assert name in lines[0], (name, lines[0])


# ---- run folders ------------------------------------------------------------------------------
def test_a_finished_run_is_never_replaced_without_overwrite(two_classes, tmp_path):
    out = tmp_path / "run"
    run(**quick(two_classes, out))
    before = snapshot(out)
    with pytest.raises(RunError, match="finished run.*--overwrite"):
        run(**quick(two_classes, out, lr=1e-3))
    assert snapshot(out) == before
    mine = {"my-notes.txt": b"mine", "my_backbone.checkpoint.pt": b"not fasttl's", "extra.safetensors": b"mine too"}
    for name, data in mine.items():
        (out / name).write_bytes(data)
    run(**quick(two_classes, out, lr=1e-3, overwrite=True))
    for name, data in mine.items():  # only fasttl's own files are replaced, whatever the others' names
        assert (out / name).read_bytes() == data, name
    assert json.loads((out / "config.json").read_text())["lr"] == 1e-3


def test_an_unfinished_run_needs_resume_or_overwrite(two_classes, tmp_path):
    out = tmp_path / "run"
    run(**quick(two_classes, out))
    os.remove(out / "metrics.json")  # as a run killed before its end leaves it
    with pytest.raises(RunError, match="unfinished run.*--resume.*--overwrite"):
        run(**quick(two_classes, out))
    run(**quick(two_classes, out, resume=True))
    assert (out / "metrics.json").is_file()


def test_a_run_stopped_before_its_first_epoch_does_not_block_the_next(two_classes, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(DivergedError):
        run(**quick(two_classes, out, lr=1e8))  # stops in epoch 1: config.json, no checkpoint
    assert (out / "config.json").is_file() and not list(out.glob("*.checkpoint.pt"))
    run(**quick(two_classes, out))  # nothing to resume or lose: the plain command runs
    assert (out / "metrics.json").is_file()


def test_option_mistakes_found_before_any_folder_is_made(two_classes, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(OptionError, match=r"weights: no file at .*nowhere\.pth"):
        run(**quick(two_classes, out, strategy="linear", weights=str(tmp_path / "nowhere.pth")))
    with pytest.raises(OptionError, match="teacher: .* is not a folder"):
        run(**quick(two_classes, out, strategy="distill", teacher=str(tmp_path / "no-run")))
    if not torch.cuda.is_available():
        with pytest.raises(OptionError, match="device: cuda asked for, but torch sees no CUDA GPU.*--device cpu"):
            run(**quick(two_classes, out, device="cuda"))
    assert not out.exists()


def test_a_folder_of_other_files_is_not_used_as_a_run_folder(two_classes, tmp_path):
    out = tmp_path / "documents"
    out.mkdir()
    (out / "report.md").write_text("my own report")
    with pytest.raises(RunError, match="not empty and holds no fasttl run"):
        run(**quick(two_classes, out))
    assert snapshot(out) == {"report.md": b"my own report"}


def test_the_default_folder_takes_the_next_free_name(two_classes, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run(**quick(two_classes, None))
    run(**quick(two_classes, None))
    assert (tmp_path / "runs" / "two-scratch" / "metrics.json").is_file()
    assert (tmp_path / "runs" / "two-scratch-2" / "metrics.json").is_file()


def test_resume_refuses_other_options_and_names_them(two_classes, tmp_path):
    out = tmp_path / "run"
    run(**quick(two_classes, out))
    os.remove(out / "metrics.json")
    before = snapshot(out)
    with pytest.raises(RunError, match=r"resume: .*lr: was 0\.003, now 0\.01"):
        run(**quick(two_classes, out, lr=0.01, resume=True))
    assert snapshot(out) == before


def test_resume_refuses_other_data(two_classes, tmp_path):
    mine, out = tmp_path / "mine", tmp_path / "run"
    shutil.copytree(two_classes, mine)
    run(**quick(mine, out))
    os.remove(out / "metrics.json")
    other = tmp_path / "other"
    shutil.copytree(mine, other)
    shutil.copy(other / "train" / "cat" / "1.jpg", other / "train" / "cat" / "0.jpg")  # one image replaced
    with pytest.raises(RunError, match=rf"\(data: was '{mine}', now '{other}'\)"):  # other data, by another path
        run(**quick(other, out, resume=True))
    shutil.copy(mine / "train" / "cat" / "1.jpg", mine / "train" / "cat" / "0.jpg")
    with pytest.raises(RunError, match="the data changed since the run started"):  # the same path, changed
        run(**quick(mine, out, resume=True))


@pytest.mark.parametrize("old, mode", [(False, "none"), (True, "both")])
def test_a_run_from_before_mirror_view_modes_resumes_with_the_matching_mode(two_classes, tmp_path, old, mode):
    # config.json of an interrupted run from when --mirror-views was a flag holds a bool
    out = tmp_path / "run"
    run(**quick(two_classes, out, strategy="linear", mirror_views=mode))
    os.remove(out / "metrics.json")
    config = json.loads((out / "config.json").read_text())
    config["mirror_views"] = config["identity"]["mirror_views"] = old
    write_config(str(out), config)  # as that fasttl wrote it (the marker records its hash)
    other = "test" if mode == "none" else "none"
    with pytest.raises(RunError, match=f"mirror_views: was '{mode}', now '{other}'"):
        run(**quick(two_classes, out, strategy="linear", mirror_views=other, resume=True))
    run(**quick(two_classes, out, strategy="linear", mirror_views=mode, resume=True))
    assert (out / "metrics.json").is_file()


@pytest.mark.parametrize("value", [None, "sideways", 1, "TEST"])
def test_a_run_whose_config_holds_a_bad_mirror_views_is_named_when_loaded(two_classes, tmp_path, value):
    from fasttl.transfer import registry

    out = tmp_path / "run"
    run(**quick(two_classes, out, strategy="linear"))
    config = json.loads((out / "config.json").read_text())
    config["mirror_views"] = value
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(RunError, match=rf"{re.escape(str(out / 'config.json'))}: field 'mirror_views' is "
                                       r".* \(expected one of none, test, both\)"):
        registry.get("linear").load(str(out), torch.device("cpu"))
    with pytest.raises(OptionError, match="mirror_views: unknown None"):  # None is not "none"
        run(**quick(two_classes, tmp_path / "other", strategy="linear", mirror_views=None))


def test_a_checkpoint_of_another_run_is_refused(two_classes, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    run(**quick(two_classes, first))
    run(**quick(two_classes, second, lr=0.01))
    os.remove(second / "metrics.json")
    shutil.copy(first / "scratch.checkpoint.pt", second / "scratch.checkpoint.pt")
    with pytest.raises(RunError, match="scratch.checkpoint.pt: a checkpoint of another run"):
        run(**quick(two_classes, second, lr=0.01, resume=True))


class _Payload:
    """Pickles to a call that would create the marker file on load."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_a_crafted_checkpoint_never_runs_code(two_classes, tmp_path):
    out = tmp_path / "run"
    run(**quick(two_classes, out))
    os.remove(out / "metrics.json")
    marker = tmp_path / "pwned"
    for payload in (_Payload(str(marker)), {"epoch": 1, "model": _Payload(str(marker))}):
        with open(out / "scratch.checkpoint.pt", "wb") as f:
            pickle.dump(payload, f)
        with pytest.raises(RunError, match="scratch.checkpoint.pt: not a fasttl checkpoint"):
            run(**quick(two_classes, out, resume=True))
        assert not marker.exists()
    # torch.save's zip format with a pickled object inside is refused the same way
    torch.save({"epoch": 1, "model": _Payload(str(marker))}, out / "scratch.checkpoint.pt")
    with pytest.raises(RunError, match="not a fasttl checkpoint"):
        run(**quick(two_classes, out, resume=True))
    assert not marker.exists()


def test_a_damaged_teacher_logits_file_is_recomputed(two_classes, tmp_path):
    teacher, student = tmp_path / "teacher", tmp_path / "student"
    run(**quick(two_classes, teacher, strategy="linear"))
    first = run(**quick(two_classes, student, strategy="distill", teacher=str(teacher)))
    logits = student / "teacher_logits.safetensors"
    logits.write_bytes(b"\x00" * 64)
    again = run(**quick(two_classes, student, strategy="distill", teacher=str(teacher), overwrite=True))
    assert again["notes"]["teacher_train_accuracy"] == first["notes"]["teacher_train_accuracy"]


# ---- options and training that go wrong -------------------------------------------------------
@pytest.mark.parametrize("options, match", [
    ({"lr": float("inf")}, "lr: expected a finite number"),
    ({"lr": float("nan")}, "lr: expected a finite number"),
    ({"lr": -1.0}, "lr: expected a finite number"),
    ({"temperature": 0.0}, "temperature"),
    ({"alpha": 1.5}, "alpha"),
    ({"epochs": 0}, "epochs"),
    ({"image_size": 100000}, "image_size"),
    ({"train_per_class": 0}, "train_per_class"),
    ({"on_error": "ignore"}, "on_error"),
    ({"resume": True, "overwrite": True}, "resume"),
    ({"seed": 10**20}, "seed: expected an integer"),
    ({"seed": 1.5}, "seed: expected an integer"),
    ({"epochs": True}, "epochs: expected a positive integer"),
    ({"weights": 7, "strategy": "linear"}, "weights: expected a path"),
    ({"compare": "distill"}, "teacher: --compare distill needs --teacher"),
    ({"compare": "scratch"}, "compare: --compare scratch is the --strategy itself"),
    ({"teacher": "some/run"}, "teacher: --teacher is read only by --strategy distill"),
    ({"finetune_stages": 2}, "finetune_stages: --finetune-stages is read only by --strategy finetune"),
    ({"regularize": "l2sp"}, "regularize: --regularize is read only by --strategy finetune"),
    ({"finetune_from": "random"}, "finetune_from: --finetune-from is read only by --strategy finetune"),
    ({"strategy": "finetune", "regularize": "l2"}, "regularize: unknown 'l2'"),
    ({"strategy": "scratch", "mirror_views": "both"},
     "mirror_views: --mirror-views is read only by --strategy linear or mlp; drop it for --strategy scratch"),
    ({"strategy": "linear", "mirror_views": "sideways"}, "mirror_views: unknown 'sideways'; choose from none, test, both"),
    ({"strategy": "linear", "compare": "none", "epochs": 7}, r"^epochs: --epochs is not read by --strategy linear"),
    ({"strategy": "linear", "compare": "none", "epochs": None, "lr": 0.3}, r"^lr: --lr is not read by --strategy linear"),
    ({"strategy": "linear", "compare": "none", "epochs": None, "batch_size": 8},
     r"^batch_size: --batch-size is not read by"),
])
def test_bad_options_are_refused_before_any_work(two_classes, tmp_path, options, match):
    with pytest.raises(OptionError, match=match):
        run(**quick(two_classes, tmp_path / "run", **options))
    assert not (tmp_path / "run").exists()


def test_a_diverging_run_stops_with_an_error_and_writes_no_metrics(two_classes, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(DivergedError, match="diverged in epoch 1.*smaller --lr"):
        run(**quick(two_classes, out, lr=1e8))
    assert not (out / "metrics.json").exists()
    assert not (out / "scratch.checkpoint.pt").exists()  # NaN weights are never checkpointed


def test_report_states_only_the_options_a_model_read(two_classes, tmp_path):
    run(**quick(two_classes, tmp_path / "alone", strategy="linear", compare="none"))
    alone = (tmp_path / "alone" / "report.md").read_text()
    assert "epochs" not in alone.split("\n\n")[2] and " lr " not in alone.split("\n\n")[2]
    run(**quick(two_classes, tmp_path / "beside", strategy="linear", compare="scratch", epochs=1))
    beside = (tmp_path / "beside" / "report.md").read_text()
    assert "1 epochs, batch 256, lr 0.003 (scratch)" in beside


def test_metrics_json_is_strict_json(two_classes, tmp_path):
    out = tmp_path / "run"
    run(**quick(two_classes, out, strategy="linear"))

    def refuse(constant):
        raise AssertionError(f"metrics.json holds {constant}")

    metrics = json.loads((out / "metrics.json").read_text(), parse_constant=refuse)
    assert metrics["samples"] == 6


# ---- data sizes -------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", ["linear", "mlp", "scratch"])
def test_tiny_datasets_train_at_the_default_batch_sizes_and_schedules(two_classes, tmp_path, strategy):
    # 8 training images per class at batch 256 / 64: one step per epoch, the case that divided by zero
    metrics = run(data=str(two_classes), out=str(tmp_path / "run"), strategy=strategy, image_size=32, progress=False)
    assert metrics["samples"] == 6 and len(metrics["history"]) >= 1
    # the epochs' train loss, or the linear head's objective (its train loss plus the L2 term) per
    # strength, or (cross-validated on few images) its out-of-fold loss
    assert all(torch.isfinite(torch.tensor(h.get("train_loss", h.get("objective", h.get("val_loss")))))
               for h in metrics["history"])


def test_one_image_per_class_trains(two_classes, tmp_path):
    metrics = run(**quick(two_classes, tmp_path / "run", strategy="linear", train_per_class=1, test_per_class=1))
    assert metrics["samples"] == 2
    # nothing could be held out: the report says the defaults were used, with no made-up validation score
    choices = (tmp_path / "run" / "report.md").read_text().split("## Choices made on validation")[1]
    assert "no validation split could be carved" in choices and "nan" not in choices


def test_a_single_class_dataset_is_refused(tmp_path, two_classes):
    data = tmp_path / "one"
    shutil.copytree(two_classes / "train" / "cat", data / "cat")
    with pytest.raises(DataError, match=r"1 class.*at least 2"):
        run(**quick(data, tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_skip_policy_leaves_bad_images_out_and_lists_them(two_classes, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(two_classes, data)
    bad = data / "train" / "cat" / "3.jpg"
    bad.write_bytes(bad.read_bytes()[:200])  # truncated JPEG
    out = tmp_path / "run"
    with pytest.raises(DataError, match="3.jpg.*--on-error skip"):
        run(**quick(data, out))
    metrics = run(**quick(data, tmp_path / "run-skip", on_error="skip"))
    assert [entry["file"] for entry in metrics["skipped"]] == [str(bad)]
    listed = (tmp_path / "run-skip" / "skipped.csv").read_text()
    assert str(bad) in listed
    # fasttl eval on other data takes the same policy: a bad test image stops it, named, or is left
    # out (the run's own data is read as the run read it, with its policy)
    other_copy = tmp_path / "copy"
    shutil.copytree(data, other_copy)
    bad_test = other_copy / "test" / "ship" / "1.jpg"
    bad_test.write_bytes(b"not an image")
    assert_one_line_error(cli("eval", str(tmp_path / "run-skip"), "--data", str(other_copy), "--no-progress"),
                          str(bad_test), "--on-error skip")
    result = cli("eval", str(tmp_path / "run-skip"), "--data", str(other_copy), "--on-error", "skip", "--no-progress")
    assert result.returncode == 0, result.stderr
    evaluated = json.loads((tmp_path / "run-skip" / "eval_metrics.json").read_text())
    assert evaluated["samples"] == 5 and [s["file"] for s in evaluated["skipped"]] == [str(bad_test)]
    # data with other classes is named with the names that differ and what to do
    other = tmp_path / "other"
    shutil.copytree(two_classes, other)
    for split in ("train", "test"):
        (other / split / "cat").rename(other / split / "bird")
    assert_one_line_error(cli("eval", str(tmp_path / "run-skip"), "--data", str(other), "--no-progress"),
                          f"{other}: has classes the run has not ('bird') and lacks some it has ('cat')",
                          "the run's classes")


def test_what_a_folder_scan_passes_over_is_reported(two_classes, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(two_classes, data)
    (data / "train" / ".thumbnails").mkdir()
    (data / "train" / "cat" / "notes.txt").write_text("not an image")
    metrics = run(**dict(quick(data, tmp_path / "run"), progress=True, epochs=1))
    reported = {(os.path.basename(entry["path"]), entry["reason"]) for entry in metrics["ignored"]}
    assert ("notes.txt", "not a .jpg/.jpeg/.png file") in reported and (".thumbnails", "hidden") in reported
    assert "passed over 2 entries of the data folder" in capsys.readouterr().out
    assert metrics["samples"] == 6


# ---- the command line speaks to people ----------------------------------------------------------
def test_cli_user_errors_are_one_line_and_debug_shows_the_traceback(tmp_path):
    missing = tmp_path / "no-such-folder"
    result = cli("run", "--data", str(missing), "--out", str(tmp_path / "run"))
    assert_one_line_error(result, str(missing))
    debug = cli("run", "--data", str(missing), "--out", str(tmp_path / "run"), env={"FASTTL_DEBUG": "1"})
    assert debug.returncode != 0 and "Traceback" in debug.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args, names", [
    (["run", "--lr", "inf"], ["lr"]),
    (["run", "--epochs", "many"], ["--epochs", "many"]),
    (["run", "--strategy", "magic"], ["--strategy", "magic"]),
    (["run", "--on-error", "ignore"], ["--on-error"]),
    (["eval", "RUN_DIR_PLACEHOLDER"], ["RUN_DIR_PLACEHOLDER", "not a fasttl run folder"]),
])
def test_cli_option_errors_are_one_line(tmp_path, args, names):
    args = [str(tmp_path / a) if a == "RUN_DIR_PLACEHOLDER" else a for a in args]
    names = [str(tmp_path / n) if n == "RUN_DIR_PLACEHOLDER" else n for n in names]
    assert_one_line_error(cli(*args, cwd=tmp_path), *names)


def test_cli_finished_run_error_names_an_option_that_exists(two_classes, tmp_path):
    out = tmp_path / "run"
    args = ["run", "--data", str(two_classes), "--out", str(out), "--strategy", "scratch", "--epochs", "1",
            "--no-progress"]
    assert cli(*args).returncode == 0
    again = cli(*args)
    assert_one_line_error(again, str(out), "--overwrite")
    assert cli(*args, "--overwrite").returncode == 0
