"""What the tenth hostile pass of the second hardening round found: each case kept with the fix
that answers it."""
import os
import shutil

import pytest

from conftest import cli, image_list, one_epoch_run, one_line_error
from fasttl.data import DataError
from fasttl.util.errors import OptionError
from fasttl.transfer.job import run

pytestmark = pytest.mark.usefixtures("private_cache")


@pytest.mark.parametrize("option", ["overwrite", "resume", "progress", "download", "distill_features"])
def test_a_flag_given_as_text_from_python_is_refused_not_taken_as_true(option, cat_ship, tmp_path):
    with pytest.raises(OptionError, match=rf"^{option}: expected True or False, got 'no'$"):
        run(**one_epoch_run(cat_ship, tmp_path / "run", **{option: "no"}))
    assert not (tmp_path / "run").exists()


def test_class_names_differing_only_in_characters_that_show_nothing_are_refused(cat_ship, tmp_path):
    data = tmp_path / "data"
    for split in ("train", "test"):
        shutil.copytree(cat_ship / split / "cat", data / split / "cat")
        shutil.copytree(cat_ship / split / "ship", data / split / "cat\ufe0f")
    with pytest.raises(DataError, match=r"'cat' and 'cat\\ufe0f' differ only in characters that show nothing"):
        run(**one_epoch_run(data, tmp_path / "run"))
    import numpy as np

    import fasttl

    with pytest.raises(ValueError, match=r"differ only in characters that show nothing"):
        fasttl.FeatureCache.write(str(tmp_path / "fc"), [np.ones((2, 2), np.float32)], [0, 1],
                                  classes=["cat", "cat\ufe0f"])


@pytest.mark.parametrize("option, value", [("backbone", "resnet18"), ("features", "head"), ("cache_dtype", "int8"),
                                           ("engine", "torch"), ("extract_precision", "bf16")])
def test_backbone_options_given_to_the_small_cnn_are_refused_not_ignored(option, value, cat_ship, tmp_path):
    flag = "--" + option.replace("_", "-")
    with pytest.raises(OptionError, match=rf"^{option}: {flag} is read only by --strategy .*linear.*; drop it for "
                                          rf"--strategy scratch$"):
        run(**one_epoch_run(cat_ship, tmp_path / "run", **{option: value}))


def test_a_scratch_runs_report_names_no_backbone(cat_ship, tmp_path):
    run(**one_epoch_run(cat_ship, tmp_path / "run"))
    report = (tmp_path / "run" / "report.md").read_text()
    assert "The small CNN at the images' native size (32 px)" in report and "Backbone" not in report


def test_eval_of_a_skip_run_on_its_own_flat_folder_reads_it_as_the_run_did(cat_ship, tmp_path, capsys):
    flat = tmp_path / "flat"
    shutil.copytree(cat_ship / "train", flat)
    for label in ("cat", "ship"):
        (flat / label / "0bad.jpg").write_bytes(b"\xff\xd8 truncated")
    out = tmp_path / "run"
    run(**one_epoch_run(flat, out, on_error="skip"))
    code, _, err = cli(capsys, "eval", out, "--no-progress")
    assert code == 0, err  # not "changed since the run": the run's identity is of its screened images


def test_eval_of_the_runs_own_list_named_through_a_hard_link_is_refused(cat_ship, tmp_path, capsys):
    folder = tmp_path / "list"
    rows = image_list(cat_ship, folder)
    out = tmp_path / "run"
    run(**one_epoch_run(folder / "list.csv", out, seed=1))
    (folder / "other.csv").write_text("\n".join(rows[:1] + rows[:0:-1]) + "\n")  # the same images, another order
    code, _, err = cli(capsys, "eval", out, "--data", folder / "other.csv", "--no-progress")
    assert code == 2 and "of the run's training images" in one_line_error(err) and "evaluate without --data" in err


def test_bench_checks_its_device_and_writes_its_plot_through_its_own_temporary(tmp_path, monkeypatch):
    from fasttl.bench import runner

    with pytest.raises(OptionError, match=r"^device: expected cpu, cuda or cuda:N, got 'meta'$"):
        runner.run(["distill"], device="meta", quick=True)
    target = tmp_path / "target.txt"
    target.write_text("user file")
    os.symlink(target, tmp_path / "plot.png")
    runner.plot({"results": [{"name": "adam", "device": "cpu", "rows": [{"case": "torch fused", "vs_fasttl": 0.5}]}]},
                str(tmp_path / "plot.png"))
    assert target.read_text() == "user file" and not os.path.islink(tmp_path / "plot.png")


@pytest.mark.parametrize("part, edit, message", [
    ("scheduler", {"_anneal_func_type": "linear"}, "its scheduler state holds another _anneal_func_type"),
    ("scheduler", {"total_steps": 5}, "its scheduler state holds another total_steps"),
    ("optimizer", {"max_lr": 1e6}, "its optimizer state holds another max_lr"),
    ("optimizer", {"weight_decay": 0.5}, "its optimizer state holds another weight_decay"),
])
def test_a_checkpoint_whose_schedule_or_optimizer_settings_were_edited_is_refused(part, edit, message, cat_ship,
                                                                                  tmp_path):
    """Only what training changes (the step, the learning rate within its peak) may differ in a
    checkpoint resumed: another schedule or weight decay would train another run silently."""
    import torch

    from fasttl.heads.fit import CheckpointError

    out = tmp_path / "run"
    options = one_epoch_run(cat_ship, out, epochs=2)
    run(**options)
    path = out / "scratch.checkpoint.pt"
    state = torch.load(path, weights_only=True)
    target = state[part] if part == "scheduler" else state[part]["param_groups"][0]
    target.update(edit)
    torch.save(state, path)
    os.remove(out / "metrics.json")
    with pytest.raises(CheckpointError, match=rf"scratch.checkpoint.pt: {message}, not this run's \(a damaged "
                                              r"checkpoint\)"):
        run(**options, resume=True)


def test_a_runs_weights_file_changed_since_it_trained_is_refused_on_load(cat_ship, tmp_path, capsys):
    import torch

    import fasttl

    weights = tmp_path / "r18.pth"
    state = fasttl.backbones.create("resnet18", pretrained=False).state_dict()
    torch.save(state, weights)
    out = tmp_path / "run"
    run(data=str(cat_ship), strategy="linear", backbone="resnet18", weights=str(weights), features="head",
        image_size=32, compare="none", out=str(out), progress=False)
    code, _, err = cli(capsys, "predict", "--run", out, cat_ship / "test", "--no-progress")
    assert code == 0, err
    state["fc.weight"] = state["fc.weight"] * 2  # other weights under the same name
    torch.save(state, weights)
    for words in (["predict", "--run", out, cat_ship / "test"], ["eval", out]):
        code, _, err = cli(capsys, *words, "--no-progress")
        assert code == 2 and one_line_error(err) == f"fasttl: error: weights: {weights} is not the file the run " \
            "trained with (its SHA-256 changed since); restore it, or train the run again", words


def test_what_a_scan_passed_over_is_said_without_progress_output_too(cat_ship, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(cat_ship, data)
    (data / "train" / "cat" / "nested").mkdir()
    shutil.copy(next((data / "train" / "cat").glob("*.jpg")), data / "train" / "cat" / "nested" / "x.jpg")
    run(**one_epoch_run(data, tmp_path / "run"))
    assert "passed over 1 entry of the data folder: train/cat/nested" in capsys.readouterr().err


def test_a_full_disk_while_taking_a_lock_names_its_folder(tmp_path, monkeypatch):
    import errno

    from fasttl.util.files import FolderLock

    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(OSError) as caught:
        with FolderLock(str(tmp_path), ".fasttl-run.lock", "a test"):
            pass
    # (first the lock file, not standard output; since the forty-sixth pass the folder to free space in)
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(tmp_path)


@pytest.fixture(scope="module")
def scratch_run(cat_ship, tmp_path_factory):
    from conftest import finished_run

    return finished_run(cat_ship, tmp_path_factory, "tenth")


@pytest.mark.parametrize("options, message", [
    (dict(strategy="finetune", finetune_stages=99), r"^finetune_stages: expected 1\.\.\d+ for efficientnet_lite0, "
                                                    r"got 99$"),
    (dict(strategy="linear", epochs=None, image_size=16), r"^image_size: 16 px is below this backbone's minimum of "
                                                          r"32 px$"),
    (dict(strategy="linear", epochs=None, backbone="resnet18"), r"asked for 4; pass --features head "),
    (dict(strategy="distill", teacher="SCRATCH"), r"is a 'scratch' run; a teacher must be a linear, mlp, finetune "
                                                  r"run$"),
])
def test_what_an_option_needs_of_a_backbone_or_a_teacher_is_checked_before_the_run_folder_is_made(
        options, message, cat_ship, scratch_run, tmp_path):
    options = {k: (str(scratch_run) if v == "SCRATCH" else v) for k, v in options.items()}
    with pytest.raises(OptionError, match=message):
        run(**one_epoch_run(cat_ship, tmp_path / "run", **options))
    assert not (tmp_path / "run").exists()


def test_a_runs_weights_that_are_a_pipe_or_a_link_are_named_as_such(scratch_run, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(scratch_run, run_dir)
    os.remove(run_dir / "scratch.safetensors")
    os.symlink("/dev/zero", run_dir / "scratch.safetensors")
    code, _, err = cli(capsys, "eval", run_dir, "--no-progress")
    assert code == 2 and "scratch.safetensors: not a plain file (a link, a pipe or a device?)" in one_line_error(err)


@pytest.mark.parametrize("images, message", [
    ("meta", "a meta tensor holds no pixels"),
    ("mixed", "a list mixing paths and other things"),
    ("2d", r"got \(2, 32, 32\)"),
])
def test_predict_from_python_names_what_it_was_given(images, message, scratch_run, cat_ship):
    import numpy as np
    import torch

    import fasttl

    given = {"meta": torch.empty(1, 32, 32, 3, dtype=torch.uint8, device="meta"),
             "mixed": [str(next((cat_ship / "test" / "cat").glob("*.jpg"))), np.zeros((32, 32, 3), np.uint8)],
             "2d": np.zeros((2, 32, 32), np.uint8)}[images]
    with pytest.raises(OptionError, match=message):
        fasttl.load_run(str(scratch_run)).predict(given)


def test_a_setting_naming_no_users_home_is_refused(cat_ship, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FASTTL_CACHE_DIR", "~no-such-user-here/cache")
    with pytest.raises(OptionError, match=r"^FASTTL_CACHE_DIR=~no-such-user-here/cache: ~no-such-user-here names no "
                                          r"user's home folder; give an absolute path$"):
        run(**one_epoch_run(cat_ship, tmp_path / "run", strategy="linear", epochs=None))
    assert not (tmp_path / "~no-such-user-here").exists()


def test_outputs_never_go_into_another_run_folder(cat_ship, scratch_run, tmp_path, capsys, monkeypatch):
    with pytest.raises(OptionError, match=r"^tensorboard: .* is in the fasttl run folder .*, which only its run "
                                          r"writes into"):
        run(**one_epoch_run(cat_ship, tmp_path / "run", tensorboard=str(scratch_run)))
    code, _, err = cli(capsys, "extract", "--data", cat_ship, "--out", scratch_run / "sub", "--image-size", "32",
                       "--no-progress")
    assert code == 2 and "is in the fasttl run folder" in one_line_error(err)
    monkeypatch.setenv("FASTTL_CACHE_DIR", str(scratch_run / "cache"))
    with pytest.raises(OptionError, match=r"^FASTTL_CACHE_DIR=.* is in the fasttl run folder"):
        run(**one_epoch_run(cat_ship, tmp_path / "run2", strategy="linear", epochs=None))
    assert not (scratch_run / "sub").exists() and not (scratch_run / "cache").exists()


def test_a_dann_target_is_screened_with_the_runs_policy(cat_ship, tmp_path):
    target = tmp_path / "target"
    shutil.copytree(cat_ship / "test", target)
    (target / "cat" / "0bad.jpg").write_bytes(b"\xff\xd8 truncated")
    metrics = run(**one_epoch_run(cat_ship, tmp_path / "run", strategy="dann", target_data=str(target),
                                  on_error="skip"))
    assert metrics["accuracy"] >= 0.0 and (tmp_path / "run" / "metrics.json").exists()


def test_a_fingerprint_too_large_or_too_deep_is_refused_before_anything_is_written(tmp_path):
    import numpy as np

    import fasttl

    deep = {}
    for _ in range(5000):
        deep = {"x": deep}
    for fingerprint, message in ((deep, "nested too deeply"), ({"blob": "x" * (2 << 20)}, "bytes as JSON, more than")):
        with pytest.raises(ValueError, match=f"^fingerprint: .*{message}"):
            fasttl.FeatureCache.write(str(tmp_path / "fc"), [np.ones((2, 2), np.float32)], [0, 1], classes=["a", "b"],
                                      fingerprint=fingerprint)
        assert not (tmp_path / "fc").exists()


def test_a_dann_target_that_is_the_sources_training_images_is_refused(cat_ship, tmp_path):
    with pytest.raises(DataError, match=r"^target_data: 12 of its images are the source's training images"):
        run(**one_epoch_run(cat_ship, tmp_path / "run", strategy="dann", target_data=str(cat_ship / "train")))


def test_a_list_path_with_dotdot_after_a_linked_folder_reads_the_file_the_system_names(cat_ship, tmp_path):
    from fasttl.data.formats.filelist import read_file_list

    cats = sorted((cat_ship / "train" / "cat").glob("*.jpg"))
    ships = sorted((cat_ship / "train" / "ship").glob("*.jpg"))
    (tmp_path / "deep" / "sub").mkdir(parents=True)
    shutil.copy(cats[0], tmp_path / "deep" / "x.jpg")  # what link/../x.jpg names: the link target's parent
    shutil.copy(ships[0], tmp_path / "x.jpg")  # what a textual normpath would read instead
    os.symlink(tmp_path / "deep" / "sub", tmp_path / "link")
    shutil.copy(ships[1], tmp_path / "y.jpg")
    (tmp_path / "list.csv").write_text("path,label\nlink/../x.jpg,cat\ny.jpg,ship\n")
    source = read_file_list(str(tmp_path / "list.csv"))
    assert os.path.samefile(source.files[0], tmp_path / "deep" / "x.jpg")
