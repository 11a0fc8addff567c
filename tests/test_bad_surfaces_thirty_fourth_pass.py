"""The thirty-fourth hostile pass (31 attempts, on the planner probing in int8 and pass 33's six
fixes; 28 held): `fasttl extract`'s int8 refusal said "pass --extract-precision fp32", which its
own finished int8 training split then refused without --overwrite; a speed record slow beyond any
machine (1e-300 images/s) made a refusal say "needs at least infh" (now "more than 168h", beside
"no --budget up to 168h fits it": test_bad_surfaces_sixteenth_pass.py)."""
import pytest

from conftest import cifar_subset, cli, darken, one_line_error
from fasttl.cache import engines
from fasttl.transfer import budget


@pytest.mark.skipif(not engines.onnxruntime_available(), reason="int8 extraction runs in ONNX Runtime (pip install "
                    "'fasttl[export]')")
def test_the_fix_an_int8_extract_refusal_gives_works(tmp_path, cifar10_root, capsys, fresh_engines):
    plain = cifar_subset(cifar10_root, tmp_path / "plain", ["cat", "ship"], 8, 2)
    data = darken(plain, tmp_path / "dark", keep_normal=("ship",))  # dark training images, normal test ships
    words = ["extract", "--data", data, "--out", tmp_path / "cache", "--image-size", "32", "--features", "head",
             "--no-progress"]
    code, _, err = cli(capsys, *words, "--extract-precision", "int8")
    line = one_line_error(err)
    assert code == 2 and "int8 graph" in line and "--extract-precision fp32" in line
    assert "with --overwrite too" in line
    code, _, err = cli(capsys, *words, "--extract-precision", "fp32")
    if code != 0:  # a split the int8 graph did store is there: the message's "with --overwrite too"
        assert code == 2 and "--overwrite" in one_line_error(err)
        code, _, err = cli(capsys, *words, "--extract-precision", "fp32", "--overwrite")
    assert code == 0, err


@pytest.mark.parametrize("seconds, said", [(90, "90s"), (600, "10.0m"), (7200, "2.0h"), (budget.MAX_BUDGET_S, "168.0h"),
                                           (budget.MAX_BUDGET_S + 1, "more than 168h"), (1e300, "more than 168h"),
                                           (float("inf"), "more than 168h")])
def test_a_duration_past_any_budget_is_said_so(seconds, said):
    assert budget.shown(seconds) == said
