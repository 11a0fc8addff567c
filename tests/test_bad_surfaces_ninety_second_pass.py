"""Session 36: the observations of passes 82-91 worth mending, and the ninety-second and later
hostile passes."""
import pytest

from conftest import cli, one_line_error


# ---- observations of earlier passes --------------------------------------------------------------------------------
@pytest.mark.parametrize("device", ["cpu:7", "cpu:1"])
def test_a_cpu_device_with_an_index_is_refused_as_the_likely_typo_it_is(device):
    from fasttl.util.checks import torch_device
    from fasttl.util.errors import OptionError

    with pytest.raises(OptionError, match=rf"^device: {device} asked for, but there is one CPU device; pass cpu "
                                          rf"\(or cuda:{device[-1]} for a GPU\)$"):  # before: accepted
        torch_device(device)
    assert str(torch_device("cpu:0")) == "cpu:0" and str(torch_device("cpu")) == "cpu"  # (torch's own spellings)


def test_extract_names_a_cpu_device_with_an_index(cat_ship, tmp_path, capsys):
    code, _, err = cli(capsys, "extract", "--data", cat_ship, "--out", tmp_path / "cache", "--device", "cpu:7",
                       "--image-size", 32, "--no-progress")
    assert code == 2 and "cpu:7 asked for, but there is one CPU device" in one_line_error(err)
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("asked, said", [
    (["--train-per-class", 9],
     "--train-per-class 9: 2 of 2 classes have fewer train images (used whole: cat 6, ship 6)"),
    (["--test-per-class", 4], "--test-per-class 4: 2 of 2 classes have fewer test images (used whole: cat 3, ship 3)"),
    (["--train-per-class", 5, "--test-per-class", 2], None)])  # (kept: nothing to say)
def test_a_per_class_subset_larger_than_a_class_is_said(cat_ship, tmp_path, capsys, asked, said):
    code, out, err = cli(capsys, "run", "--data", cat_ship, "--out", tmp_path / "run", "--strategy", "scratch",
                         "--epochs", 1, "--image-size", 32, "--compare", "none", "--no-progress", *asked)
    assert code == 0, err
    lines = [line for line in err.splitlines() if "per-class" in line]
    assert lines == ([f"fasttl run: {said}"] if said else []), err  # before: nothing said


@pytest.mark.parametrize("setting, below", [("FASTTL_CACHE_DIR", ""), ("FASTTL_CACHE_DIR", "boards"),
                                            ("FASTTL_STATE_DIR", ""), ("FASTTL_STATE_DIR", "boards")])
def test_tensorboard_event_folders_never_go_among_fasttls_own_files(cat_ship, tmp_path, capsys, monkeypatch, setting,
                                                                    below):
    import os

    kept = tmp_path / "kept"
    kept.mkdir()
    monkeypatch.setenv(setting, str(kept))
    board = kept / below if below else kept
    code, _, err = cli(capsys, "run", "--data", cat_ship, "--out", tmp_path / "run", "--strategy", "scratch",
                       "--epochs", 1, "--image-size", 32, "--compare", "none", "--no-progress", "--tensorboard", board)
    assert code == 2 and one_line_error(err) == (  # before: event folders written among the caches
        f"fasttl: error: tensorboard: {board} is in {setting}={kept}, where fasttl keeps its own files; give "
        "--tensorboard a folder of its own")
    assert os.listdir(kept) == [] and not (tmp_path / "run").exists()


# ---- pass 93 (on a9fb79d: about 123 attempts on data fetch): 3 found -----------------------------------------------
_PAYLOAD = bytes(range(256)) * 4  # 1,024 bytes, each position telling its offset's byte


def _hop_to(source):
    """A server that redirects every request to `source`'s /file."""
    from test_bad_surfaces_seventy_fourth_pass import _raw_server

    return _raw_server(lambda out: out.write(b"HTTP/1.1 302 Found\r\nLocation: " + source.url("/file").encode()
                                             + b"\r\nContent-Length: 0\r\n\r\n"))


@pytest.mark.parametrize("content_range", [b"", b"Content-Range: bytes */1024\r\n"])
def test_a_mismatch_after_a_416_behind_a_redirect_names_where_the_416_came_from(tmp_path, capsys, content_range):
    import hashlib

    from test_bad_surfaces_eighty_second_pass import _fetch_cli
    from test_bad_surfaces_seventy_fourth_pass import _raw_server

    from fasttl.data.fetch import REMOTES, partial_name

    expected = hashlib.sha256(_PAYLOAD).hexdigest()
    partial = tmp_path / partial_name(REMOTES["cifar10"], expected)
    partial.write_bytes(_PAYLOAD[:-1] + b"?")  # all of it, its last byte wrong
    source = _raw_server(lambda out: out.write(b"HTTP/1.1 416 Range Not Satisfiable\r\n" + content_range
                                               + b"Content-Length: 0\r\n\r\n"))
    hop = _hop_to(source)
    try:
        code = _fetch_cli(hop, tmp_path, expected)
    finally:
        source.close()
    # before: "fetch: <--url> gave a file ...", the address that only redirected
    assert code == 2 and one_line_error(capsys.readouterr().err).startswith(
        f"fasttl: error: fetch: {source.url('/file')} (where {hop.url('/x')} redirects) gave a file with SHA-256 ")


def test_a_size_refused_behind_a_redirect_names_the_server_that_announced_it(tmp_path):
    from test_bad_surfaces_seventy_fourth_pass import _raw_server, _refusal

    source = _raw_server(lambda out: out.write(b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999\r\n\r\nxyz"))
    try:
        said = _refusal(_hop_to(source), tmp_path)
    finally:
        source.close()
    assert said.startswith(f"fetch: {source.url('/file')} (where ") and \
        " redirects) announces 99,999,999,999 bytes, more than " in said, said  # before: --url named


@pytest.mark.parametrize("have, content_range, said", [
    (300, b"bytes 300-0/*", "answered a resume from byte 300 with bytes 300 to 0 (HTTP 206), a range that ends before "
                            "it starts: not a valid reply; the partial download is kept (check the address, --url)"),
    (300, b"bytes 300-299/1024", "with bytes 300 to 299 (HTTP 206), a range that ends before it starts"),
    (300, b"bytes 100-0/*", "with bytes 100 to 0 (HTTP 206), a range that ends before it starts"),
    (0, b"bytes 5-0/*", "answered a download with bytes 5 to 0 (HTTP 206), a range that ends before it starts: not a "
                        "valid reply (check the address, --url)")])
def test_a_part_that_ends_before_it_starts_never_cuts_the_partial(tmp_path, have, content_range, said):
    from test_bad_surfaces_seventy_fourth_pass import _raw_server, _refusal

    if have:
        (tmp_path / "partial").write_bytes(_PAYLOAD[:have])
    server = _raw_server(lambda out: out.write(b"HTTP/1.1 206 Partial Content\r\nContent-Range: " + content_range
                                               + b"\r\nContent-Length: 5000\r\n\r\n" + b"z" * 5000))
    refused = _refusal(server, tmp_path)
    # before: "stopped at 1 bytes (its reply held bytes 300 to 0 ...)", the partial cut to 1 byte
    assert refused == f"fetch: {server.url('/x')} {said}" or refused.startswith(f"fetch: {server.url('/x')} ") \
        and said in refused, refused
    assert (tmp_path / "partial").read_bytes() == _PAYLOAD[:have]


# ---- pass 92 (on a9fb79d: about 330 attempts on runs, markers, outputs and the API): 5 found -----------------------
@pytest.fixture(scope="module")
def a_run(cat_ship, tmp_path_factory):
    from conftest import finished_run

    return finished_run(cat_ship, tmp_path_factory, "ninety-second")


def _legacy_save() -> bytes:
    import io

    import torch

    buffer = io.BytesIO()
    torch.save({"epoch": 1, "w": torch.ones(3)}, buffer, _use_new_zipfile_serialization=False)
    return buffer.getvalue()


def test_a_damaged_torch_file_cut_anywhere_is_a_value_error_naming_it(tmp_path):
    from fasttl.util.torch_files import load_tensors

    whole, path = _legacy_save(), tmp_path / "w.pt"
    said = set()
    for length in range(1, len(whole)):
        path.write_bytes(whole[:length])
        with pytest.raises(ValueError) as caught:
            load_tensors(str(path))  # before: IndexError (from 1 byte), struct.error (from 18 bytes)
        said.add(str(caught.value).split(" (", 1)[0])
    # (a file cut inside a name it loads reads as a request for another object: refused as one, and named)
    assert said == {"not a torch.save file", "it holds Python objects other than tensors"}, said
    path.write_bytes(whole)
    assert load_tensors(str(path))["epoch"] == 1


@pytest.mark.parametrize("damage", [b"\x80", b"\x80\x02h\xff.", "cut"])
def test_resuming_from_a_damaged_checkpoint_is_one_line_naming_it(a_run, cat_ship, tmp_path, capsys, damage):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(a_run, out)
    (out / "metrics.json").unlink()
    (out / "scratch.checkpoint.pt").write_bytes(_legacy_save()[:40] if damage == "cut" else damage)
    code, _, err = cli(capsys, "run", "--data", cat_ship, "--out", out, "--strategy", "scratch", "--epochs", 1,
                       "--image-size", 32, "--compare", "none", "--no-progress", "--resume")
    # before: a traceback ending in IndexError / KeyError / struct.error, exit 1
    assert code == 2 and one_line_error(err).startswith(
        f"fasttl: error: {out / 'scratch.checkpoint.pt'}: not a fasttl checkpoint: not a torch.save file ("), err
    assert err.rstrip().endswith("; delete it, or run again with --overwrite")


@pytest.mark.parametrize("kind", ["fifo", "device", "folder"])
def test_a_weights_file_that_is_no_regular_file_is_said_to_be_none(tmp_path, kind):
    import os

    from fasttl.util.torch_files import load_tensors

    path = {"fifo": tmp_path / "w.pt", "device": "/dev/zero", "folder": tmp_path}[kind]
    if kind == "fifo":
        os.mkfifo(path)
    with pytest.raises(ValueError, match=r"^not a torch\.save file \(not a regular file: a folder, a pipe or a "
                                         r"device\?\)$"):  # before: a pipe was "an empty file"
        load_tensors(str(path))


def test_predict_with_standard_output_closed_ends_without_a_traceback(a_run, cat_ship):
    import os
    import subprocess
    import sys

    image = next((cat_ship / "test" / "cat").iterdir())
    result = subprocess.run([sys.executable, "-m", "fasttl", "predict", "--run", str(a_run), str(image)],
                            stdout=None, stderr=subprocess.PIPE, text=True, timeout=300,
                            preexec_fn=lambda: os.close(1))  # `fasttl predict ... >&-`
    # before: "AttributeError: 'NoneType' object has no attribute 'write'", exit 1
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr


@pytest.mark.parametrize("values", [{0.485, 0.456, 0.406}, frozenset({0.485, 0.456, 0.406})])
def test_a_transform_spec_refuses_channel_values_given_in_no_order(values):
    from fasttl.data import TransformSpec

    with pytest.raises(ValueError, match=rf"^mean: expected 3 numbers in channel order \(R, G, B\), got a "
                                         rf"{type(values).__name__}, which has no order; pass a tuple or a list$"):
        TransformSpec(32, values, (0.2, 0.2, 0.2))  # before: accepted, G and B swapped by the values' hashes


@pytest.mark.parametrize("marker, said", [(None, "it holds no .fasttl-run"),
                                          ("link", "its .fasttl-run is a symbolic link"),
                                          ("folder", "its .fasttl-run is a folder"),
                                          ("text", "its .fasttl-run is not fasttl's record")])
@pytest.mark.parametrize("command", ["eval", "predict", "export"])
def test_a_users_folder_with_a_config_json_is_said_to_be_no_run_folder(a_run, cat_ship, tmp_path, capsys, marker,
                                                                       said, command):
    import json
    import os

    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"strategy": "mine", "classes": ["a", "b"]}))  # a user's own
    if marker == "link":
        os.symlink(a_run / ".fasttl-run", folder / ".fasttl-run")
    elif marker == "folder":
        (folder / ".fasttl-run").mkdir()
    elif marker == "text":
        (folder / ".fasttl-run").write_text("mine\n")
    words = {"eval": ["eval", folder, "--data", cat_ship], "export": ["export", folder, "--out", tmp_path / "m.onnx"],
             "predict": ["predict", "--run", folder, next((cat_ship / "test" / "cat").iterdir())]}[command]
    code, _, err = cli(capsys, *words)
    # before: "config.json: not a fasttl run configuration (train the run again: fasttl run ... --overwrite)", or
    # "changed after fasttl wrote it"; advice that `run --overwrite` then refused for a folder of a user's files
    assert code == 2 and one_line_error(err) == (
        f"fasttl: error: {folder}: not a fasttl run folder ({said}; fasttl marks each run folder it writes with a "
        ".fasttl-run record); give a fasttl run's --out folder")
    assert sorted(os.listdir(folder)) == [".fasttl-run", "config.json"][marker is None:]


def test_a_missing_record_of_training_images_is_said_missing(a_run, cat_ship, tmp_path, capsys):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(a_run, run_dir)
    (run_dir / "trained-images.bin").unlink()
    code, _, err = cli(capsys, "eval", run_dir, "--data", cat_ship / "test", "--no-progress")
    assert code == 2 and one_line_error(err) == (  # before: "damaged or changed since the run wrote it"
        f"fasttl: error: {run_dir}/trained-images.bin: missing (the record of the run's training images, which its "
        "marker lists); put it back, or train the run again with --overwrite")


def test_an_error_with_standard_error_closed_still_exits_with_its_code(tmp_path):
    import os
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "fasttl", "eval", str(tmp_path / "none"), "--data", "nope"],
                            stdout=subprocess.PIPE, stderr=None, text=True, timeout=300,
                            preexec_fn=lambda: os.close(2))  # `fasttl eval ... 2>&-`
    assert (result.returncode, result.stdout) == (2, "")  # before: exit 1 (the error's print raised)


# ---- pass 94 (on cb7c601: about 250 attempts on runs, markers, outputs and the API): 2 found -----------------------
@pytest.mark.parametrize("kind", [set, frozenset])
def test_a_feature_cache_refuses_class_names_given_in_no_order(tmp_path, kind):
    import numpy as np

    from fasttl.cache import FeatureCache

    with pytest.raises(TypeError, match=r"^classes: a set has no order, and the order numbers the labels; give a "
                                        r"list$"):  # before: stored in hash order, another each process
        FeatureCache.write(str(tmp_path / "c"), [np.ones((3, 4), np.float32)], [0, 1, 2],
                           classes=kind({"cat", "dog", "ship"}))
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("setting", ["FASTTL_CACHE_DIR", "FASTTL_STATE_DIR"])
def test_a_run_folder_never_goes_among_fasttls_own_files(cat_ship, tmp_path, capsys, monkeypatch, setting):
    import os

    kept = tmp_path / "kept"
    kept.mkdir()
    monkeypatch.setenv(setting, str(kept))
    code, _, err = cli(capsys, "run", "--data", cat_ship, "--out", kept / "myrun", "--strategy", "scratch",
                       "--epochs", 1, "--image-size", 32, "--compare", "none", "--no-progress")
    assert code == 2 and one_line_error(err) == (  # before: the run folder made among the caches
        f"fasttl: error: out: {kept / 'myrun'} is in {setting}={kept}, where fasttl keeps its own files; give "
        "--out a folder of its own")
    assert os.listdir(kept) == []


# ---- pass 95 (on cb7c601: about 106 attempts on data fetch): 1 found -----------------------------------------------
def test_a_redirects_body_is_never_read_however_large(tmp_path):
    from test_bad_surfaces_seventy_fourth_pass import _fetched, _raw_server

    source = _raw_server(lambda out: out.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(_PAYLOAD)
                                               + _PAYLOAD))
    sent = []

    def endless_redirect(out):  # a body of 256 MiB, written until the client hangs up
        out.write(b"HTTP/1.1 302 Found\r\nLocation: " + source.url("/file").encode() + b"\r\n"
                  b"Content-Length: %d\r\n\r\n" % (256 << 20))
        block = bytes(1 << 20)
        for _ in range(256):
            out.write(block)
            sent.append(len(block))

    hop = _raw_server(endless_redirect)
    try:
        # before: urllib read the redirect's whole body into memory (2.3 times its size) before following it
        assert _fetched(hop, tmp_path, deadline_s=60) == _PAYLOAD
    finally:
        source.close()
    assert sum(sent) < 64 << 20, sum(sent)  # (what socket buffers took before the client closed it)


# ---- pass 97 (on 6f69125: about 115 attempts on data fetch): 3 found -----------------------------------------------
@pytest.mark.parametrize("port, why", [("99999999999999999999", "Port out of range 0-65535"),
                                       ("\u0668\u0669\u0665\u0666", "Port could not be cast to integer value as")])
def test_a_redirect_to_a_port_that_is_no_port_is_named(tmp_path, port, why):
    from test_bad_surfaces_seventy_fourth_pass import _raw_server, _refusal

    location = f"http://127.0.0.1:{port}/file"
    hop = _raw_server(lambda out: out.write(b"HTTP/1.1 302 Found\r\nLocation: " + location.encode() +
                                            b"\r\nContent-Length: 0\r\n\r\n"))
    said = _refusal(hop, tmp_path)
    # before: a raw OverflowError traceback (20 digits), "cannot reach <--url> (ValueError: ...)" (other digits)
    assert said.startswith(f"fetch: {hop.url('/x')} redirects to ") and f"which is no valid address ({why}" in said \
        and said.endswith("; refused (check the address, --url)"), said


@pytest.mark.parametrize("status", [b"200 OK", b"206 Partial Content"])
def test_a_reply_refused_for_its_size_leaves_the_partial_as_it_was(tmp_path, status):
    from test_bad_surfaces_seventy_fourth_pass import _raw_server, _refusal

    (tmp_path / "partial").write_bytes(_PAYLOAD[:100])
    server = _raw_server(lambda out: out.write(b"HTTP/1.1 " + status + b"\r\nContent-Range: bytes 64-99999999999/*\r\n"
                                               b"Content-Length: 99999999999\r\n\r\nxyz"))
    said = _refusal(server, tmp_path)
    assert said.startswith(f"fetch: {server.url('/x')} announces ") and ", more than 4,294,967,296; refused" in said
    assert (tmp_path / "partial").read_bytes() == _PAYLOAD[:100]  # before: a 200 emptied it first (then removed)


# ---- pass 96 (on 6f69125: about 200 attempts on runs, eval, settings and the API): 1 found -------------------------
@pytest.mark.parametrize("setting", ["FASTTL_CACHE_DIR", "FASTTL_STATE_DIR"])
def test_eval_on_other_data_never_writes_among_the_runs_own_images(a_run, cat_ship, tmp_path, capsys, monkeypatch,
                                                                   setting):
    import os
    import shutil

    other = tmp_path / "other"
    shutil.copytree(cat_ship / "test", other / "test")  # images the run never trained on
    inside = cat_ship / "train" / "cat" / "kept-here"  # the run's own data, read against --data
    monkeypatch.setenv(setting, str(inside))
    code, _, err = cli(capsys, "eval", a_run, "--data", other, "--no-progress")
    # before: exit 0, the cache (or verified/) folder written among the run's training images, where the next scan
    # of that data refused it as a class folder without images
    assert code == 2 and one_line_error(err).startswith("fasttl: error: data: the ") and \
        f"{setting}={inside} is inside the data folder {os.path.realpath(cat_ship)}, where it would be written " \
        "among the images" in err, err
    assert not inside.exists()
