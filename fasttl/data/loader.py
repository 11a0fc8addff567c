"""ImageLoader: (images, labels) batches from any source through DALI or the PyTorch fallback."""
from __future__ import annotations

import math
import re
from typing import Iterator, Optional, Tuple, Union

import torch

from fasttl.data import dali_pipeline
from fasttl.data.sources import (ArraySource, DataError, FileSource, TarSource, check_image, ensure_headers,
                                 first_bad_image, skip_hint)
from fasttl.data.spec import TransformSpec
from fasttl.data.torch_pipeline import TorchImageDataset

Source = Union[FileSource, ArraySource, TarSource]
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

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        batches = self._iter_dali() if self.backend == "dali" else self._iter_torch()
        for images, labels in batches:
            yield images.to(self.device, self.dtype, non_blocking=True), labels.to(self.device, torch.int64)
        self._epoch += 1

    def _shard_range(self) -> Tuple[int, int]:
        n = len(self.source)
        return n * self.shard_id // self.num_shards, n * (self.shard_id + 1) // self.num_shards

    # -- PyTorch fallback ------------------------------------------------------------------
    def _iter_torch(self):
        indices = list(range(*self._shard_range()))
        if self.spec.train:
            generator = torch.Generator().manual_seed(self.spec.seed * 100_003 + self._epoch)
            indices = [indices[i] for i in torch.randperm(len(indices), generator=generator).tolist()]
        dataset = TorchImageDataset(self.source, self.spec)
        dataset.epoch = self._epoch
        # Worker processes decode in parallel, as DALI's threads do; not worth starting for a few batches.
        workers = self.num_threads if len(indices) >= 8 * self.batch_size and self.num_threads > 1 else 0
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=self.batch_size,
                                             shuffle=False, num_workers=workers)
        try:
            yield from loader
        except DataError as exc:
            # A worker's error comes back wrapped in its traceback text: keep the one-line message.
            lines = [line for line in str(exc).splitlines() if "DataError: " in line]
            if not lines:
                raise
            raise DataError(lines[-1].split("DataError: ", 1)[1]) from None

    # -- DALI ------------------------------------------------------------------------------
    def _build_dali(self):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        device_id = (self.device.index or 0) if self.device.type == "cuda" else None
        if isinstance(self.source, FileSource):
            pipe = dali_pipeline.file_pipeline(self.source, self.spec, self.batch_size, self.shard_id,
                                               self.num_shards, device_id, self.num_threads)
            kwargs = dict(reader_name="Reader")
        elif isinstance(self.source, TarSource):
            self._encoded = dali_pipeline.EncodedBatches(self.source, self.batch_size, self.shard_id, self.num_shards,
                                                         self.spec.train, self.spec.seed)
            pipe = dali_pipeline.encoded_pipeline(self._encoded, self.spec, self.batch_size, device_id,
                                                  self.num_threads)
            kwargs = dict(size=-1)
        else:
            batches = dali_pipeline.ShardBatches(self.source, self.batch_size, self.shard_id, self.num_shards,
                                                 self.spec.train, self.spec.seed)
            pipe = dali_pipeline.array_pipeline(batches, self.spec, self.batch_size, device_id, self.num_threads)
            kwargs = dict(size=-1)
        pipe.build()
        return DALIGenericIterator(pipe, ["images", "labels"], last_batch_policy=LastBatchPolicy.PARTIAL,
                                   auto_reset=True, **kwargs)

    def _iter_dali(self):
        files = isinstance(self.source, FileSource)
        encoded = isinstance(self.source, TarSource)
        if files:
            # DALI's decoder crashes the process when its parser rejects a file: none may reach it.
            ensure_headers(self.source, *self._shard_range())
        if files or encoded:  # the pipeline's second output is sample indices
            label_of = torch.as_tensor(self.source.labels, dtype=torch.int64)
        delivered = []  # sample indices handed out this epoch (the file pipeline's "labels")
        try:
            if self._dali_iterator is None:
                self._dali_iterator = self._build_dali()
            for batch in self._dali_iterator:
                labels = batch[0]["labels"].reshape(-1)
                if files or encoded:
                    delivered.append(labels)
                    labels = label_of[labels.cpu()]
                yield batch[0]["images"], labels
            if encoded and self._encoded.error is not None:
                self._dali_iterator = None
                raise self._encoded.error
        except RuntimeError as exc:
            # The pipeline is invalid after an error: drop it, touch none of its outputs again.
            self._dali_iterator = None
            raise self._explain_dali_error(exc, delivered) from exc

    def _explain_dali_error(self, exc: Exception, delivered) -> Exception:
        """A DataError naming the file DALI could not decode: from DALI's message when it names a
        file of the source, else the first file not yet delivered this epoch that PIL cannot
        decode either (from the failed batch on in eval order; the shard is not read twice)."""
        text = str(exc)
        first_line = next((line for line in text.splitlines() if line.strip()), type(exc).__name__)
        if not isinstance(self.source, FileSource) or "decod" not in text:
            return RuntimeError(f"DALI pipeline failed: {first_line.strip()} (FASTTL_DEBUG=1 shows DALI's message; "
                                "backend='torch' avoids DALI)")
        named = set(re.findall(r"Failed to decode sample\s*#?\d*\s*:\s*(\S.*?)\s*$", text, re.MULTILINE))
        for path in self.source.files:
            if path in named:
                problem = check_image(path) or "DALI cannot decode it; PIL can"
                return DataError(f"{path}: cannot be decoded ({problem}); {skip_hint()}")
        done = set(torch.cat(delivered).tolist()) if delivered else set()
        begin, end = self._shard_range()
        pending = [i for i in range(begin, end) if i not in done]
        bad = first_bad_image([self.source.files[i] for i in pending], num_threads=self.num_threads)
        if bad is not None:
            return DataError(f"{bad[0]}: cannot be decoded ({bad[1]}); {skip_hint()}")
        where = self.source.root or "the source"
        return DataError(f"data: DALI could not decode one of {len(pending)} images of {where} "
                         f"that PIL decodes ({' '.join(text.split())[-300:]}); use backend='torch'")


def make_loader(source: Source, preprocessing, batch_size: int = 64, *, train: bool = False, seed: int = 0,
                image_size: Optional[int] = None, **kwargs) -> ImageLoader:
    """An ImageLoader with a backbone's preprocessing (fasttl.backbones.Preprocessing)."""
    spec = TransformSpec.for_backbone(preprocessing, train=train, seed=seed, size=image_size)
    return ImageLoader(source, spec, batch_size, **kwargs)
