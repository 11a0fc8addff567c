"""Distillation's teacher: soft targets per view (the mirrored image's own logits for a mirrored
batch), ensembles of teachers, T and alpha chosen on validation, and what bad teachers get."""
import json
import os

import numpy as np
import pytest
import torch
from conftest import TINY_CIFAR_CLASSES
from torch import nn

import fasttl
from fasttl.data import ImageLoader
from fasttl.data.sources import ArraySource
from fasttl.util.errors import OptionError
from fasttl.transfer import registry
from fasttl.transfer.config import RunConfig
from fasttl.transfer.job import run
from fasttl.transfer.models import BackboneWithHead
from fasttl.transfer.trained import TrainedModel
from fasttl.transfer import small_cnn
from fasttl.transfer.rundir import write_recorded
from fasttl.transfer.strategies import distill

pytestmark = pytest.mark.usefixtures("private_cache")
CLASSES = TINY_CIFAR_CLASSES


def _arrays(n=6, size=8, seed=0):
    rng = np.random.default_rng(seed)
    return ArraySource(rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8), np.arange(n) % 2, ["a", "b"])


def _plain_images(model, source):
    return torch.cat([x for x, _ in ImageLoader(source, model.spec, 64, device=model.device)])


def test_a_mirrored_view_gets_the_logits_of_the_mirrored_image():
    # A module that is not mirror-invariant (a linear map of the raw pixels): the mirrored view's
    # logits must be the module's output on the mirrored images, not on the plain ones.
    torch.manual_seed(0)
    module = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 2))
    model = TrainedModel(module, small_cnn.native_spec(8), ["a", "b"], torch.device("cpu"))
    source = _arrays()
    plain = _plain_images(model, source)
    views = distill.teacher_view_logits(model, source)
    assert views.shape == (2, 6, 2)
    torch.testing.assert_close(views[0], module(plain).detach())
    torch.testing.assert_close(views[1], module(plain.flip(-1)).detach())
    assert (views[0] - views[1]).abs().max() > 1e-2  # the two views do differ: the test can tell them apart


def test_a_feature_teacher_takes_the_mirrored_view_from_the_mirrored_cache(tiny_cifar, linear_teacher):
    from fasttl.transfer.datasets import load_dataset

    model = registry.get("linear").load(str(linear_teacher), torch.device("cpu"))
    ds = load_dataset(str(tiny_cifar))
    views = distill.teacher_view_logits(model, ds.train)
    plain = _plain_images(model, ds.train)  # the teacher's own preprocessing, in memory
    # model.module averages both views (--mirror-views test); this one sees the image it is given
    one_view = BackboneWithHead(model.backbone, model.head, model.extraction.taps)
    with torch.no_grad():
        expected = [one_view(plain), one_view(plain.flip(-1))]
        torch.testing.assert_close(model.module(plain), (expected[0] + expected[1]) / 2)
    for view, name in ((0, "plain"), (1, "mirrored")):
        # The cache holds fp16 features: close, not equal.
        torch.testing.assert_close(views[view], expected[view], atol=2e-2, rtol=2e-2, msg=lambda m: f"{name}: {m}")
    assert (views[0] - views[1]).abs().max() > 5e-2


def test_the_student_is_given_the_logits_of_the_view_it_is_shown():
    # cnn_epoch flips a seeded half of each batch; the loss must get view 1's logits for exactly
    # the images the model saw mirrored, view 0's for the others.
    torch.manual_seed(0)
    images = torch.randn(10, 3, 4, 4)
    labels = torch.arange(10) % 3
    seen = []

    class Recorder(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(48, 3)

        def forward(self, x):
            seen.append(x.detach().clone())
            return self.linear(x.flatten(1))

    teacher = torch.randn(2, 10, 3)
    losses = []

    def loss_fn(logits, idx, mirrored):
        for k, i in enumerate(idx.tolist()):  # what the model was shown is what the loss believes
            expected = images[i].flip(-1) if mirrored[k] else images[i]
            assert torch.equal(seen[-1][k], expected)
        chosen = small_cnn.cnn_loss(labels, teacher, 2.0, 0.5)(logits, idx, mirrored)
        by_hand = fasttl.distillation_loss(logits, teacher[mirrored.long(), idx], labels[idx], temperature=2.0, alpha=0.5)
        torch.testing.assert_close(chosen, by_hand)
        losses.append(mirrored)
        return chosen

    model = Recorder()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    small_cnn.cnn_epoch(model, images, labels, 4, optimizer, None, 0, 0, loss_fn)
    flags = torch.cat(losses)
    assert 0 < int(flags.sum()) < len(flags)  # both views occur


def test_distill_records_the_choice_and_both_views(tiny_cifar, linear_teacher, tmp_path):
    out = tmp_path / "student"
    metrics = run(data=str(tiny_cifar), strategy="distill", teacher=str(linear_teacher), epochs=2, out=str(out),
                  compare="none", image_size=32, progress=False, seed=0)
    choice = metrics["notes"]["choice"]
    assert (choice["temperature"], choice["alpha"]) in distill.SWEEP
    assert len(choice["sweep"]) == len(distill.SWEEP) and choice["validation"]["validation_images"] >= 4
    assert metrics["notes"]["temperature"] == choice["temperature"]
    saved = json.loads((out / "metrics.json").read_text())["notes"]["choice"]
    assert saved["val_accuracy"] == max(r["val_accuracy"] for r in saved["sweep"])
    from safetensors.torch import load_file

    logits = load_file(str(out / distill.TEACHER_LOGITS))
    assert logits["logits"].shape == logits["logits_mirror"].shape == (48, len(CLASSES))
    assert not torch.equal(logits["logits"], logits["logits_mirror"])
    assert "Choices made on validation" in (out / "report.md").read_text()
    # Given both, T and alpha are used as they are: no sweep.
    given = run(data=str(tiny_cifar), strategy="distill", teacher=str(linear_teacher), epochs=1,
                out=str(tmp_path / "given"), compare="none", image_size=32, progress=False, seed=0,
                temperature=3.0, alpha=0.7)
    assert given["notes"]["choice"] == {"temperature": 3.0, "alpha": 0.7, "given": True}


def test_the_sweep_is_a_third_of_the_epochs_up_to_its_cap(tiny_cifar, linear_teacher, tmp_path, monkeypatch):
    def sweep_epochs(epochs, name):
        metrics = run(data=str(tiny_cifar), strategy="distill", teacher=str(linear_teacher), epochs=epochs,
                      out=str(tmp_path / name), compare="none", image_size=32, progress=False, seed=0)
        return metrics["notes"]["choice"]["sweep_epochs"]

    assert sweep_epochs(4, "third") == 2  # ceil(4 / 3)
    monkeypatch.setattr(distill, "SWEEP_EPOCHS_MAX", 1)
    assert sweep_epochs(4, "capped") == 1


def test_a_resumed_distill_run_keeps_its_sweeps_choice(tiny_cifar, linear_teacher, tmp_path, monkeypatch):
    out = tmp_path / "student"
    options = dict(data=str(tiny_cifar), strategy="distill", teacher=str(linear_teacher), epochs=2, out=str(out),
                   compare="none", image_size=32, progress=False, seed=0)
    first = run(**options)
    assert json.loads((out / distill.CHOICE).read_text()) == first["notes"]["choice"]
    os.remove(out / "metrics.json")  # as a run killed after the sweep leaves it

    def no_sweep(*args, **kwargs):
        raise AssertionError("a resumed run swept again")

    monkeypatch.setattr(distill, "choose_on_validation", no_sweep)
    resumed = run(**options, resume=True)
    assert resumed["notes"]["choice"] == first["notes"]["choice"] and resumed["accuracy"] == first["accuracy"]
    # A damaged or edited choice is never trusted: the sweep runs again.
    cfg = RunConfig(**options).resolved(32)
    for bad in ('{"temperature": -1, "alpha": 0.5}', '{"temperature": 2, "alpha": "0.5"}', '{"temperature": 2}',
                '[1, 2]', '{"temperature": NaN, "alpha": 0.5}', '{"temperature": 4, "alpha": 0.5, '
                '"distill_features": "yes"}', 'not json', '{"temperature": 3, "alpha": 0.5}',
                '{"temperature": true, "alpha": 0.5}', '{"temperature": 4, "alpha": 0.5, "distill_features": true}'):
        # as fasttl records it (the last three: values this run's sweep can't choose) ...
        write_recorded(str(out), distill.CHOICE, bad.encode())
        assert distill.saved_choice(str(out), cfg) is None, bad
    write_recorded(str(out), distill.CHOICE, b'{"temperature": 4, "alpha": 0.5, "distill_features": false}')
    assert distill.saved_choice(str(out), cfg)["temperature"] == 4
    # ... and a sound choice edited by hand, which its recorded SHA-256 tells apart
    (out / distill.CHOICE).write_text('{"temperature": 4, "alpha": 0.5, "distill_features": false} ')
    assert distill.saved_choice(str(out), cfg) is None
    with pytest.raises(AssertionError, match="swept again"):
        os.remove(out / "metrics.json")
        run(**options, resume=True)


def test_an_ensemble_averages_its_teachers_per_view(tiny_cifar, linear_teacher, tmp_path):
    mlp = tmp_path / "mlp"
    run(data=str(tiny_cifar), strategy="mlp", epochs=2, out=str(mlp), image_size=32, progress=False, seed=0)
    out = tmp_path / "student"
    metrics = run(data=str(tiny_cifar), strategy="distill", teacher=[str(linear_teacher), str(mlp)], epochs=1,
                  out=str(out), compare="none", image_size=32, progress=False, seed=0, temperature=2.0, alpha=0.5,
                  teacher_logits="in-sample")
    assert metrics["notes"]["teacher"] == [str(linear_teacher), str(mlp)]
    from safetensors.torch import load_file

    from fasttl.transfer.datasets import load_dataset

    ds = load_dataset(str(tiny_cifar))
    each = [distill.teacher_view_logits(registry.get(name).load(str(path), torch.device("cpu")), ds.train)
            for name, path in (("linear", linear_teacher), ("mlp", mlp))]
    saved = load_file(str(out / distill.TEACHER_LOGITS))
    expected = (each[0] + each[1]) / 2
    torch.testing.assert_close(saved["logits"], expected[0])
    torch.testing.assert_close(saved["logits_mirror"], expected[1])


def test_repeated_teacher_flags_make_a_list():
    from fasttl.cli import build_parser

    args = build_parser().parse_args(["run", "--strategy", "distill", "--teacher", "runs/a", "--teacher", "runs/b"])
    assert args.teacher == ["runs/a", "runs/b"]


@pytest.mark.parametrize("teacher, match", [
    (["runs/a", "runs/a"], "^teacher: .* names a run twice"),
    ([], "^teacher: --strategy distill needs --teacher"),
    (["runs/a", 3], "^teacher: expected a run folder or a list"),
    (["runs/a", ""], "^teacher: expected a run folder or a list"),
])
def test_bad_teacher_lists_are_refused_naming_the_option(teacher, match):
    with pytest.raises(OptionError, match=match):
        RunConfig(strategy="distill", teacher=teacher).resolved(32)


def test_a_teacher_that_cannot_teach_or_has_other_classes_is_refused(tiny_cifar, linear_teacher, tmp_path):
    student = run(data=str(tiny_cifar), strategy="scratch", epochs=1, out=str(tmp_path / "scratch"), compare="none",
                  image_size=32, progress=False, seed=0)
    assert student["strategy"] == "scratch"
    with pytest.raises(OptionError, match="^teacher: .* is a 'scratch' run"):
        run(data=str(tiny_cifar), strategy="distill", teacher=[str(linear_teacher), str(tmp_path / "scratch")],
            epochs=1, out=str(tmp_path / "x"), compare="none", image_size=32, progress=False, seed=0)
    assert not (tmp_path / "x" / distill.TEACHER_LOGITS).exists()  # refused before any teacher ran
    taught = json.loads((linear_teacher / "config.json").read_text())["classes"]
    with pytest.raises(OptionError, match=r"same classes in another order .* in a --classes-file"):
        distill.teacher_model(str(linear_teacher), taught[::-1], torch.device("cpu"))
    with pytest.raises(OptionError, match=r"but the data has 'a', 'b'; give a teacher trained on the data's classes"):
        distill.teacher_model(str(linear_teacher), ["a", "b"], torch.device("cpu"))


@pytest.mark.parametrize("temperature, alpha, expected", [
    (None, None, list(distill.SWEEP)),
    (3.0, None, [(3.0, a) for a in distill.ALPHAS]),
    (None, 0.2, [(t, 0.2) for t in distill.TEMPERATURES]),
    (2.0, 0.4, [(2.0, 0.4)]),
])
def test_a_value_given_is_kept_fixed_in_the_sweep(temperature, alpha, expected):
    assert distill.candidates(temperature, alpha) == expected


# ---- --distill-features ------------------------------------------------------------------------
def test_the_feature_term_matches_the_projection_to_the_features_of_the_view_shown():
    torch.manual_seed(0)
    from fasttl.transfer.models import SmallCNN

    student = SmallCNN(3)
    teacher = torch.randn(2, 10, 7).half() * 3
    hint = distill.FeatureHint(SmallCNN.FEATURE_DIM, teacher, seed=4, device=torch.device("cpu"), dtype=torch.float32)
    rms = teacher.double().pow(2).mean().sqrt()
    hint.attach(student)
    images = torch.randn(10, 3, 8, 8)
    idx, mirrored = torch.tensor([3, 0, 9, 4]), torch.tensor([True, False, False, True])
    x = torch.where(mirrored.view(-1, 1, 1, 1), images[idx].flip(-1), images[idx])
    student(x)
    value = hint(idx, mirrored)
    hidden = student.features(x)
    expected = (hint.projection(hidden).double() - teacher[mirrored.long(), idx].double() / rms).pow(2).mean()
    assert float(value.detach()) == pytest.approx(distill.FEATURE_WEIGHT * float(expected.detach()), rel=2e-3)
    value.backward()
    assert hint.projection.weight.grad.abs().sum() > 0 and student.features[0][0].weight.grad.abs().sum() > 0
    hint.detach()
    student(x)
    assert hint.hidden is None  # the hook is gone: the student alone is what gets saved and run


def test_distill_features_is_kept_only_if_it_scores_higher_on_validation(tiny_cifar, linear_teacher, tmp_path):
    out = tmp_path / "student"
    metrics = run(data=str(tiny_cifar), strategy="distill", teacher=str(linear_teacher), epochs=1, out=str(out),
                  compare="none", image_size=32, progress=False, seed=0, temperature=2.0, alpha=0.5,
                  distill_features=True)
    choice = metrics["notes"]["choice"]
    without = choice["sweep"][0]["val_accuracy"]
    assert choice["distill_features"] == (choice["features_val_accuracy"] > without)
    assert choice["val_accuracy"] == max(without, choice["features_val_accuracy"])
    images = choice["validation"]["validation_images"]
    assert choice["features_val_accuracy"] * images == pytest.approx(round(choice["features_val_accuracy"] * images))
    assert f"distill features {choice['distill_features']}" in (out / "report.md").read_text()
    # the saved student is the plain CNN (the projection is dropped) and loads like any other
    model = registry.get("distill").load(str(out), torch.device("cpu"))
    assert not any("projection" in key for key in model.module.state_dict())


def test_distill_features_needs_a_teacher_with_cached_features(tiny_cifar, monkeypatch):
    from fasttl.transfer.datasets import load_dataset

    plain = TrainedModel(nn.Linear(2, 2), small_cnn.native_spec(8), CLASSES, torch.device("cpu"))
    monkeypatch.setattr(distill, "teacher_model", lambda *args: plain)
    monkeypatch.setattr(distill, "read_config", lambda path: {"strategy": "finetune"})
    with pytest.raises(OptionError, match=r"^distill_features: the teacher .* is a 'finetune' run.*linear or mlp"):
        distill.teacher_features_for("runs/ft", load_dataset(str(tiny_cifar)), RunConfig(progress=False))


def test_distill_options_are_refused_for_other_strategies(tiny_cifar, tmp_path):
    for option in ({"distill_features": True}, {"temperature": 2.0}):
        with pytest.raises(OptionError, match=r"is read only by --strategy distill"):
            run(data=str(tiny_cifar), strategy="linear", out=str(tmp_path / "x"), image_size=32, progress=False,
                **option)


def test_teachers_with_damaged_configs_or_given_twice_through_a_link_are_refused(tiny_cifar, linear_teacher, tmp_path):
    import shutil

    def config_with(name, **changes):
        folder = tmp_path / name
        shutil.copytree(linear_teacher, folder)
        config = json.loads((folder / "config.json").read_text())
        config.update(changes)
        (folder / "config.json").write_text(json.dumps(config))
        return str(folder)

    cases = [(config_with("classes-int", classes=5),
              r"^teacher: .*classes-int/config.json: field 'classes' is 5 \(expected a list of at least 2"),
             (config_with("unknown", strategy="bogus"),
              r"^teacher: .*unknown/config.json: field 'strategy' is 'bogus' \(expected one of linear"),
             (str(tmp_path), r"^teacher: .*no config.json; not a fasttl run folder \(--teacher takes a finished fasttl")]
    for teacher, match in cases:
        with pytest.raises(OptionError, match=match):
            run(data=str(tiny_cifar), strategy="distill", teacher=teacher, epochs=1, out=str(tmp_path / "x"),
                compare="none", image_size=32, progress=False)
    (tmp_path / "link").symlink_to(linear_teacher)
    with pytest.raises(OptionError, match="names a run twice"):
        RunConfig(strategy="distill", teacher=[str(linear_teacher), str(tmp_path / "link")]).resolved(32)


def test_distill_features_with_one_image_per_class_trains_with_the_defaults(tiny_cifar, linear_teacher, tmp_path):
    # nothing can be held out: no sweep, no feature term, and the report says the defaults were used
    out = tmp_path / "one"
    metrics = run(data=str(tiny_cifar), strategy="distill", teacher=str(linear_teacher), epochs=1, out=str(out),
                  compare="none", image_size=32, progress=False, seed=0, train_per_class=1, distill_features=True)
    choice = metrics["notes"]["choice"]
    assert choice["distill_features"] is False and choice["validation"]["validation_images"] == 0
    assert (choice["temperature"], choice["alpha"]) == distill.SWEEP[0]
    assert "no validation split could be carved" in (out / "report.md").read_text()
