"""Where feature caches of the transfer job live, so later runs with the same fingerprint reuse them."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from typing import Optional

import torch

from fasttl.cache import FeatureCache
from fasttl.cache.cache import CacheError
from fasttl.cache import engines
from fasttl.cache.kernels import CACHE_DTYPE
from fasttl.cache.extraction import compute_settings
from fasttl.util.errors import OptionError
from fasttl.util import settings
from fasttl.util.files import absolute


def cache_root() -> str:
    return settings.CACHE_DIR.path()


# --features: how many intermediate stages each cached vector pools beside the final map (see
# Backbone.forward_taps). "multi" = 4: on a CIFAR-10 subset the validation accuracy was highest
# with 4 of 0-4 stages at 128, 160 and 224 px (benchmarks/RESULTS.md, "Feature transfer").
FEATURE_TAPS = {"head": 0, "multi": 4}

# --mirror-views: the splits that also get the horizontally mirrored images as a second view (a
# split's logits are then the average over its views). "test" is the default: on validation splits
# of CIFAR-10 averaging the two views scored higher than the plain view alone (benchmarks/RESULTS.md,
# "Mirror views at test"), for one more pass over the test and validation images only (the
# validation images are mirrored too, so the head is chosen on the same average).
MIRROR_VIEWS = {"none": (), "test": ("test",), "both": ("train", "test")}


def mirror_mode(value):
    """--mirror-views as one of MIRROR_VIEWS; a run's config.json from before it had modes holds a
    bool (True: both splits, False: none). Anything else is returned as it is, to be refused."""
    if isinstance(value, bool):
        return "both" if value else "none"
    return value


def views_of(config, split: str) -> list:
    """[False] or [False, True]: the views (mirrored or not) a run's `split` ("train", or "test"
    for everything it predicts) uses, from a RunConfig or a run's config.json (read_config's)."""
    value = config["mirror_views"] if isinstance(config, dict) else config.mirror_views
    mode = mirror_mode(value)
    if not isinstance(mode, str) or mode not in MIRROR_VIEWS:
        raise OptionError(f"mirror_views: unknown {value!r}; choose from {', '.join(MIRROR_VIEWS)}")
    return [False, True] if split in MIRROR_VIEWS[mode] else [False]


@dataclass(frozen=True)
class Extraction:
    """How a run's features are extracted: what the cache's fingerprint (and folder) depend on
    beside the backbone and the images."""

    image_size: int
    dtype: str = CACHE_DTYPE
    features: str = "head"
    engine: str = "auto"
    precision: str = "auto"
    # int8: what names the sample of the run's training images its graph was calibrated on
    # (run_calibration); every split of the run goes through that one graph.
    calibration: Optional[str] = None

    @classmethod
    def of(cls, config, train_source=None) -> "Extraction":
        """From a run's config.json (read_config's: an older run's filled in), or from a RunConfig
        and the run's training images (`train_source`, which calibrate an int8 graph)."""
        if isinstance(config, dict):
            return cls(config["image_size"], config["cache_dtype"], config["features"], config["engine"],
                       config["extract_precision"], config["extract_calibration"])
        plain = cls(config.image_size, config.cache_dtype, config.features, config.engine, config.extract_precision)
        return dataclasses.replace(plain, calibration=run_calibration(config, train_source))

    @property
    def taps(self) -> int:
        if self.features not in FEATURE_TAPS:
            raise OptionError(f"features: unknown {self.features!r}; choose from {', '.join(FEATURE_TAPS)}")
        return FEATURE_TAPS[self.features]

    def resolved(self, device) -> tuple:
        """(engine, precision) as they run on `device`."""
        return engines.resolve(self.engine, self.precision, torch.device(device))

    def graph_name(self, backbone) -> str:
        """The file name of the int8 graph all of a run's splits go through."""
        return engines.onnx_file_name(backbone, self.taps, self.image_size, self.calibration)


def run_calibration(cfg, train_source) -> Optional[str]:
    """What names the calibration sample of a run whose extraction is int8 (else None): its
    training images' content, the rows drawn, the backbone, size and taps (which fix the
    preprocessing), the quantizer's settings. Known before any image is read, so config.json
    holds it from the start."""
    device = torch.device(str(cfg.device).split(":")[0])
    if train_source is None or engines.resolve(cfg.engine, cfg.extract_precision, device)[1] != "int8":
        return None
    from fasttl.cache import quantize

    rows = quantize.calibration_rows(len(train_source))
    return hashlib.sha256(json.dumps([train_source.identity(), rows, cfg.backbone, cfg.image_size, cfg.features,
                                      quantize.settings()], sort_keys=True).encode()).hexdigest()


def cache_dir(backbone, source, split: str, extraction: Extraction, device="cpu") -> str:
    """ROOT/<backbone>-<size>px-<dtype>-<features>-<device>-<weights>-<compute>/<split>-<dataset
    content hash>: the splits of one dataset side by side, each keyed by its content, so any
    later run over the same images (a subset run's test split, say) reuses it; caches made with
    other compute settings (engine, precision, an older fasttl's) stay apart instead of
    clashing. The fingerprint in each manifest still decides whether a cache found there may be
    used."""
    device = torch.device(device)
    settings = compute_settings(device, extraction.engine, extraction.precision, extraction.calibration)
    compute = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:6]
    family = (f"{backbone.name}-{extraction.image_size}px-{extraction.dtype}-{extraction.features}-{device.type}-"
              f"{backbone.weights_hash()[:12]}-{compute}")
    return os.path.join(cache_root(), family, f"{split}-{source.identity()[:16]}")


def cached_features(backbone, source, split: str, extraction: Extraction, *, batch_size: Optional[int] = None,
                    device="cpu", progress: bool = True, mirror: bool = False,
                    rebuild_broken: bool = False, calibration_images: Optional[torch.Tensor] = None,
                    rebuild: bool = False) -> FeatureCache:
    """The cache of one split, built on first use (resuming an interrupted build) and reused after.
    `mirror`: the cache of the horizontally mirrored view, kept beside the plain one.
    `calibration_images` (int8, extraction.calibration set): the run's calibration sample; where
    it is not given, the graph is looked up (left beside the caches, or adopted from a run folder).
    `rebuild_broken` (`fasttl run --overwrite`): a cache found corrupt or built for something else
    is rebuilt instead of refused; `rebuild`: rebuilt whatever is found."""
    split = f"{split}-mirror" if mirror else split
    directory = cache_dir(backbone, source, split, extraction, device)
    options = dict(dtype=extraction.dtype, batch_size=batch_size, device=torch.device(device),
                   image_size=extraction.image_size, progress=progress, mirror=mirror, taps=extraction.taps,
                   engine=extraction.engine, precision=extraction.precision,
                   engine_dir=os.path.dirname(directory),
                   calibration=(extraction.calibration, calibration_images) if extraction.calibration else None)
    try:
        cache = FeatureCache.build(backbone, source, directory, overwrite=rebuild, **options)
    except CacheError:
        if not rebuild_broken:
            raise
        cache = FeatureCache.build(backbone, source, directory, overwrite=True, **options)
    return in_source_order(cache, source)


def in_source_order(cache: FeatureCache, source) -> FeatureCache:
    """The cache with row i holding the source's sample i. A cache is keyed by its content (the
    sorted sample list), so one built for the same samples listed in another order (two file
    lists, say) is reused: its rows are then put in this source's order, in memory, so that labels,
    sample ids, validation rows and teacher logits all line up with the source."""
    ids, samples = source.sample_ids(), cache.samples
    if list(samples) == list(ids) or len(samples) != len(ids) or set(samples) != set(ids):
        return cache  # in order already, or rows left out while it was built (--on-error skip)
    row = {sample: i for i, sample in enumerate(samples)}
    reordered = cache.subset([row[sample] for sample in ids])
    reordered.last_build = cache.last_build
    return reordered


class FeaturesInMemory:
    """The rows `cached_features` would store for a source, computed in memory and written
    nowhere: the same engine, precision and taps, the same batches, the same rounding to the
    cache dtype. Prediction uses it, so that a feature model predicts new images exactly as its
    run predicted the test split through the cache, without leaving a cache behind for every
    set of images it is shown."""

    def __init__(self, backbone, extraction: Extraction, device="cpu"):
        from fasttl.cache.extraction import extraction_engine

        self.device = torch.device(device)
        self.backbone, self.extraction = backbone, extraction
        engine, precision = extraction.resolved(self.device)
        self.engine = extraction_engine(backbone, self.device, engine, precision, extraction.taps,
                                        extraction.image_size, calibration=(extraction.calibration, None))
        self.feature_dim = backbone.tapped_dim(extraction.taps)

    def __call__(self, source, mirror: bool = False, batch_size: Optional[int] = None, progress=None,
                 refused: Optional[dict] = None) -> torch.Tensor:
        """float32 (len(source), feature_dim) on the device; `progress`: a tqdm bar to advance;
        `refused`: see extract_features."""
        from fasttl.cache.extraction import default_batch_size, extract_features
        from fasttl.cache.kernels import CACHE_DTYPES, gather
        from fasttl.data import TransformSpec

        spec = TransformSpec.for_backbone(self.backbone.preprocessing, size=self.extraction.image_size, mirror=mirror)
        stored, scales = extract_features(self.engine, source, spec, CACHE_DTYPES[self.extraction.dtype],
                                          self.feature_dim, batch_size or default_batch_size(self.device),
                                          self.device, progress=progress, refused=refused)
        return gather(stored, torch.arange(len(source), device=self.device), scales, torch.float32)


def refuse_writes_among_images(data_folders, also_written=()) -> None:
    """Folders fasttl writes beside a job (the feature caches, the caches' verification records,
    `also_written`: (what, path, fix) such as --tensorboard DIR) never go among the images of a
    data folder: their files would mix with them, and the next scan would read their folders as
    classes. `data_folders`: (option name, path) of each data the job reads (run, eval, extract)."""
    from fasttl.cache.format import state_dir
    from fasttl.transfer.datasets import NAMED
    from fasttl.util.files import is_inside

    written = [(f"the feature cache folder {settings.CACHE_DIR.name}", cache_root(), f"set {settings.CACHE_DIR.name}"),
               (f"the verification records' folder {settings.STATE_DIR.name}", state_dir(),
                f"set {settings.STATE_DIR.name}"), *also_written]
    for name, path in data_folders:
        if not isinstance(path, str) or path in NAMED or not os.path.isdir(os.path.expanduser(path)):
            continue
        for what, place, fix in written:
            if is_inside(place, path):
                raise OptionError(f"{name}: {what}={os.path.realpath(place)} is inside the data folder "
                                  f"{os.path.realpath(os.path.expanduser(path))}, where it would be written among "
                                  f"the images; {fix} to a folder outside the data")


def refuse_writes_among_sources(sources, also_written=()) -> None:
    """refuse_writes_among_images for loaded data: every folder holding one of `sources`' images
    (fasttl.data.sources.image_folders: a list's images may lie far from the list)."""
    from fasttl.data.sources import image_folders

    folders = sorted({folder for source in sources if source is not None  # the data option's folder: checked apart
                      for folder in image_folders(source, with_root=False)})
    refuse_writes_among_images([("data", folder) for folder in folders], also_written)


def refuse_settings_in_run_folders(out=None, tensorboard=None) -> None:
    """The feature cache and verification records' folders are never in a fasttl run folder (only
    its run writes there), nor in `out`, the run folder a job is about to make (a later run into it
    would find them among its files); nor do `out` or a --tensorboard DIR go into them (their files
    would lie among fasttl's own)."""
    from fasttl.cache.format import state_dir
    from fasttl.util.files import enclosing_run_folder, is_inside

    for setting, path in ((settings.CACHE_DIR, cache_root()), (settings.STATE_DIR, state_dir())):
        holder = enclosing_run_folder(path)
        if holder is None and out is not None and str(out).strip() and is_inside(path, out):
            raise OptionError(f"out: {absolute(out)} holds {setting.name}={path}, where "
                              f"fasttl keeps its own files, not a run's; give the run another --out, or set "
                              f"{setting.name} to a folder of its own")
        if holder is not None:
            raise OptionError(f"{setting.name}={path} is in the fasttl run folder {holder}, which only its run writes "
                              "into; set it to a folder of its own")
        for option, given in (("out", out), ("tensorboard", tensorboard)):
            if isinstance(given, (str, os.PathLike)) and str(given).strip() and is_inside(given, path):
                raise OptionError(f"{option}: {absolute(given)} is in {setting.name}={path}, where fasttl keeps its "
                                  f"own files; give --{option} a folder of its own")

