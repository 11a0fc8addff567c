"""What the ninth hostile pass of the second hardening round found: each case kept with the fix
that answers it (one line naming the culprit, or the right result)."""
import json
import os
import pickle
import re
import shutil
import unicodedata

import numpy as np
import pytest
import torch

import fasttl
from conftest import cli, image_list, finished_run, one_epoch_run, one_line_error
from fasttl.data import DataError
from fasttl.util.errors import OptionError
from fasttl.transfer.job import run

pytestmark = pytest.mark.usefixtures("private_cache")


@pytest.fixture
def rng(request):
    import zlib

    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(scope="module")
def finished(cat_ship, tmp_path_factory):
    """A finished one-epoch scratch run on cats and ships."""
    return finished_run(cat_ship, tmp_path_factory, "ninth")


# ---- OS errors the command line had no line for ------------------------------------------------
def test_a_name_too_long_and_a_link_loop_are_one_line_naming_the_path(cat_ship, finished, tmp_path, capsys,
                                                                      monkeypatch):
    monkeypatch.chdir(tmp_path)
    long = "a" * 300
    code, _, err = cli(capsys, "run", "--data", cat_ship, "--strategy", "scratch", "--epochs", "1", "--image-size",
                       "32", "--compare", "none", "--no-progress", "--out", long)
    assert code == 2 and one_line_error(err).endswith("its path, or a name in it, is too long for the file system "
                                                      "(give a shorter path)")
    os.symlink("loop1", "loop2")
    os.symlink("loop2", "loop1")
    code, _, err = cli(capsys, "predict", "--run", finished, str(cat_ship / "test" / "cat"), "--out",
                       "loop1/x.csv")
    assert code == 2 and "loop1" in one_line_error(err)


def test_a_file_size_limit_is_one_line(monkeypatch, capsys, tmp_path):
    import errno

    from fasttl import cli as cli_module

    def too_large(*args, **kwargs):
        raise OSError(errno.EFBIG, "File too large", str(tmp_path / "run" / "curves.png"))

    monkeypatch.setattr(cli_module, "_cmd_info", too_large)
    code, _, err = cli(capsys, "info")
    assert code == 2 and one_line_error(err) == f"fasttl: error: {tmp_path}/run/curves.png: file too large (a file " \
        "size limit, ulimit -f, or the file system's; write elsewhere or raise it)"


# ---- eval: the run's own data is split as the run split it --------------------------------------
def _flat_copy(cat_ship, dest):
    """cat_ship's training images as one flat folder of class folders (no train/test)."""
    shutil.copytree(cat_ship / "train", dest)
    return dest


def test_eval_with_data_naming_the_runs_own_changed_folder_is_refused(cat_ship, tmp_path, capsys):
    flat = _flat_copy(cat_ship, tmp_path / "flat")
    out = tmp_path / "run"
    run(**one_epoch_run(flat, out))
    shutil.copy(cat_ship / "test" / "cat" / sorted(os.listdir(cat_ship / "test" / "cat"))[0], flat / "cat" / "zz.jpg")
    for words in ([], ["--data", str(flat)], ["--data", str(flat) + "/"]):
        code, _, err = cli(capsys, "eval", out, "--no-progress", *words)
        assert code == 2 and "changed since the run" in one_line_error(err), words


def test_eval_with_data_naming_the_runs_own_list_splits_it_as_the_run_did(cat_ship, tmp_path, capsys):
    folder = tmp_path / "list"
    rows = image_list(cat_ship, folder)
    (folder / "bad.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    rows.append("bad.jpg,cat")
    (folder / "list.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "run"
    run(**one_epoch_run(folder / "list.csv", out, on_error="skip"))
    _, own, _ = cli(capsys, "eval", out, "--no-progress")
    code, given, err = cli(capsys, "eval", out, "--no-progress", "--data", folder / "list.csv", "--on-error", "skip")
    assert code == 0, err
    assert json.loads((out / "eval_metrics.json").read_text())["test_split"] == "carved"
    assert given == own  # the same images as the run's own test split, never one of its training images


def test_a_cifar10_run_is_evaluated_on_fasttl_data_not_a_folder_of_that_name(tmp_path, monkeypatch):
    from fasttl.transfer.evaluate import own_data
    from fasttl.transfer.identity import absolute_path as _data_path

    monkeypatch.chdir(tmp_path)
    assert _data_path("cifar10") is None  # config.json records no path for a named data set
    # an older run recorded <cwd>/cifar10: eval still resolves the name through $FASTTL_DATA
    assert own_data({"data": "cifar10", "data_path": str(tmp_path / "cifar10")}) == "cifar10"


def test_a_folder_named_like_a_built_in_data_set_is_not_silently_replaced(tmp_path, monkeypatch):
    from fasttl.transfer.datasets import load_dataset

    monkeypatch.chdir(tmp_path)
    (tmp_path / "digits" / "a").mkdir(parents=True)
    with pytest.raises(OptionError, match=r"^data: 'digits' names fasttl's built-in data set, and a folder of that "
                                          r"name is here too; pass ./digits for the folder"):
        load_dataset("digits")


def test_eval_and_extract_never_write_caches_or_records_among_the_images(cat_ship, finished, tmp_path, capsys,
                                                                          monkeypatch):
    data = tmp_path / "data"
    shutil.copytree(cat_ship, data)
    monkeypatch.setenv("FASTTL_STATE_DIR", str(data / "test" / "zstate"))
    code, _, err = cli(capsys, "extract", "--data", data, "--out", tmp_path / "cache", "--image-size", "32",
                       "--no-progress")
    assert code == 2 and "FASTTL_STATE_DIR" in one_line_error(err) and "inside the data folder" in err
    monkeypatch.delenv("FASTTL_STATE_DIR")
    monkeypatch.setenv("FASTTL_CACHE_DIR", str(data / "test" / "zcache"))
    code, _, err = cli(capsys, "eval", finished, "--data", data, "--no-progress")
    assert code == 2 and "FASTTL_CACHE_DIR" in one_line_error(err) and "inside the data folder" in err
    assert sorted(os.listdir(data / "test")) == ["cat", "ship"]


def test_extract_never_writes_into_a_run_folder(cat_ship, finished, capsys):
    before = sorted(os.listdir(finished))
    code, _, err = cli(capsys, "extract", "--data", cat_ship, "--out", finished, "--image-size", "32",
                       "--no-progress")
    assert code == 2 and "is in the fasttl run folder" in one_line_error(err)
    assert sorted(os.listdir(finished)) == before


# ---- option values checked before any work ------------------------------------------------------
@pytest.mark.parametrize("words, message", [
    (["--shard-rows", "0"], "shard_rows: expected a positive integer, got 0"),
    (["--batch-size", "0"], "batch_size: expected a positive integer, got 0"),
    (["--image-size", "100000"], "image_size: 100000 px is more than fasttl handles (1024)"),
    (["--device", "meta"], "device: expected cpu, cuda or cuda:N, got 'meta'"),
    (["--labels", "indices"], "labels: --labels indices reads a file list's labels"),
])
def test_extract_option_values_are_one_line(words, message, cat_ship, tmp_path, capsys):
    code, _, err = cli(capsys, "extract", "--data", cat_ship, "--out", tmp_path / "cache", "--no-progress", *words)
    assert code == 2 and message in one_line_error(err)
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("device", ["meta", "cuda:abc", "xpu", "cudax"])
def test_devices_are_checked_by_eval_and_run(device, finished, cat_ship, tmp_path, capsys):
    code, _, err = cli(capsys, "eval", finished, "--device", device, "--no-progress")
    assert code == 2 and one_line_error(err).startswith("fasttl: error: device: expected cpu, cuda or cuda:N")
    with pytest.raises(OptionError, match=r"^device: expected cpu, cuda or cuda:N"):
        run(**one_epoch_run(cat_ship, tmp_path / "run", device=device))
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without a GPU")
def test_a_gpu_asked_for_on_a_machine_without_one_is_one_line(finished, capsys):
    code, _, err = cli(capsys, "eval", finished, "--device", "cuda", "--no-progress")
    assert code == 2 and "torch sees no CUDA GPU; pass --device cpu" in one_line_error(err)


@pytest.mark.parametrize("temperature", [5000.0, 0.001])
def test_a_temperature_distillation_loss_refuses_is_an_option_error_before_any_work(temperature, cat_ship,
                                                                                    finished, tmp_path):
    with pytest.raises(OptionError, match=r"^temperature: expected a number in \[0.01, 1000\]"):
        run(**one_epoch_run(cat_ship, tmp_path / "run", strategy="distill", teacher=str(finished),
                            temperature=temperature))
    assert not (tmp_path / "run").exists()


def test_seeds_up_to_the_limit_train_every_epoch_strategy(cat_ship, tmp_path):
    for strategy in ("scratch", "mlp"):
        run(**one_epoch_run(cat_ship, tmp_path / strategy, strategy=strategy, seed=2**63 - 1))
        assert json.loads((tmp_path / strategy / "config.json").read_text())["seed"] == 2**63 - 1
        assert (tmp_path / strategy / "metrics.json").exists()
    cache = fasttl.FeatureCache.write(str(tmp_path / "fc"), [np.ones((4, 2), np.float32)], [0, 1, 0, 1],
                                      classes=["a", "b"])
    assert sum(len(y) for _, y in cache.loader(2, seed=2**62)) == 4
    with pytest.raises(TypeError, match=r"^seed: expected an integer, got 1.5$"):
        cache.loader(2, seed=1.5)


def test_the_fetch_deadline_is_bounded(tmp_path, capsys):
    code, _, err = cli(capsys, "data", "fetch", "cifar10", "--deadline", "1e10", "--dest", tmp_path, "--no-progress")
    assert code == 2 and one_line_error(err) == "fasttl: error: deadline: expected a number from 1 to 2.592e+06, " \
        "got 10000000000.0"


def test_predict_without_a_run_refuses_the_options_only_a_run_reads(cat_ship, capsys):
    image = cat_ship / "test" / "cat" / sorted(os.listdir(cat_ship / "test" / "cat"))[0]
    for words, flag in ((["--on-error", "skip"], "--on-error"), (["--device", "cuda"], "--device")):
        code, _, err = cli(capsys, "predict", image, *words)
        assert code == 2 and one_line_error(err).startswith(f"fasttl: error: run: {flag} needs --run RUN"), words


def test_a_huge_batch_size_is_held_to_the_data(finished, cat_ship, tmp_path, capsys):
    code, out, err = cli(capsys, "predict", "--run", finished, cat_ship / "test", "--batch-size", "3000000000",
                         "--no-progress")
    assert code == 0, err
    assert len(out.strip().splitlines()) == 1 + 6  # the header and each test image


# ---- files read back --------------------------------------------------------------------------
def _cifar_batches(root, names, labels_per_batch, rng):
    os.makedirs(root)
    with open(os.path.join(root, "batches.meta"), "wb") as f:
        pickle.dump({b"label_names": names}, f, protocol=2)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(os.path.join(root, name), "wb") as f:
            pickle.dump({b"data": rng.integers(0, 255, (len(labels_per_batch), 3072), dtype=np.uint8),
                         b"labels": list(labels_per_batch)}, f, protocol=2)


class _Construct:
    """Pickles as a direct call of `callable(*args)`."""

    def __init__(self, callable_, *args):
        self.callable, self.args = callable_, args

    def __reduce__(self):
        return self.callable, self.args


def test_a_cifar_batch_that_calls_numpy_to_allocate_is_refused(tmp_path, rng):
    from fasttl.data import load_cifar_pickles

    root = str(tmp_path / "cifar-10-batches-py")
    _cifar_batches(root, [b"a", b"b"], [0, 1], rng)
    with open(os.path.join(root, "data_batch_1"), "wb") as f:
        f.write(pickle.dumps({b"data": _Construct(np.ndarray, (300_000, 3072), np.dtype(np.uint8)),
                              b"labels": [0, 1]}, protocol=2))
    with pytest.raises(DataError, match=r"data_batch_1: not a CIFAR python batch \(UnpicklingError: it calls "
                                        r"numpy.ndarray\(...\) to make an array"):
        load_cifar_pickles(root, True)
    from numpy.core.multiarray import _reconstruct

    with open(os.path.join(root, "data_batch_1"), "wb") as f:
        f.write(pickle.dumps({b"data": _Construct(_reconstruct, np.ndarray, (300_000, 3072), b"B"),
                              b"labels": [0, 1]}, protocol=2))
    with pytest.raises(DataError, match=r"it asks numpy to make an array of shape \(300000, 3072\) from nothing"):
        load_cifar_pickles(root, True)


@pytest.mark.parametrize("names, labels, message", [
    ([b"cat", b"dog", b"ship"], [0, 1], r"class 'ship' \(of its 'label_names'\) has no image"),
    ([unicodedata.normalize("NFC", "caf\u00e9"), unicodedata.normalize("NFD", "caf\u00e9"), "ship"], [0, 1, 2],
     r"one name written in two Unicode forms"),
])
def test_cifar_class_names_follow_the_rules_of_every_other_format(names, labels, message, tmp_path, rng):
    from fasttl.data import load_cifar_pickles

    root = str(tmp_path / "cifar-10-batches-py")
    _cifar_batches(root, names, labels, rng)
    with pytest.raises(DataError, match=message):
        load_cifar_pickles(root, True)


def test_class_folders_differing_only_in_white_space_are_refused(cat_ship, tmp_path):
    data = tmp_path / "data"
    for split in ("train", "test"):
        shutil.copytree(cat_ship / split / "cat", data / split / "cat")
        shutil.copytree(cat_ship / split / "ship", data / split / "cat ")
    with pytest.raises(DataError, match=r"'cat' and 'cat ' differ only in white space, so they look the same in "
                                        r"every report; rename one"):
        run(**one_epoch_run(data, tmp_path / "run"))


def test_labels_indices_with_class_folders_is_refused_by_run(cat_ship, tmp_path):
    with pytest.raises(OptionError, match=r"labels"):
        run(**one_epoch_run(cat_ship, tmp_path / "run", labels="indices"))


def test_a_parquet_list_with_two_label_columns_is_named(cat_ship, tmp_path):
    pa = pytest.importorskip("pyarrow", reason="Parquet lists need pyarrow")
    import pyarrow.parquet as pq

    from fasttl.data.formats.filelist import read_file_list

    paths = [str(cat_ship / "train" / "cat" / n) for n in sorted(os.listdir(cat_ship / "train" / "cat"))]
    table = pa.Table.from_arrays([pa.array(paths), pa.array(["cat"] * len(paths)), pa.array(["x"] * len(paths))],
                                 names=["path", "label", "label"])
    pq.write_table(table, tmp_path / "dup.parquet")
    with pytest.raises(DataError, match=r"dup.parquet has 2 'label' columns \(expected one path and one label "
                                        r"column; rename or drop the others\)$"):
        read_file_list(str(tmp_path / "dup.parquet"))


# ---- weights ----------------------------------------------------------------------------------
@pytest.mark.parametrize("damage, message", [
    ("nan", r"'layer1.0.conv1.weight' holds NaN or infinite values"),
    ("huge", r"'layer1.0.conv1.weight' holds NaN or infinite values \(in float32\)"),
    ("negative_var", r"'bn1.running_var' holds a negative running variance"),
])
def test_backbone_weights_that_make_nan_features_are_named(damage, message, tmp_path):
    from fasttl.backbones.weights import WeightsError

    state = {k: v.clone() for k, v in fasttl.backbones.create("resnet18", pretrained=False).state_dict().items()}
    if damage == "nan":
        state["layer1.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    elif damage == "huge":
        state["layer1.0.conv1.weight"] = state["layer1.0.conv1.weight"].double()
        state["layer1.0.conv1.weight"][0, 0, 0, 0] = 1e300
    else:
        state["bn1.running_var"][0] = -1.0
    path = tmp_path / "r18.pth"
    torch.save(state, path)
    with pytest.raises(WeightsError, match=f"^weights: {path}: {message}"):
        fasttl.backbones.create("resnet18", weights=str(path))


def test_weights_that_are_a_pipe_are_named_as_such(tmp_path):
    from fasttl.backbones.weights import WeightsError

    os.mkfifo(tmp_path / "w.fifo")
    with pytest.raises(WeightsError, match=r"w.fifo is not a regular file \(a folder, a pipe or a device\?\)"):
        fasttl.backbones.create("resnet18", weights=str(tmp_path / "w.fifo"))


def test_a_backbone_without_four_stages_says_to_pass_features_head(cat_ship, tmp_path):
    state_path = tmp_path / "r18.pth"
    torch.save(fasttl.backbones.create("resnet18", pretrained=False).state_dict(), state_path)
    with pytest.raises(OptionError, match=r"asked for 4; pass --features head"):
        run(data=str(cat_ship), backbone="resnet18", weights=str(state_path), image_size=32, compare="none",
            out=str(tmp_path / "run"), progress=False)


# ---- the from-scratch CNN and benchmarks -------------------------------------------------------
def test_the_small_cnn_refuses_photos_too_large_to_hold(tmp_path):
    from fasttl.transfer.small_cnn import MAX_NATIVE_SIZE, native_images

    with pytest.raises(OptionError, match=rf"1500 px here, and holds them all in memory; it takes images up to "
                                          rf"{MAX_NATIVE_SIZE} px"):
        native_images(None, 1500, 0, torch.device("cpu"), torch.float32)


def test_bench_outputs_go_through_fasttls_own_temporary_and_are_checked_first(tmp_path, capsys, monkeypatch):
    from fasttl.bench import common, runner

    (tmp_path / "res.json.tmp").write_text("my notes")
    common.save_json(str(tmp_path / "res.json"), {"a": 1})
    assert json.loads((tmp_path / "res.json").read_text()) == {"a": 1}
    assert (tmp_path / "res.json.tmp").read_text() == "my notes"
    ran = []
    monkeypatch.setattr(runner, "machine", lambda: ran.append(1) or {})
    with pytest.raises(OptionError, match=r"^plot: .*out.txt is not a .png, .svg, .pdf file"):
        runner.run(["distill"], quick=True, plot_path=str(tmp_path / "out.txt"))
    with pytest.raises(OptionError, match=r"^json: .*nonexist does not exist \(give another --json in an existing "
                                          r"folder\)"):
        runner.run(["distill"], quick=True, json_path=str(tmp_path / "nonexist" / "x.json"))
    assert not ran  # refused before any benchmark ran


def test_bench_data_that_is_flat_or_small_is_named(tmp_path, cat_ship, monkeypatch):
    from fasttl.bench.common import bench_splits

    monkeypatch.setenv("FASTTL_BENCH_DATA", str(cat_ship / "train"))
    with pytest.raises(OptionError, match=r"\(FASTTL_BENCH_DATA\) has no train/ and test/ class folders"):
        bench_splits()
    monkeypatch.setenv("FASTTL_BENCH_DATA", str(cat_ship))
    with pytest.raises(OptionError, match=r"/train \(FASTTL_BENCH_DATA\) holds 12 images; the benchmarks need at "
                                          r"least 20"):
        bench_splits()


def test_too_many_open_files_while_mapping_a_cache_is_the_machines_limit_not_a_damaged_cache(tmp_path,
                                                                                             monkeypatch):
    import errno

    cache = fasttl.FeatureCache.write(str(tmp_path / "fc"), [np.ones((4, 2), np.float32)], [0, 1, 0, 1],
                                      classes=["a", "b"])

    def no_more_files(*args, **kwargs):
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(np, "memmap", no_more_files)
    with pytest.raises(OSError) as caught:
        fasttl.FeatureCache.open(cache.directory)
    assert caught.value.errno == errno.EMFILE and not isinstance(caught.value, fasttl.cache.CacheError)


@pytest.fixture(scope="module")
def linear_finished(cat_ship, tmp_path_factory):
    """A finished linear run on cats and ships: a distillation teacher."""
    return finished_run(cat_ship, tmp_path_factory, "ninth-linear", strategy="linear", epochs=None)


def test_a_distill_runs_choice_and_teacher_logits_edited_by_hand_are_made_anew_on_resume(cat_ship, linear_finished,
                                                                                          tmp_path):
    """Read back on --resume only while their SHA-256 is the one the marker recorded: a choice
    claiming 0.99 on 50,000 images, or the teachers' logits rolled by one class, are never used."""
    from safetensors.torch import load_file, save_file

    from fasttl.transfer.strategies import distill

    out = tmp_path / "student"
    options = one_epoch_run(cat_ship, out, strategy="distill", teacher=str(linear_finished), epochs=2)
    first = run(**options)
    choice = json.loads((out / distill.CHOICE).read_text())
    choice.update(val_accuracy=0.99, outcome="[trusted link](http://evil.example)")
    (out / distill.CHOICE).write_text(json.dumps(choice))
    tensors = load_file(str(out / distill.TEACHER_LOGITS))
    from safetensors import safe_open

    with safe_open(str(out / distill.TEACHER_LOGITS), framework="pt") as f:
        metadata = f.metadata()
    save_file({k: v.roll(1, 1).contiguous() for k, v in tensors.items()}, str(out / distill.TEACHER_LOGITS),
              metadata=metadata)
    os.remove(out / "metrics.json")
    resumed = run(**options, resume=True)
    assert resumed["notes"]["choice"] == first["notes"]["choice"] and resumed["accuracy"] == first["accuracy"]
    assert "evil.example" not in (out / "report.md").read_text()
    torch.testing.assert_close(load_file(str(out / distill.TEACHER_LOGITS))["logits"], tensors["logits"])


def test_two_runs_of_one_name_writing_tensorboard_curves_into_one_folder_are_one_at_a_time(cat_ship, tmp_path):
    """The check for another run's event files and the writing of this run's are made atomic by
    a lock on DIR/<run name> held for the run (TensorBoard ignores the lock file)."""
    pytest.importorskip("tensorboard", reason="needs the tensorboard package (fasttl[tensorboard])")
    from fasttl.transfer.job import TENSORBOARD_LOCK, TENSORBOARD_OWNER
    from fasttl.util.errors import UserError
    from fasttl.util.files import FolderLock

    logs = tmp_path / "logs"
    (logs / "run").mkdir(parents=True)
    with FolderLock(str(logs / "run"), TENSORBOARD_LOCK, "another run"):  # as a run started a moment before
        with pytest.raises(UserError, match=r"logs/run is in use by pid \d+; wait for it to finish"):
            run(**one_epoch_run(cat_ship, tmp_path / "b" / "run", tensorboard=str(logs)))
    run(**one_epoch_run(cat_ship, tmp_path / "a" / "run", tensorboard=str(logs)))  # once it has finished
    assert sorted(os.listdir(logs / "run")) == sorted([TENSORBOARD_OWNER, TENSORBOARD_LOCK, "scratch"])


def test_export_of_a_run_that_skipped_an_image_verifies_on_the_runs_readable_test_images(cat_ship, tmp_path,
                                                                                       capsys):
    pytest.importorskip("onnxruntime", reason="export verifies with ONNX Runtime (pip install onnx onnxruntime)")
    data = tmp_path / "data"
    shutil.copytree(cat_ship, data)
    (data / "test" / "cat" / "0bad.jpg").write_bytes(b"\xff\xd8 truncated")
    run(**one_epoch_run(data, tmp_path / "run", on_error="skip"))
    code, out, err = cli(capsys, "export", tmp_path / "run", "--out", tmp_path / "model.onnx")
    assert code == 0, err
    assert re.search(r"verified with ONNX Runtime on 6 real images", out) and (tmp_path / "model.onnx").exists()


def test_dali_failing_for_want_of_file_descriptors_says_so(monkeypatch, small_source):
    import errno

    from fasttl.data import loader

    images = loader.ImageLoader(small_source, fasttl.data.TransformSpec(32, (0.5,) * 3, (0.25,) * 3, 1.0), 4,
                                backend="torch")

    class NoneInFlight:
        in_flight = []

    failure = RuntimeError("Critical error in pipeline: Current pipeline object is no longer valid.")
    explained = images._explain_dali_error(failure, NoneInFlight())
    assert isinstance(explained, RuntimeError) and "one of 0 images" not in str(explained)
    monkeypatch.setattr(loader, "_few_files_left", lambda margin=8: True)
    explained = images._explain_dali_error(failure, NoneInFlight())
    assert isinstance(explained, OSError) and explained.errno == errno.EMFILE
