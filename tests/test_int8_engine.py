"""The int8 extraction engine (`--extract-precision int8`): ONNX Runtime's statically quantized
graph, calibrated on a fixed, seeded sample of the cache's own images, held to INT8_TOLERANCE
of the float64 features, named by its calibration in the fingerprint and the engine file, and
checked like the fp32 graph (a tampered or wrong graph is exported again)."""
import hashlib
import json
import os
import zlib

import pytest
import torch

import fasttl
import fasttl.data as D
from fasttl.backbones.base import pooled_taps
from fasttl.cache import engines, quantize
from fasttl.cache.extraction import calibration_sample
from fasttl.util.errors import OptionError

SIZE = 64
pytestmark = pytest.mark.skipif(not engines.onnxruntime_available(),
                                reason="onnxruntime is not installed (pip install onnx onnxruntime)")


def build(backbone, source, out, **kw):
    kw = dict(dict(image_size=SIZE, backend="torch", dtype="fp32", batch_size=4, engine="auto", precision="int8",
                   taps=4), **kw)
    return fasttl.FeatureCache.build(backbone, source, str(out), progress=False, **kw)


def float64_features(source, taps=4):
    images = torch.cat([x for x, _ in D.make_loader(source, fasttl.backbones.create("efficientnet_lite0").preprocessing,
                                                      6, image_size=SIZE, backend="torch")])
    model = fasttl.backbones.create("efficientnet_lite0").eval().double()
    with torch.no_grad():
        return pooled_taps(model, images.double(), taps)


@pytest.mark.parametrize("taps", [0, 4])
def test_int8_features_are_near_the_float64_reference_and_named_by_their_calibration(lite0, small_source, tmp_path,
                                                                                    taps):
    engine_dir = tmp_path / "engines"
    engine_dir.mkdir()
    cache = build(lite0, small_source, tmp_path / "c", taps=taps, engine_dir=str(engine_dir))
    want = float64_features(small_source, taps)
    error = engines.norm_error(cache.features.double(), want)
    assert 0 < error < engines.INT8_TOLERANCE, error  # quantized (not fp32 under another name), and close
    cosine = torch.nn.functional.cosine_similarity(cache.features.double(), want, dim=1)
    assert float(cosine.min()) > 0.9
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    compute = manifest["fingerprint"]["compute"]
    assert compute["engine"] == "onnxruntime" and compute["precision"] == "int8"
    (name,) = os.listdir(engine_dir)
    key, _ = calibration_sample(small_source, cache_spec(lite0))
    assert compute["calibration"] == dict(quantize.settings(), sample=key)  # the sample is named, its own too
    assert name == engines.onnx_file_name(lite0, taps, SIZE, key) and name.endswith("-int8.onnx")
    graph = (engine_dir / name).read_bytes()
    assert manifest["engine_graph"] == {"file": name, "bytes": len(graph), "sha256": hashlib.sha256(graph).hexdigest()}
    assert b"QuantizeLinear" in graph


def cache_spec(backbone):
    return D.TransformSpec.for_backbone(backbone.preprocessing, size=SIZE)


def test_the_calibration_sample_is_a_fixed_draw_of_the_source(lite0, small_source, tmp_path, monkeypatch):
    """Two builds of the same images (no graph kept between them) quantize alike: the same graph,
    the same features; other images give another calibration key."""
    rows = quantize.calibration_rows(1000)
    assert rows == sorted(rows) and len(set(rows)) == quantize.CALIBRATION_IMAGES == len(rows)
    assert rows == quantize.calibration_rows(1000) and rows != list(range(quantize.CALIBRATION_IMAGES))
    assert quantize.calibration_rows(5) == [0, 1, 2, 3, 4]
    first = build(lite0, small_source, tmp_path / "a")
    monkeypatch.setattr(engines, "_EXPORTED", {})
    second = build(lite0, small_source, tmp_path / "b")
    torch.testing.assert_close(first.features, second.features, rtol=0, atol=0)
    key, images = calibration_sample(small_source, cache_spec(lite0))
    assert len(images) == min(len(small_source), quantize.CALIBRATION_IMAGES)
    other, _ = calibration_sample(small_source.subset(range(len(small_source) - 1)), cache_spec(lite0))
    assert other != key


def _zeros_graph(lite0, taps, size=SIZE):
    from fasttl.backbones.base import PooledFeatures
    from fasttl.onnx_graph import to_onnx

    class Zeros(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.pooled = PooledFeatures(lite0.for_extraction(), taps)

        def forward(self, x):
            return self.pooled(x) * 0

    return to_onnx(Zeros().eval(), torch.zeros(1, 3, size, size), output_name="features", opset=engines.ONNX_OPSET)


def test_a_tampered_int8_graph_is_quantized_again(lite0, small_source, tmp_path, monkeypatch):
    engine_dir = tmp_path / "engines"
    engine_dir.mkdir()
    first = build(lite0, small_source, tmp_path / "c", engine_dir=str(engine_dir))
    (name,) = os.listdir(engine_dir)
    good = (engine_dir / name).read_bytes()
    for planted in (_zeros_graph(lite0, 4), b"not a graph"):
        (engine_dir / name).write_bytes(planted)
        monkeypatch.setattr(engines, "_EXPORTED", {})  # as in a new process
        again = build(lite0, small_source, tmp_path / "c", engine_dir=str(engine_dir), overwrite=True)
        torch.testing.assert_close(again.features, first.features, rtol=0, atol=0)
        assert (engine_dir / name).read_bytes() == good


def test_the_int8_check_refuses_zeros_noise_and_nan(request, lite0):
    images = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(zlib.crc32(request.node.nodeid
                                                                                                .encode())))
    engine = engines.OnnxEngine.__new__(engines.OnnxEngine)
    engine.model, engine.taps, engine.precision = lite0.for_extraction(), 0, "int8"
    want = engines.pooled_reference(engine.model, 0, images)
    assert engine.difference(want, images) is None
    assert engine.difference(want * 1.1, images) is None  # 10% off: within what int8 is allowed
    noise = torch.randn(want.shape, generator=torch.Generator().manual_seed(1)) * want.std()
    for wrong in (torch.zeros_like(want), want + 2 * noise, want.flip(0), torch.full_like(want, float("nan"))):
        assert "relative error" in engine.difference(wrong, images)


def test_norm_error_is_the_float64_formula(request):
    generator = torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))
    want, got = torch.randn(7, 5, generator=generator), torch.randn(7, 5, generator=generator)
    expected = ((got.double() - want.double()) ** 2).sum().sqrt() / (want.double() ** 2).sum().sqrt()
    assert engines.norm_error(got, want) == pytest.approx(float(expected), rel=1e-12)
    assert engines.norm_error(torch.empty(0, 5), torch.empty(0, 5)) == 0.0


def test_int8_is_refused_where_it_cannot_run(lite0):
    with pytest.raises(OptionError, match="int8 runs on the onnxruntime engine only; pass --engine onnxruntime"):
        engines.resolve("torch", "int8", torch.device("cpu"))
    with pytest.raises(OptionError, match="int8 extraction runs on the CPU"):
        engines.resolve("auto", "int8", torch.device("cuda"))
    assert engines.resolve("auto", "int8", torch.device("cpu")) == ("onnxruntime", "int8")
    assert engines.resolve("auto", "auto", torch.device("cpu")) == ("onnxruntime", "fp32")  # never int8 by default
    with pytest.raises(OptionError, match="int8 needs calibration images"):
        engines.create("onnxruntime", "int8", lite0.for_extraction(), 0, torch.device("cpu"), SIZE)


def test_int8_graphs_of_earlier_calibrations_do_not_pile_up(lite0, small_source, tmp_path, monkeypatch):
    """Each change of the data calibrates a new graph: the ones no cache beside them records go."""
    engine_dir = tmp_path / "out"
    build(lite0, small_source, engine_dir / "train", engine_dir=str(engine_dir), taps=0)
    (first,) = [n for n in os.listdir(engine_dir) if n.endswith("-int8.onnx")]
    (engine_dir / "engine-0123456789abcdef.onnx").write_bytes(b"an fp32 graph: kept")
    (engine_dir / "engine-notes-int8.onnx").write_bytes(b"not fasttl's name: kept")
    monkeypatch.setattr(engines, "_EXPORTED", {})
    build(lite0, small_source.subset(range(len(small_source) - 1)), engine_dir / "train", engine_dir=str(engine_dir),
          taps=0, overwrite=True)
    graphs = sorted(n for n in os.listdir(engine_dir) if n.endswith(".onnx"))
    assert first not in graphs and len([n for n in graphs if n.endswith("-int8.onnx")]) == 2  # the new one, the notes
    assert "engine-0123456789abcdef.onnx" in graphs and "engine-notes-int8.onnx" in graphs


def test_extract_calibrates_every_split_on_the_training_images_and_mixed_calibrations_are_refused(
        lite0, three_classes, tmp_path, capsys, monkeypatch):
    """`fasttl extract --extract-precision int8`: the test split goes through the graph the training
    images calibrated (one feature space: a head trains on one and scores the other); a cache of
    another calibration is never mixed with them (concat, eval_cache), naming the calibration."""
    from conftest import cli

    from fasttl.cache.cache import FeatureCache
    from fasttl.cache.store import CacheError
    from fasttl.heads import train_head

    monkeypatch.setattr(engines, "_EXPORTED", {})
    out = tmp_path / "cache"
    code, _, err = cli(capsys, "extract", "--backbone", "efficientnet_lite0", "--data", str(three_classes), "--out",
                       str(out), "--image-size", "48", "--extract-precision", "int8", "--backend", "torch",
                       "--no-progress")
    assert code == 0, err
    train, test = (FeatureCache.open(str(out / split)) for split in ("train", "test"))
    source = D.class_folder_splits(str(three_classes))[0]
    key, _ = calibration_sample(source, D.TransformSpec.for_backbone(lite0.preprocessing, size=48))
    for cache in (train, test):
        assert cache.fingerprint["compute"]["calibration"]["sample"] == key
        assert cache.manifest["engine_graph"] == train.manifest["engine_graph"]
    assert train.made_by() == test.made_by()
    fit = train_head(train, eval_cache=test, epochs=1, seed=0, progress=False)
    assert 0.5 < fit.history[-1]["eval_accuracy"]  # three classes: one feature space scores well above chance
    # the test split calibrated on itself (FeatureCache.build without calibration=): another graph
    alone = build(lite0, D.class_folder_splits(str(three_classes))[1], tmp_path / "alone", image_size=48, taps=0,
                  dtype=train.fingerprint["dtype"])
    assert alone.fingerprint["compute"]["calibration"]["sample"] != key
    with pytest.raises(CacheError, match="int8 calibration sample"):
        FeatureCache.concat([test, alone])
    with pytest.raises(OptionError, match="int8 calibration sample") as caught:
        train_head(train, eval_cache=alone, epochs=1, seed=0, progress=False)
    assert "\n" not in str(caught.value)
