"""--teacher-logits cross-fitted: each training image's soft targets come from a teacher head
refit, at the teacher's chosen settings, without that image's fold; in-sample where that can't
be done; and what damaged teachers and saved files get."""
import hashlib
import json
import os
import shutil

import numpy as np
import pytest

from fasttl.transfer.rundir import write_config
import torch
from torch import nn

from fasttl.data.splits import stratified_folds
from fasttl.heads import shrinkage
from fasttl.util.errors import OptionError
from fasttl.transfer import cross_fit, registry
from fasttl.transfer.config import RunConfig
from fasttl.transfer.datasets import load_dataset
from fasttl.transfer.job import run
from fasttl.transfer.trained import TrainedModel
from fasttl.transfer import feature_models, small_cnn
from fasttl.transfer.strategies import distill, feature

pytestmark = pytest.mark.usefixtures("private_cache")
CPU = torch.device("cpu")
FIXED = dict(compare="none", image_size=32, progress=False, seed=0, epochs=1, temperature=2.0, alpha=0.5,
             teacher_logits="cross-fitted")


@pytest.fixture(scope="module")
def both_views_teacher(tiny_cifar, tmp_path_factory):
    """A linear teacher that trained on both views (--mirror-views both)."""
    out = tmp_path_factory.mktemp("teacher") / "both"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FASTTL_CACHE_DIR", str(tmp_path_factory.mktemp("teacher-cache")))
        run(data=str(tiny_cifar), strategy="linear", out=str(out), image_size=32, progress=False, seed=0,
            mirror_views="both")
    return out


@pytest.fixture(scope="module")
def mlp_teacher(tiny_cifar, tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher") / "mlp"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FASTTL_CACHE_DIR", str(tmp_path_factory.mktemp("teacher-cache")))
        run(data=str(tiny_cifar), strategy="mlp", epochs=3, out=str(out), image_size=32, progress=False, seed=0)
    return out


def _digest(folder) -> dict:
    return {name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in sorted(os.listdir(folder))}


def _student(tiny_cifar, teacher, out, **options):
    return run(**dict(FIXED, data=str(tiny_cifar), strategy="distill", teacher=teacher if isinstance(teacher, list)
                      else str(teacher), out=str(out), **options))


# ---- the folds -----------------------------------------------------------------------------------
@pytest.mark.parametrize("counts, folds", [((12, 12, 12, 12), 5), ((7, 1, 3), 3), ((1,), 1), ((2, 2), 5), ((), 2)])
def test_folds_are_disjoint_cover_everything_and_split_each_class_evenly(counts, folds):
    labels = np.repeat(np.arange(len(counts)), counts)
    np.random.default_rng(len(labels)).shuffle(labels)
    dealt = stratified_folds(labels.tolist(), folds, seed=3)
    assert len(dealt) == folds
    assert sorted(r for fold in dealt for r in fold) == list(range(len(labels)))  # every sample once
    for fold in dealt:
        assert fold == sorted(fold)
    for c in range(len(counts)):
        per_fold = [int((labels[fold] == c).sum()) for fold in dealt]
        assert max(per_fold) - min(per_fold) <= 1, per_fold
    assert max(map(len, dealt)) - min(map(len, dealt)) <= 1


def test_folds_are_seeded_and_take_labels_as_a_tensor():
    labels = np.arange(60) % 4
    assert stratified_folds(labels, 5, 1) == stratified_folds(torch.as_tensor(labels), 5, 1)
    assert stratified_folds(labels, 5, 1) != stratified_folds(labels, 5, 2)


@pytest.mark.parametrize("folds", [0, -1, 2.0, True])
def test_a_bad_fold_count_is_refused(folds):
    with pytest.raises(ValueError, match="^folds: expected a positive integer"):
        stratified_folds([0, 1], folds, 0)


# ---- the teacher's cross-fitted logits ---------------------------------------------------------------
def test_each_image_is_scored_by_a_head_refit_without_it_on_every_view(tiny_cifar, both_views_teacher):
    from fasttl.heads.train import predict_views
    from fasttl.transfer.caching import Extraction, cached_features

    model = registry.get("linear").load(str(both_views_teacher), CPU)
    ds = load_dataset(str(tiny_cifar))
    fits, refit = [], model.refit

    def spy(settings, views, seed, device):
        head = refit(settings, views, seed, device)
        fits.append(([v.samples for v in views], head))
        return head

    model.refit = spy
    logits = model.cross_fitter()(ds.train, seed=0, split="train")
    assert logits.shape == (2, len(ds.train), len(ds.classes)) and torch.isfinite(logits).all()
    plain, mirrored = (cached_features(model.backbone, ds.train, "train", Extraction.of(model.config), mirror=view)
                       for view in (False, True))
    assert plain.samples == mirrored.samples == ds.train.sample_ids()  # rows in the training source's order
    folds = stratified_folds(plain.labels, cross_fit.FOLDS, 0)
    assert len(fits) == len(folds) == cross_fit.FOLDS
    for fold, (trained_on, head) in zip(folds, fits):
        held = {plain.samples[i] for i in fold}
        assert len(trained_on) == 2, "a --mirror-views both teacher refits on both views"
        for view_samples in trained_on:
            assert not held & set(view_samples), "a head scored an image it was fit on"
            assert len(view_samples) + len(held) == len(ds.train)
        for view, cache in enumerate((plain, mirrored)):
            torch.testing.assert_close(logits[view, fold], predict_views(head, [cache.subset(fold)])[0])
    # Out of fold, the teacher is less sure of its training images than in-sample.
    in_sample = distill.teacher_view_logits(model, ds.train)
    labels = plain.labels.view(1, -1, 1).expand(2, -1, 1)
    assert logits.softmax(-1).gather(-1, labels).mean() < in_sample.softmax(-1).gather(-1, labels).mean()


def test_a_refit_is_solved_at_least_as_closely_as_the_teachers_linear_head(tiny_cifar, both_views_teacher):
    # The fold heads start from zero, the teacher's refit from its regularization path: on every
    # row, at the teacher's strength, the refit's objective is no worse than the teacher head's.
    import torch.nn.functional as F

    from fasttl.transfer.caching import Extraction, cached_features

    model = registry.get("linear").load(str(both_views_teacher), CPU)
    ds = load_dataset(str(tiny_cifar))
    views = [cached_features(model.backbone, ds.train, "train", Extraction.of(model.config), mirror=view)
             for view in (False, True)]
    settings = model.fit_settings()
    head = model.refit(settings, views, 0, CPU).eval()
    features = torch.cat([v.all_features().float() for v in views])
    labels = torch.cat([v.labels for v in views])

    def objective(h):
        with torch.no_grad():
            penalty = 0.5 * settings["weight_decay"] * h[-1].weight.pow(2).sum()
            return float(F.cross_entropy(h(features), labels) + penalty)

    torch.testing.assert_close(head[0].mean, model.head[0].mean)  # the same scaling of the same rows
    if "shrinkage" in settings:  # shrinkage LDA is solved in closed form: the refit is the teacher's head
        with torch.no_grad():
            torch.testing.assert_close(head(features), model.head.eval()(features), rtol=1e-4, atol=1e-4)
        return
    assert objective(head) <= objective(model.head) * (1 + 1e-3), (objective(head), objective(model.head))


def test_an_mlp_teachers_folds_train_at_its_chosen_settings(tiny_cifar, mlp_teacher, monkeypatch):
    metrics = json.loads((mlp_teacher / "metrics.json").read_text())["notes"]["choice"]
    config = json.loads((mlp_teacher / "config.json").read_text())
    calls = []
    real = feature.train_head
    monkeypatch.setattr(feature, "train_head", lambda train, **kw: calls.append((len(train), kw)) or real(train, **kw))
    model = registry.get("mlp").load(str(mlp_teacher), CPU)
    ds = load_dataset(str(tiny_cifar))
    logits = model.cross_fitter()(ds.train, seed=0, split="train")
    assert len(calls) == cross_fit.FOLDS and torch.isfinite(logits).all()
    folds = stratified_folds(list(ds.train.labels), cross_fit.FOLDS, 0)
    for (rows, kw), fold in zip(calls, folds):
        assert rows == len(ds.train) - len(fold)  # the other folds, one view (--mirror-views test)
        assert (kw["weight_decay"], kw["epochs"]) == (metrics["weight_decay"], metrics["epochs"])
        assert (kw["lr"], kw["batch_size"]) == (config["lr"], config["batch_size"])


# ---- when it can't be done: in-sample, and why ---------------------------------------------------
def test_in_sample_where_cross_fitting_cannot_be_done(tiny_cifar, linear_teacher, tmp_path, monkeypatch):
    ds = load_dataset(str(tiny_cifar))
    cfg = RunConfig(progress=False, teacher_logits="cross-fitted")
    # a teacher that can't be refit (a finetune run's model)
    plain = TrainedModel(nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 4)), small_cnn.native_spec(32),
                         ds.classes, CPU)
    monkeypatch.setattr(distill, "read_config", lambda path: {"strategy": "finetune"})
    make, kind = distill._logit_makers("runs/ft", plain, ds, cfg)
    assert kind == "in-sample: a finetune teacher is not refit"
    torch.testing.assert_close(make(), distill.teacher_view_logits(plain, ds.train))
    monkeypatch.undo()
    # a student on other images than the teacher's, and one image of each class (the teacher's too)
    one = tmp_path / "one-per-class"
    run(data=str(tiny_cifar), strategy="linear", out=str(one), image_size=32, progress=False, seed=0, train_per_class=1)
    for teacher, per_class, reason in ((linear_teacher, 6, "the teacher trained on other images"),
                                       (one, 1, "too few training images")):
        metrics = _student(tiny_cifar, teacher, tmp_path / str(per_class), train_per_class=per_class)
        assert metrics["notes"]["teacher_logits"].startswith(f"in-sample: {reason}")
        assert metrics["notes"]["teacher_train_accuracy"] > 0.5  # the teacher itself, not a refit without the class


def test_cross_fitted_logits_are_asked_for_recorded_and_kept_for_resume(tiny_cifar, linear_teacher, tmp_path,
                                                                         monkeypatch):
    assert RunConfig().teacher_logits == "in-sample"  # the default (see cross_fit.MODES)
    out = tmp_path / "student"
    before = _digest(linear_teacher)
    metrics = _student(tiny_cifar, linear_teacher, out)
    assert _digest(linear_teacher) == before  # nothing written into the teacher's folder
    assert metrics["notes"]["teacher_logits"] == cross_fit.CROSS_FITTED
    from safetensors.torch import load_file

    saved = load_file(str(out / distill.TEACHER_LOGITS))
    ds = load_dataset(str(tiny_cifar))
    model = registry.get("linear").load(str(linear_teacher), CPU)
    expected = model.cross_fitter()(ds.train, 0, split="train")
    torch.testing.assert_close(saved["logits"], expected[0])
    torch.testing.assert_close(saved["logits_mirror"], expected[1])
    in_sample = distill.teacher_view_logits(model, ds.train)
    assert not torch.allclose(saved["logits"], in_sample[0], atol=1e-3)
    accuracy = float((expected.mean(0).argmax(1) == torch.as_tensor(ds.train.labels)).float().mean())
    assert metrics["notes"]["teacher_train_accuracy"] == pytest.approx(accuracy)

    # Resumed, the saved logits are reused; for another --teacher-logits or seed they are made again.
    os.remove(out / "metrics.json")
    monkeypatch.setattr(distill, "_logit_makers", lambda *a: (_ for _ in ()).throw(AssertionError("recomputed")))
    assert _student(tiny_cifar, linear_teacher, out, resume=True)["accuracy"] == metrics["accuracy"]
    for changed in ({"teacher_logits": "in-sample"}, {"seed": 1}):
        cfg = RunConfig(**dict(FIXED, data=str(tiny_cifar), strategy="distill", teacher=str(linear_teacher),
                               **changed)).resolved(32)
        with pytest.raises(AssertionError, match="recomputed"):
            distill.teacher_logits_for(cfg.teacher, ds, cfg, str(out), CPU)
    monkeypatch.undo()
    again = _student(tiny_cifar, linear_teacher, tmp_path / "in-sample", teacher_logits="in-sample")
    assert again["notes"]["teacher_logits"] == "in-sample"
    torch.testing.assert_close(load_file(str(tmp_path / "in-sample" / distill.TEACHER_LOGITS))["logits"], in_sample[0])


def test_a_teacher_rerun_in_place_gets_its_logits_made_again(tiny_cifar, linear_teacher, tmp_path):
    teacher = tmp_path / "teacher"
    shutil.copytree(linear_teacher, teacher)
    out = tmp_path / "student"
    _student(tiny_cifar, teacher, out, teacher_logits="in-sample")
    from safetensors.torch import load_file, save

    from fasttl.transfer.rundir import write_recorded

    head = load_file(str(teacher / "head.safetensors"))
    # as a re-run would: new weights, their SHA-256 recorded in the marker
    write_recorded(str(teacher), "head.safetensors", save({k: v * 2 for k, v in head.items()}))
    ds = load_dataset(str(tiny_cifar))
    cfg = RunConfig(**dict(FIXED, data=str(tiny_cifar), strategy="distill", teacher=str(teacher),
                           teacher_logits="in-sample")).resolved(32)
    saved = load_file(str(out / distill.TEACHER_LOGITS))["logits"]
    logits, _ = distill.teacher_logits_for(cfg.teacher, ds, cfg, str(out), CPU)
    assert not torch.allclose(logits[0], saved)
    torch.testing.assert_close(logits, distill.teacher_view_logits(registry.get("linear").load(str(teacher), CPU),
                                                                   ds.train))


@pytest.mark.parametrize("edit", ["kinds-empty", "kinds-number", "kinds-not-json", "classes", "dtype", "nan", "rows"])
def test_saved_logits_with_edited_contents_are_made_again(tiny_cifar, linear_teacher, tmp_path, edit):
    from safetensors import safe_open
    from safetensors.torch import load_file, save

    from fasttl.transfer.rundir import write_recorded

    out = tmp_path / "student"
    first = _student(tiny_cifar, linear_teacher, out)
    path = str(out / distill.TEACHER_LOGITS)
    with safe_open(path, framework="pt") as f:
        metadata = dict(f.metadata())
    tensors, original = load_file(path), load_file(path)
    teacher = str(linear_teacher)
    if edit.startswith("kinds"):
        metadata["kinds"] = {"kinds-empty": "{}", "kinds-number": json.dumps({teacher: 5}),
                             "kinds-not-json": "{"}[edit]
    else:
        change = {"classes": lambda t: t[:, :3], "dtype": lambda t: t.long(), "nan": lambda t: t * float("nan"),
                  "rows": lambda t: t[:-1]}[edit]
        tensors = {k: change(v).contiguous() for k, v in tensors.items()}
    # recorded as fasttl records its own: the content checks, not the SHA-256, must catch each edit
    write_recorded(str(out), distill.TEACHER_LOGITS, save(tensors, metadata=metadata))
    os.remove(out / "metrics.json")
    resumed = _student(tiny_cifar, linear_teacher, out, resume=True)  # neither a crash nor the edited values
    torch.testing.assert_close(load_file(path)["logits"], original["logits"])
    assert resumed["notes"]["teacher_logits"] == first["notes"]["teacher_logits"] == cross_fit.CROSS_FITTED
    assert resumed["accuracy"] == first["accuracy"]


# ---- damaged teachers: one line naming the file and the way out ----------------------------------
def _edit_choice(folder, file, name, value, by_fasttl=False):
    """A hand edit, or (by_fasttl) a run fasttl itself wrote with that value, hash recorded."""
    values = json.loads((folder / file).read_text())
    (values["notes"]["choice"] if file == "metrics.json" else values)[name] = value
    if file == "metrics.json" and name in ("weight_decay", "shrinkage") and "solver" in values["notes"]["choice"]:
        # the linear head's setting is read by its solver: the edited one is the one a refit would use
        choice = values["notes"]["choice"]
        choice.pop("shrinkage" if name == "weight_decay" else "weight_decay", None)
        choice["solver"] = shrinkage.SOLVER if name == "shrinkage" else "L-BFGS, full batch"
    if by_fasttl:
        write_config(str(folder), values)
    else:
        (folder / file).write_text(json.dumps(values))


@pytest.mark.parametrize("strategy, file, name, value", [
    ("linear", "metrics.json", "weight_decay", "two"), ("linear", "metrics.json", "weight_decay", 0),
    ("linear", "metrics.json", "weight_decay", 10 ** 400), ("linear", "metrics.json", "weight_decay", 1e300),
    ("linear", "metrics.json", "weight_decay", 0.07), ("linear", "metrics.json", "weight_decay", float("nan")),
    ("linear", "metrics.json", "weight_decay", True), ("linear", "metrics.json", "weight_decay", None),
    ("linear", "metrics.json", "shrinkage", 0.33), ("linear", "metrics.json", "shrinkage", "two"),
    ("linear", "metrics.json", "shrinkage", float("nan")), ("mlp", "metrics.json", "epochs", 10 ** 7),
    ("mlp", "metrics.json", "epochs", 2.5),
    ("mlp", "metrics.json", "weight_decay", 0.5), ("mlp", "config.json", "lr", -1.0),
    ("mlp", "config.json", "batch_size", 0), ("mlp", "config.json", "epochs", "ten"),
])
def test_a_teacher_with_a_damaged_setting_is_named(tiny_cifar, linear_teacher, mlp_teacher, tmp_path, strategy, file,
                                                   name, value):
    teacher = tmp_path / strategy
    shutil.copytree(linear_teacher if strategy == "linear" else mlp_teacher, teacher)
    _edit_choice(teacher, file, name, value)
    if file == "config.json":
        # The run's config.json has a schema (fasttl/transfer/schema.py): a damaged field is named when the
        # teacher is read at all, whatever the student does with it.
        for mode in ("cross-fitted", "in-sample"):
            with pytest.raises(OptionError, match=rf"^teacher: .*{strategy}/config.json: field '{name}' is "):
                _student(tiny_cifar, teacher, tmp_path / f"x-{mode}", teacher_logits=mode)
        return
    with pytest.raises(OptionError, match=rf"^teacher: .*{strategy}/{file}.* has {name} .*, not .*; rerun the "
                                          r"teacher, or pass --teacher-logits in-sample$"):
        _student(tiny_cifar, teacher, tmp_path / "x")
    # --teacher-logits in-sample reads none of the tuning's choices
    assert _student(tiny_cifar, teacher, tmp_path / "y", teacher_logits="in-sample")["notes"]["teacher_logits"] \
        == "in-sample"


def test_missing_or_broken_settings_files_and_a_diverging_refit_are_named(tiny_cifar, linear_teacher, mlp_teacher,
                                                                         tmp_path, monkeypatch):
    teacher = tmp_path / "linear"
    shutil.copytree(linear_teacher, teacher)
    (teacher / "metrics.json").write_text("{not json")
    with pytest.raises(OptionError, match=r"^teacher: .*linear/metrics.json: not valid JSON.*--teacher-logits in-s"):
        _student(tiny_cifar, teacher, tmp_path / "x")
    os.remove(teacher / "metrics.json")  # an unfinished run: refused as predict, eval and export refuse it
    with pytest.raises(OptionError, match=r"^teacher: .*linear: the run did not finish \(no metrics.json\); finish it"):
        _student(tiny_cifar, teacher, tmp_path / "x")
    diverging = tmp_path / "mlp"
    shutil.copytree(mlp_teacher, diverging)
    _edit_choice(diverging, "config.json", "lr", 1e30, by_fasttl=True)
    with pytest.raises(OptionError, match=r"^teacher: refitting its head for cross-fitting failed \(.*diverged.*\); "
                                          r"rerun the teacher, or pass --teacher-logits in-sample$"):
        _student(tiny_cifar, diverging, tmp_path / "z")
    # In an ensemble, a damaged second teacher is refused before the first one's folds are fit.
    monkeypatch.setattr(feature_models, "cross_fitted_logits", lambda *a, **k: (_ for _ in ()).throw(AssertionError("ran")))
    with pytest.raises(OptionError, match=r"linear: the run did not finish \(no metrics.json\)"):
        _student(tiny_cifar, [str(linear_teacher), str(teacher)], tmp_path / "w")


# ---- the option ----------------------------------------------------------------------------------
def test_teacher_logits_is_refused_for_other_strategies_and_checked(tiny_cifar, tmp_path):
    with pytest.raises(OptionError, match=r"^teacher_logits: .*read only by --strategy distill"):
        run(data=str(tiny_cifar), strategy="linear", out=str(tmp_path / "x"), image_size=32, progress=False,
            teacher_logits="cross-fitted")  # not the default: a mistake to point out
    with pytest.raises(OptionError, match=r"^teacher_logits: unknown 'oof'; choose from in-sample, cross-fitted"):
        RunConfig(strategy="distill", teacher="runs/a", teacher_logits="oof").resolved(32)


def test_runs_made_before_the_option_still_resume(tiny_cifar, linear_teacher, tmp_path):
    def as_before_the_option(folder):
        config = json.loads((folder / "config.json").read_text())
        for values in (config, config["identity"]):
            values.pop("teacher_logits", None)
        write_config(str(folder), config)  # as that fasttl wrote it (the marker records its hash)
        os.remove(folder / "metrics.json")

    probe = tmp_path / "probe"
    run(data=str(tiny_cifar), strategy="mlp", epochs=2, out=str(probe), image_size=32, progress=False, seed=0)
    as_before_the_option(probe)
    run(data=str(tiny_cifar), strategy="mlp", epochs=2, out=str(probe), image_size=32, progress=False, seed=0,
        resume=True)  # a strategy that doesn't read the option: nothing to compare
    student = tmp_path / "student"
    _student(tiny_cifar, linear_teacher, student, teacher_logits="in-sample")
    as_before_the_option(student)
    from fasttl.transfer.rundir import RunError

    with pytest.raises(RunError, match=r"teacher_logits: was 'in-sample', now 'cross-fitted'"):
        _student(tiny_cifar, linear_teacher, student, resume=True)  # it was made with the teacher's own logits
    assert _student(tiny_cifar, linear_teacher, student, resume=True, teacher_logits="in-sample")["notes"][
        "teacher_logits"] == "in-sample"
    # without the option, as its users started it: the default, in-sample, is what it behaved as
    as_before_the_option(student)
    resumed = run(**{k: v for k, v in dict(FIXED, data=str(tiny_cifar), strategy="distill", teacher=str(linear_teacher),
                                            out=str(student), resume=True).items() if k != "teacher_logits"})
    assert resumed["notes"]["teacher_logits"] == "in-sample"
