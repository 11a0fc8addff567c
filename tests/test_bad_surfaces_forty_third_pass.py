"""The forty-third hostile pass (20 attempts on the budget planner, heads averaged over backbones,
--mirror-views both and an MLP on a pair; 17 held) found 3: --budget refused a pinned pair given
out of name order ("lite1+lite0") at any budget, with the MLP screen's reason; with --budget an
--out under a plain file was named by fasttl's marker inside the folder it wanted; report.md said
the training views' logits were averaged (each is a row the head trains on) and that linear
candidates of more backbones came first where no linear candidate was screened."""
import errno
import json

import pytest

from conftest import cli, one_line_error


@pytest.mark.parametrize("budget", [[], ["--budget", "2m"]])
def test_an_out_under_a_plain_file_names_that_file(cat_ship, tmp_path, capsys, private_cache, budget):
    (tmp_path / "file").write_bytes(b"mine")
    code, _, err = cli(capsys, "run", "--data", cat_ship, "--strategy", "linear", "--image-size", "32", *budget,
                       "--compare", "none", "--out", tmp_path / "file" / "run", "--no-progress")
    line = one_line_error(err)
    assert code == 2 and line == (f"fasttl: error: out: {tmp_path / 'file'} is a file, not a folder, where "
                                  f"{tmp_path / 'file' / 'run'} needs a folder; pass another --out"), err
    assert (tmp_path / "file").read_bytes() == b"mine" and ".fasttl" not in line


def test_not_a_folder_names_the_first_file_in_the_way(tmp_path):
    from fasttl.cli_errors import os_error_line

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "f").write_bytes(b"")
    deep = str(tmp_path / "a" / "f" / "g" / ".fasttl-run")
    assert os_error_line(NotADirectoryError(errno.ENOTDIR, "Not a directory", deep)).startswith(
        f"{tmp_path / 'a' / 'f'}: a file, where the path needs a folder")
    # the file gone by the time the error is shown: the path itself, as any other error
    gone = str(tmp_path / "b" / "c")
    assert os_error_line(NotADirectoryError(errno.ENOTDIR, "Not a directory", gone)) == \
        f"{gone}: a part of the path is a file, not a folder (check the path)"


def test_a_pinned_pair_out_of_name_order_is_planned_in_its_order(three_classes, tmp_path, private_cache):
    from fasttl.transfer.job import run

    pair = "efficientnet_lite1+efficientnet_lite0"
    metrics = run(data=str(three_classes), budget="10m", image_size=32, backbone=pair, strategy="linear",
                  mirror_views="none", out=str(tmp_path / "run"), progress=False)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    plan = metrics["notes"]["plan"]
    assert config["backbone"] == pair and plan["chosen"]["backbone"] == pair
    assert plan["candidates"][-1]["backbone"] == pair
    # each backbone's head in the pair's order (few images: one head per backbone, averaged)
    assert [p["backbone"] for p in metrics["notes"]["choice"]["parts"]] == pair.split("+")
    # the pair pinned, nothing else was eligible: the few-images rule ranked nothing, and is not said
    assert not plan["more_backbones_first"]
    assert "come first" not in (tmp_path / "run" / "report.md").read_text()


def test_the_views_note_says_what_training_does_with_both():
    from fasttl.transfer.report import _views_note

    note = _views_note({"strategy": "linear", "mirror_views": "both"})
    assert note == ("; views: train plain and mirrored (each a row the head trains on), "
                    "test plain and mirrored (logits averaged)")
