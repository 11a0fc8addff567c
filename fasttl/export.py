"""`fasttl export RUN --out model.onnx`: a finished run's model as one ONNX graph from images to
logits, checked with ONNX Runtime against torch before it is written.

The graph's input `images` is float32 (N, 3, H, W), RGB in [0, 1], resized so that the shorter side
is H / crop_fraction and center-cropped (the metadata says both numbers); the backbone's
normalization is inside the graph; N is dynamic. The output `logits` is (N, classes), the class
names in the metadata (`classes`, a JSON list)."""
from __future__ import annotations

import json
import os
from typing import List, Optional

import numpy as np
import torch

from fasttl.cache.folder import refuse_inside
from fasttl.util.checks import a_flag, is_utf8, plain_number
from fasttl.util.errors import OptionError, UserError
from fasttl.onnx_graph import to_onnx

TOLERANCE = 1e-3       # max abs logit difference between ONNX Runtime and torch that passes
DEFAULT_OPSET = 17
VERIFY_IMAGES = 8


class MissingExtraError(UserError, ImportError):
    """An optional dependency a command needs is not installed."""


class VerificationError(RuntimeError):
    """The exported graph does not compute what the torch model computes."""


def _onnx_modules():
    try:
        import onnx
        import onnxruntime
    except ImportError as exc:
        raise MissingExtraError(f"export: needs the onnx and onnxruntime packages ({exc.name or exc} is missing); "
                                "install them with pip install 'fasttl[export]'") from None
    return onnx, onnxruntime


def _verification_images(model, config: dict, size: int, count: int = VERIFY_IMAGES) -> torch.Tensor:
    """float32 (count, 3, size, size) in [0, 1]: real images, the first of the run's own test split
    when its data is still there, else of the CIFAR-10 mini set shipped in the package."""
    from fasttl.data import ImageLoader
    from fasttl.predict import unit_range_spec

    source = None
    try:
        from fasttl.data import screen
        from fasttl.transfer.evaluate import own_dataset

        source = screen(own_dataset(config).test, "skip")  # the run's own test split, its unreadable images left out
    except (UserError, OSError):
        pass
    if source is None:
        from fasttl.data import cifar10_mini

        source = cifar10_mini()[1]
    source = source.subset(range(min(count, len(source))))
    spec = unit_range_spec(model.spec, size)
    return torch.cat([x for x, _ in ImageLoader(source, spec, count, backend="torch")])


def _printable_name(run_dir: str) -> str:
    """The run folder's name as UTF-8 text for the graph's metadata (protobuf strings are UTF-8): a
    name in another encoding keeps its bytes as escapes."""
    return os.path.basename(os.path.normpath(run_dir)).encode("utf-8", "surrogateescape").decode("utf-8",
                                                                                                "backslashreplace")


def export_onnx(run_dir: str, out: str, *, image_size: Optional[int] = None, opset: int = DEFAULT_OPSET,
                overwrite: bool = False, tolerance: Optional[float] = None) -> dict:
    """Exports the run's model to `out` (see the module docstring) after checking it with ONNX
    Runtime on real images: the file is written only when the largest absolute logit difference
    from torch is at most `tolerance` (else VerificationError, nothing written). Returns
    {"out", "max_abs_diff", "images", "image_size", "classes", "opset", "bytes"}."""
    from fasttl._version import __version__
    from fasttl.util.files import write_atomic
    from fasttl.predict import ImagesToLogits, load_run
    from fasttl.util.checks import check_output_path

    tolerance = TOLERANCE if tolerance is None else plain_number(tolerance)
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0 <= tolerance < float("inf"):
        raise OptionError(f"tolerance: expected a finite number >= 0 (the largest logit difference allowed), got "
                          f"{tolerance!r}")
    if not isinstance(out, (str, os.PathLike)) or not isinstance(os.fspath(out), str):
        raise OptionError(f"out: expected the .onnx file's path (a str or a pathlib.Path), got {type(out).__name__}")
    overwrite, image_size, opset = a_flag("overwrite", overwrite, OptionError), plain_number(image_size), \
        plain_number(opset)
    out = check_output_path(out, overwrite, ending=".onnx")
    refuse_inside("out", out, "file")
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int)
                                   or not 8 <= image_size <= 1024):
        raise OptionError(f"image_size: expected an integer in 8..1024, got {image_size!r}")
    if isinstance(opset, bool) or not isinstance(opset, int) or not 13 <= opset <= 21:
        raise OptionError(f"opset: expected an ONNX opset in 13..21, got {opset!r}")
    onnx, onnxruntime = _onnx_modules()
    run = load_run(run_dir, "cpu")
    if image_size is not None and image_size != run.spec.size:
        raise OptionError(f"image_size: the run's model was made at {run.spec.size} px (its head fit on features of "
                          f"that size); a graph at {image_size} px would answer otherwise than the run and predict: "
                          "leave --image-size out")
    size = run.spec.size
    module = ImagesToLogits(run.trained.module, run.spec.mean, run.spec.std, size).float().eval()
    images = _verification_images(run, run.config, size)
    data = to_onnx(module, images[:2], output_name="logits", opset=opset)

    graph = onnx.load_from_string(data)
    meta = {"classes": json.dumps(run.classes), "strategy": run.config["strategy"],
            "backbone": str(run.config.get("backbone")), "fasttl_version": __version__,
            "input": f"float32 (N, 3, {size}, {size}) RGB in [0, 1]: resize the shorter side to "
                     f"{max(size, int(round(size / run.spec.crop_fraction)))} px, center-crop {size} x {size}",
            "image_size": str(size), "crop_fraction": str(run.spec.crop_fraction),
            "normalization": json.dumps({"mean": list(run.spec.mean), "std": list(run.spec.std)}),
            "run": _printable_name(run.run_dir)}
    del graph.metadata_props[:]
    for key, value in meta.items():
        entry = graph.metadata_props.add()
        entry.key, entry.value = key, value
    graph.doc_string = f"fasttl {run.config['strategy']} run {_printable_name(run.run_dir)}: images -> logits"
    onnx.checker.check_model(graph)
    data = graph.SerializeToString()

    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    got = session.run(["logits"], {"images": images.numpy()})[0]
    with torch.no_grad():
        expected = module(images).float().numpy()
    max_diff = float(np.abs(got - expected).max())
    if not np.isfinite(max_diff) or got.shape != expected.shape or max_diff > tolerance:
        raise VerificationError(f"export: ONNX Runtime's logits differ from torch's by {max_diff:.3g} on "
                                f"{len(images)} images (more than {tolerance:g}); {out} was not written")
    write_atomic(out, data, replace=overwrite)  # without --overwrite, a file made there meanwhile is kept
    return {"out": out, "max_abs_diff": max_diff, "images": len(images), "image_size": size,
            "classes": run.classes, "opset": opset, "bytes": len(data)}


def run_instructions(result: dict) -> List[str]:
    """How to run the exported file, printed by `fasttl export`."""
    import shlex

    size = result["image_size"]
    # The path as a Python literal, the code as one shell word: a file name holding $(...), ` or '
    # is pasted as a name, never run.
    out = result["out"]
    # ONNX Runtime takes a path as UTF-8 text; a name of bytes that are not: the file's content, by its bytes
    model = repr(out) if is_utf8(out) else f"open({os.fsencode(out)!r}, 'rb').read()"
    code = (f"import json, numpy as np, onnxruntime as ort; s = ort.InferenceSession({model}); "
            "print(json.loads(s.get_modelmeta().custom_metadata_map['classes'])); "
            f"print(s.run(None, {{'images': np.random.rand(1, 3, {size}, {size}).astype(np.float32)}})[0])")
    return ["run it with ONNX Runtime (images: float32 (N, 3, H, W) RGB in [0, 1]):",
            f"  python -c {shlex.quote(code)}"]
