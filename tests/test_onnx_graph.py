"""The ONNX exporter's pad folding (fasttl.onnx_graph.fold_pads): a zero Pad feeding only a Conv
becomes the Conv's own pads, with the same outputs as PyTorch; every other Pad is left as it is."""
import zlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fasttl.cache import engines
from fasttl.onnx_graph import to_onnx

onnx = pytest.importorskip("onnx", reason="onnx is not installed (pip install onnx onnxruntime)")
onnxruntime = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install onnxruntime)")


def seeded(request) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


class PadThenConv(nn.Module):
    """F.pad (asymmetric, or with a value, mode or axes of the case) then a strided conv."""

    def __init__(self, pads, conv_padding=0, value=0.0, mode="constant", second_user=False, groups=1):
        super().__init__()
        self.pads, self.value, self.mode, self.second_user = pads, value, mode, second_user
        self.conv = nn.Conv2d(4, 6 if groups == 1 else 4, 3, stride=2, padding=conv_padding, groups=groups)

    def forward(self, x):
        padded = F.pad(x, self.pads, mode=self.mode, value=self.value) if self.mode == "constant" \
            else F.pad(x, self.pads, mode=self.mode)
        out = self.conv(padded)
        if self.second_user:  # the padded copy is also used elsewhere: it must stay
            return out.mean((2, 3)) + padded.mean((1, 2, 3))[:, None]
        return out


def ops(data: bytes):
    return [node.op_type for node in onnx.load_from_string(data).graph.node]


def run(data: bytes, x: torch.Tensor) -> torch.Tensor:
    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"images": x.numpy()})[0])


def export_and_compare(module, x):
    module = module.eval()
    with torch.no_grad():
        want = module(x).double()
    data = to_onnx(module, x, output_name="out", opset=engines.ONNX_OPSET)
    got = run(data, x).double()
    error = (got - want).abs().max() / want.abs().max().clamp_min(1e-12)
    assert got.shape == want.shape and error < 1e-5, float(error)
    return ops(data)


@pytest.mark.parametrize("pads,conv_padding,groups", [
    ([0, 1, 0, 1], 0, 1),  # TensorFlow "same" at stride 2: the extra row and column at the end
    ([1, 2, 0, 1], 0, 1),
    ([0, 1, 0, 1], 1, 1),  # the conv's own pads are added to the folded ones
    ([2, 0, 1, 3], (1, 2), 4),  # depthwise, as in EfficientNet
])
def test_a_zero_pad_before_a_conv_is_folded_with_the_same_outputs(request, pads, conv_padding, groups):
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    x = torch.randn(3, 4, 11, 9, generator=seeded(request))
    assert "Pad" not in export_and_compare(PadThenConv(pads, conv_padding, groups=groups), x)


@pytest.mark.parametrize("case", ["value", "reflect", "second_user"])
def test_other_pads_stay_and_still_compute_right(request, case):
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    module = {"value": PadThenConv([0, 1, 0, 1], value=0.5), "reflect": PadThenConv([0, 1, 0, 1], mode="reflect"),
              "second_user": PadThenConv([0, 1, 0, 1], second_user=True)}[case]
    x = torch.randn(2, 4, 10, 10, generator=seeded(request))
    assert "Pad" in export_and_compare(module, x)


@pytest.mark.parametrize("size", [1, 33, 64])
def test_efficientnet_lite_graph_has_no_pad_and_matches_pytorch(request, lite0, size):
    """The extraction graph at odd and even sizes (and 1 px): every stride-2 "same" pad folded,
    features equal to PyTorch fp32 within the engine tolerance."""
    model = lite0.for_extraction()
    data = engines.export_onnx(model, 4, size)
    assert "Pad" not in ops(data)
    graph = onnx.load_from_string(data).graph
    read = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    assert all(any(out in read for out in node.output) for node in graph.node)  # what computed the pads is gone
    assert all(i.name in read for i in graph.initializer)
    images = torch.randn(2, 3, size, size, generator=seeded(request))
    error = engines.relative_error(run(data, images), engines.pooled_reference(model, 4, images))
    assert error < engines.FP32_TOLERANCE, error


def test_the_engine_file_name_changes_with_the_graph_revision(lite0, monkeypatch):
    """A graph stored by a fasttl that exported unfolded pads is not picked up again."""
    before = engines.onnx_file_name(lite0, 4, 64)
    monkeypatch.setattr(engines, "GRAPH_REVISION", "older")
    assert engines.onnx_file_name(lite0, 4, 64) != before
