"""The cache loader's epoch order (fasttl.cache.order): every row once per epoch; "rows" makes the
same batches as an exact torch.randperm shuffle, each read in ascending order; "blocks" keeps
BLOCK_ROWS neighbours together; features and labels stay paired through the loader."""
import zlib

import numpy as np
import pytest
import torch

from fasttl import FeatureCache
from fasttl.cache import order
from fasttl.util.seeds import torch_seed


def seed_of(request) -> int:
    return zlib.crc32(request.node.nodeid.encode())


def batches(indices: torch.Tensor, batch_size: int):
    return [b for b in indices.split(batch_size)]


@pytest.mark.parametrize("rows,batch_size", [(0, 4), (1, 4), (7, 3), (64, 16), (1000, 256), (333, 1000)])
def test_rows_are_the_exact_shuffle_with_each_batch_ascending(request, rows, batch_size):
    seed = seed_of(request) % 1000
    got = order.epoch_order(rows, batch_size, "rows", seed, epoch=2)
    exact = torch.randperm(rows, generator=torch.Generator().manual_seed(torch_seed(seed * 1_000_003 + 2)))
    assert sorted(got.tolist()) == list(range(rows))
    for mine, theirs in zip(batches(got, batch_size), batches(exact, batch_size), strict=True):
        assert mine.tolist() == sorted(theirs.tolist())  # the same rows in each batch, read in order


@pytest.mark.parametrize("rows,batch_size", [(0, 16), (1, 16), (15, 32), (17, 16), (1000, 64), (4099, 512)])
def test_blocks_keep_neighbours_together_and_cover_every_row(request, rows, batch_size, monkeypatch):
    seed = seed_of(request) % 1000
    got = order.epoch_order(rows, batch_size, "blocks", seed, epoch=0)
    assert sorted(got.tolist()) == list(range(rows))
    for batch in batches(got, batch_size):
        assert batch.tolist() == sorted(batch.tolist())
    if rows >= 2 * order.BLOCK_ROWS:  # each block's rows stay together: at most one batch boundary cuts a block
        with monkeypatch.context() as patch:  # the block order itself, before each batch is sorted
            patch.setattr(order, "ascending_within_batches", lambda indices, size: indices)
            unsorted = order.epoch_order(rows, batch_size, "blocks", seed, epoch=0)
        blocks = (unsorted // order.BLOCK_ROWS).tolist()
        runs = [b for i, b in enumerate(blocks) if i == 0 or b != blocks[i - 1]]
        assert len(runs) == len(set(runs)) == -(-rows // order.BLOCK_ROWS)
    if rows > 4 * order.BLOCK_ROWS:
        assert not torch.equal(got, order.epoch_order(rows, batch_size, "blocks", seed, epoch=1))
        assert torch.equal(got, order.epoch_order(rows, batch_size, "blocks", seed, epoch=0))


def test_blocks_shuffle_small_caches_and_the_last_block_too():
    """Fewer than two blocks: rows are shuffled (not the stored order every epoch); the short last
    block takes a random place, so drop_last loses other rows each epoch."""
    firsts = {tuple(order.epoch_order(15, 4, "blocks", 0, epoch).tolist()) for epoch in range(5)}
    assert len(firsts) > 1 and all(sorted(o) == list(range(15)) for o in firsts)
    seen = set()
    for epoch in range(40):
        seen |= set(order.epoch_order(100, 32, "blocks", 0, epoch)[:96].tolist())  # drop_last: the first 3 batches
    assert seen == set(range(100))


def test_no_shuffle_is_the_stored_order():
    assert order.epoch_order(10, 3, False, 0, 5).tolist() == list(range(10))


@pytest.mark.parametrize("value,mode", [(True, "rows"), (False, False), (np.True_, "rows"), (np.False_, False),
                                        ("rows", "rows"), ("blocks", "blocks")])
def test_shuffle_values(value, mode):
    assert order.shuffle_mode(value) == mode


@pytest.mark.parametrize("value", ["yes", "Rows", 1, None, 0.5, "blocks "])
def test_bad_shuffle_values_are_one_line_errors(tmp_path, value):
    cache = FeatureCache.write(str(tmp_path / "c"), [torch.zeros(4, 3)], torch.zeros(4, dtype=torch.long),
                               classes=["a"], dtype="fp32")
    with pytest.raises(ValueError, match=r"^shuffle: expected True, False, 'rows' or 'blocks', got "):
        cache.loader(2, shuffle=value)


@pytest.mark.parametrize("shuffle", [True, "blocks", False])
@pytest.mark.parametrize("dtype", ["fp32", "fp16", "int8"])
def test_the_loader_keeps_features_and_labels_paired(request, tmp_path, shuffle, dtype):
    generator = torch.Generator().manual_seed(seed_of(request))
    rows = 101
    features = torch.randn(rows, 5, generator=generator)
    labels = torch.randint(0, 7, (rows,), generator=generator)
    cache = FeatureCache.write(str(tmp_path / "c"), [features[:60], features[60:]], labels,
                               classes=[str(i) for i in range(7)], dtype=dtype, shard_rows=40)
    seen = []
    for x, y in cache.loader(16, shuffle=shuffle, seed=3):
        # each row of the batch is the cache's own row with its label
        matches = [int(torch.nonzero((cache.gather(torch.arange(rows)) == row).all(1))[0]) for row in x]
        assert labels[matches].tolist() == y.tolist()
        seen += matches
    assert sorted(seen) == list(range(rows))
