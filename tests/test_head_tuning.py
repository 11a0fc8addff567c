"""Heads chosen on validation data: the stratified validation split, the exact linear solver
(against scikit-learn's logistic regression), the regularization path, the MLP's early
stopping, and a run that records its choices and sees the test split once."""
import json
import os
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fasttl.heads import solver, tuning
from fasttl.cache.cache import FeatureCache
from fasttl.data.splits import VALIDATION_FRACTION, validation_split


def labels_with_counts(counts, seed):
    rng = np.random.default_rng(seed)
    labels = np.concatenate([np.full(n, c) for c, n in enumerate(counts)])
    return rng.permutation(labels)


@pytest.mark.parametrize("counts", [[50, 50, 50], [200, 7, 2, 1], [1, 1], [13, 29, 101, 3]])
def test_validation_split_is_stratified_disjoint_and_seeded(counts, request):
    seed = zlib.crc32(request.node.nodeid.encode())
    labels = labels_with_counts(counts, seed)
    train, val = validation_split(labels, seed)
    assert sorted(train + val) == list(range(len(labels))) and not set(train) & set(val)
    for c, n in enumerate(counts):
        held = int(np.sum(labels[val] == c))
        expected = 0 if n == 1 else max(1, int(round(n * VALIDATION_FRACTION)))
        assert held == expected, (c, n, held)
        assert np.sum(labels[train] == c) == n - held >= 1
    assert validation_split(labels, seed) == (train, val)
    assert validation_split(torch.from_numpy(labels), seed) == (train, val)  # a cache's labels, as a tensor
    assert validation_split(labels.tolist(), seed) == (train, val)
    if len(labels) > 20:
        assert validation_split(labels, seed + 1)[1] != val


def test_validation_split_is_independent_of_the_test_split_stream():
    """The same seed holds out different samples for validation than for a test split, so a
    folder without test/ does not end with validation == test-like draws."""
    from fasttl.data.splits import stratified_split

    labels = labels_with_counts([40, 40], 3)
    assert stratified_split(labels, VALIDATION_FRACTION, 3)[1] != validation_split(labels, 3)[1]


def separable_problem(n, d, classes, seed, noise=1.5):
    generator = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, d, generator=generator) * 2
    y = torch.randint(0, classes, (n,), generator=generator)
    x = centers[y] + noise * torch.randn(n, d, generator=generator)
    return x, y


@pytest.mark.parametrize("n, d, classes, weight_decay", [(300, 17, 3, 0.1), (257, 40, 5, 0.01), (64, 3, 2, 1.0)])
def test_solver_matches_scikit_learn_logistic_regression(n, d, classes, weight_decay, request):
    from sklearn.linear_model import LogisticRegression

    x, y = separable_problem(n, d, classes, zlib.crc32(request.node.nodeid.encode()))
    weight, bias, record = solver.solve(x, y, classes, weight_decay, max_iter=500, tolerance=1e-7)
    # scikit-learn minimizes C * sum_i CE + ||W||^2 / 2: the same optimum at C = 1 / (weight_decay * n).
    # With two classes it keeps one vector w = w_1 - w_2, and at our optimum w_1 = -w_2 = w / 2, so
    # our penalty is (weight_decay / 4) ||w||^2: C = 2 / (weight_decay * n).
    c = (2.0 if classes == 2 else 1.0) / (weight_decay * n)
    reference = LogisticRegression(C=c, tol=1e-10, max_iter=10_000).fit(x.double().numpy(), y.numpy())
    ours = torch.softmax(torch.addmm(bias, x, weight.t()).double(), 1).numpy()
    theirs = reference.predict_proba(x.double().numpy())
    assert np.abs(ours - theirs).max() < 2e-3
    if classes > 2:  # (the binary model's one vector is compared through the probabilities)
        np.testing.assert_allclose(weight.double().numpy() - weight.double().numpy().mean(0),
                                   reference.coef_ - reference.coef_.mean(0), atol=5e-3, rtol=0)
    # The gradient of the objective vanishes at the solution.
    w, b = weight.clone().requires_grad_(True), bias.clone().requires_grad_(True)
    loss = F.cross_entropy(torch.addmm(b, x, w.t()), y) + 0.5 * weight_decay * w.pow(2).sum()
    loss.backward()
    assert float(w.grad.abs().max()) < 1e-3 and float(b.grad.abs().max()) < 1e-3
    assert record["objective"] == pytest.approx(float(loss.detach()), rel=1e-5)


def test_path_chooses_the_best_validation_strength_and_stops_after_patience():
    x, y = separable_problem(400, 30, 4, 7, noise=4.0)
    vx, vy = separable_problem(200, 30, 4, 7 + 1, noise=4.0)
    vx, vy = vx[:200], vy[:200]
    strengths = (10.0, 3.0, 1.0, 0.3, 0.1, 0.03, 0.01, 0.003, 0.001, 3e-4, 1e-4, 3e-5)
    chosen, path, (weight, bias) = solver.fit_path(x, y, [vx], vy, 4, weight_decays=strengths, patience=2)
    scores = [(p["val_accuracy"], -p["val_loss"]) for p in path]
    best = max(range(len(path)), key=lambda i: scores[i])
    assert chosen == path[best]["weight_decay"]
    assert len(path) == len(strengths) or len(path) == best + 3  # stopped two strengths after the best
    logits = torch.addmm(bias, vx, weight.t())
    assert float((logits.argmax(1) == vy).float().mean()) == pytest.approx(path[best]["val_accuracy"])


def test_block_scaling_gives_each_stage_the_final_maps_variance():
    generator = torch.Generator().manual_seed(3)
    widths = [7, 30, 64]
    x = torch.cat([torch.randn(500, w, generator=generator) * s + m for w, s, m in zip(widths, (0.01, 5.0, 1.0),
                                                                                      (3.0, -1.0, 0.5))], 1)
    mean, scale = solver.block_scaling(x, widths)
    z = (x - mean) / scale
    energies = [float(z[:, a:a + w].var(0, unbiased=False).sum()) for a, w in zip((0, 7, 37), widths)]
    np.testing.assert_allclose(energies, [widths[-1]] * 3, rtol=1e-4)
    assert float(z.mean(0).abs().max()) < 1e-3  # fp32: a 0.01-std block around 3.0 is scaled up 300x
    # Within a block, relative scales are kept (one number per block).
    ratio = scale[7:37] / scale[7]
    assert torch.equal(ratio, torch.ones_like(ratio))


def fake_cache(x, y, classes, widths=None):
    fingerprint = {"dataset": {"classes": classes}, "layout": {"taps": 0, "channels": widths or [x.shape[1]]}}
    manifest = {"fingerprint": fingerprint, "count": len(x)}
    return FeatureCache("/nonexistent", manifest, x.to(torch.float16), None, y, [f"s{i}" for i in range(len(x))])


def test_tuned_linear_head_is_the_refit_solution_and_predicts_the_views_average(monkeypatch):
    monkeypatch.setattr(tuning, "CROSS_VALIDATION_BELOW", 0)  # the one-split choice (cross-validation: its own file)
    x, y = separable_problem(300, 24, 3, 11, noise=3.0)
    mirrored = x + 0.1 * torch.randn_like(x)
    views = [fake_cache(x, y, ["a", "b", "c"], [8, 16]), fake_cache(mirrored, y, ["a", "b", "c"], [8, 16])]
    tuned = tuning.tune_linear(views, seed=5, progress=False)
    head, path, choice = tuned.head, tuned.records, tuned.choice
    assert choice["weight_decay"] in solver.WEIGHT_DECAYS and path
    assert choice["validation"]["validation_images"] == 30 and choice["validation"]["train_images"] == 270
    rows = torch.cat([v.all_features() for v in views])
    labels = torch.cat([y, y])
    mean, scale = solver.block_scaling(rows, [8, 16])
    scaled = (rows - mean) / scale
    _, _, optimum = solver.solve(scaled, labels, 3, choice["weight_decay"], max_iter=2000, tolerance=1e-8)
    head.eval()
    linear = head[-1]
    torch.testing.assert_close(head[0].mean, mean) and torch.testing.assert_close(head[0].std, scale)
    with torch.no_grad():
        # The head is the refit on all rows (train + validation, both views): its objective there is
        # the optimum's, up to the solver's stopping tolerance.
        objective = F.cross_entropy(linear(scaled), labels) + 0.5 * choice["weight_decay"] * linear.weight.pow(2).sum()
        assert float(objective) == pytest.approx(optimum["objective"], rel=5e-3)
        logits, got_labels = tuning.predict_split(head, views)
        torch.testing.assert_close(logits, (head(views[0].all_features()) + head(views[1].all_features())) / 2)
    assert torch.equal(got_labels, y)


def test_a_mirrored_validation_view_is_averaged_into_every_validation_score(monkeypatch):
    # --mirror-views test: the head trains on the plain view alone, and each L2 strength is scored
    # on the average of the validation images' plain and mirrored logits (as test will be).
    monkeypatch.setattr(tuning, "CROSS_VALIDATION_BELOW", 0)  # the one-split choice (cross-validation: its own file)
    x, y = separable_problem(300, 24, 3, 13, noise=4.0)
    mirrored = x + 0.5 * torch.randn_like(x)
    plain = fake_cache(x, y, ["a", "b", "c"], [8, 16])
    train_rows, val_rows = validation_split(y, 3)
    mirrored_val = fake_cache(mirrored[val_rows], y[val_rows], ["a", "b", "c"], [8, 16])
    tuned = tuning.tune_linear([plain], seed=3, progress=False, mirrored_validation=mirrored_val)
    path, choice = tuned.records, tuned.choice
    assert choice["validation"]["views"] == 2 and choice["validation"]["validation_images"] == len(val_rows)
    features = plain.all_features()
    mean, scale = solver.block_scaling(features[train_rows], [8, 16])
    val_views = [(features[val_rows] - mean) / scale, (mirrored_val.all_features() - mean) / scale]
    _, expected, _ = solver.fit_path((features[train_rows] - mean) / scale, y[train_rows], val_views, y[val_rows], 3,
                                     progress=False)
    assert [p["val_accuracy"] for p in path] == [p["val_accuracy"] for p in expected]
    plain_path = tuning.tune_linear([plain], seed=3, progress=False).records
    assert [p["val_loss"] for p in plain_path] != [p["val_loss"] for p in path]  # the mirrored view did count
    with pytest.raises(ValueError, match="mirrored validation view: 5 rows for 30 validation images"):
        tuning.tune_linear([plain], seed=3, progress=False, mirrored_validation=fake_cache(
            mirrored[:5], y[:5], ["a", "b", "c"], [8, 16]))


def test_mlp_early_stopping_keeps_the_best_validation_epoch():
    x, y = separable_problem(240, 16, 3, 13, noise=2.5)
    views = [fake_cache(x, y, ["a", "b", "c"])]
    tuned = tuning.tune_mlp(views, epochs=6, batch_size=64, lr=3e-3, seed=2, progress=False)
    curves, choice = tuned.records, tuned.choice
    assert {c["weight_decay"] for c in curves} == set(tuning.MLP_WEIGHT_DECAYS)
    assert all("eval_accuracy" not in c and "val_accuracy" in c for c in curves)
    best = max(curves, key=lambda c: (c["val_accuracy"], -c["val_loss"]))
    assert (choice["weight_decay"], choice["epochs"]) == (best["weight_decay"], best["epoch"])
    for weight_decay in tuning.MLP_WEIGHT_DECAYS:
        run = [c for c in curves if c["weight_decay"] == weight_decay]
        accuracies = [c["val_accuracy"] for c in run]
        stopped_early = len(run) < 6
        if stopped_early:  # exactly MLP_PATIENCE epochs after the best
            assert len(run) - 1 - accuracies.index(max(accuracies)) == tuning.MLP_PATIENCE


def test_a_run_records_its_choices_and_never_a_test_curve(tmp_path, cifar10_root, private_cache, monkeypatch):
    from tests.conftest import cifar_subset
    from fasttl.transfer import run

    monkeypatch.setattr(tuning, "CROSS_VALIDATION_BELOW", 0)  # the one-split choice (cross-validation: its own file)
    data = cifar_subset(cifar10_root, tmp_path / "data", ["cat", "ship", "frog"], train=20, test=5)
    out = tmp_path / "run"
    run(data=str(data), strategy="linear", image_size=32, out=str(out), compare="none", progress=False,
        mirror_views="both")
    metrics = json.loads((out / "metrics.json").read_text())
    choice = metrics["notes"]["choice"]
    assert choice["validation"] == {"fraction": VALIDATION_FRACTION, "train_images": 54, "validation_images": 6,
                                    "seed": 0, "views": 2}
    # the choice is the path's best validation score, a whole number of the 6 validation images
    chosen = [h for h in metrics["history"] if h["weight_decay"] == choice["weight_decay"]]
    assert choice["weight_decay"] in solver.WEIGHT_DECAYS and len(chosen) == 1
    assert choice["val_accuracy"] == chosen[0]["val_accuracy"] == max(h["val_accuracy"] for h in metrics["history"])
    assert choice["val_accuracy"] * 6 == pytest.approx(round(choice["val_accuracy"] * 6), abs=1e-5)
    assert metrics["notes"]["features"]["kind"] == "multi" and metrics["notes"]["features"]["dim"] == 1984
    assert metrics["notes"]["views"] == {"train": 2, "test": 2}  # mirror views combine with multi-stage features and the tuned head
    assert metrics["history"] and all("val_accuracy" in h and not any(k.startswith("eval_") for k in h)
                                      for h in metrics["history"])
    assert "## Choices made on validation" in (out / "report.md").read_text()


def test_validation_comes_from_training_images_only(tmp_path, cifar10_root):
    """A folder without test/: fasttl carves the test split first, then validation from what is
    left, so no validation image is a test image (and both are stratified)."""
    import shutil

    from fasttl.transfer.datasets import load_dataset

    root = tmp_path / "flat"
    for name in ("cat", "dog", "ship"):
        shutil.copytree(os.path.join(cifar10_root, "train", name), root / name)
    dataset = load_dataset(str(root), seed=4)
    train_ids, test_ids = dataset.train.sample_ids(), dataset.test.sample_ids()
    kept, validation = validation_split(dataset.train.labels, 4)
    validation_ids = {train_ids[i] for i in validation}
    assert validation_ids and not validation_ids & set(test_ids)
    assert not {train_ids[i] for i in kept} & validation_ids
    assert len(validation_ids) == 3 * round(0.1 * 80)  # 100 per class, 20% test, 10% of the rest validation
