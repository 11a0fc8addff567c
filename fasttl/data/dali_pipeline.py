"""NVIDIA DALI pipelines: decode on the GPU (nvJPEG, the "mixed" device) where there is one, DALI's
CPU operators (device_id=None) where there is not; then the resize, crop, flip and normalize of
fasttl.data.spec, in the backbone's layout (NCHW)."""
from __future__ import annotations

import errno

import importlib.util
from typing import List, Optional

import numpy as np

from fasttl.data.images import bytes_problem, read_problem, skip_hint, unreadable
from fasttl.util.errors import DataError
from fasttl.data.spec import TransformSpec


def dali_available() -> bool:
    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except ModuleNotFoundError:  # no `nvidia` namespace package at all
        return False


def dali_module(name: str):
    """The DALI module `name` (nvidia.dali, nvidia.dali.plugin.pytorch). DALI loads its plugin
    libraries as it is imported: a process out of file descriptors (ulimit -n) gets an ImportError
    from it, raised here as the OS's EMFILE, which the CLI says in one line."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError as exc:
        if "Too many open files" in str(exc):
            raise OSError(errno.EMFILE, "Too many open files") from None
        raise


def _augment(fn, types, images, spec: TransformSpec, on_gpu: bool):
    """The shared tail of both pipelines: HWC uint8 images in, normalized CHW float out."""
    if spec.train:
        images = fn.random_resized_crop(images, size=(spec.size, spec.size), random_area=[0.08, 1.0],
                                        random_aspect_ratio=[3 / 4, 4 / 3], interp_type=types.INTERP_LINEAR,
                                        antialias=True, seed=spec.seed % 2**31)
        mirror = fn.random.coin_flip(probability=0.5, seed=(spec.seed + 1) % 2**31)
    else:
        # float out: rounding the resized pixels to uint8 (DALI's default, the input's type) moves
        # features by ~3% (EfficientNet-Lite is that sensitive to +-1 grey level); the PyTorch
        # path resamples as DALI does (torch_pipeline._resampling), so both give the same pixels.
        # subpixel_scale=False: the longer side's scale is in/out of its rounded size, as the PyTorch
        # path's (DALI would otherwise keep the shorter side's exact scale and shift the window).
        images = fn.resize(images, resize_shorter=spec.resize_shorter, interp_type=types.INTERP_LINEAR,
                           antialias=True, dtype=types.FLOAT, subpixel_scale=False)
        mirror = 1 if spec.mirror else 0
    return fn.crop_mirror_normalize(images, crop=(spec.size, spec.size), crop_pos_x=0.5, crop_pos_y=0.5,
                                    mean=spec.mean_255, std=spec.std_255, mirror=mirror, dtype=types.FLOAT,
                                    output_layout="CHW")


class SampleBatches:
    """The batches of one epoch for DALI's external_source, in the loader's order (the same
    samples, in the same order, as the PyTorch path): each sample's encoded bytes (files, tars) or
    pixels (arrays), with its source index. What can't be read ends the epoch and is kept in
    `error`, which the loader raises, named; every image's header is checked first, because
    DALI's decoder crashes the process on what its parser rejects. `in_flight`: the indices handed
    to DALI and not yet known to be decoded (what a decode error is looked for in)."""

    def __init__(self, source, indices: List[int], batch_size: int):
        self.source, self.indices, self.batch_size = source, list(indices), batch_size
        self.position, self.error, self.in_flight = 0, None, []

    def __iter__(self):
        self.position, self.error, self.in_flight = 0, None, []
        return self

    def __next__(self):
        if self.position >= len(self.indices) or self.error is not None:
            raise StopIteration
        idx = self.indices[self.position:self.position + self.batch_size]
        try:
            samples = [self._sample(i) for i in idx]
        except DataError as error:
            self.error = error
            raise StopIteration from None
        self.position += len(idx)
        self.in_flight = (self.in_flight + idx)[-3 * self.batch_size:]  # the prefetch queue's depth and one
        return samples, [np.asarray([i], dtype=np.int64) for i in idx]

    def _sample(self, i: int) -> np.ndarray:
        if not self.source.encoded:
            return np.ascontiguousarray(self.source.images[i])
        name = self.source.name_of(i)
        try:
            data = self.source.read(i)
        except OSError as exc:
            problem = read_problem(self.source.where(i)[0], exc)
            raise DataError(f"{name}: {problem}; {skip_hint(problem)}") from None
        problem = bytes_problem(data)
        if problem is not None:
            raise DataError(f"{unreadable(name, problem)}; {skip_hint(problem)}")
        return np.frombuffer(data, dtype=np.uint8)


def sample_pipeline(batches: SampleBatches, spec: TransformSpec, batch_size: int, device_id: Optional[int],
                    num_threads: int, seed: int):
    """Outputs (images, sample indices) from SampleBatches: decoded by DALI ("mixed": on the GPU
    where there is one), or pixels as they are (an ArraySource), then the spec's transform."""
    dali = dali_module("nvidia.dali")
    fn, pipeline_def, types = dali.fn, dali.pipeline_def, dali.types

    encoded = batches.source.encoded

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed % 2**31,
                  prefetch_queue_depth=2)
    def pipeline():
        on_gpu = device_id is not None
        if encoded:
            data, indices = fn.external_source(source=batches, num_outputs=2, dtype=[types.UINT8, types.INT64],
                                               device="cpu")
            # EXIF orientation honoured (DALI's default, said explicitly: torch_pipeline.decode matches it).
            images = fn.decoders.image(data, device="mixed" if on_gpu else "cpu", output_type=types.RGB,
                                       adjust_orientation=True)
        else:
            images, indices = fn.external_source(source=batches, num_outputs=2, layout=["HWC", ""],
                                                 dtype=[types.UINT8, types.INT64], device="cpu")
            images = images.gpu() if on_gpu else images
        return _augment(fn, types, images, spec, on_gpu), indices

    return pipeline()
