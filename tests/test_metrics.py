"""classification_metrics against scikit-learn's metrics and a float64 cross-entropy, on fresh
random predictions: odd class counts, one sample, a class missing from the truth, a class never
predicted, long-tailed labels (where balanced accuracy and accuracy part)."""
import zlib

import numpy as np
import pytest
import torch

from fasttl.transfer.metrics import classification_metrics

sklearn_metrics = pytest.importorskip("sklearn.metrics", reason="scikit-learn is the reference here")


def _rng(request) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


def _case(rng, samples: int, classes: int, *, missing=(), never_predicted=(), tail: float = 0.0):
    weights = np.ones(classes) if tail == 0 else np.exp(-tail * np.arange(classes))
    weights[list(missing)] = 0
    labels = rng.choice(classes, size=samples, p=weights / weights.sum())
    logits = rng.standard_normal((samples, classes)) * 2
    logits[np.arange(samples), labels] += rng.uniform(0, 3, samples)  # better than chance, not perfect
    logits[:, list(never_predicted)] = -1e4
    return torch.from_numpy(logits.astype(np.float32)), torch.from_numpy(labels)


CASES = {
    "three balanced": dict(samples=97, classes=3),
    "one sample": dict(samples=1, classes=4),
    "eleven long-tailed": dict(samples=503, classes=11, tail=0.4),
    "a class missing from the truth": dict(samples=60, classes=5, missing=(2,)),
    "a class never predicted": dict(samples=80, classes=6, never_predicted=(0, 4)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_classification_metrics_match_scikit_learn(case, request):
    logits, labels = _case(_rng(request), **CASES[case])
    classes = [f"c{i}" for i in range(logits.shape[1])]
    got = classification_metrics(logits, labels, classes)
    y, p = labels.numpy(), logits.argmax(1).numpy()
    present = np.unique(y)
    everything = np.arange(len(classes))

    assert got["accuracy"] == pytest.approx(sklearn_metrics.accuracy_score(y, p), abs=1e-12)
    # scikit-learn's balanced accuracy averages the recall of the classes in the truth, as fasttl's does
    recalls = sklearn_metrics.recall_score(y, p, labels=everything, average=None, zero_division=0)
    assert got["balanced_accuracy"] == pytest.approx(recalls[present].mean(), abs=1e-12)
    if set(p) <= set(y):  # scikit-learn warns and differs only when a class is predicted but absent
        assert got["balanced_accuracy"] == pytest.approx(sklearn_metrics.balanced_accuracy_score(y, p), abs=1e-12)
    assert got["macro_f1"] == pytest.approx(
        sklearn_metrics.f1_score(y, p, labels=present, average="macro", zero_division=0), abs=1e-12)
    # a class without test images has no recall (None), not 0.0
    assert [r for r in got["per_class_recall"].values() if r is not None] == pytest.approx(list(recalls[present]),
                                                                                          abs=1e-12)
    assert [c for c, r in got["per_class_recall"].items() if r is None] == [classes[i] for i in everything
                                                                           if i not in present]
    precisions = sklearn_metrics.precision_score(y, p, labels=everything, average=None, zero_division=0)
    predicted = set(p.tolist())  # a class never predicted has no precision (None), not 0.0
    assert [v for v in got["per_class_precision"].values() if v is not None] == pytest.approx(
        [precisions[i] for i in everything if i in predicted], abs=1e-12)
    assert [c for c, v in got["per_class_precision"].items() if v is None] == [classes[i] for i in everything
                                                                               if i not in predicted]
    assert got["confusion_matrix"] == sklearn_metrics.confusion_matrix(y, p, labels=everything).tolist()
    loss = torch.nn.functional.cross_entropy(logits.double(), labels)
    assert got["loss"] == pytest.approx(float(loss), rel=1e-5)
    assert got["samples"] == len(y) and got["classes"] == classes


def test_balanced_accuracy_parts_from_accuracy_on_a_long_tail():
    # 90 images of the head class all right, 10 of the tail all wrong: accuracy 0.9, balanced 0.5.
    labels = torch.tensor([0] * 90 + [1] * 10)
    logits = torch.zeros(100, 2)
    logits[:, 0] = 1.0
    got = classification_metrics(logits, labels, ["head", "tail"])
    assert got["accuracy"] == pytest.approx(0.9) and got["balanced_accuracy"] == pytest.approx(0.5)
    assert got["per_class_recall"] == {"head": 1.0, "tail": 0.0}
