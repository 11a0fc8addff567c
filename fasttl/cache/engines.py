"""What runs the frozen backbone during extraction: PyTorch (fp32, or bf16 autocast) or ONNX
Runtime on an exported copy. DALI (or the PyTorch fallback) still decodes; an engine only maps a
batch of images to the feature maps (or pooled vectors) that pool_store writes into the cache."""
from __future__ import annotations

import collections
import contextlib
import hashlib
import os
import sys
import threading
import time
from typing import List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from fasttl.cache.cpu_features import cpu_flags, cpu_has_int8_dot, cpu_has_native_bf16  # noqa: F401
from fasttl.cache.store import CacheError
from fasttl.cache.int8_checks import (INT8_CHECK_ROWS, INT8_OUTSIDE_SHARE, BatchError, Int8Checks,  # noqa: F401
                                      no_graph_kept)
from fasttl.util.errors import OptionError
from fasttl.cache.engine_files import (MAX_ENGINE_BYTES, read_engine_file,  # noqa: F401  (engines.*)
                                       remove_unrecorded_int8_graphs, write_engine_file)
from fasttl.onnx_graph import to_onnx

ENGINES = ("auto", "torch", "onnxruntime")
PRECISIONS = ("auto", "fp32", "bf16", "int8")
# Features an engine makes must equal the fp32 PyTorch ones within this relative error (max
# absolute difference over the largest magnitude of a verification batch). ONNX Runtime measured
# 1e-6 to 1e-5 on EfficientNet-Lite features; bf16 is about 3% off by nature and is not held to it.
FP32_TOLERANCE = 1e-3
# The int8 graph is held to the norm of its error over the norm of the fp32 features: measured
# 0.05 to 0.2 on CIFAR-10 images at 32 to 224 px (a few rows of a max-based error swing more); a
# graph that answers zeros, noise or another image's features is at 1 or above.
INT8_TOLERANCE = 0.35
# A checked run of a graph may take this long plus this many times the PyTorch reference's time on
# the same images before it is stopped and the graph counts as wrong (ONNX Runtime runs these
# graphs 1.1x to 4x faster than PyTorch; a first run pays its set-up once).
VERIFY_SECONDS, VERIFY_SLOWDOWN = 30.0, 50.0
ONNX_OPSET = 17
# What the exported graph is beyond torch's export; in the engine file's key, so a graph stored by
# an older fasttl (its asymmetric pads as separate Pad nodes, about 1.45x slower) is exported anew.
GRAPH_REVISION = "pads-folded"
_EXPORTED = {}  # engine file name -> graph bytes exported (and verified) by this process
# engine file name -> (the file a message names, the fix it gives) of a graph adopted from a run
# folder (adopt): it can't be quantized again, and the user knows it by the run's file
_ADOPTED = {}
# Graphs adopted and kept at once (3 to 30 MB each): a process loading run after run (a service)
# would otherwise hold every one it ever loaded. One an engine is being made from (adopted) is
# never forgotten for room until that engine has it.
MAX_ADOPTED = 4
_PINNED = collections.Counter()
_ADOPTING = threading.RLock()


def onnxruntime_available() -> bool:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def resolve(engine: str, precision: str, device: torch.device) -> tuple:
    """(engine, precision) with "auto" replaced by what runs.

    * precision auto: bf16 on CUDA (autocast), fp32 on the CPU. bf16 on the CPU is opt-in: its
      features are about 3% off, and it pays only where the CPU has native bf16.
    * engine auto: torch on CUDA; on the CPU ONNX Runtime when installed and fp32 (1.8x to 2.5x the
      folded channels_last PyTorch forward at 128 to 224 px, benchmarks/RESULTS.md), else torch.
      Either way the first batch of each build is checked against PyTorch fp32.
    * int8 (opt-in): ONNX Runtime on the statically quantized graph (fasttl.cache.quantize), CPU only."""
    if engine not in ENGINES:
        raise OptionError(f"engine: unknown {engine!r}; choose from {', '.join(ENGINES)}")
    if precision not in PRECISIONS:
        raise OptionError(f"extract_precision: unknown {precision!r}; choose from {', '.join(PRECISIONS)}")
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "int8" and device.type != "cpu":
        raise OptionError(f"extract_precision: int8 extraction runs on the CPU (ONNX Runtime), not on {device}; pass "
                          "--extract-precision bf16 or fp32")
    if precision == "int8" and engine == "torch":
        raise OptionError("extract_precision: int8 runs on the onnxruntime engine only; pass --engine onnxruntime "
                          "(or auto)")
    if engine == "auto":
        engine = "onnxruntime" if device.type == "cpu" and (precision == "int8" or precision == "fp32"
                                                            and onnxruntime_available()) else "torch"
    if engine == "onnxruntime":
        if device.type != "cpu":
            raise OptionError(f"engine: onnxruntime extracts on the CPU only, not on {device}; use --engine torch")
        if precision not in ("fp32", "int8"):
            raise OptionError("extract_precision: the onnxruntime engine runs fp32 or int8; pass --extract-precision "
                              "fp32 or --engine torch for bf16")
        if not onnxruntime_available():
            other = "--extract-precision fp32 (a run's: train it again)" if precision == "int8" else "--engine torch"
            raise OptionError("engine: onnxruntime is not installed; pip install onnx onnxruntime (or the "
                              f"'export' extra), or pass {other}")
    return engine, precision


class TorchEngine:
    """The folded, channels_last copy of the backbone in PyTorch; returns the tapped feature maps."""

    def __init__(self, model, taps: int, device: torch.device, precision: str):
        self.model, self.taps, self.device, self.precision = model, taps, device, precision

    def autocast(self):
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @torch.no_grad()
    def __call__(self, images: Tensor) -> List[Tensor]:
        with self.autocast():
            return self.model.forward_taps(images.contiguous(memory_format=torch.channels_last), self.taps)


class OnnxEngine(Int8Checks):
    """ONNX Runtime on the exported folded backbone and its pooling (fp32, or int8 quantized on
    `calibration_images`): returns the pooled vector (N, D) as one "map" (pool_store stores 2-D
    input as it is). The graph comes from this process's earlier export or from
    `engine_dir/name` when a build left it there, else it is exported (and kept there); either
    way it must match PyTorch fp32 on a verification batch within the precision's tolerance, or
    it is exported again, and a fresh export that still does not match is an error."""

    def __init__(self, model, taps: int, image_size: int, name: Optional[str], engine_dir: Optional[str],
                 verify_images: Optional[Tensor] = None, precision: str = "fp32",
                 calibration_images: Optional[Tensor] = None):
        self.verify_images, self.precision = verify_images, precision
        self.quantizable = calibration_images is not None  # else a graph looked up that can't be made again
        # what adopt said of it, kept: messages name the run's file even after the graph is forgotten
        self.adopted = None if self.quantizable else _ADOPTED.get(name)
        self.input_range = None  # int8: what its input quantizer holds (quantize.input_range)
        self.name, self.graph_sha256, self.graph_bytes = name, None, 0
        self.model, self.taps, self.checked_sizes = model, taps, set()
        onnx_path = os.path.join(engine_dir, name) if name and engine_dir else None
        self.onnx_path, self.engine_dir = onnx_path, engine_dir
        if precision == "int8":
            self.check_images, self.check_origin = self._int8_check_images(calibration_images, image_size)
        known = _EXPORTED.get(name) or (read_engine_file(onnx_path) if onnx_path else None)
        if precision == "int8" and self.check_images is None and known:
            raise OptionError("extract_precision: an int8 graph is checked on real images before it is used, and none "
                              "were given: pass calibration=(key, images), or verify_images")
        mismatch = failure = None
        for data in ([known] if known else []) + [None]:
            fresh = data is None
            if fresh and precision == "int8" and calibration_images is None:
                raise self.unusable(mismatch, failure)
            mismatch = failure = None
            try:
                data = self._export(image_size, calibration_images) if fresh else data
                self.session = _session(data)
                mismatch = self.verify(model, taps, image_size)
            except Exception as exc:  # a damaged stored file: onnxruntime raises its own types
                if fresh:
                    raise
                failure = type(exc).__name__
            if mismatch is None and failure is None:
                self.graph_sha256, self.graph_bytes = hashlib.sha256(data).hexdigest(), len(data)
                self.input_range = _input_range(data) if precision == "int8" else None
                if name:
                    _EXPORTED[name] = data
                if onnx_path and (fresh or not os.path.isfile(onnx_path)):
                    write_engine_file(onnx_path, data)  # a rename: a link there is replaced, never followed
                return
            if fresh and precision == "int8":
                raise self.graph_off(mismatch)
            if fresh:
                raise CacheError(f"engine: onnxruntime's features differ from PyTorch's ({mismatch}); pass --engine "
                                 "torch")

    def _int8_check_images(self, calibration_images: Optional[Tensor], image_size: int) -> tuple:
        """(the images an int8 graph is checked on, what messages call them): a run's kept ones
        (adopt), else the first of the calibration sample, else the data's first images; rounded
        to float16 as a run keeps them, so a run checks its graph on the same values when it is
        made and when it is loaded."""
        adopted = self._adopted()
        self.checks_on_data = False
        if adopted.check_images is not None:
            images, origin = adopted.check_images, f"the run's check images {adopted.check_shown}"
        elif calibration_images is not None:
            images = calibration_images[:INT8_CHECK_ROWS]
            origin = f"the first {len(images)} images of its calibration sample"
        elif self.verify_images is not None:
            images, self.checks_on_data = self.verify_images, True
            origin = f"the first {len(images)} images of the data"
        else:
            return None, "no images"  # refused in __init__: unusable's reasons first
        return check_images(images, image_size, "check_images" if adopted.check_images is not None else
                            "calibration images" if calibration_images is not None else "verify_images"), origin

    def shown(self) -> Tuple[str, Optional[str]]:
        """(what messages call this graph, the fix a kept graph's owner gave: adopt)."""
        return self._adopted()[:2]

    def _adopted(self) -> "Adopted":
        """What adopt said of this graph; a graph not adopted, or quantized here on calibration
        images (a new run's, which a run loaded before it must not speak for), is called by its path."""
        return self.adopted or Adopted(self.onnx_path or self.name, None, None)

    def reference(self, images: Tensor) -> Tensor:
        return pooled_reference(self.model, self.taps, images)

    def _export(self, image_size: int, calibration_images: Optional[Tensor]) -> bytes:
        data = export_onnx(self.model, self.taps, image_size)
        if self.precision == "int8":
            from fasttl.cache.quantize import quantize

            data = quantize(data, calibration_images)
        return data

    def difference(self, features: Tensor, images: Tensor, want: Optional[Tensor] = None) -> Optional[str]:
        """Why `features` (this graph's, of `images`) are too far from PyTorch fp32's (`want`,
        computed when not given), or None. NaN is too far."""
        want = pooled_reference(self.model, self.taps, images) if want is None else want
        if self.precision == "int8":
            error, tolerance = norm_error(features, want), INT8_TOLERANCE
        else:
            error, tolerance = relative_error(features, want), FP32_TOLERANCE
        return f"relative error {error:.2g} > {tolerance:.2g}" if not error <= tolerance else None

    def beside_reference(self, images: Tensor, batch: Optional[int] = None) -> tuple:
        """(the graph's features or None, PyTorch fp32's, why the graph was stopped or None): the
        graph run (in batches of `batch` when given) beside the reference, and stopped when it takes
        far longer than the reference did (a graph made to loop would otherwise hang the build, out
        of reach of Ctrl-C while ONNX Runtime runs)."""
        started = time.perf_counter()
        want = pooled_reference(self.model, self.taps, images)
        limit = VERIFY_SECONDS + VERIFY_SLOWDOWN * (time.perf_counter() - started)
        batch = batch or max(len(images), 1)
        try:
            features = torch.cat([self._run(images[i:i + batch], limit) for i in range(0, len(images), batch)]) \
                if len(images) else want
        except Exception as exc:  # onnxruntime's own error types: terminated, or a graph that fails
            if "terminate" not in str(exc).lower():
                raise
            why = f"it ran longer than {limit:.0f} s on {len(images)} images, where PyTorch took a fraction"
            return None, want, why
        return features, want, None

    def checked_run(self, images: Tensor) -> Tuple[Tensor, Optional[str]]:
        """(features, why they are wrong or None): the graph beside the reference (beside_reference)."""
        features, want, stopped = self.beside_reference(images)
        return (want, stopped) if stopped else (features, self.difference(features, images, want))

    def verify(self, model, taps: int, image_size: int) -> Optional[str]:
        """Why the graph's features differ from PyTorch fp32's, or None. On real images when the
        build gave them (an int8 graph: its check images): a graph doctored to answer right on
        noise and wrong on photographs is caught there (a seeded random batch alone would pass it)."""
        images = self.check_images if self.precision == "int8" else self.verify_images
        if images is None:
            images = torch.randn(4, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
        _, error = self.checked_run(images)
        if error is None:
            self.checked_sizes = {len(images)}
        return error

    def _run(self, images: Tensor, limit: Optional[float] = None) -> Tensor:
        import onnxruntime

        array = images.detach().to("cpu", torch.float32).contiguous().numpy()
        options = onnxruntime.RunOptions()
        watchdog = threading.Timer(limit, setattr, (options, "terminate", True)) if limit else None
        if watchdog is not None:
            watchdog.daemon = True
            watchdog.start()
        try:
            return torch.from_numpy(self.session.run(None, {"images": array}, options)[0])
        finally:
            if watchdog is not None:
                watchdog.cancel()

    def __call__(self, images: Tensor) -> List[Tensor]:
        """The pooled features of `images`. The graph is checked at each new batch size before it
        is used (one reference forward per size): a graph right only at the verification batch's
        size is caught before any of its rows is stored. fp32 is checked on the batch itself; int8
        on its check images (int8_checks), and each image against its calibrated input range."""
        if self.precision == "int8":
            self.refuse_outside_range(images)
            if len(images) not in self.checked_sizes:
                self.check_batch_size(len(images))
                self.checked_sizes.add(len(images))
            return [self._run(images)]
        if len(images) in self.checked_sizes:
            return [self._run(images)]
        features, error = self.checked_run(images)
        if error is not None:
            _EXPORTED.pop(self.name, None)
            if self.onnx_path:
                with contextlib.suppress(OSError):
                    os.remove(self.onnx_path)  # fasttl's own file: the next build exports it anew
            raise CacheError(f"engine: onnxruntime's features differ from PyTorch's on a batch of {len(images)} "
                             f"images ({error}); its graph was removed, nothing of this batch "
                             "was stored: run again (the graph is exported anew), or pass --engine torch")
        self.checked_sizes.add(len(images))
        return [features]


def check_images(images, image_size: int, name: str) -> Tensor:
    """`images` as the float32 CPU tensor (N, 3, S, S), 1 <= N, finite, an int8 graph is checked
    on; else a one-line error naming `name`."""
    shape = tuple(images.shape) if isinstance(images, Tensor) else None
    usable = shape is not None and len(shape) == 4 and shape[1:] == (3, image_size, image_size) and shape[0] > 0 \
        and images.is_floating_point() and images.device.type == "cpu"
    rounded = images.detach().to(torch.float16).float() if usable else None
    if not usable or not bool(torch.isfinite(rounded).all()):  # finite as float16: what a run keeps
        got = f"a tensor {list(shape)} of {images.dtype} on {images.device}" if shape is not None else \
            type(images).__name__
        raise OptionError(f"{name}: an int8 graph is checked on a tensor (N, 3, {image_size}, {image_size}) of one "
                          f"image or more, on the CPU, finite in float16; got {got}")
    return rounded


def _input_range(data: bytes):
    from fasttl.cache.quantize import input_range

    return input_range(data)


class Adopted(NamedTuple):
    shown: str  # the run's file, as messages name the graph
    fix: Optional[str]  # what to do about images unlike the run's training images
    check_images: Optional[Tensor]  # the images the graph is checked on (int8_checks)
    check_shown: Optional[str] = None  # the run's file that keeps them


def adopt(name: str, data: bytes, shown: str, fix: Optional[str] = None, check_images: Optional[Tensor] = None,
          check_shown: Optional[str] = None) -> None:
    """Makes `data` the graph named `name` in this process (a run folder's int8 graph, read back
    by predict or eval): like any graph found, it is checked against PyTorch before it extracts
    anything, on `check_images` (the run's, kept in `check_shown`). Messages about it name `shown`
    (the run's file) and give `fix`."""
    with _ADOPTING:
        _ADOPTED.pop(name, None)  # the newest last: the oldest is forgotten first
        _EXPORTED[name], _ADOPTED[name] = data, Adopted(shown, fix, check_images, check_shown)
        _make_room()


@contextlib.contextmanager
def adopted(name: str, data: bytes, shown: str, fix: Optional[str] = None, check_images: Optional[Tensor] = None,
            check_shown: Optional[str] = None):
    """adopt, the graph kept until the block ends: an engine made in it finds the graph and what
    adopt said of it, whatever other threads adopt meanwhile."""
    with _ADOPTING:
        _PINNED[name] += 1
        adopt(name, data, shown, fix, check_images, check_shown)
    try:
        yield
    finally:
        with _ADOPTING:
            _PINNED[name] -= 1
            if not _PINNED[name]:
                del _PINNED[name]
            _make_room()


def _make_room() -> None:
    """Forgets the oldest adopted graphs beyond MAX_ADOPTED that no engine is being made from (a
    loaded run adopts its graph again before each use: none is lost)."""
    with _ADOPTING:
        spare = [name for name in _ADOPTED if not _PINNED[name]]
        for name in spare[:max(0, len(_ADOPTED) - MAX_ADOPTED)]:
            forget(name)


def forget(name: str) -> None:
    """This process's copy of graph `name` is no longer trusted: the next use reads or makes it anew."""
    with _ADOPTING:
        _EXPORTED.pop(name, None)
        _ADOPTED.pop(name, None)


def graph_bytes(name: str, engine_dir: Optional[str] = None) -> Optional[bytes]:
    """The verified graph named `name` this process used, else the file kept in `engine_dir`."""
    return _EXPORTED.get(name) or (read_engine_file(os.path.join(engine_dir, name)) if engine_dir else None)


def onnx_file_name(backbone, taps: int, image_size: int, calibration: Optional[str] = None) -> str:
    """engine-<key>.onnx, keyed by what the graph depends on: weights, input size, taps, opset and
    the exporter; an int8 graph engine-<key>-int8.onnx, also keyed by `calibration` (what names
    its calibration sample). The cache folder's store recognizes the name as one of its own files."""
    key = hashlib.sha256(repr((backbone.name, backbone.weights_hash(), image_size, taps, ONNX_OPSET,
                               torch.__version__, GRAPH_REVISION) + ((calibration,) if calibration else ())
                              ).encode()).hexdigest()[:16]
    return f"engine-{key}-int8.onnx" if calibration else f"engine-{key}.onnx"


def export_onnx(model, taps: int, image_size: int) -> bytes:
    """The ONNX graph images (N, 3, S, S) -> pooled features (N, D) of `model` (already folded)."""
    from fasttl.backbones.base import PooledFeatures

    pooled = PooledFeatures(model, taps).eval()
    return to_onnx(pooled, torch.zeros(1, 3, image_size, image_size), output_name="features", opset=ONNX_OPSET)


def _session(data: bytes):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return onnxruntime.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def pooled_reference(model, taps: int, images: Tensor) -> Tensor:
    """PyTorch fp32 pooled features of `images`: what every engine is checked against."""
    from fasttl.backbones.base import PooledFeatures

    with torch.no_grad():
        return PooledFeatures(model, taps)(images.float().contiguous(memory_format=torch.channels_last)).float()


def norm_error(got: Tensor, want: Tensor) -> float:
    """||got - want|| / ||want|| over the whole batch (0 for an empty one)."""
    if not want.numel():
        return 0.0
    return float(torch.linalg.vector_norm(got.double() - want.double()) / torch.linalg.vector_norm(want.double())
                 .clamp_min(1e-12))


def relative_error(got: Tensor, want: Tensor) -> float:
    scale = float(want.abs().max()) if want.numel() else 0.0
    return float((got.float() - want).abs().max()) / max(scale, 1e-12) if want.numel() else 0.0


def create(engine: str, precision: str, model, taps: int, device: torch.device, image_size: int,
           onnx_name: Optional[str] = None, engine_dir: Optional[str] = None, verify_images: Optional[Tensor] = None,
           calibration_images: Optional[Tensor] = None):
    """An engine that has been resolved (see :func:`resolve`). For onnxruntime, `onnx_name`
    (onnx_file_name) keys the exported graph in this process and in `engine_dir` when given, and
    the graph is checked against PyTorch on `verify_images` (real images of the data), else on a
    seeded random batch; an int8 graph is quantized on `calibration_images`."""
    if engine == "onnxruntime":
        return OnnxEngine(model, taps, image_size, onnx_name, engine_dir, verify_images, precision,
                          calibration_images)
    if precision == "bf16" and device.type == "cpu" and not cpu_has_native_bf16():
        print("fasttl: warning: --extract-precision bf16 on a CPU without AVX512-BF16 or AMX runs emulated, "
              "usually slower than fp32", file=sys.stderr)
    return TorchEngine(model, taps, device, precision)
