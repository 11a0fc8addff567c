"""The twenty-ninth hostile pass (pass 28's fixes, `predict --on-error skip` on int8 runs; 23
attempts): SIGTERM during an int8 run's quantization left its temporary folders (only Ctrl-C went
out through the cleanup), SIGHUP of the scale bench left its cache (test_bad_surfaces_twenty_eighth_
pass.py), and an image given twice under two spellings was named by the last one in both CSV rows.
SIGTERM and SIGHUP now end every command as Ctrl-C does (fasttl.util.signals)."""
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import cli, finished_run
from fasttl.util import signals

pytestmark = pytest.mark.usefixtures("private_cache")


@pytest.fixture(scope="module")
def scratch_run(cat_ship, tmp_path_factory):
    return finished_run(cat_ship, tmp_path_factory, "scratch29")


@pytest.fixture
def default_signals():
    """Ctrl-C, SIGTERM and SIGHUP as a terminal leaves them, whatever this test process inherited
    (under nohup SIGHUP is ignored, and fasttl then leaves it ignored); put back afterwards."""
    before = {number: signal.getsignal(number) for number in signals.STOPPING}
    for number in signals.STOPPING:
        signal.signal(number, signal.default_int_handler if number == signal.SIGINT else signal.SIG_DFL)
    yield
    for number, handler in before.items():
        signal.signal(number, handler)


def default_signals_in_child():
    """preexec_fn: the same for a child process."""
    for number in signals.STOPPING:
        signal.signal(number, signal.SIG_DFL)


@pytest.mark.parametrize("number", signals.ENDING, ids=[signal.Signals(n).name for n in signals.ENDING])
def test_ending_signals_raise_where_the_process_stands_and_the_handlers_come_back(number, default_signals):
    before = signal.getsignal(number)
    with pytest.raises(signals.Terminated) as ended:
        with signals.ending_signals_raised():
            os.kill(os.getpid(), number)
            time.sleep(5)  # the handler runs before this ends
    assert ended.value.signum == number and signals.exit_code(ended.value) == 128 + number
    assert signal.getsignal(number) is before


def test_a_command_ended_by_sigterm_says_so_in_one_line(monkeypatch, capsys, default_signals):
    from fasttl.bench import runner

    monkeypatch.setattr(runner, "run", lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGTERM) or time.sleep(5))
    code, _, err = cli(capsys, "bench", "adam", "--quick")
    assert code == 128 + signal.SIGTERM and err.strip() == "fasttl: interrupted (SIGTERM)"


def test_sigterm_during_int8_quantization_leaves_no_temporary_folder(cat_ship, tmp_path):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = dict(os.environ, TMPDIR=str(scratch), FASTTL_CACHE_DIR=str(tmp_path / "cache"),
               FASTTL_STATE_DIR=str(tmp_path / "state"))
    job = subprocess.Popen([sys.executable, "-m", "fasttl", "run", "--data", str(cat_ship), "--image-size", "32",
                            "--features", "head", "--extract-precision", "int8", "--compare", "none", "--out",
                            str(tmp_path / "run"), "--no-progress"], env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True, preexec_fn=default_signals_in_child)
    try:
        deadline = time.monotonic() + 300
        while not any(n.startswith("fasttl-int8-") for n in os.listdir(scratch)) and job.poll() is None and \
                time.monotonic() < deadline:
            time.sleep(0.02)
        assert job.poll() is None, f"the run ended before quantizing: {job.stderr.read()[-1500:]}"
        job.send_signal(signal.SIGTERM)
        assert job.wait(timeout=300) == 128 + signal.SIGTERM
        assert "--resume continues" in job.stderr.read()
        left = [n for n in os.listdir(scratch) if n.startswith(("fasttl-", "ort.quant"))]
        assert left == []  # removed on the way out (a library's own .ses session file aside)
    finally:
        if job.poll() is None:
            job.kill()
        shutil.rmtree(scratch, ignore_errors=True)


def test_an_image_given_twice_is_named_as_given_each_time(scratch_run, cat_ship, monkeypatch, capsys):
    folder = cat_ship / "test" / "cat"
    name = sorted(os.listdir(folder))[0]
    monkeypatch.chdir(folder)
    code, out, _ = cli(capsys, "predict", "--run", scratch_run, "--no-progress", name, f"./{name}", folder / name)
    assert code == 0
    rows = [line.split(",") for line in out.splitlines()[1:]]
    assert [row[0] for row in rows] == [name, f"./{name}", str(folder / name)]
    assert len({tuple(row[1:]) for row in rows}) == 1  # the same image, the same prediction


def test_a_second_ending_signal_does_not_cut_the_cleanup_short(default_signals):
    """The thirtieth pass: two SIGTERMs a millisecond apart left an int8 quantization's temporary
    folders (the second interrupted the `finally` removing them)."""
    cleaned = []
    with pytest.raises(signals.Terminated):
        with signals.ending_signals_raised():
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)
            finally:
                os.kill(os.getpid(), signal.SIGTERM)
                os.kill(os.getpid(), signal.SIGHUP)
                time.sleep(0.1)
                cleaned.append(True)
    assert cleaned and signal.getsignal(signal.SIGTERM) is not signal.SIG_IGN  # the handlers came back after


@pytest.mark.parametrize("first", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_after_ctrl_c_or_sigterm_no_signal_cuts_the_cleanup_short(first, default_signals):
    """The thirty-first pass: Ctrl-C then SIGTERM (a cancelled CI job) left onnxruntime's
    temporary folder; every stopping signal is ignored after the first while the cleanup runs."""
    cleaned = []
    with pytest.raises(KeyboardInterrupt) as stopped:
        with signals.ending_signals_raised():
            try:
                os.kill(os.getpid(), first)
                time.sleep(5)
            finally:
                for number in signals.STOPPING:
                    os.kill(os.getpid(), number)
                time.sleep(0.1)
                cleaned.append(True)
    assert cleaned and (type(stopped.value) is KeyboardInterrupt) == (first == signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_signal_already_ignored_stays_ignored(default_signals):
    """`nohup fasttl run ...` ignores SIGHUP: the run must outlive its terminal."""
    before = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with signals.ending_signals_raised():
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGHUP)
            time.sleep(0.1)
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, before)
