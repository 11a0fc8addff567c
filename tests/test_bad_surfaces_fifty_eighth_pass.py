"""The fifty-eighth hostile pass (about 560 attempts on e8c1182; pass 57's fixes held) found 4: a
non-finite class weight of a class no counted row has made distillation_loss NaN once any row was
ignored (the ignored row's weight was multiplied by 0: inf * 0); extract_precision "int8" written
into config.json (marker rewritten) without its calibration sample was refused by predict naming a
Python argument, and eval --data ran through an uncalibrated graph; a classes file was split with
str.splitlines, so U+2028, \\x1e or \\f inside a name made two classes and shifted every index after
it; Ctrl-C while fasttl loaded (torch, then the strategies the parser names) printed a traceback.
The fifty-ninth pass (about 300 attempts on 2dd0038) found 4: a Ctrl-C while torch's C module
imported numpy was swallowed there (the command ran on, or failed later in numpy); torch.func,
vmap and forward-mode AD take the plain formula, which did not scale the class weights (1e38: a
zero gradient, NaN); FASTTL_DATA inside a run folder was blamed on --dest; a classes file behind a
file, a loop or a dangling link got the kernel's reason without the culprit. The sixtieth pass
(about 200 attempts on d1b6cbc) found 4: --resume took a teacher trained again in place, or a
--target-data folder changed, as the same run (epochs on the old inputs mixed into the result); a
feature-cache folder whose path is not UTF-8 crashed; --target-data's folder problems said "data:";
run --download still blamed --dest for FASTTL_DATA."""
import json
import os
import shutil
import signal
import subprocess
import sys
import zlib

import pytest
import torch
import torch.nn.functional as F

import fasttl
from conftest import cli, finished_run, one_epoch_run, one_line_error, vouched_config_edit


# ---- F1: an ignored row's class weight is chosen away, never multiplied by 0 ------------------------------------
@pytest.mark.parametrize("bad", [float("inf"), float("nan"), -float("inf")], ids=["inf", "nan", "-inf"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_a_non_finite_weight_no_counted_row_has_leaves_the_loss_as_cross_entropys(request, bad, reduction):
    from fasttl import _reference

    generator = torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))
    student, teacher = torch.randn(4, 5, generator=generator), torch.randn(4, 5, generator=generator)
    target = torch.tensor([1, 2, -100, 3])  # the ignored row clamps to class 0, whose weight is `bad`
    weight = torch.tensor([bad, 1.0, 2.0, 3.0, 4.0])
    ours = fasttl.distillation_loss(student, teacher, target, weight=weight, alpha=0.0, reduction=reduction)
    theirs = F.cross_entropy(student, target, weight=weight, reduction=reduction)
    reference = _reference.distillation_loss(student.double(), teacher.double(), target, weight=weight.double(),
                                             alpha=0.0, reduction=reduction)
    # before: NaN (mean, sum; the ignored row of none), where cross_entropy is finite
    assert torch.isfinite(theirs).all() and torch.isfinite(reference).all()
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.double(), reference, rtol=1e-5, atol=1e-6)
    module = fasttl.nn.DistillationLoss(alpha=0.5, weight=weight, reduction=reduction)
    assert torch.isfinite(module(student, teacher, target)).all()


@pytest.mark.parametrize("ignore_index", [0, 7], ids=["class-0", "beyond-the-classes"])
def test_an_ignore_index_of_a_class_or_beyond_them_keeps_a_finite_mean(request, ignore_index):
    generator = torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))
    student, teacher = torch.randn(5, 4, generator=generator), torch.randn(5, 4, generator=generator)
    target = torch.tensor([ignore_index, 1, 2, 1, ignore_index])  # 7 is clamped to class 3 to pick its weight
    weight = torch.tensor([float("nan") if ignore_index == 0 else 1.0, 2.0, 3.0,
                           float("inf") if ignore_index == 7 else 4.0])  # the ignored rows' class: not finite
    ours = fasttl.distillation_loss(student, teacher, target, weight=weight, alpha=0.0, ignore_index=ignore_index)
    theirs = F.cross_entropy(student, target, weight=weight, ignore_index=ignore_index)
    assert torch.isfinite(ours) and ours.item() == pytest.approx(theirs.item(), rel=1e-5)


# ---- F2: extract_precision int8 goes with its calibration sample in config.json ------------------------------
@pytest.fixture(scope="module")
def linear_run(cat_ship, tmp_path_factory):
    return finished_run(cat_ship, tmp_path_factory, "linear58", strategy="linear", epochs=None)


@pytest.mark.parametrize("command", ["predict", "eval", "eval-data"])
def test_int8_without_its_calibration_names_the_config_fields(cat_ship, linear_run, tmp_path, capsys, command):
    run_dir = vouched_config_edit(linear_run, tmp_path / "edited",
                                  lambda config: config.__setitem__("extract_precision", "int8"))
    words = {"predict": ("predict", "--run", run_dir, cat_ship / "test"), "eval": ("eval", run_dir, "--no-progress"),
             "eval-data": ("eval", run_dir, "--data", cat_ship / "test", "--no-progress")}[command]
    code, _, err = cli(capsys, *words)
    # before: predict named calibration=(key, images), a Python argument; eval --data ran an uncalibrated graph
    assert code == 2 and one_line_error(err).endswith(
        "config.json: field 'extract_calibration' is None where 'extract_precision' is 'int8' (expected a 64-character "
        "hash: an int8 run names its calibration sample, no other run has one); rerun the run, or fix the value there")


def test_a_calibration_without_int8_is_named_too(linear_run, tmp_path):
    from fasttl.transfer.rundir import RunError

    run_dir = vouched_config_edit(linear_run, tmp_path / "edited",
                                  lambda config: config.__setitem__("extract_calibration", "ab" * 32))
    with pytest.raises(RunError, match=r"field 'extract_calibration' is 'abab.*' where 'extract_precision' is "
                                       r"'.*' \(expected null: "):
        fasttl.load_run(str(run_dir))


# ---- F3: a classes file's lines end where open() ends them ------------------------------------------------------
@pytest.mark.parametrize("inside", ["\u2028", "\u2029", "\x85", "\x1c", "\x1d", "\x1e", "\x0b", "\x0c"],
                         ids=["ls", "ps", "nel", "fs", "gs", "rs", "vt", "ff"])
def test_a_line_break_python_alone_splits_at_is_refused_as_unprintable(tmp_path, inside):
    from fasttl.data.labels import read_classes_file
    from fasttl.util.errors import DataError

    path = tmp_path / "classes.txt"
    path.write_text(f"cat{inside}kitten\ndog\nship\n", encoding="utf-8")  # 3 lines, as wc -l counts them
    # before: 4 names ('cat', 'kitten', 'dog', 'ship'), every index after the first shifted by one
    with pytest.raises(DataError, match=rf"^classes: {path} names a class with a character that is not printable "
                                        rf"\(U\+[0-9A-F]{{4}}.*, a (control character|line separator|paragraph "
                                        rf"separator): 'cat.*kitten'\)"):
        read_classes_file(str(path))


@pytest.mark.parametrize("ending", ["\n", "\r\n", "\r"], ids=["lf", "crlf", "cr"])
def test_lines_ending_as_open_ends_them_are_names(tmp_path, ending):
    from fasttl.data.labels import read_classes_file

    path = tmp_path / "classes.txt"
    path.write_bytes(ending.join(["cat", "dog", "ship", ""]).encode())
    assert read_classes_file(str(path)) == ["cat", "dog", "ship"]


# ---- F4: Ctrl-C while fasttl loads is one line --------------------------------------------------------------
INTERRUPTED_IMPORT = """
import builtins
real = builtins.__import__
def interrupted(name, *args, **kwargs):
    if name == "fasttl.losses":  # the last of fasttl's own imports: torch is loaded by then
        raise KeyboardInterrupt
    return real(name, *args, **kwargs)
builtins.__import__ = interrupted
import fasttl
"""


def test_ctrl_c_while_the_package_loads_is_one_line_and_a_sigint_exit():
    done = subprocess.run([sys.executable, "-c", INTERRUPTED_IMPORT], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONWARNINGS="ignore"))
    # before: Python's traceback ending in KeyboardInterrupt
    assert done.stderr == "\nfasttl: interrupted\n"
    assert done.returncode == -signal.SIGINT  # as an interrupted process ends (a shell says 130)


def test_the_excepthook_is_put_back_once_fasttl_loaded():
    done = subprocess.run([sys.executable, "-c", "import sys, fasttl; print(sys.excepthook is sys.__excepthook__)"],
                          capture_output=True, text=True, timeout=300)
    assert done.stdout.strip() == "True", done.stderr


def test_ctrl_c_while_the_parser_is_built_is_one_line(monkeypatch, capsys):
    from fasttl import cli as cli_module

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_module, "build_parser", interrupted)  # it loads every strategy: seconds
    code = cli_module.main(["info"])
    # before: a traceback (the handler was around the command only)
    assert code == 130 and capsys.readouterr().err == "\nfasttl: interrupted\n"


# ---- pass 59, F1: numpy is imported before torch, so a Ctrl-C during its import is not swallowed -------------
INTERRUPTED_NUMPY = """
import builtins, sys
real = builtins.__import__
def interrupted(name, *args, **kwargs):
    if name == "numpy" and "numpy" not in sys.modules and "torch" not in sys.modules:
        raise KeyboardInterrupt  # imported by fasttl itself: the interrupt reaches Python
    return real(name, *args, **kwargs)
builtins.__import__ = interrupted
import fasttl
print("ran on")
"""


def test_ctrl_c_while_numpy_loads_is_not_swallowed_by_torch():
    done = subprocess.run([sys.executable, "-c", INTERRUPTED_NUMPY], capture_output=True, text=True, timeout=300)
    # before: numpy came in from torch's C module, which swallowed the interrupt: "ran on", exit 0
    assert done.stdout == "" and done.stderr == "\nfasttl: interrupted\n" and done.returncode == -signal.SIGINT


# ---- pass 59, F2: the plain formula (torch.func, forward AD, float64) scales class weights as the kernel does ---
@pytest.mark.parametrize("size", [3e38, 1e38, 1e-40, 1e-45])
def test_torch_func_and_forward_ad_meet_the_formula_at_weights_near_float32s_ends(request, size):
    from torch.autograd import forward_ad
    from torch.func import grad, vmap

    generator = torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))
    student, teacher = torch.randn(6, 5, generator=generator), torch.randn(6, 5, generator=generator)
    target, weight = torch.tensor([0, 1, 2, 3, 4, 1]), torch.full((5,), size)
    options = dict(weight=weight, alpha=0.3, temperature=2.0)

    def loss(x):
        return fasttl.distillation_loss(x, teacher, target, **options)

    s64 = student.double().requires_grad_()
    expected = fasttl.distillation_loss(s64, teacher.double(), target, weight=weight.double(), alpha=0.3,
                                        temperature=2.0)
    expected.backward()
    with forward_ad.dual_level():
        dual = forward_ad.unpack_dual(loss(forward_ad.make_dual(student, torch.ones_like(student))))
    batched = vmap(lambda a, b, c: fasttl.distillation_loss(a, b, c, **options))(student[None], teacher[None],
                                                                                  target[None])
    # before: 1e38 gave NaN (vmap, forward AD) and a zero gradient (func.grad); 1e-45 was 4.5% off
    for got in (dual.primal, batched[0]):
        assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    torch.testing.assert_close(grad(loss)(student).double(), s64.grad, rtol=1e-5, atol=1e-7)
    sum64 = fasttl.distillation_loss(student.double(), teacher.double(), target, weight=weight.double(), alpha=0.3,
                                     temperature=2.0, reduction="sum")
    assert sum64.item() == pytest.approx(expected.item() * 6 * weight[0].item(), rel=1e-9)  # sum = mean x N x w


# ---- pass 59, F3: FASTTL_DATA inside a run folder is named as such ---------------------------------------------
def test_fasttl_data_inside_a_run_folder_names_the_variable(linear_run, monkeypatch, capsys):
    monkeypatch.setenv("FASTTL_DATA", str(linear_run / "data"))
    code, _, err = cli(capsys, "data", "fetch", "cifar10", "--no-progress")
    # before: "dest: ... give another --dest" of an option the user never gave
    assert code == 2 and one_line_error(err) == (f"fasttl: error: FASTTL_DATA: {linear_run / 'data'} is in the fasttl "
                                                 f"run folder {linear_run}, which only its run writes into; give "
                                                 "another FASTTL_DATA")
    assert not (linear_run / "data").exists()


# ---- pass 59, F4: a classes file that can't be reached names the culprit ---------------------------------------
@pytest.mark.parametrize("obstacle", ["file", "loop", "dangling"])
def test_a_classes_file_out_of_reach_names_what_is_in_the_way(tmp_path, obstacle):
    from fasttl.data.labels import read_classes_file
    from fasttl.util.errors import DataError

    (tmp_path / "afile").write_text("cat\ndog\n")
    (tmp_path / "loop").symlink_to("loop")
    (tmp_path / "dangling").symlink_to("nowhere")
    path, expected = {
        "file": (tmp_path / "afile" / "classes.txt", f"can't be reached: {tmp_path / 'afile'} is a file, not a folder "
                                                     "(fix the path)"),
        "loop": (tmp_path / "loop" / "classes.txt", f"can't be reached: {tmp_path / 'loop'} is a symbolic link loop "
                                                    "(fix the path)"),
        "dangling": (tmp_path / "dangling", "is a symbolic link to nothing (dangling); fix the link, or give the file "
                                            "itself")}[obstacle]
    # before: "classes: cannot read ... (Not a directory); give a text file with one class name a line"
    with pytest.raises(DataError) as caught:
        read_classes_file(str(path))
    assert str(caught.value) == f"classes: {path} {expected}"


# ---- pass 60, F1: --resume refuses a teacher trained again, or target images changed, since the run started ----
def _interrupted(out):
    os.remove(out / "metrics.json")  # as a run stopped after its checkpoint: resumable


def test_resume_refuses_a_teacher_trained_again_in_place(cat_ship, linear_run, tmp_path):
    from fasttl.transfer.job import run
    from fasttl.transfer.rundir import RunError

    teacher, out = tmp_path / "teacher", tmp_path / "student"
    shutil.copytree(linear_run, teacher)
    options = one_epoch_run(cat_ship, out, strategy="distill", teacher=str(teacher))
    run(**options)
    _interrupted(out)
    run(**one_epoch_run(cat_ship, teacher, strategy="mlp", epochs=2, overwrite=True))  # other weights, same folder
    # before: resumed, its finished epochs taught by the old teacher, metrics naming the new one
    with pytest.raises(RunError, match=r"resume: .* \(a teacher's weights changed since the run started \(trained "
                                       r"again in place\?\)\); restore it as the run read it, or pass --overwrite"):
        run(**dict(options, resume=True))


@pytest.mark.parametrize("change", ["removed", "touched"])
def test_resume_refuses_changed_target_images(cat_ship, tmp_path, change):
    from fasttl.transfer.job import run
    from fasttl.transfer.rundir import RunError

    target, out = tmp_path / "target", tmp_path / "dann"
    shutil.copytree(cat_ship, target)
    options = one_epoch_run(cat_ship, out, strategy="dann", target_data=str(target))
    run(**options)
    _interrupted(out)
    image = sorted((target / "test" / "cat").iterdir())[0]
    os.remove(image) if change == "removed" else os.utime(image, (1, 1))  # touched: the same bytes, another time
    # before: resumed, 16 of 20 predictions unlike a fresh run on the images there now; a touched image was said
    # as "(one added, removed or rewritten)" (pass 61's observation), no word of the time a plain cp changes
    with pytest.raises(RunError, match=r"the --target-data images changed since the run started \(an image added, "
                                       r"removed or rewritten, or its modification time changed: a copy keeps it "
                                       r"only with cp -p or rsync -a\)"):
        run(**dict(options, resume=True))
    if change == "touched":
        return
    run(**dict(options, overwrite=True))  # and an unchanged resume still goes on
    _interrupted(out)
    run(**dict(options, resume=True))
    assert (out / "metrics.json").is_file()


# ---- pass 60, F2: a feature-cache folder whose path is not UTF-8 --------------------------------------------
def test_a_cache_folder_whose_path_is_not_utf8_is_built_and_opened(cat_ship, tmp_path, capsys):
    out = os.path.join(str(tmp_path), os.fsdecode(b"ex\xff"))  # a Latin-1 name, as Python holds it
    code, _, err = cli(capsys, "extract", "--data", cat_ship, "--out", out, "--image-size", "32", "--no-progress")
    # before: UnicodeEncodeError (surrogates not allowed) once the cache was written
    assert code == 0, err
    assert len(fasttl.FeatureCache.open(os.path.join(out, "train"))) > 0


# ---- pass 60, F3 and F4: the option at fault is named ------------------------------------------------------------
def test_a_target_data_folder_without_class_folders_names_target_data(cat_ship, tmp_path, capsys):
    (tmp_path / "loose").mkdir()
    shutil.copy(sorted((cat_ship / "train" / "cat").iterdir())[0], tmp_path / "loose" / "a.jpg")
    code, _, err = cli(capsys, "run", "--data", cat_ship, "--strategy", "dann", "--target-data", tmp_path / "loose",
                       "--out", tmp_path / "r", "--image-size", "32", "--compare", "none", "--no-progress")
    # before: "data: ... has no class folders", of the --data that was fine
    assert code == 2 and one_line_error(err).startswith(f"fasttl: error: target_data: {tmp_path / 'loose'} has no "
                                                        "class folders")


def test_run_download_names_fasttl_data_not_dest(linear_run, monkeypatch, capsys):
    monkeypatch.setenv("FASTTL_DATA", str(linear_run / "data"))
    code, _, err = cli(capsys, "run", "--data", "cifar10", "--download", "--out", linear_run.parent / "r",
                       "--no-progress")
    # before: "dest: ... give another --dest", an option run does not have
    assert code == 2 and one_line_error(err).endswith("which only its run writes into; give another FASTTL_DATA")


# ---- pass 61: a --compare baseline's inputs; one tensor twice in an optimizer; target entries passed over ------
def test_resume_refuses_a_changed_teacher_of_the_compare_baseline(cat_ship, linear_run, tmp_path):
    from fasttl.transfer.job import run
    from fasttl.transfer.rundir import RunError

    teacher, out = tmp_path / "teacher", tmp_path / "run"
    shutil.copytree(linear_run, teacher)
    options = one_epoch_run(cat_ship, out, strategy="linear", epochs=None, compare="distill", teacher=str(teacher))
    run(**options)
    _interrupted(out)
    run(**one_epoch_run(cat_ship, teacher, strategy="mlp", epochs=2, overwrite=True))
    # before: resumed, the distill baseline's finished epochs taught by the old teacher
    with pytest.raises(RunError, match=r"a teacher's weights changed since the run started"):
        run(**dict(options, resume=True))


@pytest.mark.parametrize("kind", ["Adam", "AdamW"])
def test_one_tensor_twice_in_a_group_is_refused_and_the_group_not_kept(kind):
    weight, other = torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.randn(4))
    with pytest.warns(UserWarning, match="duplicate parameters"):  # torch's own word, then fasttl's refusal
        with pytest.raises(ValueError, match=r"^params\[1\]: the same tensor as params\[0\]; list each parameter "
                                             r"once$"):
            getattr(fasttl.optim, kind)([weight, weight])
    optimizer = getattr(fasttl.optim, kind)([other])
    with pytest.warns(UserWarning), pytest.raises(ValueError, match=r"^params\[2\]: the same tensor as params\[0\]"):
        optimizer.add_param_group({"params": [weight, torch.nn.Parameter(torch.randn(2)), weight]})
    assert len(optimizer.param_groups) == 1  # before: two groups, a step going twice over one tensor at once


def test_dann_says_and_records_what_the_target_folder_passed_over(cat_ship, tmp_path, capsys):
    from fasttl.transfer.job import run

    target = tmp_path / "target"
    shutil.copytree(cat_ship, target)
    (target / "test" / "cat" / "nowhere.jpg").symlink_to(tmp_path / "missing.jpg")
    (target / "test" / "cat" / "sub.jpg").mkdir()
    metrics = run(**one_epoch_run(cat_ship, tmp_path / "dann", strategy="dann", target_data=str(target)))
    said = capsys.readouterr().err
    # before: nothing said or recorded, the target scored on fewer images than its folder holds
    assert "passed over 2 entries of the --target-data folder: " in said
    recorded = json.loads((tmp_path / "dann" / "metrics.json").read_text())
    passed = sorted(p["path"] for p in recorded["notes"]["target_ignored"])
    assert passed == ["test/cat/nowhere.jpg", "test/cat/sub.jpg"], metrics
