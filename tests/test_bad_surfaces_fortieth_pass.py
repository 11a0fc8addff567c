"""The fortieth hostile pass (a PyTorch user's script around the cache loader): a copied cache
(copy.deepcopy, pickle, a spawned DataLoader worker) read the original's shard addresses (a
segfault, or another tensor's memory returned without a word); pickling a cache failed on a
lambda naming neither; an int8 cache read float32's largest values back as inf; a loader followed
torch.set_num_threads(3000) with 2,999 helper threads for the rest of the process."""
import copy
import gc
import pickle
import zlib

import numpy as np
import pytest
import torch

from fasttl import FeatureCache
from fasttl.cache import gather_threads
from fasttl.cache.store import CacheError


def written(request, tmp_path, rows=300, dim=24, dtype="fp16"):
    generator = np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))
    features = generator.standard_normal((rows, dim)).astype(np.float32)
    labels = generator.integers(0, 3, rows)
    cache = FeatureCache.write(str(tmp_path / "cache"), [features], labels, classes=["a", "b", "c"], dtype=dtype,
                               shard_rows=64)  # five shards: the loader reads through the shard table
    return cache, features, labels


def epoch_rows(cache, batch_size=50):
    """The features (float64) and labels of one shuffled epoch, in the order the loader gave them."""
    batches = list(cache.loader(batch_size, shuffle=True, seed=3))
    return torch.cat([f.double() for f, _ in batches]), torch.cat([y for _, y in batches])


def assert_same_rows(cache, features, labels):
    got = cache.gather(torch.arange(len(cache))).double()
    torch.testing.assert_close(got, torch.from_numpy(features).half().double(), rtol=0, atol=0)
    assert torch.equal(cache.labels, torch.from_numpy(labels).long())
    seen, seen_labels = epoch_rows(cache)
    assert sorted(map(tuple, seen.tolist())) == sorted(map(tuple, got.tolist()))
    assert sorted(seen_labels.tolist()) == sorted(labels.tolist())


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copied_cache_reads_its_own_rows_after_the_original_is_gone(request, tmp_path, how):
    cache, features, labels = written(request, tmp_path)
    epoch_rows(cache)  # the original's shard table is made
    twin = copy.deepcopy(cache) if how == "deepcopy" else pickle.loads(pickle.dumps(cache))
    del cache
    gc.collect()
    torch.randn(300, 24)  # memory the original's shards held may be reused
    assert_same_rows(twin, features, labels)
    assert twin.samples == [str(i) for i in range(300)]


class _Rows(torch.utils.data.Dataset):
    def __init__(self, cache):
        self.cache = cache

    def __len__(self):
        return len(self.cache)

    def __getitem__(self, i):
        return self.cache.gather(torch.tensor([i]))[0], self.cache.labels[i]


def test_a_spawned_dataloader_worker_reads_the_cache_it_was_sent(request, tmp_path):
    cache, features, labels = written(request, tmp_path, rows=130)
    epoch_rows(cache)
    loader = torch.utils.data.DataLoader(_Rows(cache), batch_size=40, num_workers=1,
                                         multiprocessing_context="spawn")
    got = torch.cat([rows for rows, _ in loader]).double()
    torch.testing.assert_close(got, torch.from_numpy(features).half().double(), rtol=0, atol=0)


def test_int8_refuses_values_it_would_read_back_as_inf(request, tmp_path):
    rows = np.ones((10, 4), np.float32)
    rows[3, 0] = np.finfo(np.float32).max
    with pytest.raises(CacheError, match=r"chunk 0: a value of magnitude 3.403e\+38 overflows int8 .*store it as "
                                         r"fp32"):
        FeatureCache.write(str(tmp_path / "big"), [rows], np.zeros(10, int), classes=["a"], dtype="int8")
    rows[3, 0] = 1e38  # within: read back finite, within the int8 step
    cache = FeatureCache.write(str(tmp_path / "ok"), [rows], np.zeros(10, int), classes=["a"], dtype="int8")
    back = cache.gather(torch.arange(10)).double()
    assert bool(torch.isfinite(back).all()) and abs(float(back[3, 0]) - 1e38) <= 1e38 / 254


def test_the_loaders_thread_count_is_capped_as_pinned_counts_are(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3000)
    assert gather_threads.GatherThreads().candidates() == (gather_threads.MOST_THREADS, 1)
    with pytest.raises(ValueError, match="threads: 3000 is more than a gather can use here"):
        gather_threads.GatherThreads(3000)
