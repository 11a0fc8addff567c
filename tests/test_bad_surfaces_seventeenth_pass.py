"""The seventeenth hostile pass (int8 extraction in runs, and the sixteenth pass's fixes): the
findings that are not int8's own (those are in test_int8_runs.py), as tests of what fasttl does now."""
import pytest

from conftest import cli, one_line_error


@pytest.mark.parametrize("strategy,compare", [("linear", "mlp"), ("mlp", "linear")])
def test_two_heads_that_save_one_file_are_not_compared_in_one_folder(capsys, tmp_path, strategy, compare):
    """linear and mlp both save head.safetensors: beside each other, the second overwrote the first
    and the run could no longer be loaded."""
    code, _, err = cli(capsys, "run", "--strategy", strategy, "--compare", compare, "--out", tmp_path / "run",
                       "--no-progress")
    line = one_line_error(err)
    assert code == 2 and "both save head.safetensors in one run folder" in line and "two --out folders" in line
    assert not (tmp_path / "run").exists()


def test_other_comparisons_still_run_side_by_side():
    from fasttl.transfer.config import run_config

    resolved = run_config()(data="cifar10", strategy="linear", compare="scratch").resolved(32)
    assert resolved.compare == "scratch"
