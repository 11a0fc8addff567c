"""One ONNX exporter for every graph fasttl writes (`fasttl export`'s images -> logits, the
extraction engine's images -> pooled features): the same settings, so both behave alike on every
supported torch."""
from __future__ import annotations

import inspect
import io
import warnings

import torch


def to_onnx(module: torch.nn.Module, example: torch.Tensor, *, output_name: str, opset: int) -> bytes:
    """ONNX bytes of `module` with input `images` and output `output_name`, both with a dynamic
    batch dimension. The TorchScript-based exporter: under a second for EfficientNet-Lite0 where
    the torch.export-based one (torch's default since 2.9) takes about 18 s and needs onnxscript;
    it exists on every torch fasttl supports (2.4 and newer)."""
    kwargs = dict(input_names=["images"], output_names=[output_name], opset_version=opset, do_constant_folding=True,
                  dynamic_axes={"images": {0: "batch"}, output_name: {0: "batch"}})
    if "dynamo" in inspect.signature(torch.onnx.export).parameters:
        kwargs["dynamo"] = False  # torch >= 2.5 names the choice; 2.4 has only the TorchScript exporter
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(module, (example,), buffer, **kwargs)
    return buffer.getvalue()
