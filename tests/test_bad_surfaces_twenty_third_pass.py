"""The twenty-third hostile pass (on the int8 checks redesigned: the graph on fixed check images,
each image on its input range): the check's answer moved with the batch size (check images tiled
into batches of 5 counted some twice), a failed check on calibration images named the data's first
image as one of them, and check images handed to `engines.adopt` were not checked. Two runs in one
process, export without int8 files and an .npz check file: test_int8_runs.py."""
import zlib

import numpy as np
import pytest
import torch

import fasttl
import fasttl.data as D
from fasttl.cache import engines
from fasttl.cache.extraction import calibration_sample
from fasttl.cache.store import CacheError
from fasttl.util.errors import OptionError

from test_int8_engine import _zeros_graph

pytestmark = pytest.mark.skipif(not engines.onnxruntime_available(),
                                reason="onnxruntime is not installed (pip install onnx onnxruntime)")
SIZE = 32


def _int8(backbone, source):
    spec = D.TransformSpec.for_backbone(backbone.preprocessing, size=SIZE)
    return engines.create("onnxruntime", "int8", backbone.for_extraction(), 0, torch.device("cpu"), SIZE,
                          calibration_images=calibration_sample(source, spec)[1])


def test_a_graph_just_within_tolerance_passes_at_every_batch_size(lite0, small_source, fresh_engines, monkeypatch):
    """The tolerance set just above the graph's error on its check images at the size it was
    verified at: every other size gets the same answer (each check image counted once; ONNX
    Runtime's kernels differ by batch size in the last bits only)."""
    engine = _int8(lite0, small_source)
    check = engine.check_images
    error = engines.norm_error(engine._run(check), engines.pooled_reference(engine.model, 0, check))
    monkeypatch.setattr(engines, "INT8_TOLERANCE", error * 1.002)
    shown = torch.rand(12, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(zlib.crc32(b"sizes"))) * 2 - 1
    for size in range(1, 13):
        assert engine(shown[:size])[0].shape == (size, lite0.tapped_dim(0))
    monkeypatch.setattr(engines, "INT8_TOLERANCE", error * 0.998)  # just below it, every new size is refused
    for size in (13, 15, 24):
        with pytest.raises(CacheError, match=f"at batch size {size}"):
            engine(torch.cat([shown, shown, shown])[:size])


def test_a_check_on_calibration_images_names_no_image_of_the_data_and_counts_them(lite0, small_source, tmp_path,
                                                                                 fresh_engines, monkeypatch):
    spec = D.TransformSpec.for_backbone(lite0.preprocessing, size=SIZE)
    key, images = calibration_sample(small_source, spec)
    monkeypatch.setattr(engines, "INT8_TOLERANCE", 0.0)  # every check fails
    with pytest.raises(CacheError) as refused:
        fasttl.FeatureCache.build(lite0, small_source, str(tmp_path / "c"), image_size=SIZE, taps=0, precision="int8",
                                  progress=False, backend="torch", calibration=(key, images[:1]))
    message = str(refused.value)
    assert "off PyTorch fp32 on the first 1 images of its calibration sample (relative error" in message
    assert small_source.name_of(0) not in message and "--extract-precision fp32" in message


BAD_CHECK_IMAGES = {
    "no rows": (lambda images: images[:0], "got a tensor [0, 3, 32, 32] of torch.float32 on cpu"),
    "another size": (lambda images: images[:, :, :-1], "got a tensor [8, 3, 31, 32]"),
    "flat": (lambda images: images.reshape(len(images), -1), "got a tensor [8, 3072]"),
    "a numpy array": (lambda images: images.numpy(), "got ndarray"),
    "a list": (lambda images: images.tolist(), "got list"),
    "integers": (lambda images: images.to(torch.int64), "of torch.int64"),
    "on the meta device": (lambda images: images.to("meta"), "on meta"),
    "NaN": (lambda images: images.masked_fill(images > 0, float("nan")), "got a tensor [8, 3, 32, 32] of torch.float"),
    "beyond float16": (lambda images: images * 1e5, "finite in float16; got a tensor"),  # the twenty-fourth pass
}


@pytest.mark.parametrize("case", list(BAD_CHECK_IMAGES))
def test_odd_check_images_given_to_adopt_are_named(lite0, small_source, fresh_engines, case):
    """Not the graph: 0 rows divided by zero at the first batch, a wrong shape said the graph
    "does not load"."""
    good = _int8(lite0, small_source)
    name = engines.onnx_file_name(lite0, 0, SIZE, "ab" * 32)
    make, culprit = BAD_CHECK_IMAGES[case]
    engines.adopt(name, _zeros_graph(lite0, 0, SIZE), shown="run/extract-int8.onnx", fix="train it with fp32",
                  check_images=make(good.check_images.clone()), check_shown="run/extract-int8-check.npy")
    with pytest.raises(OptionError, match=rf"^check_images: an int8 graph is checked on a tensor \(N, 3, {SIZE}, "
                                          rf"{SIZE}\) of one image or more, on the CPU, finite in float16; got ") \
            as refused:
        engines.create("onnxruntime", "int8", lite0.for_extraction(), 0, torch.device("cpu"), SIZE, name)
    assert culprit in str(refused.value)


def test_a_runs_check_images_are_the_float16_values_it_keeps(lite0, small_source, fresh_engines):
    """Checked when made on the values a run keeps (float16), so the loaded run's check sees the same."""
    engine = _int8(lite0, small_source)
    assert engine.check_images.dtype == torch.float32
    assert np.array_equal(engine.check_images.numpy(), engine.check_images.half().float().numpy())
