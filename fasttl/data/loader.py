"""ImageLoader: (images, labels) batches from any source through DALI or the PyTorch fallback."""
from __future__ import annotations

import math
from typing import Iterator, Optional, Tuple, Union

import torch

from fasttl.data import dali_pipeline
from fasttl.data.sources import ArraySource, DataError, FileSource, check_image
from fasttl.data.spec import TransformSpec
from fasttl.data.torch_pipeline import TorchImageDataset

Source = Union[FileSource, ArraySource]
_BACKENDS = ("auto", "dali", "torch")


class ImageLoader:
    """Yields ``(images, labels)``: images (N, 3, size, size) float32 or bfloat16, normalized for
    the backbone; labels int64 (N,). On the GPU when ``device`` is cuda (DALI then decodes there).

    * ``backend``: ``"dali"``, ``"torch"`` (PIL + torch ops) or ``"auto"`` (DALI when installed).
    * ``train``: random resized crop + flip, shuffled each epoch (seeded); else resize + center
      crop, in order, every sample of the shard exactly once, last partial batch kept.
    * ``shard_id`` / ``num_shards``: contiguous shards for distributed jobs (as DALI's readers).
    """

    def __init__(self, source: Source, spec: TransformSpec, batch_size: int = 64, *, backend: str = "auto",
                 shard_id: int = 0, num_shards: int = 1, device: Union[str, torch.device] = "cpu",
                 dtype: torch.dtype = torch.float32, num_threads: int = 2):
        if backend not in _BACKENDS:
            raise ValueError(f"backend: expected one of {_BACKENDS}, got {backend!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
        if not 0 <= shard_id < num_shards:
            raise ValueError(f"shard_id: expected 0 <= shard_id < num_shards={num_shards}, got {shard_id}")
        if dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"dtype: expected torch.float32 or torch.bfloat16, got {dtype}")
        if len(source) == 0:
            raise DataError("data: the source holds no samples")
        self.source, self.spec, self.batch_size = source, spec, batch_size
        self.shard_id, self.num_shards = shard_id, num_shards
        self.device, self.dtype, self.num_threads = torch.device(device), dtype, num_threads
        if backend == "auto":
            backend = "dali" if dali_pipeline.dali_available() else "torch"
        if backend == "dali" and not dali_pipeline.dali_available():
            raise RuntimeError("backend='dali' but NVIDIA DALI is not installed: pip install nvidia-dali-cuda120, "
                               "or use backend='torch'")
        self.backend = backend
        n = len(source)
        self.num_samples = n * (shard_id + 1) // num_shards - n * shard_id // num_shards
        self._epoch = 0
        self._dali_iterator = None

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self._epoch = epoch

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        batches = self._iter_dali() if self.backend == "dali" else self._iter_torch()
        for images, labels in batches:
            yield images.to(self.device, self.dtype, non_blocking=True), labels.to(self.device, torch.int64)
        self._epoch += 1

    # -- PyTorch fallback ------------------------------------------------------------------
    def _iter_torch(self):
        n = len(self.source)
        indices = list(range(n * self.shard_id // self.num_shards, n * (self.shard_id + 1) // self.num_shards))
        if self.spec.train:
            generator = torch.Generator().manual_seed(self.spec.seed * 100_003 + self._epoch)
            indices = [indices[i] for i in torch.randperm(len(indices), generator=generator).tolist()]
        dataset = TorchImageDataset(self.source, self.spec)
        dataset.epoch = self._epoch
        # Worker processes decode in parallel, as DALI's threads do; not worth starting for a few batches.
        workers = self.num_threads if len(indices) >= 8 * self.batch_size and self.num_threads > 1 else 0
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=self.batch_size,
                                             shuffle=False, num_workers=workers)
        yield from loader

    # -- DALI ------------------------------------------------------------------------------
    def _build_dali(self):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        device_id = (self.device.index or 0) if self.device.type == "cuda" else None
        if isinstance(self.source, FileSource):
            pipe = dali_pipeline.file_pipeline(self.source, self.spec, self.batch_size, self.shard_id,
                                               self.num_shards, device_id, self.num_threads)
            kwargs = dict(reader_name="Reader")
        else:
            batches = dali_pipeline.ShardBatches(self.source, self.batch_size, self.shard_id, self.num_shards,
                                                 self.spec.train, self.spec.seed)
            pipe = dali_pipeline.array_pipeline(batches, self.spec, self.batch_size, device_id, self.num_threads)
            kwargs = dict(size=-1)
        pipe.build()
        return DALIGenericIterator(pipe, ["images", "labels"], last_batch_policy=LastBatchPolicy.PARTIAL,
                                   auto_reset=True, **kwargs)

    def _iter_dali(self):
        try:
            if self._dali_iterator is None:
                self._dali_iterator = self._build_dali()
            for batch in self._dali_iterator:
                yield batch[0]["images"], batch[0]["labels"].reshape(-1)
        except RuntimeError as exc:
            self._dali_iterator = None
            raise self._explain_dali_error(exc) from exc

    def _explain_dali_error(self, exc: Exception) -> Exception:
        """DALI's decode errors do not always name the file: find it, so the user can."""
        if isinstance(self.source, FileSource):
            for path in self.source.files:
                problem = check_image(path)
                if problem is not None:
                    return DataError(f"{path}: cannot be decoded ({problem}); remove it, or build the source "
                                     "with .verify(skip_corrupt=True) to leave such files out")
        return RuntimeError(f"DALI pipeline failed: {exc}")


def make_loader(source: Source, preprocessing, batch_size: int = 64, *, train: bool = False, seed: int = 0,
                image_size: Optional[int] = None, **kwargs) -> ImageLoader:
    """An ImageLoader with a backbone's preprocessing (fasttl.backbones.Preprocessing)."""
    spec = TransformSpec.for_backbone(preprocessing, train=train, seed=seed, size=image_size)
    return ImageLoader(source, spec, batch_size, **kwargs)
