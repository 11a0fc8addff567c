"""--teacher-logits cross-fitted: each training image's soft targets come from a teacher head
refit without that image's fold, so they are as unsure as the teacher is on unseen images."""
import json
import os

import numpy as np
import pytest
import torch
from torch import nn

from fasttl.data.splits import stratified_folds
from fasttl.errors import OptionError
from fasttl.transfer import registry
from fasttl.transfer.config import RunConfig
from fasttl.transfer.datasets import load_dataset
from fasttl.transfer.job import run
from fasttl.transfer.registry import TrainedModel
from fasttl.transfer.strategies import distill, scratch

pytestmark = pytest.mark.usefixtures("private_cache")


# ---- the folds -----------------------------------------------------------------------------------
@pytest.mark.parametrize("counts, folds", [((12, 12, 12, 12), 5), ((7, 1, 3), 3), ((1,), 1), ((2, 2), 5), ((), 2)])
def test_folds_are_disjoint_cover_everything_and_split_each_class_evenly(counts, folds):
    labels = np.repeat(np.arange(len(counts)), counts)
    np.random.default_rng(len(labels)).shuffle(labels)
    dealt = stratified_folds(labels.tolist(), folds, seed=3)
    assert len(dealt) == folds
    rows = [r for fold in dealt for r in fold]
    assert sorted(rows) == list(range(len(labels)))  # every sample once
    for fold in dealt:
        assert fold == sorted(fold)
    for c, count in enumerate(counts):
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
def test_each_image_is_scored_by_a_head_refit_without_it(tiny_cifar, linear_teacher):
    model = registry.get("linear").load(str(linear_teacher), torch.device("cpu"))
    ds = load_dataset(str(tiny_cifar))
    names = list(ds.train.samples) if hasattr(ds.train, "samples") else None
    fits = []
    refit = model.refit

    def spy(views, seed, device):
        head = refit(views, seed, device)
        fits.append(([v.samples for v in views], head))
        return head

    model.refit = spy
    logits = model.cross_fitted_view_logits(ds.train, 5, seed=0, split="train")
    assert logits.shape == (2, len(ds.train), len(ds.classes)) and torch.isfinite(logits).all()
    assert len(fits) == 5
    from fasttl.cache.heads import predict_views
    from fasttl.transfer.caching import Extraction, cached_features

    plain, mirrored = (cached_features(model.backbone, ds.train, "train", Extraction.of(model.config),
                                       mirror=view) for view in (False, True))
    scored = 0
    for fold, (trained_on, head) in zip(stratified_folds(plain.labels, 5, 0), fits):
        held = [plain.samples[i] for i in fold]
        assert not set(held) & set(trained_on[0]), "a head scored an image it was fit on"
        assert len(trained_on[0]) + len(held) == len(ds.train)
        for view, cache in enumerate((plain, mirrored)):
            expected = predict_views(head, [cache.subset(fold)])[0]
            torch.testing.assert_close(logits[view, fold], expected)
        scored += len(fold)
    assert scored == len(ds.train)
    if names is not None:
        assert plain.samples == names  # rows are in the training source's order
    # Out of fold, the teacher is less sure of its training images than in-sample: its refits
    # never saw them. (A linear probe fits its own 48 training images almost perfectly.)
    in_sample = distill.teacher_view_logits(model, ds.train)
    labels = plain.labels

    def confidence(views):
        return views.softmax(-1).gather(-1, labels.view(1, -1, 1).expand(2, -1, 1)).mean()

    assert confidence(logits) < confidence(in_sample)


def test_a_model_that_cannot_be_refit_gives_in_sample_logits():
    torch.manual_seed(1)
    from fasttl.data.sources import ArraySource

    rng = np.random.default_rng(0)
    source = ArraySource(rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8), np.arange(6) % 2, ["a", "b"])
    model = TrainedModel(nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 2)), scratch.native_spec(8), ["a", "b"],
                         torch.device("cpu"))
    cfg = RunConfig(progress=False)  # --teacher-logits cross-fitted, the default
    logits, kind = distill.one_teachers_logits(model, source, cfg)
    assert kind == "in-sample"
    torch.testing.assert_close(logits, distill.teacher_view_logits(model, source))


def test_distill_uses_cross_fitted_logits_by_default_and_keeps_them_for_resume(tiny_cifar, linear_teacher, tmp_path,
                                                                               monkeypatch):
    out = tmp_path / "student"
    options = dict(data=str(tiny_cifar), strategy="distill", teacher=str(linear_teacher), epochs=1, out=str(out),
                   compare="none", image_size=32, progress=False, seed=0, temperature=2.0, alpha=0.5)
    metrics = run(**options)
    assert metrics["notes"]["teacher_logits"] == f"cross-fitted ({distill.CROSS_FIT_FOLDS} folds)"
    from safetensors.torch import load_file

    saved = load_file(str(out / distill.TEACHER_LOGITS))
    ds = load_dataset(str(tiny_cifar))
    model = registry.get("linear").load(str(linear_teacher), torch.device("cpu"))
    expected = model.cross_fitted_view_logits(ds.train, distill.CROSS_FIT_FOLDS, 0, split="train")
    torch.testing.assert_close(saved["logits"], expected[0])
    torch.testing.assert_close(saved["logits_mirror"], expected[1])
    in_sample = distill.teacher_view_logits(model, ds.train)
    assert not torch.allclose(saved["logits"], in_sample[0], atol=1e-3)
    accuracy = float((expected.mean(0).argmax(1) == torch.as_tensor(ds.train.labels)).float().mean())
    assert metrics["notes"]["teacher_train_accuracy"] == pytest.approx(accuracy)

    # Resumed, the saved logits are reused; asked for in-sample logits, they are made again.
    os.remove(out / "metrics.json")
    monkeypatch.setattr(distill, "one_teachers_logits", lambda *a: (_ for _ in ()).throw(AssertionError("recomputed")))
    resumed = run(**options, resume=True)
    assert resumed["accuracy"] == metrics["accuracy"]
    for changed in ({"teacher_logits": "in-sample"}, {"seed": 1}):
        cfg = RunConfig(**dict(options, **changed)).resolved(32)
        with pytest.raises(AssertionError, match="recomputed"):
            distill.teacher_logits_for(cfg.teacher, ds, cfg, str(out), torch.device("cpu"))
    monkeypatch.undo()
    again = run(**dict(options, out=str(tmp_path / "in-sample"), teacher_logits="in-sample"))
    assert again["notes"]["teacher_logits"] == "in-sample"
    saved = load_file(str(tmp_path / "in-sample" / distill.TEACHER_LOGITS))
    torch.testing.assert_close(saved["logits"], in_sample[0])


@pytest.mark.parametrize("edit", [
    {"kinds": "not json"}, {"request": "{}"}, {"kinds": "[1]"}])
def test_saved_logits_with_edited_metadata_are_made_again(tiny_cifar, linear_teacher, tmp_path, edit):
    from safetensors.torch import load_file, save_file

    out = tmp_path / "student"
    options = dict(data=str(tiny_cifar), strategy="distill", teacher=str(linear_teacher), epochs=1, out=str(out),
                   compare="none", image_size=32, progress=False, seed=0, temperature=2.0, alpha=0.5)
    first = run(**options)
    path = str(out / distill.TEACHER_LOGITS)
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        metadata = dict(f.metadata())
    tensors = load_file(path)
    save_file({k: v * 0 + 7 for k, v in tensors.items()}, path, metadata=dict(metadata, **edit))
    os.remove(out / "metrics.json")
    resumed = run(**options, resume=True)
    assert not torch.equal(load_file(path)["logits"], torch.full_like(tensors["logits"], 7))  # not trusted
    assert resumed["notes"]["teacher_logits"] == first["notes"]["teacher_logits"]


def test_a_teacher_with_damaged_fit_settings_is_named(tiny_cifar, linear_teacher, tmp_path):
    import shutil

    mlp = tmp_path / "mlp"
    run(data=str(tiny_cifar), strategy="mlp", epochs=2, out=str(mlp), image_size=32, progress=False, seed=0)
    linear = tmp_path / "linear"
    shutil.copytree(linear_teacher, linear)

    def student(teacher):
        return run(data=str(tiny_cifar), strategy="distill", teacher=str(teacher), epochs=1, out=str(tmp_path / "x"),
                   compare="none", image_size=32, progress=False, seed=0, temperature=2.0, alpha=0.5, overwrite=True)

    for teacher, name, file in ((mlp, "epochs", "metrics.json"), (mlp, "lr", "config.json"),
                                (linear, "weight_decay", "metrics.json")):
        original = (teacher / file).read_text()
        values = json.loads(original)
        settings = values["notes"]["choice"] if file == "metrics.json" else values
        for bad in ("two", 0, -1.5, None, float("nan"), True):
            settings[name] = bad
            (teacher / file).write_text(json.dumps(values))
            with pytest.raises(OptionError, match=rf"^teacher: .*{teacher.name}/{file}.* has {name} .*not a positive "
                                                  r".*--teacher-logits in-sample$"):
                student(teacher)
        (teacher / file).write_text("{not json")
        with pytest.raises(OptionError, match=rf"^teacher: .*{teacher.name}/{file}: not valid JSON"):
            student(teacher)
        (teacher / file).write_text(original)
        assert student(teacher)["notes"]["teacher_logits"].startswith("cross-fitted")


def test_the_fold_heads_use_the_teachers_chosen_strength(linear_teacher, monkeypatch):
    from fasttl.transfer.strategies import feature

    chosen = json.loads((linear_teacher / "metrics.json").read_text())["notes"]["choice"]["weight_decay"]
    strengths = []
    monkeypatch.setattr(feature, "fit_linear", lambda views, weight_decay, device: strengths.append(weight_decay)
                        or (nn.Identity(), {}))
    registry.get("linear").refit_head(str(linear_teacher), [], 0, torch.device("cpu"))
    assert strengths == [chosen]


def test_teacher_logits_is_refused_for_other_strategies_and_checked(tiny_cifar, tmp_path):
    with pytest.raises(OptionError, match=r"^teacher_logits: .*read only by --strategy distill"):
        run(data=str(tiny_cifar), strategy="linear", out=str(tmp_path / "x"), image_size=32, progress=False,
            teacher_logits="in-sample")
    with pytest.raises(OptionError, match=r"^teacher_logits: unknown 'oof'; choose from cross-fitted, in-sample"):
        RunConfig(strategy="distill", teacher="runs/a", teacher_logits="oof").resolved(32)
