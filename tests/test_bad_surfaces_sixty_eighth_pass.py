"""The sixty-eighth and sixty-ninth hostile passes (on fe51992: about 75 attempts on data fetch,
full disks and permissions; about 150 on the API, labels and run folders) found 3 and 7, mostly
at the edges of the sixty-sixth and sixty-seventh fixes: a host outside ASCII in --url was sent
unencoded, and a URL holding bytes that are not UTF-8 blamed the network; a run from before
run_token resumed into a same-settings run's TensorBoard curves; a cache FeatureCache.build made in
a project's train/ made the project an extract root; the class names now taken (ZWNJ, NBSP) were
escaped in every CSV and report.md; eval named a class mismatch by position; a name of only
invisible characters was taken; ImageLoader.set_epoch folded epochs; CIFAR meta refusals named no
character and printed 200 KB; the ideographic space, RLM/LRM and flag tags were refused. The seventieth
(on 2543cec) found 5 at those fixes' edges: redirects to hosts outside ASCII, IDNA 2003 mapping a host to
another name, data fetch --dest into a cache folder, epoch_indices folding epochs, an old extract root
without the mark (documented). The seventy-first (on 3cd07c8) found 2: a %-escaped host got around the
IDNA check; export printed a paste-ready command that ran $(...) in the --out name. The seventy-second
(on 8684d36) found 2: an escaped @ in a host made another address; an --out name that is not UTF-8
crashed write_atomic. The seventy-third (on bdb23d2) found 4: escaped control characters and colons in
a host, a full-width @ or a port-only host (a traceback), export's hint for a name that is not UTF-8,
--tensorboard into a path that is not UTF-8 (a traceback after training)."""
import re

import numpy as np
import pytest

from conftest import cli, one_line_error


# ---- N1: only the mark fasttl extract leaves makes an extract root, not a cache built into train/ -------------
def test_a_cache_a_script_built_into_train_makes_no_extract_root(tmp_path, capsys, monkeypatch):
    import fasttl
    from conftest import tiny_backbone
    from fasttl.cache.folder import enclosing_cache_folder
    from fasttl.data.sources import ArraySource

    rng = np.random.default_rng(68)
    source = ArraySource(rng.integers(0, 256, (6, 16, 16, 3), dtype=np.uint8), np.arange(6) % 2, ["a", "b"])
    project = tmp_path / "proj"
    fasttl.FeatureCache.build(tiny_backbone(), source, str(project / "train"), progress=False, backend="torch")
    # before: "out: .../proj/out/p.csv is in the feature cache folder .../proj (it holds train/features-...)"
    assert enclosing_cache_folder(str(project / "out" / "p.csv")) is None
    assert enclosing_cache_folder(str(project / "train" / "x"))[0] == str(project / "train")  # the cache stays guarded
    (project / "train" / ".fasttl-extract").mkdir()  # a folder of that name is no mark
    assert enclosing_cache_folder(str(project / "train" / "x"))[1] != ".fasttl-extract"


# ---- N2 and N7: the characters real names hold go into every output as they are ------------------------------------
NAMES = ["\u06a9\u062a\u0627\u0628\u200c\u062e\u0627\u0646\u0647", "10\u00a0km", "\u6771\u4eac\u3000\u30bf\u30ef\u30fc",
         "\u05e9\u05dc\u05d5\u05dd\u200f", "\U0001f3f4\U000e0067\U000e0062\U000e0073\U000e0063\U000e0074\U000e007f"]


@pytest.mark.parametrize("name", NAMES, ids=["zwnj", "nbsp", "ideographic-space", "rlm", "flag-tags"])
def test_a_name_real_spelling_holds_is_written_as_it_is(name):
    from fasttl.data.labels import refuse_lookalikes, unprintable
    from fasttl.util.outputs import csv_cell, markdown_cell, terminal_text

    # before: U+3000, U+200F and the tags refused; the others written as \u200c, \xa0 in CSV and report.md
    assert unprintable(name) is None
    refuse_lookalikes([name, "dog"], "classes:")
    assert terminal_text(name) == csv_cell(name) == name
    assert markdown_cell(name) == name


def test_predictions_name_a_zwnj_class_as_it_is(cat_ship, tmp_path, capsys):
    import csv
    import json
    import shutil

    name = NAMES[0]
    data = tmp_path / "data"
    shutil.copytree(cat_ship, data)
    for split in ("train", "test"):
        (data / split / "cat").rename(data / split / name)
    code, _, err = cli(capsys, "run", "--data", data, "--out", tmp_path / "r", "--strategy", "scratch", "--epochs", 1,
                       "--image-size", 32, "--compare", "none", "--no-progress")
    assert code == 0, err
    classes = json.loads((tmp_path / "r" / "config.json").read_text(encoding="utf-8"))["classes"]
    with open(tmp_path / "r" / "predictions.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert name in classes and {row["label"] for row in rows} <= set(classes)  # before: 'کتاب\\u200cخانه'
    assert any(row["label"] == name for row in rows) and f"| {name} |" in (tmp_path / "r" / "report.md").read_text(
        encoding="utf-8")


# ---- N4: a name that shows nothing is refused, from any source ------------------------------------------------------
@pytest.mark.parametrize("blank", ["\u200c", "\u00a0", "\u202f", "\u200d\u200c", "\u3164", " \u2800"],
                         ids=["zwnj", "nbsp", "nnbsp", "joiners", "hangul-filler", "braille-blank"])
def test_a_name_that_shows_nothing_is_refused(tmp_path, blank):
    from fasttl.data.formats.folder import class_folder_splits
    from fasttl.data.labels import read_classes_file, refuse_lookalikes
    from fasttl.util.errors import DataError

    said = re.escape(f"{ascii(blank)}, a name that shows nothing (only white space or invisible characters); rename it")
    # before: taken, a class every report shows as blank
    with pytest.raises(DataError, match=said + "$"):
        refuse_lookalikes(["cat", blank], "classes:")
    for split in ("train", "test"):
        for label in ("cat", blank):
            (tmp_path / split / label).mkdir(parents=True)
    with pytest.raises(DataError, match="a name that shows nothing"):
        class_folder_splits(str(tmp_path))
    (tmp_path / "classes.txt").write_text(f"cat\n{blank}\ndog\n", encoding="utf-8")
    with pytest.raises(DataError, match="a name that shows nothing|blank between class names"):
        read_classes_file(str(tmp_path / "classes.txt"))


# ---- N3: eval names the classes that differ from the run's, escaped, with the reason -------------------------------
def test_eval_names_the_classes_that_differ(cat_ship, tmp_path, capsys):
    import shutil

    from conftest import finished_run

    run_dir = finished_run(cat_ship, tmp_path_factory=_Factory(tmp_path), name="scratch68")
    other = tmp_path / "other"
    shutil.copytree(cat_ship / "test", other / "test")
    (other / "test" / "cat").rename(other / "test" / "\u0441at")
    code, _, err = cli(capsys, "eval", run_dir, "--data", other / "test", "--no-progress")
    # before: "class 0 is 'ship', the run was trained with 'cat' there" (ship on both sides; 'сat' printed as 'cat')
    assert code == 2 and one_line_error(err).startswith(
        f"fasttl: error: {other / 'test'}: has classes the run has not ('\\u0441at') and lacks some it has ('cat'); "
        "'cat' and '\\u0441at' differ only in letters drawn alike")


class _Factory:
    def __init__(self, root):
        self.root = root

    def mktemp(self, name):
        path = self.root / name
        path.mkdir()
        return path


# ---- N5: ImageLoader.set_epoch as FeatureCache.loader's -----------------------------------------------------------
def test_image_loader_epochs_are_numpy_ints_and_never_folded():
    from fasttl.data.loader import ImageLoader
    from fasttl.data.sources import ArraySource
    from fasttl.data.spec import TransformSpec

    source = ArraySource(np.zeros((4, 8, 8, 3), np.uint8), np.arange(4) % 2, ["a", "b"])
    loader = ImageLoader(source, TransformSpec(8, (0.5,) * 3, (0.5,) * 3, 1.0, False, 0, False), 2, backend="torch",
                         num_workers=0)
    loader.set_epoch(np.int64(2))  # before: "epoch: expected an integer >= 0, got np.int64(2)"
    assert loader.epoch == 2 and type(loader.epoch) is int
    with pytest.raises(ValueError, match=r"^epoch: expected an integer in \[0, 2\*\*63\), got 18446744073709551616$"):
        loader.set_epoch(2**64)  # before: taken, epoch 0's order again


# ---- N6: a CIFAR meta file's bad name is named, cut, with its character ---------------------------------------------
@pytest.mark.parametrize("names, said", [
    ([b"\xef\xbb\xbfcat", b"dog"], r"holds '\\ufeffcat', with U\+FEFF ZERO WIDTH NO-BREAK SPACE, an invisible format "
                                  r"character; class names must be printable$"),
    (["x" * 200_000 + "\x07", "dog"], r"holds 'xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx'\.\.\. \(200,001 characters\), "
                                      r"with U\+0007, a control character"),
    ([b"cat", b"dog", b"cat"], r"names 'cat' twice; each class once$"),
], ids=["bom", "huge", "twice"])
def test_a_cifar_meta_name_refusal_names_the_character(tmp_path, names, said):
    import pickle

    from fasttl.data import load_cifar_pickles
    from fasttl.util.errors import DataError

    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    with open(root / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": names}, f)
    # before: "must be distinct, printable names (found [...])", the whole list, 200 KB on one line
    with pytest.raises(DataError) as refused:
        load_cifar_pickles(str(root), True)
    assert len(str(refused.value)) < 400
    assert re.search(said, str(refused.value)), str(refused.value)


# ---- observation: a 0-d array or numpy bool is a shuffle flag as it is a drop_last one -------------------------------
def test_a_cache_loader_takes_a_numpy_shuffle_flag(tmp_path):
    import fasttl

    cache = fasttl.FeatureCache.write(str(tmp_path / "c"), [np.arange(20, dtype=np.float32).reshape(5, 4)],
                                      [0, 1, 0, 1, 0], classes=["a", "b"], dtype="fp32")
    plain = [labels.tolist() for _, labels in cache.loader(batch_size=2, shuffle=False)]
    for given in (np.array(False), np.False_):  # before: "shuffle: expected True, False, 'rows' or 'blocks'"
        assert [labels.tolist() for _, labels in cache.loader(batch_size=2, shuffle=given)] == plain


# ---- pass 68 #3: a run from before run tokens proves no curves its own -------------------------------------------
def test_a_run_from_before_run_tokens_never_resumes_into_curves_it_cant_prove_its_own(cat_ship, tmp_path):
    pytest.importorskip("tensorboard", reason="needs the tensorboard package (fasttl[tensorboard])")
    import os

    from conftest import one_epoch_run, vouched_config_edit
    from fasttl.transfer.job import TENSORBOARD_OWNER, run
    from fasttl.transfer.rundir import read_config
    from fasttl.util.errors import OptionError

    boards = tmp_path / "boards"
    first, second = tmp_path / "a" / "run", tmp_path / "b" / "run"
    run(**one_epoch_run(cat_ship, first, tensorboard=str(boards)))
    run(**one_epoch_run(cat_ship, second))
    os.remove(second / "metrics.json")
    (tmp_path / "old").mkdir()
    old = vouched_config_edit(second, tmp_path / "old" / "run", lambda config: config.pop("run_token"))
    (boards / "run" / TENSORBOARD_OWNER).write_text(read_config(str(first))["run_key"])  # as fasttl then wrote it
    # before: the settings' hash matched, and the old run's curves went in beside the first run's
    with pytest.raises(OptionError, match=r"of a run named run \(this run, made before fasttl recorded which curves "
                                          r"are a run's own, can't prove them its own\); give another --tensorboard"):
        run(**one_epoch_run(cat_ship, old, tensorboard=str(boards), resume=True))
    run(**one_epoch_run(cat_ship, old, tensorboard=str(tmp_path / "fresh"), resume=True))  # an empty board: it resumes
    token = read_config(str(old))["run_token"]  # and gets a token of its own
    assert len(token) == 32 and token != read_config(str(first))["run_token"]
    assert (tmp_path / "fresh" / "run" / TENSORBOARD_OWNER).read_text() == token


# ---- pass 68 #1 and #2: a host outside ASCII is sent in IDNA; a URL of bytes not UTF-8 is refused up front -----------
def test_a_host_outside_ascii_is_sent_as_idna_or_refused(tmp_path, capsys, monkeypatch):
    from test_bad_surfaces_sixty_sixth_pass import _Endless

    from fasttl.cli import main
    from fasttl.data.http_reply import sendable

    assert sendable("http://B\u00fccher.example:8080/d\u00e9/x?q=\u00e9") == \
        "http://xn--bcher-kva.example:8080/d%C3%A9/x?q=%C3%A9"
    monkeypatch.setenv("FASTTL_DATA", str(tmp_path / "data"))
    wide = "\uff11\uff12\uff17.\uff10.\uff10.\uff11"  # 127.0.0.1 in full-width digits
    for host, written in ((wide, "127.0.0.1"), ("fa\u00df.example", "fass.example"),
                          ("a\u200db.example", "ab.example")):
        code = main(["data", "fetch", "cifar10", "--no-progress", "--url", f"http://{host}:9/x", "--sha256", "0" * 64])
        # before: "cannot reach ... (ordinal not in range(256)); check the network", or another host asked (IDNA 2003)
        assert code == 2 and one_line_error(capsys.readouterr().err) == (
            f"fasttl: error: url: the host name {host!r} is written by IDNA as {written!r}, another name than browsers "
            "ask for; give the host as its ASCII (xn--) form")
    server = _Endless(b"not an archive")
    try:  # a redirect to such a host is refused as --url is (pass 70: it went out unencoded)
        port = server.httpd.server_address[1]
        import http.server

        class Redirect(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                self.send_response(302)
                self.send_header("Location", f"http://{wide}:{port}/x".encode("utf-8").decode("latin-1"))
                self.end_headers()

        from conftest import LoopbackServer
        redirecting = LoopbackServer(Redirect)
        try:
            code = main(["data", "fetch", "cifar10", "--no-progress", "--url", redirecting.url("/moved"), "--sha256",
                         "0" * 64])
        finally:
            redirecting.close()
    finally:
        server.close()
    err = one_line_error(capsys.readouterr().err)
    assert code == 2 and "check the network" not in err and "another name than browsers ask for" in err, err


def test_a_url_of_bytes_that_are_not_utf8_is_refused_before_any_request(tmp_path, capsys, monkeypatch):
    from fasttl.cli import main

    monkeypatch.setenv("FASTTL_DATA", str(tmp_path / "data"))
    url = "http://127.0.0.1:9/caf" + b"\xe9".decode("utf-8", "surrogateescape") + ".tar.gz"  # as argv gives Latin-1
    code = main(["data", "fetch", "cifar10", "--no-progress", "--url", url, "--sha256", "0" * 64])
    # before: "cannot reach ... (surrogates not allowed); check the network or the address"
    assert code == 2 and one_line_error(capsys.readouterr().err) == (
        "fasttl: error: url: 'http://127.0.0.1:9/caf\\udce9.tar.gz' holds bytes that are not UTF-8 text; give the "
        "address as UTF-8, or percent-encode those bytes (%E9 for the Latin-1 \u00e9)")
    assert not (tmp_path / "data").exists()


# ---- pass 70: fetch --dest into a cache folder, epoch_indices, an invisible mark before a formula ------------------
def test_fetch_writes_no_data_set_into_a_feature_cache_folder(tmp_path, capsys, monkeypatch):
    import fasttl

    from fasttl.cli import main

    cache = fasttl.FeatureCache.write(str(tmp_path / "c"), [np.zeros((3, 4), np.float32)], [0, 1, 0],
                                      classes=["a", "b"], dtype="fp32").directory
    code = main(["data", "fetch", "cifar10", "--no-progress", "--dest", cache, "--url", "http://127.0.0.1:9/x.tar.gz",
                 "--sha256", "0" * 64])
    # before: the data set went into the cache, which fasttl extract then refused as holding files not its own
    assert code == 2 and one_line_error(capsys.readouterr().err).startswith(
        f"fasttl: error: dest: {cache} is in the feature cache folder {cache} (it holds ")
    monkeypatch.setenv("FASTTL_DATA", cache)
    code = main(["data", "fetch", "cifar10", "--no-progress", "--url", "http://127.0.0.1:9/x.tar.gz", "--sha256",
                 "0" * 64])
    line = one_line_error(capsys.readouterr().err)
    assert code == 2 and "error: FASTTL_DATA: " in line and line.endswith("give FASTTL_DATA a folder outside it")


def test_epoch_indices_refuse_what_set_epoch_refuses():
    from fasttl.data.loader import ImageLoader
    from fasttl.data.sources import ArraySource
    from fasttl.data.spec import TransformSpec

    source = ArraySource(np.zeros((4, 8, 8, 3), np.uint8), np.arange(4) % 2, ["a", "b"])
    loader = ImageLoader(source, TransformSpec(8, (0.5,) * 3, (0.5,) * 3, 1.0, False, 0, False), 2, backend="torch",
                         num_workers=0, shuffle=True)
    assert loader.epoch_indices(np.int64(1)).tolist() == loader.epoch_indices(1).tolist()
    for epoch, error in ((2**64 + 1, ValueError), (-1, ValueError), (1.5, TypeError), (True, TypeError)):
        with pytest.raises(error, match=r"^epoch: expected an integer"):  # before: 2**64 + 1 gave epoch 1's order
            loader.epoch_indices(epoch)


@pytest.mark.parametrize("mark", ["\u200e", "\u200f", "\u00a0", "\u200c\u200d"])
def test_an_invisible_mark_before_a_formula_start_still_gets_the_apostrophe(mark):
    from fasttl.util.outputs import csv_cell

    assert csv_cell(mark + "=1+2") == "'" + mark + "=1+2"  # before: no apostrophe, the check saw the mark first


# ---- pass 71: a %-escaped host, and export's printed command with a hostile file name -----------------------------
@pytest.mark.parametrize("host, said", [
    ("127.0.0.%C2%B9", "'127.0.0.\u00b9' is written by IDNA as '127.0.0.1', another name than browsers ask for"),
    ("fa%C3%9F.example", "'fa\u00df.example' is written by IDNA as 'fass.example', another name than browsers"),
    ("caf%E9.example", "'caf%E9.example' holds %-escapes that are not UTF-8 text"),
], ids=["superscript-one", "eszett", "latin1-escape"])
def test_a_percent_escaped_host_is_checked_as_the_name_it_spells(tmp_path, capsys, monkeypatch, host, said):
    from fasttl.cli import main
    from fasttl.data.http_reply import sendable

    assert sendable("http://b%C3%BCcher.example/x") == "http://xn--bcher-kva.example/x"
    monkeypatch.setenv("FASTTL_DATA", str(tmp_path / "data"))
    code = main(["data", "fetch", "cifar10", "--no-progress", "--url", f"http://{host}:9/x", "--sha256", "0" * 64])
    # before: 127.0.0.%C2%B9 fetched from 127.0.0.1 with a raw Latin-1 Host header; others "check the network"
    assert code == 2 and said in one_line_error(capsys.readouterr().err)


def test_exports_printed_command_pastes_a_hostile_file_name_as_a_name(tmp_path):
    import os
    import shlex
    import subprocess
    import sys

    from fasttl.export import run_instructions

    out = str(tmp_path / "m$(touch PWNED)`touch TICK`'q\"\nx.onnx")
    line = run_instructions({"out": out, "image_size": 8})[1].strip()
    words = shlex.split(line)
    assert "\n" not in line and words[:2] == ["python", "-c"] and len(words) == 3
    fake = tmp_path / "bin"  # a `python` that keeps the code bash hands it
    fake.mkdir()
    (fake / "python").write_text('#!/bin/sh\nprintf %s "$2" > "$KEPT"\n')
    (fake / "python").chmod(0o755)
    env = dict(os.environ, PATH=f"{fake}:{os.environ['PATH']}", KEPT=str(tmp_path / "kept"))
    subprocess.run(["bash", "-c", line], cwd=tmp_path, env=env, check=True, timeout=60)
    # before: the line was python -c "...InferenceSession('<out>')...": bash ran $(touch PWNED) and `touch TICK`
    assert not (tmp_path / "PWNED").exists() and not (tmp_path / "TICK").exists()
    assert (tmp_path / "kept").read_text() == words[2]
    stub = tmp_path / "stub"  # an onnxruntime whose session says which file it was given
    stub.mkdir()
    (stub / "onnxruntime.py").write_text("import sys\ndef InferenceSession(path):\n    sys.exit(path)\n")
    done = subprocess.run([sys.executable, "-c", words[2]], env=dict(os.environ, PYTHONPATH=str(stub)),
                          capture_output=True, text=True, timeout=120)
    assert done.stderr.rstrip("\n") == out  # the file, by its own name


# ---- pass 72: an escaped delimiter in a host, and an --out name of bytes that are not UTF-8 ------------------------
@pytest.mark.parametrize("host, said", [
    ("evil.invalid%40127.0.0.1", "'evil.invalid%40127.0.0.1:9' holds '%40', a % that escapes no byte of a character "
                                 "outside ASCII"),
    ("a%2Fb.example", "holds '%2F', a %"), ("127.0.0.1%3A80", "holds '%3A', a %"), ("x%3Fy", "holds '%3F', a %"),
    ("x%23y", "holds '%23', a %"), ("127.0.0%0A.1", "holds '%0A', a %"), ("localho%0Dst", "holds '%0D', a %"),
    ("a%09b", "holds '%09', a %"), ("%3A8781", "holds '%3A', a %"),
    ("a%EF%BC%A0127.0.0.1", "'a\uff20127.0.0.1:9' holds a character that NFKC makes a delimiter (a full-width @ "
                            "or :), which would make another address of it"),
])
def test_an_escaped_delimiter_in_a_host_is_refused_not_unquoted_into_another_address(tmp_path, capsys, monkeypatch,
                                                                                    host, said):
    from fasttl.cli import main

    monkeypatch.setenv("FASTTL_DATA", str(tmp_path / "data"))
    code = main(["data", "fetch", "cifar10", "--no-progress", "--url", f"http://{host}:9/x", "--sha256", "0" * 64])
    # before: evil.invalid%40127.0.0.1 was unquoted to evil.invalid@127.0.0.1 and fetched from 127.0.0.1 (exit 0);
    # pass 73: 127.0.0%0A.1 fetched from 127.0.0.1 (urllib drops the line break), a full-width @ or a host of
    # only a port a traceback
    error = one_line_error(capsys.readouterr().err)
    assert code == 2 and error.startswith("fasttl: error: url: the host name '") and said in error


def test_an_out_name_of_bytes_that_are_not_utf8_is_written(tmp_path):
    import os

    from fasttl.util.files import write_atomic

    name = os.fsdecode(b"caf\xe9.csv")  # as argv gives a Latin-1 name
    write_atomic(str(tmp_path / name), b"x\n")  # before: UnicodeEncodeError after the work was done
    assert os.listdir(os.fsencode(tmp_path)) == [b"caf\xe9.csv"] and (tmp_path / name).read_bytes() == b"x\n"
    long = os.fsdecode("\u00e9".encode() * 100 + b"\xe9.csv")  # a temporary's name cut inside a character
    write_atomic(str(tmp_path / long), b"y\n")
    assert (tmp_path / long).read_bytes() == b"y\n" and len(os.listdir(tmp_path)) == 2


# ---- pass 73: export's hint for a name that is not UTF-8, --tensorboard into such a path ----------------------------
def test_exports_hint_for_a_name_that_is_not_utf8_opens_the_file(tmp_path):
    import os
    import shlex
    import subprocess
    import sys

    from fasttl.export import run_instructions

    out = os.fsdecode(os.fsencode(str(tmp_path)) + b"/mod\xe8le.onnx")
    with open(os.fsencode(out), "wb") as f:
        f.write(b"the model's bytes")
    code = shlex.split(run_instructions({"out": out, "image_size": 8})[1].strip())[2]
    stub = tmp_path / "stub"  # an onnxruntime that says what it was given
    stub.mkdir()
    (stub / "onnxruntime.py").write_text("import sys\ndef InferenceSession(model):\n    sys.exit(repr(model))\n")
    done = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=str(stub)),
                          capture_output=True, text=True, timeout=120)
    # before: InferenceSession('...\udce8le.onnx'), which ONNX Runtime refuses (a TypeError): the hint did not work
    assert done.stderr.strip() == repr(b"the model's bytes")


def test_tensorboard_into_a_path_that_is_not_utf8_is_refused_before_training(cat_ship, tmp_path):
    import os

    from conftest import one_epoch_run
    from fasttl.transfer.job import run
    from fasttl.util.errors import OptionError

    board = os.fsdecode(os.fsencode(str(tmp_path)) + b"/tb\xe9")
    # before: a UnicodeEncodeError traceback from TensorBoard's writer after training, the run left unfinished
    with pytest.raises(OptionError, match=r"^tensorboard: .* is not UTF-8 text, which TensorBoard's writer needs"):
        run(**one_epoch_run(cat_ship, tmp_path / "run", tensorboard=board))
    assert not (tmp_path / "run").exists()
