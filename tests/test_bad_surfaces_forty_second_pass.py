"""The forty-second hostile pass (about 142 attempts on the shrinkage LDA head read back from a
teacher, environment numbers, cache tampering, fetch, hostile names, run folders and the speed
record; about 125 held) found 5: a teacher's LDA temperature that its tuning could never have
chosen (1e300: uniform soft targets; 0.5: one-hot ones) was taken, exit 0, and 1e-300 was
blamed on the weights file; a 100,000-character MASTER_ADDR or teacher setting was echoed whole
in a one-line error; after a redirect, fetch named the address that redirected, not the one that
failed; a speed record of 1e-300 images/s refused every budget instead of being measured again."""
import http.server
import json
import os
import socket
import threading

import pytest

from fasttl.heads import shrinkage
from fasttl.transfer import budget
from fasttl.util.checks import MOST_DECIMAL_DIGITS, ascii_digits, decimal, shown
from fasttl.util.errors import OptionError


def _teacher(tmp_path, choice):
    run_dir = tmp_path / "teacher"
    run_dir.mkdir()
    (run_dir / "metrics.json").write_text(json.dumps({"notes": {"choice": choice}}))
    return str(run_dir)


@pytest.mark.parametrize("temperature", [1e300, 1.7e308, 2e5, 0.5, 0.999, 1e-30, 1e-300, 5e-324, 10 ** 30])
def test_a_teacher_temperature_its_tuning_never_fits_is_named(tmp_path, temperature):
    from fasttl.transfer import registry

    run_dir = _teacher(tmp_path, {"solver": shrinkage.SOLVER, "shrinkage": 0.9, "temperature": temperature})
    with pytest.raises(OptionError) as error:
        registry.get("linear").fit_settings(run_dir)
    message = str(error.value)
    assert "metrics.json (notes.choice) has temperature" in message and "1 to 162755" in message
    assert "--teacher-logits in-sample" in message and "\n" not in message


@pytest.mark.parametrize("temperature", [1, 1.0, 143.418, shrinkage.TEMPERATURE_RANGE[1]])
def test_a_teacher_temperature_its_tuning_fits_is_taken(tmp_path, temperature):
    from fasttl.transfer import registry

    run_dir = _teacher(tmp_path, {"solver": shrinkage.SOLVER, "shrinkage": 0.9, "temperature": temperature})
    assert registry.get("linear").fit_settings(run_dir) == {"shrinkage": 0.9, "temperature": temperature}


def test_every_temperature_the_search_returns_is_one_a_teacher_may_hold():
    import torch

    labels = torch.tensor([0, 1, 0, 1])
    for logits in (torch.tensor([[9e3, -9e3], [-9e3, 9e3], [-9e3, 9e3], [9e3, -9e3]]),  # wrong: as soft as it goes
                   torch.tensor([[5.0, 0.0], [0.0, 5.0], [5.0, 0.0], [0.0, 5.0]])):      # right: never sharpened
        assert shrinkage.is_fitted_temperature(shrinkage.temperature(logits, labels))


@pytest.mark.parametrize("field,value", [("shrinkage", "x" * 100_000), ("temperature", 10 ** 4000),
                                         ("shrinkage", [0.9] * 50_000)])
def test_a_huge_teacher_setting_is_shown_cut(tmp_path, field, value):
    from fasttl.transfer import registry

    choice = {"solver": shrinkage.SOLVER, "shrinkage": 0.9, "temperature": 2.0, field: value}
    run_dir = tmp_path / "teacher"
    run_dir.mkdir()
    (run_dir / "metrics.json").write_text(json.dumps({"notes": {"choice": choice}}))
    with pytest.raises(OptionError) as error:
        registry.get("linear").fit_settings(str(run_dir))
    message = str(error.value)
    assert f"has {field} " in message and "characters)" in message and len(message) < 500


def test_a_huge_master_addr_is_shown_cut(monkeypatch):
    from fasttl.util import distributed

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.setenv("MASTER_ADDR", "a" * 100_000)
    with pytest.raises(OptionError) as error:
        distributed.launched_by_torchrun()
    message = str(error.value)
    assert message.startswith("MASTER_ADDR: 'aaa") and "100,000 characters" in message and len(message) < 300


def test_a_negative_world_size_padded_with_spaces_is_shown_cut(monkeypatch):
    from fasttl.util import distributed

    monkeypatch.setenv("WORLD_SIZE", " " * 100_000 + "-1")
    with pytest.raises(OptionError, match="expected 1 or more processes") as error:
        distributed.launched_by_torchrun()
    assert len(str(error.value)) < 300


@pytest.mark.parametrize("text,value", [("-1", -1), ("-0", 0), ("12", 12), ("--1", None), ("- 1", None), ("-", None),
                                        ("+1", None), ("-" + "9" * (MOST_DECIMAL_DIGITS + 1), None),
                                        ("-\u0663", None), (None, None)])
def test_signed_decimal_text(text, value):
    assert decimal(text, signed=True) == value
    assert decimal(text) == (value if text is not None and text[:1] != "-" else None)


@pytest.mark.parametrize("text,digits", [("0", True), ("9" * 5000, True), ("\u00b2", False), ("", False),
                                         ("-1", False), (7, False)])
def test_ascii_digits_however_many(text, digits):
    assert ascii_digits(text) is digits


@pytest.mark.parametrize("value,expected", [("ab", "'ab'"), (1e300, "1e+300"), (None, "None")])
def test_shown_short_values_whole(value, expected):
    assert shown(value) == expected


def test_shown_cuts_the_repr_of_anything_long():
    assert shown([1] * 100) == "[1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, ... (300 characters)"
    assert shown(10 ** 5000) == "an integer of 16,610 bits"


class _Redirecting(http.server.BaseHTTPRequestHandler):
    target = ""

    def do_GET(self):  # noqa: N802 (http.server's name)
        if self.path == "/gone.bin":
            self.send_error(404, "Not Found")
            return
        self.send_response(302)
        self.send_header("Location", self.target)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def _dead_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]  # closed again: nothing listens there


@pytest.mark.parametrize("where", ["dead port", "404"])
def test_a_failure_after_a_redirect_names_the_address_that_failed(tmp_path, where):
    from fasttl.data.fetch import DownloadError, download

    server = http.server.HTTPServer(("127.0.0.1", 0), _Redirecting)
    port = server.server_address[1]
    target = f"http://127.0.0.1:{_dead_port()}/mirror.bin" if where == "dead port" else \
        f"http://127.0.0.1:{port}/gone.bin"
    handler = type("Handler", (_Redirecting,), {"target": target})
    server.RequestHandlerClass = handler
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{port}/c.bin"
    try:
        with pytest.raises(DownloadError) as error:
            download(url, str(tmp_path / "c.bin"), progress=False, timeout=5)
    finally:
        server.shutdown()
        server.server_close()
    message = str(error.value)
    assert f"{target} (where {url} redirects)" in message and "\n" not in message
    assert ("answered HTTP 404" if where == "404" else "cannot reach") in message
    assert os.listdir(tmp_path) in ([], ["c.bin"])  # nothing but the resumable download


@pytest.mark.parametrize("field,value", [("images_per_s", 1e-300), ("images_per_s", 5e-324),
                                         ("images_per_s", budget.MIN_RATE["images_per_s"] / 2),
                                         ("row_classes_per_s", 1e-300), ("row_classes_per_s", 0.5)])
def test_a_speed_record_slower_than_any_machine_is_measured_again(tmp_path, monkeypatch, field, value):
    monkeypatch.setenv("FASTTL_STATE_DIR", str(tmp_path))
    key = "k|linear head" if field == "row_classes_per_s" else "k"
    (tmp_path / budget.SPEED_FILE).write_text(json.dumps({budget._machine_key(): {key: {field: value}}}))
    read = budget.measured_head_rate if field == "row_classes_per_s" else budget.measured_speed
    assert read(key) is None
    (tmp_path / budget.SPEED_FILE).write_text(json.dumps({budget._machine_key(): {key: {field: value * 0 + 1.0}}}))
    assert read(key) == 1.0  # the slowest rate a record keeps is still read


@pytest.mark.parametrize("seconds,said", [(90, "about 90s"), (budget.MAX_BUDGET_S, "about 168.0h"),
                                          (budget.MAX_BUDGET_S + 1, "more than 168h"), (1e300, "more than 168h")])
def test_an_estimate_past_any_budget_has_no_about(seconds, said):
    assert budget.about(seconds) == said
