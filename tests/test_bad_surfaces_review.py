"""What a hostile review of the second hardening round found, each case kept: pipes and sparse
files where fasttl reads JSON, class lists or images; run files hand-edited within the schema;
weights that overflow when cast; damaged checkpoints; folders that are not what they are named;
Markdown and figures built from user text; evaluation from another folder."""
import csv
import html
import json
import os
import re
import shutil
import signal
import struct
import zlib

import numpy as np
import pytest
import torch

import fasttl
from conftest import cli, finished_run, one_epoch_run, one_line_error, run_with_config_edit
from fasttl.util import files
from fasttl.cache import CacheError
from fasttl.data import DataError
from fasttl.util.errors import OptionError
from fasttl.heads.fit import DivergedError
from fasttl.transfer.job import run
from fasttl.transfer.rundir import RunError

pytestmark = pytest.mark.usefixtures("private_cache")


@pytest.fixture(scope="module")
def finished(cat_ship, tmp_path_factory):
    """A finished two-epoch scratch run (the other module's `finished` has one epoch)."""
    return finished_run(cat_ship, tmp_path_factory, "review", epochs=2)


@pytest.fixture
def no_hang():
    """Fails the test instead of hanging it where a read would wait on a pipe forever."""
    def expired(*_):
        raise AssertionError("blocked: a read waited on a pipe")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


# ---- pipes, devices and sparse giants where a file is read -----------------------------------------
def test_a_pipe_where_json_or_a_class_list_is_read_is_refused_without_waiting(tmp_path, no_hang):
    fifo = tmp_path / "metrics.json"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match=r"metrics.json: .*not a plain file|cannot be read as a plain file"):
        files.read_json(str(fifo))
    with pytest.raises(DataError, match=r"^classes: cannot read .*metrics.json \(not a regular file"):
        fasttl.data.labels.read_classes_file(str(fifo))


def test_sparse_giant_files_are_refused_without_being_read(tmp_path):
    from fasttl.data.images import MAX_IMAGE_BYTES, header_problem

    image = tmp_path / "huge.jpg"
    with open(image, "wb") as f:
        f.write(b"\xff\xd8\xff\xe0")
    os.truncate(image, MAX_IMAGE_BYTES + 1)  # sparse: no disk used, 1 GiB declared
    assert header_problem(str(image)) == f"{MAX_IMAGE_BYTES + 1:,} bytes, more than the {MAX_IMAGE_BYTES:,} an " \
                                         "image file may have"
    config = tmp_path / "config.json"
    with open(config, "wb") as f:
        f.write(b"{")
    os.truncate(config, files.MAX_JSON_BYTES + 1)
    with pytest.raises(ValueError, match=r"config.json: .* bytes, more than fasttl ever writes to a JSON file"):
        files.read_json(str(config))


def _palette_png_without_plte() -> bytes:
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    rows = b"".join(b"\0" + bytes(4) for _ in range(4))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 4, 4, 8, 3, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def test_a_palette_png_without_its_palette_is_named_corrupt(tmp_path):
    from fasttl.data.images import bytes_problem, header_problem

    data = _palette_png_without_plte()
    (tmp_path / "p.png").write_bytes(data)
    expected = "PNG palette image without a PLTE chunk before its data (corrupt file)"
    assert header_problem(str(tmp_path / "p.png")) == expected and bytes_problem(data) == expected


def test_a_class_folder_named_with_a_control_character_is_refused(tmp_path, cifar10_root):
    for name in ("cat", "ship\x1b[31m"):
        (tmp_path / name).mkdir()
        for i in range(3):
            shutil.copy(os.path.join(cifar10_root, "test", "cat", f"{i:04d}.jpg"), tmp_path / name / f"{i}.jpg")
    with pytest.raises(DataError, match=r"has a class folder named 'ship\\x1b\[31m', with a character that is not "
                                        r"printable \(U\+001B, a control character\)"):
        fasttl.data.formats.folder.class_folder_splits(str(tmp_path))


# ---- run files fasttl wrote, edited or damaged afterwards ----------------------------------------
def test_a_config_json_edited_within_its_schema_is_refused_by_its_hash(cat_ship, finished, tmp_path, capsys):
    run_dir = tmp_path / "edited"
    shutil.copytree(finished, run_dir)
    config = json.loads((run_dir / "config.json").read_text())
    config["image_size"] = 64  # a valid value: only the hash tells it from what fasttl wrote
    (run_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(RunError, match=r"config.json: changed after fasttl wrote it \(its SHA-256 is not the one "
                                       r"recorded in .fasttl-run\); restore it, or train the run again with "
                                       r"--overwrite$"):
        fasttl.load_run(str(run_dir))
    code, _, err = cli(capsys, "predict", "--run", run_dir, os.path.join(cat_ship, "test"))
    assert code == 2 and "changed after fasttl wrote it" in one_line_error(err)
    shutil.copy(finished / "config.json", run_dir / "config.json")  # restored: loads again
    assert fasttl.load_run(str(run_dir)).classes == ["cat", "ship"]


@pytest.mark.parametrize("marker", ["", "{}", '{"config_sha256": "abc"}', None], ids=["empty", "no-hash", "short",
                                                                                       "removed"])
def test_a_marker_that_cannot_vouch_for_config_json_refuses_the_run(finished, tmp_path, capsys, marker):
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    if marker is None:
        os.remove(run_dir / ".fasttl-run")
    else:
        (run_dir / ".fasttl-run").write_text(marker)
    config = json.loads((run_dir / "config.json").read_text())
    config["classes"] = config["classes"][::-1]  # would name every prediction wrong
    (run_dir / "config.json").write_text(json.dumps(config))
    # (a marker that is no record makes the folder no run's, as `run --overwrite` finds too: pass 92)
    said = r"\.fasttl-run: missing, damaged or without the SHA-256 of config.json" if marker is None else \
        r"run: not a fasttl run folder \(its \.fasttl-run is not fasttl's record; "
    with pytest.raises(RunError, match=said):
        fasttl.load_run(str(run_dir))


@pytest.mark.parametrize("field, value, expected", [
    ("labels", ["names"], "one of names, indices"),
    ("features", {"pooled": 1}, "one of"),
    ("native_size", 2, "an integer from 8 to"),
    ("classes", ["cat", "ship\n"], "a list of at least 2 distinct, printable class names"),
])
def test_config_values_of_the_wrong_kind_are_named_not_crashed_on(finished, tmp_path, field, value, expected):
    run_dir = run_with_config_edit(finished, tmp_path / "edited", field, value)
    with pytest.raises(RunError, match=rf"config.json: field '{field}' is .*\(expected {expected}"):
        fasttl.load_run(str(run_dir))


def _with_weights_edited(finished, folder, edit):
    """A copy of the finished run whose first float (or first matrix) weight is `edit`ed; its name."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(finished, folder)
    state = load_file(str(folder / "scratch.safetensors"))
    name, edited = edit(state)
    state[name] = edited
    save_file(state, str(folder / "scratch.safetensors"))
    return name


def test_weights_that_overflow_the_models_dtype_when_loaded_are_refused(finished, tmp_path):
    def widen(state):  # finite as float64, inf once cast to the model's float32
        name = next(n for n, t in state.items() if t.is_floating_point())
        return name, torch.full_like(state[name], 1e300, dtype=torch.float64)

    first = _with_weights_edited(finished, tmp_path / "wide", widen)
    with pytest.raises(RunError, match=rf"scratch.safetensors: '{first}' holds NaN or infinite weights"):
        fasttl.load_run(str(tmp_path / "wide"))


def test_weights_of_the_wrong_shape_say_which_tensor(finished, tmp_path):
    def reshape(state):
        return next(n for n, t in state.items() if t.dim() >= 2), torch.zeros(3, 3)

    first = _with_weights_edited(finished, tmp_path / "shape", reshape)
    with pytest.raises(RunError, match=rf"scratch.safetensors: not weights for this run's model \(RuntimeError: "
                                       rf"Error\(s\) in loading state_dict.*size mismatch for {first}"):
        fasttl.load_run(str(tmp_path / "shape"))


def test_resuming_from_a_checkpoint_with_nan_weights_names_it(cat_ship, tmp_path):
    out = tmp_path / "run"
    run(**one_epoch_run(cat_ship, out, epochs=2))
    os.remove(out / "metrics.json")
    checkpoint = out / "scratch.checkpoint.pt"
    state = torch.load(checkpoint, weights_only=True)
    first = next(name for name, tensor in state["model"].items() if tensor.is_floating_point())
    state["model"][first].fill_(float("nan"))
    torch.save(state, checkpoint)
    with pytest.raises(DivergedError, match=rf"scratch.checkpoint.pt: '{first}' holds NaN or infinite weights \(a "
                                            r"damaged checkpoint\); delete it, or run again with --overwrite"):
        run(**one_epoch_run(cat_ship, out, epochs=2, resume=True))
    assert not (out / "metrics.json").exists()


def test_a_folder_where_a_run_file_goes_is_found_before_training(cat_ship, tmp_path):
    out = tmp_path / "run"
    (out / "report.md").mkdir(parents=True)
    (out / ".fasttl-run").write_text(json.dumps({"what": "a fasttl run folder"}))  # fasttl's record, no run yet
    with pytest.raises(RunError, match=r"^out: .*report.md is not a plain file \(a folder, a pipe\?\); move it away"):
        run(**one_epoch_run(cat_ship, out))
    assert sorted(os.listdir(out)) == [".fasttl-run", ".fasttl-run.lock", "report.md"]  # only the lock added


def test_out_may_not_be_the_teacher_it_learns_from(finished, cat_ship):
    before = {name: (finished / name).read_bytes() for name in os.listdir(finished) if (finished / name).is_file()}
    with pytest.raises(OptionError, match=r"^out: --out .* is the --teacher folder itself"):
        run(**one_epoch_run(cat_ship, finished, strategy="distill", teacher=str(finished), overwrite=True))
    assert before == {name: (finished / name).read_bytes() for name in before}


def test_eval_from_another_folder_reads_the_data_the_run_read(cat_ship, tmp_path, monkeypatch):
    from fasttl.transfer.evaluate import evaluate_run

    monkeypatch.chdir(cat_ship.parent)
    out = tmp_path / "run"
    run(**one_epoch_run("two", out))  # a relative --data
    monkeypatch.chdir(tmp_path)
    metrics = evaluate_run(str(out), progress=False)
    assert metrics["data"] == "two" and sum(map(sum, metrics["confusion_matrix"])) == 6


def test_predict_out_inside_a_file_says_so(cat_ship, finished, tmp_path, capsys):
    (tmp_path / "notes").write_text("mine")
    code, _, err = cli(capsys, "predict", "--run", finished, os.path.join(cat_ship, "test"),
                       "--out", tmp_path / "notes" / "p.csv")
    assert code == 2 and one_line_error(err).endswith(f"{tmp_path / 'notes'} is a file, not a folder (give another "
                                                      "--out in an existing folder)")


def test_a_write_whose_folder_is_a_file_names_the_users_path(tmp_path):
    (tmp_path / "notes").write_text("mine")
    target = tmp_path / "notes" / "out.json"
    with pytest.raises(NotADirectoryError) as info:
        files.write_atomic(str(target), b"{}")
    assert info.value.filename == str(target)


# ---- caches written into folders that are not caches ----------------------------------------------
def test_feature_cache_write_refuses_a_folder_of_other_files_and_bad_ids(tmp_path):
    rows = np.ones((4, 3), dtype=np.float32)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("mine")
    (mine / "manifest.json").write_text('{"my": "own"}')
    for overwrite in (False, True):
        with pytest.raises(CacheError, match=r"holds files that are not a fasttl cache's "
                                             r"\(manifest.json, thesis.tex\)"):
            fasttl.FeatureCache.write(str(mine), [rows], [0, 1, 0, 1], classes=["a", "b"], overwrite=overwrite)
    assert sorted(os.listdir(mine)) == ["manifest.json", "thesis.tex"]
    cases = [(dict(classes=["a", "a"]), r"^classes: expected a list of distinct, printable"),
             (dict(classes=["a", "b\x1b"]), r"^classes: expected a list of distinct, printable"),
             (dict(classes=["a", "b"], sample_ids=["x", "y", "x", "z"]), r"^sample_ids: an id names two rows"),
             (dict(classes=["a", "b"], sample_ids=["x", 2, "y", "z"]), r"^sample_ids: expected one non-empty string")]
    for kw, message in cases:
        with pytest.raises(ValueError, match=message):
            fasttl.FeatureCache.write(str(tmp_path / "new"), [rows], [0, 1, 0, 1], **kw)
    cache = fasttl.FeatureCache.write(str(tmp_path / "new"), [rows], [0, 1, 0, 1], classes=["a", "b"])
    assert len(cache) == 4
    (tmp_path / "new" / "notes.txt").write_text("beside a cache fasttl wrote: kept")
    cache = fasttl.FeatureCache.write(str(tmp_path / "new"), [rows], [1, 1, 0, 1], classes=["a", "b"], overwrite=True)
    assert cache.labels.tolist() == [1, 1, 0, 1] and (tmp_path / "new" / "notes.txt").read_text().endswith("kept")


# ---- text and figures made from user data ---------------------------------------------------------
def test_markdown_cells_show_user_text_and_never_link_or_embed(tmp_path):
    from fasttl.util.outputs import markdown_cell

    cell = markdown_cell("![x](http://evil.example/a.png) [y](javascript:alert) *b* `c` a|b")
    assert "](" not in cell.replace("\\](", "") and "![" not in cell.replace("\\!\\[", "")
    assert cell == ("\\!\\[x\\]\\(http&#58;//evil&#46;example/a&#46;png\\) \\[y\\]\\(javascript&#58;alert\\) "
                    "\\*b\\* \\`c\\` a\\|b")
    # bare addresses GitHub would link, and control characters, are written so they render as text
    for name in ("www.evil.example", "help@evil.example", "https://evil.example/x", "dx\x1b]0;PWNED\x07"):
        cell = markdown_cell(name)
        assert not any(part in cell for part in ("www.", "@", "://", "\x1b", "\x07")), cell
        shown = html.unescape(re.sub(r"\\(.)", r"\1", cell))  # what a Markdown renderer shows
        assert shown == name.replace("\x1b", "\\x1b").replace("\x07", "\\x07")


def test_a_confusion_matrix_of_hundreds_of_classes_stays_a_bounded_figure(tmp_path):
    from PIL import Image

    from fasttl.transfer.report import MAX_FIGURE_INCHES, plot_confusion_matrix

    classes = [f"class-{i}" for i in range(300)]
    rng = np.random.default_rng(zlib.crc32(b"confusion-300"))
    cm = rng.integers(0, 5, (300, 300))
    metrics = {"confusion_matrix": cm.tolist(), "classes": classes, "accuracy": float(np.trace(cm) / cm.sum())}
    plot_confusion_matrix(metrics, str(tmp_path / "cm.png"), "big")
    with Image.open(tmp_path / "cm.png") as image:
        width, height = image.size
    assert max(width, height) <= MAX_FIGURE_INCHES * 150 and min(width, height) > 500
    assert (tmp_path / "cm.png").stat().st_size < 20 << 20


def _checkpoint_edits():
    def drop_model(s):
        del s["model"]

    def wrong_shape(s):
        name = next(n for n, t in s["model"].items() if t.dim() >= 2)
        s["model"][name] = torch.zeros(3, 3)

    def bad_moment(s):
        state = next(iter(s["optimizer"]["state"].values()))
        state["exp_avg"] = torch.zeros(2)

    return {
        "no-model": (drop_model, r"its model state does not load \(KeyError"),
        "wrong-shape": (wrong_shape, r"its model state does not load \(RuntimeError: Error\(s\) in loading"),
        "epoch-text": (lambda s: s.update(epoch="abc"), r"its epoch is 'abc', not one of this run's 1..2"),
        "epoch-huge": (lambda s: s.update(epoch=10 ** 6), r"its epoch is 1000000, not one of this run's 1..2"),
        "history-int": (lambda s: s.update(history=5), r"its history is not one record for each of its 2 epochs"),
        "history-nan": (lambda s: s.update(history=[{"epoch": 1}, {"epoch": 2, "train_loss": float("nan")}]),
                        r"its history record 2 is not that epoch's numbers"),
        "history-text": (lambda s: s.update(history=[{"epoch": "x"}, {"epoch": 2}]), r"its history record 1 is not"),
        "scheduler": (lambda s: s.update(scheduler={"foo": 1}), r"its scheduler state does not load"),
        "moment": (bad_moment, r"its optimizer state does not load \(ValueError: param_groups"),
    }


@pytest.mark.parametrize("edit", list(_checkpoint_edits()))
def test_resuming_from_a_damaged_checkpoint_is_one_line_naming_it(cat_ship, tmp_path, capsys, edit):
    change, message = _checkpoint_edits()[edit]
    out = tmp_path / "run"
    run(**one_epoch_run(cat_ship, out, epochs=2))
    os.remove(out / "metrics.json")  # as a run killed after its last checkpoint
    checkpoint = out / "scratch.checkpoint.pt"
    state = torch.load(checkpoint, weights_only=True)
    change(state)
    torch.save(state, checkpoint)
    code, _, err = cli(capsys, "run", "--data", cat_ship, "--out", out, "--strategy", "scratch", "--epochs", 2,
                       "--image-size", 32, "--compare", "none", "--no-progress", "--resume")
    line = one_line_error(err)
    assert code == 2 and "scratch.checkpoint.pt: " in line and "(a damaged checkpoint); delete it" in line, line
    assert re.search(message, line), line
    assert not (out / "metrics.json").exists()


@pytest.mark.parametrize("classes", [["a", "a"], ["\x1b[31m", "a"], ["a", ""]], ids=["duplicate", "escape", "empty"])
def test_feature_cache_open_takes_only_the_class_names_write_takes(tmp_path, classes):
    cache_dir = tmp_path / "c"
    fasttl.FeatureCache.write(str(cache_dir), [np.ones((4, 3), dtype=np.float32)], [0, 1, 0, 1], classes=["a", "b"])
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    manifest["fingerprint"]["dataset"]["classes"] = classes
    (cache_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CacheError, match=r"manifest.json: fingerprint dataset classes are not distinct, printable"):
        fasttl.FeatureCache.open(str(cache_dir))


def test_file_names_with_escape_sequences_are_shown_escaped(finished, cat_ship, tmp_path, capsys):
    # A file name can't drive the terminal or split a line: not in an error, the skipped list, or the CSV.
    evil = "a\x1b[2J\x07\nb"
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(os.path.join(cat_ship, "test", "cat", "0.jpg"), images / f"{evil}.jpg")
    (images / f"bad{evil}.jpg").write_bytes(b"not a jpeg")
    code, stdout, err = cli(capsys, "predict", "--run", finished, images, "--on-error", "skip", "--no-progress")
    assert code == 0 and stdout.count("\n") == 2 and "a\\x1b[2J\\x07\\nb.jpg" in stdout
    assert "skipped 1 image: " in err and "bad" + "a\\x1b[2J\\x07\\nb.jpg" in err
    for text in (stdout, err):
        assert "\x1b" not in text and "\x07" not in text
    code, stdout, err = cli(capsys, "predict", "--run", finished, str(tmp_path / f"gone{evil}.jpg"))
    line = one_line_error(err)
    # (the one-line error folds the line break into a space, as any whitespace in a message)
    assert code == 2 and "gone" + "a\\x1b[2J\\x07 b.jpg: no such file or folder" in line and "\x1b" not in err


# ---- fourth pass: content changes, splits, outputs beside a run ----------------------------------
def test_an_image_rewritten_at_the_same_size_changes_the_data_identity(cat_ship, tmp_path):
    # A cache or a --resume keyed by (path, size) alone took the old pixels for the new ones.
    data = tmp_path / "data"
    shutil.copytree(cat_ship, data)  # copytree keeps the times: the same identity as the original
    before = fasttl.data.scan_class_folder(str(data / "train")).identity()
    assert before == fasttl.data.scan_class_folder(os.path.join(cat_ship, "train")).identity()
    image = data / "train" / "cat" / "0.jpg"
    flipped = bytearray(image.read_bytes())
    flipped[-10] ^= 0xFF  # other pixels, same size
    stat = image.stat()
    image.write_bytes(bytes(flipped))
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert fasttl.data.scan_class_folder(str(data / "train")).identity() != before


def test_a_csv_list_with_two_label_columns_or_long_rows_is_refused(tmp_path):
    (tmp_path / "two.csv").write_text("path,label,label\na.jpg,cat,ship\n")
    with pytest.raises(DataError, match=r"two.csv has 2 'label' columns in its header line"):
        fasttl.data.formats.open_data(str(tmp_path / "two.csv"))
    (tmp_path / "long.csv").write_text("path,label\na.jpg,cat\nb,c.jpg,ship\n")
    with pytest.raises(DataError, match=r"long.csv line 3 has more fields than its header \(a path or label holding "
                                        r"a comma or tab must be quoted\)"):
        fasttl.data.formats.open_data(str(tmp_path / "long.csv"))


def test_eval_of_a_skip_run_on_a_file_list_scores_the_runs_own_test_split(cifar10_root, tmp_path, capsys):
    # run screens the list before its 80/20 split; eval must split as the run did, or training
    # images move into the test set.
    images = tmp_path / "images"
    images.mkdir()
    rows = ["path,label"]
    for name in ("cat", "ship"):
        for i in range(10):
            shutil.copy(os.path.join(cifar10_root, "train", name, f"{i:04d}.jpg"), images / f"{name}{i}.jpg")
            rows.append(f"images/{name}{i}.jpg,{name}")
    (images / "cat0.jpg").write_bytes((images / "cat0.jpg").read_bytes()[:300])  # unreadable
    (tmp_path / "list.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "run"
    run(**one_epoch_run(tmp_path / "list.csv", out, on_error="skip"))
    with open(out / "predictions.csv", newline="") as f:
        tested = sorted(row["sample"] for row in csv.DictReader(f))
    code, _, err = cli(capsys, "eval", out, "--on-error", "skip", "--no-progress")
    assert code == 0, err
    evaluated = json.loads((out / "eval_metrics.json").read_text())
    assert evaluated["samples"] == len(tested) and evaluated["accuracy"] == json.loads(
        (out / "metrics.json").read_text())["accuracy"]


def test_overwrite_replaces_the_runs_tensorboard_curves_and_links_are_refused(cat_ship, tmp_path, capsys):
    pytest.importorskip("tensorboard", reason="needs the tensorboard package (fasttl[tensorboard])")
    out = tmp_path / "run"
    for lr in (0.01, 0.02):
        run(**one_epoch_run(cat_ship, out, tensorboard=True, overwrite=True, lr=lr))
    events = os.listdir(out / "tensorboard" / "scratch")
    assert len(events) == 1 and events[0].startswith("events.out.tfevents."), events
    # a run of another strategy replacing it leaves none of the scratch curves behind
    run(**one_epoch_run(cat_ship, out, tensorboard=True, overwrite=True, strategy="mlp", epochs=2))
    assert os.listdir(out / "tensorboard" / "scratch") == [] and len(os.listdir(out / "tensorboard" / "mlp")) == 1
    # an outside folder's curves of another run with the same folder name are neither deleted nor mixed in
    logs = tmp_path / "logs"
    run(**one_epoch_run(cat_ship, tmp_path / "a" / "same", tensorboard=str(logs)))
    before = sorted(os.listdir(logs / "same" / "scratch"))
    with pytest.raises(OptionError, match=r"logs/same already holds event files \(scratch/events.out.tfevents"):
        run(**one_epoch_run(cat_ship, tmp_path / "b" / "same", tensorboard=str(logs)))
    assert sorted(os.listdir(logs / "same" / "scratch")) == before and not (tmp_path / "b").exists()
    boards = tmp_path / "boards"
    boards.mkdir()
    os.symlink(tmp_path / "elsewhere", boards / "linked")
    with pytest.raises(OptionError, match=r"boards/linked is a symbolic link or not a folder"):
        run(**one_epoch_run(cat_ship, tmp_path / "linked", tensorboard=str(boards)))
    assert not (tmp_path / "elsewhere").exists() and not (tmp_path / "linked").exists()


def test_names_with_escape_sequences_reach_neither_the_terminal_nor_report_md(cat_ship, tmp_path, capsys):
    data = tmp_path / "d\x1b]0;PWNED\x07\x1b[31mred"
    shutil.copytree(cat_ship, data)
    out = tmp_path / "run\x1b[2J"
    run(print_summary=True, **one_epoch_run(data, out))
    printed = capsys.readouterr()
    report = (out / "report.md").read_text()
    for text in (printed.out, printed.err, report):
        assert "\x1b" not in text and "\x07" not in text
    assert "run\\x1b[2J" in printed.out and "PWNED" in report
    code, stdout, err = cli(capsys, "eval", out, "--no-progress")
    assert code == 0 and "\x1b" not in stdout + err and "\\x1b]0;PWNED" in stdout


@pytest.mark.parametrize("name", ["config.json", "predictions.csv", "sub/new.csv"])
def test_predict_never_writes_into_the_run_it_predicts_with(finished, cat_ship, tmp_path, capsys, name):
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    (run_dir / "sub").mkdir()
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    code, stdout, err = cli(capsys, "predict", "--run", run_dir, os.path.join(cat_ship, "test"), "--out",
                            run_dir / name, "--overwrite", "--no-progress")
    assert code == 2 and stdout == "" and "is in the fasttl run folder" in one_line_error(err)
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


def test_eval_of_a_run_it_cannot_write_into_shows_the_metrics(finished, capsys, monkeypatch):
    import errno

    from fasttl.transfer import evaluate

    def read_only(path, _data):
        raise OSError(errno.EROFS, "Read-only file system", path)

    monkeypatch.setattr(evaluate, "write_json_atomic", read_only)
    code, stdout, err = cli(capsys, "eval", finished, "--no-progress")
    assert code == 0, err
    assert stdout.startswith("accuracy ") and f"not saved ({finished}/eval_metrics.json: read-only file system)" \
        in stdout


# ---- fifth pass: data that changed, runs inside data, settings, lists ----------------------------
def test_eval_refuses_a_carved_split_of_data_that_changed(cifar10_root, tmp_path, capsys):
    flat = tmp_path / "flat"
    for name in ("cat", "ship"):
        (flat / name).mkdir(parents=True)
        for i in range(6):
            shutil.copy2(os.path.join(cifar10_root, "train", name, f"{i:04d}.jpg"), flat / name / f"{i}.jpg")
    out = tmp_path / "run"
    run(**one_epoch_run(flat, out))
    code, stdout, err = cli(capsys, "eval", out, "--no-progress")
    assert code == 0 and ": its seeded 20% test split)" in stdout, err
    shutil.copy2(os.path.join(cifar10_root, "train", "cat", "0010.jpg"), flat / "cat" / "10.jpg")
    code, _, err = cli(capsys, "eval", out, "--no-progress")
    assert code == 2 and f"{flat}: changed since the run" in one_line_error(err) and "--data" in err


def test_a_run_folder_inside_the_data_is_passed_over(cat_ship, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(os.path.join(cat_ship, "train"), data)
    run(**one_epoch_run(data, data / "runA"))
    metrics = run(**one_epoch_run(data, tmp_path / "runB"))
    assert json.loads((tmp_path / "runB" / "config.json").read_text())["classes"] == ["cat", "ship"]
    assert {"path": "runA", "reason": "a fasttl run folder"} in metrics["ignored"]  # (from the data folder on)


def test_a_bad_pixel_budget_variable_is_one_line_naming_it(cat_ship, tmp_path):
    import subprocess
    import sys

    for value in ("abc", "-5", "0"):
        env = dict(os.environ, FASTTL_MAX_IMAGE_PIXELS=value)
        helped = subprocess.run([sys.executable, "-m", "fasttl", "--help"], capture_output=True, text=True, env=env)
        assert helped.returncode == 0, helped.stderr  # read when used, never at import
        image = os.path.join(cat_ship, "test", "cat", "0.jpg")
        result = subprocess.run([sys.executable, "-m", "fasttl", "predict", image],
                                capture_output=True, text=True, env=env, timeout=300)
        line = one_line_error(result.stderr)
        assert result.returncode == 2 and f"FASTTL_MAX_IMAGE_PIXELS: expected a positive number of pixels, got " \
            f"{value!r}" in line


def test_a_huge_file_list_without_line_breaks_is_refused_unread(tmp_path):
    huge = tmp_path / "s.csv"
    with open(huge, "wb") as f:
        f.write(b"path,label\n")
        f.truncate(3 << 30)  # sparse: 3 GB of NULs and no line break
    with pytest.raises(DataError, match=r"s.csv has a line of more than 1,048,576 characters; not a file list"):
        fasttl.data.formats.open_data(str(huge))


def test_resume_on_changed_data_says_what_changed(cat_ship, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(cat_ship, data)
    out = tmp_path / "run"
    run(**one_epoch_run(data, out, epochs=2))
    os.remove(out / "metrics.json")  # as a run stopped after its last checkpoint
    os.utime(data / "train" / "cat" / "0.jpg", ns=(0, 10**18))
    code, _, err = cli(capsys, "run", "--data", data, "--out", out, "--strategy", "scratch", "--epochs", 2,
                       "--image-size", 32, "--compare", "none", "--no-progress", "--resume")
    line = one_line_error(err)
    assert code == 2 and "the data changed since the run started (an image added, removed or rewritten" in line
    assert "data_identity" not in line


def test_class_names_in_another_unicode_form_are_named_as_such(cat_ship, tmp_path):
    import unicodedata

    data = tmp_path / "data"
    for split, form in (("train", "NFC"), ("test", "NFD")):
        shutil.copytree(os.path.join(cat_ship, split, "ship"), data / split / "ship")
        shutil.copytree(os.path.join(cat_ship, split, "cat"), data / split / unicodedata.normalize(form, "café"))
    with pytest.raises(DataError, match=r"the names are the same but written in another Unicode form"):
        fasttl.data.formats.folder.class_folder_splits(str(data))


def test_a_classes_file_class_without_images_is_refused(cat_ship, tmp_path):
    rows = ["path,label"] + [f"{os.path.join(cat_ship, 'train', c, f'{i}.jpg')},{c}" for c in ("cat", "ship")
                             for i in range(3)]
    (tmp_path / "l.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "classes.txt").write_text("cat\nship\nbird\n")
    with pytest.raises(DataError, match=r"class 'bird' of the classes file has no images; drop it"):
        fasttl.data.formats.open_data(str(tmp_path / "l.csv"), str(tmp_path / "classes.txt"))


def test_small_refusals_name_what_is_wrong(finished, tmp_path):
    from fasttl.util.outputs import markdown_cell

    assert markdown_cell("$\\frac{a}{b}$") == "\\$\\\\frac\\{a\\}\\{b\\}\\$"  # no math in report.md
    with pytest.raises(OptionError, match=r"^images: no images given \(a tensor of 0 images\)$"):
        fasttl.load_run(str(finished)).predict(torch.zeros(0, 32, 32, 3, dtype=torch.uint8))
    (tmp_path / "file").write_text("mine")
    with pytest.raises(CacheError, match=r"file: is a file, not a folder; write the cache to a folder$"):
        fasttl.FeatureCache.write(str(tmp_path / "file"), [np.ones((2, 3), dtype=np.float32)], [0, 1],
                                  classes=["a", "b"])
    assert (tmp_path / "file").read_text() == "mine"


# ---- sixth pass ------------------------------------------------------------------------------------
def test_finite_weights_that_make_nan_logits_are_refused_naming_the_run(finished, cat_ship, tmp_path, capsys):
    from safetensors.torch import load_file, save

    from fasttl.transfer.rundir import write_recorded

    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    weights = load_file(str(run_dir / "scratch.safetensors"))
    name = next(k for k in weights if k.endswith("running_var"))
    weights[name] = -torch.ones_like(weights[name])  # finite, but sqrt(var + eps) is NaN
    # recorded as the run's own (a training that ended there), so the logits check is what refuses them
    write_recorded(str(run_dir), "scratch.safetensors", save(weights))
    for words in (["predict", "--run", run_dir, os.path.join(cat_ship, "test")], ["eval", run_dir]):
        code, stdout, err = cli(capsys, *words, "--no-progress")
        line = one_line_error(err)
        assert code == 2 and stdout == "" and f"{run_dir}: the run's weights give non-finite logits" in line


def test_predict_out_must_be_a_csv_file(finished, cat_ship, tmp_path, capsys):
    image = tmp_path / "0000.jpg"  # `--out photos/*.jpg` in a shell makes an input image the --out
    shutil.copy(os.path.join(cat_ship, "test", "cat", "0.jpg"), image)
    before = image.read_bytes()
    code, _, err = cli(capsys, "predict", "--run", finished, os.path.join(cat_ship, "test"), "--out", image,
                       "--overwrite", "--no-progress")
    assert code == 2 and "0000.jpg' does not end in .csv" in one_line_error(err) and image.read_bytes() == before


def test_extract_never_writes_its_cache_among_the_images(cat_ship, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(cat_ship, data)
    before = sorted(str(p) for p in data.rglob("*"))
    for out in (data, data / "train" / "cat", data / "cache"):
        code, _, err = cli(capsys, "extract", "--data", data, "--out", out, "--image-size", 32, "--no-progress")
        assert code == 2 and "is inside the data folder" in one_line_error(err)
    assert sorted(str(p) for p in data.rglob("*")) == before


def test_a_sparse_huge_cache_record_is_refused_unread(tmp_path):
    cache_dir = tmp_path / "c"
    fasttl.FeatureCache.write(str(cache_dir), [np.ones((4, 3), dtype=np.float32)], [0, 1, 0, 1], classes=["a", "b"])
    with open(cache_dir / "manifest.json", "r+b") as f:
        f.truncate(300 << 20)
    with pytest.raises(CacheError, match=r"manifest.json: 314,572,800 bytes, more than fasttl ever writes"):
        fasttl.FeatureCache.open(str(cache_dir))


def test_labels_and_classes_files_that_would_be_guessed_are_refused(tmp_path):
    (tmp_path / "neg.csv").write_text("path,label\na.jpg,0\nb.jpg,-1\nc.jpg,1\n")
    with pytest.raises(DataError, match=r"label '-1' is negative \(-1 often means unlabeled\)"):
        fasttl.data.formats.open_data(str(tmp_path / "neg.csv"))
    (tmp_path / "blank.txt").write_text("cat\n\ndog\nship\n\n")
    with pytest.raises(DataError, match=r"blank.txt line 2 is blank between class names"):
        fasttl.data.labels.read_classes_file(str(tmp_path / "blank.txt"))
    (tmp_path / "twice.txt").write_text("cat\nship\ncat\n")
    with pytest.raises(DataError, match=r"twice.txt names 'cat' twice \(line 1 and line 3\)"):
        fasttl.data.labels.read_classes_file(str(tmp_path / "twice.txt"))
    (tmp_path / "ok.txt").write_text("cat\nship\n\n")  # blank lines at the end are no names
    assert fasttl.data.labels.read_classes_file(str(tmp_path / "ok.txt")) == ["cat", "ship"]


def test_non_finite_logits_of_teacher_views_are_counted_per_image():
    from fasttl.transfer.rundir import finite_logits

    views = torch.zeros(2, 5, 3)  # (views, images, classes), as a teacher's logits per view
    views[1, 2, 0] = float("nan")
    with pytest.raises(RunError, match=r"^R: the run's weights give non-finite logits on 1 of 10 images"):
        finite_logits("R", views)
    assert finite_logits("R", torch.zeros(0, 3)).shape == (0, 3)


def test_weights_for_a_strategy_that_builds_no_backbone_are_refused(cat_ship, tmp_path):
    (tmp_path / "w.pt").write_bytes(b"")
    with pytest.raises(OptionError, match=r"^weights: --weights is read only by --strategy linear or mlp or finetune "
                                          r"or dann; drop it for --strategy scratch$"):
        run(**one_epoch_run(cat_ship, tmp_path / "run", weights=str(tmp_path / "w.pt")))
    assert not (tmp_path / "run").exists()
