"""The linear head as shrinkage LDA (fasttl.heads.shrinkage): against scikit-learn's
LinearDiscriminantAnalysis(solver="lsqr") in float64 on fresh random data (fewer and more images
than dimensions, one-image classes, an absent class, no within-class spread), and where a
few-shot run's choice of it shows: the tuned head, a teacher's settings, report.md and its plot."""
import json
import zlib

import pytest
import torch
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

from fasttl.heads import shrinkage, tuning
from fasttl.util.errors import OptionError


def _generator(request) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


def _data(generator, counts, dim, dtype=torch.float64):
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    centers = 2 * torch.randn(len(counts), dim, generator=generator, dtype=torch.float64)
    mixing = torch.randn(dim, dim, generator=generator, dtype=torch.float64) / dim ** 0.5
    rows = centers[labels] + torch.randn(len(labels), dim, generator=generator, dtype=torch.float64) @ mixing
    return rows.to(dtype), labels


def _reference(x, y, strength):
    model = LinearDiscriminantAnalysis(solver="lsqr", shrinkage=strength).fit(x.double().numpy(), y.numpy())
    return torch.from_numpy(model.coef_), torch.from_numpy(model.intercept_)


@pytest.mark.parametrize("counts,dim", [([3, 5, 2], 41), ([40, 33, 51, 29], 7), ([2, 2], 1), ([1, 4, 6], 13)])
@pytest.mark.parametrize("strength", [1e-3, 0.37, 0.9, 1.0])
def test_the_discriminant_is_scikit_learns(counts, dim, strength, request):
    x, y = _data(_generator(request), counts, dim)
    weight, bias = shrinkage.fit(x, y, len(counts), strength)
    ref_weight, ref_bias = _reference(x, y, strength)
    if len(counts) == 2:  # scikit-learn keeps one row for two classes: the difference of the two
        ref_weight, ref_bias = ref_weight[0], ref_bias[0]
        weight, bias = weight[1] - weight[0], bias[1] - bias[0]
    scale = float(ref_weight.abs().max()) + 1.0
    assert torch.allclose(weight, ref_weight, atol=1e-8 * scale, rtol=1e-7)
    assert torch.allclose(bias, ref_bias, atol=1e-7 * (float(ref_bias.abs().max()) + 1.0), rtol=1e-7)


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 2e-4), (torch.float64, 1e-9)])
def test_the_head_keeps_the_rows_dtype_and_scores_as_the_reference(dtype, atol, request):
    x, y = _data(_generator(request), [6, 9, 7], 23, dtype)
    weight, bias = shrinkage.fit(x, y, 3, 0.8)
    assert weight.dtype == bias.dtype == dtype and weight.shape == (3, 23) and bias.shape == (3,)
    ref_weight, ref_bias = _reference(x, y, 0.8)
    logits = x.double() @ weight.double().T + bias.double()
    expected = x.double() @ ref_weight.T + ref_bias
    assert torch.allclose(logits, expected, atol=atol * (float(expected.abs().max()) + 1.0))


def test_a_class_without_rows_is_never_predicted_and_stays_finite(request):
    x, y = _data(_generator(request), [5, 4, 6], 11)
    y = torch.where(y == 1, torch.tensor(2), y)  # class 1 absent, as in a fold that drew none of it
    weight, bias = shrinkage.fit(x, y, 3, 0.9)
    assert torch.isfinite(weight).all() and torch.isfinite(bias).all()
    assert (weight[1] == 0).all() and bias[1] == shrinkage.ABSENT_CLASS_BIAS
    assert ((x @ weight.T + bias).argmax(1) != 1).all()


def test_classes_without_spread_fall_back_to_the_nearest_mean(request):
    centers = torch.randn(3, 5, generator=_generator(request), dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 2, 2, 2])
    weight, bias = shrinkage.fit(centers[y], y, 3, 0.5)
    assert torch.isfinite(weight).all() and torch.isfinite(bias).all()
    queries = centers + 0.01 * torch.randn(3, 5, generator=_generator(request), dtype=torch.float64)
    assert ((queries @ weight.T + bias).argmax(1) == torch.arange(3)).all()


@pytest.mark.parametrize("strength", [0.0, -0.1, 1.5, float("nan")])
def test_a_shrinkage_outside_the_interval_is_refused(strength):
    with pytest.raises(ValueError, match="shrinkage must lie in"):
        shrinkage.fit(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]), 2, strength)


def test_few_images_in_many_dimensions_choose_shrinkage_and_refit_it(tmp_path, request):
    from fasttl.cache.cache import FeatureCache

    x, y = _data(_generator(request), [8, 7, 9, 8], 300, torch.float32)
    cache = FeatureCache.write(str(tmp_path / "c"), [x], y, classes=["a", "b", "c", "d"])
    pooled = tuning._out_of_fold_logits([cache], [cache.feature_dim], 0, "cpu")
    temperatures = {k: shrinkage.temperature(v, y) for k, v in pooled.items() if k[0] == "shrinkage"}
    scores = {k: (float((v.argmax(1) == y).float().mean()),
                  -float(torch.nn.functional.cross_entropy(v / temperatures.get(k, 1.0), y)))
              for k, v in pooled.items()}
    tuned = tuning.tune_linear([cache], seed=0, progress=False)
    best = max(scores, key=scores.get)
    assert best[0] == "shrinkage"  # Gaussian classes of one shape, 8 images in 300 dimensions: LDA's own case
    assert tuned.choice["shrinkage"] == best[1] and "weight_decay" not in tuned.choice
    assert tuned.choice["solver"] == shrinkage.SOLVER and tuned.choice["temperature"] == temperatures[best]
    # the shipped head is the refit at that shrinkage, its logits divided by the temperature
    raw = tuning.fit_shrinkage([cache], best[1]).head.eval()
    assert torch.allclose(tuned.head.eval()(x), raw(x) / temperatures[best], atol=1e-5)
    assert tuned.choice["cv_loss"] == pytest.approx(-scores[best][1], rel=1e-5)


def test_lda_is_offered_only_where_every_fold_has_every_class(tmp_path, request):
    # a class of one image is missing from the training part of the fold that holds it out
    from fasttl.cache.cache import FeatureCache

    x, y = _data(_generator(request), [9, 1, 8], 40, torch.float32)
    cache = FeatureCache.write(str(tmp_path / "c"), [x], y, classes=["a", "b", "c"])
    pooled = tuning._out_of_fold_logits([cache], [cache.feature_dim], 0, "cpu")
    assert pooled and all(setting == "weight_decay" for setting, _ in pooled)
    x, y = _data(_generator(request), [9, 2, 8], 40, torch.float32)
    cache = FeatureCache.write(str(tmp_path / "d"), [x], y, classes=["a", "b", "c"])
    assert any(setting == "shrinkage" for setting, _ in tuning._out_of_fold_logits([cache], [40], 0, "cpu"))


def test_one_factorization_gives_every_shrinkage(request):
    for counts, dim in (([4, 6, 5], 30), ([30, 25], 6)):  # fewer images than features, and more
        x, y = _data(_generator(request), counts, dim)
        path = shrinkage.fit_path(x, y, len(counts), shrinkage.SHRINKAGES)
        for strength, (weight, bias) in zip(shrinkage.SHRINKAGES, path):
            alone = shrinkage.fit(x, y, len(counts), strength)
            assert torch.allclose(weight, alone[0], rtol=1e-10, atol=1e-10)
            assert torch.allclose(bias, alone[1], rtol=1e-10, atol=1e-10)


def test_non_finite_rows_are_refused_and_half_precision_rows_give_float32(request):
    x, y = _data(_generator(request), [5, 6], 8, torch.float32)
    for poison in (float("nan"), float("inf")):
        bad = x.clone()
        bad[3, 2] = poison
        with pytest.raises(ValueError, match="NaN or infinite"):
            shrinkage.fit(bad, y, 2, 0.5)
    weight, bias = shrinkage.fit(x.half(), y, 2, 0.5)
    assert weight.dtype == bias.dtype == torch.float32 and torch.isfinite(weight).all()
    reference = shrinkage.fit(x.half().double(), y, 2, 0.5)
    assert torch.allclose(weight.double(), reference[0], rtol=1e-5, atol=1e-5)


def test_the_temperature_minimizes_the_cross_entropy(request):
    generator = _generator(request)
    true = torch.randn(400, 5, generator=generator, dtype=torch.float64)
    labels = torch.multinomial(true.softmax(1), 1, generator=generator).squeeze(1)
    logits = 37.0 * true  # as overconfident as LDA in a high dimension
    found = shrinkage.temperature(logits, labels)
    grid = torch.logspace(-1, 3, 4001, dtype=torch.float64)
    losses = torch.stack([torch.nn.functional.cross_entropy(logits / t, labels) for t in grid])
    best = float(grid[losses.argmin()])
    assert found == pytest.approx(best, rel=5e-3) and 20 < found < 70



def test_the_search_ends_inside_its_range_in_float64():
    import numpy as np

    labels = torch.tensor([0, 1, 0, 1])
    softest = shrinkage.temperature(torch.tensor([[9e3, -9e3], [-9e3, 9e3], [-9e3, 9e3], [9e3, -9e3]]), labels)
    sharpest = shrinkage.temperature(torch.tensor([[5.0, 0.0], [0.0, 5.0], [5.0, 0.0], [0.0, 5.0]]), labels)
    low, high = shrinkage.TEMPERATURE_RANGE
    assert high * 0.999 < softest <= high and low <= sharpest < low * 1.001
    # a run written when the search returned exp in float32 still holds a fitted temperature
    assert float(np.float32(high)) > high and shrinkage.is_fitted_temperature(float(np.float32(high)))
    assert not shrinkage.is_fitted_temperature(high * (1 + 1e-6))
    assert not shrinkage.is_fitted_temperature(low * (1 - 1e-6))

def _teacher(tmp_path, choice):
    run_dir = tmp_path / "teacher"
    run_dir.mkdir()
    (run_dir / "metrics.json").write_text(json.dumps({"notes": {"choice": choice}}))
    return str(run_dir)


def test_a_teacher_that_chose_shrinkage_is_refit_with_it(tmp_path, request):
    from fasttl.cache.cache import FeatureCache
    from fasttl.transfer import registry

    linear = registry.get("linear")
    settings = linear.fit_settings(_teacher(tmp_path, {"solver": shrinkage.SOLVER, "shrinkage": 0.9,
                                                       "temperature": 12.5}))
    assert settings == {"shrinkage": 0.9, "temperature": 12.5}
    x, y = _data(_generator(request), [5, 6], 9, torch.float32)
    cache = FeatureCache.write(str(tmp_path / "c"), [x], y, classes=["a", "b"])
    head = linear.refit_head(settings, [cache], 0, "cpu").eval()
    assert torch.allclose(head(x), tuning.fit_shrinkage([cache], 0.9).head.eval()(x) / 12.5, atol=1e-6)


@pytest.mark.parametrize("choice,culprit", [
    ({"solver": shrinkage.SOLVER, "shrinkage": 0.33, "temperature": 2.0}, "shrinkage 0.33"),
    ({"solver": shrinkage.SOLVER, "temperature": 2.0}, "shrinkage None"),
    ({"solver": shrinkage.SOLVER, "shrinkage": 0.9, "temperature": -1.0}, "temperature -1.0"),
    ({"solver": shrinkage.SOLVER, "shrinkage": 0.9}, "temperature None"),
    ({"solver": 7, "weight_decay": 0.5}, "solver 7"),
    ({"solver": "shrinkage LDA", "shrinkage": 0.9}, "solver 'shrink")])
def test_a_teacher_with_a_setting_it_could_not_have_chosen_is_named(tmp_path, choice, culprit):
    from fasttl.transfer import registry

    run_dir = _teacher(tmp_path, choice)
    with pytest.raises(OptionError, match="metrics.json") as error:
        registry.get("linear").fit_settings(run_dir)
    assert "\n" not in str(error.value) and f"has {culprit}" in str(error.value)


@pytest.mark.parametrize("notes", [[1, 2], "text", None])
def test_a_teacher_whose_notes_are_no_object_is_named(tmp_path, notes):
    from fasttl.transfer import registry

    run_dir = tmp_path / "teacher"
    run_dir.mkdir()
    (run_dir / "metrics.json").write_text(json.dumps({"notes": notes}))
    with pytest.raises(OptionError, match="metrics.json"):
        registry.get("linear").fit_settings(str(run_dir))


def test_a_teacher_that_predates_the_solver_key_is_read_as_an_l2_head(tmp_path):
    from fasttl.transfer import registry

    assert registry.get("linear").fit_settings(_teacher(tmp_path, {"weight_decay": 0.5})) == {"weight_decay": 0.5}


def test_the_report_names_the_shrinkage_and_plots_both_settings(tmp_path):
    from fasttl.transfer import report

    choice = {"validation": {"validation_images": 3, "cross_validated_images": 40, "seed": 0}, "shrinkage": 0.9,
              "temperature": 12.0, "solver": shrinkage.SOLVER, "cv_accuracy": 0.75,
              "cross_validation": "5-fold, stratified"}
    lines = "\n".join(report._choices({"linear": {"notes": {"choice": choice}}}))
    assert "the linear head as shrinkage LDA, shrinkage 0.9, temperature 12, chosen by 5-fold" in lines
    records = [{"weight_decay": w, "val_accuracy": a} for w, a in ((5.0, 0.6), (1.0, 0.7))] + \
        [{"shrinkage": s, "val_accuracy": a} for s, a in ((0.5, 0.65), (0.9, 0.75))]
    report.plot_curves({"linear": records}, str(tmp_path / "curves.png"))
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
