"""The sixty-sixth hostile pass (about 120 attempts on 226c4cd) found 4: a server sending past the
4 GiB cap left a partial download no file could grow out of; an address with characters outside
ASCII failed as "cannot reach ... check the network"; a run of the same command in another folder
resumed into the first run's TensorBoard curves (the board recorded a hash of the settings);
predict refused paths in a numpy object array. And session 32's last read: a count given as a numpy 0-d
float array was cut to an integer (FeatureCache.loader(batch_size=np.array(3.7)) gave batches of
3), where a numpy scalar float was refused; predict --out, export --out and bench --json wrote
into a feature cache folder, which fasttl extract then refused as holding files not its own; a
full-width twin of a class name was taken."""
import os

import numpy as np
import pytest

import fasttl
from conftest import LoopbackServer


@pytest.fixture
def small_cache(tmp_path):
    rows = np.arange(20, dtype=np.float32).reshape(5, 4)
    return fasttl.FeatureCache.write(str(tmp_path / "c"), [rows], [0, 1, 0, 1, 0], classes=["a", "b"], dtype="fp32")


# ---- last read: numpy numbers are taken as Python's, never truncated ---------------------------------------------
@pytest.mark.parametrize("given", [np.array(3.7), np.float32(2.5), np.bool_(True), np.array([3])],
                         ids=["0d-float-array", "float32", "bool_", "1d-array"])
def test_a_count_that_is_no_integer_is_refused_not_cut(small_cache, given):
    # before: np.array(3.7) became 3 (int() of a 0-d array), batches of 3 rows
    with pytest.raises(ValueError, match=r"^batch_size: expected a positive integer, got "):
        small_cache.loader(batch_size=given, shuffle=False)


@pytest.mark.parametrize("given", [np.array(2), np.int64(2), np.uint8(2)], ids=["0d-int-array", "int64", "uint8"])
def test_a_numpy_integer_count_is_taken(small_cache, given):
    sizes = [len(labels) for _, labels in small_cache.loader(batch_size=given, shuffle=False)]
    assert sizes == [2, 2, 1]


# ---- last read: predict, export and bench write no file into a feature cache folder -------------------------------
@pytest.fixture(scope="module")
def scratch_run(cat_ship, tmp_path_factory):
    from conftest import finished_run

    return finished_run(cat_ship, tmp_path_factory, "scratch66")


@pytest.mark.parametrize("command", ["predict", "export", "bench"])
def test_no_output_file_goes_into_a_feature_cache_folder(small_cache, scratch_run, cat_ship, capsys, command):
    import os

    from conftest import cli, one_line_error

    folder = small_cache.directory
    before = sorted(os.listdir(folder))
    target, words = {
        "predict": ("p.csv", ["predict", "--run", scratch_run, cat_ship / "test", "--no-progress", "--out"]),
        "export": ("m.onnx", ["export", scratch_run, "--out"]),
        "bench": ("b.json", ["bench", "adam", "--quick", "--json"]),
    }[command]
    option = "json" if command == "bench" else "out"
    code, _, err = cli(capsys, *words, os.path.join(folder, target))
    # before: the file was written there, and fasttl extract then refused its own cache as holding files not its own
    proof = next(name for name in before if name.startswith("features-"))
    assert code == 2 and one_line_error(err) == (
        f"fasttl: error: {option}: {os.path.join(folder, target)} is in the feature cache folder {folder} (it holds "
        f"{proof}), which only fasttl extract writes into; give --{option} a file outside it")
    assert sorted(os.listdir(folder)) == before


# ---- last read: a full-width twin of a class name is refused as a Cyrillic one is ---------------------------------
@pytest.mark.parametrize("twin", ["\uff43\uff41\uff54", "c\uff41t"], ids=["all-full-width", "one-full-width"])
def test_a_full_width_twin_of_a_name_is_refused(tmp_path, twin):
    from fasttl.data.labels import refuse_lookalikes
    from fasttl.util.errors import DataError

    # before: "cat" and "ｃａｔ" were two classes, told apart in no report
    with pytest.raises(DataError, match=r"^classes: 'cat' and .* differ only in letters drawn alike \(a Cyrillic, "
                                        r"Greek or full-width letter for a Latin one\)"):
        refuse_lookalikes(["cat", "dog", twin], "classes:")
    refuse_lookalikes(["dog", twin], "classes:")  # a name wholly its own is a name


# ---- F4: paths in a numpy object array (pandas' df["path"].values) are paths ------------------------------------
def test_predict_takes_paths_in_an_object_array(scratch_run, cat_ship):
    import pathlib

    import torch

    model = fasttl.load_run(scratch_run)
    images = sorted(str(p) for p in (cat_ship / "test").rglob("*.jpg"))
    names, probabilities = model.predict(images)
    # before: "images: expected uint8 pixels (0..255), got object; for float images in [0, 1] call .model on them"
    for given in (np.array(images, dtype=object), np.array([pathlib.Path(p) for p in images], dtype=object)):
        again, same = model.predict(given)
        assert again == names and torch.equal(same, probabilities)


# ---- F1 and F2: data fetch from a server that never stops, and an address with characters outside ASCII ---------
class _Endless(LoopbackServer):
    """A loopback server answering 200 with no Content-Length: endless zeros at /endless, `body` at any
    other path. Records each request's path as sent."""

    def __init__(self, body: bytes):
        import http.server

        self.paths = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"  # the body ends when the connection does

            def log_message(self, *args):
                pass

            def do_GET(self):
                outer.paths.append(self.path)
                self.send_response(200)
                self.end_headers()
                try:
                    if self.path != "/endless":
                        self.wfile.write(body)
                        return
                    while True:
                        self.wfile.write(bytes(1 << 16))
                except OSError:  # the client stopped reading
                    pass

        super().__init__(Handler)


@pytest.fixture
def endless():
    server = _Endless(b"a small stand-in, not an archive")
    yield server
    server.close()


def _fetch(capsys, url, sha256="0" * 64):
    from fasttl.cli import main

    code = main(["data", "fetch", "cifar10", "--no-progress", "--url", url, "--sha256", sha256])
    return code, capsys.readouterr().err


def test_a_server_sending_past_the_cap_leaves_no_partial_download(endless, tmp_path, capsys, monkeypatch):
    from fasttl.data import fetch

    from conftest import one_line_error

    monkeypatch.setattr(fetch, "MAX_DOWNLOAD_BYTES", 1 << 20)
    monkeypatch.setenv("FASTTL_DATA", str(tmp_path / "data"))
    (tmp_path / "data").mkdir()
    code, err = _fetch(capsys, endless.url("/endless"))
    # before: a hidden .fasttl-tmp-download-* of the cap's size (4 GiB) stayed, never to become a file fetch takes
    assert code == 2 and one_line_error(err) == f"fasttl: error: fetch: {endless.url('/endless')} sent more than " \
        "1,048,576 bytes; stopped, and what it sent removed (check the address, --url)"
    assert os.listdir(tmp_path / "data") == []


def test_an_address_outside_ascii_is_sent_percent_encoded(endless, tmp_path, capsys, monkeypatch):
    import hashlib

    monkeypatch.setenv("FASTTL_DATA", str(tmp_path / "data"))
    body = b"a small stand-in, not an archive"
    url = endless.url("/donn\u00e9es/cifar.tar.gz?v=\u00e9&x=%41")
    code, err = _fetch(capsys, url, hashlib.sha256(body).hexdigest())
    # before: "cannot reach ... (ordinal not in range(128)); check the network or the address (--url)"
    assert endless.paths == ["/donn%C3%A9es/cifar.tar.gz?v=%C3%A9&x=%41"]
    assert code == 2 and f"error: {url}: not a readable archive" in err, err  # fetched and verified: the body is none


# ---- F3: a --resume adds curves only to its own run's board, not to a run's with the same settings -----------------
def test_resume_tells_its_board_from_a_run_with_the_same_settings(cat_ship, tmp_path):
    pytest.importorskip("tensorboard", reason="needs the tensorboard package (fasttl[tensorboard])")
    from conftest import one_epoch_run
    from fasttl.transfer.job import run
    from fasttl.transfer.rundir import read_config
    from fasttl.util.errors import OptionError

    boards = tmp_path / "boards"
    first, second = tmp_path / "a" / "run", tmp_path / "b" / "run"  # one folder name, one command
    run(**one_epoch_run(cat_ship, first, tensorboard=str(boards)))
    run(**one_epoch_run(cat_ship, second))
    os.remove(second / "metrics.json")  # as a run stopped after its checkpoint: resumable
    assert read_config(str(first))["run_key"] == read_config(str(second))["run_key"]
    before = sorted(p.name for p in (boards / "run" / "scratch").iterdir())
    # before: the board recorded the run_key (a hash of the settings), the second run's too: its curves went in
    with pytest.raises(OptionError, match=rf"^tensorboard: {boards / 'run'} already holds event files"):
        run(**one_epoch_run(cat_ship, second, tensorboard=str(boards), resume=True))
    assert sorted(p.name for p in (boards / "run" / "scratch").iterdir()) == before
    token = read_config(str(first))["run_token"]
    os.remove(first / "metrics.json")
    run(**one_epoch_run(cat_ship, first, tensorboard=str(boards), resume=True))  # its own run resumes into it
    assert read_config(str(first))["run_token"] == token  # kept on --resume
