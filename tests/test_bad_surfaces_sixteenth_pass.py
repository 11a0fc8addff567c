"""The sixteenth hostile pass (the budget planner, backbones side by side, the speed record): each
finding as a test of what fasttl does now. Side by side of caches extracted apart is in
test_concatenated_backbone.py; an int8 run's graph in test_int8_runs.py."""
import json
import re

import pytest

from conftest import cifar_subset, cli, one_line_error

from fasttl.transfer import budget, plan_candidates, planner
from fasttl.util.errors import OptionError


@pytest.fixture(scope="module")
def three_small(tmp_path_factory, cifar10_root):
    return cifar_subset(cifar10_root, tmp_path_factory.mktemp("three-small") / "three", ["cat", "dog", "ship"], 6, 2)


def test_a_first_head_that_cannot_fit_the_budget_is_refused_before_it_runs(three_small, tmp_path, private_cache,
                                                                           monkeypatch, capsys):
    """The first head fit is timed as one solve before the cross-validated path runs: a path
    that would outrun the budget (here made to look so) is refused at once, no fit made."""
    from fasttl.heads import tuning

    from fasttl.transfer import plan_refusals

    monkeypatch.setattr(plan_refusals, "HEAD_ESTIMATE_SHARE", 1e6)
    monkeypatch.setattr(tuning, "_cross_validated_linear", lambda *a, **k: pytest.fail("the path ran"))
    code, _, err = cli(capsys, "run", "--data", three_small, "--budget", "1m", "--image-size", "32", "--out",
                       tmp_path / "run", "--no-progress")
    line = one_line_error(err)
    assert code == 2 and re.search(r"validating the first head on its 18 probe rows needs (about \S+|more than "
                                   r"168h) with the screening", line)
    assert "no --budget up to 168.0h fits it" in line or "pass --budget" in line


def _planner(**state):
    plan = planner.Planner.__new__(planner.Planner)
    plan.__dict__.update(dict(dict(screened=[], candidates=[], skipped=[], record_used=False, pinned={},
                                   smallest_class=1), **state))
    return plan


@pytest.mark.parametrize("recorded,expected", [(None, (50.0, False)), (0.01, (50.0, False)), (20.0, (20.0, True)),
                                               (500.0, (500.0, True))])
def test_a_recorded_speed_far_below_the_plans_own_measurement_is_not_trusted(monkeypatch, recorded, expected):
    """Lite0 measured at 100 images/s at 32 px now: a record saying Lite1 runs 0.01 images/s there is
    stale (the family differs by 4x at most), so Lite1 is screened (costed at half the measured
    speed) instead of passed over for "no time" forever."""
    import types

    measured = plan_candidates.Screened("efficientnet_lite0", 32, [], [100.0], 1.0)
    plan = _planner(cfg=types.SimpleNamespace(), screened=[measured], _speed_key=lambda name, size: f"{name}@{size}")
    monkeypatch.setattr(budget, "measured_speed", lambda key: recorded)
    assert plan._expected_speed("efficientnet_lite1", 32) == expected


def _candidate(backbone, size=32, mode="test", head="linear", score=0.0, planned=10.0, scored_by="accuracy"):
    return plan_candidates.Candidate(backbone, size, mode, head, score, scored_by, planned, 1.0)


def test_equal_scores_go_to_the_defaults_not_to_timing_noise():
    """One image a class: nothing can be scored, every score 0; the plan keeps the run's defaults
    (Lite0 at the run's size, linear, test views), as its report says, even where another backbone's
    probe happened to time cheaper."""
    import types
    import time

    cfg = types.SimpleNamespace(backbone="efficientnet_lite0", image_size=32, mirror_views="test", strategy="linear")
    plan = _planner(cfg=cfg, budget_s=600.0, started=time.perf_counter())
    plan.candidates = [_candidate("efficientnet_lite1", planned=5.0, scored_by="none (no validation split)"),
                       _candidate("efficientnet_lite0", planned=9.0, scored_by="none (no validation split)"),
                       _candidate("efficientnet_lite0", mode="none", planned=4.0,
                                  scored_by="none (no validation split)")]
    assert plan._choose().options() == {"backbone": "efficientnet_lite0", "image_size": 32, "mirror_views": "test",
                                        "strategy": "linear"}
    plan.candidates.append(_candidate("efficientnet_lite2", score=0.5))  # a real score still wins
    assert plan._choose().backbone == "efficientnet_lite2"


def test_options_passed_as_none_are_not_pins(three_small, tmp_path, private_cache, monkeypatch):
    """run(budget=..., image_size=None) from a script: None is the default, not a pinned size."""
    seen = {}

    def plan(self):
        seen.update(self.pinned)
        raise OptionError("budget: stop here")

    monkeypatch.setattr(planner.Planner, "plan", plan)
    from fasttl.transfer.job import run

    with pytest.raises(OptionError, match="stop here"):
        run(data=str(three_small), budget="1m", image_size=None, mirror_views="none", out=str(tmp_path / "run"),
            progress=False)
    assert seen == {"mirror_views": "none"}


def test_a_refusal_names_the_speed_record_only_where_it_was_used(three_small, tmp_path, private_cache, monkeypatch,
                                                                 capsys):
    """Small data never writes the record: a budget refused after the plan's own measurements says
    nothing of a file that is not there."""
    monkeypatch.setenv("FASTTL_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setattr(planner.Planner, "_full_cost", lambda *a: 1e4)  # every full run needs more than is left
    code, _, err = cli(capsys, "run", "--data", three_small, "--budget", "1m", "--image-size", "32",
                       "--backbone", "efficientnet_lite0", "--mirror-views", "none", "--out", tmp_path / "run",
                       "--no-progress")
    line = one_line_error(err)
    assert code == 2 and "is too small for a model on this data here" in line
    assert budget.SPEED_FILE not in line and not (tmp_path / "state" / budget.SPEED_FILE).exists()


@pytest.mark.parametrize("seconds,suggestion", [(90, "pass --budget 90s or more"), (7000, "pass --budget 117m or more"),
                                                (1e5, "pass --budget 28h or more"),
                                                (1e9, "no --budget up to 168.0h fits it")])
def test_a_suggested_budget_is_one_budget_takes(seconds, suggestion):
    assert budget.suggested(seconds) == suggestion
    if "pass" in suggestion:
        budget.parse_budget(suggestion.split()[2])


def test_a_slow_speed_record_refusing_a_budget_names_itself(three_small, tmp_path, private_cache, monkeypatch, capsys):
    # At the slowest rate a record may hold (slower ones are damage, measured again: forty-second pass)
    monkeypatch.setenv("FASTTL_STATE_DIR", str(tmp_path / "state"))
    (tmp_path / "state").mkdir()
    keys = [budget.speed_key(b, 32, "multi", "onnxruntime", "fp32", "cpu") for b, _ in planner.SINGLES]
    (tmp_path / "state" / budget.SPEED_FILE).write_text(json.dumps(
        {budget._machine_key(): {key: {"images_per_s": budget.MIN_RATE["images_per_s"], "images": 500}
                                 for key in keys}}))
    code, _, err = cli(capsys, "run", "--data", three_small, "--budget", "1m", "--image-size", "32", "--out",
                       tmp_path / "run", "--no-progress")
    line = one_line_error(err)
    assert code == 2 and "is too small for a model on this data here" in line and budget.SPEED_FILE in line
    suggested = line.split("pass --budget ")[1].split()[0]
    assert budget.parse_budget(suggested) > 60


@pytest.mark.parametrize("words,culprit", [
    (["run", "--backbone", "resnet18+resnet34"], "resnet18 can't be joined"),
    (["run", "--backbone", "resnet18+resnet34", "--weights", "w.pth"], "resnet18 can't be joined"),
    (["extract", "--backbone", "efficientnet_lite0+resnet18", "--data", "data", "--out", "x"],
     "resnet18 can't be joined"),
    (["run", "--backbone", "efficientnet_lite0+resnet18"], "resnet18 can't be joined"),
])
def test_resnets_do_not_join_and_every_command_says_so_alike(capsys, tmp_path, monkeypatch, words, culprit):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "w.pth").write_bytes(b"")
    (tmp_path / "data" / "cat").mkdir(parents=True)
    code, _, err = cli(capsys, *words, *(["--out", tmp_path / "run", "--no-progress"] if words[0] == "run" else []))
    line = one_line_error(err)
    assert code == 2 and culprit in line and "efficientnet_lite0, efficientnet_lite1, efficientnet_lite2" in line
    assert not (tmp_path / "run").exists() and not (tmp_path / "x").exists()


def test_the_run_help_offers_only_lites_to_join(capsys):
    with pytest.raises(SystemExit):
        cli(capsys, "run", "--help")
    flat = " ".join(capsys.readouterr().out.split())
    assert "or 2 to 3 of efficientnet_lite0, efficientnet_lite1, efficientnet_lite2 joined by '+'" in flat


def test_predict_with_a_pair_and_no_run_names_what_predict_can_do(capsys, three_small):
    image = sorted((three_small / "test" / "cat").iterdir())[0]
    code, _, err = cli(capsys, "predict", "--backbone", "efficientnet_lite0+efficientnet_lite1", image)
    line = one_line_error(err)
    assert code != 0 and "use --strategy" not in line and "pass one backbone" in line


def test_predict_on_a_run_folder_without_run_suggests_it(capsys, tmp_path):
    """A run folder among the images is passed over, and the note says how to predict with it."""
    from fasttl.predict import image_files
    from fasttl.transfer.rundir import write_config

    (tmp_path / "run").mkdir()
    write_config(str(tmp_path / "run"), {})  # the marker records its config.json (another one beside it is refused)
    (tmp_path / "a.jpg").write_bytes(b"x")
    _, ignored = image_files([str(tmp_path)])
    assert any(f"pass --run {tmp_path / 'run'}" in why for _, why in ignored)


@pytest.mark.parametrize("scored_images,classes,caveat", [(3, 3, True), (300, 3, False), (0, 3, False)])
def test_the_report_says_when_the_chosen_score_is_over_too_few_images(scored_images, classes, caveat):
    from fasttl.transfer.report import _plan

    chosen = {"backbone": "efficientnet_lite0", "image_size": 32, "head": "mlp", "mirror_views": "test",
              "score": 0.0, "scored_by": "accuracy", "planned_s": 5, "scored_images": scored_images}
    plan = {"budget": "1m", "budget_s": 60, "chosen": chosen, "candidates": [chosen], "probe": {},
            "scored_too_few": 0 < scored_images < plan_candidates.SCORED_PER_CLASS * classes}
    text = "\n".join(_plan({"mlp": {"notes": {"plan": plan}}}))
    assert ("too few to tell the candidates apart" in text) == caveat


def test_cross_validated_balanced_accuracy_is_said_as_cross_validated():
    """Imbalanced data cross-validated: the score is out of fold too, and the report's caveat on
    test and none (alike under cross-validation) applies as on balanced data."""
    score, scored_by, images = plan_candidates.score_of({"cross_validation": "5-fold, stratified", "cv_accuracy": 0.5,
                                                         "val_balanced_accuracy": 0.4,
                                                         "validation": {"cross_validated_images": 21}})
    assert (score, scored_by, images) == (0.4, "cross-validated balanced accuracy", 21)
    one_split = {"val_accuracy": 0.7, "validation": {"validation_images": 3}}
    assert plan_candidates.score_of(one_split) == (0.7, "accuracy", 3)
