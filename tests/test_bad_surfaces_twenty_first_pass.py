"""The twenty-first hostile pass (on the twentieth's fixes): the input-range check counts only
values well beyond the calibrated range (a sample without pure black or white pixels is no reason
to refuse full-range photos int8 follows closely), an int8 build's verification batch is the
INT8_CHECK_ROWS images its tolerance holds over, and the small-batch refusal names the first image
of the group it compared."""
import pytest
import torch

import fasttl.data as D
from fasttl.cache import engines

pytestmark = pytest.mark.skipif(not engines.onnxruntime_available(),
                                reason="onnxruntime is not installed (pip install onnx onnxruntime)")


def _preprocessed(backbone, source, size=32):
    spec = D.TransformSpec.for_backbone(backbone.preprocessing, size=size)
    return torch.cat([x for x, _ in D.ImageLoader(source, spec, len(source), backend="torch")])


@pytest.mark.parametrize("levels", [(10, 245)])  # at 30..225 the photo most beyond is off by 0.81 here: refused
def test_full_range_photos_are_not_refused_by_a_sample_without_black_or_white(lite0, small_source, monkeypatch,
                                                                             levels):
    """Calibrated on the same photos at video levels (10 to 245): the range shrinks by 4% a side;
    the photos themselves, a little beyond it, are followed within tolerance and accepted."""
    monkeypatch.setattr(engines, "_EXPORTED", {})
    photos = _preprocessed(lite0, small_source)
    mean, std = lite0.preprocessing.mean[0], lite0.preprocessing.std[0]
    pixels = photos * std + mean  # back to [0, 1]
    bottom, top = levels
    video = ((pixels * (top - bottom) + bottom) / 255 - mean) / std
    engine = engines.create("onnxruntime", "int8", lite0.for_extraction(), 0, torch.device("cpu"), 32,
                            calibration_images=video)
    low, high = engine.input_range
    step = (high - low) / 255
    beyond = ((photos < low - step) | (photos > high + step)).flatten(1).float().mean(1)
    photo = photos[int(beyond.argmax())][None]  # the photo most beyond the range (by a little)
    assert float(beyond.max()) > engines.INT8_OUTSIDE_SHARE  # refused when any value beyond counted
    features = engine(photo)[0]  # one photo: only the range check applies
    want = engines.pooled_reference(lite0.for_extraction(), 0, photo)
    assert engines.norm_error(features, want) < engines.INT8_TOLERANCE
    dark = ((pixels * 0.05) - mean) / std  # calibrated on under-exposed scans, a photo is far beyond: refused
    engine = engines.create("onnxruntime", "int8", lite0.for_extraction(), 0, torch.device("cpu"), 32,
                            calibration_images=dark)
    with pytest.raises(engines.BatchError, match="can't represent an image"):
        engine(photos[:1])


def test_an_int8_builds_verification_batch_is_the_rows_its_tolerance_holds_over(lite0, small_source, tmp_path,
                                                                               monkeypatch):
    import fasttl

    seen = []
    create = engines.create

    def recording(*args, **kw):
        seen.append(len(args[8]) if len(args) > 8 and args[8] is not None else None)
        return create(*args, **kw)

    monkeypatch.setattr(engines, "create", recording)
    monkeypatch.setattr(engines, "_EXPORTED", {})
    fasttl.FeatureCache.build(lite0, small_source, str(tmp_path / "c"), image_size=32, precision="int8",
                              progress=False, backend="torch")
    assert seen == [engines.INT8_CHECK_ROWS]


def test_the_small_batch_refusal_names_the_first_image_it_compared(lite0, small_source, monkeypatch):
    from test_int8_engine import _zeros_graph

    from fasttl.cache.extraction import extract_features
    from fasttl.cache.store import CacheError

    monkeypatch.setattr(engines, "_EXPORTED", {})
    name = engines.onnx_file_name(lite0, 0, 32, "cd" * 32)
    engines.adopt(name, _zeros_graph(lite0, 0, 32), shown="run/extract-int8.onnx", fix="train it with fp32")
    engine = engines.create("onnxruntime", "int8", lite0.for_extraction(), 0, torch.device("cpu"), 32, name)
    spec = D.TransformSpec.for_backbone(lite0.preprocessing, size=32)
    with pytest.raises(CacheError, match=rf"on the first {engines.INT8_CHECK_ROWS} images it extracted \(the first "
                                         rf"{small_source.name_of(0)}\)"):
        extract_features(engine, small_source, spec, torch.float32, lite0.tapped_dim(0), 1, torch.device("cpu"),
                         backend="torch")


def test_a_group_begun_in_an_earlier_call_names_its_last_image(lite0, small_source, monkeypatch):
    """The twenty-second pass: a loaded model keeps its engine between predict calls, so the first 8
    images compared may span calls: the image named is the last of them, said as such."""
    from test_int8_engine import _zeros_graph

    from fasttl.cache.extraction import extract_features
    from fasttl.cache.store import CacheError

    monkeypatch.setattr(engines, "_EXPORTED", {})
    name = engines.onnx_file_name(lite0, 0, 32, "ef" * 32)
    engines.adopt(name, _zeros_graph(lite0, 0, 32), shown="run/extract-int8.onnx", fix="train it with fp32")
    engine = engines.create("onnxruntime", "int8", lite0.for_extraction(), 0, torch.device("cpu"), 32, name)
    spec = D.TransformSpec.for_backbone(lite0.preprocessing, size=32)
    first, second = small_source.subset(range(4)), small_source.subset(range(4, 8))
    run = dict(spec=spec, dtype=torch.float32, feature_dim=lite0.tapped_dim(0), batch_size=1,
               device=torch.device("cpu"), backend="torch")
    extract_features(engine, first, **run)
    with pytest.raises(CacheError, match=rf"on the first {engines.INT8_CHECK_ROWS} images it extracted \(the last: "
                                         rf"{second.name_of(3)}\)"):
        extract_features(engine, second, **run)


def test_a_split_of_fewer_than_8_images_is_not_verified_alone(lite0, small_source, tmp_path, monkeypatch):
    """The twenty-second pass: a test split of 3 photos was checked alone (0.51 at 32 px, head
    features) where int8's tolerance holds over 8: fewer images go through as small batches do."""
    import fasttl

    seen = []
    create = engines.create

    def recording(*args, **kw):
        seen.append(args[8] if len(args) > 8 else None)
        return create(*args, **kw)

    monkeypatch.setattr(engines, "create", recording)
    monkeypatch.setattr(engines, "_EXPORTED", {})
    fasttl.FeatureCache.build(lite0, small_source.subset(range(3)), str(tmp_path / "c"), image_size=32,
                              precision="int8", progress=False, backend="torch")
    assert seen == [None]
