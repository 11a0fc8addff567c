"""How a frozen backbone's features are computed for a cache: the engine (PyTorch, or an ONNX
graph checked on real images of the data), the batches, and pooling into the cache dtype. Building
(build.py) and prediction (FeaturesInMemory) share it, so both round features the same way."""
from __future__ import annotations

from typing import Optional

import torch

from fasttl.cache import engines
from fasttl.cache.store import CacheError
from fasttl.cache.kernels import pool_store
from fasttl.data import ImageLoader


def compute_settings(device: torch.device, engine: str = "auto", precision: str = "auto",
                     calibration: Optional[str] = None) -> dict:
    """How the backbone runs during extraction (engine and precision resolved); part of the
    fingerprint, since it changes the bits. `calibration` (int8): the key of a sample of another
    source the graph was calibrated on (calibration_sample's); without it the sample is the
    source's own, whose identity the fingerprint holds already."""
    engine, precision = engines.resolve(engine, precision, device)
    settings = {"device": device.type, "engine": engine, "precision": precision, "memory_format": "channels_last",
                "batchnorm": "folded"}
    if precision == "int8":
        from fasttl.cache import quantize

        settings["calibration"] = quantize.settings()
        if calibration is not None:
            settings["calibration"]["sample"] = calibration
    return settings


def extraction_model(backbone, device: torch.device):
    """The copy of `backbone` extraction runs: frozen, batch norms folded into the convolutions,
    channels_last (oneDNN's convolutions run about 1.5x faster on NHWC on this class of CPU,
    the folding 1.25x more)."""
    return backbone.for_extraction().to(device, memory_format=torch.channels_last)


def extraction_engine(backbone, device: torch.device, engine: str, precision: str, taps: int, image_size: int,
                      engine_dir: Optional[str] = None, verify_images: Optional[torch.Tensor] = None,
                      calibration: Optional[tuple] = None):
    """The engine (resolved: see engines.resolve) over the extraction copy of `backbone`; an
    exported ONNX graph is kept in `engine_dir` when given, and checked on `verify_images`.
    `calibration` (int8): (what names the sample, its images), from calibration_sample."""
    key, images = calibration if precision == "int8" and calibration else (None, None)
    name = engines.onnx_file_name(backbone, taps, image_size, key) if engine == "onnxruntime" else None
    model = extraction_model(backbone, device)
    return engines.create(engine, precision, model, taps, device, image_size, name, engine_dir, verify_images,
                          images)


VERIFY_IMAGES = 4  # real images of the data an ONNX graph is checked on before it extracts


def verification_images(source, spec, count: int = VERIFY_IMAGES) -> torch.Tensor:
    """The first `count` images of `source`, preprocessed as extraction will preprocess them (an
    int8 graph without its calibration images at hand is checked on engines.INT8_CHECK_ROWS)."""
    return _images(source, range(min(count, len(source))), spec)


def calibration_key(source, spec) -> str:
    """What names the seeded sample of `source` an int8 graph's activation ranges come from: the
    source's content, the rows drawn, the preprocessing and the quantizer's settings (no image is
    read)."""
    import hashlib
    import json

    from fasttl.cache import quantize

    rows = quantize.calibration_rows(len(source))
    return hashlib.sha256(json.dumps([source.identity(), rows, spec.as_dict(), quantize.settings()],
                                     sort_keys=True).encode()).hexdigest()


def calibration_sample(source, spec) -> tuple:
    """(key, images): calibration_key's sample of `source`, preprocessed as extraction preprocesses
    them."""
    return calibration_key(source, spec), calibration_images(source, spec)


def calibration_images(source, spec) -> torch.Tensor:
    """The seeded sample of `source` an int8 graph calibrates on, preprocessed by `spec`."""
    from fasttl.cache import quantize

    return _images(source, quantize.calibration_rows(len(source)), spec)


def _images(source, rows, spec) -> torch.Tensor:
    rows = list(rows)
    return torch.cat([x for x, _ in ImageLoader(source.subset(rows), spec, max(len(rows), 1), backend="torch")])


def default_batch_size(device: torch.device) -> int:
    return 128 if device.type == "cuda" else 32


def store_maps(maps, cache: torch.Tensor, rows: torch.Tensor, scales: Optional[torch.Tensor]) -> None:
    """Pools each map (N, C_k, H_k, W_k), or takes pooled (N, C_k) as it is, and stores their
    concatenation in cache[rows]: one map straight into the cache; several each into an fp32
    block of a row buffer first, so an int8 row gets one scale for the whole vector."""
    if len(maps) == 1:
        pool_store(maps[0], cache, rows, scales)
        return
    n = maps[0].shape[0]
    pooled = torch.empty((n, sum(m.shape[1] for m in maps)), dtype=torch.float32, device=cache.device)
    local = torch.arange(n, device=cache.device)
    column = 0
    for feature_map in maps:
        block = torch.empty((n, feature_map.shape[1]), dtype=torch.float32, device=cache.device)
        pool_store(feature_map, block, local)
        pooled[:, column:column + block.shape[1]] = block
        column += block.shape[1]
    pool_store(pooled, cache, rows, scales)


def _refuse_non_finite(maps, source, rows: torch.Tensor) -> None:
    """A backbone's NaN or infinity is never stored: fp32 and bf16 would keep it and int8 would
    quantize the row to zeros, and training would later blame its learning rate."""
    finite = torch.stack([torch.isfinite(m.reshape(len(m), -1)).all(dim=1) for m in maps]).all(dim=0)
    if not bool(finite.all()):  # one host sync a batch, whatever the number of maps
        row = int(rows[int((~finite).nonzero()[0])])
        raise CacheError(f"features: the backbone's features of {source.name_of(row)} are not finite (NaN or "
                         "infinite): a damaged backbone or weights file; nothing of its batch was stored")


def _through_engine(engine, images, source, first: int, refused: Optional[dict]):
    """(engine(images), the source rows they are): with `refused` (a dict), an image the engine
    refuses for itself (an int8 graph can't represent it) is left out of the batch and listed
    (its row -> the refusal naming it), the rest run; else the refusal names the image."""
    rows = torch.arange(first, first + len(images))
    while True:
        try:
            return engine(images if len(rows) == len(images) else images[rows - first]), rows
        except engines.BatchError as exc:
            row = int(rows[exc.row])
            if refused is None or not exc.per_image:
                raise exc.naming(source.name_of(row)) from None
            refused[row] = exc.before + exc.after  # the reason; the caller names the image
            rows = rows[rows != row]
            if not len(rows):
                return None, rows


@torch.no_grad()
def extract_features(engine, source, spec, dtype: torch.dtype, feature_dim: int, batch_size: int,
                     device: torch.device, backend: str = "auto", progress=None, refused: Optional[dict] = None):
    """(features (len(source), feature_dim) in the cache dtype, per-row scales for int8 or None),
    on `device`: every image of `source` through `engine`, pooled and stored in order.
    `progress`: a tqdm bar to advance. `refused` (a dict): images the engine refuses for
    themselves are listed there (row -> message) and their rows left zero, instead of an error."""
    rows = len(source)
    features = (torch.empty if refused is None else torch.zeros)((rows, feature_dim), dtype=dtype, device=device)
    scales = torch.ones(rows, dtype=torch.float32, device=device) if dtype == torch.int8 else None
    written = 0
    for images, _ in ImageLoader(source, spec, batch_size, backend=backend, device=device):
        n = images.shape[0]
        maps, kept = _through_engine(engine, images, source, written, refused)
        if maps is not None:
            kept = kept.to(device)
            _refuse_non_finite(maps, source, kept)
            store_maps(maps, features, kept, scales)
        written += n
        if progress is not None:
            progress.update(n)
    return features, scales
