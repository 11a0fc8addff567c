"""Extraction engines (PyTorch, ONNX Runtime; fp32, bf16) and multi-stage features: each engine's
features equal PyTorch fp32 within its tolerance, the multi-stage layout is what the manifest
says, and an exported graph left in a cache folder is verified before it is trusted."""
import json
import os

import pytest
import torch

import fasttl
import fasttl.backbones as B
import fasttl.data as D
from fasttl.backbones.base import pooled_taps
from fasttl.cache import engines
from fasttl.cache.store import CacheError
from fasttl.util.errors import OptionError

SIZE = 64
ORT_REASON = "onnxruntime is not installed (pip install onnx onnxruntime)"
needs_ort = pytest.mark.skipif(not engines.onnxruntime_available(), reason=ORT_REASON)


def build(lite0, small_source, out, **kw):
    kw.setdefault("image_size", SIZE)
    kw.setdefault("backend", "torch")
    kw.setdefault("dtype", "fp32")
    kw.setdefault("batch_size", 4)
    return fasttl.FeatureCache.build(lite0, small_source, str(out), progress=False, **kw)


def reference_features(lite0, small_source, taps):
    """float64 pooled maps of the plain (unfolded, NCHW) backbone, concatenated as the layout says."""
    images = torch.cat([x for x, _ in D.make_loader(small_source, lite0.preprocessing, 6, image_size=SIZE,
                                                      backend="torch")])
    model = B.create("efficientnet_lite0").eval().double()
    with torch.no_grad():
        return pooled_taps(model, images.double(), taps)


@pytest.mark.parametrize("taps", [0, 1, 3])
@pytest.mark.parametrize("engine", ["torch", pytest.param("onnxruntime", marks=needs_ort)])
def test_engine_features_equal_the_float64_reference(lite0, small_source, tmp_path, engine, taps):
    cache = build(lite0, small_source, tmp_path / "c", engine=engine, precision="fp32", taps=taps)
    expected = reference_features(lite0, small_source, taps)
    assert cache.feature_dim == lite0.tapped_dim(taps) == expected.shape[1]
    error = (cache.features.double() - expected).abs().max() / expected.abs().max()
    assert error < engines.FP32_TOLERANCE, (engine, taps, float(error))
    fingerprint = json.loads((tmp_path / "c" / "manifest.json").read_text())["fingerprint"]
    assert fingerprint["compute"]["engine"] == engine and fingerprint["compute"]["precision"] == "fp32"
    assert fingerprint["layout"] == {"taps": taps, "channels": lite0.tap_channels()[-(taps + 1):]}
    assert fingerprint["feature_dim"] == sum(fingerprint["layout"]["channels"])


def test_multi_stage_columns_are_each_stage_pooled_in_order(lite0, small_source, tmp_path):
    """Column blocks of a taps=3 cache: stage 5, 6, 7 outputs pooled, then the head's 1280, which
    equal a head-only cache of the same images."""
    multi = build(lite0, small_source, tmp_path / "multi", engine="torch", taps=3)
    head = build(lite0, small_source, tmp_path / "head", engine="torch", taps=0)
    channels = lite0.tap_channels()[-4:]
    assert channels == [112, 192, 320, 1280]
    torch.testing.assert_close(multi.features[:, -1280:], head.features, atol=1e-5, rtol=1e-5)
    images = torch.cat([x for x, _ in D.make_loader(small_source, lite0.preprocessing, 6, image_size=SIZE,
                                                      backend="torch")])
    model = B.create("efficientnet_lite0").eval()
    with torch.no_grad():
        maps = model.forward_taps(images, 3)
    start = 0
    for feature_map, width in zip(maps, channels):
        assert feature_map.shape[1] == width
        torch.testing.assert_close(multi.features[:, start:start + width], feature_map.mean((2, 3)), atol=1e-4,
                                   rtol=1e-4)
        start += width


def test_int8_multi_stage_rows_share_one_scale(lite0, small_source, tmp_path):
    fp32 = build(lite0, small_source, tmp_path / "fp32", engine="torch", taps=2)
    int8 = build(lite0, small_source, tmp_path / "int8", engine="torch", taps=2, dtype="int8")
    assert int8.scales.shape == (len(small_source),)
    restored = int8.all_features()
    # Symmetric per-row int8: each element within half a quantization step of the row's scale.
    assert ((restored - fp32.features).abs() <= 0.5 * int8.scales[:, None] + 1e-6).all()


def test_bf16_autocast_features_are_close_to_fp32(lite0, small_source, tmp_path):
    fp32 = build(lite0, small_source, tmp_path / "fp32", engine="torch", precision="fp32", taps=3)
    bf16 = build(lite0, small_source, tmp_path / "bf16", engine="torch", precision="bf16", taps=3)
    relative = (bf16.features - fp32.features).norm() / fp32.features.norm()
    assert 0 < relative < 0.06, float(relative)  # bf16 keeps 8 bits of mantissa: about 3% off, never equal
    fingerprint = json.loads((tmp_path / "bf16" / "manifest.json").read_text())["fingerprint"]
    assert fingerprint["compute"]["precision"] == "bf16"


def test_engine_and_precision_resolve_by_device(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert engines.resolve("auto", "auto", cuda) == ("torch", "bf16")
    assert engines.resolve("torch", "auto", cpu) == ("torch", "fp32")
    assert engines.resolve("auto", "bf16", cpu) == ("torch", "bf16")
    monkeypatch.setattr(engines, "onnxruntime_available", lambda: True)
    assert engines.resolve("auto", "auto", cpu) == ("onnxruntime", "fp32")
    monkeypatch.setattr(engines, "onnxruntime_available", lambda: False)
    assert engines.resolve("auto", "auto", cpu) == ("torch", "fp32")
    with pytest.raises(OptionError, match="pip install onnx onnxruntime"):
        engines.resolve("onnxruntime", "fp32", cpu)
    monkeypatch.setattr(engines, "onnxruntime_available", lambda: True)
    with pytest.raises(OptionError, match="CPU only.*--engine torch"):
        engines.resolve("onnxruntime", "auto", cuda)
    with pytest.raises(OptionError, match="runs fp32"):
        engines.resolve("onnxruntime", "bf16", cpu)
    with pytest.raises(OptionError, match="engine: unknown 'tensorrt'"):
        engines.resolve("tensorrt", "fp32", cpu)


def test_native_bf16_and_int8_dot_are_read_from_the_cpu_flags():
    with open("/proc/cpuinfo") as f:
        flags = next(line for line in f if line.startswith("flags")).split()
    engines.cpu_flags.cache_clear()
    assert engines.cpu_has_native_bf16() == ("avx512_bf16" in flags or "amx_bf16" in flags)
    assert engines.cpu_has_int8_dot() == bool({"avx512_vnni", "avx_vnni", "amx_int8"} & set(flags))


def test_engine_and_layout_are_part_of_the_fingerprint(lite0, small_source, tmp_path):
    build(lite0, small_source, tmp_path / "c", engine="torch", taps=0)
    with pytest.raises(CacheError, match="layout.*taps"):
        build(lite0, small_source, tmp_path / "c", engine="torch", taps=1)
    with pytest.raises(CacheError, match="compute"):
        build(lite0, small_source, tmp_path / "c", engine="torch", precision="bf16", taps=0)


@needs_ort
def test_a_tampered_engine_file_is_exported_again(lite0, small_source, tmp_path, monkeypatch):
    """The .onnx kept in engine_dir is checked against PyTorch before use: a graph that computes
    something else (here: another lite0's, under the right name) or is no graph at all is
    exported again and replaced."""
    engine_dir = tmp_path / "engines"
    engine_dir.mkdir()
    first = build(lite0, small_source, tmp_path / "c", engine="onnxruntime", engine_dir=str(engine_dir))
    (name,) = os.listdir(engine_dir)
    assert name == engines.onnx_file_name(lite0, 0, SIZE)
    assert not [n for n in os.listdir(tmp_path / "c") if n.endswith(".onnx")]  # the cache folder holds the cache only
    wrong = engines.export_onnx(B.create("efficientnet_lite0", pretrained=False).for_extraction(), 0, SIZE)
    for planted in (wrong, b"not an onnx graph"):
        (engine_dir / name).write_bytes(planted)
        monkeypatch.setattr(engines, "_EXPORTED", {})  # as in a new process
        again = build(lite0, small_source, tmp_path / "c", engine="onnxruntime", engine_dir=str(engine_dir),
                      overwrite=True)
        torch.testing.assert_close(again.features, first.features)
        assert (engine_dir / name).read_bytes() != planted


class _RightOnNoiseOnly(torch.nn.Module):
    """A doctored graph: the real pooled features when the batch looks like noise (values beyond
    3.5, as the old seeded randn check batch has), zeros on photographs (within about 2.6)."""

    def __init__(self, pooled):
        super().__init__()
        self.pooled = pooled

    def forward(self, x):
        real = self.pooled(x)
        return torch.where(x.abs().amax() > 3.5, real, torch.zeros_like(real))


@needs_ort
def test_a_graph_right_on_noise_and_wrong_on_photographs_is_caught_on_real_images(lite0, small_source, tmp_path,
                                                                                   monkeypatch):
    from fasttl.backbones.base import PooledFeatures
    from fasttl.onnx_graph import to_onnx

    engine_dir = tmp_path / "engines"
    engine_dir.mkdir()
    first = build(lite0, small_source, tmp_path / "c", engine="onnxruntime", engine_dir=str(engine_dir))
    (name,) = os.listdir(engine_dir)
    good = (engine_dir / name).read_bytes()
    doctored = to_onnx(_RightOnNoiseOnly(PooledFeatures(lite0.for_extraction(), 0)).eval(),
                       torch.zeros(1, 3, SIZE, SIZE), output_name="features", opset=engines.ONNX_OPSET)
    # The doctor's premise: the old check (a seeded randn batch) passes it.
    noise = torch.randn(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    session = engines._session(doctored)
    got = torch.from_numpy(session.run(None, {"images": noise.numpy()})[0])
    assert engines.relative_error(got, engines.pooled_reference(lite0.for_extraction(), 0, noise)) < 1e-3
    (engine_dir / name).write_bytes(doctored)
    monkeypatch.setattr(engines, "_EXPORTED", {})  # as in a new process
    again = build(lite0, small_source, tmp_path / "c", engine="onnxruntime", engine_dir=str(engine_dir),
                  overwrite=True)
    torch.testing.assert_close(again.features, first.features)  # not zeros
    assert (engine_dir / name).read_bytes() == good
    graph = json.loads((tmp_path / "c" / "manifest.json").read_text())["engine_graph"]
    import hashlib

    assert graph == {"file": name, "bytes": len(good), "sha256": hashlib.sha256(good).hexdigest()}


@needs_ort
def test_an_engine_file_through_a_link_is_never_read_or_written(lite0, small_source, tmp_path, monkeypatch):
    engine_dir = tmp_path / "engines"
    engine_dir.mkdir()
    target = tmp_path / "elsewhere.onnx"
    target.write_bytes(b"user file")
    os.symlink(target, engine_dir / engines.onnx_file_name(lite0, 0, SIZE))
    monkeypatch.setattr(engines, "_EXPORTED", {})
    cache = build(lite0, small_source, tmp_path / "c", engine="onnxruntime", engine_dir=str(engine_dir))
    assert target.read_bytes() == b"user file" and len(cache) == len(small_source)


def test_a_backbone_without_stages_refuses_multi_stage_features(small_source, tmp_path):
    custom = B.CustomBackbone(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU()), 8,
                              B.create("efficientnet_lite0").preprocessing)
    with pytest.raises(OptionError, match="features: custom has 0 intermediate stages to pool, asked for 3"):
        build(custom, small_source, tmp_path / "c", taps=3)
    assert not (tmp_path / "c").exists()


def _right_only_at_batch_of(graph: bytes, size: int) -> bytes:
    """The graph doctored to give its features for batches of `size` images and the rows reversed
    for any other batch (as the ninth hostile pass made one: the verification batch passes it)."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load_from_string(graph)
    g = model.graph
    out, inp = g.output[0].name, g.input[0].name
    for node in g.node:
        node.output[:] = ["orig" if o == out else o for o in node.output]
    for key, value in {"i0": [0], "size": [size], "st": [-1], "en": [np.iinfo(np.int64).min], "ax": [0],
                       "sp": [-1]}.items():
        g.initializer.append(numpy_helper.from_array(np.array(value, np.int64), key))
    g.node.extend([helper.make_node("Shape", [inp], ["sh"]), helper.make_node("Gather", ["sh", "i0"], ["n"], axis=0),
                   helper.make_node("Equal", ["n", "size"], ["same"]),
                   helper.make_node("Slice", ["orig", "st", "en", "ax", "sp"], ["flipped"]),
                   helper.make_node("Where", ["same", "orig", "flipped"], [out])])
    return model.SerializeToString()


@needs_ort
def test_a_graph_right_only_at_the_verification_batch_size_stores_nothing(lite0, small_source, tmp_path,
                                                                          monkeypatch):
    """Every batch size the extraction uses is checked against PyTorch on its first batch, before
    its rows are stored: a graph doctored for the verification batch's size alone is caught, its
    file removed, and the next build exports a sound one."""
    from fasttl.cache.extraction import VERIFY_IMAGES

    engine_dir = tmp_path / "engines"
    engine_dir.mkdir()
    first = build(lite0, small_source, tmp_path / "c", engine="onnxruntime", engine_dir=str(engine_dir))
    (name,) = os.listdir(engine_dir)
    (engine_dir / name).write_bytes(_right_only_at_batch_of((engine_dir / name).read_bytes(), VERIFY_IMAGES))
    monkeypatch.setattr(engines, "_EXPORTED", {})  # as in a new process
    with pytest.raises(CacheError, match=r"^engine: onnxruntime's features differ from PyTorch's on a batch of 3 "
                                         r"images .*its graph was removed, nothing of this batch was stored"):
        build(lite0, small_source, tmp_path / "c", engine="onnxruntime", engine_dir=str(engine_dir), overwrite=True,
              batch_size=3)
    assert not (engine_dir / name).exists()
    again = build(lite0, small_source, tmp_path / "c", engine="onnxruntime", engine_dir=str(engine_dir),
                  overwrite=True)
    torch.testing.assert_close(again.features, first.features)
