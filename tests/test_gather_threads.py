"""The cache loader's gather threads (fasttl.cache.gather_threads): any thread count gathers the
float64 reference's rows exactly (poisoned outputs overwritten, sizes 0 and 1, int8 scales), and
the chooser tries each count, keeps the faster, tries the other every EXPLORE_EVERY batches and
follows a change of load."""
import zlib

import pytest
import torch

import fasttl
from fasttl.cache import gather_threads
from fasttl.cache.gather_threads import EXPLORE_EVERY, GatherThreads
from fasttl.cache.kernels import ShardTable


def _generator(request) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.mark.parametrize("threads", [0, 1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int8])
@pytest.mark.parametrize("count", [0, 1, 997])
def test_any_thread_count_gathers_the_reference_rows(request, threads, dtype, count):
    g = _generator(request)
    rows, width, shard_rows = 1500, 37, 400
    values = torch.randn(rows, width, generator=g, dtype=torch.float64) * 3
    if dtype == torch.int8:
        scales = values.abs().amax(1) / 127
        stored = torch.round(values / scales[:, None]).to(torch.int8)
        reference = stored.double() * scales.float().double()[:, None]
        shard_scales = list(scales.float().split(shard_rows))
    else:
        stored = values.to(dtype)
        reference, shard_scales = stored.double(), None
    table = ShardTable([s.contiguous() for s in stored.split(shard_rows)], shard_scales)
    indices = torch.randint(0, rows, (count,), generator=g)
    out = torch.full((count, width), float("nan"))
    table.gather(indices, out=out, threads=threads)
    torch.testing.assert_close(out.double(), reference[indices], rtol=1e-6, atol=1e-6)


class _Clock:
    """Seconds per row each thread count takes, as a test sets them."""

    def __init__(self, monkeypatch, per_row):
        self.now, self.per_row = 0.0, per_row
        monkeypatch.setattr(gather_threads.time, "perf_counter", lambda: self.now)

    def gather(self, rows):
        def run(threads):
            self.now += self.per_row[threads] * rows
            return threads
        return run


def test_the_chooser_tries_each_count_keeps_the_faster_and_follows_the_load(monkeypatch):
    clock = _Clock(monkeypatch, {2: 1e-6, 1: 2e-6})  # idle: two threads twice as fast
    chooser = GatherThreads(most=2)
    used = [chooser.timed(clock.gather(8192), 8192) for _ in range(4 * EXPLORE_EVERY)]
    assert used[:2] == [2, 1]  # each count first
    later = used[2:]
    assert later.count(1) == len([b for b in range(2, len(used)) if b % EXPLORE_EVERY == EXPLORE_EVERY - 1])
    assert later.count(2) > 3 * later.count(1)
    clock.per_row = {2: 8e-6, 1: 2e-6}  # another process takes a core: one thread is now 4x faster
    used = [chooser.timed(clock.gather(8192), 8192) for _ in range(4 * EXPLORE_EVERY)]
    assert used[-EXPLORE_EVERY + 1:].count(1) >= EXPLORE_EVERY - 2  # switched within a few explorations
    assert chooser.per_row[2] > chooser.per_row[1]


def test_one_core_has_nothing_to_choose(monkeypatch):
    chooser = GatherThreads(most=1)
    assert chooser.candidates == (1,)
    assert [chooser.timed(lambda threads: threads, 10) for _ in range(3)] == [1, 1, 1]


def test_a_loader_epoch_reads_every_row_once_whatever_the_counts_chosen(tmp_path, request):
    g = _generator(request)
    rows = torch.randn(3001, 16, generator=g)
    cache = fasttl.FeatureCache.write(str(tmp_path / "c"), [rows], torch.arange(3001) % 3, classes=list("abc"),
                                      dtype="fp32", shard_rows=512)
    loader = cache.loader(256, shuffle="rows", seed=1)
    seen = torch.cat([features for features, _ in loader])
    assert torch.equal(seen[seen[:, 0].argsort()], rows[rows[:, 0].argsort()])
    assert set(loader.threads.per_row) == set(loader.threads.candidates)  # both were timed
