"""Long-tailed training data: the imbalance is detected, the linear head's logit adjustment is
chosen on validation by balanced accuracy and folded into its bias, balanced data are left as
they were, and a run reports what it chose."""
import zlib

import numpy as np
import pytest
import torch

from fasttl.cache.cache import FeatureCache
from fasttl.heads import imbalance, tuning

sklearn_metrics = pytest.importorskip("sklearn.metrics", reason="scikit-learn is the reference here")


def _seed(request) -> int:
    return zlib.crc32(request.node.nodeid.encode())


def _features(counts, seed, dim=24, noise=2.2):
    """Gaussian classes that overlap (so the prior moves the decision), `counts[c]` rows of class c."""
    generator = torch.Generator().manual_seed(seed)
    centers = torch.randn(len(counts), dim, generator=generator)
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    labels = labels[torch.randperm(len(labels), generator=generator)]
    return centers[labels] + noise * torch.randn(len(labels), dim, generator=generator), labels


def _cache(path, counts, seed):
    x, y = _features(counts, seed)
    return FeatureCache.write(str(path), [x], y, classes=[f"c{i}" for i in range(len(counts))])


def test_imbalance_ratio_log_prior_and_balanced_scores_against_references(request):
    rng = np.random.default_rng(_seed(request))
    labels = torch.from_numpy(rng.choice(5, size=211, p=[0.5, 0.3, 0.1, 0.07, 0.03]))
    counts = np.bincount(labels.numpy(), minlength=6)  # class 5 has no images: counted once in the prior
    assert imbalance.imbalance_ratio(labels, 6) == pytest.approx(counts[:5].max() / counts[:5].min())
    prior = imbalance.log_prior(labels, 6)
    expected = np.log(np.maximum(counts, 1) / np.maximum(counts, 1).sum())
    assert prior.numpy() == pytest.approx(expected, abs=1e-6)

    logits = torch.from_numpy(rng.standard_normal((211, 6)).astype(np.float32))
    scores = imbalance.balanced_scores(logits, labels, 6)
    predicted = logits.argmax(1).numpy()
    recalls = sklearn_metrics.recall_score(labels.numpy(), predicted, labels=range(5), average=None, zero_division=0)
    assert scores["val_balanced_accuracy"] == pytest.approx(recalls.mean(), abs=1e-6)
    losses = torch.nn.functional.cross_entropy(logits.double(), labels, reduction="none").numpy()
    per_class = [losses[labels.numpy() == c].mean() for c in range(5)]
    assert scores["val_balanced_loss"] == pytest.approx(np.mean(per_class), rel=1e-5)


def test_adjust_bias_subtracts_tau_times_the_log_prior_and_zero_leaves_the_head_alone():
    head = torch.nn.Sequential(torch.nn.Linear(3, 4))
    before = head[0].bias.detach().clone()
    prior = torch.log(torch.tensor([0.7, 0.2, 0.05, 0.05]))
    imbalance.adjust_bias(head, 0.0, prior)
    assert torch.equal(head[0].bias, before)
    imbalance.adjust_bias(head, 1.5, prior)
    assert torch.allclose(head[0].bias, before - 1.5 * prior)


def test_a_long_tailed_linear_head_is_adjusted_on_validation_and_scores_higher_balanced(tmp_path, request):
    seed = _seed(request) % 1000
    counts = [400, 200, 90, 40, 18, 8]
    train = _cache(tmp_path / "train", counts, seed)
    tuned = tuning.tune_linear([train], seed=0, progress=False)
    choice = tuned.choice
    assert choice["class_imbalance"] == pytest.approx(50.0)
    assert choice["logit_adjustment"] in imbalance.LOGIT_ADJUSTMENTS and choice["logit_adjustment"] > 0
    assert all("val_balanced_accuracy" in record for record in tuned.records)

    # a balanced test set from the same classes: the adjusted head beats the same head without it
    x, y = _features([300] * len(counts), seed)
    test = FeatureCache.write(str(tmp_path / "test"), [x], y, classes=train.classes)
    prior = imbalance.log_prior(train.labels, len(counts))
    with torch.no_grad():
        logits = tuned.head(test.all_features())
        plain = logits + choice["logit_adjustment"] * prior  # the bias before the adjustment
    adjusted_score = imbalance.balanced_scores(logits, test.labels, len(counts))["val_balanced_accuracy"]
    plain_score = imbalance.balanced_scores(plain, test.labels, len(counts))["val_balanced_accuracy"]
    assert adjusted_score > plain_score + 0.03, (adjusted_score, plain_score)


def test_balanced_training_data_is_not_adjusted(tmp_path, request):
    train = _cache(tmp_path / "train", [60, 55, 62, 58], _seed(request) % 1000)
    tuned = tuning.tune_linear([train], seed=0, progress=False)
    assert "logit_adjustment" not in tuned.choice and "class_imbalance" not in tuned.choice
    assert not any("logit_adjustment" in record for record in tuned.records)


MLP = dict(epochs=12, batch_size=64, lr=3e-3, seed=0, progress=False)


def test_a_long_tailed_mlp_head_is_adjusted_after_training_and_scores_higher_balanced(tmp_path, request):
    """The MLP's post-hoc adjustment: tau chosen on the validation logits of the chosen settings
    trained on the train part, folded into the refit head's last bias with every row's prior."""
    seed = _seed(request) % 1000
    counts = [400, 200, 90, 40, 18, 8]
    train = _cache(tmp_path / "train", counts, seed)
    tuned = tuning.tune_mlp([train], **MLP)
    choice = tuned.choice
    assert choice["class_imbalance"] == pytest.approx(50.0)
    assert choice["logit_adjustment"] in imbalance.LOGIT_ADJUSTMENTS and choice["logit_adjustment"] > 0
    assert 0 < choice["val_balanced_accuracy"] <= 1 and choice["val_balanced_loss"] > 0

    x, y = _features([300] * len(counts), seed)
    test = FeatureCache.write(str(tmp_path / "test"), [x], y, classes=train.classes)
    prior = imbalance.log_prior(train.labels, len(counts))
    with torch.no_grad():
        logits = tuned.head.eval()(test.all_features())
        plain = logits + choice["logit_adjustment"] * prior
    adjusted_score = imbalance.balanced_scores(logits, test.labels, len(counts))["val_balanced_accuracy"]
    plain_score = imbalance.balanced_scores(plain, test.labels, len(counts))["val_balanced_accuracy"]
    assert adjusted_score > plain_score + 0.03, (adjusted_score, plain_score)


def test_balanced_training_data_leaves_the_mlp_alone(tmp_path, request, monkeypatch):
    train = _cache(tmp_path / "train", [60, 55, 62, 58], _seed(request) % 1000)
    tuned = tuning.tune_mlp([train], **MLP)
    assert "logit_adjustment" not in tuned.choice and "class_imbalance" not in tuned.choice
    monkeypatch.setattr(imbalance, "IMBALANCE_RATIO", 1.0)  # every set counts as long-tailed: the bias moves
    adjusted = tuning.tune_mlp([train], **MLP)
    tau = adjusted.choice["logit_adjustment"]
    shift = tau * imbalance.log_prior(train.labels, 4)
    torch.testing.assert_close(adjusted.head[-1].bias, tuned.head[-1].bias - shift)
    torch.testing.assert_close(adjusted.head[-1].weight, tuned.head[-1].weight)
