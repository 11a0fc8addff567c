"""ImageLoader: (images, labels) batches from any source through DALI or the PyTorch fallback."""
from __future__ import annotations

import dataclasses
import errno
import os
import re
from typing import Iterator, Optional, Tuple, Union

import numpy as np
import torch

from fasttl.data import dali_pipeline
from fasttl.data.images import check_image, skip_hint
from fasttl.data.sources import ArraySource, FileSource, TarSource, first_bad_image
from fasttl.util.errors import DataError
from fasttl.data.order import epoch_order, shard_length
from fasttl.data.spec import TransformSpec
from fasttl.data.torch_pipeline import Collate, TorchImageDataset
from fasttl.util.checks import a_flag, order_number, plain_number, positive_int

MAX_SHARDS = 1 << 20  # processes of one job: far past any cluster, within the order's int64 arithmetic

Source = Union[FileSource, ArraySource, TarSource]
BACKENDS = ("auto", "dali", "torch")


class ImageLoader:
    """Yields ``(images, labels)``: images (N, 3, size, size) float32 or bfloat16, normalized for
    the backbone; labels int64 (N,). On the GPU when ``device`` is cuda (DALI then decodes there).

    A stand-in for ``DataLoader(dataset, sampler=DistributedSampler(...))``, on either backend:

    * ``backend``: ``"dali"``, ``"torch"`` (PIL + torch ops) or ``"auto"`` (DALI when installed).
      Both yield the same samples in the same order, and in evaluation the same pixels; training's
      random crops and flips come from each backend's own random generator.
    * ``train``: random resized crop + flip (``spec.train``); else resize + center crop.
    * ``shuffle`` (default: ``spec.train``): each epoch a permutation of the whole source seeded
      with ``seed + epoch`` (``seed`` defaults to ``spec.seed``); ``set_epoch(k)`` selects epoch
      k's order (and augmentation) without running the epochs before it. Each ``for`` over the
      loader is one epoch, and the next one follows unless ``set_epoch`` says otherwise.
    * ``shard_id`` / ``num_shards``: the shard of a distributed job, as ``DistributedSampler``
      cuts it: every ``num_shards``-th sample of the epoch's order from ``shard_id``, so the
      shards are disjoint and together cover every sample each epoch. ``drop_last=False`` pads
      the order with its first samples to a multiple of ``num_shards`` and keeps the last partial
      batch; ``drop_last=True`` cuts the order to a multiple and drops the last partial batch.
    * ``num_workers`` (``num_threads``): decode workers (default 2); ``pin_memory``: page-locked
      host batches on the PyTorch path where CUDA is available (as DataLoader's).
    """

    def __init__(self, source: Source, spec: TransformSpec, batch_size: int = 64, *, backend: str = "auto",
                 shard_id: int = 0, num_shards: int = 1, device: Union[str, torch.device] = "cpu",
                 dtype: torch.dtype = torch.float32, num_threads: Optional[int] = None, shuffle: Optional[bool] = None,
                 drop_last: bool = False, seed: Optional[int] = None, num_workers: Optional[int] = None,
                 pin_memory: bool = False):
        if backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
        if not isinstance(spec, TransformSpec):
            raise TypeError(f"spec: expected a fasttl.data.TransformSpec (TransformSpec.for_backbone(backbone."
                            f"preprocessing)), got {type(spec).__name__}")
        batch_size = positive_int("batch_size", plain_number(batch_size))
        num_shards, shard_id = positive_int("num_shards", plain_number(num_shards)), plain_number(shard_id)
        if num_shards > MAX_SHARDS:
            raise ValueError(f"num_shards: expected at most {MAX_SHARDS:,} (one per process of a job), got "
                             f"{num_shards}")
        if isinstance(shard_id, bool) or not isinstance(shard_id, int) or not 0 <= shard_id < num_shards:
            raise ValueError(f"shard_id: expected an integer in [0, num_shards={num_shards}), got {shard_id!r}")
        if dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"dtype: expected torch.float32 or torch.bfloat16, got {dtype}")
        if num_threads is not None and num_workers is not None and num_threads != num_workers:
            raise ValueError(f"num_workers: {num_workers} differs from num_threads={num_threads} (the same "
                             "setting under two names; pass one)")
        num_workers, num_threads = plain_number(num_workers), plain_number(num_threads)
        workers = num_workers if num_workers is not None else num_threads if num_threads is not None else 2
        if not isinstance(workers, int) or isinstance(workers, bool) or workers < 0:
            raise ValueError(f"num_workers: expected an integer >= 0, got {workers!r}")
        shuffle, drop_last, pin_memory = (None if value is None else a_flag(name, value) for name, value in
                                          (("shuffle", shuffle), ("drop_last", drop_last), ("pin_memory", pin_memory)))
        seed = None if seed is None else order_number("seed", seed, 64)  # the order's generator reads it mod 2**64
        if len(source) == 0:
            raise DataError("data: the source holds no samples")
        self.source, self.spec, self.batch_size = source, spec, batch_size
        self.shard_id, self.num_shards = shard_id, num_shards
        self.device, self.dtype, self.num_threads = torch.device(device), dtype, max(workers, 1)
        self.shuffle = spec.train if shuffle is None else shuffle
        self.seed = spec.seed if seed is None else seed
        self.drop_last, self.pin_memory = drop_last, pin_memory
        if backend == "auto":
            backend = "dali" if dali_pipeline.dali_available() else "torch"
        if backend == "dali" and not dali_pipeline.dali_available():
            raise RuntimeError("backend='dali' but NVIDIA DALI is not installed: pip install nvidia-dali-cuda120, "
                               "or use backend='torch'")
        self.backend = backend
        self.num_samples = shard_length(len(source), num_shards, drop_last)
        self.epoch = 0
        self._torch_loader = None  # the PyTorch path's DataLoader, kept across epochs

    def __len__(self) -> int:
        full, partial = divmod(self.num_samples, self.batch_size)
        return full + (1 if partial and not self.drop_last else 0)

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next ``for`` over the loader runs: its order and its augmentation."""
        self.epoch = order_number("epoch", epoch, 63)  # as FeatureCache.loader's: refused, never folded

    def epoch_indices(self, epoch: Optional[int] = None) -> torch.Tensor:
        """The source indices this shard yields in `epoch` (default: the next one), in order."""
        epoch = self.epoch if epoch is None else order_number("epoch", epoch, 63)  # as set_epoch: never folded
        order = epoch_order(len(self.source), epoch=epoch, seed=self.seed,
                            shuffle=self.shuffle, shard_id=self.shard_id, num_shards=self.num_shards,
                            drop_last=self.drop_last)
        return order[:len(self) * self.batch_size] if self.drop_last else order

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        epoch = self.epoch
        indices = self.epoch_indices(epoch).tolist()
        # The augmentation of an epoch is its own: seeded by the epoch as the order is.
        spec = dataclasses.replace(self.spec, seed=self.spec.seed * 1_000_003 + epoch) if self.spec.train else self.spec
        self.epoch = epoch + 1
        if not indices:  # drop_last with fewer samples than a batch: an empty epoch, as DataLoader's
            return
        batches = self._iter_dali(indices, spec) if self.backend == "dali" else self._iter_torch(indices, spec)
        for images, labels in batches:
            yield images.to(self.device, self.dtype, non_blocking=True), labels.to(self.device, torch.int64)

    # -- PyTorch fallback ------------------------------------------------------------------
    def _iter_torch(self, indices, spec: TransformSpec):
        batches = [[(i, spec.seed) for i in indices[k:k + self.batch_size]]
                   for k in range(0, len(indices), self.batch_size)]
        # Worker processes decode in parallel, as DALI's threads do; not worth starting for a few
        # batches. They persist across epochs (each epoch's order and seed travel with the indices).
        workers = self.num_threads if len(batches) >= 8 and self.num_threads > 1 else 0
        if self._torch_loader is None or self._torch_loader.num_workers != workers:
            self._batches = _EpochBatches()
            self._torch_loader = torch.utils.data.DataLoader(
                TorchImageDataset(self.source, self.spec), batch_sampler=self._batches, num_workers=workers,
                collate_fn=Collate(self.spec), pin_memory=self.pin_memory and torch.cuda.is_available(),
                persistent_workers=workers > 0)
        self._batches.batches = batches
        try:
            yield from self._torch_loader
        except DataError as exc:
            self._torch_loader = None  # its workers may be half way through an epoch: start afresh
            # A worker's error comes back wrapped in its traceback text: keep the one-line message.
            lines = [line for line in str(exc).splitlines() if "DataError: " in line]
            if not lines:
                raise
            raise DataError(lines[-1].split("DataError: ", 1)[1]) from None
        except BaseException:
            self._torch_loader = None
            raise

    # -- DALI ------------------------------------------------------------------------------
    def _iter_dali(self, indices, spec: TransformSpec):
        plugin = dali_pipeline.dali_module("nvidia.dali.plugin.pytorch")
        DALIGenericIterator, LastBatchPolicy = plugin.DALIGenericIterator, plugin.LastBatchPolicy  # noqa: N806

        device_id = (self.device.index or 0) if self.device.type == "cuda" else None
        # A batch is never larger than the epoch (a --batch-size of 2**31 would not fit DALI's int).
        batch_size = min(self.batch_size, max(1, len(indices)))
        batches = dali_pipeline.SampleBatches(self.source, indices, batch_size)
        label_of = torch.as_tensor(np.asarray(self.source.labels), dtype=torch.int64)
        try:
            # A pipeline per epoch, fed in this epoch's order: DALI's own readers shard and shuffle
            # in their own way, and a pipeline that prefetches across epochs could not honour set_epoch.
            pipe = dali_pipeline.sample_pipeline(batches, spec, batch_size, device_id, self.num_threads,
                                                 seed=spec.seed)
            pipe.build()
            iterator = DALIGenericIterator(pipe, ["images", "indices"], size=-1, auto_reset=False,
                                           last_batch_policy=LastBatchPolicy.PARTIAL)
            for batch in iterator:
                yield batch[0]["images"], label_of[batch[0]["indices"].reshape(-1).cpu()]
        except RuntimeError as exc:
            if batches.error is not None:  # the first batch could not be read: DALI saw no data at all
                raise batches.error from None
            raise self._explain_dali_error(exc, batches) from exc
        if batches.error is not None:
            raise batches.error

    def _explain_dali_error(self, exc: Exception, batches) -> Exception:
        """A DataError naming the file DALI could not decode: from DALI's message when it names a
        file of the source, else the first of the images in flight that PIL cannot decode either;
        memory that ran out is said so, with the images in flight."""
        text = str(exc)
        first_line = next((line for line in text.splitlines() if line.strip()), type(exc).__name__)
        pending = [self.source.name_of(i) for i in batches.in_flight]
        if re.search(r"too many open files|EMFILE|ENFILE", text, re.IGNORECASE) or _few_files_left():
            return OSError(errno.EMFILE, "Too many open files")  # the machine's limit: the CLI says raise ulimit -n
        if re.search(r"out of memory|bad_alloc|Cannot allocate|OOM", text, re.IGNORECASE):
            where = f"{pending[0]} or one of {len(pending) - 1} images beside it" if pending else "an image"
            return DataError(f"{where}: decoding ran out of memory (an image larger than it looks, or too large a "
                             "batch: lower --batch-size, or screen the data with --on-error skip)")
        if not isinstance(self.source, FileSource) or "decod" not in text or not pending:  # PIL re-checks files
            return RuntimeError(f"DALI pipeline failed: {first_line.strip()} (FASTTL_DEBUG=1 shows DALI's message; "
                                "backend='torch' avoids DALI)")
        named = set(re.findall(r"Failed to decode sample\s*#?\d*\s*:\s*(\S.*?)\s*$", text, re.MULTILINE))
        for path in pending:
            if path in named:
                problem = check_image(path) or "DALI cannot decode it; PIL can"
                return DataError(f"{path}: cannot be decoded ({problem}); {skip_hint()}")
        bad = first_bad_image(pending, num_threads=self.num_threads)
        if bad is not None:
            return DataError(f"{bad[0]}: cannot be decoded ({bad[1]}); {skip_hint()}")
        where = self.source.root or "the source"
        return DataError(f"data: DALI could not decode one of {len(pending)} images of {where} "
                         f"that PIL decodes ({' '.join(text.split())[-300:]}); use backend='torch'")


def _few_files_left(margin: int = 8) -> bool:
    """Whether this process is within `margin` descriptors of its open-file limit (DALI then fails
    to load its decoder's modules and says only that its pipeline is no longer valid)."""
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        return soft != resource.RLIM_INFINITY and len(os.listdir("/proc/self/fd")) >= soft - margin
    except (ImportError, OSError, ValueError):
        return False


class _EpochBatches:
    """The PyTorch path's batch sampler: the current epoch's batches of (index, seed) keys."""

    def __init__(self):
        self.batches = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def make_loader(source: Source, preprocessing, batch_size: int = 64, *, train: bool = False, seed: int = 0,
                image_size: Optional[int] = None, **kwargs) -> ImageLoader:
    """An ImageLoader with a backbone's preprocessing (fasttl.backbones.Preprocessing); the
    keywords are ImageLoader's (shuffle, drop_last, shard_id, num_shards, num_workers, ...); `seed`
    seeds the order and the augmentation."""
    seed = order_number("seed", seed, 64)
    train = a_flag("train", train)  # "no" would be taken as True: augmentation on
    spec = TransformSpec.for_backbone(preprocessing, train=train, seed=seed, size=image_size)
    return ImageLoader(source, spec, batch_size, **kwargs)
