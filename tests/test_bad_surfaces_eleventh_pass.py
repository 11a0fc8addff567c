"""What the eleventh hostile pass of the second hardening round found: each case kept with the fix
that answers it."""
import io
import json
import os
import pickle
import shutil
import struct
import tarfile

import numpy as np
import pytest
import torch

import fasttl
from conftest import cli, finished_run, one_epoch_run, one_line_error
from fasttl.data import DataError
from fasttl.util.errors import OptionError
from fasttl.transfer.job import run

pytestmark = pytest.mark.usefixtures("private_cache")


@pytest.fixture(scope="module")
def scratch_run(cat_ship, tmp_path_factory):
    return finished_run(cat_ship, tmp_path_factory, "scratch11")


@pytest.mark.parametrize("kind", ["fifo", "device", "link"])
def test_bench_never_replaces_a_device_a_fifo_or_a_link_with_its_json(kind, tmp_path, capsys):
    target = tmp_path / "out.json"
    if kind == "fifo":
        os.mkfifo(target)
    elif kind == "device":
        if os.geteuid() != 0:
            pytest.skip("making a device node needs root")
        os.mknod(target, 0o666 | 0o020000, os.makedev(1, 3))  # a /dev/null twin
    else:
        target.symlink_to("/proc/self/fd/1")
    before = os.lstat(target)
    code, out, err = cli(capsys, "bench", "adam", "--quick", "--json", target)
    assert code == 2 and ("is a symbolic link" in err or "is not a plain file" in err), err
    after = os.lstat(target)
    assert (after.st_mode, after.st_ino) == (before.st_mode, before.st_ino)


def test_an_output_path_ending_in_a_slash_or_with_a_trailing_space_is_named(scratch_run, tmp_path, capsys):
    code, _, err = cli(capsys, "predict", "--run", scratch_run, scratch_run.parent, "--out", f"{tmp_path}/dir.csv/")
    assert code == 2 and "names a folder (it ends in /)" in one_line_error(err)
    assert not (tmp_path / "dir.csv").exists()
    code, _, err = cli(capsys, "predict", "--run", scratch_run, scratch_run.parent, "--out", f"{tmp_path}/p.csv ")
    assert code == 2 and "p.csv '" in one_line_error(err) and "does not end in .csv" in err


def test_outputs_never_go_into_another_runs_folder(scratch_run, cat_ship, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(scratch_run, other)
    code, _, err = cli(capsys, "export", scratch_run, "--out", other / "model.onnx")
    assert code == 2 and "is in the fasttl run folder" in one_line_error(err)
    code, _, err = cli(capsys, "predict", "--run", scratch_run, cat_ship / "test" / "cat", "--out", other / "p.csv")
    assert code == 2 and "is in the fasttl run folder" in one_line_error(err)
    with pytest.raises(fasttl.transfer.rundir.RunError, match="is inside the fasttl run folder"):
        run(**one_epoch_run(cat_ship, other / "sub"))
    assert not (other / "model.onnx").exists() and not (other / "p.csv").exists() and not (other / "sub").exists()


def test_build_and_extract_never_make_a_folder_of_the_users_files_a_cache(cat_ship, small_source, lite0, tmp_path,
                                                                          capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "holiday.jpg").write_text("my photo")
    with pytest.raises(fasttl.cache.store.CacheError, match=r"holds files that are not a fasttl cache's \(holiday"):
        fasttl.FeatureCache.build(lite0, small_source, str(mine), image_size=32, progress=False)
    assert sorted(os.listdir(mine)) == ["holiday.jpg"]
    root = tmp_path / "ux"
    root.mkdir()
    (root / "readme.txt").write_text("mine")
    code, _, err = cli(capsys, "extract", "--data", cat_ship, "--out", root, "--image-size", "32", "--no-progress")
    assert code == 2 and "holds files that are not fasttl's (readme.txt)" in one_line_error(err)
    assert sorted(os.listdir(root)) == ["readme.txt"]


def test_eval_writes_nothing_when_the_run_was_replaced_while_it_evaluated(scratch_run, tmp_path, monkeypatch):
    from fasttl.transfer import evaluate

    copy = tmp_path / "run"
    shutil.copytree(scratch_run, copy)
    real = evaluate.classification_metrics

    def replaced_meanwhile(*args):  # what `run --overwrite` does while eval computes
        (copy / "metrics.json").unlink()
        (copy / "metrics.json").write_text((scratch_run / "metrics.json").read_text())
        return real(*args)

    monkeypatch.setattr(evaluate, "classification_metrics", replaced_meanwhile)
    with pytest.raises(fasttl.transfer.rundir.RunError, match="replaced while it was evaluated"):
        evaluate.evaluate_run(str(copy), progress=False)
    assert not (copy / "eval_metrics.json").exists()


def test_eval_of_the_runs_own_images_listed_is_refused_even_after_the_data_changed(cat_ship, tmp_path):
    from fasttl.transfer.evaluate import evaluate_run

    flat = tmp_path / "flat"
    shutil.copytree(cat_ship / "train", flat)
    out = tmp_path / "run"
    run(**one_epoch_run(flat, out))
    extra = [sorted((cat_ship / "test" / name).glob("*.jpg"))[0] for name in ("cat", "ship")]  # moves the cut
    rows = ["path,label"] + [f"{p},{p.parent.name}" for p in sorted(flat.glob("*/*.jpg")) + extra]
    (tmp_path / "list.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(DataError, match="of the run's training images"):
        evaluate_run(str(out), str(tmp_path / "list.csv"), progress=False)
    os.utime(next(flat.glob("ship/*.jpg")), (978307200, 978307200))  # touched: the run's split can't be rebuilt
    with pytest.raises(DataError, match="of the run's training images"):  # its record of them still tells
        evaluate_run(str(out), str(tmp_path / "list.csv"), progress=False)
    (out / "trained-images.bin").unlink()  # a run without the record (an older fasttl's): nor in its marker
    marker = json.loads((out / ".fasttl-run").read_text())
    del marker["files"]["trained-images.bin"]
    (out / ".fasttl-run").write_text(json.dumps(marker))
    with pytest.raises(DataError, match="changed since the run, so which of them it trained on can't be told"):
        evaluate_run(str(out), str(tmp_path / "list.csv"), progress=False)
    assert not (out / "eval_metrics.json").exists()


def test_a_list_path_starting_with_a_tilde_is_the_lists_own_folder(cat_ship, tmp_path, monkeypatch):
    from fasttl.data.formats.filelist import read_file_list

    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    tilde = tmp_path / "list" / "~"
    tilde.mkdir(parents=True)
    rows = ["path,label"]
    for image in sorted((cat_ship / "train").glob("*/*.jpg")):
        shutil.copy(image, tilde / f"{image.parent.name}-{image.name}")
        shutil.copy(image, home / f"{image.parent.name}-{image.name}")
        rows.append(f"~/{image.parent.name}-{image.name},{image.parent.name}")
    (tmp_path / "list" / "list.csv").write_text("\n".join(rows) + "\n")
    source = read_file_list(str(tmp_path / "list" / "list.csv"))
    assert all(f.startswith(str(tilde)) for f in source.files)


def test_quotes_in_list_paths_are_the_names_own_in_tsv_and_refused_half_quoted_in_csv(cat_ship, tmp_path):
    from fasttl.data.formats.filelist import read_file_list

    folder = tmp_path / "l"
    folder.mkdir()
    images = sorted((cat_ship / "train").glob("*/*.jpg"))
    rows_tsv, rows_csv = ["path\tlabel"], ["path,label"]
    for image in images:
        quoted = f'"{image.parent.name}-{image.stem}".jpg'
        shutil.copy(image, folder / quoted)
        shutil.copy(images[0], folder / f"{image.parent.name}-{image.stem}.jpg")  # the name without quotes: another
        rows_tsv.append(f"{quoted}\t{image.parent.name}")
        rows_csv.append(f"{quoted},{image.parent.name}")
    (folder / "l.tsv").write_text("\n".join(rows_tsv) + "\n")
    (folder / "l.csv").write_text("\n".join(rows_csv) + "\n")
    source = read_file_list(str(folder / "l.tsv"))
    assert all(os.path.basename(f).startswith('"') for f in source.files)
    with pytest.raises(DataError, match="cannot read .*l.csv as a file list"):
        read_file_list(str(folder / "l.csv"))


def test_a_class_without_test_images_has_no_recall_not_zero(cat_ship, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(cat_ship / "train" / "cat", data / "cat")
    (data / "ship").mkdir()
    shutil.copy(next((cat_ship / "train" / "ship").glob("*.jpg")), data / "ship")
    out = tmp_path / "run"
    metrics = run(**one_epoch_run(data, out))
    assert metrics["per_class_recall"]["ship"] is None and metrics["per_class_recall"]["cat"] is not None
    assert "| ship | n/a (no test image) |" in (out / "report.md").read_text()
    assert json.loads((out / "metrics.json").read_text())["per_class_recall"]["ship"] is None


def test_a_linear_run_refuses_precision_and_records_the_solvers_fp32(cat_ship, tmp_path):
    with pytest.raises(OptionError, match=r"^precision: --precision is not read by --strategy linear"):
        run(**one_epoch_run(cat_ship, tmp_path / "r", strategy="linear", epochs=None, precision="bf16"))
    metrics = run(**one_epoch_run(cat_ship, tmp_path / "ok", strategy="linear", epochs=None))
    assert metrics["precision"] == "fp32"


@pytest.fixture
def two_caches(tmp_path):
    rng = np.random.default_rng(0)
    features = rng.standard_normal((40, 8)).astype(np.float32)
    labels = [i % 2 for i in range(40)]
    train = fasttl.FeatureCache.write(str(tmp_path / "tr"), [features], labels, classes=["a", "b"], dtype="fp32")
    other = fasttl.FeatureCache.write(str(tmp_path / "ev"), [features], labels, classes=["dog", "cat"], dtype="fp32")
    return train, other


@pytest.mark.parametrize("arguments, message", [
    (dict(epochs=0), "epochs: expected a positive integer"), (dict(epochs=2.5), "epochs: expected a positive integer"),
    (dict(lr=float("inf")), "lr: expected a finite number > 0"), (dict(weight_decay=-1.0), "weight_decay"),
    (dict(seed=-3), "seed: expected an integer >= 0"), (dict(device="meta"), "device: expected cpu, cuda"),
    (dict(kind="rbf"), "kind: expected one of linear, mlp")])
def test_train_head_names_a_bad_argument(two_caches, arguments, message):
    with pytest.raises(OptionError, match=message):
        fasttl.heads.train_head(two_caches[0], progress=False, **{"epochs": 2, **arguments})


def test_train_head_refuses_an_eval_cache_of_other_classes_and_a_diverged_head(two_caches):
    train, other = two_caches
    with pytest.raises(OptionError, match=r"eval_cache: its classes \['dog', 'cat'\]"):
        fasttl.heads.train_head(train, epochs=1, eval_cache=other, progress=False)
    with pytest.raises(fasttl.heads.fit.DivergedError):
        fasttl.heads.train_head(train, epochs=3, lr=1e30, progress=False)
    fit = fasttl.heads.train_head(train, epochs=2, seed=2**70, progress=False)  # folded into torch's range
    assert len(fit.history) == 2


def test_file_list_pairs_follow_the_csv_lists_rules(cat_ship):
    cats = sorted(str(p) for p in (cat_ship / "train" / "cat").glob("*.jpg"))
    ships = sorted(str(p) for p in (cat_ship / "train" / "ship").glob("*.jpg"))
    with pytest.raises(DataError, match="no image with label 0"):
        fasttl.data.file_list([(p, 1) for p in cats] + [(p, 2) for p in ships])
    with pytest.raises(DataError, match="is named twice"):
        fasttl.data.file_list([(cats[0], 0), (cats[0], 1), (ships[0], 1)])
    assert fasttl.data.file_list([(cats[0], 0), (ships[0], 1)]).classes == ["0", "1"]


def test_adamw_follows_a_param_relaid_in_channels_last_as_torch_does():
    results = []
    for make in (torch.optim.AdamW, fasttl.optim.AdamW):
        generator = torch.Generator().manual_seed(11)
        weight = torch.nn.Parameter(torch.randn(8, 3, 3, 3, generator=generator))
        optimizer = make([weight], lr=0.1)
        for _ in range(3):
            weight.grad = torch.randn(8, 3, 3, 3, generator=generator)
            optimizer.step()
        weight.data = weight.data.contiguous(memory_format=torch.channels_last)
        weight.grad = torch.randn(8, 3, 3, 3, generator=generator).contiguous(memory_format=torch.channels_last)
        optimizer.step()
        results.append(weight.detach().clone())
    torch.testing.assert_close(results[1], results[0], rtol=1e-5, atol=1e-6)
    assert results[1].is_contiguous(memory_format=torch.channels_last)


def _progressive_bomb(path, width: int, scans: int) -> None:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("L", (width, width), 128).save(buffer, "JPEG", progressive=True)
    data = buffer.getvalue()
    blocks = ((width + 7) // 8) ** 2
    table = b"\xff\xc4" + struct.pack(">H", 20) + bytes([0x11]) + bytes([1] + [0] * 15) + bytes([0xE0])
    start = b"\xff\xda" + struct.pack(">H", 8) + bytes([1, 1, 0x01, 1, 63, 0x00])
    bits, left = "", blocks
    while left > 0:
        run_length = max(min(left, 32767), 16384)
        bits += "0" + format(run_length - 16384, "014b")
        left -= run_length
    bits += "1" * (-len(bits) % 8)
    scan = table + start + bytes(int(bits[i:i + 8], 2) for i in range(0, len(bits), 8)).replace(b"\xff", b"\xff\x00")
    path.write_bytes(data[:-2] + scan * scans + b"\xff\xd9")


def test_a_thin_strip_and_a_jpeg_of_thousands_of_scans_are_refused_by_name(tmp_path):
    from PIL import Image

    from fasttl.data.images import MAX_JPEG_SCANS, header_problem

    Image.fromarray(np.zeros((1, 3000, 3), np.uint8)).save(tmp_path / "thin.png")
    assert "too thin to resize" in header_problem(str(tmp_path / "thin.png"))
    _progressive_bomb(tmp_path / "bomb.jpg", 256, MAX_JPEG_SCANS + 50)
    assert f"more than {MAX_JPEG_SCANS} scans" in header_problem(str(tmp_path / "bomb.jpg"))
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 48, 3), np.uint8)).save(
        tmp_path / "progressive.jpg", "JPEG", progressive=True)
    Image.fromarray(np.zeros((40, 1000, 3), np.uint8)).save(tmp_path / "panorama.png")  # 25:1 is fine
    assert header_problem(str(tmp_path / "progressive.jpg")) is None
    assert header_problem(str(tmp_path / "panorama.png")) is None
    with pytest.raises(DataError, match="too thin to resize"):
        fasttl.data.torch_pipeline.decode(str(tmp_path / "thin.png"))


def test_a_cifar_batch_whose_labels_are_a_nest_of_shared_lists_is_refused_before_numpy_reads_it(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [b"a", b"b"]}, f, protocol=2)
    for name in ["data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"]:
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]}, f, protocol=2)
    nest = [0, 1] * 13
    for _ in range(6):
        nest = [nest] * 26  # 26**7 references: billions of ints if numpy walked them
    with open(folder / "data_batch_1", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": nest}, f, protocol=2)
    with pytest.raises(DataError, match="'labels' must be 2 integers"):
        fasttl.data.load_cifar_pickles(str(folder), True)


def test_an_image_name_that_is_not_utf8_is_named_not_a_traceback(cat_ship, tmp_path, capsys):
    data = tmp_path / "latin"
    shutil.copytree(cat_ship, data)
    first = sorted((data / "test" / "cat").glob("*.jpg"))[0]
    os.rename(first, os.path.join(os.fsencode(first.parent), b"caf\xe9.jpg"))
    code, _, err = cli(capsys, "run", "--data", data, "--image-size", "32", "--strategy", "scratch", "--epochs", "1",
                       "--compare", "none", "--no-progress", "--out", tmp_path / "run")
    assert code == 2 and "whose name is not valid UTF-8" in one_line_error(err)


def test_text_the_console_cannot_show_is_escaped_not_a_traceback(tmp_path, monkeypatch):
    from fasttl.cli_errors import escape_unshowable_text

    stream = io.TextIOWrapper(io.BytesIO(), encoding="ascii")
    monkeypatch.setattr("sys.stdout", stream)
    escape_unshowable_text()
    print("日本 café")
    stream.flush()
    assert stream.buffer.getvalue() == b"\\u65e5\\u672c caf\\xe9\n"


def test_weights_of_a_wrong_shape_or_stored_as_integers_are_named(tmp_path):
    from fasttl.backbones.weights import WeightsError

    state = fasttl.backbones.create("resnet18", pretrained=False).state_dict()
    wrong = dict(state, **{"layer1.0.conv1.weight": state["layer1.0.conv1.weight"][:, :, :2, :2].clone()})
    torch.save(wrong, tmp_path / "shape.pth")
    torch.save({k: v.to(torch.int64) if v.is_floating_point() else v for k, v in state.items()}, tmp_path / "int.pth")
    with pytest.raises(WeightsError, match=r"layer1.0.conv1.weight is \(64, 64, 2, 2\), the model's \(64, 64, 3, 3\)"):
        fasttl.backbones.create("resnet18", weights=str(tmp_path / "shape.pth"))
    with pytest.raises(WeightsError, match="holds torch.int64 values where the model has torch.float32 weights"):
        fasttl.backbones.create("resnet18", weights=str(tmp_path / "int.pth"))


def test_run_takes_a_torch_device(cat_ship, tmp_path):
    metrics = run(**one_epoch_run(cat_ship, tmp_path / "run", device=torch.device("cpu")))
    assert json.loads((tmp_path / "run" / "config.json").read_text())["device"] == "cpu" and metrics["samples"] == 6


@pytest.mark.parametrize("arguments, error, message", [
    (dict(image_size=10**6), ValueError, r"image_size: 1000000 px is more than fasttl handles"),
    (dict(image_size=32, device="meta"), OptionError, "device: expected cpu, cuda"),
    (dict(image_size=32, backbone=torch.nn.Conv2d(3, 8, 3)), TypeError, "CustomBackbone"),
    (dict(image_size=32, data=["a.jpg"]), TypeError, "data: expected a fasttl source")])
def test_feature_cache_build_names_a_bad_argument(small_source, lite0, tmp_path, arguments, error, message):
    arguments = dict(dict(backbone=lite0, data=small_source), **arguments)
    with pytest.raises(error, match=message):
        fasttl.FeatureCache.build(arguments.pop("backbone"), arguments.pop("data"), str(tmp_path / "c"),
                                  progress=False, **arguments)
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("variables, message", [
    ({"WORLD_SIZE": "2"}, "WORLD_SIZE=2 but RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT not set"),
    ({"WORLD_SIZE": "abc"}, "WORLD_SIZE: expected a number of processes, got 'abc'"),
    ({"WORLD_SIZE": "2", "RANK": "x", "LOCAL_RANK": "0", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, "RANK: expected")])
def test_torchrun_variables_left_in_the_shell_are_one_line(variables, message, cat_ship, tmp_path, monkeypatch,
                                                           capsys):
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    code, _, err = cli(capsys, "extract", "--data", cat_ship, "--out", tmp_path / "x", "--image-size", "32",
                       "--no-progress")
    assert code == 2 and message in one_line_error(err)


def test_a_sparse_tar_member_is_named(cat_ship, tmp_path):
    from fasttl.data.formats.webdataset import read_webdataset

    shard = tmp_path / "sparse.tar"
    with tarfile.open(shard, "w", format=tarfile.GNU_FORMAT) as tar:
        for index, image in enumerate(sorted((cat_ship / "train").glob("*/*.jpg"))):
            info = tar.gettarinfo(str(image), arcname=f"s{index:02d}.jpg")
            with open(image, "rb") as f:
                tar.addfile(info, f)
            label = f"{0 if image.parent.name == 'cat' else 1}".encode()
            cls = tarfile.TarInfo(f"s{index:02d}.cls")
            cls.size = len(label)
            tar.addfile(cls, io.BytesIO(label))
    data = bytearray(shard.read_bytes())
    data[156] = ord("S")  # the first member's type flag: GNU sparse
    shard.write_bytes(bytes(data[:148]) + b" " * 8 + bytes(data[156:]))
    header = bytearray(shard.read_bytes()[:512])
    checksum = sum(header)
    shard.write_bytes(bytes(header[:148]) + f"{checksum:06o}\0 ".encode() + shard.read_bytes()[156:])
    with pytest.raises(DataError, match="is a sparse tar member"):
        read_webdataset(str(shard))


def test_eval_matches_classes_by_name_when_the_run_ordered_them_by_a_classes_file(cat_ship, tmp_path):
    from conftest import image_list
    from fasttl.transfer.evaluate import evaluate_run

    image_list(cat_ship, tmp_path / "list")
    (tmp_path / "order.txt").write_text("ship\ncat\n")
    out = tmp_path / "run"
    run(**one_epoch_run(tmp_path / "list" / "list.csv", out, classes_file=str(tmp_path / "order.txt")))
    metrics = evaluate_run(str(out), str(cat_ship), progress=False)  # class folders: cat, ship (sorted)
    assert metrics["classes"] == ["ship", "cat"] and metrics["samples"] == 6
    assert [sum(row) for row in metrics["confusion_matrix"]] == [3, 3]
    files = sorted((cat_ship / "test").glob("*/*.jpg"))
    names, _ = fasttl.load_run(str(out)).predict([str(f) for f in files])
    right = sum(name == f.parent.name for name, f in zip(names, files))  # matched by name, not by position
    assert metrics["accuracy"] == pytest.approx(right / len(files))


def test_a_missing_listed_file_is_said_not_to_exist(cat_ship, tmp_path):
    from conftest import image_list

    image_list(cat_ship, tmp_path / "list")
    rows = (tmp_path / "list" / "list.csv").read_text().splitlines()
    (tmp_path / "list" / "list.csv").write_text("\n".join(rows + ["nope/missing.jpg,cat"]) + "\n")
    with pytest.raises(DataError, match=r"missing.jpg: cannot be read \((it does not exist|.*No such file)"):
        run(**one_epoch_run(tmp_path / "list" / "list.csv", tmp_path / "run"))


@pytest.mark.parametrize("mark", ["\u034f", "\u17b4"])
def test_class_names_differing_by_other_default_ignorable_characters_are_refused(mark, tmp_path):
    with pytest.raises(ValueError, match="differ only in characters that show nothing"):
        fasttl.FeatureCache.write(str(tmp_path / "fc"), [np.ones((2, 2), np.float32)], [0, 1],
                                  classes=["cat", "cat" + mark])


def test_make_loaders_train_flag_given_as_text_is_refused(small_source):
    preprocessing = fasttl.backbones.create("efficientnet_lite0", pretrained=False).preprocessing
    with pytest.raises(TypeError, match="train: expected True or False, got 'no'"):
        fasttl.data.make_loader(small_source, preprocessing, 4, train="no")


def test_a_teacher_trained_on_the_students_test_images_is_refused(cat_ship, tmp_path):
    swapped = tmp_path / "swapped"
    swapped.mkdir()
    (swapped / "train").symlink_to(cat_ship / "test")
    (swapped / "test").symlink_to(cat_ship / "train")
    teacher = tmp_path / "teacher"
    run(**one_epoch_run(swapped, teacher, strategy="linear", epochs=None))
    with pytest.raises(DataError, match=r"teacher: .* trained on 6 of this run's test images"):
        run(**one_epoch_run(cat_ship, tmp_path / "student", strategy="distill", teacher=str(teacher)))
