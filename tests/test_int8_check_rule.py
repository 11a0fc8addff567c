"""The int8 graph's checks, two kinds that never mix (fasttl/cache/int8_checks.py): the graph on
its fixed check images (the first of its calibration sample, a run's kept beside its graph), when
it is made or loaded and at every new batch size; each image against its calibrated input range.
No image is compared with fp32 alone or with its neighbours, so whether a photo is accepted and
what its features are never depend on the batch it falls in."""
import zlib

import pytest
import torch

import fasttl
import fasttl.data as D
from fasttl.cache import engines
from fasttl.cache.extraction import calibration_sample
from fasttl.cache.store import CacheError

from test_int8_engine import _zeros_graph

pytestmark = pytest.mark.skipif(not engines.onnxruntime_available(),
                                reason="onnxruntime is not installed (pip install onnx onnxruntime)")
SIZE = 32


def _photos(backbone, source):
    spec = D.TransformSpec.for_backbone(backbone.preprocessing, size=SIZE)
    return torch.cat([x for x, _ in D.ImageLoader(source, spec, len(source), backend="torch")])


def _int8(backbone, source, **kw):
    spec = D.TransformSpec.for_backbone(backbone.preprocessing, size=SIZE)
    return engines.create("onnxruntime", "int8", backbone.for_extraction(), 0, torch.device("cpu"), SIZE,
                          calibration_images=calibration_sample(source, spec)[1], **kw)


def test_a_run_graph_answering_zeros_is_refused_on_its_check_images_before_any_image(lite0, small_source,
                                                                                    fresh_engines):
    name = engines.onnx_file_name(lite0, 0, SIZE, "ab" * 32)
    engines.adopt(name, _zeros_graph(lite0, 0, SIZE), shown="run/extract-int8.onnx", fix="train it with fp32",
                  check_images=_photos(lite0, small_source)[:engines.INT8_CHECK_ROWS],
                  check_shown="run/extract-int8-check.npy")
    with pytest.raises(CacheError, match=r"^engine: the int8 graph run/extract-int8.onnx is off PyTorch fp32 on the "
                                         r"run's check images run/extract-int8-check.npy \(relative error 1 > 0.35\): "
                                         r"the graph or its check images are not what the run made .*train the run "
                                         r"again \(with --extract-precision fp32 if int8 is refused there too\)$"):
        engines.create("onnxruntime", "int8", lite0.for_extraction(), 0, torch.device("cpu"), SIZE, name)


@pytest.mark.parametrize("size", [1, 3, 8, 32])
def test_a_graph_right_only_at_its_verified_size_is_refused_at_the_next(lite0, small_source, fresh_engines, size):
    """Checked on its check images tiled into batches of the new size (every one of them in some
    batch), not on the images it is shown: noise shown to it is not what the message is about."""
    engine = _int8(lite0, small_source)
    assert engine.checked_sizes == {engines.INT8_CHECK_ROWS}
    run, seen = engine._run, []

    def wrong_at_other_sizes(images, limit=None):
        seen.append(len(images))
        features = run(images, limit)
        return features if len(images) == engines.INT8_CHECK_ROWS else torch.zeros_like(features)

    engine._run = wrong_at_other_sizes
    shown = torch.rand(size, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(zlib.crc32(b"shown"))) * 2 - 1
    if size == engines.INT8_CHECK_ROWS:
        assert engine(shown)[0].shape == (size, lite0.tapped_dim(0)) and seen == [size]
        return
    with pytest.raises(CacheError, match=rf"on the first {engines.INT8_CHECK_ROWS} images of its calibration sample "
                                         rf"\(relative error 1 > 0.35, at batch size {size}\)"):
        engine(shown)
    assert set(seen) == {size} and sum(seen) >= engines.INT8_CHECK_ROWS


def test_a_photos_features_do_not_depend_on_its_batch(lite0, small_source, fresh_engines):
    """The same photos one at a time, in threes and all together: accepted alike, the same features
    (ONNX Runtime's kernels may differ by batch size in the last bits only)."""
    engine = _int8(lite0, small_source)
    photos = _photos(lite0, small_source)
    together = engine(photos)[0]
    for batch in (1, 3):
        apart = torch.cat([engine(photos[i:i + batch])[0] for i in range(0, len(photos), batch)])
        torch.testing.assert_close(apart, together, rtol=1e-4, atol=1e-4)
    assert engine.checked_sizes == {engines.INT8_CHECK_ROWS, len(photos), 1, 3}


def test_a_small_split_is_checked_on_the_training_calibration_sample(lite0, small_source, tmp_path, fresh_engines,
                                                                    monkeypatch):
    """A test split of 3 photos calibrated on the training split's sample: its graph is checked
    on that sample's first images, never on the 3 photos alone (0.51 there at 32 px, head
    features: the twenty-second pass)."""
    made = []
    create = engines.create
    monkeypatch.setattr(engines, "create", lambda *a, **kw: made.append(create(*a, **kw)) or made[-1])
    spec = D.TransformSpec.for_backbone(lite0.preprocessing, size=SIZE)
    sample = calibration_sample(small_source, spec)
    fasttl.FeatureCache.build(lite0, small_source.subset(range(3)), str(tmp_path / "test"), image_size=SIZE, taps=0,
                              precision="int8", progress=False, backend="torch", calibration=sample)
    (engine,) = made
    assert engine.check_origin == f"the first {engines.INT8_CHECK_ROWS} images of its calibration sample"
    torch.testing.assert_close(engine.check_images, sample[1][:engines.INT8_CHECK_ROWS], rtol=0, atol=0)


def test_a_kept_graph_looked_up_is_checked_on_the_datas_first_images_and_names_the_first(lite0, small_source,
                                                                                         tmp_path, fresh_engines):
    """Its calibration images not at hand (calibration=(key, None)), a graph answering zeros found
    in the engine folder is refused on the data's first images, the first named."""
    spec = D.TransformSpec.for_backbone(lite0.preprocessing, size=SIZE)
    key, images = calibration_sample(small_source, spec)
    build = dict(image_size=SIZE, taps=0, precision="int8", progress=False, backend="torch",
                 engine_dir=str(tmp_path))
    fasttl.FeatureCache.build(lite0, small_source, str(tmp_path / "train"), calibration=(key, images), **build)
    (tmp_path / engines.onnx_file_name(lite0, 0, SIZE, key)).write_bytes(_zeros_graph(lite0, 0, SIZE))
    engines._EXPORTED.clear()
    with pytest.raises(CacheError, match=rf"is off PyTorch fp32 on the first {engines.INT8_CHECK_ROWS} images of the "
                                         rf"data \(the first: {small_source.name_of(0)}\) \(relative error 1 > 0.35\): "
                                         r"images unlike those it was calibrated on \(or a graph changed"):
        fasttl.FeatureCache.build(lite0, small_source, str(tmp_path / "again"), calibration=(key, None), **build)
