"""FeatureCache: features of a frozen backbone, computed once, served at memory speed."""
from __future__ import annotations

import json
import threading
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from fasttl import _ops
from fasttl.cache import build, format, write
from fasttl.cache.format import mismatch_message  # noqa: F401  (part of this module's API)
from fasttl.cache.gather_threads import GatherThreads
from fasttl.cache.kernels import CACHE_DTYPE, ShardTable, gather
from fasttl.cache.order import epoch_order, shuffle_mode
from fasttl.cache.store import CacheError
from fasttl.util.checks import a_flag, folder_path, order_number, plain_number, positive_int, torch_device
from fasttl.util.files import absolute


# made_by's parts, in its order, as messages name them
MADE_BY_PARTS = ("backbone", "layout of tapped stages", "image size, normalization or crop", "extraction precision",
                 "backbone (user's fingerprint)", "model (user's fingerprint)",
                 "int8 calibration sample (build every split with calibration= the training split's "
                 "calibration_sample, as fasttl extract and run do)")


class FeatureCache:
    """Features of one split of a dataset under one backbone and preprocessing.

    ``FeatureCache.build(backbone, source, out_dir, ...)`` runs the frozen backbone once over the
    dataset (resumable, lock-protected, torchrun-aware), ``FeatureCache.write(out_dir, chunks,
    labels, classes=...)`` stores features computed elsewhere, and ``FeatureCache.open(out_dir)``
    maps either back. Then ``len(cache)``, ``cache.feature_dim``, ``cache.classes``,
    ``cache.labels`` and ``cache.loader(batch_size, shuffle, seed, device)`` yielding
    ``(features, labels)`` batches through the native gather kernel, every row exactly once per
    epoch.

    An opened cache stays on disk: each shard file is memory-mapped and the loader reads the rows
    of each batch where they lie (the page cache holds what was read; it is not the process's
    own memory). Copies of the whole cache are explicit: ``cache.to("cuda")`` (the GPU reads it
    at its memory speed), ``cache.to("cpu")``, ``all_features()``, ``features``; a copy made by
    ``copy.deepcopy`` or pickle (a spawned DataLoader worker gets one) holds its rows in memory:
    in spawned workers, ``FeatureCache.open(directory)`` maps the files instead."""

    def __init__(self, directory: str, manifest: dict, features: Union[Tensor, Sequence[Tensor]],
                 scales: Union[None, Tensor, Sequence[Tensor]], labels: Tensor,
                 samples: Union[List[str], Callable[[], List[str]]]):
        self.directory = directory
        self.manifest = manifest
        self._shards = [features] if isinstance(features, Tensor) else list(features)
        self._shard_scales = None if scales is None else [scales] if isinstance(scales, Tensor) else list(scales)
        self.labels = labels
        self._samples = samples
        self._table = None  # the ShardTable of a cache of several shards, made on first use
        # What FeatureCache.build or .write did to make it (build_cache's keys); {} when opened.
        self.last_build: Dict[str, object] = {}

    # -- building, writing and opening ---------------------------------------------------------
    @classmethod
    def build(cls, backbone, data, out_dir: str, **kwargs) -> "FeatureCache":
        """Runs the frozen backbone over `data` into `out_dir` (or finds that it already did) and
        opens the result; ``cache.last_build`` holds what the build did. See
        :func:`fasttl.cache.build.build_cache` for the arguments."""
        result = build.build_cache(backbone, data, folder_path("out_dir", out_dir), **kwargs)
        # A cache this call wrote was hashed as it was written, and recorded as verified.
        cache = cls.open(result["directory"], verify=True)
        cache.last_build = result
        return cache

    @classmethod
    def write(cls, directory: str, chunks: Iterable, labels, *, classes: Sequence[str], dtype: str = CACHE_DTYPE,
              sample_ids: Optional[Sequence[str]] = None, fingerprint: Optional[dict] = None,
              shard_rows: int = 65536, overwrite: bool = False) -> "FeatureCache":
        """Stores features computed elsewhere (your own model, another job) as a cache that opens
        and trains like a built one. See :func:`fasttl.cache.write.write_cache`."""
        result = write.write_cache(folder_path("directory", directory), chunks, labels, classes=classes, dtype=dtype,
                                   sample_ids=sample_ids, fingerprint=fingerprint, shard_rows=shard_rows,
                                   overwrite=overwrite)
        cache = cls.open(result["directory"], verify=True)
        cache.last_build = dict(result, reused=False)
        return cache

    @classmethod
    def open(cls, directory: str, verify: Union[bool, str] = True,
             expect_fingerprint: Optional[dict] = None) -> "FeatureCache":
        """Maps a finished cache: every shard file (and the labels) memory-mapped, nothing
        concatenated, so opening costs the same at any row count (apart from the manifest). Reads
        nothing but the files its manifest lists and writes nothing there. Every listed file must
        be a plain file (not a link) of the recorded size, each array of the recorded dtype and
        shape. Content, by ``verify``:

        * ``True`` (default): each file's SHA-256 (and each label's range) is checked the first
          time the file is opened in its present state, then recorded with the file's size,
          mtime, ctime and inode (under $FASTTL_STATE_DIR, default ~/.cache/fasttl/state, not in
          the cache folder): a later open reads only headers, and a file changed since is hashed
          again. A cache written by build or write is recorded as it is written.
        * ``"full"``: every file hashed now, whatever was recorded.
        * ``False``: the shards' content is not checked (the labels are, as with True).

        The sample ids are read, and checked against their SHA-256, when ``samples`` is first
        used. Any problem is a CacheError naming the file."""
        directory = absolute(folder_path("directory", directory))
        if expect_fingerprint is not None and not isinstance(expect_fingerprint, dict):
            raise TypeError(f"expect_fingerprint: expected a dict (a cache's fingerprint), got "
                            f"{type(expect_fingerprint).__name__}")
        return cls(directory, *format.read_cache(directory, verify, expect_fingerprint))

    @classmethod
    def concat(cls, caches: List["FeatureCache"]) -> "FeatureCache":
        """The rows of several caches (e.g. two views of one split) as one in-memory cache."""
        try:
            caches = list(caches)
        except TypeError:
            caches = None  # one cache, None, a number: no list of caches
        if not caches or not all(isinstance(c, FeatureCache) for c in caches):
            raise ValueError("caches: expected a non-empty list of FeatureCache objects")
        first = caches[0]
        for other in caches[1:]:
            if (other.feature_dim, other.dtype, other.classes) != (first.feature_dim, first.dtype, first.classes):
                raise CacheError("concat: caches differ in feature dim, dtype or classes")
            if other.made_by() != first.made_by():  # rows of two backbones of one width are not one feature space
                raise CacheError(f"concat: caches made with another {first.made_differently(other)} ("
                                 f"{first.directory} and {other.directory}); concatenate caches of one feature space")
        manifest = dict(first.manifest, count=sum(len(c) for c in caches))
        scales = None if first._shard_scales is None else torch.cat([s for c in caches for s in c._shard_scales])
        return cls(first.directory, manifest, torch.cat([s for c in caches for s in c._shards]), scales,
                   torch.cat([c.labels for c in caches]), [s for c in caches for s in c.samples])

    @classmethod
    def side_by_side(cls, caches: List["FeatureCache"]) -> "FeatureCache":
        """The features of several caches of the same images (e.g. two backbones'), row by row
        side by side, as one in-memory cache: what backbone "a+b" (fasttl.backbones.concatenated)
        would extract, without running the images again. Its layout lists every part's stages."""
        if not isinstance(caches, (list, tuple)) or len(caches) < 2 or \
                not all(isinstance(c, FeatureCache) for c in caches):
            raise ValueError("caches: expected a list of at least two FeatureCache objects")
        caches = list(caches)
        first = caches[0]
        for other in caches[1:]:
            if len(other) != len(first) or other.classes != first.classes or \
                    not torch.equal(other.labels.cpu(), first.labels.cpu()) or other.samples != first.samples:
                raise CacheError("side_by_side: the caches hold other images (rows, labels or sample ids differ); "
                                 "pass caches of one split of one data set")
        views = {bool((c.fingerprint.get("preprocessing") or {}).get("mirror")) for c in caches}
        if len(views) > 1:
            raise CacheError("side_by_side: a plain and a mirrored view of the images; pass caches of one view")
        for what, index in (("image size, normalization or crop", 2), ("extraction precision", 3)):
            found = [c.made_by()[index] for c in caches]
            if len(set(found)) > 1:  # one feature space: the images as one network would see them
                raise CacheError(f"side_by_side: the caches differ in {what} ({' / '.join(found)}); pass caches "
                                 "extracted alike, as backbone 'a+b' would")
        models = [_models(c, i) for i, c in enumerate(caches)]
        names = [json.dumps(p, sort_keys=True, default=str) for parts in models for p in parts]
        if len(set(names)) != len(names):
            raise CacheError("side_by_side: one backbone's features twice; pass caches of different backbones")
        plain = all(c.scales is None and c.dtype == first.dtype for c in caches)
        features = torch.cat([c.features if plain else c.all_features() for c in caches], 1)
        layouts = [c.fingerprint.get("layout") or {"taps": 0, "channels": [c.feature_dim]} for c in caches]
        compute = dict(first.fingerprint.get("compute") or {})
        calibrations = [(c.fingerprint.get("compute") or {}).get("calibration") for c in caches]
        if any(calibrations):  # every part's int8 graph (made_by compares them), not the first's alone
            compute["calibration"] = {"parts": calibrations}
        fingerprint = dict(first.fingerprint, feature_dim=features.shape[1],
                           backbone={"name": "+".join(str(q.get("name")) for p in models for q in p),
                                     "parts": [c.fingerprint.get("backbone") or p[0] for c, p in zip(caches, models)]},
                           layout={"taps": layouts[0].get("taps"),
                                   "channels": [w for layout in layouts for w in layout.get("channels", [])]},
                           dtype=first.fingerprint.get("dtype") if plain else "fp32", compute=compute)
        manifest = dict(first.manifest, fingerprint=fingerprint, feature_dim=features.shape[1])
        return cls(first.directory, manifest, features, None, first.labels, first.samples)

    def made_by(self) -> tuple:
        """What made the rows, as the fingerprint records it: the backbone (name and weights'
        SHA-256), the layout of its tapped stages, the images' preprocessing and the extraction
        precision (with an int8 graph's calibration sample); for features written by hand, the "backbone"
        or "model" their writer put in its fingerprint (other keys, such as a split's name, may
        differ between caches of one feature space)."""
        fingerprint = self.fingerprint if isinstance(self.fingerprint, dict) else {}
        user = fingerprint.get("user") if isinstance(fingerprint.get("user"), dict) else {}
        preprocessing = fingerprint.get("preprocessing") if isinstance(fingerprint.get("preprocessing"), dict) else {}
        compute = fingerprint.get("compute") if isinstance(fingerprint.get("compute"), dict) else {}
        # the image size, normalization and crop (32 px and 64 px features of one backbone are two
        # feature spaces), and the precision; not the mirror flag (a split's two views go together)
        # nor the decoder or engine (the same features within fp32 rounding)
        # An int8 graph's activation ranges come from its calibration sample: two samples, two
        # graphs (compute.calibration names the sample; a run's splits all name its training one).
        images = {k: v for k, v in preprocessing.items() if k not in ("mirror", "backend")}
        return tuple(json.dumps(value, sort_keys=True, default=str) for value in (
            fingerprint.get("backbone"), fingerprint.get("layout"), images or None, compute.get("precision"),
            user.get("backbone"), user.get("model"), compute.get("calibration")))

    def made_differently(self, other: "FeatureCache") -> Optional[str]:
        """The first part of made_by that differs between this cache and `other`, in words (None
        when they are one feature space)."""
        for what, mine, theirs in zip(MADE_BY_PARTS, self.made_by(), other.made_by()):
            if mine != theirs:
                return what
        return None

    def subset(self, rows) -> "FeatureCache":
        """The rows `rows` (indices into this cache, in that order, or a boolean mask of one entry per
        row, as torch and numpy index) as an in-memory cache."""
        rows = self._row_indices(rows, "rows")
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= len(self)):
            raise ValueError(f"rows: expected indices in [0, {len(self)})")
        features, scales = self._stored_rows(rows)
        manifest = dict(self.manifest, count=len(rows))
        samples = self.samples
        return FeatureCache(self.directory, manifest, features, scales, self.labels[rows.to(self.labels.device)],
                            [samples[i] for i in rows.tolist()])

    def _row_indices(self, rows, what: str) -> Tensor:
        """`rows` (a tensor, array or sequence) as int64 indices on the CPU: a boolean mask selects
        where it is True; a slice takes its rows; a float or other kind is refused, never truncated."""
        if isinstance(rows, slice):
            try:
                rows = range(len(self))[rows]
            except (TypeError, ValueError) as exc:  # a float bound, a step of 0
                raise type(exc)(f"{what}: a slice of integer bounds and a step other than 0, got {rows!r}") from None
        wrong = TypeError(f"{what}: expected integer row indices, a slice or a boolean mask, got {type(rows).__name__}")
        if isinstance(rows, (list, tuple)) and all(type(r) is int for r in rows):  # numpy would make them floats
            beyond = next((r for r in rows if not -2**63 <= r < 2**63), None)
            if beyond is not None:
                raise ValueError(f"{what}: expected indices in [0, {len(self)}), got {beyond}")
        try:
            array = np.asarray(rows.cpu() if isinstance(rows, Tensor) else rows)
        except (TypeError, ValueError, RuntimeError):
            raise wrong from None
        if array.dtype.kind == "u" and array.size and int(array.max()) >= len(self):  # 2**63 would wrap below 0
            raise ValueError(f"{what}: expected indices in [0, {len(self)}), got {int(array.max())}")
        try:
            rows = torch.as_tensor(array)
        except (TypeError, RuntimeError):
            raise wrong from None
        if rows.dim() != 1 and rows.numel():
            raise ValueError(f"{what}: expected a 1-D list of row indices, got shape {tuple(rows.shape)}")
        if rows.dtype == torch.bool:
            if len(rows) != len(self):
                raise ValueError(f"{what}: a boolean mask needs one entry per row ({len(self)}), got {len(rows)}")
            return rows.nonzero().flatten()
        if rows.numel() and (rows.is_floating_point() or rows.is_complex()):
            raise TypeError(f"{what}: expected integer row indices, a slice or a boolean mask, got {rows.dtype}")
        return rows.reshape(-1).to(torch.int64)

    def _stored_rows(self, rows: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
        """cache[rows] in the cache's own dtype (and the int8 scales), copied out of the shards."""
        if len(self._shards) == 1:
            index = rows.to(self.device)
            return self._shards[0][index], None if self._shard_scales is None else self._shard_scales[0][index]
        shard_rows = self._shards[0].shape[0]
        features = torch.empty((len(rows), self.feature_dim), dtype=self.dtype)
        scales = None if self._shard_scales is None else torch.empty(len(rows), dtype=torch.float32)
        which = rows // shard_rows
        for shard in torch.unique(which).tolist():
            at = (which == shard).nonzero().flatten()
            local = rows[at] - shard * shard_rows
            features[at] = self._shards[shard][local]  # reads the map; writes the new tensor
            if scales is not None:
                scales[at] = self._shard_scales[shard][local]
        return features, scales

    # -- what it holds ----------------------------------------------------------------------
    def __len__(self) -> int:
        return sum(s.shape[0] for s in self._shards)

    @property
    def feature_dim(self) -> int:
        return self._shards[0].shape[1]

    @property
    def dtype(self) -> torch.dtype:
        """The dtype rows are stored in (float32, float16, bfloat16 or int8)."""
        return self._shards[0].dtype

    @property
    def classes(self) -> List[str]:
        return list(self.manifest["fingerprint"]["dataset"]["classes"])

    @property
    def fingerprint(self) -> dict:
        return self.manifest["fingerprint"]

    @property
    def samples(self) -> List[str]:
        """The sample id of each row (read and checked on first use: they can be large)."""
        if callable(self._samples):
            self._samples = self._samples()
        return self._samples

    @property
    def device(self) -> torch.device:
        return self._shards[0].device

    @property
    def shards(self) -> List[Tensor]:
        """The stored rows, one tensor per shard (memory maps of an opened cache)."""
        return list(self._shards)

    @property
    def features(self) -> Tensor:
        """Every row in the cache's dtype as one tensor: the shard itself for a cache of one
        shard, else a concatenated copy in memory (as large as the cache; the loader never needs it)."""
        return self._shards[0] if len(self._shards) == 1 else torch.cat(self._shards)

    @property
    def scales(self) -> Optional[Tensor]:
        """int8 caches: the per-row scales as one tensor (as `features`); else None."""
        if self._shard_scales is None:
            return None
        return self._shard_scales[0] if len(self._shard_scales) == 1 else torch.cat(self._shard_scales)

    def nbytes(self) -> int:
        return sum(s.numel() * s.element_size() for s in self._shards) + \
            (0 if self._shard_scales is None else 4 * len(self))

    def to(self, device: Union[str, torch.device]) -> "FeatureCache":
        """The whole cache, as one tensor, in the memory of `device`: "cuda" (training then reads
        it at GPU memory speed; copied shard by shard, no host copy of the whole cache) or "cpu"
        (a copy in RAM, off the maps)."""
        device = torch_device(device)
        if device.type == "cuda":
            free = torch.cuda.mem_get_info(device)[0]
            if self.nbytes() > free:
                raise RuntimeError(f"cache: {self.nbytes() / 2**30:.1f} GiB does not fit in {free / 2**30:.1f} GiB "
                                   f"free on {device}; keep it in host memory")
        features = torch.empty((len(self), self.feature_dim), dtype=self.dtype, device=device)
        scales = None if self._shard_scales is None else torch.empty(len(self), dtype=torch.float32, device=device)
        start = 0
        for i, shard in enumerate(self._shards):
            features[start:start + shard.shape[0]].copy_(shard)  # reads the map, writes the new tensor
            if scales is not None:
                scales[start:start + shard.shape[0]].copy_(self._shard_scales[i])
            start += shard.shape[0]
        labels = torch.empty(len(self), dtype=torch.int64, device=device)
        labels.copy_(self.labels)
        return FeatureCache(self.directory, self.manifest, features, scales, labels, self._samples)

    def _shard_table(self) -> ShardTable:
        if self._table is None:
            self._table = ShardTable(self._shards, self._shard_scales)
        return self._table

    def gather(self, indices: Tensor, out_dtype: torch.dtype = torch.float32) -> Tensor:
        """Rows `indices` dequantized to out_dtype (indices checked against the cache's size)."""
        if not isinstance(indices, Tensor):  # a list or an array, as subset takes them
            indices = self._row_indices(indices, "indices")
        elif indices.device.type == "meta":  # no values to move or check: refused as the kernels refuse it
            raise ValueError(f"indices: is on meta (expected row indices on the cache's device, {self.device})")
        if len(self._shards) == 1:
            return gather(self._shards[0], indices.to(self.device), self.scales, out_dtype)
        return self._shard_table().gather(indices.cpu(), out_dtype)

    def _gather_in_range(self, indices: Tensor, out_dtype: torch.dtype, out: Optional[Tensor] = None) -> Tensor:
        # The loader's indices come from a permutation of range(len(self)): skipping the bounds
        # check saves two host syncs per batch on the GPU.
        if len(self._shards) == 1 and out is None:
            return _ops.gather(self._shards[0], self.scales, indices, out_dtype)
        return self._shard_table().gather(indices, out_dtype, out=out, checked=False)

    def all_features(self, out_dtype: torch.dtype = torch.float32) -> Tensor:
        """Every row dequantized, as one tensor in memory (as large as the cache in out_dtype)."""
        return self.gather(torch.arange(len(self), device=self.device), out_dtype)

    def loader(self, batch_size: int = 256, shuffle: Union[bool, str] = True, seed: int = 0,
               device: Optional[Union[str, torch.device]] = None, out_dtype: torch.dtype = torch.float32,
               drop_last: bool = False, threads: Optional[int] = None) -> "CacheLoader":
        """Batches of (features, labels). `shuffle`: True or "rows" (an exact per-row shuffle each
        epoch), "blocks" (blocks of neighbouring rows shuffled: faster on a cache much larger than
        memory caches, less random), False (stored order); see fasttl.cache.order. `threads`: how
        many threads gather a batch of a cache in host memory; None: torch's thread count, or one
        while that is faster (another job on the cores: fasttl.cache.gather_threads)."""
        return CacheLoader(self, batch_size, shuffle, seed, device, out_dtype, drop_last, threads)


def _models(cache: FeatureCache, index: int) -> list:
    """What made a cache's features, part by part, for side_by_side to refuse one model twice: the
    backbone a build recorded (a concatenation's parts), or the model a written cache's
    fingerprint names (FeatureCache.write(..., fingerprint={"model": ...}))."""
    backbone = cache.fingerprint.get("backbone")
    if isinstance(backbone, dict) and backbone:
        return flat_parts(backbone)
    user = cache.fingerprint.get("user") if isinstance(cache.fingerprint.get("user"), dict) else {}
    named = [user[k].strip() for k in ("model", "backbone") if isinstance(user.get(k), str) and user[k].strip()]
    if not named:
        raise CacheError(f"side_by_side: caches[{index}] does not say which model made its features (a cache "
                         "FeatureCache.write made without fingerprint={'model': NAME}); write it with one")
    return [{"name": named[0]}]  # by name alone: {"model": "m1"} and {"backbone": "m1 "} are one model


def flat_parts(record: dict) -> list:
    """A backbone record's models, a join of joins flattened ((m1+m2)+m3 is m1, m2, m3)."""
    parts = record.get("parts")
    if not isinstance(parts, list) or not parts:
        return [record]
    return [model for part in parts for model in (flat_parts(part) if isinstance(part, dict) else [part])]


class CacheLoader:
    """(features, labels) batches gathered from a cache; a new seeded order each epoch when
    shuffling (fasttl.cache.order: each batch's rows are read in ascending order).

    A cache in host memory (its maps) feeding a CUDA device is gathered into pinned staging
    buffers and copied per batch without blocking; a buffer is refilled only once the copy that
    read it has finished."""

    STAGING_BUFFERS = 3

    def __init__(self, cache: FeatureCache, batch_size: int, shuffle: bool, seed: int, device, out_dtype, drop_last,
                 threads: Optional[int] = None):
        batch_size, threads = plain_number(batch_size), plain_number(threads)
        positive_int("batch_size", batch_size)
        if threads is not None:
            positive_int("threads", threads)
        seed = order_number("seed", seed, 64)
        if out_dtype not in (torch.float32, torch.bfloat16):
            raise TypeError(f"out_dtype: expected torch.float32 or torch.bfloat16, got {out_dtype!r}")
        drop_last = a_flag("drop_last", drop_last)  # a numpy bool as the plain bool
        self.cache, self.batch_size, self.shuffle, self.seed = cache, batch_size, shuffle_mode(shuffle), seed
        self.device = torch_device(device) if device is not None else cache.device
        self.out_dtype, self.drop_last, self.epoch = out_dtype, drop_last, 0
        self.threads, self._epochs = GatherThreads(threads), threading.Lock()

    def __len__(self) -> int:
        n = len(self.cache)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose order the next iteration gives (as DistributedSampler.set_epoch)."""
        epoch = order_number("epoch", epoch, 63)
        with self._epochs:
            self.epoch = epoch

    def __iter__(self) -> Iterator[Tuple[Tensor, Tensor]]:
        with self._epochs:  # two threads iterating one loader get an epoch each
            epoch, self.epoch = self.epoch, self.epoch + 1
        order = epoch_order(len(self.cache), self.batch_size, self.shuffle, self.seed, epoch).to(self.cache.device)
        starts = range(0, len(self) * self.batch_size, self.batch_size)
        if self.cache.device.type == "cpu" and self.device.type == "cuda":
            yield from self._staged(order, starts)
            return
        for start in starts:
            indices = order[start:start + self.batch_size]
            features = self._gather(indices)
            # index_select, not labels[indices]: advanced indexing took 4-7 ms a batch of 8192 beside
            # another job on the cores (its parallel loop waits on a parked thread), index_select 0.08 ms
            labels = torch.index_select(self.cache.labels, 0, indices)
            yield features.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)

    def _gather(self, indices: Tensor, out: Optional[Tensor] = None) -> Tensor:
        if self.cache.device.type != "cpu":
            return self.cache._gather_in_range(indices, self.out_dtype, out)
        table = self.cache._shard_table()
        return self.threads.run(lambda threads: table.gather(indices, self.out_dtype, out=out, checked=False,
                                                             threads=threads), len(indices))

    def _staged(self, order: Tensor, starts) -> Iterator[Tuple[Tensor, Tensor]]:
        """Host rows to the GPU through pinned buffers: the gather of batch k + 1 runs while the
        copy of batch k is in flight."""
        width = self.cache.feature_dim
        buffers = [(torch.empty((self.batch_size, width), dtype=self.out_dtype, pin_memory=True),
                    torch.empty(self.batch_size, dtype=torch.int64, pin_memory=True), None)
                   for _ in range(self.STAGING_BUFFERS)]
        stream = torch.cuda.current_stream(self.device)
        for k, start in enumerate(starts):
            slot = k % len(buffers)
            features, labels, copied = buffers[slot]
            if copied is not None:
                copied.synchronize()  # the copy that read this buffer is done
            indices = order[start:start + self.batch_size]
            n = len(indices)
            self._gather(indices, out=features[:n])
            torch.index_select(self.cache.labels, 0, indices, out=labels[:n])
            on_device = (features[:n].to(self.device, non_blocking=True),
                         labels[:n].to(self.device, non_blocking=True))
            done = torch.cuda.Event()
            done.record(stream)
            buffers[slot] = (features, labels, done)
            yield on_device
