"""The thirty-ninth hostile pass (about 120 attempts, 114 held): archive members dated beyond
time_t (a pax mtime of 1e400, 10**20 or -1e30: an OverflowError traceback from `data fetch`), a
negative pax size (tarfile steps back by it: a 1.4 KB archive grew to gigabytes, or was refused as
"more than 10,000 files"), many large pax records (10 GB from an 11 MB download), a config.json
"lr" or a teacher's metrics.json "accuracy" of 400 digits (OverflowError; after training, for a
distillation; the other number checks of read-back values alike), a teacher's accuracy of 7.5
copied into the student's metrics, and a sibling cache manifest whose graph file is a list, or
nested 100,000 deep, crashing the int8 graph clean-up."""
import io
import json
import os
import tarfile

import pytest
import torch

from conftest import one_line_error
from fasttl.cache.engine_files import remove_unrecorded_int8_graphs
from fasttl.data import archive
from fasttl.transfer.rundir import RunError
from fasttl.transfer.schema import check_run_config
from fasttl.transfer.strategies.distill import _teacher_accuracy
from fasttl.util.errors import DataError, OptionError
from test_fetch import _fetch, _sha, _tree, cifar_tarball, server  # noqa: F401 (fixtures)

SOURCE = "http://127.0.0.1/x.tar.gz"


def _header(name: str, size: int, kind=tarfile.REGTYPE, tar_format=tarfile.USTAR_FORMAT, **fields) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.type = size, kind
    for key, value in fields.items():
        setattr(info, key, value)
    return info.tobuf(tar_format)


def _padded(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 512)


def _member(name: str, data: bytes = b"abc", **fields) -> bytes:
    return _header(name, len(data), **fields) + _padded(data)


def _pax(*records) -> bytes:
    """A pax extended header holding `records` ((key, value) pairs, values as written)."""
    body = b""
    for key, value in records:
        core = f" {key}={value}\n".encode()
        length = len(core) + 1
        while len(str(length)) + len(core) != length:
            length = len(str(length)) + len(core)
        body += str(length).encode() + core
    return _header("././@PaxHeader", len(body), tarfile.XHDTYPE) + _padded(body)


def _archive(tmp_path, raw: bytes) -> str:
    path = tmp_path / "x.tar"
    path.write_bytes(_member("folder/a") + raw + b"\0" * 1024)
    return str(path)


def _extract(tmp_path, raw: bytes) -> str:
    dest = tmp_path / "dest"
    dest.mkdir()
    try:
        return archive.extract(_archive(tmp_path, raw), "folder", str(dest), ("a",), source=SOURCE)
    finally:
        assert os.listdir(dest) in ([], ["folder"])


@pytest.mark.parametrize("mtime, shown", [("1e400", "inf"), ("99999999999999999999", "1e+20"),
                                          ("-1e30", "-1e+30"), ("nan", "nan")])
def test_a_member_dated_beyond_time_t_is_named_before_extraction(tmp_path, mtime, shown):
    raw = _pax(("mtime", mtime)) + _member("folder/extra")
    with pytest.raises(DataError) as caught:
        _extract(tmp_path, raw)
    assert str(caught.value) == (f"{SOURCE}: member 'folder/extra' is dated {shown} (its time is out of range); "
                                 "refused, nothing extracted (is this the right archive? --url)")
    assert os.listdir(tmp_path / "dest") == []


def test_a_binary_mtime_beyond_time_t_and_the_top_folder_are_checked_too(tmp_path):
    for name, kind, shown in (("folder/extra", tarfile.REGTYPE, "folder/extra"), ("./", tarfile.DIRTYPE, ".")):
        raw = _header(name, 0, kind, tarfile.GNU_FORMAT, mtime=2 ** 80)  # base-256: no float at all
        with pytest.raises(DataError, match=rf"member '{shown}' is dated {2 ** 80} \(its time is out of range\)"):
            _extract(tmp_path, raw)
        os.rmdir(tmp_path / "dest")


def test_an_overflow_while_extracting_is_one_line_not_a_traceback(tmp_path, monkeypatch):
    monkeypatch.setattr(archive, "check_members", lambda *args: None)  # past the check: the extraction's own
    with pytest.raises(DataError, match=r"not a readable archive \(OverflowError: .*\); nothing extracted$"):
        _extract(tmp_path, _pax(("mtime", "1e30")) + _member("folder/extra"))


def test_dates_within_the_years_1_to_9999_extract(tmp_path):
    raw = _pax(("mtime", "253402300799")) + _member("folder/late") + _pax(("mtime", "-62135596800.5")) + \
        _member("folder/early")
    with pytest.raises(DataError, match="'folder/early' is dated -62135596800.5"):
        _extract(tmp_path, raw)
    os.rmdir(tmp_path / "dest")
    target = _extract(tmp_path, raw.replace(b"-62135596800.5", b"-62135596800.0"))
    assert sorted(os.listdir(target)) == ["a", "early", "late"]


@pytest.mark.parametrize("record, why", [({"mtime": "1e400"}, "is dated inf (its time is out of range)"),
                                         ({"size": "-1536"}, "has a negative size")])
def test_data_fetch_names_the_member_in_one_line(record, why, server, cifar_tarball, tmp_path, capsys):  # noqa: F811
    buffer = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(cifar_tarball)) as good, \
            tarfile.open(fileobj=buffer, mode="w:gz", format=tarfile.PAX_FORMAT) as evil:
        for info in good.getmembers():  # the whole official layout, then one hostile member
            evil.addfile(info, good.extractfile(info) if info.isfile() else None)
        info = tarfile.TarInfo("cifar-10-batches-py/extra")
        info.pax_headers = record
        evil.addfile(info, io.BytesIO(b""))
    server.files["/evil.tar.gz"] = data = buffer.getvalue()
    dest = tmp_path / "data"
    dest.mkdir()
    code, _, err = _fetch(capsys, "--url", server.url("/evil.tar.gz"), "--sha256", _sha(data), "--dest", dest)
    assert code == 2 and one_line_error(err) == (
        f"fasttl: error: {server.url('/evil.tar.gz')}: member 'cifar-10-batches-py/extra' {why}; refused, nothing "
        "extracted (is this the right archive? --url)")
    assert _tree(dest) == []


@pytest.mark.parametrize("size", [-1, -512, -1536, -3072])
def test_a_negative_pax_size_names_its_member(tmp_path, size):
    with pytest.raises(DataError) as caught:
        _extract(tmp_path, _pax(("size", size)) + _header("folder/extra", 0))
    assert str(caught.value) == (f"{SOURCE}: member 'folder/extra' has a negative size; refused, nothing extracted "
                                 "(is this the right archive? --url)")


def test_a_negative_size_pointing_back_at_its_own_header_is_refused_at_once(tmp_path, monkeypatch):
    """Python without the fix of CVE-2025-8194 reads the same header again and again, each with its
    own copy of the 1 MB comment: 10,000 copies before the member count stopped it."""
    monkeypatch.setattr(archive, "MAX_MEMBERS", 50)  # (what stopped it before)
    comment = "x" * 100_000
    length = len(_pax(("comment", comment), ("size", -100_000)))
    raw = _pax(("comment", comment), ("size", -(length + 512))) + _header("folder/loop", 0)
    assert len(_pax(("comment", comment), ("size", -(length + 512)))) == length
    with pytest.raises(DataError, match="member 'folder/loop' has a negative size"):
        _extract(tmp_path, raw)


def test_a_negative_binary_size_names_its_member(tmp_path):
    with pytest.raises(DataError, match="member 'folder/extra' has a negative size"):
        _extract(tmp_path, _header("folder/extra", -1536, tar_format=tarfile.GNU_FORMAT))


def test_extended_headers_are_capped_in_all_not_only_each(tmp_path):
    record = ("comment", "x" * 200_000)  # within MAX_HEADER_BYTES; 45 of them past MAX_TOTAL_HEADER_BYTES
    raw = b"".join(_pax(record) + _member(f"folder/{i}") for i in range(45))
    with pytest.raises(DataError) as caught:
        _extract(tmp_path, raw)
    assert str(caught.value) == (f"{SOURCE}: holds more than {archive.MAX_TOTAL_HEADER_BYTES:,} bytes of extended "
                                 "headers (names or attributes) in all; refused, nothing extracted (is this the right "
                                 "archive? --url)")
    os.rmdir(tmp_path / "dest")
    # 15 of them (a third of the archive, cut after the 15th member): within the total, all extracted
    assert sorted(os.listdir(_extract(tmp_path, raw[:len(raw) // 3]))) == sorted(["a", *map(str, range(15))])


def test_the_total_counts_gnu_long_names_too(tmp_path, monkeypatch):
    monkeypatch.setattr(archive, "MAX_TOTAL_HEADER_BYTES", 5000)
    raw = b"".join(_member(f"folder/{'n' * 200}{i}", tar_format=tarfile.GNU_FORMAT) for i in range(30))
    with pytest.raises(DataError, match="holds more than 5,000 bytes of extended headers"):
        _extract(tmp_path, raw)


def _config(**fields) -> dict:
    from fasttl import backbones
    from fasttl.transfer import registry

    return dict({"strategy": registry.names()[0], "classes": ["a", "b"], "backbone": backbones.available()[0],
                 "image_size": 32, "seed": 0, "train_samples": 40}, **fields)


@pytest.mark.parametrize("lr", [10 ** 400, -10 ** 400], ids=["huge", "huge-negative"])
def test_a_config_lr_of_400_digits_is_the_schema_error(lr):
    with pytest.raises(RunError) as caught:
        check_run_config("run/config.json", _config(lr=lr), RunError)
    assert str(caught.value) == (f"run/config.json: field 'lr' is {repr(lr)[:77]}... (expected a number in float32's "
                                 "normal range); rerun the run, or fix the value there")
    check_run_config("run/config.json", _config(lr=3), RunError)


def test_other_number_checks_name_an_int_of_400_digits():
    from fasttl.heads.train import _check_arguments
    from fasttl.optim import _check_step
    from fasttl.transfer.options import a_positive_number

    huge = 10 ** 400
    with pytest.raises(OptionError, match=r"^lr: expected a finite number > 0, got 1000"):
        a_positive_number("lr", huge)
    with pytest.raises(OptionError, match=r"^weight_decay: expected a finite number >= 0, got 1000"):
        _check_arguments(None, None, "linear", 1, 1, 0.1, huge, 0, "cpu")
    with pytest.raises(ValueError, match=r"^state\['step'\]: is 1000.* \(expected a finite step count >= 0\)"):
        _check_step("state['step']", huge)
    from fasttl.optim import AdamW
    with pytest.raises(ValueError, match=r"^lr: expected a finite number >= 0 .*got inf"):
        AdamW([torch.nn.Parameter(torch.zeros(2))], lr=huge)


def test_a_checkpoint_number_of_400_digits_is_named_damaged():
    from fasttl.heads.fit import CheckpointError, _restore

    with pytest.raises(CheckpointError, match=r"^ck\.pt: its history record 1 is not that epoch's numbers"):
        _restore({"epoch": 1, "history": [{"epoch": 1, "train_loss": 10 ** 400}]}, "ck.pt", 1, None, None, None, None)
    optimizer = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)
    saved = optimizer.state_dict()
    saved["param_groups"][0]["lr"] = 10 ** 400
    with pytest.raises(CheckpointError, match=r"^ck\.pt: its optimizer state holds a learning rate 1000"):
        _restore({"epoch": 1, "history": [{"epoch": 1}], "optimizer": saved}, "ck.pt", 1, None, optimizer, None, None)


def test_a_teacher_accuracy_that_is_no_accuracy_is_recorded_as_missing(tmp_path):
    """It is read for the student's notes after the student trained: damage there is no reason to fail."""
    def read(accuracy: str):
        (tmp_path / "metrics.json").write_text('{"accuracy": ' + accuracy + ', "strategy": "linear"}')
        try:
            return _teacher_accuracy(str(tmp_path))
        except OverflowError:
            return "OverflowError"

    cases = {"1" + "0" * 400: None, "-" + "1" * 400: None, "7.5": None, "-0.25": None, "1e400": None, "NaN": None,
             "true": None, '"0.5"': None, "0.75": 0.75, "1": 1.0, "0": 0.0}
    got = {accuracy: read(accuracy) for accuracy in cases}
    assert got == cases and all(type(v) is float for v in got.values() if v is not None)


def _manifest(folder, text: str) -> None:
    folder.mkdir()
    (folder / "manifest.json").write_text(text)


def test_damaged_sibling_manifests_record_no_int8_graph(tmp_path):
    graphs = [f"engine-{i:016x}-int8.onnx" for i in range(4)]
    for name in graphs + ["engine-0000000000000000-fp32.onnx"]:
        (tmp_path / name).write_bytes(b"graph")
    _manifest(tmp_path / "list", json.dumps({"engine_graph": {"file": [graphs[0]]}}))
    _manifest(tmp_path / "object", json.dumps({"engine_graph": {"file": {graphs[0]: 1}}}))
    _manifest(tmp_path / "deep", "[" * 100_000 + "]" * 100_000)
    _manifest(tmp_path / "deep_object", '{"engine_graph": ' + '{"a": ' * 50_000 + "1" + "}" * 50_001)
    _manifest(tmp_path / "kept", json.dumps({"engine_graph": {"file": graphs[1]}}))
    removed = remove_unrecorded_int8_graphs(str(tmp_path), keep=graphs[2])
    assert sorted(removed) == [graphs[0], graphs[3]]
    assert sorted(n for n in os.listdir(tmp_path) if n.endswith(".onnx")) == \
        sorted([graphs[1], graphs[2], "engine-0000000000000000-fp32.onnx"])
