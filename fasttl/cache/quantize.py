"""The int8 extraction graph: ONNX Runtime's static quantization of the fp32 graph (QDQ format,
int8 weights per output channel (uint8 on CPUs without int8 dot products: unsigned_weights), uint8
activations with ranges from a calibration sample: the cache's own images, or a run's training
images for all of its splits). On images held out of CIFAR-10's training split the linear probe's
accuracy moved -0.05 +- 0.13 points against fp32 over eight draws (benchmarks/RESULTS.md, "int8
extraction"): a linear/mlp run's `auto` picks it on CPUs with int8 dot products
(fasttl.transfer.config)."""
from __future__ import annotations

import contextlib
import logging
import os
import tempfile

import torch

# The calibration sample: this many images of the source, drawn with this seed (a fixed draw,
# so the graph, and the fingerprint that names the sample, are the same on every build of the
# same images). MinMax, Percentile and Entropy calibration on 64 images scored alike on
# validation; MinMax takes 1.5 to 5 s at 32 to 224 px.
CALIBRATION_IMAGES = 64
CALIBRATION_SEED = 0
CALIBRATION_BATCH = 16


def settings() -> dict:
    """What the int8 graph depends on beside the fp32 graph and the images: part of the fingerprint."""
    import onnxruntime

    weights = "uint8 per channel" if unsigned_weights() else "int8 per channel"
    return {"images": CALIBRATION_IMAGES, "seed": CALIBRATION_SEED, "method": "minmax", "format": "qdq",
            "weights": weights, "activations": "uint8", "onnxruntime": onnxruntime.__version__}


def unsigned_weights() -> bool:
    """uint8 weights (ONNX Runtime's U8U8 kernels) on a CPU without int8 dot products: there its
    uint8 x int8 kernels (AVX2's VPMADDUBSW) saturate the sum of two 8-bit products, and the int8
    graph was off fp32 by 0.53 (the check allows 0.35) on dark photos on a 2-core EPYC without VNNI:
    every such extraction refused. 7-bit weights (reduce_range), which the quantization docs also
    suggest, were still 0.39 off; U8U8, which can't saturate, passed."""
    from fasttl.cache.cpu_features import cpu_has_int8_dot

    return not cpu_has_int8_dot()


def calibration_rows(count: int) -> list:
    """The rows of a source of `count` images that calibrate its int8 graph, in order."""
    generator = torch.Generator().manual_seed(CALIBRATION_SEED)
    return sorted(torch.randperm(count, generator=generator)[:CALIBRATION_IMAGES].tolist())


def quantize(fp32_graph: bytes, images: torch.Tensor) -> bytes:
    """The int8 graph of `fp32_graph` (images -> pooled features), its activation ranges measured
    on `images` (N, 3, S, S), preprocessed as extraction preprocesses them."""
    import onnx
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    if len(images) == 0:
        raise ValueError("quantize: no calibration images")
    array = images.detach().to("cpu", torch.float32).contiguous().numpy()

    class Batches(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"images": array[i:i + CALIBRATION_BATCH]}
                                 for i in range(0, len(array), CALIBRATION_BATCH)])

        def get_next(self):
            return next(self.batches, None)

    with tempfile.TemporaryDirectory(prefix="fasttl-int8-") as scratch, _quiet():  # the quantizer writes files only
        out = os.path.join(scratch, "int8.onnx")
        quantize_static(onnx.load_from_string(fp32_graph), out, Batches(), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QUInt8 if unsigned_weights() else QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)
        with open(out, "rb") as f:
            return f.read()


def input_range(graph: bytes):
    """(low, high): the values of the graph's input its first QuantizeLinear represents (the
    calibration sample's range of preprocessed pixels, widened to hold 0, as the quantizer does),
    or None when the graph quantizes its input otherwise."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = onnx.load_from_string(graph)
    constants = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear" and node.input and node.input[0] == "images" and len(node.input) >= 3:
            scale, zero = constants.get(node.input[1]), constants.get(node.input[2])
            if scale is None or zero is None or scale.size != 1 or zero.dtype != np.uint8:
                return None
            scale, zero = float(scale.reshape(-1)[0]), int(zero.reshape(-1)[0])
            return (0 - zero) * scale, (255 - zero) * scale
    return None


@contextlib.contextmanager
def _quiet():
    """The quantizer's advice on the root logger ("consider pre-processing"), not the user's to act
    on, held back while it runs."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)
