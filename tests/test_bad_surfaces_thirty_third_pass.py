"""The thirty-third hostile pass (28 attempts; pass 32's eight fixes held): a NaN or Infinity in the
per-machine speed record ended every run that extracted 200 images in a traceback after its
extraction; nested WebDataset brace groups escaped the shard count (each level doubled the names:
40 s and 1 GB for 94 characters); a float64 optimizer state beyond float32's range loaded as inf,
and an infinite lr was taken; an interrupted planned run was told to --resume, which planned runs
refuse; a blank path ("  ") was a folder name; FeatureCache.write/open("") meant the current folder."""
import json
import math
import time

import pytest
import torch

import fasttl
from conftest import cli
from fasttl.transfer import budget
from fasttl.util import files

pytestmark = pytest.mark.usefixtures("private_cache")


@pytest.mark.parametrize("content", ['{"deadbeef": {"k": NaN}}', '{"c": {"x": {"images_per_s": Infinity}}}',
                                     '{"c": {"x": {"images_per_s": -Infinity}}}', '{"c": 1e999}'])
def test_a_speed_record_holding_nan_or_infinity_is_measured_again(content, tmp_path, monkeypatch):
    monkeypatch.setenv("FASTTL_STATE_DIR", str(tmp_path))
    (tmp_path / budget.SPEED_FILE).write_text(content)
    key = budget.speed_key("efficientnet_lite0", 32, "head", "onnxruntime", "fp32", "cpu")
    assert budget.measured_speed(key) is None
    budget.record_speed(key, 500, 2.0)  # no traceback: the damaged record is replaced by a strict one
    assert budget.measured_speed(key) == pytest.approx(250.0)
    files.read_json(str(tmp_path / budget.SPEED_FILE), strict=True)  # strict JSON again


@pytest.mark.parametrize("text", ["NaN", "Infinity", "-Infinity", "1e999", "[1, -1e400]"])
def test_a_strict_read_refuses_what_fasttl_never_writes(text, tmp_path):
    """fasttl writes JSON without NaN or infinities (files.json_bytes): a strict read (the speed
    record's, which is written back whole) refuses them as not valid JSON, naming the file; other
    readers name the field that holds one (the run schema, a teacher's settings)."""
    path = tmp_path / "extraction-speed.json"
    path.write_text('{"accuracy": %s}' % text)
    with pytest.raises(ValueError, match=r"extraction-speed\.json: not valid JSON"):
        files.read_json(str(path), strict=True)
    files.read_json(str(path))  # the plain read leaves the value to the reader's own checks
    path.write_text('{"accuracy": 0.5, "big": 1.7e308, "small": -1e-320}')
    assert files.read_json(str(path), strict=True) == {"accuracy": 0.5, "big": 1.7e308, "small": -1e-320}


def test_a_run_goes_on_past_a_damaged_speed_record(cat_ship, tmp_path, monkeypatch):
    from fasttl.transfer.job import run

    monkeypatch.setenv("FASTTL_STATE_DIR", str(tmp_path / "state"))
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / budget.SPEED_FILE).write_text('{"other machine": {"k": NaN}}')
    monkeypatch.setattr(budget, "MIN_MEASURED_IMAGES", 1)  # this run's few images are recorded
    metrics = run(data=str(cat_ship), out=str(tmp_path / "run"), image_size=32, features="head", compare="none",
                  progress=False)
    assert metrics["samples"] == 6
    record = files.read_json(str(tmp_path / "state" / budget.SPEED_FILE), strict=True)
    assert all(math.isfinite(entry["images_per_s"]) for entry in record[budget._machine_key()].values())


@pytest.mark.parametrize("pattern", ["s{{a,b},c}.tar", "s{a,{0..9}}.tar", "s" + "{" * 22 + "a,b}" + ",c}" * 21 + ".tar",
                                     "{{0..999999},x}.tar"])
def test_nested_brace_groups_are_refused_at_once(pattern, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    started = time.perf_counter()
    code, _, err = cli(capsys, "run", "--data", pattern, "--out", tmp_path / "run", "--no-progress")
    assert code == 2 and "nests brace groups; write each group apart" in err and err.count("\n") == 1
    assert time.perf_counter() - started < 30  # the 22-level pattern took 40 s and 1 GB before
    assert not (tmp_path / "run").exists()


def test_brace_groups_side_by_side_still_expand():
    from fasttl.data.formats.webdataset import expand_braces

    assert expand_braces("s-{a,b}-{08..10}.tar") == ["s-a-08.tar", "s-a-09.tar", "s-a-10.tar", "s-b-08.tar",
                                                      "s-b-09.tar", "s-b-10.tar"]


def _saved(optimizer, **state):
    saved = optimizer.state_dict()
    saved["state"] = {0: dict({"step": torch.tensor(3.0), "exp_avg": torch.zeros(4),
                               "exp_avg_sq": torch.ones(4)}, **state)}
    return saved


@pytest.mark.parametrize("kind", ["Adam", "AdamW"])
@pytest.mark.parametrize("key", ["exp_avg", "exp_avg_sq"])
@pytest.mark.parametrize("value", [1e300, -1e39, 3.5e38])
def test_optimizer_state_beyond_float32_is_refused_naming_the_key(kind, key, value):
    p = torch.nn.Parameter(torch.randn(4))
    optimizer = getattr(fasttl.optim, kind)([p], lr=1e-3)
    state = torch.full((4,), value, dtype=torch.float64)
    if key == "exp_avg_sq":
        state = state.abs()
    with pytest.raises(ValueError, match=rf"\['{key}'\]: holds NaN or infinite values, or values beyond float32"):
        optimizer.load_state_dict(_saved(optimizer, **{key: state}))
    optimizer.load_state_dict(_saved(optimizer, **{key: torch.full((4,), 3e38, dtype=torch.float64)}))  # in range


@pytest.mark.parametrize("lr", [float("inf"), 1e39, torch.tensor(float("inf")), float("nan"), -1.0])
def test_an_lr_float32_cannot_hold_is_refused(lr):
    p = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match=r"^lr: expected a finite number >= 0"):
        fasttl.optim.AdamW([p], lr=lr)


def test_an_interrupted_planned_run_is_told_to_start_over(capsys, monkeypatch, tmp_path):
    from fasttl.transfer import job

    def interrupted(**options):
        raise KeyboardInterrupt

    monkeypatch.setattr(job, "run", interrupted)
    code, _, err = cli(capsys, "run", "--budget", "2m", "--out", tmp_path / "run", "--no-progress")
    assert code == 130 and "a planned run (--budget) does not resume" in err and "--overwrite" in err
    assert "--resume" not in err
    code, _, err = cli(capsys, "run", "--out", tmp_path / "run", "--no-progress")
    assert code == 130 and "with --resume continues" in err


def test_an_unfinished_planned_teacher_is_not_sent_to_resume(monkeypatch, tmp_path):
    from fasttl.transfer import rundir
    from fasttl.transfer.rundir import RunError

    for planned, said in (("2m", "run its command again with --overwrite (a planned run"),
                          (None, "finish it with `fasttl run ... --resume`")):
        monkeypatch.setattr(rundir, "read_config", lambda run_dir, planned=planned: {"budget": planned})
        with pytest.raises(RunError, match=r"the run did not finish \(no metrics\.json\); " + said.replace("(", r"\(")
                           .replace(".", r"\.")):
            rundir.load_trained(str(tmp_path), "cpu")


@pytest.mark.parametrize("words", [["run", "--out", "  "], ["run", "--data", " "], ["eval", " "],
                                   ["predict", "--run", "r", "x.jpg", "--out", "\t"]])
def test_a_blank_path_is_refused_as_an_empty_one(words, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stopped:
        cli(capsys, *words)
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and ": an empty or blank path given as" in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("directory", ["", "  ", None, 3])
def test_feature_cache_folders_are_never_blank(directory, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    error = TypeError if not isinstance(directory, str) else ValueError
    with pytest.raises(error, match=r"^directory: "):
        fasttl.FeatureCache.write(directory, [torch.randn(6, 4)], [0, 1] * 3, classes=["a", "b"])
    with pytest.raises(error, match=r"^directory: "):
        fasttl.FeatureCache.open(directory)
    with pytest.raises(error, match=r"^out_dir: "):
        fasttl.FeatureCache.build(None, None, directory)
    assert list(tmp_path.iterdir()) == []


def test_metrics_json_written_is_strict(tmp_path):
    files.write_json_atomic(str(tmp_path / "m.json"), {"a": 1.5})
    assert json.loads((tmp_path / "m.json").read_text()) == {"a": 1.5}
    with pytest.raises(ValueError):
        files.write_json_atomic(str(tmp_path / "n.json"), {"a": float("nan")})
