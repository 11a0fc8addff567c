"""LP-FT (issue 18): fine-tuning starts from the probe's head, keeps the best validation
checkpoint (the probe included), and L2-SP decays toward the pretrained weights."""
import json

import numpy as np
import pytest
import torch
from conftest import cifar_subset
from torch import nn

import fasttl
from fasttl.data.splits import validation_split
from fasttl.transfer.job import run
from fasttl.transfer.strategies import finetune
from fasttl.transfer.strategies.finetune import L2SP, BestState

pytestmark = pytest.mark.usefixtures("private_cache")

CLASSES = ["airplane", "automobile", "frog", "ship"]


@pytest.fixture(scope="module")
def tiny_cifar(tmp_path_factory, cifar10_root):
    return cifar_subset(cifar10_root, tmp_path_factory.mktemp("tiny") / "cifar4", CLASSES, 16, 6)


# -- L2-SP -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_l2sp_is_zero_at_the_pretrained_weights_and_has_the_right_gradient(dtype):
    shapes = [(7, 3, 3, 3), (1,), (13, 5), (4097,)]
    params = [nn.Parameter(torch.randn(s).to(dtype)) for s in shapes]
    frozen = nn.Parameter(torch.randn(5).to(dtype), requires_grad=False)
    alpha = 0.37
    l2sp = L2SP(params + [frozen], alpha)
    assert len(l2sp.params) == len(params)  # frozen weights carry no penalty
    zero = l2sp.penalty()
    assert zero.item() == 0.0
    zero.backward()
    assert all(torch.count_nonzero(p.grad) == 0 for p in params)

    anchors = [p.detach().double().clone() for p in params]
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn_like(p.float()).to(dtype) * 0.1)
            p.grad = None
    penalty = l2sp.penalty()
    moved = [p.detach().double() for p in params]
    reference = 0.5 * alpha * sum(((w - w0) ** 2).sum() for w, w0 in zip(moved, anchors))
    assert penalty.item() == pytest.approx(reference.item(), rel=1e-5)
    upstream = 2.5  # a backward that ignored its upstream gradient would fail
    (penalty * upstream).backward()
    for p, w, w0 in zip(params, moved, anchors):
        expected = upstream * alpha * (w - w0)
        # bf16 grads round to 8 bits of mantissa: the allowance is bf16's own rounding of the exact value
        tol = 1e-6 if dtype == torch.float32 else 2 * float((expected.to(dtype).double() - expected).abs().max())
        torch.testing.assert_close(p.grad.double(), expected, rtol=1e-5, atol=tol + 1e-7)


def test_l2sp_gradient_matches_autograd_of_the_float64_formula():
    params = [nn.Parameter(torch.randn(6, 11, dtype=torch.float64)), nn.Parameter(torch.randn(3, dtype=torch.float64))]
    l2sp = L2SP(params, 0.05)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn_like(p))
    twins = [p.detach().clone().requires_grad_(True) for p in params]
    (0.5 * 0.05 * sum(((t - a.double()) ** 2).sum() for t, a in zip(twins, l2sp.anchors))).backward()
    l2sp.penalty().backward()
    for p, t in zip(params, twins):
        torch.testing.assert_close(p.grad, t.grad, rtol=1e-6, atol=1e-7)


# -- the best validation checkpoint ---------------------------------------------------------------

@pytest.mark.parametrize("probe, finetuned, images, kept", [
    (0.75, 0.80, 20, False),    # one validation image more of 20: within sqrt(.75 * .25 / 20) = 0.097
    (0.73, 0.78, 100, True),    # 0.05 above, one standard error 0.044
    (0.776, 0.836, 500, True),
    (0.5, 0.5, 1000, False),    # a tie keeps the probe
    (1.0, 1.0, 7, False),
])
def test_finetuning_is_kept_only_beyond_one_standard_error_of_the_probe(probe, finetuned, images, kept):
    got, margin = finetune.keep_finetuned(probe, finetuned, images)
    assert got == kept
    assert margin == pytest.approx((probe * (1 - probe) / images) ** 0.5, abs=1e-12)


def test_best_state_keeps_the_best_validation_epoch_ties_to_lower_loss():
    model = nn.Linear(3, 2)
    best = BestState()
    records = [(0.50, 1.0), (0.70, 0.9), (0.60, 0.5), (0.70, 1.2), (0.70, 0.8), (0.90, float("nan")), (0.65, 0.1)]
    weights = {}
    for epoch, (accuracy, loss) in enumerate(records):
        with torch.no_grad():
            model.weight.fill_(epoch + 0.5)
        weights[epoch] = model.weight.detach().clone()
        best.offer(epoch, {"eval_accuracy": accuracy, "eval_loss": loss}, model)
    assert best.epoch == 4 and best.record["eval_loss"] == 0.8
    assert torch.equal(best.model["weight"], weights[4])
    with torch.no_grad():
        model.weight.zero_()  # the kept state is a copy, not the live weights
    assert torch.equal(best.model["weight"], weights[4])
    again = BestState()
    again.load_state_dict(best.state_dict())
    assert again.epoch == 4 and again.score == best.score and torch.equal(again.model["weight"], weights[4])


# -- LP-FT end to end ------------------------------------------------------------------------------

def _val_source(tiny_cifar, seed=0):
    from fasttl.transfer.datasets import load_dataset

    ds = load_dataset(str(tiny_cifar), seed=seed)
    _, val_rows = validation_split(np.asarray(ds.train.labels), seed)
    return ds.train.subset(val_rows)


def test_lpft_starts_from_the_probe_and_keeps_the_best_validation_checkpoint(tiny_cifar, tmp_path):
    # fp32 cache through the torch engine: the probe saw the same fp32 features of the same eval
    # transform as the fine-tuned model, the cache's backbone with its batch norms folded into
    # the convolutions (fp32 rounding, about 1e-6 relative), so the first evaluation equals the
    # probe's: the same accuracy and the loss to 1e-4 relative. (With the default fp16 cache the
    # features differ by fp16's rounding, 5e-4 relative, enough to flip near-tied images.)
    out = tmp_path / "lpft"
    metrics = run(data=str(tiny_cifar), strategy="finetune", epochs=4, batch_size=16, image_size=32, seed=0,
                  cache_dtype="fp32", engine="torch", out=str(out), progress=False)
    choice = metrics["notes"]["choice"]
    probe = choice["probe"]
    assert probe["first_val_accuracy"] == probe["val_accuracy"]
    assert probe["first_val_loss"] == pytest.approx(probe["val_loss"], rel=1e-4)
    assert choice["lr_scale"] in finetune.LR_SCALES and len(choice["sweep"]) == len(finetune.LR_SCALES)
    history = metrics["history"]
    assert all(h["lr_scale"] == choice["lr_scale"] for h in history)
    # the best validation score of all, the probe (epoch 0) included, is kept when it beats the
    # probe by more than one standard error; else the probe is
    scores = [(probe["first_val_accuracy"], -probe["first_val_loss"])] + [
        (h["val_accuracy"], -h["val_loss"]) for h in history]
    best, kept = choice["finetuned_best"]["epoch"], choice["epoch_kept"]
    assert scores[best] == max(scores)
    won, margin = finetune.keep_finetuned(scores[0][0], scores[best][0], choice["validation"]["validation_images"])
    assert kept == (best if won else 0) and choice["one_standard_error"] == pytest.approx(margin)
    # early stopping: it ran all epochs, or stopped PATIENCE epochs after the best
    best_run = max(range(len(history)), key=lambda i: history[i]["val_accuracy"])
    assert len(history) == 4 or len(history) - 1 - best_run >= finetune.PATIENCE
    report = (out / "report.md").read_text()
    assert "lr scale" in report and "epoch kept" in report
    # the saved weights are the kept checkpoint's (or the probe refit on train + validation)
    model = fasttl.load_run(str(out))
    logits, labels = model.trained.logits(_val_source(tiny_cifar))
    if kept > 0:
        assert float((logits.argmax(1) == labels).float().mean()) == choice["val_accuracy"]
    else:
        assert "the result is the probe" in report
        # the probe finetune keeps sees the plain views only, as `linear --mirror-views none` does
        linear = run(data=str(tiny_cifar), strategy="linear", image_size=32, seed=0, mirror_views="none",
                     cache_dtype="fp32", engine="torch", out=str(tmp_path / "linear"), progress=False, compare="none")
        assert metrics["accuracy"] == linear["accuracy"]


def test_when_finetuning_never_beats_the_probe_the_result_is_the_probe(tiny_cifar, tmp_path, monkeypatch):
    # An lr that wrecks the network in its first steps: fine-tuning cannot beat the probe.
    monkeypatch.setattr(finetune, "LR_SCALES", (3e3,))
    out = tmp_path / "wrecked"
    metrics = run(data=str(tiny_cifar), strategy="finetune", epochs=2, batch_size=16, image_size=32, seed=0,
                  cache_dtype="fp32", engine="torch", out=str(out), progress=False)
    choice = metrics["notes"]["choice"]
    assert choice["epoch_kept"] == 0 and choice["refit_on"].startswith("train + validation")
    assert "the result is the probe" in (out / "report.md").read_text()
    linear = run(data=str(tiny_cifar), strategy="linear", image_size=32, seed=0, mirror_views="none",  # plain views
                 cache_dtype="fp32", engine="torch", out=str(tmp_path / "linear"), progress=False, compare="none")
    assert metrics["accuracy"] == linear["accuracy"]
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["notes"]["choice"]["outcome"] == choice["outcome"]


def test_l2sp_run_and_plain_finetuning_still_run(tiny_cifar, tmp_path):
    metrics = run(data=str(tiny_cifar), strategy="finetune", epochs=1, batch_size=16, image_size=32, seed=0,
                  regularize="l2sp", out=str(tmp_path / "l2sp"), progress=False)
    assert metrics["notes"]["choice"]["regularize"] == "l2sp" and metrics["notes"]["choice"]["l2sp_alpha"] > 0
    plain = run(data=str(tiny_cifar), strategy="finetune", finetune_from="random", epochs=1, batch_size=16,
                image_size=32, seed=0, out=str(tmp_path / "plain"), progress=False)
    assert "choice" not in plain["notes"] and plain["history"][0]["images"] == 64
    model = fasttl.load_run(str(tmp_path / "plain"))  # the random-init head loads as before
    assert isinstance(model.trained.module.head[0], nn.Dropout)
