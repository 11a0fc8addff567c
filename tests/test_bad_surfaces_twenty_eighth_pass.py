"""The twenty-eighth hostile pass (pass 27's fixes, the loader's thread count, the epoch order,
`bench cache --scale`; 21 attempts): the scale bench stopped by SIGTERM left its competing process
running forever and its cache under /tmp; outside a source checkout it ran every probe, then failed
(a script of the checkout, run from a file outside the package); `--json ""` ran the whole bench
and wrote nothing; two threads iterating one loader could get the same epoch's order; NumPy
integers refused as a loader's batch size and thread count."""
import os
import signal
import subprocess
import sys
import threading
import time
import zlib

import numpy as np
import pytest
import torch

from conftest import cli, one_line_error
from test_bad_surfaces_twenty_ninth_pass import default_signals_in_child
from fasttl import FeatureCache
from fasttl.cache.order import epoch_order


def _competitors_of(pid: int):
    """The pids of processes whose command line names `pid` as the parent they watch."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if f"parent = {pid};".encode() in f.read():
                        found.append(int(entry))
            except OSError:
                continue
    return found


def _scale_dirs():
    return {n for n in os.listdir("/tmp") if n.startswith(("fasttl-scale-", "fasttl-wds-"))}


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGHUP, signal.SIGKILL], ids=["SIGTERM", "SIGHUP", "SIGKILL"])
def test_the_scale_bench_stopped_leaves_no_process_running(cifar10_root, how):
    """SIGTERM ends it through its cleanup (no process, no cache left); SIGKILL can't be caught,
    and the competitor stops by itself once its parent is gone."""
    before = _scale_dirs()
    bench = subprocess.Popen([sys.executable, "-m", "fasttl", "bench", "cache", "--scale", "--quick"],
                             env=dict(os.environ, FASTTL_BENCH_DATA=cifar10_root), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, preexec_fn=default_signals_in_child)  # not nohup's SIGHUP
    try:
        deadline = time.monotonic() + 300
        while not _competitors_of(bench.pid) and bench.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        competitors = _competitors_of(bench.pid)
        assert competitors, f"no competitor started (exit {bench.poll()})"
        bench.send_signal(how)
        assert bench.wait(timeout=120) == (-how if how == signal.SIGKILL else 128 + how)
        deadline = time.monotonic() + 30
        while any(os.path.exists(f"/proc/{pid}") and _competitors_of(bench.pid) for pid in competitors) and \
                time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _competitors_of(bench.pid)
        if how != signal.SIGKILL:  # SIGTERM, SIGHUP (the twenty-ninth pass): out through the cleanup
            assert _scale_dirs() == before
    finally:
        if bench.poll() is None:
            bench.kill()
        for pid in _competitors_of(bench.pid):
            os.kill(pid, signal.SIGKILL)
        for name in _scale_dirs() - before:
            subprocess.run(["rm", "-rf", os.path.join("/tmp", name)])


def test_the_scale_bench_says_its_data_is_missing_before_any_probe(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FASTTL_BENCH_DATA", str(tmp_path / "nowhere"))
    before, started = _scale_dirs(), time.monotonic()
    code, _, err = cli(capsys, "bench", "cache", "--scale", "--quick")
    assert code == 2 and "does not exist" in one_line_error(err) and "FASTTL_BENCH_DATA" in err
    assert _scale_dirs() == before and time.monotonic() - started < 30


def test_webdataset_shards_are_written_by_the_package(small_image_folder, tmp_path):
    """The scale bench wrote its shards by running benchmarks/make_webdataset.py from beside the
    package (absent from an install); the writer is fasttl's own now, and reads back as written."""
    from fasttl.data import scan_class_folder
    from fasttl.data.formats.webdataset import read_webdataset, write_webdataset

    folders = scan_class_folder(str(small_image_folder))
    paths = write_webdataset(folders, str(tmp_path / "wds"), per_shard=4)
    assert len(paths) == -(-len(folders) // 4)
    assert (tmp_path / "wds" / "classes.txt").read_text().split() == list(folders.classes)
    shards = read_webdataset(str(tmp_path / "wds" / f"train-{{000000..{len(paths) - 1:06d}}}.tar"), folders.classes)
    assert list(shards.labels) == list(folders.labels)
    for i in range(len(folders)):
        with open(folders.files[i], "rb") as f:
            assert shards.read(i) == f.read()


@pytest.mark.parametrize("option", ["--json", "--plot"])
@pytest.mark.parametrize("path", ["", " "])
def test_an_empty_output_path_is_refused_before_the_bench(capsys, option, path):
    try:
        code, _, err = cli(capsys, "bench", "adam", "--quick", option, path)
    except SystemExit as stopped:  # "" is refused while the arguments are read, " " by bench
        code, err = stopped.code, capsys.readouterr().err
    assert code == 2 and one_line_error(err).startswith(f"fasttl: error: {option[2:]}: an empty")


def test_two_threads_iterating_one_loader_get_an_epoch_each(request, tmp_path):
    rows, batch = 257, 16
    cache = FeatureCache.write(str(tmp_path / "c"), [torch.randn(rows, 3)], torch.zeros(rows, dtype=torch.long),
                               classes=["a"], dtype="fp32")
    seed = zlib.crc32(request.node.nodeid.encode()) % 1000
    for trial in range(20):
        loader = cache.loader(batch, shuffle=True, seed=seed)
        start, orders = threading.Barrier(2), []

        def first_batch():
            start.wait()
            features, _ = next(iter(loader))
            orders.append(tuple(features[:, 0].tolist()))

        threads = [threading.Thread(target=first_batch) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        want = {tuple(cache.gather(epoch_order(rows, batch, "rows", seed, epoch)[:batch])[:, 0].tolist())
                for epoch in (0, 1)}
        assert set(orders) == want and loader.epoch == 2


def test_numpy_integers_are_a_loaders_batch_size_and_thread_count(tmp_path):
    cache = FeatureCache.write(str(tmp_path / "c"), [torch.randn(50, 3)], torch.zeros(50, dtype=torch.long),
                               classes=["a"], dtype="fp16")
    want = [x for x, _ in cache.loader(8, seed=1, threads=2)]
    got = [x for x, _ in cache.loader(np.int64(8), seed=1, threads=np.int32(2))]
    assert len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, want))
    for bad in (np.int64(0), np.float64(8.0), np.bool_(True)):
        with pytest.raises((TypeError, ValueError), match=r"^batch_size: "):
            cache.loader(bad)


def test_ctrl_c_outside_a_run_is_one_line_not_a_traceback(monkeypatch, capsys, tmp_path):
    """Noted by the pass: Ctrl-C in predict, eval or bench printed a KeyboardInterrupt traceback
    (a run says how to resume)."""
    from fasttl.bench import runner

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "run", interrupted)
    code, _, err = cli(capsys, "bench", "adam", "--quick")
    assert code == 130 and err.strip() == "fasttl: interrupted"
