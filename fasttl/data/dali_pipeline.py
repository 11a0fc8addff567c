"""NVIDIA DALI pipelines: decode on the GPU (nvJPEG, the "mixed" device) where there is one, DALI's
CPU operators (device_id=None) where there is not; then the resize, crop, flip and normalize of
fasttl.data.spec, in the backbone's layout (NCHW)."""
from __future__ import annotations

import importlib.util
from typing import List, Optional

import numpy as np

from fasttl.data.sources import ArraySource, DataError, FileSource, TarSource, bytes_problem, skip_hint
from fasttl.data.spec import TransformSpec


def dali_available() -> bool:
    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except ModuleNotFoundError:  # no `nvidia` namespace package at all
        return False


def _augment(fn, types, images, spec: TransformSpec, on_gpu: bool):
    """The shared tail of both pipelines: HWC uint8 images in, normalized CHW float out."""
    if spec.train:
        images = fn.random_resized_crop(images, size=(spec.size, spec.size), random_area=[0.08, 1.0],
                                        random_aspect_ratio=[3 / 4, 4 / 3], interp_type=types.INTERP_LINEAR,
                                        antialias=True, seed=spec.seed)
        mirror = fn.random.coin_flip(probability=0.5, seed=spec.seed + 1)
    else:
        images = fn.resize(images, resize_shorter=spec.resize_shorter, interp_type=types.INTERP_LINEAR,
                           antialias=True)
        mirror = 1 if spec.mirror else 0
    return fn.crop_mirror_normalize(images, crop=(spec.size, spec.size), crop_pos_x=0.5, crop_pos_y=0.5,
                                    mean=spec.mean_255, std=spec.std_255, mirror=mirror, dtype=types.FLOAT,
                                    output_layout="CHW")


def file_pipeline(source: FileSource, spec: TransformSpec, batch_size: int, shard_id: int, num_shards: int,
                  device_id: Optional[int], num_threads: int):
    """Outputs (images, sample indices): the reader's "labels" are indices into source.files, kept
    on the CPU, so the loader maps them to labels and knows which files a batch held. Every file
    must have passed sources.header_problem: DALI's parser crashes on the files it rejects."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=spec.seed,
                  prefetch_queue_depth=2)
    def pipeline():
        jpegs, indices = fn.readers.file(files=list(source.files), labels=list(range(len(source.files))),
                                         shard_id=shard_id, num_shards=num_shards, random_shuffle=spec.train,
                                         seed=spec.seed, pad_last_batch=True, stick_to_shard=True, name="Reader")
        on_gpu = device_id is not None
        # EXIF orientation honoured (DALI's default, said explicitly: torch_pipeline.decode matches it).
        images = fn.decoders.image(jpegs, device="mixed" if on_gpu else "cpu", output_type=types.RGB,
                                   adjust_orientation=True)
        return _augment(fn, types, images, spec, on_gpu), indices

    return pipeline()


class ShardBatches:
    """Batches of one shard of an ArraySource for DALI's external_source: contiguous shard
    ranges (as DALI's readers cut them), shuffled per epoch in train mode, last batch partial."""

    def __init__(self, source: ArraySource, batch_size: int, shard_id: int, num_shards: int, train: bool, seed: int):
        n = len(source)
        begin, end = n * shard_id // num_shards, n * (shard_id + 1) // num_shards
        self.source, self.indices = source, np.arange(begin, end)
        self.batch_size, self.train, self.seed, self.epoch = batch_size, train, seed, 0
        self.order: List[int] = []
        self.position = 0

    def __iter__(self):
        self.order = (np.random.default_rng([self.seed, self.epoch]).permutation(self.indices)
                      if self.train else self.indices)
        self.position = 0
        self.epoch += 1
        return self

    def __next__(self):
        if self.position >= len(self.order):
            raise StopIteration
        idx = self.order[self.position:self.position + self.batch_size]
        self.position += len(idx)
        images = [np.ascontiguousarray(self.source.images[i]) for i in idx]
        labels = [np.asarray([self.source.labels[i]], dtype=np.int64) for i in idx]
        return images, labels


def array_pipeline(batches: ShardBatches, spec: TransformSpec, batch_size: int, device_id: Optional[int],
                   num_threads: int):
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=spec.seed)
    def pipeline():
        images, labels = fn.external_source(source=batches, num_outputs=2, layout=["HWC", ""],
                                            dtype=[types.UINT8, types.INT64], device="cpu")
        on_gpu = device_id is not None
        if on_gpu:
            images = images.gpu()
        return _augment(fn, types, images, spec, on_gpu), labels.gpu() if on_gpu else labels

    return pipeline()


class EncodedBatches:
    """Batches of one shard of a TarSource (WebDataset) for DALI's external_source: each image's
    encoded bytes, read from its tar at the indexed offset, with its sample index. Every image's
    header is checked first (DALI's decoder crashes on what its parser rejects); a bad one ends
    the epoch and is kept in `error`, which the loader raises, naming the sample.

    fasttl reads the tars itself rather than through fn.readers.webdataset: the index it made
    decides which samples are in the source (a screened source leaves some out) and keeps each
    row's sample id, which DALI's reader does not report."""

    def __init__(self, source: TarSource, batch_size: int, shard_id: int, num_shards: int, train: bool, seed: int):
        n = len(source)
        begin, end = n * shard_id // num_shards, n * (shard_id + 1) // num_shards
        self.source, self.indices = source, np.arange(begin, end)
        self.batch_size, self.train, self.seed, self.epoch = batch_size, train, seed, 0
        self.order, self.position, self.error = [], 0, None

    def __iter__(self):
        self.order = (np.random.default_rng([self.seed, self.epoch]).permutation(self.indices)
                      if self.train else self.indices)
        self.position, self.error = 0, None
        self.epoch += 1
        return self

    def __next__(self):
        if self.position >= len(self.order) or self.error is not None:
            raise StopIteration
        idx = self.order[self.position:self.position + self.batch_size]
        images = []
        for i in idx:
            data = self.source.read(int(i))
            problem = bytes_problem(data)
            if problem is not None:
                name = self.source.sample_ids()[int(i)]
                self.error = DataError(f"{name}: cannot be read as an image ({problem}); {skip_hint()}")
                raise StopIteration
            images.append(np.frombuffer(data, dtype=np.uint8))
        self.position += len(idx)
        return images, [np.asarray([i], dtype=np.int64) for i in idx]


def encoded_pipeline(batches: EncodedBatches, spec: TransformSpec, batch_size: int, device_id: Optional[int],
                     num_threads: int):
    """Outputs (images, sample indices) from encoded images (EncodedBatches): decoded by DALI,
    on the GPU ("mixed") where there is one."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=spec.seed)
    def pipeline():
        encoded, indices = fn.external_source(source=batches, num_outputs=2, dtype=[types.UINT8, types.INT64],
                                              device="cpu")
        on_gpu = device_id is not None
        images = fn.decoders.image(encoded, device="mixed" if on_gpu else "cpu", output_type=types.RGB,
                                   adjust_orientation=True)
        return _augment(fn, types, images, spec, on_gpu), indices

    return pipeline()
