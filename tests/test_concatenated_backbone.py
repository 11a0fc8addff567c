"""Backbones side by side ("a+b", fasttl.backbones.concatenated) and FeatureCache.side_by_side:
the features are exactly the parts' features one after the other, the runs, predictions and
exports that use them work as with one backbone, and the combinations that cannot work are
one-line errors before any work."""
import json
import os

import pytest
import torch

from conftest import cli, one_line_error, tiny_backbone

from fasttl import backbones
from fasttl.backbones.base import pooled_taps
from fasttl.util.errors import OptionError

PAIR = "efficientnet_lite0+efficientnet_lite1"


@pytest.fixture(scope="module")
def pair():
    return backbones.create(PAIR, pretrained=False)


@pytest.mark.parametrize("batch,size,taps", [(1, 33, 4), (3, 64, 0), (2, 47, 2), (0, 32, 1)])
def test_features_are_the_parts_side_by_side(pair, batch, size, taps):
    x = torch.randn(batch, 3, size, size)
    with torch.no_grad():
        joined = pooled_taps(pair, x, taps).double()
        parts = torch.cat([pooled_taps(p, x, taps) for p in pair.parts], 1).double()
    assert joined.shape == (batch, pair.tapped_dim(taps))
    torch.testing.assert_close(joined, parts, rtol=0, atol=0)
    assert pair.tapped_channels(taps) == [c for p in pair.parts for c in p.tapped_channels(taps)]


def test_extraction_copy_folds_every_part(pair):
    """for_extraction folds each part's batch norms: the same function within fp32 rounding."""
    x = torch.rand(2, 3, 40, 40)
    folded = pair.for_extraction()
    with torch.no_grad():
        want = pooled_taps(pair.eval(), x, 4).double()
        got = pooled_taps(folded, x, 4).double()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name,culprit", [
    ("efficientnet_lite0+nope", "'nope'"),
    ("efficientnet_lite0+efficientnet_lite0", "names efficientnet_lite0 twice"),
    ("efficientnet_lite0+efficientnet_lite1+efficientnet_lite2+efficientnet_lite0", "joins 4"),
    ("efficientnet_lite0+resnet18", "resnet18 can't be joined"),
    ("+efficientnet_lite0", "''"),
])
def test_bad_concatenations_are_named(name, culprit):
    with pytest.raises(OptionError, match=culprit) as error:
        backbones.create(name, pretrained=False)
    assert "\n" not in str(error.value)


def test_backbones_that_prepare_images_differently_do_not_join():
    """Built by hand (names can't join a ResNet): one image can't be normalized for both."""
    parts = [backbones.create("efficientnet_lite0", pretrained=False), backbones.create("resnet18", pretrained=False)]
    with pytest.raises(OptionError, match="prepare images differently"):
        backbones.ConcatenatedBackbone(parts)


def test_no_single_map_nor_classifier(pair):
    for call in (lambda: pair.forward_features(torch.rand(1, 3, 32, 32)), pair.classifier, pair.stages):
        with pytest.raises(OptionError, match="pooled features only"):
            call()


@pytest.mark.parametrize("words,culprit", [
    (["--strategy", "finetune"], "cannot train"),
    (["--strategy", "dann", "--target-data", "x"], "cannot train"),
    (["--weights", "{tmp}/w.pt"], "one file cannot hold"),
    (["--backbone", "efficientnet_lite0+efficientnet_lite0"], "names efficientnet_lite0 twice"),
])
def test_run_refuses_what_a_concatenation_cannot_do(capsys, tmp_path, words, culprit):
    backbone = [] if "--backbone" in words else ["--backbone", PAIR]
    (tmp_path / "w.pt").write_bytes(b"")
    code, _, err = cli(capsys, "run", *backbone, *[w.format(tmp=tmp_path) for w in words], "--out", tmp_path / "run",
                       "--no-progress")
    assert code == 2 and culprit in one_line_error(err)
    assert not (tmp_path / "run").exists()


def test_run_predict_export_with_two_backbones(tmp_path, three_classes, private_cache, capsys):
    """A linear run on Lite0+Lite1: its predictions from the cache equal those of the loaded
    model on the images, and its ONNX export matches PyTorch (export verifies it itself)."""
    import fasttl
    from fasttl.transfer.job import run

    out = tmp_path / "run"
    metrics = run(data=str(three_classes), backbone=PAIR, image_size=32, compare="none", out=str(out),
                  progress=False)
    layout = metrics["notes"]["features"]["layout"]["channels"]
    assert layout == [80, 112, 192, 320, 1280, 80, 112, 192, 320, 1280]
    assert json.loads((out / "config.json").read_text())["backbone"] == PAIR
    model = fasttl.load_run(str(out))
    from fasttl import data

    test = data.scan_class_folder(str(three_classes / "test"))
    names, _ = model.predict(test)
    written = [line.split(",")[2] for line in (out / "predictions.csv").read_text().splitlines()[1:]]
    assert names == written
    code, text, err = cli(capsys, "export", out, "--out", tmp_path / "model.onnx")
    assert code == 0, err
    assert os.path.getsize(tmp_path / "model.onnx") > 1e6 and "verified with ONNX Runtime" in text


def _cache(features, labels, name="a", size=32, precision="fp32"):
    from fasttl.cache.cache import FeatureCache

    fingerprint = {"backbone": {"name": name}, "layout": {"taps": 0, "channels": [features.shape[1]]},
                   "dataset": {"classes": ["x", "y"]}, "dtype": "fp16",
                   "preprocessing": {"size": size, "mean": [0.5] * 3, "mirror": False, "backend": "torch"},
                   "compute": {"precision": precision, "engine": "onnxruntime"}}
    return FeatureCache("/nowhere", {"fingerprint": fingerprint, "count": len(labels)}, features, None, labels,
                        [f"s{i}" for i in range(len(labels))])


def test_side_by_side_is_the_column_concatenation():
    from fasttl.cache.cache import FeatureCache

    labels = torch.tensor([0, 1, 1, 0, 1])
    a, b = torch.randn(5, 3).half(), torch.randn(5, 7).half()
    joined = FeatureCache.side_by_side([_cache(a, labels), _cache(b, labels, "b")])
    torch.testing.assert_close(joined.all_features(), torch.cat([a, b], 1).float(), rtol=0, atol=0)
    assert joined.fingerprint["layout"]["channels"] == [3, 7]
    assert joined.fingerprint["backbone"]["name"] == "a+b" and joined.feature_dim == 10
    assert torch.equal(joined.labels, labels) and len(joined) == 5


@pytest.mark.parametrize("other,culprit", [("labels", "other images"), ("rows", "other images"),
                                           ("one", "at least two"), ("size", "image size"),
                                           ("precision", "extraction precision")])
def test_side_by_side_refuses_other_images_and_other_extractions(other, culprit):
    """Two caches of one feature space only: the same images, seen at the same size and
    normalization, extracted at the same precision (a 32 px and a 96 px cache side by side would
    pass for a 32 px join)."""
    from fasttl.cache.cache import FeatureCache
    from fasttl.cache.store import CacheError

    labels = torch.tensor([0, 1, 1])
    first = _cache(torch.randn(3, 2).half(), labels)
    second = {"labels": _cache(torch.randn(3, 2).half(), torch.tensor([1, 1, 0]), "b"),
              "rows": _cache(torch.randn(2, 2).half(), labels[:2], "b"), "one": None,
              "size": _cache(torch.randn(3, 2).half(), labels, "b", size=96),
              "precision": _cache(torch.randn(3, 2).half(), labels, "b", precision="bf16")}[other]
    with pytest.raises((CacheError, ValueError), match=culprit):
        FeatureCache.side_by_side([first] if second is None else [first, second])
    engine_only = _cache(torch.randn(3, 2).half(), labels, "b")
    engine_only.fingerprint["compute"]["engine"], engine_only.fingerprint["preprocessing"]["backend"] = "torch", "dali"
    assert FeatureCache.side_by_side([first, engine_only]).feature_dim == 4  # the same features within rounding


def test_tiny_backbones_cannot_join_by_name():
    """Only registered backbones join by name; a custom one stays one backbone."""
    assert not backbones.known("tiny+efficientnet_lite0")
    assert backbones.known(PAIR) and backbones.known("efficientnet_lite0")
    assert tiny_backbone().tapped_channels(0) == [8]
