"""One ONNX exporter for every graph fasttl writes (`fasttl export`'s images -> logits, the
extraction engine's images -> pooled features): the same settings, so both behave alike on every
supported torch."""
from __future__ import annotations

import inspect
import io
import warnings
from typing import Optional

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
    return fold_pads(buffer.getvalue())


def fold_pads(data: bytes) -> bytes:
    """The graph with each zero Pad that only feeds a Conv folded into the Conv's own pads.
    EfficientNet-Lite's stride-2 layers pad asymmetrically (TensorFlow's "same"), which torch
    can only write as F.pad then conv2d; ONNX Runtime does not fuse the pair as exported (its
    pads are computed by a chain of ops, and an empty optional input blocks its fusion), and the
    separate copy plus the layout reorders around it took about a third of the fp32 time at
    160 px and stops its int8 kernels from chaining. Same arithmetic: Conv pads with zeros."""
    import onnx
    from onnx import helper

    model = onnx.load_from_string(data)
    graph = model.graph
    users = {}
    for node in graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}
    folded = []
    for pad in [n for n in graph.node if n.op_type == "Pad"]:
        conv = users.get(pad.output[0], [None])[0]
        if (len(users.get(pad.output[0], [])) != 1 or conv.op_type != "Conv" or conv.input[0] != pad.output[0]
                or pad.output[0] in outputs or not _zero_constant_pad(model, pad)):
            continue
        pads = _constant(model, pad.input[1])
        conv_attributes = {a.name: a for a in conv.attribute}
        if pads is None or _auto_pad(conv_attributes) not in ("", "NOTSET"):
            continue
        pads = [int(p) for p in pads]
        rank = len(pads) // 2
        if min(pads) < 0 or any(pads[:2]) or any(pads[rank:rank + 2]):
            continue  # padding the batch or channel axes, or cropping: not a Conv's pads
        old = list(conv_attributes["pads"].ints) if "pads" in conv_attributes else [0] * (2 * rank - 4)
        new = [a + b for a, b in zip(old, pads[2:rank] + pads[rank + 2:])]
        if "pads" in conv_attributes:
            conv.attribute.remove(conv_attributes["pads"])
        conv.attribute.append(helper.make_attribute("pads", new))
        conv.input[0] = pad.input[0]
        folded.append(pad)
    for pad in folded:
        graph.node.remove(pad)
    if folded:
        _remove_unused(graph)
    return model.SerializeToString() if folded else data


def _remove_unused(graph) -> None:
    """Drops the nodes and initializers nothing reads any more (what computed the folded pads):
    ONNX Runtime would warn about each one when it loads the graph."""
    while True:
        read = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
        dead = [node for node in graph.node if not any(out in read for out in node.output)]
        for node in dead:
            graph.node.remove(node)
        if not dead:
            break
    for initializer in [i for i in graph.initializer if i.name not in read]:
        graph.initializer.remove(initializer)


def _auto_pad(attributes) -> str:
    return attributes["auto_pad"].s.decode() if "auto_pad" in attributes else ""


def _zero_constant_pad(model, pad) -> bool:
    """Whether `pad` pads with zeros (mode constant, no value or a zero one) on all axes."""
    mode = [a.s for a in pad.attribute if a.name == "mode"]
    if mode and mode[0] != b"constant":
        return False
    if len(pad.input) > 3 and pad.input[3]:
        return False  # an axes input: leave it to ONNX Runtime
    if len(pad.input) > 2 and pad.input[2]:
        value = _constant(model, pad.input[2])
        return value is not None and not value.any()
    return True


def _constant(model, name: str) -> Optional["numpy.ndarray"]:  # noqa: F821
    """The value of `name` when it depends on constants only (evaluated by ONNX's reference
    implementation), else None."""
    from onnx import helper, numpy_helper
    from onnx.reference import ReferenceEvaluator

    graph = model.graph
    initializers = {i.name: i for i in graph.initializer}
    if name in initializers:
        return numpy_helper.to_array(initializers[name])
    producer = {out: node for node in graph.node for out in node.output}
    needed, seen, stack = set(), set(), [name]
    while stack:
        value = stack.pop()
        if not value or value in seen or value in initializers:
            continue
        seen.add(value)
        if value not in producer:
            return None  # a graph input: not a constant
        needed.add(id(producer[value]))
        stack.extend(producer[value].input)
    nodes = [node for node in graph.node if id(node) in needed]
    used = {i for node in nodes for i in node.input}
    subgraph = helper.make_graph(nodes, "constant", [], [helper.make_tensor_value_info(name, 0, None)],
                                 [initializers[i] for i in used if i in initializers])
    return ReferenceEvaluator(helper.make_model(subgraph, opset_imports=model.opset_import)).run(None, {})[0]
