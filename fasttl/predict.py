"""Predicting with what fasttl trained.

* `fasttl predict --run RUN PATH...` and `fasttl.load_run(RUN).predict(...)`: a finished run's
  model on new images, rebuilt by its strategy's `load` (any strategy); it predicts the run's own
  test images exactly as the run did (predictions.csv).
* `fasttl predict --backbone NAME IMAGE...`: a backbone's top-5 ImageNet classes, to check that
  its weights loaded.

    model = fasttl.load_run("runs/cifar10-linear")
    labels, probabilities = model.predict(["cat.jpg", "ship.png"])   # or a uint8 image tensor
"""
from __future__ import annotations

import collections.abc
import csv
import io
import os
import sys
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn

from fasttl import backbones
from fasttl.cache.folder import refuse_inside
from fasttl.data.images import IMAGE_EXTENSIONS
from fasttl.data.sources import ON_ERROR, ArraySource, FileSource
from fasttl.util.errors import DataError
from fasttl.data.spec import TransformSpec
from fasttl.data.torch_pipeline import decode, transform
from fasttl.util.errors import OptionError
from fasttl.util.files import absolute, is_inside, plain_path, run_folder_in_data
from fasttl.util.path_problems import unreachable
from fasttl.util.outputs import csv_cell
from fasttl.util.checks import a_flag, check_output_path, folder_path, plain_number, positive_int, torch_device


class ImagesToLogits(nn.Module):
    """float32 (N, 3, size, size) RGB in [0, 1] -> logits (N, classes): the backbone's
    normalization, then the run's model. What `load_run(...).model` is and what `fasttl export`
    writes to ONNX. Images of another size are refused, naming the size: a CNN with a global pool
    would take them and answer differently from `predict` (which resizes and crops first)."""

    def __init__(self, module: nn.Module, mean: Sequence[float], std: Sequence[float], size: int):
        super().__init__()
        self.module = module
        self.size = int(size)
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, images: Tensor) -> Tensor:
        if images.dim() != 4 or images.shape[1] != 3 or tuple(images.shape[2:]) != (self.size, self.size):
            raise ValueError(f"images: got shape {tuple(images.shape)}, expected (N, 3, {self.size}, {self.size}) RGB "
                             f"in [0, 1], resized and center-cropped as .input_spec says (.predict does that for "
                             "you, from files or uint8 images of any size)")
        if not images.is_floating_point():
            raise TypeError(f"images: dtype {images.dtype}, expected float RGB in [0, 1] (uint8 pixels go to "
                            ".predict)")
        if images.numel() and not _tracing():  # a traced graph (export) takes the check as written by the caller
            low, high = (float(v) for v in images.detach().aminmax())
            if not (UNIT_RANGE_SLACK[0] <= low and high <= UNIT_RANGE_SLACK[1]):
                raise ValueError(f"images: values from {low:.4g} to {high:.4g}, expected RGB in [0, 1] (pixels of "
                                 "0..255 divided by 255; no NaN)")
        images = images.to(self.mean.dtype)  # float64 or float16 input, as the model's own dtype
        return self.module((images - self.mean) / self.std)


# What a caller's own resize may overshoot [0, 1] by (bicubic rings a few percent); 0..255 pixels
# or NaN are far outside it.
UNIT_RANGE_SLACK = (-0.5, 1.5)


def _tracing() -> bool:
    compiling = getattr(getattr(torch, "compiler", None), "is_compiling", lambda: False)
    return torch.jit.is_tracing() or compiling()


def unit_range_spec(spec: TransformSpec, size: Optional[int] = None) -> TransformSpec:
    """The same resize and center crop as `spec`, scaled to [0, 1] instead of normalized: the
    input `ImagesToLogits` (and an exported ONNX graph) takes."""
    size = size or spec.size
    return TransformSpec(size, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), spec.crop_fraction)


def _unlisted(exc: OSError) -> None:
    """A folder predict's walk cannot list is an error naming it: never its images silently left out."""
    if isinstance(exc, FileNotFoundError):
        raise DataError(f"{exc.filename}: removed while fasttl read the folders given (run again once they hold "
                        "still)") from None
    if isinstance(exc, PermissionError) and (why := unreachable(exc.filename)):  # a folder above it is closed
        raise DataError(f"{exc.filename} {why}") from None
    raise DataError(f"{exc.filename}: cannot list this folder ({exc.strerror}); check its permissions") from None


def image_files(paths: Sequence[str]) -> Tuple[List[str], List[Tuple[str, str]]]:
    """(image files, [(path, why) passed over]): files as given, folders walked recursively in
    sorted order for .jpg/.jpeg/.png files (hidden entries passed over). A path that does not
    exist, or no image at all, is a DataError."""
    files, ignored, paths = [], [], list(paths)  # a generator, read once (the message below names them)
    if not paths:
        raise DataError("no images given (give image files or folders)")
    for given in paths:
        path = os.path.expanduser(plain_path(given))
        if os.path.isdir(path):
            seen = set()  # links to folders are followed (as a run's class folders are), each folder once
            for folder, subfolders, names in os.walk(path, followlinks=True, onerror=_unlisted):
                info = os.stat(folder)
                if (info.st_dev, info.st_ino) in seen:
                    ignored.append((folder, "a folder reached a second time (a link to it, or a link loop)"))
                    subfolders[:] = []
                    continue
                seen.add((info.st_dev, info.st_ino))
                if run_folder_in_data(folder):
                    ignored.append((folder, "a fasttl run folder: its figures are not photos (to predict with "
                                            "its model, pass --run " + folder + ")"))
                    subfolders[:] = []
                    continue
                subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
                for name in sorted(names):
                    full = os.path.join(folder, name)
                    if name.startswith("."):
                        ignored.append((full, "hidden"))
                    elif name.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(full):
                        files.append(full)
                    elif why := unreachable(full):  # an image is named as read; a folder, maybe: never passed over
                        if not name.lower().endswith(IMAGE_EXTENSIONS):
                            raise DataError(f"{full} {why}")
                        files.append(full)
                    elif not name.lower().endswith(IMAGE_EXTENSIONS):
                        ignored.append((full, "not a .jpg/.jpeg/.png file"))
                    else:
                        ignored.append((full, "not a regular file, or a broken link"))
        elif os.path.isfile(path):
            files.append(path)  # named explicitly: its content decides (a bad one is named when read)
        elif why := unreachable(path):
            raise DataError(f"{path} {why}")
        elif os.path.lexists(path):
            raise DataError(f"{path}: a broken link or not a regular file (give image files or folders)")
        else:
            raise DataError(f"{path}: no such file or folder (give image files or folders)")
    if not files:
        given = ", ".join(map(str, paths))[:300]
        passed = next(((path, why) for path, why in ignored if why != "hidden"), None)  # a run folder, say
        said = f"; passed over {passed[0]}: {passed[1]}" if passed else " (give image files or folders)"
        raise DataError(f"no .jpg/.jpeg/.png images in {given}{said}")
    return files, ignored


def _as_uint8_images(images) -> np.ndarray:
    """uint8 (N, H, W, 3) from a uint8 tensor or array (H, W, 3), (N, H, W, 3), (3, H, W) or (N, 3, H, W)."""
    if isinstance(images, Tensor) and images.device.type == "meta":
        raise OptionError("images: a meta tensor holds no pixels; give image files, folders or a uint8 image tensor")
    if isinstance(images, (list, tuple)) and any(isinstance(p, (str, os.PathLike)) for p in images):
        raise OptionError("images: a list mixing paths and other things; give image files and folders, or one "
                          "uint8 image tensor")
    try:
        array = images.detach().cpu().numpy() if isinstance(images, Tensor) else np.asarray(images)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise OptionError(f"images: cannot be read as uint8 pixels ({type(exc).__name__}); give image files, folders "
                          "or a uint8 image tensor") from None
    given = tuple(array.shape)
    if array.dtype != np.uint8:
        raise OptionError(f"images: expected uint8 pixels (0..255), got {array.dtype}; for float images in [0, 1] "
                          "call .model on them")
    if array.ndim == 3:
        array = array[None]
    if array.ndim == 4 and array.shape[0] == 0:
        raise OptionError("images: no images given (a tensor of 0 images)")
    if array.ndim != 4 or 3 not in (array.shape[3], array.shape[1]) or 0 in array.shape:
        raise OptionError(f"images: expected shape (H, W, 3), (3, H, W), (N, H, W, 3) or (N, 3, H, W), got {given}")
    if array.shape[1] == 3 and array.shape[3] == 3:  # either reading is a valid image: guessing is a silent risk
        raise OptionError(f"images: shape {tuple(array.shape)} reads as (N, H, W, 3) with H=3 or as (N, 3, H, W) "
                          "with W=3; give images wider and taller than 3 pixels")
    if array.shape[3] != 3:
        array = array.transpose(0, 2, 3, 1)
    from fasttl.data.images import size_problem

    problem = size_problem("an array image", array.shape[2], array.shape[1])  # the budgets image files get
    if problem is not None:
        raise OptionError(f"images: {problem}")
    return np.ascontiguousarray(array)


class RunModel:
    """A finished run's model, rebuilt on `device` by its strategy's `load`: what `fasttl.load_run`
    returns.

    * ``classes``: the class names, in the order of the logits.
    * ``model``: an nn.Module from float32 (N, 3, size, size) RGB in [0, 1], resized and
      center-cropped as ``input_spec`` says, to logits (the graph `fasttl export` writes); another
      size is refused, naming the one it takes.
    * ``predict(images)``: (predicted class names, probabilities (N, classes)) for image files,
      folders, or a uint8 image tensor; the same predictions as the run's predictions.csv.
    """

    def __init__(self, run_dir: str, device: Union[str, torch.device] = "cpu"):
        from fasttl.transfer.rundir import load_trained, read_config

        self.run_dir = absolute(folder_path("run_dir", run_dir, OptionError, "the run folder"))
        self.config = read_config(self.run_dir)
        self.device = torch_device(device)
        self.trained = load_trained(self.run_dir, self.device)
        self.classes: List[str] = list(self.trained.classes)
        self.spec: TransformSpec = self.trained.spec
        self.input_spec = unit_range_spec(self.spec)
        self.model = ImagesToLogits(self.trained.module, self.spec.mean, self.spec.std, self.spec.size)
        self.model = self.model.to(self.device).eval()

    def __repr__(self) -> str:
        return f"RunModel({self.run_dir!r}, strategy={self.config['strategy']!r}, classes={self.classes})"

    def _source(self, images) -> Union[FileSource, ArraySource]:
        if isinstance(images, (FileSource, ArraySource)):
            return images
        if isinstance(images, (set, frozenset)):
            raise OptionError("images: a set has no order to give the predictions in; give a list")
        if isinstance(images, np.ndarray) and (images.dtype.kind in "US" or images.dtype.kind == "O" and
                                               images.ndim == 1):  # df["path"].values: objects, str or Path
            images = images.tolist()
        elif isinstance(images, collections.abc.Iterable) and \
                not isinstance(images, (str, bytes, bytearray, os.PathLike, list, tuple, np.ndarray, Tensor)):
            images = list(images)  # a generator, a deque, a pandas Series: read once, as a list
        _refuse_bytes(images, "images")
        if isinstance(images, (str, os.PathLike)):
            images = [images]
        if isinstance(images, (list, tuple)) and not images:
            raise OptionError("images: no images given (give image files, folders or a uint8 image tensor)")
        if isinstance(images, (list, tuple)) and images and all(isinstance(p, (str, os.PathLike)) for p in images):
            files, _ = image_files(images)
            return FileSource([absolute(f) for f in files], [0] * len(files), list(self.classes))
        array = _as_uint8_images(images)
        return ArraySource(array, np.zeros(len(array), dtype=np.int64), list(self.classes), name="images")

    @torch.no_grad()
    def logits(self, images, batch_size: Optional[int] = None, progress: bool = False) -> Tensor:
        """float32 logits (N, classes) on the CPU of image files, folders (recursively, sorted) or a
        uint8 image tensor, computed as the run computed its test predictions."""
        return self._logits(self._source(images), batch_size, progress)

    def _logits(self, source, batch_size: Optional[int], progress: bool, refused: Optional[dict] = None) -> Tensor:
        batch_size = positive_int("batch_size", plain_number(batch_size), OptionError, optional=True)
        a_flag("progress", progress, OptionError)
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(source) * self.trained.prediction_views, unit="img", desc="predict",
                       dynamic_ncols=True)
        from fasttl.transfer.rundir import finite_logits

        try:
            return finite_logits(self.run_dir, self.trained.predict_logits(source, batch_size, bar, refused))
        finally:
            if bar is not None:
                bar.close()

    def predict(self, images, batch_size: Optional[int] = None, progress: bool = False) -> Tuple[List[str], Tensor]:
        """(predicted class name per image, probabilities float32 (N, classes)). `images`: a path,
        a list of image files or folders (walked recursively, sorted), or a uint8 tensor
        (H, W, 3), (N, H, W, 3), (3, H, W) or (N, 3, H, W), RGB. A file that does not decode is an
        error naming it."""
        probabilities = torch.softmax(self.logits(images, batch_size, progress), dim=1)
        return [self.classes[i] for i in probabilities.argmax(1).tolist()], probabilities


def _refuse_bytes(images, name: str) -> None:
    """bytes are no path fasttl takes (nor encoded images): said, not read as pixels or text."""
    if isinstance(images, (bytes, bytearray)) or \
            isinstance(images, (list, tuple)) and any(isinstance(p, (bytes, bytearray)) for p in images):
        raise OptionError(f"{name}: bytes (a path as bytes, or a file's encoded content?); give paths as str or "
                          "pathlib.Path, or decoded uint8 pixels")


def _checked_paths(paths) -> list:
    """predict_run's `paths` as a list of paths: one path (not its characters), a list, a 1-d
    array or a generator of them; never a set (the CSV's rows follow the order given)."""
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else paths
    if isinstance(paths, np.ndarray) and paths.ndim == 1:  # df["path"].values
        paths = paths.tolist()
    if isinstance(paths, (set, frozenset)):
        raise OptionError("paths: a set has no order to give the predictions in; give a list")
    if not isinstance(paths, collections.abc.Iterable) or isinstance(paths, (np.ndarray, Tensor)):
        shape = f" of shape {tuple(paths.shape)}" if isinstance(paths, (np.ndarray, Tensor)) else ""
        raise OptionError(f"paths: expected image files or folders (a path, or a list of them), got "
                          f"{type(paths).__name__}{shape}")
    paths = list(paths)  # (a generator, read once)
    _refuse_bytes(paths, "paths")
    bad = next((index for index, path in enumerate(paths) if not isinstance(path, (str, os.PathLike))), None)
    if bad is not None:
        raise OptionError(f"paths[{bad}]: expected a path (a str or pathlib.Path), got {type(paths[bad]).__name__}")
    return paths


def load_run(run_dir: str, device: Union[str, torch.device] = "cpu") -> RunModel:
    """A finished run's model, ready to predict (see RunModel)."""
    return RunModel(run_dir, device)


def predictions_csv(paths: Sequence[str], probabilities: Tensor, classes: Sequence[str], top_k: int = 1) -> str:
    """path,predicted,confidence[,top2,top2_confidence,...]: one row per image."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    header = ["path", "predicted", "confidence"]
    for k in range(2, top_k + 1):
        header += [f"top{k}", f"top{k}_confidence"]
    writer.writerow(header)
    values, indices = probabilities.topk(top_k, dim=1)
    for path, vs, ids in zip(paths, values.tolist(), indices.tolist()):
        row = [csv_cell(path)]
        for v, i in zip(vs, ids):
            row += [csv_cell(classes[i]), f"{v:.4f}"]
        writer.writerow(row)
    return buffer.getvalue()


def predict_run(run_dir: str, paths: Sequence[str], *, out: Optional[str] = None, top_k: int = 1,
                device: str = "cpu", batch_size: Optional[int] = None, on_error: str = "fail",
                overwrite: bool = False, progress: bool = True) -> dict:
    """`fasttl predict --run`: predicts image files and folders, returns {"csv", "rows", "skipped",
    "ignored", "out", "not_written"}; the CSV is written to `out` when given (when that fails once
    the work is done, "out" is None and "not_written" says why). With on_error="skip", images that
    do not decode, and images an int8 run's graph can't represent, are left out and returned
    (path, reason) in "skipped"."""
    from fasttl.data import screen

    run_dir, top_k = folder_path("run_dir", run_dir, OptionError, "the run folder"), plain_number(top_k)
    if on_error not in ON_ERROR:
        raise OptionError(f"on_error: expected one of {', '.join(ON_ERROR)}, got {on_error!r}")
    overwrite, progress = a_flag("overwrite", overwrite, OptionError), a_flag("progress", progress, OptionError)
    paths = _checked_paths(paths)
    if out is not None:
        out = check_output_path(out, overwrite, ending=".csv")  # a shell glob can put an input image last
        refuse_inside("out", out, "file")
        run_folder = os.path.realpath(os.path.expanduser(os.fspath(run_dir)))
        if is_inside(out, run_folder):
            raise OptionError(f"out: {out} is inside the run folder {run_folder}, whose files are the run's (its "
                              "config, weights, predictions.csv); write the predictions elsewhere")
    files, ignored = image_files(paths)
    model = load_run(run_dir, device)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= len(model.classes):
        raise OptionError(f"top_k: expected 1..{len(model.classes)} (the run has {len(model.classes)} classes), "
                          f"got {top_k!r}")
    source = FileSource([absolute(f) for f in files], [0] * len(files), list(model.classes))
    spellings = collections.defaultdict(collections.deque)  # the CSV names each image as the user's path led
    for path, given in zip(source.files, files):  # to it; one file given twice, twice as given, in order
        spellings[path].append(given)
    if on_error == "skip":
        try:
            source = screen(source, on_error)
        except DataError as exc:
            raise DataError(f"{exc}; nothing to predict") from None
    refused = {} if on_error == "skip" else None  # images an int8 graph can't represent: skipped too
    logits = model._logits(source, batch_size, progress and len(source) > 64, refused)
    skipped = list(source.skipped)
    if refused:
        kept = [i for i in range(len(source)) if i not in refused]
        if not kept:
            raise DataError(f"every image was refused ({next(iter(refused.values()))}); nothing to predict")
        skipped += [(source.files[i], message) for i, message in sorted(refused.items())]
        source, logits = source.subset(kept), logits[kept]
    probabilities = torch.softmax(logits, dim=1)
    text = predictions_csv(_as_given(source, spellings), probabilities, model.classes, top_k)
    not_written = None if out is None else _written(out, text, overwrite)
    return {"csv": text, "rows": len(source), "skipped": skipped, "ignored": ignored,
            "out": None if not_written else out, "not_written": not_written}


def _written(out: str, text: str, overwrite: bool) -> Optional[str]:
    """None once the CSV is at `out`, else why not (a folder made read-only, a disk filled during
    the work): the predictions are the caller's to show then, never lost with the file."""
    from fasttl.cli_errors import OS_ERRORS, os_error_line
    from fasttl.util.files import write_atomic

    try:
        write_atomic(out, text.encode(), replace=overwrite)  # a file made at --out meanwhile is kept
    except OSError as exc:  # whatever stopped the file (its folder removed, a folder put there): the work is done
        return os_error_line(exc) if exc.errno in OS_ERRORS else f"{out}: {exc.strerror or exc}"
    return None


def say_passed_over(ignored) -> None:
    """What a walk of the folders given did not read, on stderr (as `fasttl run` says it of a data
    folder); hidden entries go unsaid."""
    from fasttl.util.outputs import passed_over

    passed = [(path, why) for path, why in ignored if why != "hidden"]
    if passed:
        print(passed_over(passed, where="the folders given", most=5), file=sys.stderr)


def show_run_predictions(result: dict) -> int:
    """predict_run's result as `fasttl predict --run` says it: the CSV on standard output unless it
    went to --out (when --out could not be written, said first, then the CSV, exit 2), the rest on
    stderr."""
    from fasttl.util.outputs import skipped_line, terminal_lines, terminal_text

    if result.get("not_written"):  # first: a full standard output must not take this line with it
        print(f"fasttl: error: {result['not_written']}; the predictions go to standard output instead, not saved",
              file=sys.stderr, flush=True)
    if result["out"] is None:
        print(result["csv"], end="")  # (print, not sys.stdout.write: with standard output closed there is none)
    else:
        print(terminal_lines(f"{result['rows']} predictions written to {terminal_text(result['out'])}"),
              file=sys.stderr)
    say_passed_over(result["ignored"])
    if result["skipped"]:
        print(skipped_line(result["skipped"]), file=sys.stderr)
    return 2 if result.get("not_written") else 0


def _as_given(source, spellings) -> List[str]:
    """Each image of `source` (in order, some left out) as the user gave it: a file given twice is
    left out or kept twice (its two entries are the same file), so its spellings go in order."""
    shown = []
    for path in source.files:
        shown.append(spellings[path][0])
        spellings[path].rotate(-1)
    return shown


BACKBONE_BATCH = 32


@torch.no_grad()
def predict(paths: Sequence[str], backbone_name: str = backbones.DEFAULT, weights: Optional[str] = None,
            top: int = 5) -> List[List[Tuple[str, float]]]:
    """A backbone's top `top` ImageNet classes per image (`fasttl predict --backbone`)."""
    model = backbones.create(backbone_name, weights=weights).eval()
    spec = TransformSpec.for_backbone(model.preprocessing)
    # a batch at a time: every image of a command line in one batch took about 17 MB each
    probabilities = torch.cat([model(torch.stack([transform(decode(p), spec) for p in paths[i:i + BACKBONE_BATCH]]))
                               .softmax(-1) for i in range(0, len(paths), BACKBONE_BATCH)])
    names = backbones.imagenet_classes()
    values, indices = probabilities.topk(top, dim=-1)
    return [[(names[i], float(v)) for v, i in zip(vs.tolist(), ids.tolist())] for vs, ids in zip(values, indices)]


def format_predictions(paths: Sequence[str], predictions) -> str:
    lines = []
    for path, preds in zip(paths, predictions):
        lines.append(path)
        lines += [f"  {prob:6.1%}  {name}" for name, prob in preds]
    return "\n".join(lines)


__all__ = ["ImagesToLogits", "RunModel", "check_output_path", "image_files", "load_run", "predict",
           "predict_run", "predictions_csv", "unit_range_spec"]
