"""`fasttl extract`: the feature precomputation job, on one process or many (torchrun)."""
from __future__ import annotations

import json
import os
from typing import Dict, List, Optional


from fasttl import backbones
from fasttl.cache import FeatureCache
from fasttl.cache.build import SHARD_ROWS
from fasttl.cache.kernels import CACHE_DTYPE
from fasttl.data import class_folder_splits
from fasttl.data.formats import open_data
from fasttl.data.formats.filelist import is_file_list
from fasttl.util.checks import a_flag, folder_path, plain_number, positive_int, torch_device
from fasttl.util.errors import OptionError
from fasttl.util.files import enclosing_run_folder, is_inside
from fasttl.util.path_problems import output_folder_problem
from fasttl.util import distributed
from fasttl.util.outputs import passed_over, within


def extract(backbone_name: str, data: str, out: str, *, weights: str = None, image_size: int = None,
            dtype: str = CACHE_DTYPE, batch_size: Optional[int] = None, device: str = "cpu", overwrite: bool = False,
            shard_rows: int = SHARD_ROWS, backend: str = "auto", progress: bool = True,
            on_error: str = "fail", features: str = "head", engine: str = "auto",
            precision: str = "auto", classes: Optional[str] = None, labels: str = "names") -> Dict[str, dict]:
    """Builds one cache per split: OUT/train and OUT/test when DATA has train/ and test/, else OUT/all.
    DATA may also be a file list (.csv, .tsv, .parquet with path and label columns, paths relative
    to the list's folder) or WebDataset shards (a .tar brace pattern; samples KEY.jpg + KEY.cls);
    ``classes``: a file naming their classes, one a line; ``labels``: a file list's labels are
    those names ("names") or indices into them ("indices"). Either is one split, OUT/all, its rows
    in the list's (or the shards') order, each row's source in the cache's samples.json. What a scan
    of class folders passed over (hidden entries, stray files, a run folder) is in each summary's
    ``ignored`` as (path, why), and said by say_passed_over.
    ``on_error="skip"`` leaves out images that do not decode (listed in each manifest's "skipped"
    and counted in the summary); ``"fail"`` (default) stops at the first, naming it.
    ``features``: "head" or "multi" (see `fasttl run --features`); ``engine`` and ``precision``:
    see fasttl.cache.engines.resolve (an exported ONNX graph is kept in OUT for later builds)."""
    from fasttl.transfer.caching import (FEATURE_TAPS, refuse_settings_in_run_folders, refuse_writes_among_images,
                                         refuse_writes_among_sources)

    image_size, batch_size, shard_rows = (plain_number(v) for v in (image_size, batch_size, shard_rows))
    overwrite, progress = a_flag("overwrite", overwrite, OptionError), a_flag("progress", progress, OptionError)
    _check_options(features, image_size, batch_size, shard_rows, device)
    out = folder_path("out", out, OptionError, "the cache folder")  # (numpy's text too: os.listdir lists bytes)
    data = folder_path("data", data, OptionError, "the data")
    weights, classes = (None if v is None else folder_path(name, v, OptionError, "a file") for name, v in
                        (("weights", weights), ("classes", classes)))
    problem = output_folder_problem(out, "give a folder for the cache (it is created when missing)")
    if problem:
        raise OptionError(f"out: {problem}")
    holder = enclosing_run_folder(out)
    if holder is not None:
        raise OptionError(f"out: {out} is in the fasttl run folder {holder}, which only its run writes into; give a "
                          "folder of its own for the cache")
    refuse_writes_among_images([("data", data)])
    refuse_settings_in_run_folders()
    # The cache never goes among the images of a data folder: its files would mix with them, and a
    # later scan would read its folders as classes.
    if os.path.isdir(data) and is_inside(out, data):
        raise OptionError(f"out: {os.path.abspath(out)} is inside the data folder {os.path.realpath(data)}; give a "
                          "cache folder outside the data")
    _refuse_foreign_files(out)
    torch_device, _ = distributed.join(device)
    model = backbones.create(backbone_name, weights=weights)
    listed = open_data(data, classes, labels)
    if listed is None and classes is not None:
        raise OptionError("classes: --classes names the classes of a file list or WebDataset shards; class folders "
                          "are named by their folders")
    if labels != "names" and not is_file_list(data):
        raise OptionError(f"labels: --labels {labels} reads a file list's labels; {data} is labelled by its own "
                          "classes (drop it)")
    train, test = (listed, None) if listed is not None else class_folder_splits(data)
    # a list's images may lie far from the list: the cache never goes among them either
    refuse_writes_among_sources([train, test], [("the cache folder --out", out, "give --out")])
    splits = {"train": train, "test": test} if test is not None else {"all": train}
    _mark_root(out)
    summaries, calibration = {}, None
    for name, source in splits.items():  # train first: its graph extracts the test split too
        cache = FeatureCache.build(model, source, os.path.join(out, name), dtype=dtype, batch_size=batch_size,
                            device=torch_device, image_size=image_size, shard_rows=shard_rows, overwrite=overwrite,
                            backend=backend, progress=progress, on_error=on_error, taps=FEATURE_TAPS[features],
                            engine=engine, precision=precision, engine_dir=out, calibration=calibration)
        ignored = [(within(path, data), why) for path, why in getattr(source, "ignored", None) or []]
        summaries[name] = dict(cache.last_build, rows=len(cache), directory=cache.directory, ignored=ignored)
        if calibration is None:
            calibration = _training_calibration(model, source, cache, image_size, on_error)
    return summaries


def _training_calibration(model, train, cache: FeatureCache, image_size, on_error: str) -> Optional[tuple]:
    """An int8 training cache's calibration sample (None for other precisions), which the test
    split's graph uses too: a test split calibrated on itself would be another feature space than
    the one its head trained on. The images are the training split's as its build screened them."""
    from fasttl.cache.build import screened_source
    from fasttl.cache.extraction import calibration_sample
    from fasttl.data.spec import TransformSpec

    if ((cache.fingerprint.get("compute") or {}).get("precision")) != "int8":
        return None
    source = screened_source(train, cache.directory, on_error)
    key, images = calibration_sample(source, TransformSpec.for_backbone(model.preprocessing, size=image_size))
    if key != cache.fingerprint["compute"]["calibration"].get("sample"):  # one rule for both: a bug, not a user error
        raise RuntimeError(f"extract: the training cache {cache.directory} names another calibration sample")
    return key, images


def _mark_root(out: str) -> None:
    """Marks --out as an extract root (store.EXTRACT_MARKER), before its caches are built: no run,
    prediction or export then writes into it (cache.folder.refuse_inside)."""
    from fasttl.cache import store
    from fasttl.util.files import write_atomic

    os.makedirs(out, exist_ok=True)
    if not store.is_extract_mark(os.path.join(out, store.EXTRACT_MARKER)):  # (a user's file of its name: refused)
        write_atomic(os.path.join(out, store.EXTRACT_MARKER), (json.dumps(store.EXTRACT_MARK) + "\n").encode())


def _refuse_foreign_files(out: str) -> None:
    """--out holds only what extract writes (its split folders, engine graphs, its lock and
    temporaries), so a folder of the user's files never becomes a cache's root."""
    from fasttl.cache import store

    if not os.path.isdir(out):
        return
    foreign = [name for name in sorted(os.listdir(out))
               if name not in store.EXTRACT_SPLITS and not store.is_own_file(out, name)]
    if foreign:
        raise OptionError(f"out: {out} holds files that are not fasttl's ({', '.join(foreign[:3])}); give an empty or "
                          "new folder for the cache")


def _check_options(features: str, image_size, batch_size, shard_rows, device) -> None:
    """The options' values, before any work (as `fasttl run` checks its own)."""
    from fasttl.transfer.caching import FEATURE_TAPS
    from fasttl.data.spec import check_image_size

    if features not in FEATURE_TAPS:
        raise OptionError(f"features: unknown {features!r}; choose from {', '.join(FEATURE_TAPS)}")
    positive_int("shard_rows", shard_rows, OptionError)
    positive_int("batch_size", batch_size, OptionError, optional=True)
    if image_size is not None:
        check_image_size("image_size", image_size, OptionError)
    torch_device(device)


def format_summary(summaries: Dict[str, dict]) -> List[str]:
    lines = []
    for name, s in summaries.items():
        skipped = s.get("skipped", 0)
        note = f", {skipped} skipped (listed with the reason in its manifest.json)" if skipped else ""
        if s.get("images", 0) == 0 and s.get("shards_built", 0) == 0 and s.get("bytes_written", 0) == 0:
            lines.append(f"{name}: {s['rows']} rows already cached in {s['directory']} (fingerprint matches{note})")
            continue
        lines.append(f"{name}: {s['images']} images in {s['seconds']:.1f} s ({s['images_per_second']:.0f} images/s), "
                     f"{s['bytes_written'] / 2**20:.1f} MiB written, {s['shards_built']} shards built, "
                     f"{s['shards_reused']} reused{note} -> {s['directory']}")
    return lines


def say_passed_over(summaries: Dict[str, dict]) -> None:
    """What the scan of the data folder passed over, on stderr (as `fasttl run` and `predict` say
    it): data went unread, and a summary on a full standard output must not take that with it."""
    import sys

    ignored = [entry for s in summaries.values() for entry in s.get("ignored", [])]
    if ignored:
        print(passed_over(ignored), file=sys.stderr, flush=True)
