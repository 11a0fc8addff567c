"""Few training images: the linear head's L2 strength chosen by stratified K-fold cross-validation
on every training image (out-of-fold logits), against a refit of each fold by hand; the switch
at tuning.CROSS_VALIDATION_BELOW; a run that says how it chose."""
import zlib

import pytest
import torch
import torch.nn.functional as F

from fasttl.cache.cache import FeatureCache
from fasttl.data.splits import stratified_folds
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

from fasttl.heads import shrinkage, solver, tuning


def _seed(request) -> int:
    return zlib.crc32(request.node.nodeid.encode()) % 100_000


def _cache(path, counts, seed, dim=19, noise=1.8):
    generator = torch.Generator().manual_seed(seed)
    centers = torch.randn(len(counts), dim, generator=generator)
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    labels = labels[torch.randperm(len(labels), generator=generator)]
    x = centers[labels] + noise * torch.randn(len(labels), dim, generator=generator)
    return FeatureCache.write(str(path), [x], labels, classes=[f"c{i}" for i in range(len(counts))])


def scored(setting, logits, labels):
    """(accuracy, -loss) as the choice ranks a setting: LDA's logits at their fitted temperature."""
    if setting[0] == "shrinkage":
        logits = logits / shrinkage.temperature(logits, labels)
    return float((logits.argmax(1) == labels).float().mean()), -float(F.cross_entropy(logits, labels))


def test_out_of_fold_logits_are_each_folds_own_model(tmp_path, request):
    seed = _seed(request)
    cache = _cache(tmp_path / "c", [13, 9, 21], seed)
    pooled = tuning._out_of_fold_logits([cache], [cache.feature_dim], seed, "cpu")
    # the whole L2 path and every shrinkage in every fold
    assert set(pooled) == {("weight_decay", w) for w in solver.WEIGHT_DECAYS} | \
        {("shrinkage", s) for s in shrinkage.SHRINKAGES}
    labels = cache.labels
    for held in stratified_folds(labels, tuning.CROSS_VALIDATION_FOLDS, seed):
        kept = sorted(set(range(len(labels))) - set(held))
        x = cache.subset(kept).all_features()
        mean, std = solver.block_scaling(x, [cache.feature_dim])
        logits = {}
        solver.fit_path((x - mean) / std, labels[kept], [(cache.subset(held).all_features() - mean) / std],
                        labels[held], 3, patience=len(solver.WEIGHT_DECAYS), val_logits=logits)
        for strength in (solver.WEIGHT_DECAYS[0], solver.WEIGHT_DECAYS[-1]):
            assert torch.allclose(pooled[("weight_decay", strength)][held], logits[strength], atol=1e-5)
        # shrinkage LDA as scikit-learn fits it on the fold's scaled rows
        reference = LinearDiscriminantAnalysis(solver="lsqr", shrinkage=shrinkage.SHRINKAGES[2])
        reference.fit(((x - mean) / std).double().numpy(), labels[kept].numpy())
        expected = reference.decision_function(((cache.subset(held).all_features() - mean) / std).double().numpy())
        assert torch.allclose(pooled[("shrinkage", shrinkage.SHRINKAGES[2])][held].double(),
                              torch.from_numpy(expected), atol=1e-4, rtol=1e-4)


def test_few_images_choose_by_cross_validation_and_refit_on_everything(tmp_path, request):
    seed = _seed(request)
    cache = _cache(tmp_path / "c", [12, 15, 11, 14], seed)
    assert tuning._smallest_class(cache.labels) < tuning.CROSS_VALIDATION_BELOW
    tuned = tuning.tune_linear([cache], seed=seed, progress=False)
    choice = tuned.choice
    assert choice["cross_validation"] == f"{tuning.CROSS_VALIDATION_FOLDS}-fold, stratified"
    assert choice["validation"]["cross_validated_images"] == len(cache)
    pooled = tuning._out_of_fold_logits([cache], [cache.feature_dim], seed, "cpu")
    scores = {s: scored(s, l, cache.labels) for s, l in pooled.items()}
    best = max(scores, key=scores.get)
    assert {key: choice[key] for key in tuning.SETTINGS if key in choice} == {best[0]: best[1]}
    assert choice["solver"] == (shrinkage.SOLVER if best[0] == "shrinkage" else "L-BFGS, full batch")
    assert choice["cv_accuracy"] == pytest.approx(scores[best][0])
    assert [next(iter(r.items())) for r in tuned.records] == list(pooled)
    # the refit on every row is the fixed-setting fit, and the train part is fit without the split's validation rows
    setting = {key: choice[key] for key in (*tuning.SETTINGS, "temperature") if key in choice}
    again = tuning.fit_setting([cache], setting)
    x = cache.all_features()
    for head in (tuned.head, again.head, tuned.train_part):
        head.eval()  # dropout off
    assert torch.allclose(tuned.head(x), again.head(x), atol=1e-4)
    assert tuned.train_part is not None and not torch.allclose(tuned.train_part(x), tuned.head(x), atol=1e-4)
    assert tuning.tune_linear([cache], seed=seed, progress=False).choice == choice  # seeded


def test_enough_images_keep_the_single_validation_split(tmp_path, request):
    most = tuning.CROSS_VALIDATION_BELOW
    cache = _cache(tmp_path / "c", [most, most + 3], _seed(request))
    tuned = tuning.tune_linear([cache], seed=0, progress=False)
    assert "cross_validation" not in tuned.choice and "cross_validated_images" not in tuned.choice["validation"]


def test_a_long_tailed_few_image_head_is_adjusted_by_cross_validation(tmp_path, request):
    cache = _cache(tmp_path / "c", [45, 20, 9, 4], _seed(request), noise=2.5)
    tuned = tuning.tune_linear([cache], seed=0, progress=False)
    assert tuned.choice["cross_validation"] and tuned.choice["class_imbalance"] == pytest.approx(45 / 4)
    assert all("logit_adjustment" in r and "val_balanced_accuracy" in r for r in tuned.records)
    setting = {key: tuned.choice[key] for key in tuning.SETTINGS if key in tuned.choice}
    assert len(setting) == 1
    assert tuned.choice["logit_adjustment"] == next(r["logit_adjustment"] for r in tuned.records
                                                     if setting.items() <= r.items())


def test_a_run_on_few_images_says_it_cross_validated(cat_ship, tmp_path, private_cache):
    from fasttl.transfer import run

    metrics = run(data=str(cat_ship), strategy="linear", image_size=32, out=str(tmp_path / "run"), compare="none",
                  progress=False)
    choice = metrics["notes"]["choice"]
    assert choice["cross_validation"] == "5-fold, stratified" and choice["validation"]["cross_validated_images"] == 12
    report = (tmp_path / "run" / "report.md").read_text()
    assert "chosen by 5-fold, stratified cross-validation on all 12 training images (seed 0)" in report
