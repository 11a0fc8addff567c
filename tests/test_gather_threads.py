"""The loader's gather thread count (fasttl.cache.gather_threads): every thread unless one is faster
by MARGIN, the other timed again after EXPLORE_EVERY batches and then less often while the choice
holds, so a change of load is followed; pinned when asked; the batches are the same whatever the
count."""
import zlib

import pytest
import torch

from fasttl import FeatureCache
from fasttl.cache import gather_threads
from fasttl.cache.gather_threads import EXPLORE_EVERY, EXPLORE_MOST, MARGIN, GatherThreads


def drive(chooser: GatherThreads, seconds_per_row, batches: int, rows: int = 100):
    """Run `batches` batches through the chooser with fake timings; the thread counts it chose."""
    chosen = []
    for batch in range(batches):
        threads = chooser.choose()
        chosen.append(threads)
        chooser.record(threads, rows, seconds_per_row(batch, threads) * rows)
    return chosen


def test_every_thread_is_kept_while_it_is_faster_and_one_retimed_less_and_less_often(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    chosen = drive(GatherThreads(), lambda batch, threads: 1.0 if threads == 4 else 1.8, 1000)
    assert chosen[:2] == [4, 1]  # each timed once
    retimed = [b for b, threads in enumerate(chosen) if b > 1 and threads == 1]
    gaps = [b - a for a, b in zip(retimed, retimed[1:])]
    assert gaps == sorted(gaps) and gaps[-1] == EXPLORE_MOST and len(retimed) < 1000 // EXPLORE_MOST + 5


def test_one_thread_only_when_faster_by_the_margin(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    slightly = drive(GatherThreads(), lambda batch, threads: 1.0 if threads == 1 else MARGIN * 0.9, 300)
    assert slightly.count(1) < 300 // EXPLORE_EVERY  # timing noise does not move it off every thread
    much = drive(GatherThreads(), lambda batch, threads: 1.0 if threads == 1 else MARGIN * 2, 300)
    assert much[2:].count(2) < 300 // EXPLORE_EVERY


def test_a_change_of_load_is_followed_both_ways(monkeypatch):
    """Every thread faster; then another job parks one of them (every thread 4x slower): one thread
    within a few batches; then the job ends: every thread again within a few retimings."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    parked, freed = 200, 400

    def seconds(batch, threads):
        if threads == 1:
            return 2.0
        return 4.0 * 2.0 if parked <= batch < freed else 1.0

    chosen = drive(GatherThreads(), seconds, 700)
    assert chosen[parked - 10:parked].count(2) >= 9  # every thread before
    assert set(chosen[parked + 2:parked + EXPLORE_EVERY]) == {1}  # one thread at once, until its first retiming
    assert chosen[freed + 3 * EXPLORE_MOST:].count(1) <= 2  # every thread again, apart from retimings


def test_pinned_and_single_thread_counts_are_never_explored(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)
    assert set(drive(GatherThreads(3), lambda batch, threads: 1.0, 3 * EXPLORE_EVERY)) == {3}
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert set(drive(GatherThreads(), lambda batch, threads: 1.0, 3 * EXPLORE_EVERY)) == {1}


@pytest.mark.parametrize("shuffle", [True, "blocks", False])
@pytest.mark.parametrize("dtype", ["fp16", "int8"])
def test_the_batches_do_not_depend_on_the_thread_count(request, tmp_path, shuffle, dtype, monkeypatch):
    generator = torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))
    features = torch.randn(301, 33, generator=generator)
    labels = torch.randint(0, 5, (301,), generator=generator)
    cache = FeatureCache.write(str(tmp_path / "c"), [features[:150], features[150:]], labels,
                               classes=[str(i) for i in range(5)], dtype=dtype, shard_rows=64)
    reference = [(x.clone(), y.clone()) for x, y in cache.loader(37, shuffle=shuffle, seed=4, threads=1)]
    assert torch.equal(torch.cat([y for _, y in reference]).sort().values, labels.sort().values)
    monkeypatch.setattr(gather_threads, "EXPLORE_EVERY", 1)  # switch counts often within the epoch
    for threads in (2, None):
        got = list(cache.loader(37, shuffle=shuffle, seed=4, threads=threads))
        assert len(got) == len(reference)
        for (x, y), (want_x, want_y) in zip(got, reference):
            assert torch.equal(x, want_x) and torch.equal(y, want_y)


@pytest.mark.parametrize("threads", [0, -1, 1.5, "2", True, gather_threads.MOST_THREADS + 1, 2**31, 10**30])
def test_bad_thread_counts_are_one_line_errors(tmp_path, threads):
    cache = FeatureCache.write(str(tmp_path / "c"), [torch.zeros(4, 3)], torch.zeros(4, dtype=torch.long),
                               classes=["a"], dtype="fp32")
    with pytest.raises((TypeError, ValueError), match=r"^threads: "):
        cache.loader(2, threads=threads)
