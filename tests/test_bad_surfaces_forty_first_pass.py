"""The forty-first hostile pass (the gather's index checks, the budget planner's speed record,
environment variables, a rank that can't join): a 5,000-digit FASTTL_MAX_IMAGE_PIXELS, RANK,
WORLD_SIZE or MASTER_PORT passed the digits check and then crashed int() (Python refuses more
than 4,300 digits, with advice for programmers); so would a server's Content-Length of '²' or as
many digits; a rank waiting for a store nobody serves ignored SIGTERM and Ctrl-C for torch's
30-minute retry, while its notice said "Ctrl-C stops"; FeatureCache.gather gave a raw traceback
for meta indices, and 2-D indices "expected (4,)" on one shard but a TypeError on several."""
import os
import signal
import socket
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest
import torch

from fasttl import FeatureCache
from fasttl.util.checks import MOST_DECIMAL_DIGITS, decimal
from fasttl.util.errors import DataError, OptionError

HUGE = "9" * 5000


@pytest.mark.parametrize("text,value", [("0", 0), ("17", 17),
                                        ("9" * MOST_DECIMAL_DIGITS, 10 ** MOST_DECIMAL_DIGITS - 1),
                                        ("9" * (MOST_DECIMAL_DIGITS + 1), None), (HUGE, None), ("\u00b2", None),
                                        ("\u0663", None), ("", None), (" 1", None), ("+1", None), ("1_0", None),
                                        ("-1", None), (None, None), (12, None)])
def test_decimal_reads_only_short_ascii_digits(text, value):
    assert decimal(text) == value


def test_a_huge_pixel_budget_is_one_line_naming_the_variable(monkeypatch):
    from fasttl.data import images

    monkeypatch.setenv("FASTTL_MAX_IMAGE_PIXELS", HUGE)
    with pytest.raises(DataError, match=r"^FASTTL_MAX_IMAGE_PIXELS: expected a positive number of pixels") as error:
        images.max_image_pixels()
    message = str(error.value)
    assert "\n" not in message and len(message) < 300 and "5,000 characters" in message
    assert "set_int_max_str_digits" not in message


@pytest.mark.parametrize("env,culprit", [
    ({"RANK": HUGE}, "RANK="),
    ({"WORLD_SIZE": HUGE}, "WORLD_SIZE: expected a number of processes"),
    ({"WORLD_SIZE": "2", "RANK": HUGE, "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"},
     "RANK: expected a number"),
    ({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": HUGE, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"},
     "LOCAL_RANK: expected a number"),
    ({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": HUGE},
     "MASTER_PORT: expected a port number")])
def test_huge_torchrun_variables_are_one_line_naming_them(monkeypatch, env, culprit):
    from fasttl.util import distributed

    for name in ("WORLD_SIZE", *distributed.TORCHRUN_VARIABLES):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(OptionError) as error:
        distributed.launched_by_torchrun()
    message = str(error.value)
    assert message.startswith(culprit) and "\n" not in message and len(message) < 400


def test_predict_with_a_huge_pixel_budget_says_so_in_one_line(cat_ship, tmp_path):
    from conftest import one_line_error

    env = dict(os.environ, FASTTL_MAX_IMAGE_PIXELS=HUGE, FASTTL_CACHE_DIR=str(tmp_path / "cache"))
    image = os.path.join(cat_ship, "test", "cat", "0.jpg")
    result = subprocess.run([sys.executable, "-m", "fasttl", "predict", image], capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 2
    assert "FASTTL_MAX_IMAGE_PIXELS: expected a positive number of pixels" in one_line_error(result.stderr)


def _serve_once(length: str, body: bytes) -> socket.socket:
    import threading

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(2)

    def serve():
        conn, _ = listener.accept()
        with conn:
            conn.recv(4096)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: " + length.encode() + b"\r\nConnection: close\r\n\r\n"
                         + body)

    threading.Thread(target=serve, daemon=True).start()
    return listener


def test_a_content_length_that_is_no_number_is_an_unknown_size(tmp_path):
    # http.client itself treats a Content-Length it can't read as absent: so does the download, which reads to the end.
    from fasttl.data.fetch import download

    body = b"payload bytes " * 10
    listener = _serve_once("\u00b2", body)
    try:
        size = download(f"http://127.0.0.1:{listener.getsockname()[1]}/x.bin", str(tmp_path / "x.bin"),
                        progress=False)
    finally:
        listener.close()
    assert size == len(body) and (tmp_path / "x.bin").read_bytes() == body


@pytest.mark.parametrize("length", ["9" * 19, HUGE])
def test_a_content_length_of_more_digits_than_any_limit_is_refused(tmp_path, length):
    from fasttl.data.fetch import DownloadError, download

    listener = _serve_once(length, b"short")
    try:
        with pytest.raises(DownloadError, match=r"announces '9+'(\.\.\. \([\d,]+ characters\))? bytes, more than") \
                as error:
            download(f"http://127.0.0.1:{listener.getsockname()[1]}/x.bin", str(tmp_path / "x.bin"), progress=False)
    finally:
        listener.close()
    assert "\n" not in str(error.value)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


JOIN = """
import sys
from fasttl.util import distributed, signals
with signals.ending_signals_raised():
    print("joining", flush=True)
    distributed.join("cpu")
print("joined", flush=True)
"""


@pytest.mark.parametrize("sent", [signal.SIGTERM, signal.SIGINT])
def test_a_rank_waiting_for_an_absent_store_ends_on_a_signal(sent):
    env = dict(os.environ, WORLD_SIZE="2", RANK="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(_free_port()))
    process = subprocess.Popen([sys.executable, "-c", JOIN], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env=env, text=True)
    try:
        assert process.stdout.readline().strip() == "joining"
        time.sleep(2.0)  # into torch's store connection loop
        process.send_signal(sent)
        process.wait(timeout=30)  # before: SIGKILL alone ended it (torch retries for 30 minutes)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode in (-sent, 128 + sent, 1), process.stderr.read()[-500:]


def _caches(request, tmp_path):
    generator = np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))
    features = generator.standard_normal((40, 6)).astype(np.float32)
    labels = generator.integers(0, 2, 40)
    one = FeatureCache.write(str(tmp_path / "one"), [features], labels, classes=["a", "b"])
    sharded = FeatureCache.write(str(tmp_path / "sharded"), [features], labels, classes=["a", "b"], shard_rows=8)
    assert len(sharded._shards) == 5 and len(one._shards) == 1
    return one, sharded


@pytest.mark.parametrize("indices,error,message", [
    (lambda: torch.tensor([[1, 2], [3, 4]]), ValueError, r"^indices: has shape \(2, 2\) \(expected a 1-D tensor"),
    (lambda: torch.tensor(3), ValueError, r"^indices: has shape \(\) \(expected a 1-D tensor"),
    (lambda: torch.empty(3, dtype=torch.int64, device="meta"), ValueError, r"^indices: is on meta"),
    (lambda: torch.tensor([1.0, 2.0]), TypeError, r"^indices: got torch.float32")])
def test_bad_indices_get_one_message_however_the_cache_is_stored(request, tmp_path, indices, error, message):
    for cache in _caches(request, tmp_path):
        with pytest.raises(error, match=message):
            cache.gather(indices())


def test_good_indices_still_gather_the_rows_on_both_layouts(request, tmp_path):
    one, sharded = _caches(request, tmp_path)
    rows = torch.tensor([39, 0, 8, 8, 17], dtype=torch.int32)
    expected = one.all_features()[rows.long()]
    assert torch.equal(one.gather(rows), expected) and torch.equal(sharded.gather(rows), expected)
    assert one.gather(torch.tensor([], dtype=torch.int64)).shape == (0, 6)
